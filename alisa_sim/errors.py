"""User-input errors: one clear message, exit code 2, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pydantic
import yaml


class SpecError(Exception):
    """A bad workload, model, profile or plan supplied by the user."""


def format_validation_error(err: pydantic.ValidationError, source: str) -> str:
    """One line per problem, each naming the offending field by its dotted path."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"{source}: field '{where}': {problem['msg']}")
    return "\n".join(lines)


def load_yaml_file(path: str | Path, what: str) -> dict:
    """Read a YAML mapping with safe_load; missing files and syntax errors become SpecError."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def load_json_file(path: str | Path, what: str):
    """Read a JSON file; missing files and syntax errors become SpecError."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: not valid JSON: {exc}") from None


def validate(model: type[pydantic.BaseModel], data: dict, source: str):
    """Build a pydantic model, turning validation errors into a SpecError naming each field."""
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise SpecError(format_validation_error(exc, source)) from None

"""User-input errors: one clear message, exit code 2, never a traceback; and the safe readers of input files."""

from __future__ import annotations

import json
import re
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

import pydantic

import yaml
import yaml.composer
import yaml.constructor
import yaml.cyaml
import yaml.resolver

from alisa_sim.limits import MAX_FILE_BYTES, MAX_NESTING, MAX_VALUES

EXIT_BAD_INPUT = 2


class SpecError(Exception):
    """A bad workload, model, profile or plan supplied by the user, or an output path that cannot be written."""


class Interrupted(BaseException):
    """SIGTERM (or SIGINT) arrived: unwinds like KeyboardInterrupt, so temporary files are removed on the way out."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextmanager
def terminations_raised():
    """Within the block SIGTERM raises Interrupted (its default action would kill the process before any cleanup)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, _frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_exit_code(exc: BaseException) -> tuple[str, int]:
    """The signal's name and the exit code a shell reports for it (128 + signal number)."""
    signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
    return signal.Signals(signum).name, 128 + signum


def format_validation_error(err: pydantic.ValidationError, source: str) -> str:
    """One line per problem, each naming the offending field by its dotted path."""
    lines = []
    for problem in err.errors():
        where = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"{source}: field '{where}': {problem['msg']}")
    return "\n".join(lines)


def check_size(data, source: str, max_values: int = MAX_VALUES) -> None:
    """Refuse data nested past MAX_NESTING or holding more than `max_values` values once YAML aliases are expanded (a
    'billion laughs' file is small on disk and huge to walk)."""
    stack, count = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > max_values:
            raise SpecError(f"{source}: holds more than {max_values:,} values (repeated YAML aliases?)")
        if isinstance(value, (dict, list)):
            if depth >= MAX_NESTING:
                raise SpecError(f"{source}: nested more than {MAX_NESTING} levels deep")
            children = list(value.keys()) + list(value.values()) if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of an input file; a missing, unreadable, oversized or non-UTF-8 file is a SpecError."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{what} file not found: {path}")
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise SpecError(f"{path}: {size:,} bytes is past the {MAX_FILE_BYTES:,}-byte limit of a {what} file")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the {what} file: {exc.strerror}") from None


if yaml.__with_libyaml__:
    class _SafeLoader(yaml.composer.Composer, yaml.cyaml.CParser, yaml.constructor.SafeConstructor, yaml.resolver.Resolver):
        """safe_load's loader, parsing with libyaml (a tenth of the pure-Python parser's time on a hardware profile)
        but composing nodes in Python, whose recursion limit stops deep nesting (libyaml's composer would overflow
        the C stack); it also reads exponent floats without a dot (`1e-5`) as numbers, as YAML 1.2 and JSON do
        (YAML 1.1 makes them strings, which a strict numeric field then refuses)."""

        def __init__(self, stream):
            yaml.cyaml.CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)
else:  # pragma: no cover - PyYAML built without libyaml
    class _SafeLoader(yaml.SafeLoader):
        """safe_load's loader that also reads exponent floats without a dot (`1e-5`) as numbers, as YAML 1.2 and
        JSON do (YAML 1.1 makes them strings, which a strict numeric field then refuses)."""


_SafeLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                  list("-+0123456789"))


def parse_yaml(text: str):
    """`yaml.safe_load` of text, exponent floats without a dot included (see `_SafeLoader`)."""
    return yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - a SafeLoader subclass: no object construction


def load_yaml_file(path: str | Path, what: str) -> dict:
    """Read a YAML mapping with safe_load; missing files, syntax errors and oversized data become SpecError."""
    path = Path(path)
    text = read_text_file(path, what)
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        if "maximum nesting depth" in str(exc):  # libyaml 0.2.6 on (PyYAML 6.0.4's wheels) stops at 1000 levels
            raise SpecError(f"{path}: nested more than {MAX_NESTING} levels deep") from None
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:  # an older libyaml: Python's composer reaches the recursion limit first
        raise SpecError(f"{path}: nested more than {MAX_NESTING} levels deep") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise SpecError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    check_size(data, str(path))
    return data


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def load_json_file(path: str | Path, what: str):
    """Read a strict JSON file (no NaN or Infinity); missing files, syntax errors and oversized data become
    SpecError."""
    path = Path(path)
    text = read_text_file(path, what)
    try:
        data = json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as exc:
        raise SpecError(f"{path}: not valid JSON: {exc}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested more than {MAX_NESTING} levels deep") from None
    except ValueError as exc:
        raise SpecError(f"{path}: not valid JSON: {exc}") from None
    check_size(data, str(path))
    return data


def validate(model: type[pydantic.BaseModel], data: dict, source: str):
    """Build a pydantic model, turning validation errors into a SpecError naming each field."""
    check_size(data, source)
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        raise SpecError(format_validation_error(exc, source)) from None

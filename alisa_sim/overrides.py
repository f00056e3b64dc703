"""Command-line overrides of workload fields (`--set batch_size=64 --set policy.kv_sparsity=0.9`), applied to the raw
workload mapping before it is validated, so an overridden field is checked exactly like one in the file."""

from __future__ import annotations

import copy

import yaml

from alisa_sim.errors import SpecError, parse_yaml


def parse_assignment(text: str) -> tuple[list[str], object]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value read as a YAML scalar or flow collection (64 -> int,
    0.9 -> float, true -> bool, [1, 2] -> list, {gpu_gb: 16} -> mapping, anything else a string)."""
    key, sep, raw = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise SpecError(f"--set {text!r}: expected KEY=VALUE with a dotted KEY, e.g. --set policy.kv_sparsity=0.9")
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict, assignments: list[str] | tuple[str, ...]) -> dict:
    """A copy of `data` with every `KEY=VALUE` assignment made, in order; a KEY passing through a value that is not
    a mapping is an error naming it."""
    if not assignments:
        return data
    data = copy.deepcopy(data)
    for text in assignments:
        path, value = parse_assignment(text)
        node = data
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                where = ".".join(path[:depth + 1])
                raise SpecError(f"--set {text}: '{where}' is {child!r}, not a mapping with fields")
            node = child
        node[path[-1]] = value
    return data


def describe_overrides(assignments: list[str] | tuple[str, ...]) -> str:
    """How a source names its overrides in messages: ' with --set a=1 --set b=2', or ''."""
    return " with " + " ".join(f"--set {text}" for text in assignments) if assignments else ""


def add_set_argument(parser) -> None:
    """The repeatable `--set KEY=VALUE` option of the commands that load a workload."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a workload field before validation, dotted for nested ones (repeatable): "
                             "--set batch_size=64 --set policy.kv_sparsity=0.9")

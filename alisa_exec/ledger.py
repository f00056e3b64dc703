"""The ledger of named ops: what the executor issued, by name and shape, for comparing it with what the simulator
priced for the same plan (tests/exec/test_op_ledger.py), and when, for timing each op inside real steps
(alisa_exec.in_step)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

_ledger: list[tuple[str, dict[str, int]]] | None = None
_clocked: list[tuple[str, dict[str, int] | None, float]] | None = None


@contextmanager
def recording() -> Iterator[list[tuple[str, dict[str, int]]]]:
    """Meanwhile, note every named op issued (alisa_sim.hardware.NAMED_OPS: name and shape), in issue order: what
    the simulator must price for the same plan (tests/exec/test_op_ledger.py)."""
    global _ledger
    saved, _ledger = _ledger, []
    try:
        yield _ledger
    finally:
        _ledger = saved


@contextmanager
def clocking() -> Iterator[list[tuple[str, dict[str, int] | None, float]]]:
    """Meanwhile, note every named op issued with the host clock at its issue, and the run's clock marks (`marked`:
    a run's start, "start", and each step's end, "end", with shape None), in order."""
    global _clocked
    saved, _clocked = _clocked, []
    try:
        yield _clocked
    finally:
        _clocked = saved


def issued(op: str, **shape: int) -> None:
    """Note one named op at its shape while `recording()` (and when, while `clocking()`)."""
    if _ledger is not None:
        _ledger.append((op, shape))
    if _clocked is not None:
        _clocked.append((op, shape, time.perf_counter()))


def marked(what: str) -> None:
    """Note a clock mark of the run ("start" or "end" of a step) while `clocking()`."""
    if _clocked is not None:
        _clocked.append((what, None, time.perf_counter()))

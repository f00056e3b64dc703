"""The ledger of named ops: what the executor issued, by name and shape, for comparing it with what the simulator
priced for the same plan (tests/exec/test_op_ledger.py)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

_ledger: list[tuple[str, dict[str, int]]] | None = None


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


def issued(op: str, **shape: int) -> None:
    """Note one named op at its shape while `recording()`."""
    if _ledger is not None:
        _ledger.append((op, shape))

"""selection_trace: a measured ALISA run's own selection, replayed by the simulator in place of selection statistics.

Which tokens SWA picks is a property of the model's attention on the run's data, not of the machine: the simulator
prices it from `selection_stats` (an expectation over ages), while a measured run fetched and recomputed whole token
rows. For validation the simulator can instead be told, per decode step, how many token rows (one token of one layer
of one sequence) the run fetched from the CPU and recomputed: then it moves the bytes the run moved, and what is
left to compare is time. The trace is the run's own Result JSON (`alisa-exec run` writes it, source "exec"); it is
replayed only under the plan it was measured with, which the replay checks step by step (phase and KV bytes held on
each tier). A decode step's rows are spread evenly over its layers (the simulator times one layer template per step).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from alisa_sim.errors import SpecError, load_json_file, validate
from alisa_sim.workload import AlisaPolicyConfig


class _TracedStep(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    step: int = Field(ge=0)
    kind: Literal["prefill", "decode"]
    phase: int = Field(ge=1, le=3)
    gpu_kv_bytes: int = Field(ge=0)
    cpu_kv_bytes: int = Field(ge=0)
    fetched_tokens: int = Field(default=0, ge=0)
    recomputed_tokens: int = Field(default=0, ge=0)


class SelectionTrace(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    source: Literal["exec"]
    steps: list[_TracedStep]

    def decode_steps(self) -> dict[int, _TracedStep]:
        return {row.step: row for row in self.steps if row.kind == "decode"}


def load_selection_trace(path: str | Path) -> SelectionTrace:
    """A measured run's Result JSON as a selection trace (a simulated or out-of-memory run is refused by name), read
    once while the file is unchanged: every policy built for the run reads it (the planner's, the planned one, and
    each of a calibration's evaluations)."""
    path = Path(path)
    stat = path.stat() if path.is_file() else None  # a missing file gets load_json_file's message
    return _load_selection_trace(str(path), stat and stat.st_mtime_ns, stat and stat.st_size)


@functools.lru_cache(maxsize=64)
def _load_selection_trace(path: str, mtime_ns: int | None, size: int | None) -> SelectionTrace:
    data = load_json_file(path, "selection_trace")
    if isinstance(data, dict) and data.get("source") != "exec":
        raise SpecError(f"selection_trace {path}: not a measured run (source {data.get('source')!r}; "
                        "`alisa-exec run` writes one with source 'exec')")
    if isinstance(data, dict) and data.get("metrics", {}).get("oom"):
        raise SpecError(f"selection_trace {path}: the run ran out of memory and has no steps to replay")
    return validate(SelectionTrace, data, f"selection_trace {path}")


def replaying_selection(workload: dict, result_path: str | Path) -> dict:
    """A workload mapping that replays `result_path`'s selection: ALISA at kv_sparsity > 0 (whose fetched and
    recomputed rows depend on what the model attends); any other workload unchanged."""
    policy = workload.get("policy") or {}
    sparsity = policy.get("kv_sparsity", AlisaPolicyConfig.model_fields["kv_sparsity"].default)
    if policy.get("name") != "alisa" or not sparsity or policy.get("selection_trace"):
        return workload
    return {**workload, "policy": {**policy, "selection_trace": str(result_path)}}

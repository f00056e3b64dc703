"""The Result JSON of the house plan, one builder for both runners: the step-row type, the metrics and phases built
from the rows, the schema both runners' Results are validated against, and atomic writing of JSON outputs.

`alisa-sim run` turns a simulation's steps into `StepRow`s (`build_result`); `alisa-exec run` turns its measured
steps into the same rows (`alisa_exec.executor`); `assemble_result` computes everything else from the rows.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, create_model

from alisa_sim.errors import SpecError
from alisa_sim.ops import KINDS, RESOURCES
from alisa_sim.provenance import run_metadata
from alisa_sim.simulator import Simulation
from alisa_sim.workload import ResolvedWorkload


def _non_finite_at(data, where: str = "") -> str | None:
    """The dotted path of the first NaN or infinity in `data`, if any."""
    if isinstance(data, float) and not math.isfinite(data):
        return where or "(top level)"
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, (list, tuple)) else ()
    for key, value in items:
        found = _non_finite_at(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def json_text(data, what: str) -> str:
    """Strict JSON (no NaN or Infinity, which strict parsers reject): a non-finite number is a SpecError naming it."""
    try:
        return json.dumps(data, indent=1, allow_nan=False) + "\n"
    except ValueError:
        raise SpecError(f"{what}: the output would hold a non-finite number at '{_non_finite_at(data)}'; "
                        "nothing was written") from None


def check_out_folder(folder: str | Path) -> Path:
    """Refuse, before any work, an output folder that is a file, lies under a file or cannot be written."""
    folder = Path(folder)
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise SpecError(f"cannot write into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SpecError(f"cannot write into {folder}: {existing} is not writable")
    return folder


def write_texts_atomic(folder: Path, texts: dict[str, str]) -> None:
    """Write each text to a temporary `.NAME.writing-*` file in `folder`, then rename them all into place: a reader
    sees whole files or none, and a failed or interrupted write leaves no temporary file behind (OSError raised)."""
    temporary: dict[str, str] = {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            fd, temporary[name] = tempfile.mkstemp(prefix=f".{name}.writing-", dir=folder)
            with os.fdopen(fd, "w", newline="") as handle:
                handle.write(text)
            os.chmod(temporary[name], 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        for name, tmp in temporary.items():
            os.replace(tmp, folder / name)
    except BaseException:
        for tmp in temporary.values():
            Path(tmp).unlink(missing_ok=True)
        raise


def write_json_files(folder: str | Path, files: dict[str, dict]) -> list[Path]:
    """Write JSON documents into `folder` strictly and together (write_texts_atomic); a write error is a SpecError."""
    folder = check_out_folder(folder)
    texts = {name: json_text(data, str(folder / name)) for name, data in files.items()}
    try:
        write_texts_atomic(folder, texts)
    except OSError as exc:
        raise SpecError(f"cannot write {', '.join(str(folder / n) for n in files)}: "
                        f"{exc.strerror or exc}; nothing was written") from None
    return [folder / name for name in files]


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write one JSON file whole or not at all (see write_json_files)."""
    path = Path(path)
    return write_json_files(path.parent, {path.name: data})[0]


def step_stats(durations: list[float]) -> dict[str, float]:
    if not durations:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    values = np.asarray(durations)
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "max": float(values.max())}


@dataclass
class StepRow:
    """One step of a run as the Result lists it (the prefill, a decode step, or one of vLLM's iterations): its time,
    the KV it holds, the bytes it copied and its counters (token rows moved, preemptions, ...)."""

    step: int
    kind: str  # "prefill" | "decode"
    label: str
    phase: int
    start_s: float
    time_s: float
    tokens: int  # token rows computed: prompt tokens in a prefill, one per sequence in a decode step
    sequences: int
    gpu_kv_bytes: int
    cpu_kv_bytes: int
    h2d_bytes: int
    d2h_bytes: int
    counters: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"step": self.step, "kind": self.kind, "label": self.label, "phase": self.phase,
                "start_s": self.start_s, "time_s": self.time_s, "tokens": self.tokens, "sequences": self.sequences,
                "gpu_kv_bytes": self.gpu_kv_bytes, "cpu_kv_bytes": self.cpu_kv_bytes, "h2d_bytes": self.h2d_bytes,
                "d2h_bytes": self.d2h_bytes, **self.counters}


def phases(rows: list[StepRow]) -> list[dict]:
    """Consecutive decode steps of the same KV phase, with the KV held on each device at the phase's end."""
    found: list[dict] = []
    for row in (r for r in rows if r.kind == "decode"):
        if found and found[-1]["phase"] == row.phase:
            current = found[-1]
            current["last_step"] = row.step
            current["time_s"] += row.time_s
        else:
            current = {"phase": row.phase, "first_step": row.step, "last_step": row.step, "time_s": row.time_s}
            found.append(current)
        current["gpu_kv_bytes_end"] = row.gpu_kv_bytes
        current["cpu_kv_bytes_end"] = row.cpu_kv_bytes
    return found


def _header(source: str, wl: ResolvedWorkload, plan: dict) -> dict:
    return {"source": source, "workload": wl.workload.model_dump(mode="json"), "model": wl.model.name,
            "hardware": wl.hardware.name, "plan": plan, "run": run_metadata(wl.hardware)}


def assemble_result(source: str, wl: ResolvedWorkload, plan: dict, rows: list[StepRow], peak_gpu_bytes: int,
                    peak_cpu_bytes: int, breakdown_s: dict[str, float], extra: dict | None = None) -> dict:
    """The Result JSON of a run that completed, from its step rows: metrics, phases, the breakdown and the rows."""
    batch, gen_len = wl.workload.batch_size, wl.workload.gen_len
    prefill = [r for r in rows if r.kind == "prefill"]
    decode = [r for r in rows if r.kind == "decode"]
    prefill_s = float(sum(r.time_s for r in prefill))
    decode_s = float(sum(r.time_s for r in decode))
    total_s = prefill_s + decode_s
    counters: dict[str, float] = {}
    for row in rows:
        for name, count in row.counters.items():
            counters[name] = counters.get(name, 0) + count
    metrics = {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total_s,
        "throughput_tok_s": batch * gen_len / total_s,
        # Token rows computed per second of each kind of step (recomputed prompts count as prefill work).
        "prefill_throughput_tok_s": sum(r.tokens for r in prefill) / prefill_s if prefill_s else 0.0,
        "decode_throughput_tok_s": sum(r.tokens for r in decode) / decode_s if decode_s else 0.0,
        "decode_step_s": step_stats([r.time_s for r in decode]),
        "peak_gpu_bytes": int(peak_gpu_bytes),
        "peak_cpu_bytes": int(peak_cpu_bytes),
        "h2d_bytes": sum(r.h2d_bytes for r in rows),
        "d2h_bytes": sum(r.d2h_bytes for r in rows),
        "oom": False,
        **counters,
    }
    return {**_header(source, wl, plan), **(extra or {}), "metrics": metrics, "phases": phases(rows),
            "breakdown_s": {kind: float(breakdown_s.get(kind, 0.0)) for kind in (*KINDS, "idle")},
            "steps": [row.to_json() for row in rows]}


def oom_result(source: str, wl: ResolvedWorkload, plan: dict, error: str, peak_gpu_bytes: int,
               peak_cpu_bytes: int) -> dict:
    """The Result of a run that did not fit: `oom: true` and the reason."""
    return {**_header(source, wl, plan),
            "metrics": {"oom": True, "error": error, "peak_gpu_bytes": peak_gpu_bytes, "peak_cpu_bytes": peak_cpu_bytes},
            "phases": [], "breakdown_s": {}, "steps": []}


def simulated_rows(sim: Simulation) -> list[StepRow]:
    return [StepRow(r.step, r.plan.kind, r.plan.label, r.phase, r.start_s, r.duration_s, r.plan.tokens,
                    r.plan.sequences, r.gpu_kv_bytes, r.cpu_kv_bytes, r.timing.h2d_bytes, r.timing.d2h_bytes,
                    dict(r.plan.counters)) for r in sim.steps]


def build_result(sim: Simulation) -> dict:
    """The Result JSON of a simulation (`source: sim`); an out-of-memory run has `oom: true` and the reason."""
    wl = sim.workload
    if sim.oom_error:
        return oom_result("sim", wl, sim.policy.plan(), sim.oom_error, sim.peak_gpu_bytes, sim.peak_cpu_bytes)
    rows = simulated_rows(sim)
    breakdown = dict.fromkeys(KINDS, 0.0)
    # The lanes whose busy time leaves the compute stream idle: the GPU's (copies overlap it), the one serial lane with
    # overlap off, every resource's on a CPU device (one resource). Idle is then the wait for copies or for the host.
    if not sim.policy.overlap:
        lanes: tuple[str, ...] = ("serial",)
    else:
        lanes = RESOURCES if sim.policy.stepper().host_is_device else ("gpu",)
    busy = 0.0
    for record in sim.steps:
        for kind, seconds in record.timing.parts_s.items():
            breakdown[kind] += seconds
        busy += sum(record.timing.busy_s.get(lane, 0.0) for lane in lanes)
    total_s = sum(row.time_s for row in rows)
    breakdown["idle"] = max(0.0, total_s - busy)
    # The peak's bytes by purpose, under the executor's key (its allocation by purpose).
    memory = {"memory_plan": {f"{tier}_bytes": {purpose: int(nbytes) for purpose, nbytes in usage.items() if nbytes}
                              for tier, usage in (("gpu", sim.peak_gpu_usage), ("cpu", sim.peak_cpu_usage))}}
    return assemble_result("sim", wl, sim.policy.plan(), rows, sim.peak_gpu_bytes, sim.peak_cpu_bytes, breakdown,
                           memory)


# ---- the schema both runners' Results follow ------------------------------------------------------------------------

class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # names may grow; the listed keys keep their meaning


class StepStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mean: float
    p50: float
    p90: float
    max: float


class Metrics(_Open):
    prefill_s: float
    decode_s: float
    total_s: float
    throughput_tok_s: float
    prefill_throughput_tok_s: float
    decode_throughput_tok_s: float
    decode_step_s: StepStats
    peak_gpu_bytes: int
    peak_cpu_bytes: int
    h2d_bytes: int
    d2h_bytes: int
    oom: Literal[False]


class Phase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    phase: int
    first_step: int
    last_step: int
    time_s: float
    gpu_kv_bytes_end: int
    cpu_kv_bytes_end: int


class Step(_Open):
    step: int
    kind: Literal["prefill", "decode"]
    label: str
    phase: int
    start_s: float
    time_s: float
    tokens: int
    sequences: int
    gpu_kv_bytes: int
    cpu_kv_bytes: int
    h2d_bytes: int
    d2h_bytes: int


# Busy seconds by op kind, and idle: every kind the engine prices, no other.
Breakdown = create_model("Breakdown", __config__=ConfigDict(extra="forbid"),
                         **{kind: (float, ...) for kind in (*KINDS, "idle")})


class ResultSchema(_Open):
    """A completed run's Result JSON, from either runner."""

    source: Literal["sim", "exec"]
    workload: dict
    model: str
    hardware: str
    plan: dict
    metrics: Metrics
    phases: list[Phase]
    breakdown_s: Breakdown
    steps: list[Step]


def validate_result(data: dict) -> ResultSchema:
    """Check a completed run's Result against the schema (pydantic's ValidationError names what is off)."""
    return ResultSchema.model_validate(data)

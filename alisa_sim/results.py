"""The Result JSON of the house plan, built from a simulation, and atomic writing of JSON outputs."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from alisa_sim.ops import KINDS
from alisa_sim.provenance import run_metadata
from alisa_sim.simulator import Simulation


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write JSON to a temporary file beside `path`, then rename: a reader sees the whole file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def step_stats(durations: list[float]) -> dict[str, float]:
    if not durations:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "max": 0.0}
    values = np.asarray(durations)
    return {"mean": float(values.mean()), "p50": float(np.percentile(values, 50)),
            "p90": float(np.percentile(values, 90)), "max": float(values.max())}


def _phases(sim: Simulation) -> list[dict]:
    """Consecutive decode steps of the same KV phase, with the KV held on each device at the phase's end."""
    phases: list[dict] = []
    for record in sim.decode_steps:
        if phases and phases[-1]["phase"] == record.phase:
            current = phases[-1]
            current["last_step"] = record.step
            current["time_s"] += record.duration_s
        else:
            current = {"phase": record.phase, "first_step": record.step, "last_step": record.step,
                       "time_s": record.duration_s}
            phases.append(current)
        current["gpu_kv_bytes_end"] = record.gpu_kv_bytes
        current["cpu_kv_bytes_end"] = record.cpu_kv_bytes
    return phases


def build_result(sim: Simulation) -> dict:
    """The Result JSON of a simulation (`source: sim`); an out-of-memory run has `oom: true` and the reason."""
    wl = sim.workload
    result = {
        "source": "sim",
        "workload": wl.workload.model_dump(mode="json"),
        "model": wl.model.name,
        "hardware": wl.hardware.name,
        "plan": sim.policy.plan(),
        "run": run_metadata(wl.hardware),
    }
    if sim.oom_error:
        result["metrics"] = {"oom": True, "error": sim.oom_error, "peak_gpu_bytes": sim.peak_gpu_bytes,
                             "peak_cpu_bytes": sim.peak_cpu_bytes}
        result["phases"], result["breakdown_s"], result["steps"] = [], {}, []
        return result

    batch, gen_len = wl.workload.batch_size, wl.workload.gen_len
    prefill_s = float(sum(record.duration_s for record in sim.prefill_steps))
    decode = [record.duration_s for record in sim.decode_steps]
    decode_s = float(sum(decode))
    total_s = prefill_s + decode_s
    breakdown = dict.fromkeys(KINDS, 0.0)
    counters: dict[str, float] = {}
    gpu_busy = 0.0
    for record in sim.steps:
        for name, count in record.plan.counters.items():
            counters[name] = counters.get(name, 0) + count
        for kind, seconds in record.timing.parts_s.items():
            breakdown[kind] += seconds
        gpu_busy += record.timing.busy_s.get("gpu", 0.0)
    # Time the GPU waits on transfers; with overlap off every op is serial and nothing idles.
    breakdown["idle"] = max(0.0, total_s - gpu_busy) if sim.policy.overlap else 0.0
    result["metrics"] = {
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "total_s": total_s,
        "throughput_tok_s": batch * gen_len / total_s,
        # Token rows computed per second of each kind of step (recomputed prompts count as prefill work).
        "prefill_throughput_tok_s": sum(r.plan.tokens for r in sim.prefill_steps) / prefill_s,
        "decode_throughput_tok_s": sum(r.plan.tokens for r in sim.decode_steps) / decode_s if decode else 0.0,
        "decode_step_s": step_stats(decode),
        "peak_gpu_bytes": sim.peak_gpu_bytes,
        "peak_cpu_bytes": sim.peak_cpu_bytes,
        "h2d_bytes": sum(record.timing.h2d_bytes for record in sim.steps),
        "d2h_bytes": sum(record.timing.d2h_bytes for record in sim.steps),
        "oom": False,
        **counters,
    }
    result["phases"] = _phases(sim)
    result["breakdown_s"] = breakdown
    result["steps"] = [{"step": r.step, "kind": r.plan.kind, "phase": r.phase, "time_s": r.duration_s,
                        "gpu_kv_bytes": r.gpu_kv_bytes, "cpu_kv_bytes": r.cpu_kv_bytes,
                        "h2d_bytes": r.timing.h2d_bytes, "d2h_bytes": r.timing.d2h_bytes, **r.plan.counters}
                       for r in sim.steps]
    return result

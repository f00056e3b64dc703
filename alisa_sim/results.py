"""The Result JSON of the house plan, built from a simulation, and atomic writing of JSON outputs."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np

from alisa_sim.errors import SpecError
from alisa_sim.ops import KINDS
from alisa_sim.provenance import run_metadata
from alisa_sim.simulator import Simulation


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

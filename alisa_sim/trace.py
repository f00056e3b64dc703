"""Chrome / Perfetto trace of a run, one writer for both runners: a step track, one track per resource (GPU compute,
H2D copy, D2H copy, CPU; the serial track only when a simulation turned overlap off), and KV-bytes counters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import numpy as np

from alisa_sim.engine import SERIAL
from alisa_sim.results import StepRow, simulated_rows
from alisa_sim.simulator import Simulation

RESOURCE_TRACKS = {"gpu": "GPU compute", "h2d": "H2D copy", "d2h": "D2H copy", "cpu": "CPU"}
_SERIAL_NAME = "serial (overlap off)"
_PID = 1


def detailed_steps(num_steps: int, limit: int) -> set[int]:
    """Steps whose every op goes into the trace: all of them up to `limit`, else `limit` spread evenly
    (the first and last included), so the trace stays loadable."""
    if num_steps <= limit:
        return set(range(num_steps))
    return {int(i) for i in np.linspace(0, num_steps - 1, limit).round()}


@dataclass(frozen=True)
class TraceSpan:
    """One op on a resource track ("gpu", "h2d", "d2h", "cpu" or the engine's serial resource)."""

    track: str
    name: str
    start_s: float
    end_s: float
    args: dict = field(default_factory=dict)


def trace_json(process: str, rows: list[StepRow], spans: Iterable[TraceSpan], workload: dict,
               detail_steps: Iterable[int]) -> dict:
    """Trace-event JSON: complete events in microseconds; the KV counter starts at zero and steps to each step's
    KV at the step's end."""
    spans = list(spans)
    tracks = {"steps": "steps", **RESOURCE_TRACKS}
    if any(span.track == SERIAL for span in spans):
        tracks[SERIAL] = _SERIAL_NAME
    tids = {track: tid for tid, track in enumerate(tracks)}
    events: list[dict] = [{"ph": "M", "pid": _PID, "name": "process_name", "args": {"name": process}}]
    events += [{"ph": "M", "pid": _PID, "tid": tids[track], "name": "thread_name", "args": {"name": name}}
               for track, name in tracks.items()]
    events.append({"ph": "C", "pid": _PID, "name": "KV bytes", "ts": 0.0, "args": {"gpu": 0, "cpu": 0}})
    for row in rows:
        args = {"kind": row.kind} if row.kind == "prefill" else {"kind": row.kind, "phase": row.phase}
        events.append({"ph": "X", "pid": _PID, "tid": tids["steps"], "name": row.label, "ts": row.start_s * 1e6,
                       "dur": row.time_s * 1e6, "args": args})
        events.append({"ph": "C", "pid": _PID, "name": "KV bytes", "ts": (row.start_s + row.time_s) * 1e6,
                       "args": {"gpu": row.gpu_kv_bytes, "cpu": row.cpu_kv_bytes}})
    for span in spans:
        events.append({"ph": "X", "pid": _PID, "tid": tids[span.track], "name": span.name, "ts": span.start_s * 1e6,
                       "dur": max(0.0, span.end_s - span.start_s) * 1e6, "args": span.args})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"workload": workload, "op_detail_steps": sorted(detail_steps)}}


def build_trace(sim: Simulation, op_detail_steps: int = 64) -> dict:
    """The trace of a simulation; prefill is step 0."""
    detailed = detailed_steps(len(sim.steps), op_detail_steps)
    spans = [TraceSpan(op.resource, op.name, record.start_s + op.start, record.start_s + op.end,
                       {"layer": op.layer, "step": record.step})
             for record in sim.steps if record.step in detailed for op in record.timing.events()]
    return trace_json("alisa-sim", simulated_rows(sim), spans, sim.workload.workload.model_dump(mode="json"),
                      detailed)

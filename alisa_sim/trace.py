"""Chrome / Perfetto trace of a simulation: one track per resource, a step track, and KV-bytes counters."""

from __future__ import annotations

import numpy as np

from alisa_sim.engine import SERIAL
from alisa_sim.simulator import Simulation

_TRACKS = {"steps": 0, "gpu": 1, "h2d": 2, "d2h": 3, "cpu": 4, SERIAL: 5}
_TRACK_NAMES = {"steps": "steps", "gpu": "GPU compute", "h2d": "H2D copy", "d2h": "D2H copy", "cpu": "CPU",
                SERIAL: "serial (overlap off)"}
_PID = 1


def detailed_steps(num_steps: int, limit: int) -> set[int]:
    """Steps whose every op goes into the trace: all of them up to `limit`, else `limit` spread evenly
    (the first and last included), so the trace stays loadable."""
    if num_steps <= limit:
        return set(range(num_steps))
    return {int(i) for i in np.linspace(0, num_steps - 1, limit).round()}


def build_trace(sim: Simulation, op_detail_steps: int = 64) -> dict:
    """Trace-event JSON: complete events in microseconds; prefill is step 0."""
    events: list[dict] = [{"ph": "M", "pid": _PID, "name": "process_name", "args": {"name": "alisa-sim"}}]
    events += [{"ph": "M", "pid": _PID, "tid": tid, "name": "thread_name", "args": {"name": _TRACK_NAMES[track]}}
               for track, tid in _TRACKS.items()]
    detailed = detailed_steps(len(sim.steps), op_detail_steps)
    for record in sim.steps:
        t0 = record.start_s * 1e6
        events.append({"ph": "X", "pid": _PID, "tid": _TRACKS["steps"], "name": record.plan.label, "ts": t0,
                       "dur": record.duration_s * 1e6, "args": {"phase": record.phase}})
        events.append({"ph": "C", "pid": _PID, "name": "KV bytes", "ts": t0,
                       "args": {"gpu": record.gpu_kv_bytes, "cpu": record.cpu_kv_bytes}})
        if record.step not in detailed:
            continue
        for op in record.timing.events():
            events.append({"ph": "X", "pid": _PID, "tid": _TRACKS[op.resource], "name": op.name,
                           "ts": t0 + op.start * 1e6, "dur": (op.end - op.start) * 1e6,
                           "args": {"layer": op.layer, "step": record.step}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"workload": sim.workload.workload.model_dump(mode="json"),
                          "op_detail_steps": sorted(detailed)}}

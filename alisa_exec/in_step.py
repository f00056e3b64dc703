"""The executor's named ops timed inside its real steps against their profile rows, per op family, into a hardware
profile's `gpu.in_step` factors: `alisa-exec profile` on a CPU device adds them after the tables and before the host
overheads (alisa_exec.overhead), which then measure only what no op's factor holds.

A row times an op alone, in a loop of itself; in a step the op follows others that took its caches and the GEMM
library's state, and it is followed by the Python that leads to the next op. Each call here is timed from its issue
to the next op's (or to its step's end), so the factor holds both; the time from a step's start to its first op is
left to the host overheads. Only on a CPU device, where every op is done when the next is issued: on a GPU the host
issues ahead of the device and the interval says nothing about the op.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch

from alisa_exec import executor
from alisa_exec.ledger import clocking
from alisa_exec.overhead import (OVERHEAD_GEN, OVERHEAD_MEMORY, OVERHEAD_PROBES, OVERHEAD_PROMPT, OVERHEAD_SHAPES,
                                 plan_probe)
from alisa_exec.profiler import OVERHEAD_SPEC
from alisa_sim.cost_model import CostModel, op_family
from alisa_sim.hardware import HardwareProfile, op_work
from alisa_sim.model_spec import ModelSpec
from alisa_sim.results import simulated_rows

# (batch, prompt) of each --models model's runs, a grid over batch and context apart from the validation loop's
# workloads; every policy of IN_STEP_PROBES at each, for OVERHEAD_GEN tokens (ALISA through its three phases).
IN_STEP_SHAPES = ((1, 40), (6, 120), (24, 72))
# The host-overhead probes' policies, and ALISA's INT8 and k4-capped paths (their ops have rows of their own).
IN_STEP_PROBES: dict[str, dict] = {
    **OVERHEAD_PROBES,
    "alisa-int8": {**OVERHEAD_PROBES["alisa"], "kv_sparsity": 0.8, "int8": True},
    "alisa-k4-capped": {**OVERHEAD_PROBES["alisa"], "kv_sparsity": 0.8, "selector": "k4-capped", "recompute": False},
}
# Copies are priced from the link table, not their named rows, so they keep no factor (their time stays the host's).
UNFACTORED = ("copy_h2d_pinned", "copy_h2d_pageable", "copy_d2h_pinned", "copy_d2h_pageable")
CURVE_POINTS = 6  # a family's distinct works in this many runs: each a point of its factor curve


def in_step_memory(spec: ModelSpec, batch: int, prompt: int) -> dict[str, float]:
    """The runs' memory budget: the host-overhead probe's, plus room for the model's weights twice (dense packs a
    copy of its projections for MKL), the run's KV and a few layers' activations; vLLM sizes its pool from what is
    left."""
    tokens = batch * (prompt + OVERHEAD_GEN)
    extra = 2 * spec.weight_bytes + spec.kv_bytes_per_token() * tokens + 4 * spec.activation_bytes(tokens)
    return {"gpu_gb": OVERHEAD_MEMORY["gpu_gb"] + extra / 1e9}


def timed_calls(profile: HardwareProfile, spec: ModelSpec, policy: dict, batch: int, prompt: int,
                device: torch.device, dtype: torch.dtype) -> list[tuple[str, str, dict[str, int], float]]:
    """One run of the workload by the executor: its timed steps' named ops, each with its step's `host_key` (the
    policy, and ALISA's phase) and the seconds from its issue to the next op's (or its step's end)."""
    plan = plan_probe(profile, spec, policy, batch, prompt, in_step_memory(spec, batch, prompt), device, dtype)
    keys = [plan.sim.host_key(row.phase) for row in simulated_rows(plan.simulation)]
    with clocking() as marks:
        executor.execute(plan, device, dtype, "dummy", 0)
    return [(keys[step], op, shape, seconds) for step, op, shape, seconds in intervals(marks)]


def intervals(marks: list[tuple[str, dict[str, int] | None, float]]) -> list[tuple[int, str, dict[str, int], float]]:
    """The named ops of a clocked run's timed steps (those after its last "start" mark; the warm-up's come before
    it), each with its step's index and the seconds from its issue to the next op's issue or its step's end."""
    start = max(i for i, (what, shape, _) in enumerate(marks) if shape is None and what == "start")
    calls, pending, step = [], None, 0
    for what, shape, at in marks[start + 1:]:
        if pending is not None:
            calls.append((step, pending[0], pending[1], at - pending[2]))
        pending = (what, shape, at) if shape is not None else None
        step += shape is None and what == "end"
    return calls


def factor_rows(cost: CostModel, calls: list[tuple[str, str, dict[str, int], float]]) -> list[dict]:
    """`gpu.in_step` rows: per op family, under each step key (`host_key`: the policy, and ALISA's phase) whose steps
    called it and over all pooled (policy None), the calls' in-step seconds over their rows' (priced by `cost`) as a
    curve over work: the family's distinct works in CURVE_POINTS runs, each run's calls' median work and median
    ratio."""
    by_family: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for policy, op, shape, seconds in calls:
        if op in UNFACTORED:
            continue
        alone, work = cost.op_s(op, **shape), op_work(op, shape)
        if alone > 0 and work > 0 and seconds > 0:
            for key in (policy, None):
                by_family[key or "", op, op_family(op, shape)].append((work, seconds / alone))
    rows = []
    for (policy, op, family), points in sorted(by_family.items()):
        work, ratio = np.array(points).T
        curve = []
        for chunk in np.array_split(np.unique(work), min(CURVE_POINTS, len(np.unique(work)))):
            inside = (work >= chunk[0]) & (work <= chunk[-1])  # whole work values: the chunks' ranges are disjoint
            curve.append((float(np.median(work[inside])), float(np.median(ratio[inside]))))
        rows.append({"op": op, "family": dict(family), "policy": policy or None, "work": [w for w, _ in curve],
                     "factor": [f for _, f in curve], "calls": len(points)})
    return rows


def measure_in_step(profile: dict, device: torch.device, dtype: torch.dtype, models: tuple[ModelSpec, ...] = (),
                    warn: Callable[[str], None] = lambda _: None) -> list[dict]:
    """The in-step factors of every named op the executor's policies run at `models`' layers (at IN_STEP_SHAPES) and
    at the host-overhead probe's (at its own shapes, so that its residual is what no factor holds), priced from
    `profile`'s rows. A run that fails is left out, said through `warn`."""
    bare = {**profile, "gpu": {**profile["gpu"], "in_step": [], "host_overheads": []}}
    hardware = HardwareProfile.model_validate(bare)
    runs = [(spec, batch, prompt) for spec in models for batch, prompt in IN_STEP_SHAPES]
    runs += [(OVERHEAD_SPEC.model_copy(update={"num_layers": layers}), batch, OVERHEAD_PROMPT)
             for layers, batch in OVERHEAD_SHAPES]
    timed = []
    for spec, batch, prompt in runs:
        spec = spec.model_copy(update={"dtype_bytes": dtype.itemsize})
        for name, policy in IN_STEP_PROBES.items():
            try:
                timed += timed_calls(hardware, spec, policy, batch, prompt, device, dtype)
            except Exception as error:  # a policy broken on this device must not cost the whole profile
                warn(f"{name} on {spec.name} (b={batch}, s={prompt}) is not timed in steps: "
                     f"{type(error).__name__}: {error}")
    return factor_rows(CostModel(hardware), timed)


def add_in_step_factors(profile: dict, device: torch.device, models: tuple[ModelSpec, ...] = (),
                        warn: Callable[[str], None] = lambda _: None) -> dict:
    """The profile with `gpu.in_step` measured on `device` (a CPU device) and said in its provenance."""
    dtype = torch.float32
    profile["gpu"]["in_step"] = measure_in_step(profile, device, dtype, models, warn)
    where = ", ".join([*(spec.name for spec in models), OVERHEAD_SPEC.name])
    profile["provenance"]["notes"].append(
        f"in-step factors (gpu.in_step): every named op the executor's policies ran at the layers of {where}, timed "
        "from its issue to the next op's in real steps, over its row's time, per op family as a curve over work")
    return profile

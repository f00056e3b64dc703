"""The executor's own host time beyond its named ops (the step driver's and the layer loop's Python), measured into a
hardware profile: `alisa-exec profile` adds it after the tables (alisa_exec.profiler times the ops themselves)."""

from __future__ import annotations

import statistics

import torch

from alisa_exec import executor
from alisa_exec.profiler import OVERHEAD_LAYERS, OVERHEAD_SPEC
from alisa_sim.hardware import HardwareProfile
from alisa_sim.results import simulated_rows
from alisa_sim.workload import ResolvedWorkload, Workload


def measure_executor_overhead(profile: dict, device: torch.device, dtype: torch.dtype) -> tuple[float, float]:
    """(per step, per layer) host seconds the executor spends beyond its named ops: the median measured decode step
    of `OVERHEAD_SPEC` minus the step the profile's own named-op rows predict for it, at one and at four layers
    (dense, eager: no CUDA graph), never below 0."""
    hardware = HardwareProfile.model_validate(profile)
    residual = {}
    for layers in OVERHEAD_LAYERS:
        spec = OVERHEAD_SPEC.model_copy(update={"num_layers": layers, "dtype_bytes": dtype.itemsize})
        workload = Workload.model_validate({"model": spec.model_dump(), "hardware": hardware.name, "batch_size": 1,
                                            "prompt_len": 8, "gen_len": 40, "policy": {"name": "dense"}})
        plan = executor.plan_run(ResolvedWorkload(workload, spec, hardware), device, dtype)
        plan.policy.cuda_graph = False  # every step eager, as the profile's rows time the ops
        measured = executor.execute(plan, device, dtype, "dummy", 0)
        steps = [row.time_s for row in measured.rows() if row.kind == "decode"]
        predicted = [row.time_s for row in simulated_rows(plan.simulation) if row.kind == "decode"]
        residual[layers] = statistics.median(steps) - statistics.median(predicted)
    first, last = OVERHEAD_LAYERS
    per_layer = max(0.0, (residual[last] - residual[first]) / (last - first))
    return max(0.0, residual[first] - first * per_layer), per_layer


def add_executor_overhead(profile: dict, device: torch.device) -> dict:
    """The profile with `gpu.step_overhead_s` and `gpu.layer_overhead_s` measured on `device`."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    step_s, layer_s = measure_executor_overhead(profile, device, dtype)
    profile["gpu"].update(step_overhead_s=step_s, layer_overhead_s=layer_s)
    return profile

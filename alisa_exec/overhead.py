"""The executor's own host time beyond its named ops (the step driver's, the layer loop's and each policy's hooks'
Python), measured per policy into a hardware profile: `alisa-exec profile` adds it after the tables
(alisa_exec.profiler times the ops themselves)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from scipy.stats import trim_mean

from alisa_exec import executor
from alisa_exec.profiler import OVERHEAD_SPEC
from alisa_sim.hardware import HardwareProfile
from alisa_sim.model_spec import ModelSpec
from alisa_sim.results import simulated_rows
from alisa_sim.workload import ResolvedWorkload, Workload

OVERHEAD_PROMPT, OVERHEAD_GEN = 8, 39
# (layers, batch) of the probes: the per-layer share from the first two, the per-sequence share from the first and
# third. Dense runs no Python per sequence, so its slope over the batch is what the named-op rows miss at the probe's
# shapes, which every policy shares: a policy's per-sequence share is its slope beyond dense's (vLLM's scheduler
# and block tables are the Python per sequence).
OVERHEAD_SHAPES = ((1, 1), (8, 1), (1, 8))
OVERHEAD_MEMORY = {"gpu_gb": 0.25}  # the probe needs next to nothing; vLLM allocates its pool from this
# What each executor policy runs on the probe model, by the simulator's `Policy.host_key` of its steps: one probe
# per set of hooks. ALISA's run is pinned through all three phases (I until step 13, II until 26, III after), so one
# run measures each phase's hooks; FlexGen keeps half its KV heads on the CPU, fetched or attended there.
OVERHEAD_PROBES: dict[str, dict] = {
    "dense": {"name": "dense"},
    "zero": {"name": "zero"},
    "accelerate": {"name": "accelerate"},
    "flexgen": {"name": "flexgen", "percent": [100, 0, 50, 50, 100, 0], "cpu_attention": False,
                "num_gpu_batches": 1},
    "flexgen-cpu-attention": {"name": "flexgen", "percent": [100, 0, 50, 50, 100, 0], "cpu_attention": True,
                              "num_gpu_batches": 1},
    "vllm": {"name": "vllm", "block_size": 16, "swap_space": 0.01},
    "alisa": {"name": "alisa", "kv_sparsity": 0.5, "int8": False, "p1": 13, "p2": 26, "alpha": 0.5, "beta": 0.5},
    "h2o": {"name": "h2o", "kv_sparsity": 0.5},
    "streamingllm": {"name": "streamingllm", "kv_sparsity": 0.5},
}
# Each probe runs this many times; the least residual is kept (other work on the machine only ever adds time).
OVERHEAD_RUNS = 3


def plan_probe(profile: HardwareProfile, spec: ModelSpec, policy: dict, batch: int, prompt: int, memory: dict,
               device: torch.device, dtype: torch.dtype) -> executor.ExecutorPlan:
    """The executor's plan of a probe run (`spec` at `batch` x `prompt`, OVERHEAD_GEN tokens, within `memory`), every
    step eager, as the profile's rows time the ops."""
    if policy["name"] == "flexgen":
        policy = {**policy, "gpu_batch_size": batch}
    workload = Workload.model_validate({"model": spec.model_dump(), "hardware": profile.name, "batch_size": batch,
                                        "prompt_len": prompt, "gen_len": OVERHEAD_GEN, "policy": policy,
                                        "memory": memory})
    plan = executor.plan_run(ResolvedWorkload(workload, spec, profile), device, dtype)
    plan.policy.cuda_graph = False
    return plan


def _probe(profile: HardwareProfile, policy: dict, layers: int, batch: int, device: torch.device,
           dtype: torch.dtype) -> Callable[[], dict[tuple[str, str], float]]:
    """A run of the probe at `layers` layers and `batch` sequences: each call executes it once and returns its
    measured minus predicted seconds by (host key, step kind), the mean over the run's steps of that key and kind (a
    tenth trimmed at each end). A mean, not the median: a phase's steps alternate between ones with and without an
    offload (whose hook runs its own Python), and the median of two such modes jumps between them from run to run."""
    spec = OVERHEAD_SPEC.model_copy(update={"num_layers": layers, "dtype_bytes": dtype.itemsize})
    plan = plan_probe(profile, spec, policy, batch, OVERHEAD_PROMPT, OVERHEAD_MEMORY, device, dtype)
    simulated = simulated_rows(plan.simulation)
    keys = [(plan.sim.host_key(row.phase), row.kind) for row in simulated]
    predicted = [row.time_s for row in simulated]

    def run() -> dict[tuple[str, str], float]:
        differences = defaultdict(list)
        for key, row, time_s in zip(keys, executor.execute(plan, device, dtype, "dummy", 0).rows(), predicted):
            differences[key].append(row.time_s - time_s)
        return {key: float(trim_mean(values, 0.1)) for key, values in differences.items()}
    return run


def _residuals(profile: HardwareProfile, policy: dict, device: torch.device,
               dtype: torch.dtype) -> list[dict[tuple[str, str], float]]:
    """The probe's residuals at each of `OVERHEAD_SHAPES`, the least of `OVERHEAD_RUNS` runs each. The shapes run in
    turn within each round, so that a slow spell of the machine falls on all of them alike rather than on one shape,
    whose difference from the others is what the per-layer and per-sequence shares are."""
    probes = [_probe(profile, policy, layers, batch, device, dtype) for layers, batch in OVERHEAD_SHAPES]
    best: list[dict[tuple[str, str], float]] = [{} for _ in probes]
    for _ in range(OVERHEAD_RUNS):
        for least, probe in zip(best, probes):
            for key, residual in probe().items():
                least[key] = min(least.get(key, float("inf")), residual)
    return best


def measure_executor_overhead(profile: dict, device: torch.device, dtype: torch.dtype,
                              warn: Callable[[str], None] = lambda _: None) -> list[dict]:
    """`gpu.host_overheads` rows: per host key and step kind, the seconds per step, per sequence and per layer the
    executor spends beyond what the profile's named-op rows predict, from its probes at `OVERHEAD_SHAPES` (never
    below 0). A policy whose probe fails is left out, said through `warn` (its steps then pay dense's row)."""
    bare = {**profile, "gpu": {**profile["gpu"], "host_overheads": []}}  # the named ops alone
    hardware = HardwareProfile.model_validate(bare)
    rows, dense_slope = [], {}
    (layers, batch), (more_layers, _), (_, more_batch) = OVERHEAD_SHAPES
    for name, policy in OVERHEAD_PROBES.items():
        try:
            base, deep, wide = _residuals(hardware, policy, device, dtype)
        except Exception as error:  # a policy broken on this device must not cost the whole profile
            warn(f"the {name} policy's host overhead is not measured: {type(error).__name__}: {error}")
            continue
        for (key, kind), residual in sorted(base.items()):
            per_layer = max(0.0, (deep[key, kind] - residual) / (more_layers - layers))
            slope = (wide[key, kind] - residual) / (more_batch - batch)
            if key == "dense":
                dense_slope[kind] = slope
            per_sequence = max(0.0, slope - dense_slope.get(kind, slope))
            rows.append({"policy": key, "kind": kind,
                         "step_s": max(0.0, residual - layers * per_layer - batch * slope),
                         "sequence_s": per_sequence, "layer_s": per_layer})
    return rows


def add_executor_overhead(profile: dict, device: torch.device, warn: Callable[[str], None] = lambda _: None) -> dict:
    """The profile with `gpu.host_overheads` measured on `device`."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    profile["gpu"]["host_overheads"] = measure_executor_overhead(profile, device, dtype, warn)
    return profile

"""Running a policy's plan for real, every policy the same way: plan for the memory the executor really has, check
it before allocating anything, allocate the tiers, generate through the policy's step driver, and build the measured
Result JSON and Chrome trace with the simulator's builders (`alisa_sim.results`, `alisa_sim.trace`).

The plan is the simulator's: the policy object `simulator_policy` makes for the workload, its planner run (a Plan
JSON comes back as its workload, with the planner's choices pinned). Two things can make the executor's bytes differ
from the simulator's count: the run's dtype (float32 on the CPU), so the model spec is taken with the run's dtype
size; and what the executor holds that the simulator counts otherwise (the kernels' selection ring, a packed
attention workspace, a spare window slot, embeddings FlexGen leaves on the GPU). When the real GPU bytes of a plan
exceed the budget (`memory.gpu_gb`, else the profile's GPU), the planner is asked again for a capacity smaller by
the excess (twice that when the plan did not change), at most `MAX_REPLANS` times; the Result records the capacity
the plan was made for. A plan that still does not fit, or that the simulator's own accounting rejects, is a
SpecError (exit 2) before anything is allocated.
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from alisa_exec.device import host_available_bytes
from alisa_exec.kv_cache import CPU, GPU, Tiers
from alisa_exec.model import Transformer
from alisa_exec.policies import EXEC_POLICIES, ExecPolicy, StepLog, StepRecord
from alisa_exec.timeline import Span, Timeline
from alisa_exec.weights import load_model
from alisa_sim.cost_model import CostModel
from alisa_sim.errors import SpecError
from alisa_sim.ops import KINDS
from alisa_sim.planner import make_policy
from alisa_sim.policies import Policy
from alisa_sim.results import assemble_result
from alisa_sim.simulator import Simulation, simulate_with_policy
from alisa_sim.trace import TraceSpan, detailed_steps, trace_json
from alisa_sim.workload import ResolvedWorkload

MAX_REPLANS = 8
DETAILED_STEPS = 64  # steps whose ops are timed one by one (all of them in shorter runs)
WARMUP_STEPS = 2  # decode steps of the plan run once, untimed, before the measured run
COMPUTE_KINDS = ("gemm", "attention", "elementwise", "selection", "recompute")


@dataclass
class ExecutorPlan:
    """The plan the executor runs and what it holds: the workload as planned (its capacity may be below the budget),
    the simulator's policy, the executor's policy, its bytes per tier and the simulation of this very plan."""

    workload: ResolvedWorkload
    sim: Policy
    policy: ExecPolicy
    gpu_bytes: dict[str, int]
    cpu_bytes: dict[str, int]
    simulation: Simulation
    replans: int = 0
    notes: list[str] = field(default_factory=list)


def _with(wl: ResolvedWorkload, dtype: torch.dtype, gpu_capacity: int) -> ResolvedWorkload:
    planned = copy.copy(wl)
    planned.model = wl.model.model_copy(update={"dtype_bytes": dtype.itemsize})
    planned.gpu_capacity_bytes = int(gpu_capacity)
    return planned


def simulator_policy(wl: ResolvedWorkload) -> Policy:
    """The simulator's policy object for the workload, with its planner's plan (the one place the executor has the
    planner run)."""
    return make_policy(wl, CostModel(wl.hardware))


def executable(name: str) -> None:
    if name not in EXEC_POLICIES:
        raise SpecError(f"policy {name!r} is not in the executor: it runs {', '.join(EXEC_POLICIES)}; simulate the "
                        "others with `alisa-sim run`")


def size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3f} {unit}"
    return f"{int(nbytes)} B"


def _parts(nbytes: dict[str, int]) -> str:
    return " + ".join(f"{name} {size(value)}" for name, value in nbytes.items() if value)


def check_simulated(wl: ResolvedWorkload, sim: Policy) -> Simulation:
    """The simulation of this very plan (the prediction to compare with); a SpecError if it runs out of memory."""
    simulation = simulate_with_policy(wl, sim)
    if simulation.oom_error:
        raise SpecError(f"the {sim.name} plan does not fit by the simulator's accounting: {simulation.oom_error}")
    return simulation


def plan_run(wl: ResolvedWorkload, device: torch.device, dtype: torch.dtype) -> ExecutorPlan:
    """The plan to run and its memory, checked against the budget before anything is allocated."""
    name = wl.policy.name
    executable(name)
    budget = wl.gpu_capacity_bytes
    capacity, previous, cut, replans = budget, None, 0, 0
    with torch.device("meta"):
        meta_model = Transformer(wl.model).to(dtype)
    while True:
        planned = _with(wl, dtype, capacity)
        sim = simulator_policy(planned)
        policy = EXEC_POLICIES[name](planned, sim, dtype)
        dry = Tiers(device, dry=True)
        policy.weight_placement(meta_model, dry)
        policy.allocate(dry)
        gpu = {**dry.held[GPU], **policy.transient_gpu_bytes()}
        need = sum(gpu.values())
        if previous is None:
            check_simulated(planned, sim)  # a plan that does not fit by its own accounting fails as such
        if need <= budget or replans == MAX_REPLANS or sim.static_memory().gpu_bytes > capacity:
            break  # it fits, or asking for less has run its course (or left the plan no room for any KV)
        # Ask for less by the excess; when that did not change the plan (its sizes come in whole tokens or
        # blocks), ask for twice as much less.
        cut = 2 * cut if previous is not None and need >= previous else need - budget
        capacity, previous, replans = capacity - cut, need, replans + 1
    capped_by = ("memory.gpu_gb" if wl.workload.memory.gpu_gb is not None
                 else f"hardware profile '{wl.hardware.name}' GPU memory")
    if need > budget:
        raise SpecError(f"the {name} plan for {wl.model.name} at batch {wl.workload.batch_size} does not fit: the "
                        f"executor needs {size(need)} on the GPU ({_parts(gpu)}) but {capped_by} allows "
                        f"{size(budget)}" + (f" (planned {replans} times for less memory)" if replans else ""))
    cpu = dict(dry.held[CPU])
    available = host_available_bytes()
    host_need = sum(cpu.values()) + (need if device.type == "cpu" else 0)
    host_limit = min(wl.cpu_capacity_bytes, available)
    if host_need > host_limit:
        gpu_tier = " + the GPU tier, which is host memory on the CPU device" if device.type == "cpu" else ""
        raise SpecError(f"the {name} plan does not fit in host memory: it needs {size(host_need)} ({_parts(cpu)}"
                        f"{gpu_tier}) but {size(host_limit)} are available (memory.cpu_gb or the profile's, and what "
                        "is free)")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        if need > free:
            raise SpecError(f"the {name} plan needs {size(need)} on the GPU but only {size(free)} are free")
    simulation = check_simulated(planned, sim)
    notes = []
    if replans:
        notes.append(f"planned for {size(capacity)} of GPU memory instead of the budget's {size(budget)}: the "
                     f"executor holds more than the simulator counts ({_parts(gpu)})")
    if wl.model.dtype_bytes != dtype.itemsize:
        notes.append(f"planned with {dtype.itemsize}-byte values (the run's {str(dtype).removeprefix('torch.')}), "
                     f"not the model spec's {wl.model.dtype_bytes}")
    return ExecutorPlan(planned, sim, policy, gpu, cpu, simulation, replans, notes)


@dataclass
class Measured:
    records: list[StepRecord]
    marks_s: list[float]
    spans: list[Span]
    tokens: torch.Tensor
    peak_gpu_bytes: int
    peak_cpu_bytes: int
    moved: dict[str, int]
    setup_s: dict[str, float]

    def rows(self):
        """The steps as the Result lists them (`alisa_sim.results.StepRow`), with their measured times."""
        return [record.row(start, end - start)
                for record, start, end in zip(self.records, self.marks_s, self.marks_s[1:])]


def execute(plan: ExecutorPlan, device: torch.device, dtype: torch.dtype, weights: str, seed: int,
            log: Callable[[str], None] = lambda _: None, on_step: Callable[[StepRecord], None] | None = None,
            warmup_steps: int = WARMUP_STEPS, triton: bool | None = None, compile_decode: bool = False) -> Measured:
    """Load the model, allocate the tiers, warm up on the plan's first steps, then generate the whole workload,
    timing every step. `triton`: run the Triton kernels (default: on CUDA; on the CPU, under the interpreter).
    `compile_decode`: dense's CPU decode steps compiled by TorchInductor (compiled in the warm-up)."""
    wl, policy = plan.workload, plan.policy
    if compile_decode:
        check_compilable(policy.name, device)
        policy.compile_decode = True
        policy.notes = (*policy.notes, "decode steps compiled by TorchInductor (weights frozen), but for the ones "
                        "timed op by op; a hardware profile times the eager ops, so a prediction models the eager step")
    fast = device.type == "cuda" or compile_decode  # the decode steps not timed op by op replay or run compiled
    limit = policy.detail_limit if fast and policy.detail_limit else DETAILED_STEPS
    timeline = Timeline(device, detailed_steps(len(plan.simulation.steps), limit))
    t0 = time.perf_counter()
    log(f"loading {wl.model.name} ({weights}) on {device}")
    model = load_model(wl.model, weights, dtype, policy.load_device(device), seed)
    tiers = Tiers(device, overlap=plan.sim.overlap, timeline=timeline, triton=triton)
    policy.weight_placement(model, tiers)
    model.setup_tables(policy.positions)
    log(f"allocating the {policy.name} plan's pools: {size(sum(plan.gpu_bytes.values()))} on the GPU in all "
        f"({size(tiers.bytes(GPU))} of weights), {size(sum(plan.cpu_bytes.values()))} on the CPU")
    policy.allocate(tiers)
    prompt = torch.randint(0, wl.model.vocab_size, (wl.workload.batch_size, wl.workload.prompt_len),
                           generator=torch.Generator().manual_seed(seed)).to(device)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if warmup_steps:
        # The prefill and the first steps of the plan, untimed: kernels compile and libraries initialise here.
        log(f"warming up: the prefill and {warmup_steps} decode steps")
        quiet = Timeline(device, set())
        policy.start(tiers, quiet)
        logits_log, policy.logits_log = policy.logits_log, None
        with torch.no_grad():
            policy.generate(model, prompt, StepLog(tiers, quiet), warmup_steps)
        policy.logits_log = logits_log
    policy.start(tiers, timeline)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    warmup_s = time.perf_counter() - t0
    log(f"generating {wl.workload.gen_len} tokens for {wl.workload.batch_size} sequences ({policy.name})")
    steps = StepLog(tiers, timeline, on_step)
    moved_before = dict(tiers.moved)
    timeline.start()
    with torch.no_grad():
        tokens = policy.generate(model, prompt, steps)
    marks, spans = timeline.resolve()
    if device.type == "cuda":
        peak_gpu = torch.cuda.max_memory_allocated(device)
    else:  # the "GPU" tier is host memory: what it holds plus the working set as the simulator counts it
        peak_gpu = tiers.bytes(GPU) + sum(policy.transient_gpu_bytes().values())
    moved = {direction: tiers.moved[direction] - moved_before[direction] for direction in tiers.moved}
    return Measured(steps.records, marks, spans, tokens.cpu(), int(peak_gpu), tiers.bytes(CPU), moved,
                    {"load_s": load_s, "warmup_s": warmup_s})


def check_compilable(policy: str, device: torch.device) -> None:
    if policy != "dense" or device.type != "cpu":
        raise SpecError(f"--compile compiles dense's decode step on the CPU, not {policy}'s on {device.type} (on CUDA "
                        "dense replays a CUDA graph; the other policies run eagerly)")
    compiler = os.environ.get("CXX", "g++")  # TorchInductor's C++ compiler on the CPU
    if shutil.which(compiler) is None:
        raise SpecError(f"--compile needs a C++ compiler for TorchInductor and {compiler!r} is not on the PATH "
                        "(install g++ or set CXX), or run without --compile")


# ---- the Result JSON and the trace ---------------------------------------------------------------------------------

def _busy_by_kind(spans: list[Span], num_steps: int) -> list[dict[str, float] | None]:
    """Per step: seconds spent by kind in the step's timed ops (None for a step that was not timed op by op)."""
    busy: list[dict[str, float] | None] = [None] * num_steps
    for span in spans:
        if busy[span.step] is None:
            busy[span.step] = dict.fromkeys(KINDS, 0.0)
        busy[span.step][span.kind] += span.end_s - span.start_s
    return busy


def breakdown(records: list[StepRecord], durations: list[float], spans: list[Span]) -> dict[str, float]:
    """Busy time by kind over the run, from the ops timed one by one: a step that was not timed counts as the nearest
    timed step of its kind, scaled to its own duration; `idle` is the run's time the compute track was not busy."""
    busy = _busy_by_kind(spans, len(records))
    timed = [i for i, b in enumerate(busy) if b is not None]
    total = dict.fromkeys(KINDS, 0.0)
    for i, record in enumerate(records):
        candidates = [j for j in timed if records[j].info.kind == record.info.kind] or timed
        if not candidates:
            continue
        nearest = min(candidates, key=lambda j: abs(j - i))
        scale = durations[i] / durations[nearest] if durations[nearest] > 0 else 0.0
        for kind, seconds in busy[nearest].items():
            total[kind] += seconds * scale
    total["idle"] = max(0.0, sum(durations) - sum(total[kind] for kind in COMPUTE_KINDS))
    return total


def build_result(plan: ExecutorPlan, measured: Measured, device_name: str, dtype: torch.dtype,
                 weights: str) -> dict:
    """The measured Result JSON (`source: exec`), built from the step rows as the simulator's is."""
    rows = measured.rows()
    notes = [
        "times from the device clock (CUDA events on the GPU, the host clock on the CPU device); every policy runs "
        "through the same step driver, eagerly except dense's CUDA-graph decode steps",
        f"breakdown_s: busy time by kind of the ops timed one by one on {len({s.step for s in measured.spans})} "
        "steps (the prefill and steps spread over the run, or all of them); another step counts as the nearest timed "
        "step of its kind scaled to its own duration; idle = total_s - compute busy time; copies overlap compute",
        "h2d_bytes / d2h_bytes: KV, layer-input, weight and activation bytes the policy copied between the tiers, "
        "counted at each copy (on the CPU device, between its two host pools); index lists beside them are the "
        "steps' h2d_index_bytes / d2h_index_bytes; token ids are not counted",
        "peak_gpu_bytes: torch's allocator peak on the GPU; on the CPU device, the GPU tier's pools plus the "
        "working set as the simulator counts it. peak_cpu_bytes: the CPU tier's pools (pinned on CUDA)",
        *plan.notes, *plan.policy.notes,
    ]
    extra = {"plan_gpu_capacity_bytes": plan.workload.gpu_capacity_bytes, "device": device_name,
             "dtype": str(dtype).removeprefix("torch."), "weights": weights}
    result = assemble_result("exec", plan.workload, plan.sim.plan(), rows, measured.peak_gpu_bytes,
                             measured.peak_cpu_bytes, breakdown(measured.records, [r.time_s for r in rows],
                                                                measured.spans), extra)
    result.update({"memory_plan": {"gpu_bytes": plan.gpu_bytes, "cpu_bytes": plan.cpu_bytes},
                   "setup_s": measured.setup_s, "notes": notes})
    return result


def build_trace(result: dict, measured: Measured) -> dict:
    """The Chrome trace (`alisa_sim.trace`): the steps, and the timed ops on the GPU compute, H2D, D2H and CPU
    tracks, the same tracks for every policy."""
    spans = [TraceSpan(span.track, span.name, span.start_s, span.end_s,
                       {"step": span.step, "layer": span.layer, "kind": span.kind}) for span in measured.spans]
    return trace_json(f"alisa-exec {result['plan']['policy']} ({result['device']})", measured.rows(), spans,
                      result["workload"], {s.step for s in measured.spans})

"""The simulation run: drives a policy's prefill and decode steps through the engine, holding memory as it goes.

Decode steps whose op DAG has the same structure and whose op times, bytes and step time all follow one straight
line in the step index are collapsed like layers: on such a run only a few steps are simulated and the others are
interpolated. Why that is exact: a step's time is a max-plus expression of its op times (a maximum over paths of
sums), so with op times affine in the step it is a convex function of the step; a convex function that meets a
line at two points and at one point between them equals the line on the whole interval. The run is grown by
doubling from an anchor step and its successor (which fix the line), each extension checked at its far end, the
step before it and its middle, all with the copy streams idle at the step's start (which the same argument then
proves for every step of the run). Phases are checked at every step; bytes must match exactly. Steps that do not
line up (context-length staircases, the cost model's log-log interpolation between measured sizes, a critical
path that changes) are simulated one by one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import simpy

from alisa_sim.cost_model import CostModel
from alisa_sim.engine import MemoryPool, OutOfMemory, StepSimulator, StepTiming, TimedOp
from alisa_sim.errors import SpecError
from alisa_sim.ops import LayerTemplate
from alisa_sim.policies import Policy, StepPlan, make_policy
from alisa_sim.policies.base import Policy as BasePolicy
from alisa_sim.workload import ResolvedWorkload

# Engine limits, far past any real deployment (the longest generations served are ~10^5 tokens per sequence; the
# deepest models ~10^2 layers); they keep a mistyped workload from running for hours or exhausting memory.
MAX_DECODE_STEPS = 1 << 20
MAX_LAYERS = 4096
_LINE_TOL = 1e-9  # relative deviation from the run's line that counts as on it (float rounding is ~1e-15)


@dataclass
class StepRecord:
    """One timed step of the run, in order (the prefill is normally step 0). A step of a collapsed run has no
    template in its plan (`plan.template` is None); its `timing.events()` simulate it on demand."""

    step: int
    plan: StepPlan
    start_s: float
    timing: StepTiming

    @property
    def duration_s(self) -> float:
        return self.timing.duration_s

    @property
    def phase(self) -> int:
        return self.plan.phase

    @property
    def gpu_kv_bytes(self) -> int:
        return self.plan.kv.gpu_bytes

    @property
    def cpu_kv_bytes(self) -> int:
        return self.plan.kv.cpu_bytes


@dataclass
class Simulation:
    workload: ResolvedWorkload
    policy: Policy
    steps: list[StepRecord] = field(default_factory=list)
    peak_gpu_bytes: int = 0
    peak_cpu_bytes: int = 0
    oom_error: str | None = None
    interpolated_steps: int = 0  # decode steps of collapsed runs (not simulated one by one)

    @property
    def prefill_steps(self) -> list[StepRecord]:
        return [r for r in self.steps if r.plan.kind == "prefill"]

    @property
    def decode_steps(self) -> list[StepRecord]:
        return [r for r in self.steps if r.plan.kind == "decode"]


class InterpolatedTiming:
    """The timing of a step inside a collapsed run: on the line between the run's simulated steps `lo` and `hi`."""

    __slots__ = ("lo", "hi", "weight", "duration_s", "h2d_bytes", "d2h_bytes", "_simulate")
    carry_s: dict[str, float] = {}  # a collapsed run keeps the copy streams idle between steps
    simulated_layers = 0

    def __init__(self, lo: StepTiming, hi: StepTiming, weight: float, simulate_step: Callable[[], StepTiming]):
        self.lo, self.hi, self.weight = lo, hi, weight
        self.duration_s = lo.duration_s + weight * (hi.duration_s - lo.duration_s)
        self.h2d_bytes = lo.h2d_bytes + round(weight * (hi.h2d_bytes - lo.h2d_bytes))
        self.d2h_bytes = lo.d2h_bytes + round(weight * (hi.d2h_bytes - lo.d2h_bytes))
        self._simulate = simulate_step

    def _between(self, lo: dict[str, float], hi: dict[str, float]) -> dict[str, float]:
        return {key: value + self.weight * (hi[key] - value) for key, value in lo.items()}

    @property
    def busy_s(self) -> dict[str, float]:
        return self._between(self.lo.busy_s, self.hi.busy_s)

    @property
    def parts_s(self) -> dict[str, float]:
        return self._between(self.lo.parts_s, self.hi.parts_s)

    @property
    def num_layers(self) -> int:
        return self.lo.num_layers

    @property
    def period_s(self) -> float:
        return self.lo.period_s + self.weight * (self.hi.period_s - self.lo.period_s)

    def events(self) -> Iterator[TimedOp]:
        """The step's ops, simulated now (collapsed runs keep no op schedule)."""
        return self._simulate().events()


def check_engine_limits(wl: ResolvedWorkload) -> None:
    """SpecError for a workload past the engine's limits (see README, Limits)."""
    if wl.decode_steps > MAX_DECODE_STEPS:
        raise SpecError(f"gen_len = {wl.workload.gen_len} is past the simulator's limit of {MAX_DECODE_STEPS + 1} "
                        "generated tokens per sequence")
    if wl.model.num_layers > MAX_LAYERS:
        raise SpecError(f"model {wl.model.name} has {wl.model.num_layers} layers, past the simulator's limit of "
                        f"{MAX_LAYERS}")


def simulate(workload: ResolvedWorkload, on_step: Callable[[StepRecord], None] | None = None) -> Simulation:
    """Simulate the whole run; `on_step(record)` is called after each step (for progress bars)."""
    check_engine_limits(workload)
    return simulate_with_policy(workload, make_policy(workload, CostModel(workload.hardware)), on_step)


def simulate_with_policy(workload: ResolvedWorkload, policy: Policy,
                         on_step: Callable[[StepRecord], None] | None = None) -> Simulation:
    """Simulate the run under an already built policy (a planner's candidate)."""
    check_engine_limits(workload)
    sim = Simulation(workload, policy)
    env = simpy.Environment()
    gpu = MemoryPool(env, "GPU", workload.gpu_capacity_bytes)
    cpu = MemoryPool(env, "CPU", workload.cpu_capacity_bytes)
    stepper = StepSimulator(overlap=policy.overlap, host_is_device=workload.hardware.device_kind == "cpu")
    num_layers = workload.model.num_layers

    def record(plan: StepPlan, timing: StepTiming, start_s: float) -> None:
        when = f"in {plan.label}"
        gpu.hold({"kv": 0.0, **plan.kv.gpu}, when)
        cpu.hold({"kv": 0.0, **plan.kv.cpu}, when)
        sim.steps.append(StepRecord(len(sim.steps), plan, start_s, timing))
        if on_step:
            on_step(sim.steps[-1])

    def run():
        static = policy.static_memory()
        gpu.hold(static.gpu, "before the prefill")
        cpu.hold(static.cpu, "before the prefill")
        if type(policy).steps is not BasePolicy.steps:  # a policy with its own step driver (vLLM's scheduler)
            for plan in policy.steps():
                record(plan, stepper.run_step(plan.template, num_layers), env.now)
                yield env.timeout(sim.steps[-1].duration_s)
            return
        prefill = next(iter(policy.steps()))
        record(prefill, stepper.run_step(prefill.template, num_layers), env.now)
        yield env.timeout(sim.steps[-1].duration_s)
        runs = _DecodeRuns(policy, stepper, num_layers)
        step, last = 1, workload.decode_steps
        while step <= last:
            template, timing = runs.timed(step)
            record(runs.plan(step, template), timing, env.now)
            yield env.timeout(timing.duration_s)
            samples = runs.affine_run(step, last)
            now = env.now
            for lo, hi in zip(samples, samples[1:]):
                (_, lo_timing), (hi_template, hi_timing) = runs.sampled[lo], runs.sampled[hi]
                for inner in range(lo + 1, hi):
                    timing = InterpolatedTiming(lo_timing, hi_timing, (inner - lo) / (hi - lo), runs.simulation_of(inner))
                    record(runs.plan(inner, None), timing, now)
                    now += timing.duration_s
                    sim.interpolated_steps += 1
                record(runs.plan(hi, hi_template), hi_timing, now)
                now += hi_timing.duration_s
            for sample in samples or [step]:
                runs.sampled.pop(sample, None)
            if samples:
                yield env.timeout(now - env.now)
            step = (samples[-1] if samples else step) + 1

    try:
        env.run(env.process(run()))
    except OutOfMemory as exc:
        sim.oom_error = str(exc)
    sim.peak_gpu_bytes, sim.peak_cpu_bytes = gpu.peak_bytes, cpu.peak_bytes
    return sim


class _DecodeRuns:
    """The decode steps of a policy on the base step driver: each step's template and timing, and the search for
    runs of steps that lie on one line (see the module docstring)."""

    def __init__(self, policy: Policy, stepper: StepSimulator, num_layers: int):
        self.policy, self.stepper, self.num_layers = policy, stepper, num_layers
        # Steps timed with the copy streams idle at their start: the samples of a run, and the anchor.
        self.sampled: dict[int, tuple[LayerTemplate, StepTiming]] = {}
        self._phases: dict[int, int] = {}

    def plan(self, step: int, template: LayerTemplate | None) -> StepPlan:
        """Decode step `step` as Policy.steps() yields it (tests/test_simulator.py checks the two agree)."""
        policy = self.policy
        return StepPlan(template, self.phase(step), policy.kv_memory(policy.context(step)), "decode",
                        f"decode {step}", policy.batch, policy.batch)

    def phase(self, step: int) -> int:
        if step not in self._phases:
            self._phases[step] = self.policy.phase(step)
        return self._phases[step]

    def timed(self, step: int) -> tuple[LayerTemplate, StepTiming]:
        """The step's template and timing after the previous step (whose copy backlog it inherits); kept in
        `sampled` when it started with idle copy streams."""
        if self.stepper.carry_s:
            template = self.policy.decode_template(step)
            return template, self.stepper.run_step(template, self.num_layers)
        template, timing = self._idle(step)
        self.stepper.carry_s = timing.carry_s
        return template, timing

    def _idle(self, step: int) -> tuple[LayerTemplate, StepTiming]:
        if step not in self.sampled:
            template = self.policy.decode_template(step)
            self.sampled[step] = template, self.stepper.time_step(template, self.num_layers, {})
        return self.sampled[step]

    def simulation_of(self, step: int) -> Callable[[], StepTiming]:
        """Simulate an interpolated step again, for its op schedule (copy streams idle at its start, as proven)."""
        return lambda: self.stepper.time_step(self.policy.decode_template(step), self.num_layers, {})

    @staticmethod
    def _point(template: LayerTemplate, timing: StepTiming) -> tuple[list[float], list[int]]:
        """What must lie on the run's line: every op's device and host time, the step time, and (exactly) bytes."""
        ops = template.head + template.ops + template.tail
        return ([op.duration_s for op in ops] + [op.host_s for op in ops] + [timing.duration_s],
                [op.nbytes for op in ops])

    def affine_run(self, anchor: int, last: int) -> list[int]:
        """Steps anchor, anchor + 1, ..., end that prove anchor..end lie on one line, end as far as doubling reaches;
        empty unless the run reaches past anchor + 1. Each is in `sampled`, timed with idle copy streams."""
        if last < anchor + 2 or anchor not in self.sampled:
            return []
        template, timing = self.sampled[anchor]
        structure, phase = template.structure(), self.phase(anchor)
        if timing.carry_s or self.phase(anchor + 1) != phase:
            return []
        next_template, next_timing = self._idle(anchor + 1)
        if next_timing.carry_s or next_template.structure() != structure:
            return []
        line = (anchor, self._point(template, timing), self._point(next_template, next_timing))
        samples, end, span = [anchor, anchor + 1], anchor + 1, 4
        while end < last:
            new_end = min(anchor + span, last)
            if any(self.phase(x) != phase for x in range(end + 1, new_end + 1)):
                break
            points = sorted({(end + new_end) // 2, new_end - 1, new_end} - {end})
            if not all(self._on_line(x, structure, line) for x in points):
                break
            samples += points
            end, span = new_end, 2 * span
        return samples if end > anchor + 1 else []

    def _on_line(self, x: int, structure: tuple, line: tuple) -> bool:
        template, timing = self._idle(x)
        if timing.carry_s or template.structure() != structure:
            return False
        x0, (f0, i0), (f1, i1) = line
        floats, ints = self._point(template, timing)
        k = x - x0
        if any(b + k * (c - b) != v for v, b, c in zip(ints, i0, i1)):
            return False
        return all(abs(b + k * (c - b) - v) <= _LINE_TOL * max(abs(v), abs(b), abs(c))
                   for v, b, c in zip(floats, f0, f1))

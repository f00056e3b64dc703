"""The simulation run: drives a policy's prefill and decode steps through the engine, holding memory as it goes.

Decode steps are collapsed like layers where that is exact or within 1e-7 of the step time. The decode steps of a
policy on the base step driver (Policy.steps) are grown into runs: from an anchor step, extensions of a few to
thousands of steps are simulated at their first two, middle and last two steps, with the copy streams idle at the
start, and accepted when every sample has the same op structure as the anchor and every step the same variant
(`Policy.decode_variant`: its phase, and whatever else changes which ops a step runs), bytes on the chord of the
extension exactly, and its time, breakdown and op times on the chord within 1e-7 of the step time; the steps between samples are interpolated on those chords. Why that is sound:
- with op times affine in the step (the cost model above its measured sizes), a step's time, a max-plus expression
  of its op times, is convex in the step, and a convex function that meets a chord at an interior point equals it on
  the whole interval: exact, and the idle copy streams follow for every step of the run;
- inside the cost model's measured cells op times are power laws of the context, bending one way, whose distance
  from a chord is at most twice what the middle sample shows, so the interpolation stays within ~2e-7;
- what does not line up (a context-length staircase such as SWA's window, a critical path that changes, a phase
  switch, an eviction budget's steps with and without an eviction) fails the checks and is simulated step by step.
Memory is held, and the KV of every step taken from the policy, step by step in either case.
"""

from __future__ import annotations

import gc
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import simpy
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from alisa_sim.engine import MemoryPool, OutOfMemory, StepSimulator, StepTiming, TimedOp
from alisa_sim.ops import LayerTemplate
from alisa_sim.planner import make_policy
from alisa_sim.policies import Policy, StepPlan
from alisa_sim.policies.base import Policy as BasePolicy
from alisa_sim.workload import ResolvedWorkload

# Deviation from a chord, relative to the step time, that counts as on it: far above float rounding (~1e-15), far
# below what a context-length staircase or a changing critical path shows, and within the 1e-6 that tests demand.
_LINE_TOL = 1e-7
_MIN_SPAN = 4


@dataclass(slots=True)
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
    peak_gpu_usage: dict[str, float] = field(default_factory=dict)  # bytes by purpose at each device's peak
    peak_cpu_usage: dict[str, float] = field(default_factory=dict)
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


class SimulationProgress:
    """An `on_step` callback that reports a long simulation: nothing for its first `after_s` seconds, then on a
    terminal a bar with the tokens done and the time left, elsewhere (logs, CI) a line every `every_s` seconds."""

    def __init__(self, workload: ResolvedWorkload, console: Console | None = None, after_s: float = 1.0,
                 every_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.console = console or Console(stderr=True)
        self.total = workload.workload.batch_size * workload.workload.gen_len
        self.after_s, self.every_s, self.clock = after_s, every_s, clock
        self.start, self.last_line = clock(), -math.inf
        self.done = 0
        self._bar: Progress | None = None

    def __enter__(self) -> SimulationProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.stop()

    def __call__(self, record: StepRecord) -> None:
        self.done += record.plan.sequences  # tokens sampled (a vLLM recompute prefill samples one per sequence too)
        now = self.clock()
        if now - self.start < self.after_s:
            return
        if not self.console.is_terminal:
            if now - self.last_line >= self.every_s or self.done >= self.total:
                self.last_line = now
                share = min(1.0, self.done / self.total)
                left = (now - self.start) * (1 - share) / share if share else float("nan")
                self.console.print(f"simulating: {share:.0%} ({self.done}/{self.total} tokens), "
                                   f"{now - self.start:.0f} s elapsed, about {left:.0f} s left", highlight=False)
            return
        if self._bar is None:
            self._bar = Progress(TextColumn("simulating"), BarColumn(),
                                 TextColumn("{task.completed}/{task.total} tokens"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=self.console, transient=True)
            self._task = self._bar.add_task("tokens", total=self.total)
            self._bar.start()
        self._bar.update(self._task, completed=self.done)


def simulate(workload: ResolvedWorkload, on_step: Callable[[StepRecord], None] | None = None) -> Simulation:
    """Simulate the whole run; `on_step(record)` is called after each step (for progress bars)."""
    return simulate_with_policy(workload, make_policy(workload), on_step)


def simulate_with_policy(workload: ResolvedWorkload, policy: Policy,
                         on_step: Callable[[StepRecord], None] | None = None) -> Simulation:
    """Simulate the run under an already built policy (a planner's candidate)."""
    sim = Simulation(workload, policy)
    env = simpy.Environment()
    gpu = MemoryPool("GPU", workload.gpu_capacity_bytes, policy.held_within)
    cpu = MemoryPool("CPU", workload.cpu_capacity_bytes, policy.held_within)
    stepper = policy.stepper()
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
        gpu.reserve(static.gpu, "before the prefill")
        cpu.reserve(static.cpu, "before the prefill")
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
                    weight = (inner - lo) / (hi - lo)
                    timing = InterpolatedTiming(lo_timing, hi_timing, weight, runs.simulation_of(inner))
                    record(runs.plan(inner, None), timing, now)
                    now += timing.duration_s
                    sim.interpolated_steps += 1
                record(runs.plan(hi, hi_template), hi_timing, now)
                now += hi_timing.duration_s
            if samples:
                yield env.timeout(now - env.now)
            step = (samples[-1] if samples else step) + 1
            runs.forget_before(step)

    try:
        with _no_cycle_collection():
            env.run(env.process(run()))
    except OutOfMemory as exc:
        sim.oom_error = str(exc)
    sim.peak_gpu_bytes, sim.peak_cpu_bytes = gpu.peak_bytes, cpu.peak_bytes
    sim.peak_gpu_usage, sim.peak_cpu_usage = gpu.peak_usage, cpu.peak_usage
    return sim


@contextmanager
def _no_cycle_collection():
    """Python's cycle collector paused: a run allocates objects by the hundred thousand and keeps nearly all of them
    (its step records, plans, timings) or frees them by reference count, so the collector's passes over the growing
    heap find nothing and would cost a quarter of a short run. After it, the run's objects join the oldest generation
    directly (freeze, then unfreeze): re-enabled as they were, the next young collection would walk them all (a
    tenth of a short run), and what cycles they hold are collected with the oldest generation."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.unfreeze()
        if enabled:
            gc.enable()


class _DecodeRuns:
    """The decode steps of a policy on the base step driver: each step's template and timing, and the search for
    runs of steps that lie on one line (see the module docstring)."""

    def __init__(self, policy: Policy, stepper: StepSimulator, num_layers: int):
        self.policy, self.stepper, self.num_layers = policy, stepper, num_layers
        # Steps timed with the copy streams idle at their start: the samples of a run, and the anchor.
        self.sampled: dict[int, tuple[LayerTemplate, StepTiming]] = {}
        self._variants: dict[int, object] = {}
        self._templates: dict[int, LayerTemplate] = {}  # steps the search looked at, timed or not
        self._shapes: dict[int, tuple] = {}  # _shape of those steps
        self._idle_step = 0  # the last step `timed` timed with idle copy streams
        self.span = _MIN_SPAN

    def plan(self, step: int, template: LayerTemplate | None) -> StepPlan:
        """Decode step `step` as Policy.steps() yields it (tests/test_simulator.py checks the two agree)."""
        policy = self.policy
        return StepPlan(template, policy.phase(step), policy.kv_memory(policy.context(step)), "decode",
                        f"decode {step}", policy.batch, policy.batch, policy.token_rows(step))

    def variant(self, step: int) -> object:
        if step not in self._variants:
            self._variants[step] = self.policy.decode_variant(step)
        return self._variants[step]

    def timed(self, step: int) -> tuple[LayerTemplate, StepTiming]:
        """The step's template and timing after the previous step (whose copy backlog it inherits); kept in
        `sampled` when it started with idle copy streams."""
        if self.stepper.carry_s:
            template = self.policy.decode_template(step)
            return template, self.stepper.run_step(template, self.num_layers)
        template, timing = self._idle(step)
        self.stepper.carry_s = timing.carry_s
        self._idle_step = step
        return template, timing

    def _template(self, step: int) -> LayerTemplate:
        if step not in self._templates:
            self._templates[step] = self.policy.decode_template(step)
        return self._templates[step]

    def _idle(self, step: int) -> tuple[LayerTemplate, StepTiming]:
        if step not in self.sampled:
            template = self._template(step)
            totals = self._shapes[step][4] if step in self._shapes else None
            self.sampled[step] = template, self.stepper.time_step(template, self.num_layers, {}, totals)
        return self.sampled[step]

    def forget_before(self, step: int) -> None:
        """Drop what is kept of steps already recorded (or interpolated past)."""
        for kept in (self.sampled, self._templates, self._shapes):
            for done in [x for x in kept if x < step]:
                del kept[done]

    def simulation_of(self, step: int) -> Callable[[], StepTiming]:
        """Simulate an interpolated step again, for its op schedule (copy streams idle at its start, as proven)."""
        return lambda: self.stepper.time_step(self.policy.decode_template(step), self.num_layers, {})

    def _shape(self, step: int) -> tuple:
        """What must lie on the run's chords but the step time, known from the template alone: the step's structure,
        its breakdown by kind and by resource (StepSimulator.totals, as its timing reports them), every op's device
        and host time, and (exactly) bytes; and an upper bound on the step time (every op's host and device time
        in a row, with a margin: each op of the chain that ends the step waits only on ops issued before it or on
        the host, so the chain's ops and issue time add up to at most that); and the totals, for timing the step."""
        if step not in self._shapes:
            template = self._template(step)
            totals = busy, parts, _, _ = self.stepper.totals(template, self.num_layers)
            ops = template.head + template.ops + template.tail
            serial_s = (sum(op.duration_s + op.host_s for op in template.head + template.tail)
                        + self.num_layers * sum(op.duration_s + op.host_s for op in template.ops))
            self._shapes[step] = (template.structure(),
                                  [*parts.values(), *busy.values()] + [op.duration_s for op in ops]
                                  + [op.host_s for op in ops], [op.nbytes for op in ops], 1.001 * serial_s, totals)
        return self._shapes[step]

    def affine_run(self, anchor: int, last: int) -> list[int]:
        """Steps anchor < ... < end, each simulated with idle copy streams and kept in `sampled`, between which every
        step lies on the chord of its two neighbours in the list (empty if the run does not reach past anchor + 1,
        or if the anchor did not start with idle copy streams or leaves a backlog).
        The run grows from the anchor by extensions of `span` steps, each checked at its first and last two steps
        and its middle; a failed extension is retried at half the span, down to 4 steps."""
        if last < anchor + 2 or self._idle_step != anchor or self.sampled[anchor][1].carry_s:
            return []
        structure, variant = self.sampled[anchor][0].structure(), self.variant(anchor)
        same_variant_until = anchor
        samples, end, span = [anchor], anchor, self.span
        while end < last:
            new_end = min(end + span, last)
            while same_variant_until < new_end and self.variant(same_variant_until + 1) == variant:
                same_variant_until += 1
            points = sorted({end + 1, (end + new_end) // 2, new_end - 1, new_end} - {end})
            if same_variant_until >= new_end and all(self._on_chord(x, structure, end, new_end) for x in points):
                samples += points
                end, span = new_end, 2 * span
            elif span > _MIN_SPAN and new_end - end > _MIN_SPAN:
                span //= 2
            else:
                break
        self.span = max(_MIN_SPAN, span // 2)  # where the next run starts looking
        return samples if end > anchor + 1 else []

    def _on_chord(self, x: int, structure: tuple, lo: int, hi: int) -> bool:
        """Whether step x (timed with idle copy streams) has the structure and lies on the chord from lo to hi, as
        do lo and hi. What the templates show is checked first: a step is timed only if they pass, with the
        tolerance the bounds on the step times allow (the true tolerance is no wider)."""
        shapes = [self._shape(step) for step in (lo, x, hi)]
        if any(shape[0] != structure for shape in shapes):
            return False
        (_, f0, i0, *_), (_, f, i, *_), (_, f1, i1, *_) = shapes
        if any((b + (x - lo) * (c - b) // (hi - lo) != v) or ((x - lo) * (c - b)) % (hi - lo)
               for v, b, c in zip(i, i0, i1)):
            return False
        w = (x - lo) / (hi - lo)

        def on_line(scale: float) -> bool:
            return all(abs(b + w * (c - b) - v) <= scale for v, b, c in zip(f, f0, f1))

        bounds = [self.sampled[step][1].duration_s if step in self.sampled else self._shapes[step][3]
                  for step in (lo, x, hi)]
        if not on_line(_LINE_TOL * max(bounds)):
            return False
        timings = [self._idle(step)[1] for step in (lo, x, hi)]
        if any(timing.carry_s for timing in timings):
            return False
        d0, d, d1 = (timing.duration_s for timing in timings)
        scale = _LINE_TOL * max(d, d0, d1)  # relative to the step time
        return abs(d0 + w * (d1 - d0) - d) <= scale and on_line(scale)

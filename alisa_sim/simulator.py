"""The simulation run: drives a policy's prefill and decode steps through the engine, holding memory as it goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import simpy

from alisa_sim.cost_model import CostModel
from alisa_sim.engine import MemoryPool, OutOfMemory, StepSimulator, StepTiming
from alisa_sim.policies import Policy, StepPlan, make_policy
from alisa_sim.workload import ResolvedWorkload


@dataclass
class StepRecord:
    """One timed step of the run, in order (the prefill is normally step 0)."""

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

    @property
    def prefill_steps(self) -> list[StepRecord]:
        return [r for r in self.steps if r.plan.kind == "prefill"]

    @property
    def decode_steps(self) -> list[StepRecord]:
        return [r for r in self.steps if r.plan.kind == "decode"]


def simulate(workload: ResolvedWorkload, on_step: Callable[[StepRecord], None] | None = None) -> Simulation:
    """Simulate the whole run; `on_step(record)` is called after each step (for progress bars)."""
    return simulate_with_policy(workload, make_policy(workload, CostModel(workload.hardware)), on_step)


def simulate_with_policy(workload: ResolvedWorkload, policy: Policy,
                         on_step: Callable[[StepRecord], None] | None = None) -> Simulation:
    """Simulate the run under an already built policy (a planner's candidate)."""
    sim = Simulation(workload, policy)
    env = simpy.Environment()
    gpu = MemoryPool(env, "GPU", workload.gpu_capacity_bytes)
    cpu = MemoryPool(env, "CPU", workload.cpu_capacity_bytes)
    stepper = StepSimulator(overlap=policy.overlap)
    num_layers = workload.model.num_layers

    def run():
        static = policy.static_memory()
        gpu.hold(static.gpu, "before the prefill")
        cpu.hold(static.cpu, "before the prefill")
        for index, plan in enumerate(policy.steps()):
            when = f"in {plan.label}"
            gpu.hold({"kv": 0.0, **plan.kv.gpu}, when)
            cpu.hold({"kv": 0.0, **plan.kv.cpu}, when)
            timing = stepper.run_step(plan.template, num_layers)
            sim.steps.append(StepRecord(index, plan, env.now, timing))
            yield env.timeout(timing.duration_s)
            if on_step:
                on_step(sim.steps[-1])

    try:
        env.run(env.process(run()))
    except OutOfMemory as exc:
        sim.oom_error = str(exc)
    sim.peak_gpu_bytes, sim.peak_cpu_bytes = gpu.peak_bytes, cpu.peak_bytes
    return sim

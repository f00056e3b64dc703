"""The simulation run: drives a policy's prefill and decode steps through the engine, holding memory as it goes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import simpy

from alisa_sim.cost_model import CostModel
from alisa_sim.engine import MemoryPool, OutOfMemory, StepSimulator, StepTiming
from alisa_sim.policies import Policy, make_policy
from alisa_sim.workload import ResolvedWorkload


@dataclass
class StepRecord:
    """One timed step: 0 is the prefill, 1.. the decode steps."""

    step: int
    phase: int
    start_s: float
    timing: StepTiming
    gpu_kv_bytes: int
    cpu_kv_bytes: int

    @property
    def duration_s(self) -> float:
        return self.timing.duration_s


@dataclass
class Simulation:
    workload: ResolvedWorkload
    policy: Policy
    steps: list[StepRecord] = field(default_factory=list)
    peak_gpu_bytes: int = 0
    peak_cpu_bytes: int = 0
    oom_error: str | None = None

    @property
    def prefill(self) -> StepRecord | None:
        return self.steps[0] if self.steps else None

    @property
    def decode_steps(self) -> list[StepRecord]:
        return self.steps[1:]


def simulate(workload: ResolvedWorkload, on_step: Callable[[int], None] | None = None) -> Simulation:
    """Simulate the whole run; `on_step(step)` is called after each step (for progress bars)."""
    policy = make_policy(workload, CostModel(workload.hardware))
    sim = Simulation(workload, policy)
    env = simpy.Environment()
    gpu = MemoryPool(env, "GPU", workload.gpu_capacity_bytes)
    cpu = MemoryPool(env, "CPU", workload.cpu_capacity_bytes)
    stepper = StepSimulator(overlap=workload.workload.overlap)
    num_layers = workload.model.num_layers

    def run():
        static = policy.static_memory()
        gpu.hold(static.gpu, "before the prefill")
        cpu.hold(static.cpu, "before the prefill")
        for step in range(workload.decode_steps + 1):
            context = policy.context(step)
            kv = policy.kv_memory(context)
            when = "in the prefill" if step == 0 else f"at decode step {step} ({context} tokens per sequence)"
            gpu.hold({"kv": 0.0, **kv.gpu}, when)
            cpu.hold({"kv": 0.0, **kv.cpu}, when)
            plan = policy.prefill() if step == 0 else policy.decode(step)
            timing = stepper.run_step(plan.template, num_layers)
            sim.steps.append(StepRecord(step, plan.phase, env.now, timing, kv.gpu_bytes, kv.cpu_bytes))
            yield env.timeout(timing.duration_s)
            if on_step:
                on_step(step)

    try:
        env.run(env.process(run()))
    except OutOfMemory as exc:
        sim.oom_error = str(exc)
    sim.peak_gpu_bytes, sim.peak_cpu_bytes = gpu.peak_bytes, cpu.peak_bytes
    return sim

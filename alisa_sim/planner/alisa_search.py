"""ALISA's offline schedule search: p1, p2, alpha and beta for a workload, by a greedy search over the cost model.

What it does, precisely:
1. p1 is set by memory: the first decode step whose KV no longer fits the GPU's KV budget (what is left after
   weights, activations, staging and selection state). A workload's own p1 may only bring it earlier.
2. alpha, the least share of KV kept on the CPU, is 0 unless the workload sets it: the dynamic split then keeps
   as many recent tokens on the GPU as fit, which moves the fewest bytes.
3. For Phase III, decode steps from p1 on are sampled (at most 12, evenly) and each is timed by the engine (the
   policy's own step DAG on the SimPy streams) for beta in 0, 0.1, ..., 1 with recompute active. beta is the value
   that minimises the summed time when every sampled step may pick the better of no recompute and that beta
   (the paper's greedy choice); p2 is the first sampled step where that beta beats no recompute by more than 1%.
   If none does, Phase III never starts. A workload's own p2 or beta is kept as given.
The rejected alternatives (no Phase III, beta +- 0.2, p2 a sample earlier or later, offloading the final CPU share
from step 1) are
estimated the same way, for `alisa-sim plan` to print.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from alisa_sim.engine import StepSimulator

BETAS = tuple(round(float(b), 1) for b in np.linspace(0, 1, 11))
MAX_SAMPLES = 12
MIN_GAIN = 0.01


@dataclass(frozen=True)
class AlisaSchedule:
    """The planner's choice: phase switch steps, the least CPU share of KV and the deleted share of CPU KV."""

    p1: int  # first decode step of Phase II
    p2: int  # first decode step of Phase III (past the last step: never)
    alpha: float
    beta: float


@dataclass(frozen=True)
class SearchResult:
    schedule: AlisaSchedule
    alternatives: list[tuple[str, AlisaSchedule, float]]  # (what, schedule, estimated decode time in s)
    estimated_decode_s: float


def _sampled_steps(first: int, last: int) -> tuple[list[int], float]:
    count = last - first + 1
    if count <= 0:  # no decode step (gen_len 1: the prefill makes the only token)
        return [], 0.0
    samples = sorted({int(x) for x in np.linspace(first, last, min(count, MAX_SAMPLES)).round()})
    return samples, count / len(samples)


def _step_time(policy, step: int, schedule) -> float:
    return StepSimulator(overlap=policy.overlap).run_step(policy.decode_template(step, schedule),
                                                          policy.model.num_layers).duration_s


def estimate_decode_s(policy, schedule, steps: list[int] | None = None) -> float:
    """Decode time under `schedule`, from the engine's time of evenly sampled steps."""
    last = policy.wl.decode_steps
    steps, weight = (steps, (last / len(steps))) if steps else _sampled_steps(1, last)
    return weight * sum(_step_time(policy, step, schedule) for step in steps)


def search_schedule(policy) -> SearchResult:
    cfg, last = policy.cfg, policy.wl.decode_steps
    natural = policy.natural_p1()
    p1 = min(cfg.p1, natural) if cfg.p1 is not None else natural
    alpha = cfg.alpha if cfg.alpha is not None else 0.0
    never = last + 1
    base = AlisaSchedule(p1, cfg.p2 if cfg.p2 is not None else never, alpha, cfg.beta if cfg.beta is not None else 0.0)
    if not (cfg.recompute and cfg.dynamic_scheduling) or p1 > last:
        return SearchResult(base, [], estimate_decode_s(policy, base))

    samples, _ = _sampled_steps(max(1, p1), last)
    without = {j: _step_time(policy, j, replace(base, p2=never)) for j in samples}
    betas = (cfg.beta,) if cfg.beta is not None else BETAS[1:]
    with_beta = {b: {j: _step_time(policy, j, replace(base, p2=0, beta=b)) for j in samples} for b in betas}
    beta = min(betas, key=lambda b: sum(min(without[j], with_beta[b][j]) for j in samples))
    if cfg.p2 is not None:
        p2 = cfg.p2
    else:
        p2 = next((j for j in samples if with_beta[beta][j] < without[j] * (1 - MIN_GAIN)), never)
    chosen = replace(base, p2=p2, beta=beta if p2 <= last else 0.0)

    alternatives = [("no Phase III (no recompute)", replace(base, p2=never, beta=0.0))]
    for other in (beta - 0.2, beta + 0.2):
        if 0 < other <= 1 and p2 <= last:
            alternatives.append((f"beta = {other:.1f}", replace(chosen, beta=round(other, 1))))
    if p2 <= last:
        index = samples.index(p2) if p2 in samples else 0
        for neighbour in (index - 1, index + 1):
            if 0 <= neighbour < len(samples):
                alternatives.append((f"p2 = {samples[neighbour]}", replace(chosen, p2=samples[neighbour])))
    final_share = 1 - policy.gpu_tokens / policy.wl.max_context()
    if p1 > 1 and final_share > 0:
        alternatives.append((f"offload {final_share:.0%} from step 1", replace(chosen, p1=1, alpha=round(final_share, 3))))
    estimates = [(what, schedule, estimate_decode_s(policy, schedule)) for what, schedule in alternatives]
    return SearchResult(chosen, estimates, estimate_decode_s(policy, chosen))


def plan_schedule(policy) -> AlisaSchedule:
    """The schedule the search chooses."""
    return search_schedule(policy).schedule

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
The search simulates only what it cannot bound: each (beta, step) is first priced by a lower bound on the engine's
time from the step's DAG (planner/pricing.py). A sampled step whose bound is no faster than no recompute counts as no
recompute without being simulated, and the betas are simulated best bound first until the next bound cannot beat
the best summed time found; so the choice is the one that timing every candidate would make, exactly.
The rejected alternatives (no Phase III, beta +- 0.2, p2 a sample earlier or later, offloading the final CPU share
from step 1) are estimated from sampled steps too, for `alisa-sim plan` to print.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from alisa_sim.planner.pricing import at_least, beyond, sampled_steps, step_lower_bound_s, step_time_s
from alisa_sim.policies.alisa import AlisaPolicy, AlisaSchedule

BETAS = tuple(round(float(b), 1) for b in np.linspace(0, 1, 11))
MAX_SAMPLES = 12
MIN_GAIN = 0.01


class _Candidate:
    """One schedule at the sampled steps: each step's lower bound from its DAG, its engine time when asked."""

    def __init__(self, policy: AlisaPolicy, schedule: AlisaSchedule, samples: list[int]):
        self.samples = samples
        self._policy, self._layers, self._overlap = policy, policy.model.num_layers, policy.overlap
        self._templates = {step: policy.decode_template(step, schedule) for step in samples}
        self.bounds = {step: step_lower_bound_s(template, self._layers, self._overlap)
                       for step, template in self._templates.items()}
        self.times: dict[int, float] = {}  # engine times taken so far

    def time(self, step: int) -> float:
        if step not in self.times:
            self.times[step] = step_time_s(self._policy, self._templates[step])
        return self.times[step]

    def faster_than(self, step: int, seconds: float) -> bool:
        return not at_least(self.bounds[step], seconds) and self.time(step) < seconds

    def best_of_s(self, baseline: dict[int, float]) -> float:
        """Summed time when each sampled step takes the better of this schedule and the baseline."""
        return sum(self.time(j) if self.faster_than(j, baseline[j]) else baseline[j] for j in self.samples)

    def best_of_bound_s(self, baseline: dict[int, float]) -> float:
        return sum(min(baseline[j], self.bounds[j]) for j in self.samples)


@dataclass(frozen=True)
class SearchResult:
    schedule: AlisaSchedule
    samples: list[int]  # the decode steps the Phase III search timed (empty when it did not run)
    betas_timed: list[float]  # betas timed by the engine at one sampled step or more
    betas_ruled_out: list[float]  # betas whose bound alone ruled them out
    pairs_timed: int  # (beta, sampled step) pairs timed by the engine, of len(betas) x len(samples)


def estimate_decode_s(policy: AlisaPolicy, schedule: AlisaSchedule) -> float:
    """Decode time under `schedule`, from the engine's time of evenly sampled steps."""
    steps, weight = sampled_steps(1, policy.wl.decode_steps, MAX_SAMPLES)
    return weight * sum(step_time_s(policy, policy.decode_template(step, schedule)) for step in steps)


def search_schedule(policy: AlisaPolicy) -> SearchResult:
    """The schedule for `policy` (built without one), and what the search timed to find it."""
    cfg, last = policy.cfg, policy.wl.decode_steps
    natural = policy.natural_p1()
    p1 = min(cfg.p1, natural) if cfg.p1 is not None else natural
    alpha = cfg.alpha if cfg.alpha is not None else 0.0
    never = last + 1
    base = AlisaSchedule(p1, cfg.p2 if cfg.p2 is not None else never, alpha, cfg.beta if cfg.beta is not None else 0.0)
    if not (cfg.recompute and cfg.dynamic_scheduling) or p1 > last:
        return SearchResult(base, [], [], [], 0)
    if cfg.p2 is not None and cfg.beta is not None:
        return SearchResult(replace(base, beta=cfg.beta if cfg.p2 <= last else 0.0), [], [], [], 0)

    samples, _ = sampled_steps(max(1, p1), last, MAX_SAMPLES)
    without_s = {j: step_time_s(policy, policy.decode_template(j, replace(base, p2=never))) for j in samples}
    betas = (cfg.beta,) if cfg.beta is not None else BETAS[1:]
    candidates = {b: _Candidate(policy, replace(base, p2=0, beta=b), samples) for b in betas}
    # Branch and bound: betas in order of their bound; the first beta (in BETAS order) of least summed time wins.
    beta, best_s = None, math.inf
    bounds = {b: candidates[b].best_of_bound_s(without_s) for b in betas}
    for b in sorted(betas, key=bounds.get):
        if beyond(bounds[b], best_s):  # so are the bounds of the betas left
            break
        total = candidates[b].best_of_s(without_s)
        if total < best_s or (total == best_s and b < beta):
            beta, best_s = b, total
    chosen = candidates[beta]
    if cfg.p2 is not None:
        p2 = cfg.p2
    else:
        p2 = next((j for j in samples if chosen.faster_than(j, without_s[j] * (1 - MIN_GAIN))), never)
    simulated = [b for b in betas if candidates[b].times]
    return SearchResult(replace(base, p2=p2, beta=beta if p2 <= last else 0.0), samples, simulated,
                        [b for b in betas if b not in simulated], sum(len(c.times) for c in candidates.values()))


def alternatives(policy: AlisaPolicy, search: SearchResult) -> list[tuple[str, AlisaSchedule]]:
    """The schedules the search rejected, for `alisa-sim plan` to set beside its choice."""
    chosen, last, samples = search.schedule, policy.wl.decode_steps, search.samples
    out = [("no Phase III (no recompute)", replace(chosen, p2=last + 1, beta=0.0))]
    p2 = chosen.p2
    for other in (chosen.beta - 0.2, chosen.beta + 0.2):
        if 0 < other <= 1 and p2 <= last:
            out.append((f"beta = {other:.1f}", replace(chosen, beta=round(other, 1))))
    if p2 <= last and samples:
        index = samples.index(p2) if p2 in samples else 0
        for neighbour in (index - 1, index + 1):
            if 0 <= neighbour < len(samples):
                out.append((f"p2 = {samples[neighbour]}", replace(chosen, p2=samples[neighbour])))
    final_share = 1 - policy.gpu_tokens / policy.wl.max_context()
    if chosen.p1 > 1 and final_share > 0:
        out.append((f"offload {final_share:.0%} from step 1", replace(chosen, p1=1, alpha=round(final_share, 3))))
    return out


def plan_schedule(policy: AlisaPolicy) -> AlisaSchedule:
    """The schedule the search chooses."""
    return search_schedule(policy).schedule

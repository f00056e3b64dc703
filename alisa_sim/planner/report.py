"""What `alisa-sim plan` shows: a planner's choice beside the candidates it rejected, each priced from a few sampled
steps; only the front-runners are simulated in full, the others are listed as pruned with the reason.

A candidate is a front-runner when it is the planner's choice or its sampled estimate is within FRONT_RUNNER_MARGIN
of the best estimate; the choice itself never depends on these simulations (FlexGen chooses by its LP, ALISA by its
schedule search).
"""

from __future__ import annotations

from alisa_sim.cost_model import CostModel
from alisa_sim.errors import SpecError
from alisa_sim.planner.alisa_search import alternatives, estimate_decode_s, search_schedule
from alisa_sim.planner.flexgen_lp import search
from alisa_sim.planner.pricing import sampled_steps, step_time_s
from alisa_sim.policies.alisa import AlisaPolicy
from alisa_sim.policies.flexgen import FlexGenPolicy
from alisa_sim.results import build_result
from alisa_sim.simulator import simulate_with_policy
from alisa_sim.workload import ResolvedWorkload

FRONT_RUNNER_MARGIN = 0.05
MAX_SIMULATED = 3  # full simulations per report, the choice included
FLEXGEN_SAMPLES = 4  # decode steps sampled to price a FlexGen candidate (its step time is near linear in context)


def prune(estimates_s: list[float], chosen: int = 0) -> list[str | None]:
    """For each candidate's estimated time: None when it is simulated in full (the choice, then the best estimates
    within FRONT_RUNNER_MARGIN of the best one, MAX_SIMULATED in all), else why it is not."""
    best = min(estimates_s)
    simulated = {chosen}
    for index in sorted(range(len(estimates_s)), key=estimates_s.__getitem__):
        if len(simulated) < MAX_SIMULATED and estimates_s[index] <= best * (1 + FRONT_RUNNER_MARGIN):
            simulated.add(index)
    reasons: list[str | None] = []
    for index, estimate in enumerate(estimates_s):
        slower = f"+{estimate / best - 1:.0%}"
        if index in simulated:
            reasons.append(None)
        elif estimate > best * (1 + FRONT_RUNNER_MARGIN):
            reasons.append(f"{slower}: estimate more than {FRONT_RUNNER_MARGIN:.0%} above the best one")
        else:
            reasons.append(f"{slower}: not among the {MAX_SIMULATED} best estimates")
    return reasons


def _simulated_metrics(wl: ResolvedWorkload, policy) -> dict | None:
    """The full simulation's metrics; None when it runs out of memory (a simulated candidate that is not pruned
    and has no simulated number ran out of memory)."""
    sim = simulate_with_policy(wl, policy)
    return None if sim.oom_error else build_result(sim)["metrics"]


def _run_estimate_s(policy: FlexGenPolicy) -> float:
    """Prefill plus decode time from the engine's time of the prefill and a few evenly sampled decode steps."""
    steps, weight = sampled_steps(1, policy.wl.decode_steps, FLEXGEN_SAMPLES) if policy.wl.decode_steps else ([], 0)
    return step_time_s(policy, policy.prefill_template()) + weight * sum(
        step_time_s(policy, policy.decode_template(step)) for step in steps)


def flexgen_report(wl: ResolvedWorkload, cost: CostModel, show: int) -> dict:
    """FlexGen's LP search: the best `show` candidates by LP estimate, each priced from sampled steps, the front-runners
    simulated in full; the plan of the LP's choice."""
    solutions = search(wl, cost)
    if not solutions:
        raise SpecError(f"flexgen: no placement of {wl.model.name} at batch {wl.workload.batch_size} fits this machine")
    tokens = wl.workload.batch_size * wl.workload.gen_len
    policies = [FlexGenPolicy(wl, cost, solution.setting) for solution in solutions[:show]]
    estimates_s = [_run_estimate_s(policy) for policy in policies]
    candidates = []
    for solution, policy, estimate_s, pruned in zip(solutions, policies, estimates_s, prune(estimates_s)):
        row = {"flexgen_cli": solution.setting.cli(), "lp_throughput_tok_s": solution.lp_throughput(tokens),
               "sampled_throughput_tok_s": tokens / estimate_s, "simulated_throughput_tok_s": None, "pruned": pruned}
        if pruned is None:
            metrics = _simulated_metrics(wl, policy)
            row["simulated_throughput_tok_s"] = None if metrics is None else metrics["throughput_tok_s"]
        candidates.append(row)
    return {**policies[0].plan(), "chosen": candidates[0], "candidates": candidates, "feasible": len(solutions)}


def alisa_report(wl: ResolvedWorkload, cost: CostModel) -> dict:
    """ALISA's schedule search: the chosen schedule and the alternatives it rejected, each estimated from sampled
    steps, the front-runners simulated in full; what the Phase III search timed and what it ruled out by bound."""
    probe = AlisaPolicy(wl, cost)
    found = search_schedule(probe)
    chosen = AlisaPolicy(wl, cost, found.schedule)
    named = [("chosen", found.schedule)] + alternatives(probe, found)
    schedules = list(dict.fromkeys(schedule for _, schedule in named))  # an alternative may be the choice itself
    estimates_s = [estimate_decode_s(probe, schedule) for schedule in schedules]
    pruned = dict(zip(schedules, prune(estimates_s)))
    totals = {}
    for schedule in schedules:
        if pruned[schedule] is None:
            metrics = _simulated_metrics(wl, chosen if schedule == found.schedule else AlisaPolicy(wl, cost, schedule))
            totals[schedule] = None if metrics is None else metrics["total_s"]
    rows = [{"what": what, **vars(schedule), "estimated_decode_s": estimates_s[schedules.index(schedule)],
             "simulated_total_s": totals.get(schedule), "pruned": pruned[schedule]} for what, schedule in named]
    phase3 = {"sampled_steps": found.samples, "betas_timed": found.betas_timed,
              "betas_ruled_out": found.betas_ruled_out, "pairs_timed": found.pairs_timed,
              "pairs": len(found.samples) * len(found.betas_timed + found.betas_ruled_out)}
    return {**chosen.plan(), "chosen": rows[0], "alternatives": rows[1:], "phase3_search": phase3}

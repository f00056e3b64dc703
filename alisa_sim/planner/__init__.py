"""Planners: choose a policy's parameters for a workload by searching a cost model, and build the planned policy.

Policies never run a planner; whoever needs a policy calls `make_policy`, which runs the workload's planner (ALISA's
schedule search, FlexGen's LP policy search) and hands the plan to the policy.
"""

from __future__ import annotations

from alisa_sim.cost_model import CostModel
from alisa_sim.planner.alisa_search import plan_schedule
from alisa_sim.planner.flexgen_lp import complete_setting
from alisa_sim.policies import POLICIES, Policy
from alisa_sim.policies.alisa import AlisaPolicy
from alisa_sim.policies.flexgen import FlexGenPolicy
from alisa_sim.workload import ResolvedWorkload

__all__ = ["make_policy"]


def make_policy(workload: ResolvedWorkload, cost: CostModel | None = None) -> Policy:
    """The workload's policy with its plan filled in (`cost` defaults to the workload's hardware profile)."""
    cost = cost or CostModel(workload.hardware)
    name = workload.policy.name
    if name == "alisa":
        return AlisaPolicy(workload, cost, plan_schedule(AlisaPolicy(workload, cost)))
    if name == "flexgen":
        return FlexGenPolicy(workload, cost, complete_setting(workload, cost))
    return POLICIES[name](workload, cost)

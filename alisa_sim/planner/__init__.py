"""Planners: choose a policy's parameters for a workload by searching a cost model, and build the planned policy.

Policies never run a planner; whoever needs a policy calls `make_policy`, which runs the workload's planner (ALISA's
schedule search, FlexGen's LP policy search) and hands the plan to the policy.
"""

from __future__ import annotations

from alisa_sim.cost_model import CostModel
from alisa_sim.hardware import HardwareProfile
from alisa_sim.planner.alisa_search import plan_schedule
from alisa_sim.planner.flexgen_lp import complete_setting
from alisa_sim.policies import POLICIES, Policy
from alisa_sim.policies.alisa import AlisaPolicy
from alisa_sim.policies.flexgen import FlexGenPolicy
from alisa_sim.workload import ResolvedWorkload

__all__ = ["cost_model_of", "make_policy"]

_MAX_COST_MODELS = 16
_cost_models: dict[int, tuple[HardwareProfile, CostModel]] = {}  # by id(profile), the profile kept alive with it


def cost_model_of(profile: HardwareProfile) -> CostModel:
    """The cost model of a profile, built once per process (building one prices every row of the profile: a
    sweep's short simulations would spend a tenth of their time on it). Profiles are frozen, so sharing is safe."""
    entry = _cost_models.get(id(profile))
    if entry is None:
        if len(_cost_models) >= _MAX_COST_MODELS:
            del _cost_models[next(iter(_cost_models))]
        entry = _cost_models[id(profile)] = profile, CostModel(profile)
    return entry[1]


def make_policy(workload: ResolvedWorkload, cost: CostModel | None = None) -> Policy:
    """The workload's policy with its plan filled in (`cost` defaults to the cost model of the workload's hardware
    profile)."""
    cost = cost or cost_model_of(workload.hardware)
    name = workload.policy.name
    if name == "alisa":
        return AlisaPolicy(workload, cost, plan_schedule(AlisaPolicy(workload, cost)))
    if name == "flexgen":
        return FlexGenPolicy(workload, cost, complete_setting(workload, cost))
    return POLICIES[name](workload, cost)

"""Policy registry: the name in a workload's `policy.name` to the class that decides placement and traffic."""

from __future__ import annotations

from alisa_sim.cost_model import CostModel
from alisa_sim.policies.accelerate import AcceleratePolicy
from alisa_sim.policies.alisa import AlisaPolicy
from alisa_sim.policies.base import MemoryUse, Policy, StepPlan
from alisa_sim.policies.dense import DensePolicy
from alisa_sim.policies.eviction import H2OPolicy, StreamingLLMPolicy
from alisa_sim.policies.flexgen import FlexGenPolicy
from alisa_sim.policies.vllm import VllmPolicy
from alisa_sim.policies.zero import ZeroPolicy
from alisa_sim.workload import ResolvedWorkload

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (
    DensePolicy, AcceleratePolicy, ZeroPolicy, FlexGenPolicy, VllmPolicy, AlisaPolicy, H2OPolicy, StreamingLLMPolicy)}

__all__ = ["POLICIES", "MemoryUse", "Policy", "StepPlan", "make_policy"]


def make_policy(workload: ResolvedWorkload, cost: CostModel) -> Policy:
    """Deprecated: `alisa_sim.planner.make_policy`. Kept while alisa_sim/simulator.py and alisa_exec still import it
    from here; delete it once they import the planner's (no policy module runs a planner)."""
    from alisa_sim.planner import make_policy as planned_policy

    return planned_policy(workload, cost)

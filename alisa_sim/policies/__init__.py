"""Policy registry: the name in a workload's `policy.name` to the class that decides placement and traffic."""

from __future__ import annotations

from alisa_sim.policies.accelerate import AcceleratePolicy
from alisa_sim.policies.alisa import AlisaPolicy
from alisa_sim.policies.base import MemoryUse, Policy, StepPlan
from alisa_sim.policies.dense import DensePolicy
from alisa_sim.policies.eviction import H2OPolicy, StreamingLLMPolicy
from alisa_sim.policies.flexgen import FlexGenPolicy
from alisa_sim.policies.vllm import VllmPolicy
from alisa_sim.policies.zero import ZeroPolicy

POLICIES: dict[str, type[Policy]] = {cls.name: cls for cls in (
    DensePolicy, AcceleratePolicy, ZeroPolicy, FlexGenPolicy, VllmPolicy, AlisaPolicy, H2OPolicy, StreamingLLMPolicy)}

__all__ = ["POLICIES", "MemoryUse", "Policy", "StepPlan"]

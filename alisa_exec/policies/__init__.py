"""The executor's KV policies, by the name in a workload's `policy.name`; each runs the plan of the simulator's policy
object of the same name (`alisa_sim.policies`). `dense` runs in `alisa_exec.runner` (static buffers, CUDA graph)."""

from __future__ import annotations

from alisa_exec.policies.alisa import AlisaExec
from alisa_exec.policies.base import ExecPolicy, StepLog, StepRecord
from alisa_exec.policies.eviction import H2OExec, StreamingLLMExec
from alisa_exec.policies.offload import AccelerateExec, FlexGenExec
from alisa_exec.policies.vllm import VllmExec

EXEC_POLICIES: dict[str, type[ExecPolicy]] = {cls.name: cls for cls in (
    AlisaExec, AccelerateExec, FlexGenExec, VllmExec, H2OExec, StreamingLLMExec)}

__all__ = ["EXEC_POLICIES", "ExecPolicy", "StepLog", "StepRecord"]

"""The executor's KV policies, by the name in a workload's `policy.name` (the one list of what the executor runs);
each runs the plan of the simulator's policy object of the same name (`alisa_sim.policies`) through the same step
driver (`ExecPolicy.generate`)."""

from __future__ import annotations

from alisa_exec.policies.alisa import AlisaExec
from alisa_exec.policies.base import ExecPolicy, StepInfo, StepLog, StepRecord
from alisa_exec.policies.dense import DenseExec, ZeroExec
from alisa_exec.policies.eviction import H2OExec, StreamingLLMExec
from alisa_exec.policies.offload import AccelerateExec, FlexGenExec
from alisa_exec.policies.vllm import VllmExec

EXEC_POLICIES: dict[str, type[ExecPolicy]] = {cls.name: cls for cls in (
    DenseExec, AlisaExec, FlexGenExec, AccelerateExec, VllmExec, H2OExec, StreamingLLMExec, ZeroExec)}

__all__ = ["EXEC_POLICIES", "ExecPolicy", "StepInfo", "StepLog", "StepRecord"]

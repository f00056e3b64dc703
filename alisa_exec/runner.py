"""`alisa-exec run`: execute a workload on this machine and build the measured Result JSON and a Chrome trace.

Every policy, dense included, runs the same way (`alisa_exec.executor`): its plan is checked against the memory
budget before anything is allocated, the model is loaded, the plan's first steps run once untimed (kernels compile,
dense's decode step is captured as a CUDA graph), then the whole workload runs through the policy's step driver with
every step timed on the device clock and the ops of a spread of steps timed one by one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alisa_exec import executor
from alisa_exec.device import device_name
from alisa_exec.model import check_family
from alisa_exec.weights import DUMMY, weights_format
from alisa_sim.workload import ResolvedWorkload


@dataclass(frozen=True)
class ExecOptions:
    device: torch.device
    dtype: torch.dtype
    weights: str = DUMMY
    seed: int = 0
    compile_decode: bool = False  # dense on the CPU: its decode step compiled by TorchInductor (`run --compile`)


def run_workload(wl: ResolvedWorkload, options: ExecOptions, log=lambda _: None, on_step=None) -> tuple[dict, dict]:
    """Execute the workload; returns (Result JSON, Chrome trace). `on_step(record)` is called after each step."""
    executor.executable(wl.policy.name)
    check_family(wl.model)
    weights_format(options.weights)
    plan = executor.plan_run(wl, options.device, options.dtype)
    measured = executor.execute(plan, options.device, options.dtype, options.weights, options.seed, log, on_step,
                                compile_decode=options.compile_decode)
    result = executor.build_result(plan, measured, device_name(options.device), options.dtype, options.weights)
    return result, executor.build_trace(result, measured)

"""For one plan, the named ops the executor issues (alisa_exec.ledger: name and shape, per step) are exactly the ones
the simulator priced (each Op's `calls`: the head's and tail's once, every layer's per layer), for every executor
policy: the simulator's time is then a sum over the very calls a run makes, and a profile row of an op at a shape
times what the run executes there. Same plans as tests/exec/test_traffic_equality.py (so ALISA at kv_sparsity > 0
is exact here for the reason given there).
"""

from collections import Counter

import pytest
import torch

from alisa_exec import executor, ledger
from test_traffic_equality import CASES, budget, workload

CPU = torch.device("cpu")


def step_ledgers(case: str) -> tuple[list[Counter], list[Counter]]:
    policy, cap, _ = CASES[case]
    plan = executor.plan_run(workload(policy, budget(policy, cap)), CPU, torch.float32)
    cuts: list[int] = []
    with ledger.recording() as calls:
        executor.execute(plan, CPU, torch.float32, "dummy", 0, warmup_steps=0,
                         on_step=lambda _: cuts.append(len(calls)))
    executed = [Counter((op, tuple(sorted(shape.items()))) for op, shape in calls[first:end])
                for first, end in zip([0] + cuts, cuts)]
    layers = plan.workload.model.num_layers
    return executed, [step.template.calls(layers) for step in plan.sim.steps()]


@pytest.mark.parametrize("case", list(CASES))
def test_the_simulator_prices_every_op_the_executor_issues(case):
    executed, simulated = step_ledgers(case)
    assert len(executed) == len(simulated)
    assert sum(sum(step.values()) for step in executed) > 0
    if case.startswith("flexgen"):  # its KV stores are priced at pageable speed, as FlexGen's copies run
        executed = [_as_pageable(step, simulated_step) for step, simulated_step in zip(executed, simulated)]
    for step, (ex, sim) in enumerate(zip(executed, simulated)):
        assert ex == sim, f"step {step}: executed only {dict(ex - sim)}, simulated only {dict(sim - ex)}"


def _as_pageable(executed: Counter, simulated: Counter) -> Counter:
    """The executed D2H copies into the pinned pool counted as pageable, as many as the simulator priced so."""
    out = Counter(executed)
    for (op, shape), count in simulated.items():
        if op == "copy_d2h_pageable":
            moved = min(count, out[("copy_d2h_pinned", shape)])
            out[("copy_d2h_pinned", shape)] -= moved
            out[(op, shape)] += moved
    return +out


def test_the_ledger_sees_each_kind_of_op():
    """The recording covers compute, attention, KV stores and tier copies (so an op left out of it shows)."""
    executed, _ = step_ledgers("accelerate")
    names = {op for step in executed for op, _ in step}
    assert {"project", "norm", "split_heads", "residual", "activate", "embed", "argmax", "causal_attention",
            "rows_attention", "copy_h2d_pinned", "copy_d2h_pinned"} <= names

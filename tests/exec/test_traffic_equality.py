"""For one plan, the simulator's step rows equal the executor's exactly, for every executor policy: per step the kind,
KV phase, token rows computed, KV bytes held on each tier, H2D and D2H payload bytes, and the token-row counters
(fetched / offloaded / recomputed / evicted, one token of one layer of one sequence), plus vLLM's preemptions and
swapped blocks; and the peak GPU and CPU bytes, purpose by purpose. CPU device, float32, a tiny GQA model with
dummy weights; budgets tight enough that ALISA spends the run in Phase II (and Phase III with p2/beta pinned) and
vLLM preempts.

ALISA at kv_sparsity > 0 is exact from the statistics alone in Phase II when the tight budget leaves only the newest
token on the GPU, so every other selected token is read from the CPU whichever the selection picks; with a wider GPU
window, or in Phase III (fetched or deleted), the split of the global picks comes from the model's attention at run
time: the simulator's expectation from `selection_stats` differs, and with the run's selection replayed
(`selection_trace`, the run's own Result) it is exact again (docs/executor.md, "What the simulator and the executor
count alike").
"""

import json

import pytest
import torch
import yaml

from alisa_exec import executor
from alisa_sim.cost_model import CostModel
from alisa_sim.errors import SpecError
from alisa_sim.planner import make_policy
from alisa_sim.results import simulated_rows
from alisa_sim.workload import load_workload, resolve_workload
from tiny_models import TINY_SPEC

CPU = torch.device("cpu")
BATCH, PROMPT_LEN, GEN_LEN = 3, 12, 12
FIELDS = ("kind", "phase", "tokens", "sequences", "gpu_kv_bytes", "cpu_kv_bytes", "h2d_bytes", "d2h_bytes")
COUNTERS = ("fetched_tokens", "offloaded_tokens", "recomputed_tokens", "evicted_tokens", "preemptions",
            "swapped_out_blocks", "swapped_in_blocks")
VLLM = {"name": "vllm", "block_size": 4, "swap_space": 0.0001, "max_model_len": PROMPT_LEN + GEN_LEN,
        "max_num_batched_tokens": 64}
ALISA = {"name": "alisa", "kv_sparsity": 0.0, "int8": False}
PHASE_3 = {"p2": 3, "beta": 0.5}
K4_CAPPED = {**ALISA, "kv_sparsity": 0.8, "selector": "k4-capped", "recompute": False}
# policy, budget ("tight": about the least the plan fits in; an int: vLLM's GPU pool in blocks), phases the run has
CASES = {
    "dense": ({"name": "dense"}, None, {1}),
    "zero": ({"name": "zero"}, None, {1}),
    "accelerate": ({"name": "accelerate"}, None, {2}),
    "flexgen": ({"name": "flexgen", "percent": [100, 0, 50, 50, 100, 0], "gpu_batch_size": 3, "num_gpu_batches": 1,
                 "cpu_attention": False}, None, {2}),
    "flexgen-cpu-attention": ({"name": "flexgen", "percent": [100, 0, 50, 50, 100, 0], "gpu_batch_size": 1,
                               "num_gpu_batches": 3, "cpu_attention": True}, None, {2}),
    "vllm-recompute": ({**VLLM, "preemption_mode": "recompute"}, 8, {1}),
    "vllm-swap": ({**VLLM, "preemption_mode": "swap"}, 8, {1}),
    "alisa-phase-1": (ALISA, None, {1}),
    "alisa-phase-2": (ALISA, "tight", {2}),
    "alisa-phase-3": ({**ALISA, **PHASE_3}, "tight", {2, 3}),
    "alisa-phase-3-int8": ({**ALISA, **PHASE_3, "int8": True}, "tight", {2, 3}),
    "alisa-0.5-phase-2": ({**ALISA, "kv_sparsity": 0.5}, "tight", {2}),
    "alisa-0.8-int8-phase-2": ({**ALISA, "kv_sparsity": 0.8, "int8": True}, "tight", {2}),
    # SWA's literal budget (the current token inside 2k; the cases above attend it on top, the default)
    "alisa-0.5-inside-phase-2": ({**ALISA, "kv_sparsity": 0.5, "swa_current": "inside"}, "tight", {2}),
    "alisa-0.8-int8-inside-self-phase-2": ({**ALISA, "kv_sparsity": 0.8, "int8": True, "swa_current": "inside",
                                            "swa_self_weight": True}, "tight", {2}),
    # k4-capped: the choice per KV head from the step's query, its CPU rows fetched per KV head after it
    "alisa-k4-capped-phase-1": (K4_CAPPED, None, {1}),
    "alisa-k4-capped-phase-2": (K4_CAPPED, "tight", {2}),
    "alisa-k4-capped-int8-phase-2": ({**K4_CAPPED, "int8": True}, "tight", {2}),
    "h2o": ({"name": "h2o", "kv_sparsity": 0.5}, None, {1}),
    "streamingllm": ({"name": "streamingllm", "kv_sparsity": 0.5}, None, {1}),
}


def workload(policy: dict, gpu_gb: float | None = None, gen_len: int = GEN_LEN):
    data = {"model": {**TINY_SPEC, "num_layers": 2, "dtype_bytes": 4}, "hardware": "h100", "batch_size": BATCH,
            "prompt_len": PROMPT_LEN, "gen_len": gen_len, "policy": policy}
    if gpu_gb is not None:
        data["memory"] = {"gpu_gb": gpu_gb}
    return resolve_workload(data)


def tight_cap(policy: dict) -> float:
    """About the least memory.gpu_gb the plan fits in (a bisection)."""
    low, high = 1e-5, 1e-2
    for _ in range(14):
        middle = (low * high) ** 0.5
        try:
            executor.plan_run(workload(policy, middle), CPU, torch.float32)
            high = middle
        except SpecError:
            low = middle
    return high


def blocks_cap(policy: dict, blocks: int) -> float:
    """memory.gpu_gb for a vLLM pool of `blocks` KV blocks."""
    wl = workload(policy, 1.0)
    sim = make_policy(executor._with(wl, torch.float32, wl.gpu_capacity_bytes), CostModel(wl.hardware))
    return (sim.static_memory().gpu_bytes + (blocks + 0.5) * sim.block_bytes) / 0.9 / 1e9


def budget(policy: dict, cap) -> float | None:
    if cap == "tight":
        return tight_cap(policy)
    return blocks_cap(policy, cap) if isinstance(cap, int) else None


def held(usage: dict) -> dict[str, int]:
    return {purpose: int(nbytes) for purpose, nbytes in usage.items() if nbytes}


def step_table(rows) -> list[dict]:
    return [{**{name: getattr(row, name) for name in FIELDS},
             **{name: row.counters.get(name, 0) for name in COUNTERS}} for row in rows]


@pytest.mark.parametrize("case", list(CASES))
def test_simulated_steps_equal_the_executed_ones(case):
    policy, cap, phases = CASES[case]
    plan = executor.plan_run(workload(policy, budget(policy, cap)), CPU, torch.float32)
    measured = executor.execute(plan, CPU, torch.float32, "dummy", 0, warmup_steps=0)
    executed, simulated = step_table(measured.rows()), step_table(simulated_rows(plan.simulation))
    assert len(executed) == len(simulated) >= GEN_LEN  # vLLM's iterations may be more than the decode steps
    for step, (ex, sim) in enumerate(zip(executed, simulated)):
        assert ex == sim, f"step {step}: " + ", ".join(f"{k} exec {ex[k]} sim {sim[k]}" for k in ex if ex[k] != sim[k])
    assert {row["phase"] for row in executed[1:]} == phases
    moved = sum(row["fetched_tokens"] + row["offloaded_tokens"] + row["evicted_tokens"] for row in executed)
    assert (moved > 0) == (case not in ("dense", "zero", "alisa-phase-1", "alisa-k4-capped-phase-1")
                           and not case.startswith("vllm"))
    if case.startswith("vllm"):  # the pool is small enough that the scheduler preempts
        assert sum(row["preemptions"] for row in executed) > 0
    # Peak memory, device by device and purpose by purpose: what the executor allocates is what the simulator holds.
    assert held(plan.gpu_bytes) == held(plan.simulation.peak_gpu_usage)
    assert held(plan.cpu_bytes) == held(plan.simulation.peak_cpu_usage)
    assert (measured.peak_gpu_bytes, measured.peak_cpu_bytes) == (plan.simulation.peak_gpu_bytes,
                                                                  plan.simulation.peak_cpu_bytes)


# Sparse ALISA with a GPU window of a few tokens (a budget 5-10% over the tight one), in Phase II and III: how many
# picks are fetched or recomputed is the model's choice.
REPLAYED = {
    "alisa-0.5-phase-2": ({**ALISA, "kv_sparsity": 0.5}, {2}, 1.1),
    "alisa-0.5-phase-3": ({**ALISA, "kv_sparsity": 0.5, **PHASE_3}, {2, 3}, 1.05),
    "alisa-0.8-int8-phase-3": ({**ALISA, "kv_sparsity": 0.8, "int8": True, **PHASE_3}, {1, 3}, 1.05),  # fits at first
    "alisa-k4-capped-phase-2": (K4_CAPPED, {2}, 1.02),
}


def traced_run(policy: dict, wider: float, folder):
    """The budget, the executed step table, the run's Result JSON written into `folder` (the trace) and the plan."""
    gpu_gb = wider * tight_cap(policy)
    plan = executor.plan_run(workload(policy, gpu_gb), CPU, torch.float32)
    measured = executor.execute(plan, CPU, torch.float32, "dummy", 0, warmup_steps=0)
    trace = folder / "result.json"
    trace.write_text(json.dumps(executor.build_result(plan, measured, "cpu", torch.float32, "dummy")))
    return gpu_gb, step_table(measured.rows()), trace, plan


@pytest.mark.parametrize("case", list(REPLAYED))
def test_a_replayed_selection_moves_exactly_the_rows_the_run_moved(case, tmp_path):
    policy, phases, wider = REPLAYED[case]
    gpu_gb, executed, trace, plan = traced_run(policy, wider, tmp_path)
    assert {row["phase"] for row in executed[1:]} == phases
    expected = step_table(simulated_rows(plan.simulation))
    assert any(ex["fetched_tokens"] != sim["fetched_tokens"] for ex, sim in zip(executed, expected))
    replay = executor.plan_run(workload({**policy, "selection_trace": str(trace)}, gpu_gb), CPU, torch.float32)
    replayed = step_table(simulated_rows(replay.simulation))
    for step, (ex, sim) in enumerate(zip(executed, replayed, strict=True)):
        assert ex == sim, f"step {step}: " + ", ".join(f"{k} exec {ex[k]} sim {sim[k]}" for k in ex if ex[k] != sim[k])


def test_a_selection_trace_replays_only_its_own_plan(tmp_path):
    policy, _, wider = REPLAYED["alisa-0.5-phase-3"]
    gpu_gb, _, trace, _ = traced_run(policy, wider, tmp_path)
    with pytest.raises(SpecError, match=r"at decode step 3 the traced run was in Phase 3 .* this plan in Phase 2"):
        executor.plan_run(workload({**policy, "p2": 5, "selection_trace": str(trace)}, gpu_gb), CPU, torch.float32)
    with pytest.raises(SpecError, match=f"no decode step {GEN_LEN}"):
        executor.plan_run(workload({**policy, "selection_trace": str(trace)}, gpu_gb, GEN_LEN + 1), CPU,
                          torch.float32)
    data = {"model": {**TINY_SPEC, "num_layers": 2, "dtype_bytes": 4}, "hardware": "h100", "batch_size": BATCH,
            "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN, "memory": {"gpu_gb": gpu_gb},
            "policy": {**policy, "selection_trace": "result.json"}}
    (tmp_path / "replay.yaml").write_text(yaml.safe_dump(data))
    assert load_workload(tmp_path / "replay.yaml").policy.selection_trace == str(trace)  # beside the workload file
    simulated = tmp_path / "sim.json"
    simulated.write_text(json.dumps({**json.loads(trace.read_text()), "source": "sim"}))
    with pytest.raises(SpecError, match="not a measured run"):
        executor.plan_run(workload({**policy, "selection_trace": str(simulated)}, gpu_gb), CPU, torch.float32)

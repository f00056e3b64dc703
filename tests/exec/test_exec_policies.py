"""Every executor policy runs its plan through the one step driver and gets the dense generator's tokens when nothing
is dropped, and `alisa` equals a plain-PyTorch SWA reference step by step (tokens and logits), fused and gather
attention, fp32 values and INT8, whatever the GPU budget forces onto the CPU or into recompute.

CPU, float32, the tiny random OPT and LLaMA (GQA) models; the "GPU" tier is a second host pool. On a CUDA machine
the same tests also run on the GPU (float32, so tokens still compare exactly), with pinned memory and side streams.
Memory caps are the tightest the plan fits (a bisection on `memory.gpu_gb`), so that Phase II starts with the
prompt, and pinned p2/beta put Phase III in; vLLM gets a pool of a few blocks so that it preempts. On the CPU device
the kernels run in their PyTorch forms; `test_alisa_on_the_triton_kernels_...` runs the Triton kernels themselves
(selection, INT8 store, fused attention over the tiered cache) under the interpreter against the same reference.
"""

import pytest
import torch

from alisa_exec import executor
from alisa_exec.generate import Generator
from alisa_exec.weights import load_model
from alisa_sim.cost_model import CostModel
from alisa_sim.errors import SpecError
from alisa_sim.model_spec import load_model_spec
from alisa_sim.planner import make_policy
from alisa_sim.workload import resolve_workload
from swa_reference import swa_generate

CPU = torch.device("cpu")
DEVICES = [pytest.param(CPU, id="cpu"),
           pytest.param(torch.device("cuda"), id="cuda", marks=[
               pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])]
BATCH, PROMPT_LEN, GEN_LEN = 3, 12, 12
SEED = 0
MODELS = ["opt", "llama-gqa"]


def workload(folder, policy: dict, gpu_gb: float | None = None, batch: int = BATCH, gen_len: int = GEN_LEN):
    data = {"model": {**load_model_spec(str(folder)).model_dump(), "dtype_bytes": 4}, "hardware": "h100",
            "batch_size": batch, "prompt_len": PROMPT_LEN, "gen_len": gen_len, "policy": policy}
    if gpu_gb is not None:
        data["memory"] = {"gpu_gb": gpu_gb}
    return resolve_workload(data)


def prompt_of(wl):
    """The prompt the executor draws for a run with seed SEED."""
    return torch.randint(0, wl.model.vocab_size, (wl.workload.batch_size, PROMPT_LEN),
                         generator=torch.Generator().manual_seed(SEED))


def run(folder, policy: dict, gpu_gb: float | None = None, keep_logits: bool = False, device=CPU, triton=None,
        **shape):
    plan = executor.plan_run(workload(folder, policy, gpu_gb, **shape), device, torch.float32)
    if keep_logits:
        plan.policy.logits_log = []
    measured = executor.execute(plan, device, torch.float32, str(folder), SEED, triton=triton)
    return plan, measured


def tight_cap(folder, policy: dict, device=CPU, **shape) -> float:
    """About the smallest memory.gpu_gb the plan fits in (the GPU then holds a few tokens per sequence at most)."""
    low, high = 1e-5, 1e-2
    for _ in range(16):
        middle = (low * high) ** 0.5
        try:
            executor.plan_run(workload(folder, policy, middle, **shape), device, torch.float32)
            high = middle
        except SpecError:
            low = middle
    return high


def vllm_cap(folder, policy: dict, blocks: int) -> float:
    """memory.gpu_gb for a pool of `blocks` KV blocks."""
    wl = workload(folder, policy, 1.0)
    sim = make_policy(executor._with(wl, torch.float32, wl.gpu_capacity_bytes), CostModel(wl.hardware))
    return (sim.static_memory().gpu_bytes + (blocks + 0.5) * sim.block_bytes) / policy.get("gpu_memory_utilization",
                                                                                          0.9) / 1e9


@pytest.fixture(scope="module")
def dense_tokens(tiny_hf_models):
    """The dense policy's greedy tokens (static buffers, `Generator`) for each tiny model."""
    tokens = {}
    for name in MODELS:
        folder = tiny_hf_models[name][1]
        wl = workload(folder, {"name": "dense"})
        model = load_model(wl.model, str(folder), torch.float32, CPU, SEED)
        tokens[name] = Generator(model, BATCH, PROMPT_LEN + GEN_LEN - 1).generate(prompt_of(wl), GEN_LEN).tokens
    return tokens


VLLM = {"name": "vllm", "block_size": 4, "swap_space": 0.0001, "max_model_len": PROMPT_LEN + GEN_LEN,
        "max_num_batched_tokens": 64}
ALISA = {"name": "alisa", "kv_sparsity": 0.0, "int8": False}
CASES = {
    "dense": ({"name": "dense"}, None),
    "zero": ({"name": "zero"}, None),
    "alisa-phase-2": (ALISA, "tight"),
    "alisa-phase-3": ({**ALISA, "p2": 3, "beta": 0.5}, "tight"),
    "alisa-alpha": ({**ALISA, "p1": 4, "alpha": 0.7}, None),
    "accelerate": ({"name": "accelerate"}, None),
    "flexgen": ({"name": "flexgen", "percent": [100, 0, 50, 50, 100, 0], "gpu_batch_size": 3, "num_gpu_batches": 1,
                 "cpu_attention": False}, None),
    "flexgen-cpu-attention": ({"name": "flexgen", "percent": [100, 0, 25, 75, 100, 0], "gpu_batch_size": 1,
                               "num_gpu_batches": 3, "cpu_attention": True}, None),
    "flexgen-weights-on-cpu": ({"name": "flexgen", "percent": [40, 60, 0, 100, 0, 100], "gpu_batch_size": 1,
                                "num_gpu_batches": 3, "cpu_attention": False}, None),
    "vllm-recompute": ({**VLLM, "preemption_mode": "recompute"}, "blocks"),
    "vllm-swap": ({**VLLM, "preemption_mode": "swap"}, "blocks"),
    "h2o": ({"name": "h2o", "kv_sparsity": 0.0}, None),
    "streamingllm": ({"name": "streamingllm", "kv_sparsity": 0.0}, None),
}


def total(measured, counter: str) -> int:
    return sum(record.counters.get(counter, 0) for record in measured.records)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_every_policy_gets_the_dense_tokens_at_sparsity_0(tiny_hf_models, dense_tokens, device, name, case):
    folder = tiny_hf_models[name][1]
    policy, cap = CASES[case]
    gpu_gb = {"tight": lambda: tight_cap(folder, policy, device), "blocks": lambda: vllm_cap(folder, policy, 9),
              None: lambda: None}[cap]()
    plan, measured = run(folder, policy, gpu_gb, device=device)
    assert torch.equal(measured.tokens, dense_tokens[name])
    phases = {record.info.phase for record in measured.records if record.info.kind == "decode"}
    if case.startswith("alisa"):
        assert 2 in phases and total(measured, "fetched_tokens") > 0 and total(measured, "offloaded_tokens") > 0
        assert (3 in phases) == (case == "alisa-phase-3")
        assert (total(measured, "recomputed_tokens") > 0) == (case == "alisa-phase-3")
        if cap:
            assert plan.sim.gpu_tokens < PROMPT_LEN and plan.sim.schedule.p1 == 0
    if case.startswith(("accelerate", "flexgen")):
        assert phases == {2} and measured.moved["h2d"] > 0 and measured.moved["d2h"] > 0
    if case.startswith("vllm"):
        assert plan.sim.gpu_blocks == 9 and total(measured, "preemptions") > 0
        assert (total(measured, "swapped_out_blocks") > 0) == (case == "vllm-swap")
        assert sum(record.info.sequences for record in measured.records) == BATCH * GEN_LEN
    if case in ("h2o", "streamingllm"):
        assert total(measured, "evicted_tokens") == 0
    if case == "zero":  # every layer's weights come over once a step
        layer_bytes = sum(p.numel() for p in plan.policy.staged_layers[0].parameters()) * 4
        assert all(r.h2d_bytes == plan.workload.model.num_layers * layer_bytes for r in measured.records)


def test_accelerate_moves_every_cached_token_every_step(tiny_hf_models):
    folder = tiny_hf_models["opt"][1]
    plan, measured = run(folder, {"name": "accelerate"})
    spec = plan.workload.model
    row = spec.kv_bytes_per_token_per_layer(4)
    for record in measured.records[1:]:
        n = PROMPT_LEN + record.step
        assert record.h2d_bytes == spec.num_layers * BATCH * (n - 1) * row
        assert record.d2h_bytes == spec.num_layers * BATCH * row
        assert record.cpu_kv_bytes == n * BATCH * spec.num_layers * row and record.gpu_kv_bytes == 0


def test_alisa_residency_follows_the_plan(tiny_hf_models):
    """The KV bytes each step reports are the plan's residency, and Phase III deletes the oldest CPU tokens."""
    folder = tiny_hf_models["llama-gqa"][1]
    policy = {**ALISA, "kv_sparsity": 0.5, "p2": 3, "beta": 0.5}
    plan, measured = run(folder, policy, tight_cap(folder, policy))
    spec = plan.workload.model
    per_token = BATCH * spec.num_layers * spec.kv_bytes_per_token_per_layer(4)
    for record in measured.records:
        residency = plan.sim.residency(record.step)
        assert record.info.phase == residency.phase
        assert record.gpu_kv_bytes == residency.on_gpu * per_token
        assert record.cpu_kv_bytes >= residency.on_cpu * per_token
    assert measured.records[-1].info.phase == 3 and plan.sim.residency(GEN_LEN - 1).deleted > 0


SWA_CASES = {
    "sparsity-0.5": ({"kv_sparsity": 0.5}, None),
    "sparsity-0.8": ({"kv_sparsity": 0.8}, None),
    "phase-2": ({"kv_sparsity": 0.5}, "tight"),
    "phase-3": ({"kv_sparsity": 0.5, "p2": 2, "beta": 0.6}, "tight"),
    "int8-phase-2": ({"kv_sparsity": 0.5, "int8": True, "p1": 1, "alpha": 0.5}, None),
    "int8-phase-3": ({"kv_sparsity": 0.5, "int8": True, "p2": 2, "beta": 0.6}, "tight"),
    # the paper's literal budget (the current token inside 2k), own rows credited or not
    "inside-0.8": ({"kv_sparsity": 0.8, "swa_current": "inside"}, None),
    "inside-self-phase-3": ({"kv_sparsity": 0.5, "swa_current": "inside", "swa_self_weight": True, "p2": 2,
                             "beta": 0.6}, "tight"),
}


def check_against_reference(folder, case: str, attention_kernel: str, device=CPU, triton=None, batch: int = BATCH,
                            gen_len: int = GEN_LEN):
    extra, cap = SWA_CASES[case]
    policy = {"name": "alisa", "int8": False, "attention_kernel": attention_kernel, **extra}
    shape = {"batch": batch, "gen_len": gen_len}
    gpu_gb = tight_cap(folder, policy, device, **shape) if cap else None
    plan, measured = run(folder, policy, gpu_gb, keep_logits=True, device=device, triton=triton, **shape)
    wl = plan.workload
    model = load_model(wl.model, str(folder), torch.float32, CPU, SEED)
    deleted = [plan.sim.residency(step).deleted for step in range(gen_len)]
    want_tokens, want_logits = swa_generate(model, prompt_of(wl), gen_len, policy["kv_sparsity"], policy["int8"],
                                            deleted, wl.policy.swa_current, wl.policy.swa_self_weight)
    assert torch.equal(measured.tokens, want_tokens)
    assert len(plan.policy.logits_log) == gen_len
    for step, (got, want) in enumerate(zip(plan.policy.logits_log, want_logits)):
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), f"step {step}"
    assert plan.sim.selected(PROMPT_LEN + gen_len - 1)[1] < PROMPT_LEN + gen_len - 1  # tokens were left out
    if cap:
        assert {r.info.phase for r in measured.records[1:]} >= ({2, 3} if "p2" in extra else {2})
    if "p2" in extra:
        assert total(measured, "recomputed_tokens") > 0 and max(deleted) > 0
    return plan, measured


@pytest.mark.parametrize("attention_kernel", ["fused", "gather"])
@pytest.mark.parametrize("case", list(SWA_CASES))
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_alisa_equals_the_swa_reference_step_by_step(tiny_hf_models, device, name, case, attention_kernel):
    plan, _ = check_against_reference(tiny_hf_models[name][1], case, attention_kernel, device)
    assert hasattr(plan.policy, "workspace") == (attention_kernel == "gather")  # fused reads the cache in place


# The literal budget's options on the Triton selection path: tests/exec/test_swa_options.py (same rows, every option).
@pytest.mark.parametrize("case", ["phase-3", "int8-phase-3"])
def test_alisa_on_the_triton_kernels_equals_the_reference_on_the_cpu(tiny_hf_models, case):
    """The Triton kernels themselves, under the interpreter: LocalAttentionSum's update, the INT8 store kernel and the
    fused kernel reading the window ring and the staging buffer, GQA; the same reference as their PyTorch forms. Two
    sequences and 8 steps (Phase III from step 2): the interpreter runs each program instance in Python, so its time
    grows with batch x steps, and a second sequence already checks the batch strides."""
    check_against_reference(tiny_hf_models["llama-gqa"][1], case, "fused", CPU, triton=True, batch=2, gen_len=8)

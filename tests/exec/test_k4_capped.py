"""`k4-capped` in the executor: its 4-bit key copy reads back what the evaluator's copy is, its capped choice is the
evaluator's on the same rows (from the first token, k = 1, and after a seeding prefill), and on a tiny random LLaMA
with GQA an `alisa` run with `selector: k4-capped` picks, in every layer, per KV head, what the evaluator's
`k4-capped` keeps when it decodes the same tokens after a dense prefill, with the same logits, in Phase I and in
Phase II with the CPU rows fetched per KV head; the bound on its fetches holds against the SWA alongside.
"""

import pytest
import torch

from alisa_exec import ops
from alisa_exec.accuracy.forward import decode_pass
from alisa_exec.accuracy.methods import METHODS
from alisa_exec.kernels import LocalAttentionSum, prefill_window_rows
from alisa_exec.key_copy import KeyCopy, copy_probabilities, int4_keys
from alisa_exec.kv_cache import GPU, Tiers
from alisa_exec.weights import load_model
from alisa_sim.errors import SpecError
from alisa_sim.swa import swa_recent
from test_exec_policies import PROMPT_LEN, SEED, prompt_of, run, tight_cap
from test_swa_options import positions_per_head, recording

CPU = torch.device("cpu")
K4 = {"name": "alisa", "kv_sparsity": 0.8, "int8": False, "selector": "k4-capped", "recompute": False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 5, 37])
def test_key_copy_reads_back_the_evaluators_int4_keys(tokens, dtype):
    batch, kv_heads, head_dim = 2, 3, 8
    k = (torch.randn(batch, kv_heads, tokens, head_dim) * 3).to(dtype)
    k[0, 0, 0] = 1.5  # a constant row: scale at its floor, every level 0
    copy = KeyCopy(Tiers(CPU), GPU, tokens + 2, batch, kv_heads, head_dim, dtype)
    copy.store(0, k[:, :, :tokens - 1])
    copy.store(tokens - 1, k[:, :, tokens - 1:])
    assert torch.equal(copy.keys(tokens), int4_keys(k))
    assert copy.levels.nbytes + copy.params.nbytes == (tokens + 2) * batch * kv_heads * (head_dim // 2 + 2 * k.element_size())


def test_key_copy_refuses_an_odd_head_dim():
    with pytest.raises(ValueError, match="odd"):
        KeyCopy(Tiers(CPU), GPU, 4, 1, 1, 7, torch.float32)


@pytest.mark.parametrize("prefill", [0, 7], ids=["from-token-0", "prefill-7"])
def test_capped_pick_equals_the_evaluators_choice_on_the_same_rows(prefill):
    """Random queries and keys: the executor's `capped_pick` (SWA alongside in `LocalAttentionSum`) and the evaluator's
    `k4-capped` keep the same positions per KV head at every step, from n = 1 (and after a prefill seeding both)."""
    batch, heads, kv_heads, head_dim, steps, sparsity = 2, 4, 2, 8, 40, 0.8
    group = heads // kv_heads
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(batch, heads, steps, head_dim, generator=generator) * 2
    k = torch.randn(batch, kv_heads, steps, head_dim, generator=generator) * 2
    swa = LocalAttentionSum(batch, steps, sparsity, CPU, prompt_len=prefill)
    copy = KeyCopy(Tiers(CPU), GPU, steps, batch, kv_heads, head_dim, torch.float32)
    copy.store(0, k)
    evaluator = METHODS["k4-capped"].make_selector([sparsity] * batch, kv_heads, steps, CPU)
    grouped = q.view(batch, kv_heads, group, steps, head_dim)
    if prefill:
        rows = prefill_window_rows(q[:, :, :prefill], k[:, :, :prefill], num_rows=prefill, per_head=True)
        evaluator.prefill_rows(0, rows[:, :, None])  # summed over the group already: the sums see the same totals
        swa.seed(rows.sum(dim=1)[:, -swa.capacity:])
    narrowed = 0
    for n in range(prefill + 1, steps + 1):
        evaluator.see_queries(n - 1, grouped[:, :, :, n - 1:n], k)
        kept = evaluator.keep(n)  # [batch, kv_heads, n]
        swa_selected = swa.select(n)
        probs = ops.key_copy_attention(q[:, :, n - 1], copy, n)
        assert torch.equal(probs, copy_probabilities(n - 1, grouped[:, :, :, n - 1:n], int4_keys(k))[..., 0, :])
        selected, swa_row = ops.capped_pick(probs, swa_selected, swa_recent(n, sparsity, swa.current))
        assert selected.tolist() == positions_per_head(kept), f"step {n}"
        # the i-th oldest pick of every head is no older than SWA's i-th oldest
        assert (selected >= swa_selected[:, None]).all()
        narrowed += int((selected != swa_selected[:, None]).any())
        swa.push(swa_selected, swa_row)
        evaluator.observe(torch.zeros(batch, kv_heads, group, n))
    assert narrowed, "the choice never differed from SWA's set"


def picks_recorder(monkeypatch) -> list:
    """Every `ops.capped_pick` the executor calls, in order: (n, positions [batch, kv_heads, T])."""
    calls = []
    pick = ops.capped_pick

    def noted(probs, swa_selected, recent, triton=False):
        selected, swa_row = pick(probs, swa_selected, recent, triton)
        calls.append((probs.shape[-1], selected.tolist()))
        return selected, swa_row
    monkeypatch.setattr(ops, "capped_pick", noted)
    return calls


@pytest.mark.parametrize("budget, triton", [(None, False), (1.0, False), (1.02, False), (1.02, True)],
                         ids=["phase-1", "phase-2-tight", "phase-2", "phase-2-triton"])
def test_executor_picks_and_logits_equal_the_evaluators_on_a_tiny_model(tiny_hf_models, monkeypatch, budget, triton):
    """`triton`: the executor's kernels (the fused attention, the SWA update, the capped choice) under the
    interpreter."""
    folder = tiny_hf_models["llama-gqa"][1]
    gpu_gb = None if budget is None else budget * tight_cap(folder, K4, gen_len=16)
    calls = picks_recorder(monkeypatch)
    plan, measured = run(folder, K4, gpu_gb, keep_logits=True, triton=triton, gen_len=16)
    layers = plan.workload.model.num_layers
    phases = {row.phase for row in measured.rows()[1:]}
    assert phases == ({1} if budget is None else {2})
    fetched = sum(row.counters.get("fetched_tokens", 0) for row in measured.rows())
    assert (fetched > 0) == (budget is not None)

    wl = plan.workload
    model = load_model(wl.model, str(folder), torch.float32, CPU, SEED)
    tokens = torch.cat([prompt_of(wl), measured.tokens[:, :-1]], dim=1)
    keeps: list[dict] = []
    logits = decode_pass(model, tokens, recording(METHODS["k4-capped"], keeps, positions_per_head), [0.8] * len(tokens),
                         prefill=PROMPT_LEN)
    steps = list(range(PROMPT_LEN + 1, tokens.shape[1] + 1))
    timed = calls[-len(steps) * layers:]  # after the warm-up steps' calls
    for i, (n, picked) in enumerate(timed):
        layer = i % layers
        assert n == steps[i // layers]
        assert picked == keeps[layer][n], f"layer {layer}, step with {n} tokens"
    assert any(len(keeps[0][n][0][0]) < n for n in steps), "tokens were left out"
    for step, got in enumerate(plan.policy.logits_log):
        assert torch.allclose(got, logits[:, PROMPT_LEN - 1 + step], atol=1e-4, rtol=1e-4), f"step {step}"


@pytest.mark.parametrize("field, value", [("recompute", True), ("attention_kernel", "gather"), ("kv_sparsity", 0.0),
                                          ("selection", "per_head")])
def test_k4_capped_refuses_what_it_does_not_build(tiny_hf_models, field, value):
    with pytest.raises(SpecError, match=f"selector k4-capped needs .*{field}"):
        run(tiny_hf_models["llama-gqa"][1], {**K4, field: value})

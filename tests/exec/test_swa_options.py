"""The executor's SWA under each budget option picks what the accuracy evaluator's method of the same option picks,
step by step: on the same attention rows (the kernels' `LocalAttentionSum`, its PyTorch and Triton paths, against
`swa`, `swa-inside`, `swa-literal` and `swa-self` of `alisa_exec.accuracy.methods`), from the first token (n = 1,
n = 2, k = 1, the budget equal to n) and after a prefill that seeds both; and on a tiny random model, the executor's
`alisa` run against the evaluator's step-by-step decode of the same tokens (every layer's picks, and the logits).
"""

import dataclasses

import pytest
import torch

from alisa_exec.accuracy.forward import decode_pass
from alisa_exec.accuracy.methods import METHODS
from alisa_exec.kernels import LocalAttentionSum, gather_decode_attention, prefill_window_rows
from alisa_exec.weights import load_model
from alisa_sim.swa import kv_budget
from test_exec_policies import PROMPT_LEN, SEED, prompt_of, run

CPU = torch.device("cpu")
# evaluator method -> the executor's options (swa_current, swa_self_weight)
OPTIONS = {"swa": ("extra", False), "swa-inside": ("inside", False), "swa-literal": ("inside", True),
           "swa-self": ("extra", True)}


def positions_of(mask: torch.Tensor) -> list[list[int]]:
    """Kept positions per sequence of a keep mask [batch, 1, n]."""
    return [row.nonzero().flatten().tolist() for row in mask[:, 0]]


def positions_per_head(mask: torch.Tensor) -> list[list[list[int]]]:
    """Kept positions per sequence and KV head of a keep mask [batch, kv_heads, n]."""
    return [[row.nonzero().flatten().tolist() for row in heads] for heads in mask]


@pytest.mark.parametrize("prefill", [0, 7], ids=["from-token-0", "prefill-7"])
@pytest.mark.parametrize("triton", [False, True], ids=["torch", "triton"])
@pytest.mark.parametrize("method", list(OPTIONS))
def test_executor_selection_equals_the_evaluators_on_the_same_rows(method, triton, prefill):
    """Random queries and keys: the executor attends what it selected and pushes the head-summed probabilities
    (as the attention kernels return them: their PyTorch form here, `triton` is the selection's path); the evaluator sees the same probabilities. The prefill's rows
    seed both (the executor only the last k + 1 of them, as it keeps)."""
    batch, heads, kv_heads, head_dim, steps, sparsity = 2, 4, 2, 8, 36, 0.8
    generator = torch.Generator().manual_seed(21)
    q = torch.randn(batch, heads, steps, head_dim, generator=generator) * 2
    k, v = torch.randn(2, batch, kv_heads, steps, head_dim, generator=generator) * 2
    current, self_weight = OPTIONS[method]
    executor = LocalAttentionSum(batch, steps, sparsity, CPU, prompt_len=prefill, triton=triton, current=current,
                                 self_weight=self_weight)
    evaluator = METHODS[method].make_selector([sparsity] * batch, kv_heads, steps, CPU)
    if prefill:
        rows = prefill_window_rows(q[:, :, :prefill], k[:, :, :prefill], num_rows=prefill)  # [batch, P, P]
        evaluator.prefill_rows(0, rows[:, None, None])
        executor.seed(rows[:, -executor.capacity:])
    for num_tokens in range(prefill + 1, steps + 1):
        picked = executor.select(num_tokens)
        assert picked.tolist() == positions_of(evaluator.keep(num_tokens)), f"{method}: step {num_tokens}"
        assert picked.shape[1] == kv_budget(num_tokens, sparsity, current)
        _, probs = gather_decode_attention(q[:, :, num_tokens - 1], k, v, picked)
        executor.push(picked, probs)
        full = torch.zeros(batch, num_tokens).scatter_(1, picked.long(), probs)
        evaluator.observe(full[:, None, None])


def recording(method, picks: list[dict], positions=positions_of):
    """`method` whose selectors note what each step keeps: picks[layer][n] = positions(mask), per sequence (and
    head, with `positions_per_head`)."""
    def make_selector(*args):
        selector = method.make_selector(*args)
        layer, keep = len(picks), selector.keep
        picks.append({})

        def noted(num_tokens):
            mask = keep(num_tokens)
            picks[layer][num_tokens] = positions(mask)
            return mask
        selector.keep = noted
        return selector
    return dataclasses.replace(method, make_selector=make_selector)


@pytest.mark.parametrize("method", ["swa", "swa-inside", "swa-literal"])
def test_executor_picks_equal_the_evaluators_on_a_tiny_model(tiny_hf_models, monkeypatch, method):
    """The executor's `alisa` with the method's options on the tiny GQA LLaMA (float32, 80%: k = 1 to 3, so the
    options differ), then the evaluator decodes the same prompt and generated tokens after a dense prefill of the
    prompt: every layer picks the same positions at every step, and the logits agree."""
    folder = tiny_hf_models["llama-gqa"][1]
    current, self_weight = OPTIONS[method]
    executor_picks: dict[tuple[int, int], list[list[int]]] = {}
    select = LocalAttentionSum.select

    def noted(state, num_tokens):
        picked = select(state, num_tokens)
        executor_picks[id(state), num_tokens] = picked.tolist()
        return picked
    monkeypatch.setattr(LocalAttentionSum, "select", noted)
    policy = {"name": "alisa", "kv_sparsity": 0.8, "int8": False, "swa_current": current,
              "swa_self_weight": self_weight}
    plan, measured = run(folder, policy, keep_logits=True, gen_len=16)
    layers = [id(state) for state in plan.policy.selection]

    wl = plan.workload
    model = load_model(wl.model, str(folder), torch.float32, CPU, SEED)
    tokens = torch.cat([prompt_of(wl), measured.tokens[:, :-1]], dim=1)
    evaluator_picks: list[dict] = []
    logits = decode_pass(model, tokens, recording(METHODS[method], evaluator_picks), [0.8] * len(tokens),
                         prefill=PROMPT_LEN)
    steps = range(PROMPT_LEN + 1, tokens.shape[1] + 1)
    for layer, state in enumerate(layers):
        for num_tokens in steps:
            assert executor_picks[state, num_tokens] == evaluator_picks[layer][num_tokens], \
                f"{method}: layer {layer}, step with {num_tokens} tokens"
    assert any(len(evaluator_picks[0][n][0]) < n for n in steps), "tokens were left out"
    for step, got in enumerate(plan.policy.logits_log):
        assert torch.allclose(got, logits[:, PROMPT_LEN - 1 + step], atol=1e-4, rtol=1e-4), f"step {step}"

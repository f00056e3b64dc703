"""SWA selection: the incremental window sum against a sum from scratch, and the picks against a stable sort."""

import pytest
import torch

from alisa_exec.kernels import (LocalAttentionSum, dense_decode_attention, prefill_window_rows, select_reference,
                                sparse_decode_attention, swa_window)
from alisa_exec.kernels.selection import window_sum_reference


def test_window_size():
    assert swa_window(1, 0.8) == 1  # never 0
    assert swa_window(100, 0.8) == 10
    assert swa_window(15, 0.8) == 2  # 1.5 rounds up despite 1 - 0.8 = 0.19999999999999996
    assert swa_window(25, 0.9) == 1  # 1.25
    assert all(2 * swa_window(n, 0.0) >= n for n in range(1, 50))  # r = 1 keeps every token


def run_decode(device, generator, batch, kv_sparsity, prompt_len, max_seq_len, tie_heavy, triton=None):
    """Seed from a prompt, then decode: select, check against the references, push a random row; every step."""
    selector = LocalAttentionSum(batch, max_seq_len, kv_sparsity, device, prompt_len=prompt_len, triton=triton)
    seed = torch.rand(batch, 3, prompt_len, generator=generator)
    selector.seed(seed.to(device))
    positions = torch.arange(prompt_len).expand(batch, prompt_len)
    history = [(positions, seed[:, row]) for row in range(3)]
    for num_tokens in range(prompt_len + 1, max_seq_len + 1):
        k = swa_window(num_tokens, kv_sparsity)
        picked = selector.select(num_tokens).cpu()
        expected_scores = window_sum_reference(history[-k:], batch, max_seq_len)
        assert torch.equal(selector.scores.cpu(), expected_scores), num_tokens
        assert torch.equal(picked, select_reference(expected_scores, num_tokens, k)), num_tokens
        assert picked.shape == (batch, min(num_tokens, 2 * k))
        probs = torch.rand(picked.shape, generator=generator)
        if tie_heavy:  # a few exact levels: many exactly tied sums
            probs = (probs * 4).floor() / 4
        selector.push(picked.to(device), probs.to(device))
        history.append((picked, probs))


@pytest.mark.parametrize("batch, kv_sparsity, tie_heavy", [(1, 0.5, False), (3, 0.8, True), (2, 0.0, False)])
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
def test_incremental_sum_and_selection_match_from_scratch(device, generator, batch, kv_sparsity, tie_heavy, triton):
    """Growing k (the window gains a row) and steady k (a row leaves), n < 2k early on, k = 1, ties, b = 1; the
    Triton update (under the interpreter off the GPU) and its PyTorch form give the same sums bit for bit."""
    run_decode(device, generator, batch, kv_sparsity, prompt_len=6, max_seq_len=48, tie_heavy=tie_heavy,
               triton=triton)


def test_selection_rules_on_a_hand_made_history(device):
    """r = 0.5, so k = 2, 3, 3, 3, 3 at n = 9 .. 13: no history picks the first tokens, ties go to the older
    position, and a row leaving the window takes its weight along."""
    selector = LocalAttentionSum(1, 16, 0.5, device)

    def step(num_tokens, positions, probs):
        picked = selector.select(num_tokens).tolist()[0]
        selector.push(torch.tensor([positions], device=device), torch.tensor([probs], device=device))
        return picked

    assert step(9, [0, 1, 7, 8], [0.0, 0.5, 0.0, 0.0]) == [0, 1, 7, 8]  # all sums 0: the oldest two
    assert step(10, [0, 1, 2, 7, 8, 9], [0, 0, 1.0, 0, 0, 0]) == [0, 1, 2, 7, 8, 9]  # 1 (0.5), then 0 and 2 tie
    assert step(11, [0, 1, 2, 8, 9, 10], [0.0] * 6) == [0, 1, 2, 8, 9, 10]  # 2 (1.0), 1 (0.5), 0
    assert step(12, [3, 4, 5, 9, 10, 11], [0.25, 0.25, 0, 0, 0, 0]) == [0, 1, 2, 9, 10, 11]
    # n = 13: the first row (1: 0.5) left the window; 2 (1.0), then 3 and 4 (0.25) beat 0 and 1 (0)
    assert selector.select(13).tolist() == [[2, 3, 4, 10, 11, 12]]


def test_small_n_selects_everything(device):
    """n < 2k: every token; n = 1: k = 1 and the one token."""
    selector = LocalAttentionSum(2, 8, 0.0, device)
    assert selector.select(1).tolist() == [[0], [0]]
    assert selector.select(5).tolist() == [list(range(5))] * 2


def test_ring_overflow_is_refused(device):
    selector = LocalAttentionSum(1, 16, 0.5, device)  # window up to 4 rows, ring of 5
    row = torch.zeros(1, 4, dtype=torch.int32, device=device), torch.zeros(1, 4, device=device)
    for _ in range(5):
        selector.push(*row)
    with pytest.raises(RuntimeError, match="select"):
        selector.push(*row)


def test_prefill_rows_are_the_prompts_causal_attention(generator):
    """Row i of the seed is the head-summed attention of prompt query s - m + i over positions 0 .. s - m + i."""
    q = torch.randn(2, 8, 7, 16, generator=generator)
    k = torch.randn(2, 2, 7, 16, generator=generator)
    rows = prefill_window_rows(q, k, num_rows=3)
    per_head = prefill_window_rows(q, k, num_rows=3, per_head=True)
    for i, query in enumerate(range(4, 7)):
        _, probs = dense_decode_attention(q[:, :, query], k[:, :, :query + 1], k[:, :, :query + 1])
        torch.testing.assert_close(rows[:, i, :query + 1], probs)
        assert torch.all(rows[:, i, query + 1:] == 0)
    torch.testing.assert_close(per_head.sum(dim=1), rows)


def test_decode_loop_with_the_attention_kernel(device, generator):
    """select -> attend -> push over a random cache, seeded from the prefill: the window sum stays the sum of the
    kernel's own rows, and each selection is sorted, distinct and ends with the k recent positions."""
    batch, heads, kv_heads, head_dim, prompt_len, max_seq_len, kv_sparsity = 2, 4, 2, 16, 12, 28, 0.5
    q = torch.randn(batch, heads, max_seq_len, head_dim, generator=generator).to(device, torch.float16)
    k, v = torch.randn(2, batch, kv_heads, max_seq_len, head_dim, generator=generator).to(device, torch.float16)
    selector = LocalAttentionSum(batch, max_seq_len, kv_sparsity, device, prompt_len=prompt_len)
    seed = prefill_window_rows(q[:, :, :prompt_len], k[:, :, :prompt_len],
                               num_rows=swa_window(prompt_len + 1, kv_sparsity))
    selector.seed(seed)
    prompt_positions = torch.arange(prompt_len).expand(batch, prompt_len)
    history = [(prompt_positions, seed[:, row].cpu()) for row in range(seed.shape[1])]
    for num_tokens in range(prompt_len + 1, max_seq_len + 1):
        window = swa_window(num_tokens, kv_sparsity)
        picked = selector.select(num_tokens)
        assert torch.equal(selector.scores.cpu(), window_sum_reference(history[-window:], batch, max_seq_len))
        assert torch.all(picked[:, 1:] > picked[:, :-1])
        assert picked[:, -window:].tolist() == [list(range(num_tokens - window, num_tokens))] * batch
        _, probs = sparse_decode_attention(q[:, :, num_tokens - 1], k, v, picked)
        selector.push(picked, probs)
        history.append((picked.cpu(), probs.cpu()))

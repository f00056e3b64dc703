"""SWA selection: the incremental window sum against a sum from scratch, and the picks against a stable sort, with
the current token on top of 2k ("extra") or inside it, a row's own token credited or not."""

import pytest
import torch

from alisa_exec.kernels import (LocalAttentionSum, dense_decode_attention, prefill_window_rows, select_reference,
                                sparse_decode_attention, swa_window)
from alisa_exec.kernels.selection import window_sum_reference
from alisa_sim.swa import SWA_CURRENT_OPTIONS, kv_budget, swa_recent

OPTIONS = [pytest.param(current, self_weight, id=f"{current}-{'self' if self_weight else 'noself'}")
           for current in SWA_CURRENT_OPTIONS for self_weight in (False, True)]


def credited(positions: torch.Tensor, probs: torch.Tensor, own: int, self_weight: bool = False):
    """A row as the sums count it: without `self_weight`, its own token's probability (column `own`) dropped."""
    if self_weight:
        return positions, probs
    probs = probs.clone()
    probs[:, own] = 0
    return positions, probs


def test_window_size():
    assert swa_window(1, 0.8) == 1  # never 0
    assert swa_window(100, 0.8) == 10
    assert swa_window(15, 0.8) == 2  # 1.5 rounds up despite 1 - 0.8 = 0.19999999999999996
    assert swa_window(25, 0.9) == 1  # 1.25
    assert all(2 * swa_window(n, 0.0) >= n for n in range(1, 50))  # r = 1 keeps every token


def run_decode(device, generator, batch, kv_sparsity, prompt_len, max_seq_len, tie_heavy, triton=None,
               current="extra", self_weight=False):
    """Seed from a prompt, then decode: select, check against the references, push a random row; every step."""
    selector = LocalAttentionSum(batch, max_seq_len, kv_sparsity, device, prompt_len=prompt_len, triton=triton,
                                 current=current, self_weight=self_weight)
    seed = torch.rand(batch, 3, prompt_len, generator=generator)
    selector.seed(seed.to(device))
    positions = torch.arange(prompt_len).expand(batch, prompt_len)
    history = [credited(positions, seed[:, row], prompt_len - 3 + row, self_weight) for row in range(3)]
    for num_tokens in range(prompt_len + 1, max_seq_len + 1):
        k = swa_window(num_tokens, kv_sparsity)
        picked = selector.select(num_tokens).cpu()
        expected_scores = window_sum_reference(history[-k:], batch, max_seq_len)
        assert torch.equal(selector.scores.cpu(), expected_scores), num_tokens
        assert torch.equal(picked, select_reference(expected_scores, num_tokens, kv_sparsity, current)), num_tokens
        assert picked.shape == (batch, kv_budget(num_tokens, kv_sparsity, current))
        recent = swa_recent(num_tokens, kv_sparsity, current)
        assert picked[:, -recent:].tolist() == [list(range(num_tokens - recent, num_tokens))] * batch
        probs = torch.rand(picked.shape, generator=generator)
        if tie_heavy:  # a few exact levels: many exactly tied sums
            probs = (probs * 4).floor() / 4
        selector.push(picked.to(device), probs.to(device))
        history.append(credited(picked, probs, -1, self_weight))


@pytest.mark.parametrize("current, self_weight", OPTIONS)
@pytest.mark.parametrize("batch, kv_sparsity, tie_heavy", [(1, 0.5, False), (3, 0.8, True), (2, 0.0, False)])
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
def test_incremental_sum_and_selection_match_from_scratch(device, generator, batch, kv_sparsity, tie_heavy, triton,
                                                          current, self_weight):
    """Growing k (the window gains a row) and steady k (a row leaves), n below the budget early on, k = 1, ties,
    b = 1; the Triton update (under the interpreter off the GPU) and its PyTorch form give the same sums bit for
    bit, under every option."""
    run_decode(device, generator, batch, kv_sparsity, prompt_len=6, max_seq_len=48, tie_heavy=tie_heavy,
               triton=triton, current=current, self_weight=self_weight)


@pytest.mark.parametrize("current", SWA_CURRENT_OPTIONS)
@pytest.mark.parametrize("triton", [True, False], ids=["triton", "torch"])
def test_edge_sizes_from_the_first_token(device, generator, current, triton):
    """No prompt: n = 1 (one token), n = 2, the budget equal to n, k = 1 (80% up to n = 12); the Triton pick and
    the stable sort agree with the reference at every n, for two sequences."""
    max_seq_len, kv_sparsity = 24, 0.8
    selector = LocalAttentionSum(2, max_seq_len, kv_sparsity, device, triton=triton, current=current)
    history = []
    for num_tokens in range(1, max_seq_len + 1):
        k = swa_window(num_tokens, kv_sparsity)
        picked = selector.select(num_tokens).cpu()
        want = select_reference(window_sum_reference(history[-k:], 2, max_seq_len), num_tokens, kv_sparsity, current)
        assert torch.equal(picked, want), num_tokens
        assert picked.shape[1] == kv_budget(num_tokens, kv_sparsity, current)
        probs = torch.rand(picked.shape, generator=generator)
        selector.push(picked.to(device), probs.to(device))
        history.append(credited(picked, probs, -1))
    assert kv_budget(1, kv_sparsity, current) == 1 and kv_budget(2, kv_sparsity, current) == 2
    assert kv_budget(3, kv_sparsity, current) == (3 if current == "extra" else 2)  # k = 1: budget == n with extra


def test_selection_rules_on_a_hand_made_history(device):
    """The paper's literal reading (current token inside 2k, own rows credited). r = 0.5, so k = 2, 3, 3, 3, 3 at
    n = 9 .. 13: no history picks the first tokens, ties go to the older position, and a row leaving the window
    takes its weight along."""
    selector = LocalAttentionSum(1, 16, 0.5, device, current="inside", self_weight=True)

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


@pytest.mark.parametrize("current, self_weight", OPTIONS)
def test_decode_loop_with_the_attention_kernel(device, generator, current, self_weight):
    """select -> attend -> push over a random cache, seeded from the prefill: the window sum stays the sum of the
    kernel's own rows (less each row's own token unless `self_weight`), and each selection is sorted, distinct,
    of the option's budget and ends with the option's recent window."""
    batch, heads, kv_heads, head_dim, prompt_len, max_seq_len, kv_sparsity = 2, 4, 2, 16, 12, 28, 0.5
    q = torch.randn(batch, heads, max_seq_len, head_dim, generator=generator).to(device, torch.float16)
    k, v = torch.randn(2, batch, kv_heads, max_seq_len, head_dim, generator=generator).to(device, torch.float16)
    selector = LocalAttentionSum(batch, max_seq_len, kv_sparsity, device, prompt_len=prompt_len, current=current,
                                 self_weight=self_weight)
    seed = prefill_window_rows(q[:, :, :prompt_len], k[:, :, :prompt_len],
                               num_rows=swa_window(prompt_len + 1, kv_sparsity))
    selector.seed(seed)
    prompt_positions = torch.arange(prompt_len).expand(batch, prompt_len)
    rows = seed.shape[1]
    history = [credited(prompt_positions, seed[:, row].cpu(), prompt_len - rows + row, self_weight)
               for row in range(rows)]
    for num_tokens in range(prompt_len + 1, max_seq_len + 1):
        window = swa_window(num_tokens, kv_sparsity)
        picked = selector.select(num_tokens)
        assert torch.equal(selector.scores.cpu(), window_sum_reference(history[-window:], batch, max_seq_len))
        assert torch.all(picked[:, 1:] > picked[:, :-1])
        assert picked.shape[1] == kv_budget(num_tokens, kv_sparsity, current)
        recent = swa_recent(num_tokens, kv_sparsity, current)
        assert picked[:, -recent:].tolist() == [list(range(num_tokens - recent, num_tokens))] * batch
        _, probs = sparse_decode_attention(q[:, :, num_tokens - 1], k, v, picked)
        selector.push(picked, probs)
        history.append(credited(picked.cpu(), probs.cpu(), -1, self_weight))


def test_own_row_weight_matters_only_with_the_current_token_inside(device):
    """The same rows into two sums, one crediting each row's own token and one not: with "extra" every pick agrees
    (a row's own token is among the k + 1 newest of each later step whose window holds it), with "inside" the
    picks part somewhere (from the first token at 80%, k = 1 early: the previous token is a candidate)."""
    generator = torch.Generator().manual_seed(5)
    max_seq_len, kv_sparsity = 40, 0.8
    for current in SWA_CURRENT_OPTIONS:
        sums = [LocalAttentionSum(1, max_seq_len, kv_sparsity, device, current=current, self_weight=credit)
                for credit in (False, True)]
        differ = False
        for num_tokens in range(1, max_seq_len + 1):
            picks = [state.select(num_tokens) for state in sums]
            differ |= not torch.equal(*picks)
            # one row for both, its own token weighted heavily, so crediting it would matter
            positions = picks[0]
            probs = torch.rand(positions.shape, generator=generator)
            probs[:, -1] += 2.0
            for state in sums:
                state.push(positions, probs.to(device))
            if differ and current == "inside":
                break
        assert differ == (current == "inside"), current

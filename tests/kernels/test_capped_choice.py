"""The capped-choice kernel against its PyTorch reference on fresh random keys and caps: edge sizes (one token, a
row shorter than a block, rows that are not a multiple of the block), no picks at all, sequences whose SWA picks run
out at different counts, and ties in the attention scores (the keys' tie break to the older token decides)."""

import pytest
import torch

from alisa_exec.kernels.capped_choice import capped_choice_reference, capped_choice_triton
from alisa_exec.key_copy import capped_choice


def random_case(batch: int, kv_heads: int, n: int, recent: int, picks: list[int], generator, tied: bool):
    """Scores [batch, kv_heads, n] (few distinct values when `tied`), the recent window and SWA's older picks."""
    high = 3 if tied else 2**40
    scores = torch.randint(0, high, (batch, kv_heads, n), generator=generator)
    positions = torch.arange(n)
    recent_mask = (positions >= n - recent).expand(batch, 1, n)
    swa = torch.zeros(batch, 1, n, dtype=torch.bool)
    for sequence, count in enumerate(picks):
        older = torch.randperm(n - recent, generator=generator)[:count]
        swa[sequence, 0, older] = True
    return scores, recent_mask, swa


@pytest.mark.parametrize("n, recent, picks, block", [
    (1, 1, [0, 0], 128),        # one token, the current one: nothing to pick
    (7, 3, [2, 4], 4),          # two blocks, the last partial
    (37, 4, [9, 0], 16),        # one sequence picks nothing
    (130, 13, [13, 5], 128),    # one more than a block, picks running out at different counts
    (64, 8, [8, 8], 64),        # exactly one block
])
@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied"])
def test_kernel_equals_the_reference(n, recent, picks, block, tied):
    generator = torch.Generator().manual_seed(n * 31 + block + tied)
    scores, recent_mask, swa = random_case(len(picks), 3, n, recent, picks, generator, tied)
    reference = capped_choice(scores, recent_mask, swa)
    assert torch.equal(capped_choice(scores, recent_mask, swa, triton=True), reference)
    # every head keeps the recent window and as many older tokens as SWA has, none older than SWA's i-th oldest
    counts = reference.sum(dim=-1)
    assert torch.equal(counts, (recent + torch.tensor(picks))[:, None].expand_as(counts))
    for sequence in range(len(picks)):
        swa_older = swa[sequence, 0].nonzero().flatten()
        for head in range(3):
            kept = (reference[sequence, head] & ~recent_mask[sequence, 0]).nonzero().flatten()
            assert (kept >= swa_older).all()


def test_kernel_equals_the_reference_on_raw_keys_and_bounds():
    """The kernel's own contract: keys with non-candidates at -1, bounds newest first padded with -1."""
    generator = torch.Generator().manual_seed(3)
    keys = torch.randperm(50, generator=generator).expand(2, 2, 50).clone()
    keys[..., 45:] = -1
    bounds = torch.tensor([[40, 30, 2, -1], [44, 43, 42, 41]])
    assert torch.equal(capped_choice_triton(keys.clone(), bounds, block=16), capped_choice_reference(keys, bounds))

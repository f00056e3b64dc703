"""`k4-capped`'s parts, one source for the accuracy evaluator and the executor: the 4-bit copy of the keys, a step's
attention over it, the age-capped choice, and the row the SWA alongside sums.

The copy: per token and KV head, 16 levels between the token's channel minimum and maximum (asymmetric min-max over
its d channels), two levels a byte, with the scale and the minimum in the model's dtype: d / 2 + 2 e bytes a token,
KV head and layer, kept on the GPU for every cached token (also those whose K/V lives on the CPU or was deleted).
`int4_keys` is what reading it back gives, bit for bit what `KeyCopy.keys` decodes.

The choice (`capped_choice`): per KV head, the recent window and as many older tokens as SWA's set has, those of
largest attention over the copy (summed over the KV head's query group, fixed point, ties to the older) such that
for every position p no more of them lie at or before p than SWA's own older picks do. Nested caps are a matroid, so
the greedy is optimal: SWA's older picks taken newest first, each admitting the best remaining older token no older
than itself (one always remains: fewer picks are made than SWA has at or after it); `alisa_exec.kernels.
capped_choice` runs it, in PyTorch or in one Triton launch. A head's i-th oldest pick is
then never older than SWA's i-th oldest, so under a placement that keeps the newest tokens on the GPU it fetches no
more rows per KV head than that SWA does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alisa_exec.kernels.capped_choice import capped_choice_reference, capped_choice_triton
from alisa_exec.kernels.selection import to_fixed_point

INT4_LEVELS = 16


def int4_encode(k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Keys [..., d] as levels (uint8, 0..15), and each token's scale and minimum [..., 1] in k's dtype."""
    low, high = k.amin(dim=-1, keepdim=True), k.amax(dim=-1, keepdim=True)
    scale = ((high - low) / (INT4_LEVELS - 1)).clamp(min=torch.finfo(k.dtype).tiny)
    return ((k - low) / scale).round().clamp(0, INT4_LEVELS - 1).to(torch.uint8), scale, low


def int4_decode(levels: Tensor, scale: Tensor, low: Tensor) -> Tensor:
    return levels.to(scale.dtype) * scale + low


def int4_keys(k: Tensor) -> Tensor:
    """Keys [..., tokens, d] as the 4-bit copy reads them back."""
    return int4_decode(*int4_encode(k))


def copy_probabilities(first: int, q: Tensor, keys: Tensor) -> Tensor:
    """Attention probabilities [batch, kv_heads, group_size, rows, width] of rows first, first + 1, ... (queries
    [batch, kv_heads, group_size, rows, d]) over decoded copy keys [batch, kv_heads, >= width, d], width = first +
    rows; in q's dtype."""
    width = first + q.shape[3]
    scores = (q @ keys[:, :, None, :width].transpose(-1, -2)) * q.shape[-1] ** -0.5
    future = torch.arange(width, device=q.device) > torch.arange(first, width, device=q.device)[:, None]
    return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


def capped_choice(scores: Tensor, recent: Tensor, swa_older: Tensor, triton: bool = False,
                  most: int | None = None) -> Tensor:
    """Which of the n tokens each KV head attends, [batch, kv_heads, n] bool, from the copy's attention of the step
    summed over each query group in fixed point (scores [batch, kv_heads, n], int64), the recent window [batch, 1, n]
    and SWA's older picks [batch, 1, n] (both bool); the greedy in one Triton launch with `triton`. `most`: the most
    older picks any sequence has, when the caller knows it (else read off `swa_older`, a sync on a GPU)."""
    n = scores.shape[-1]
    positions = torch.arange(n, device=scores.device)
    caps = swa_older[:, 0]
    most = int(caps.sum(dim=-1).max()) if most is None else most
    bounds = torch.where(caps, positions, -1).topk(most, dim=-1).values  # newest first, -1 once a sequence runs out
    keys = torch.where(recent, -1, scores * n + (n - 1 - positions))  # distinct; ties to the older
    chosen = capped_choice_triton(keys, bounds) if triton else capped_choice_reference(keys, bounds)
    return chosen | recent


def swa_own_row(probs: Tensor, swa_set: Tensor) -> Tensor:
    """The row the SWA alongside sums: the copy's probabilities of a step [batch, kv_heads, group_size, n] over SWA's
    own set [batch, 1, n] (bool), renormalized per query head, as SWA sums its own set's attention."""
    own = probs * swa_set[:, :, None]
    return own / own.sum(dim=-1, keepdim=True)


class KeyCopy:
    """One layer's 4-bit copy of the keys of every position, [slots, batch, kv_heads, d / 2] packed levels and
    [slots, batch, kv_heads, 2] scale and minimum, in a tier of `Tiers`."""

    def __init__(self, tiers, tier: str, slots: int, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
        if head_dim % 2:
            raise ValueError(f"a 4-bit copy packs two levels a byte: head_dim {head_dim} is odd")
        self.levels = tiers.empty(tier, "key_copy", (slots, batch, kv_heads, head_dim // 2), torch.uint8)
        self.params = tiers.empty(tier, "key_copy", (slots, batch, kv_heads, 2), dtype)

    def store(self, first: int, k: Tensor) -> None:
        """Keys k [batch, kv_heads, n, d] of positions first.. into the copy."""
        levels, scale, low = int4_encode(k.permute(2, 0, 1, 3))
        self.levels[first:first + len(levels)] = levels[..., 0::2] | (levels[..., 1::2] << 4)
        self.params[first:first + len(levels)] = torch.cat((scale, low), dim=-1)

    def keys(self, n: int) -> Tensor:
        """The copy of positions 0..n-1 read back, [batch, kv_heads, n, d] in the model's dtype."""
        packed = self.levels[:n]
        levels = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
        params = self.params[:n]
        return int4_decode(levels, params[..., :1], params[..., 1:]).permute(1, 2, 0, 3)


def fixed_point_scores(probs: Tensor) -> Tensor:
    """Probabilities [batch, kv_heads, group_size, ..., n] summed over each query group, in fixed point."""
    return to_fixed_point(probs.sum(dim=2))

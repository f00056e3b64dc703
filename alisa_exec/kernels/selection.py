"""SWA token selection: the local attention sum over the last k decode steps, then the recent + top older tokens.

Definition (the house plan). At a decode step with n cached tokens (the current one included) and keep ratio
r = 1 - kv_sparsity, `k = max(1, round(n * r / 2))`; the step attends to the most recent tokens and to k older
tokens with the largest attention weight, summed over heads, over the last k decode steps (or as many steps as
exist): `alisa_sim.swa.kv_budget(n, s, current)` positions, of which `swa_recent(n, s, current)` are the newest.
With `current="extra"` (the default) the current token comes on top of k recent and k older ones (min(n, 2k + 1));
with "inside" it is one of the k recent ones (min(n, 2k), the paper's literal |I| = 2k). When n is below the
budget every token is selected. `round` is half-up, so r = 1 keeps every token at odd n too. With
`self_weight=False` (the default) a step's row does not credit its own token: its probability is zeroed when the
row is pushed (the row's last position), and a prefill seed row's diagonal likewise; with "extra" that changes no
selection (each row's own token is among the k + 1 newest of every later step whose window holds the row).

`LocalAttentionSum` keeps that sum for one layer, incrementally: `push` stores a step's row (the positions the step
attended and their head-summed probabilities, as `sparse_decode_attention` returns them), and `select` adds the
rows pushed since the last selection and subtracts the rows that left the window in one Triton launch (atomic adds,
parallel over rows and blocks of a row), then picks. A row is kept in a ring of `max_window + 1` rows until it
leaves, because subtracting it needs it: (max_window + 1) rows of max(budget, prompt_len) entries (the longest
selection, or a prefill row, dense over the prompt) at 8 bytes each per sequence and layer, 2.7 MB for 4096 tokens
at 80% sparsity and a shorter prompt. The first decode step after a dense prefill is seeded with the prefill's last
attention rows (`seed`, `prefill_window_rows`).

The sum is fixed point (units of 2^-32) in int64, so adding and later subtracting a row cancel exactly and the
order of the atomic adds does not matter: the incremental sum equals a sum from scratch bit for bit, every run,
and ties are real ties. Ties go to the older position, so a step with no history (all sums zero) selects the
first tokens, like attention sinks.

Per-head selection (the ablation) is the same with (sequence, KV head) pairs as the batch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from alisa_exec.ledger import issued
from alisa_sim.swa import SWA_CURRENT_DEFAULT, kv_budget, swa_recent, swa_window

FIXED_POINT_ONE = 2.0 ** 32  # a probability of 1 in the int64 window sum


def prefill_window_rows(q: Tensor, k: Tensor, num_rows: int, sm_scale: float | None = None,
                        per_head: bool = False) -> Tensor:
    """Head-summed causal attention rows of the prompt's last `num_rows` queries, to seed `LocalAttentionSum`.

    q [batch, heads, s, d] and k [batch, kv_heads, s, d] as the prefill's attention sees them (after rotary
    embeddings). Returns [batch, num_rows, s] in fp32, or [batch, kv_heads, num_rows, s] with `per_head`.
    """
    batch, heads, seq, head_dim = q.shape
    kv_heads = k.shape[1]
    num_rows = min(num_rows, seq)
    issued("window_rows", b=batch, R=num_rows, L=seq, h=heads, kv=kv_heads, d=head_dim)
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    query_pos = torch.arange(seq - num_rows, seq, device=q.device)
    future = torch.arange(seq, device=q.device)[None, :] > query_pos[:, None]
    rows = torch.zeros(batch, kv_heads, num_rows, seq, dtype=torch.float32, device=q.device)
    for kv_head in range(kv_heads):  # one KV head's query group at a time keeps the score tensor small
        group = q[:, kv_head * (heads // kv_heads):(kv_head + 1) * (heads // kv_heads), -num_rows:].float()
        scores = (group @ k[:, kv_head, None].float().transpose(-1, -2)) * sm_scale
        rows[:, kv_head] = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1).sum(dim=1)
    return rows if per_head else rows.sum(dim=1)


# --- PyTorch references ------------------------------------------------------------------------------------------

def to_fixed_point(probs: Tensor) -> Tensor:
    """Probabilities as the int64 window sum counts them (scaling by 2^32 is exact; the conversion truncates)."""
    return (probs.float() * FIXED_POINT_ONE).to(torch.int64)


def window_sum_reference(rows: list[tuple[Tensor, Tensor]], batch: int, max_seq_len: int) -> Tensor:
    """From-scratch fixed-point sum of rows (positions [batch, w], probabilities [batch, w]; negative = padding)."""
    scores = torch.zeros(batch, max_seq_len, dtype=torch.int64)
    for positions, probs in rows:
        positions, probs = positions.cpu().long(), probs.cpu()
        valid = positions >= 0
        scores.scatter_add_(1, positions.clamp(min=0), torch.where(valid, to_fixed_point(probs), 0))
    return scores


def recent_and_take(num_tokens: int, kv_sparsity: float, current: str) -> tuple[int, int]:
    """(newest positions always selected, older positions picked by the sum) at a step with `num_tokens` cached."""
    recent = swa_recent(num_tokens, kv_sparsity, current)
    return recent, kv_budget(num_tokens, kv_sparsity, current) - recent


def select_reference(scores: Tensor, num_tokens: int, kv_sparsity: float, current: str = SWA_CURRENT_DEFAULT) -> Tensor:
    """The recent positions and the top older ones by `scores` (ties: older first), sorted, [batch, kv_budget]."""
    batch = scores.shape[0]
    recent, take = recent_and_take(num_tokens, kv_sparsity, current)
    older_count = num_tokens - recent
    ranked = torch.sort(scores[:, :older_count], dim=1, descending=True, stable=True).indices[:, :take]
    newest = torch.arange(older_count, num_tokens, device=scores.device).expand(batch, recent)
    return torch.cat([ranked.sort(dim=1).values, newest], dim=1).to(torch.int32)


# --- Triton: add the new rows and subtract the leaving ones ------------------------------------------------------

@triton.jit
def _update_window_kernel(scores_ptr, positions_ptr, probs_ptr, subtract_first, subtract_count, add_first,
                          capacity, width, scores_stride_b, ring_stride_b, ring_stride_row, BLOCK: tl.constexpr):
    """Program (sequence, i, block): one block of the i-th row to update, subtracted if i < subtract_count."""
    b = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1)
    subtract = i < subtract_count
    row = tl.where(subtract, subtract_first + i, add_first + i - subtract_count) % capacity
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    ring = b * ring_stride_b + row * ring_stride_row + cols
    positions = tl.load(positions_ptr + ring, mask=cols < width, other=-1)
    probs = tl.load(probs_ptr + ring, mask=cols < width, other=0.0)
    fixed = (probs * 4294967296.0).to(tl.int64)  # FIXED_POINT_ONE
    # Integer adds commute, so the rows' atomic updates give the same sum in any order.
    tl.atomic_add(scores_ptr + b * scores_stride_b + positions, tl.where(subtract, -fixed, fixed),
                  mask=positions >= 0, sem="relaxed")


class LocalAttentionSum:
    """One layer's SWA selection state for a batch decoding in lockstep (every sequence holds the same n)."""

    BLOCK = 256

    def __init__(self, batch: int, max_seq_len: int, kv_sparsity: float, device: torch.device | str,
                 prompt_len: int = 0, triton: bool | None = None, current: str = SWA_CURRENT_DEFAULT,
                 self_weight: bool = False):
        self.kv_sparsity, self.current, self.self_weight = kv_sparsity, current, self_weight
        # The Triton update on CUDA; off it the same fixed-point sums in PyTorch (integer adds: the same bits).
        self.triton = torch.device(device).type == "cuda" if triton is None else triton
        self.max_seq_len = max_seq_len
        self.max_window = swa_window(max_seq_len, kv_sparsity)
        # Between two selections the ring holds the window (at most max_window rows) plus the newest row.
        self.capacity = self.max_window + 1
        # the longest selection, or a prefill row (dense over the prompt)
        self.width = max(kv_budget(max_seq_len, kv_sparsity, current), prompt_len)
        self.scores = torch.zeros(batch, max_seq_len, dtype=torch.int64, device=device)
        self.ring_positions = torch.full((batch, self.capacity, self.width), -1, dtype=torch.int32, device=device)
        self.ring_probs = torch.zeros(batch, self.capacity, self.width, dtype=torch.float32, device=device)
        self.reset()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.scores, self.ring_positions, self.ring_probs))

    def reset(self) -> None:
        """Forget every row (a new run starts)."""
        self.scores.zero_()
        self.ring_positions.fill_(-1)
        self.ring_probs.zero_()
        self.rows_pushed = 0
        # Rows [summed_first, summed_end) of all rows ever pushed are in `scores`.
        self.summed_first = 0
        self.summed_end = 0

    def push(self, positions: Tensor, probs: Tensor) -> None:
        """Store one decode step's row: positions [batch, T] and their head-summed probabilities [batch, T], the
        step's own token last (as `select` returns them)."""
        self._push(positions, probs, own=positions.shape[1] - 1)

    def seed(self, prefill_rows: Tensor) -> None:
        """Store the prefill's last attention rows, [batch, m, s] (`prefill_window_rows`), oldest first: row i is
        the query at position s - m + i."""
        batch, num_rows, seq = prefill_rows.shape
        positions = torch.arange(seq, dtype=torch.int32, device=prefill_rows.device).expand(batch, seq)
        for row in range(max(0, num_rows - self.capacity), num_rows):
            self._push(positions, prefill_rows[:, row], own=seq - num_rows + row)

    def _push(self, positions: Tensor, probs: Tensor, own: int) -> None:
        """Store a row whose own token is in column `own` (not credited unless `self_weight`)."""
        if self.rows_pushed - self.summed_first >= self.capacity:
            raise RuntimeError("the ring is full: call select() between pushes")
        width = positions.shape[1]
        if width > self.width:
            raise ValueError(f"a row of {width} tokens does not fit the ring's {self.width} (a prefill row needs "
                             f"prompt_len at construction)")
        slot = self.rows_pushed % self.capacity
        issued("local_sum", b=positions.shape[0], T=width)
        self.ring_positions[:, slot, :width] = positions
        self.ring_positions[:, slot, width:] = -1
        self.ring_probs[:, slot, :width] = probs
        if not self.self_weight:
            self.ring_probs[:, slot, own] = 0
        self.rows_pushed += 1

    def select(self, num_tokens: int) -> Tensor:
        """Positions to attend at a step with `num_tokens` cached tokens, sorted, int32 [batch, kv_budget(n, s,
        current)]."""
        if not 1 <= num_tokens <= self.max_seq_len:
            raise ValueError(f"{num_tokens} tokens: the cache holds 1 to {self.max_seq_len}")
        issued("topk", b=self.scores.shape[0], L=num_tokens)
        k = swa_window(num_tokens, self.kv_sparsity)
        window_first = max(0, self.rows_pushed - k)
        subtract = (self.summed_first, min(self.summed_end, window_first))
        add = (max(self.summed_end, window_first), self.rows_pushed)
        subtract_count, add_count = max(0, subtract[1] - subtract[0]), add[1] - add[0]
        if subtract_count + add_count and not self.triton:
            self._update_torch(range(*subtract), range(*add))
        elif subtract_count + add_count:
            grid = (self.scores.shape[0], subtract_count + add_count, triton.cdiv(self.width, self.BLOCK))
            _update_window_kernel[grid](
                self.scores, self.ring_positions, self.ring_probs, subtract[0], subtract_count, add[0],
                self.capacity, self.width, self.scores.stride(0), self.ring_positions.stride(0),
                self.ring_positions.stride(1), BLOCK=self.BLOCK)
        self.summed_first, self.summed_end = max(self.summed_first, window_first), self.rows_pushed
        # On the GPU a pick without host syncs; off it the stable sort, fewer and cheaper ops there, the same picks.
        if self.triton:
            return self._pick(num_tokens, *recent_and_take(num_tokens, self.kv_sparsity, self.current))
        return select_reference(self.scores, num_tokens, self.kv_sparsity, self.current)

    def _update_torch(self, subtract: range, add: range) -> None:
        """The update kernel's work in PyTorch: subtract and add ring rows in one scatter (fixed point, so the order
        does not matter)."""
        rows = list(subtract) + list(add)
        slots = torch.tensor([row % self.capacity for row in rows], device=self.scores.device)
        sign = torch.tensor([-1] * len(subtract) + [1] * len(add), device=self.scores.device)
        positions = self.ring_positions[:, slots].long()  # [batch, rows, width]
        fixed = to_fixed_point(self.ring_probs[:, slots]) * sign[None, :, None]
        self.scores.scatter_add_(1, positions.clamp(min=0).flatten(1), torch.where(positions >= 0, fixed, 0).flatten(1))

    def _pick(self, num_tokens: int, recent: int, take: int) -> Tensor:
        """The `recent` newest positions and the top `take` older ones by the window sum, ties to the older; no host
        sync."""
        batch = self.scores.shape[0]
        older_count = num_tokens - recent
        device = self.scores.device
        newest = torch.arange(older_count, num_tokens, dtype=torch.int32, device=device).expand(batch, recent)
        if take == 0:
            return newest.contiguous()
        candidates = self.scores[:, :older_count]
        kth = candidates.topk(take, dim=1).values[:, -1:]
        above = candidates > kth
        tied = candidates == kth
        # Everything above the k-th score, then as many of the tied as still fit, oldest first.
        chosen = above | (tied & (tied.cumsum(dim=1) <= take - above.sum(dim=1, keepdim=True)))
        slot = torch.where(chosen, chosen.cumsum(dim=1) - 1, take)  # unchosen land in a spare last column
        older = torch.empty(batch, take + 1, dtype=torch.int32, device=device)
        older.scatter_(1, slot, torch.arange(older_count, dtype=torch.int32, device=device).expand(batch, -1))
        return torch.cat([older[:, :take], newest], dim=1)

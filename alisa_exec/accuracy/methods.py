"""Which cached tokens each KV-sparsity method attends at each decode step: the selectors the accuracy evaluation
simulates, one layer at a time, for a batch of sequences decoding in lockstep.

All methods share one budget. At the step with n cached tokens (the current one included) and KV sparsity s,
`k = swa_window(n, s)` and a method attends `kv_budget(n, s, current)` tokens, always the current one among them:
min(n, 2k) when the current token counts inside the 2k ("inside", the paper's literal |I| = 2k), min(n, 2k + 1)
when it is attended on top ("extra", the default, see docs/accuracy.md):

- `dense`: every cached token (the budget does not apply).
- `swa`, `swa-int8`: the current token, the k most recent before it and the k older ones with the largest attention
  weight summed over all heads over the last k decode steps, where a step's own (current) token is not credited with
  its self-attention (one set per layer); `swa-int8` reads K and V through INT8.
- `swa-literal`: the paper's literal reading: the current token is one of the k recent ones (budget 2k) and each
  step's self-attention counts in the sums. `swa-inside` and `swa-self` switch one of the two details each.
- `swa-head`: `swa` with one set per KV head (weights summed over the head's query group).
- `hh-head`: beyond the paper, realisable: per KV head, the current and k recent tokens plus the k older ones with the
  largest attention summed over every step so far (H2O's score), chosen among all older tokens every step, so a
  token left out can come back (it stays in CPU memory); no more tokens than SWA per step and head.
- `quest-head`: beyond the paper, realisable: per KV head, the current and k recent tokens plus the older tokens
  of the pages (16 positions) whose upper bound on the step's attention score, from the page's per-channel key
  minimum and maximum (kept on the GPU, as Quest does), is largest; as many tokens as SWA.
- `k4-head`: beyond the paper, realisable: per KV head, the current and k recent tokens plus the older tokens of
  largest attention of the step itself over a 4-bit copy of every key (kept on the GPU); as many tokens as SWA.
- `k4-capped`: beyond the paper, realisable: `k4-head` with its picks held to SWA's ages (SWA run alongside on the
  4-bit copy: at no position p more picks at or before p than SWA's set has), so no more of them are on the CPU
  than SWA's under a newest-on-the-GPU placement.
- `oracle`: a diagnostic, not realisable: per step the budget's tokens of largest dense attention of that very step,
  summed over the layer's heads (the current token always among them).
- `h2o`: per KV head, the k most recent tokens and the heavy hitters by attention summed over every step since the
  token arrived, chosen only among the tokens the previous step kept: a token left out once is evicted for good,
  so the set grows by at most one token a step and is one short of the budget on a step where the budget grows
  by two.
- `streamingllm`: the first min(4, budget - 1) tokens (attention sinks) and the most recent ones.
- `local`: the `budget` most recent tokens.
- `strided`: the recent window and the rest of the budget older ones at a fixed stride counted back from the newest
  older token (the Sparse Transformer's strided pattern at this budget).

A prefill (the first P tokens of a window attended densely, as a prompt) seeds every selector with its attention
rows (`prefill_rows`), as the executor seeds its local sums.

Attention sums are kept in fixed point (the kernels' int64 units), so a sum that gains and loses a row returns
exactly to what it was and ties are real ties; ties go to the older token, as in the kernels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from alisa_exec.kernels.selection import to_fixed_point
from alisa_exec.key_copy import capped_choice, copy_probabilities, fixed_point_scores, int4_keys, swa_own_row
from alisa_sim.errors import SpecError
from alisa_sim.swa import SWA_CURRENT_DEFAULT, kv_budget, swa_recent, swa_window

STREAMING_SINKS = 4
PAGE_TOKENS = 16  # positions per page of the page-bound selector (Quest's default)
DEFAULT_CURRENT = SWA_CURRENT_DEFAULT  # every method but the "inside" SWA variants (docs/accuracy.md: why)
# Selection keys are fixed-point sums x window length: with at most 64 heads summed over at most 4096 rows, below
# 2^6 x 2^12 x 2^32 x 2^12 = 2^62, inside int64.
MAX_WINDOW = 4096


def budget(num_tokens: int, kv_sparsity: float, current: str = DEFAULT_CURRENT) -> int:
    """Tokens every sparse method attends at a step with `num_tokens` cached tokens."""
    return kv_budget(num_tokens, kv_sparsity, current)


def top_older(scores: Tensor, take: Tensor) -> Tensor:
    """Bool mask of the `take[...]` largest entries of each row of scores [..., m] (take broadcasts to
    scores.shape[:-1]; ties to the lower, older position). Integer entries below zero (float: -inf) are never among
    them as long as each row has `take` entries above them."""
    most = int(take.max())
    count = take.expand(scores.shape[:-1])[..., None]
    if not scores.is_floating_point():
        # Distinct keys, ties to the older (MAX_WINDOW keeps them inside int64).
        width = scores.shape[-1]
        keys = scores * width + torch.arange(width - 1, -1, -1, device=scores.device)
        return top_distinct(keys, count, most)
    if most == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    top = scores.topk(most, dim=-1).values
    kth = top.gather(-1, (count - 1).clamp(min=0))
    kth = torch.where(count > 0, kth, torch.finfo(scores.dtype).max)
    above = scores > kth
    tied = scores == kth
    return above | (tied & (tied.cumsum(dim=-1) <= count - above.sum(dim=-1, keepdim=True)))


def top_distinct(keys: Tensor, take: Tensor, most: int) -> Tensor:
    """Bool mask of the `take[...]` largest of each row of distinct integer keys [..., m] (take [..., 1], at most
    `most`). Negative keys are never among them as long as each row has `take` keys of zero or more."""
    if most == 0:
        return torch.zeros_like(keys, dtype=torch.bool)
    kth = keys.topk(most, dim=-1).values.gather(-1, (take - 1).clamp(min=0))
    return (keys >= kth) & (take > 0)


class Selector(ABC):
    """One layer's token selection for a batch of sequences decoding in lockstep, each at its own KV sparsity.
    `keep(n)` says what the step with n cached tokens attends, [batch, groups, n] bool (groups: 1 when one set serves
    every head, else one per KV head); `observe(probs)` gets that step's attention probabilities,
    [batch, kv_heads, group_size, n], zero off the kept tokens; `prefill_rows(first, probs)` gets densely attended
    rows first, first + 1, ... of a prefill, [batch, kv_heads, group_size, rows, n]."""

    static = False  # static: the choice depends on n only, not on attention, so a whole mask can be built at once
    dense_choice = False  # chooses from the step's own dense attention (the oracle): `choose` instead of `keep`
    query_choice = False  # chooses from the step's query and the cached keys: `choose_by_query` instead of `keep`
    reads_queries = False  # `keep` also needs the step's query: `see_queries` hands a block of rows' queries first
    seeded = False  # a prefill's attention rows seed it (`prefill_rows`); others ignore them

    def __init__(self, kv_sparsity: Sequence[float], kv_heads: int, max_tokens: int, device: torch.device,
                 current: str = DEFAULT_CURRENT):
        if max_tokens > MAX_WINDOW and not self.static:
            raise SpecError(f"windows of {max_tokens} tokens: at most {MAX_WINDOW} (the selection keys' int64 range)")
        self.kv_sparsity = list(kv_sparsity)
        self.batch, self.kv_heads, self.max_tokens, self.device = len(self.kv_sparsity), kv_heads, max_tokens, device
        self.current = current
        self.groups = 1
        self.token_positions = torch.arange(max_tokens, device=device)
        self.sequences = torch.arange(self.batch, device=device)

    def _per_step(self, what: Callable[[int, float], int]) -> Tensor:
        """what(n, sparsity) for every step and sequence, [max_tokens + 1, batch]."""
        return torch.tensor([[what(max(n, 1), s) for s in self.kv_sparsity] for n in range(self.max_tokens + 1)],
                            device=self.device)

    def _tables(self) -> None:
        """k, the recent window and the budget of every step and sequence, [max_tokens + 1, batch] each."""
        self.windows = self._per_step(swa_window)
        self.recents = self._per_step(lambda n, s: swa_recent(n, s, self.current))
        self.budgets = self._per_step(lambda n, s: kv_budget(n, s, self.current))

    def _recent(self, num_tokens: int) -> tuple[Tensor, Tensor]:
        """The recent-window size per sequence [batch], and which of the n positions are in it [batch, 1, n]."""
        recent = self.recents[num_tokens]
        return recent, (self.token_positions[:num_tokens] >= (num_tokens - recent)[:, None])[:, None]

    @abstractmethod
    def keep(self, num_tokens: int) -> Tensor:
        """The tokens the step with `num_tokens` cached tokens attends."""

    @abstractmethod
    def observe(self, probs: Tensor) -> None:
        """The attention probabilities of the step that just ran."""

    def prefill_rows(self, first: int, probs: Tensor) -> None:
        """Densely attended rows of a prefill; a selector that is not `seeded` ignores them."""


class StaticSelector(Selector):
    """A fixed pattern of positions, the same for every head (and every sequence at the same sparsity)."""

    static = True

    @abstractmethod
    def positions(self, num_tokens: int, kv_sparsity: float) -> Tensor:
        """The kept positions at a step with `num_tokens` cached tokens, ascending."""

    def keep(self, num_tokens: int) -> Tensor:
        mask = torch.zeros(self.batch, 1, num_tokens, dtype=torch.bool, device=self.device)
        for sequence, sparsity in enumerate(self.kv_sparsity):
            mask[sequence, 0, self.positions(num_tokens, sparsity).to(self.device)] = True
        return mask

    def mask(self, seq_len: int, prefill: int = 0) -> Tensor:
        """[batch, 1, seq_len, seq_len] bool: row i is what the step with i + 1 cached tokens keeps (rows before
        `prefill`: every earlier token)."""
        by_sparsity = {}
        for sparsity in dict.fromkeys(self.kv_sparsity):
            rows = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
            for row in range(prefill, seq_len):
                rows[row, :row + 1] = False
                rows[row, self.positions(row + 1, sparsity)] = True
            by_sparsity[sparsity] = rows.to(self.device)
        return torch.stack([by_sparsity[s] for s in self.kv_sparsity])[:, None]

    def observe(self, probs: Tensor) -> None:
        """A static pattern ignores attention."""


class Dense(StaticSelector):
    def positions(self, num_tokens: int, kv_sparsity: float) -> Tensor:
        return torch.arange(num_tokens)


class Local(StaticSelector):
    def positions(self, num_tokens: int, kv_sparsity: float) -> Tensor:
        return torch.arange(num_tokens - budget(num_tokens, kv_sparsity, self.current), num_tokens)


class StreamingLLM(StaticSelector):
    def positions(self, num_tokens: int, kv_sparsity: float) -> Tensor:
        kept = budget(num_tokens, kv_sparsity, self.current)
        sinks = min(STREAMING_SINKS, kept - 1) if kept < num_tokens else 0
        return torch.cat([torch.arange(sinks), torch.arange(num_tokens - (kept - sinks), num_tokens)])


class Strided(StaticSelector):
    def positions(self, num_tokens: int, kv_sparsity: float) -> Tensor:
        older = num_tokens - swa_recent(num_tokens, kv_sparsity, self.current)
        take = budget(num_tokens, kv_sparsity, self.current) - (num_tokens - older)
        stride = older // take if take else 1
        return torch.cat([older - 1 - stride * torch.arange(take).flip(0), torch.arange(older, num_tokens)])


class AttentionSum(Selector):
    """The recent window plus the top older tokens by attention summed over the last k steps (`history="window"`,
    SWA) or over every step so far (`history="all"`), over the heads of a group: all heads, or one KV head's query
    group with `per_head`. With `self_weight=False` a step's row does not credit its own (current) token. With
    `sinks`, the first `sinks` tokens (StreamingLLM's attention sinks) take the first of the older slots whatever
    their sums, and the rest go by the sums (a token left out once is never summed again, so SWA can lose a sink for
    good; pinned, the sinks stay, and under ALISA's placement they could stay on the GPU: 4 rows per layer).

    `total` is the sum of every observed row (int64 fixed point); a window's sum is `total` less the prefix sum
    where the window starts, kept in `ring` for the last `span` row counts (the longest window plus one)."""

    seeded = True

    def __init__(self, kv_sparsity: Sequence[float], kv_heads: int, max_tokens: int, device: torch.device,
                 current: str = DEFAULT_CURRENT, per_head: bool = False, self_weight: bool = False,
                 history: str = "window", sinks: int = 0):
        super().__init__(kv_sparsity, kv_heads, max_tokens, device, current)
        self.groups = kv_heads if per_head else 1
        self.self_weight, self.history, self.sinks = self_weight, history, sinks
        self._tables()
        self.total = torch.zeros(self.batch, self.groups, max_tokens, dtype=torch.int64, device=device)
        if history == "window":
            self.span = int(self.windows.max()) + 1
            self.ring = torch.zeros(self.batch, self.span, self.groups, max_tokens, dtype=torch.int64, device=device)
            # The ring row (of ring viewed [batch * span, groups, tokens]) where the step with n cached tokens'
            # window starts: its k rows are the steps n - k .. n - 1, so it starts after n - 1 - k observed rows.
            start = (torch.arange(max_tokens + 1, device=device)[:, None] - 1 - self.windows).clamp(min=0)
            self.window_start = self.sequences * self.span + start % self.span
        # Each step's distinct selection keys are sum * max_tokens + (max_tokens - 1 - position): ties go to the
        # older token (MAX_WINDOW keeps them inside int64).
        self.tie_break = max_tokens - 1 - self.token_positions
        self.recent_start = (torch.arange(max_tokens + 1, device=device)[:, None] - self.recents)[..., None, None]
        self.takes = (self.budgets - self.recents)[..., None, None]  # [max_tokens + 1, batch, 1, 1]
        self.most_takes = self.takes.amax(dim=(1, 2, 3)).tolist()
        self.observed = 0

    def keep(self, num_tokens: int) -> Tensor:
        if self.observed != num_tokens - 1:
            raise ValueError(f"step with {num_tokens} cached tokens after {self.observed} observed rows")
        recent = self.token_positions[:num_tokens] >= self.recent_start[num_tokens]
        sums = self.total[..., :num_tokens]
        if self.history == "window":
            starts = self.ring.view(-1, self.groups, self.max_tokens)[..., :num_tokens]
            sums = sums - starts.index_select(0, self.window_start[num_tokens])
        take = self.takes[num_tokens].expand(-1, self.groups, -1)
        pinned = torch.zeros_like(recent)
        if self.sinks:  # the oldest older slots, at most `take` of them
            pinned = (self.token_positions[:num_tokens] < take.clamp(max=self.sinks)) & ~recent
            take = take - pinned.sum(dim=-1, keepdim=True)
        keys = torch.where(recent | pinned, -1, sums * self.max_tokens + self.tie_break[:num_tokens])
        return top_distinct(keys, take, self.most_takes[num_tokens]) | recent | pinned

    def _weights(self, probs: Tensor) -> Tensor:
        """Fixed-point weights [batch, groups, ...] of probabilities [batch, kv_heads, group_size, ...]."""
        return to_fixed_point(probs.sum(dim=2) if self.groups > 1 else probs.sum(dim=(1, 2))[:, None])

    def observe(self, probs: Tensor) -> None:
        weights = self._weights(probs)
        width = weights.shape[-1]
        if not self.self_weight:
            weights[..., width - 1] = 0  # the step's current token
        self.total[..., :width] += weights
        self.observed += 1
        if self.history == "window":
            self.ring[:, self.observed % self.span, :, :width] = self.total[..., :width]

    def prefill_rows(self, first: int, probs: Tensor) -> None:
        weights = self._weights(probs)  # [batch, groups, rows, width]
        rows, width = weights.shape[-2:]
        if not self.self_weight:  # row i of the block is the step whose current token is at position first + i
            weights[:, :, torch.arange(rows), first + torch.arange(rows)] = 0
        prefix = self.total[..., None, :width] + weights.cumsum(dim=2)  # the sums after each row
        if self.history == "window":
            kept = range(max(0, rows - self.span), rows)
            slots = torch.tensor([(first + 1 + row) % self.span for row in kept], device=self.device)
            self.ring[:, slots, :, :width] = prefix[:, :, kept.start:].transpose(1, 2)
        self.total[..., :width] = prefix[:, :, -1]
        self.observed = first + rows


class HeavyHitters(Selector):
    """H2O per KV head: k recent tokens plus heavy hitters by attention summed over all history, among the tokens
    the previous step kept."""

    seeded = True

    def __init__(self, kv_sparsity: Sequence[float], kv_heads: int, max_tokens: int, device: torch.device,
                 current: str = DEFAULT_CURRENT):
        super().__init__(kv_sparsity, kv_heads, max_tokens, device, current)
        self.groups = kv_heads
        self._tables()
        self.scores = torch.zeros(self.batch, kv_heads, max_tokens, dtype=torch.int64, device=device)
        self.kept = torch.zeros(self.batch, kv_heads, max_tokens, dtype=torch.bool, device=device)

    def keep(self, num_tokens: int) -> Tensor:
        recent_count, recent = self._recent(num_tokens)
        candidates = self.kept[..., :num_tokens] & ~recent
        # Every head of a sequence kept as many tokens, the previous step's recent window among them.
        heavy = torch.minimum(self.budgets[num_tokens] - recent_count, candidates[:, 0].sum(dim=-1))
        chosen = top_older(torch.where(candidates, self.scores[..., :num_tokens], -1), heavy[:, None])
        self.kept[..., :num_tokens] = keep = chosen | recent
        return keep

    def observe(self, probs: Tensor) -> None:
        row = to_fixed_point(probs.sum(dim=2))
        self.scores[..., :row.shape[-1]] += row

    def prefill_rows(self, first: int, probs: Tensor) -> None:
        width = probs.shape[-1]
        self.scores[..., :width] += to_fixed_point(probs.sum(dim=2)).sum(dim=-2)
        self.kept[..., :width] = True


class Oracle(Selector):
    """Per step, the budget's tokens of largest dense attention summed over all heads (the current one always):
    needs the step's full attention, so no decoder could choose this way."""

    dense_choice = True

    def __init__(self, kv_sparsity: Sequence[float], kv_heads: int, max_tokens: int, device: torch.device,
                 current: str = DEFAULT_CURRENT):
        super().__init__(kv_sparsity, kv_heads, max_tokens, device, current)
        self._tables()

    def choose(self, first: int, dense: Tensor) -> Tensor:
        """What rows first, first + 1, ... attend [batch, 1, rows, width] from their dense (causal) attention
        probabilities [batch, kv_heads, group_size, rows, width]."""
        rows, width = dense.shape[-2:]
        weights = to_fixed_point(dense.sum(dim=(1, 2)))
        current = torch.arange(first, first + rows, device=self.device)
        cols = torch.arange(width, device=self.device)
        chosen = top_older(torch.where(cols < current[:, None], weights, -1), self.budgets[current + 1].T - 1)
        return (chosen | (cols == current[:, None]))[:, None]

    def keep(self, num_tokens: int) -> Tensor:
        raise TypeError("the oracle chooses from the step's dense attention: call choose()")

    def observe(self, probs: Tensor) -> None:
        """The oracle keeps no state."""


class QuerySelector(Selector):
    """Per KV head, from the step's own query and the cached keys: the current and k recent tokens, and the
    `budget - (k + 1)` older tokens of largest `older_scores` (ties to the older)."""

    query_choice = True

    def __init__(self, kv_sparsity: Sequence[float], kv_heads: int, max_tokens: int, device: torch.device,
                 current: str = DEFAULT_CURRENT):
        super().__init__(kv_sparsity, kv_heads, max_tokens, device, current)
        self.groups = kv_heads
        self._tables()

    @abstractmethod
    def older_scores(self, first: int, q: Tensor, k: Tensor) -> Tensor:
        """Scores [batch, kv_heads, rows, width] (float, or int64 of zero or more) of rows first, first + 1, ...
        from their queries [batch, kv_heads, group_size, rows, d] and the keys [batch, kv_heads, >= width, d]
        (width = first + rows)."""

    def choose_by_query(self, first: int, q: Tensor, k: Tensor) -> Tensor:
        """What rows first, first + 1, ... attend [batch, kv_heads, rows, width] from their queries
        [batch, kv_heads, group_size, rows, d] and the keys k [batch, kv_heads, >= width, d] (width = first + rows)."""
        width = first + q.shape[3]
        scores = self.older_scores(first, q, k)
        current = torch.arange(first, width, device=self.device)
        cols = torch.arange(width, device=self.device)
        counts = current + 1
        recent = self.recents[counts].T  # [batch, rows]
        older = cols < (counts - recent)[..., None]
        never = float("-inf") if scores.is_floating_point() else -1
        chosen = top_older(torch.where(older[:, None], scores, never), (self.budgets[counts].T - recent)[:, None])
        return chosen | (~older & (cols < counts[:, None]))[:, None]

    def keep(self, num_tokens: int) -> Tensor:
        raise TypeError("this selector chooses from the step's query: call choose_by_query()")

    def observe(self, probs: Tensor) -> None:
        """The choice needs no attention history."""


class PageBound(QuerySelector):
    """Quest-like (Tang et al., 2024): older tokens scored by their page's upper bound on the step's attention
    score, from the page's per-channel minimum and maximum key (pages of PAGE_TOKENS positions; the step's own page
    only up to its current token), summed over the KV head's query group; so whole pages are taken, the last in part,
    oldest tokens first. The page minima and maxima stay on the GPU (2 values per channel per page: 1/8 of a page's
    K at 16 tokens)."""

    def older_scores(self, first: int, q: Tensor, k: Tensor) -> Tensor:
        k = k[:, :, :first + q.shape[3]]
        batch, kv_heads, width, head_dim = k.shape
        pages = -(-width // PAGE_TOKENS)
        padded = torch.cat([k, k[:, :, :1].expand(-1, -1, pages * PAGE_TOKENS - width, -1)], dim=2)
        paged = padded.view(batch, kv_heads, pages, PAGE_TOKENS, head_dim)
        # Running minimum and maximum within each page: a step sees its own page only up to its current token.
        high = paged.cummax(dim=3).values.view(batch, kv_heads, -1, head_dim)
        low = paged.cummin(dim=3).values.view(batch, kv_heads, -1, head_dim)
        last = torch.arange(PAGE_TOKENS - 1, pages * PAGE_TOKENS, PAGE_TOKENS, device=self.device)
        positive, negative = q.clamp(min=0), q.clamp(max=0)
        full = (positive @ high[:, :, None, last].transpose(-1, -2)
                + negative @ low[:, :, None, last].transpose(-1, -2)).sum(dim=2)  # [batch, kv_heads, rows, pages]
        current = torch.arange(first, width, device=self.device)
        partial = ((positive * high[:, :, None, current]).sum(dim=-1)
                   + (negative * low[:, :, None, current]).sum(dim=-1)).sum(dim=2)  # [batch, kv_heads, rows]
        page_of = torch.arange(width, device=self.device) // PAGE_TOKENS
        return torch.where(page_of == (current // PAGE_TOKENS)[:, None], partial[..., None], full[..., page_of])


class Int4KeyCopy:
    """A layer's keys as the 4-bit copy reads them back, and a step's attention over it: a layer's blocks of rows
    share one copy."""

    keys: Tensor | None = None  # the keys last handed in, and their copy
    int4: Tensor | None = None

    def probabilities(self, first: int, q: Tensor, k: Tensor) -> Tensor:
        """`copy_probabilities` of rows first, first + 1, ... over the copy of keys k [batch, kv_heads, >= width, d]."""
        if self.keys is not k:
            self.keys, self.int4 = k, int4_keys(k)
        return copy_probabilities(first, q, self.int4)

    def attention(self, first: int, q: Tensor, k: Tensor) -> Tensor:
        """`probabilities` summed over each KV head's query group, in fixed point [batch, kv_heads, rows, width]."""
        return fixed_point_scores(self.probabilities(first, q, k))


class ApproximateAttention(QuerySelector):
    """Older tokens scored by the step's own attention computed from a 4-bit copy of every key."""

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        self.key_copy = Int4KeyCopy()

    def older_scores(self, first: int, q: Tensor, k: Tensor) -> Tensor:
        return self.key_copy.attention(first, q, k)


class AgeCappedApproximateAttention(Selector):
    """`k4-head`'s choice held to SWA's ages (`alisa_exec.key_copy.capped_choice`). SWA runs alongside on the same
    copy: its windowed sums (one set per layer) add, each step, the copy's attention of the step's queries over SWA's
    own set, as SWA sums its own set's attention (summing what this method attends instead would credit the older
    tokens it found and loosen the caps)."""

    seeded = True
    reads_queries = True

    def __init__(self, kv_sparsity: Sequence[float], kv_heads: int, max_tokens: int, device: torch.device,
                 current: str = DEFAULT_CURRENT):
        super().__init__(kv_sparsity, kv_heads, max_tokens, device, current)
        self.groups = kv_heads
        self._tables()
        self.swa = AttentionSum(kv_sparsity, kv_heads, max_tokens, device, current)
        self.key_copy = Int4KeyCopy()

    def see_queries(self, first: int, q: Tensor, k: Tensor) -> None:
        """The queries [batch, kv_heads, group_size, rows, d] of the rows first, first + 1, ... about to be chosen,
        and the keys [batch, kv_heads, >= first + rows, d]."""
        self.first, self.probs = first, self.key_copy.probabilities(first, q, k)
        self.scores = fixed_point_scores(self.probs)

    def keep(self, num_tokens: int) -> Tensor:
        _, recent = self._recent(num_tokens)
        self.swa_set = self.swa.keep(num_tokens)  # [batch, 1, n]
        scores = self.scores[:, :, num_tokens - 1 - self.first, :num_tokens]
        return capped_choice(scores, recent, self.swa_set & ~recent)

    def observe(self, probs: Tensor) -> None:
        """SWA's sums take the copy's attention over SWA's own set (the attended `probs` are not needed)."""
        num_tokens = probs.shape[-1]
        self.swa.observe(swa_own_row(self.probs[..., num_tokens - 1 - self.first, :num_tokens], self.swa_set))

    def prefill_rows(self, first: int, probs: Tensor) -> None:
        self.swa.prefill_rows(first, probs)


@dataclass(frozen=True)
class Method:
    name: str
    make_selector: Callable[[Sequence[float], int, int, torch.device], Selector]
    int8_kv: bool = False
    sparse: bool = True  # evaluated at each requested sparsity (dense: once)


def _sums(**options) -> Callable[..., AttentionSum]:
    return lambda *args: AttentionSum(*args, **options)


METHODS = {
    "dense": Method("dense", Dense, sparse=False),
    "swa": Method("swa", _sums()),
    "swa-literal": Method("swa-literal", _sums(current="inside", self_weight=True)),
    "swa-inside": Method("swa-inside", _sums(current="inside")),
    "swa-self": Method("swa-self", _sums(self_weight=True)),
    "swa-head": Method("swa-head", _sums(per_head=True)),
    "swa-int8": Method("swa-int8", _sums(), int8_kv=True),
    "swa-sinks": Method("swa-sinks", _sums(sinks=STREAMING_SINKS)),
    "hh-head": Method("hh-head", _sums(per_head=True, history="all")),
    "quest-head": Method("quest-head", PageBound),
    "k4-head": Method("k4-head", ApproximateAttention),
    "k4-capped": Method("k4-capped", AgeCappedApproximateAttention),
    "oracle": Method("oracle", Oracle),
    "h2o": Method("h2o", HeavyHitters),
    "streamingllm": Method("streamingllm", StreamingLLM),
    "local": Method("local", Local),
    "strided": Method("strided", Strided),
}


def parse_methods(text: str) -> list[Method]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise SpecError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                        f"choose from {', '.join(METHODS)}")
    return [METHODS[name] for name in names]

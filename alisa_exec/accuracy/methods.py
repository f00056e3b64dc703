"""Which cached tokens each KV-sparsity method attends at each decode step: the selectors the accuracy evaluation
simulates, one layer at a time, for a batch of sequences decoding in lockstep.

All methods share one budget. At the step with n cached tokens (the current one included) and KV sparsity s,
`k = swa_window(n, s)` and a method attends `budget(n, s) = min(n, 2k)` tokens, always the current one among them:

- `dense`: every cached token (the budget does not apply).
- `swa`, `swa-int8`: the k most recent tokens and the k older ones with the largest attention weight summed over
  all heads over the last k decode steps (one set per layer); `swa-int8` reads K and V through INT8.
- `swa-head`: the same with one set per KV head (weights summed over the head's query group).
- `h2o`: per KV head, the k most recent tokens and the heavy hitters by attention summed over every step since the
  token arrived, chosen only among the tokens the previous step kept: a token left out once is evicted for good,
  so the set grows by at most one token a step and is one short of the budget on a step where the budget grows
  by two.
- `streamingllm`: the first min(4, budget - 1) tokens (attention sinks) and the most recent ones.
- `local`: the `budget` most recent tokens.
- `strided`: the k most recent tokens and `budget - k` older ones at a fixed stride counted back from the newest
  older token (the Sparse Transformer's strided pattern at this budget).

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
from alisa_sim.errors import SpecError
from alisa_sim.swa import kv_budget as budget, swa_window

STREAMING_SINKS = 4


def top_older(scores: Tensor, take: Tensor) -> Tensor:
    """Bool mask of the `take[b]` largest entries of each row of scores [batch, groups, m] (ties to the lower, older
    position). Entries below zero are never among them as long as each row has `take` entries of zero or more."""
    most = int(take.max())
    if most == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    count = take.view(-1, 1, 1)
    top = scores.topk(most, dim=-1).values
    kth = top.gather(-1, (count - 1).clamp(min=0).expand(*scores.shape[:2], 1))
    kth = torch.where(count > 0, kth, torch.iinfo(scores.dtype).max)
    above = scores > kth
    tied = scores == kth
    return above | (tied & (tied.cumsum(dim=-1) <= count - above.sum(dim=-1, keepdim=True)))


class Selector(ABC):
    """One layer's token selection for a batch of sequences decoding in lockstep, each at its own KV sparsity.
    `keep(n)` says what the step with n cached tokens attends, [batch, groups, n] bool (groups: 1 when one set serves
    every head, else one per KV head); `observe(probs)` gets that step's attention probabilities,
    [batch, kv_heads, group_size, n], zero off the kept tokens."""

    static = False  # static: the choice depends on n only, not on attention, so a whole mask can be built at once

    def __init__(self, kv_sparsity: Sequence[float], kv_heads: int, max_tokens: int, device: torch.device):
        self.kv_sparsity = list(kv_sparsity)
        self.batch, self.kv_heads, self.max_tokens, self.device = len(self.kv_sparsity), kv_heads, max_tokens, device
        self.groups = 1

    def _per_step(self, what: Callable[[int, float], int]) -> Tensor:
        """what(n, sparsity) for every step and sequence, [max_tokens + 1, batch]."""
        return torch.tensor([[what(max(n, 1), s) for s in self.kv_sparsity] for n in range(self.max_tokens + 1)],
                            device=self.device)

    def _recent(self, num_tokens: int) -> tuple[Tensor, Tensor]:
        """k per sequence [batch], and which of the n positions are among the k most recent [batch, 1, n]."""
        k = self.windows[num_tokens]
        positions = torch.arange(num_tokens, device=self.device)
        return k, (positions >= (num_tokens - k)[:, None])[:, None]

    @abstractmethod
    def keep(self, num_tokens: int) -> Tensor:
        """The tokens the step with `num_tokens` cached tokens attends."""

    @abstractmethod
    def observe(self, probs: Tensor) -> None:
        """The attention probabilities of the step that just ran."""


class StaticSelector(Selector):
    """A fixed pattern of positions, the same for every head (and every sequence at the same sparsity)."""

    static = True

    @staticmethod
    @abstractmethod
    def positions(num_tokens: int, kv_sparsity: float) -> Tensor:
        """The kept positions at a step with `num_tokens` cached tokens, ascending."""

    def _rows(self, num_tokens: int) -> Tensor:
        mask = torch.zeros(self.batch, 1, num_tokens, dtype=torch.bool, device=self.device)
        for sequence, sparsity in enumerate(self.kv_sparsity):
            mask[sequence, 0, self.positions(num_tokens, sparsity).to(self.device)] = True
        return mask

    def mask(self, seq_len: int) -> Tensor:
        """[batch, 1, seq_len, seq_len] bool: row i is what the step with i + 1 cached tokens keeps."""
        by_sparsity = {}
        for sparsity in dict.fromkeys(self.kv_sparsity):
            rows = torch.zeros(seq_len, seq_len, dtype=torch.bool)
            for row in range(seq_len):
                rows[row, self.positions(row + 1, sparsity)] = True
            by_sparsity[sparsity] = rows.to(self.device)
        return torch.stack([by_sparsity[s] for s in self.kv_sparsity])[:, None]

    def keep(self, num_tokens: int) -> Tensor:
        return self._rows(num_tokens)

    def observe(self, probs: Tensor) -> None:
        """A static pattern ignores attention."""


class Dense(StaticSelector):
    @staticmethod
    def positions(num_tokens: int, kv_sparsity: float) -> Tensor:
        return torch.arange(num_tokens)


class Local(StaticSelector):
    @staticmethod
    def positions(num_tokens: int, kv_sparsity: float) -> Tensor:
        return torch.arange(num_tokens - budget(num_tokens, kv_sparsity), num_tokens)


class StreamingLLM(StaticSelector):
    @staticmethod
    def positions(num_tokens: int, kv_sparsity: float) -> Tensor:
        kept = budget(num_tokens, kv_sparsity)
        sinks = min(STREAMING_SINKS, kept - 1) if kept < num_tokens else 0
        return torch.cat([torch.arange(sinks), torch.arange(num_tokens - (kept - sinks), num_tokens)])


class Strided(StaticSelector):
    @staticmethod
    def positions(num_tokens: int, kv_sparsity: float) -> Tensor:
        k = swa_window(num_tokens, kv_sparsity)
        older = num_tokens - k
        take = budget(num_tokens, kv_sparsity) - k
        stride = older // take if take else 1
        return torch.cat([older - 1 - stride * torch.arange(take).flip(0), torch.arange(older, num_tokens)])


class SlidingWindowSum(Selector):
    """SWA: k recent tokens plus the top-k older ones by attention summed over the last k steps (and over the heads
    of a group: all heads, or one KV head's query group with `per_head`).

    The window sum is a difference of prefix sums of the observed rows, kept for the last `span` row counts (a
    ring: the longest window plus one)."""

    def __init__(self, kv_sparsity: Sequence[float], kv_heads: int, max_tokens: int, device: torch.device,
                 per_head: bool = False):
        super().__init__(kv_sparsity, kv_heads, max_tokens, device)
        self.groups = kv_heads if per_head else 1
        self.windows = self._per_step(swa_window)
        self.span = int(self.windows.max()) + 1
        self.prefix = torch.zeros(self.batch, self.groups, self.span, max_tokens, dtype=torch.int64, device=device)
        self.observed = 0

    def keep(self, num_tokens: int) -> Tensor:
        k, recent = self._recent(num_tokens)
        first = (self.observed - k).clamp(min=0) % self.span
        window = (self.prefix[:, :, self.observed % self.span, :num_tokens]
                  - self.prefix[torch.arange(self.batch, device=self.device), :, first, :num_tokens])
        older = ~recent
        chosen = top_older(torch.where(older, window, -1), torch.minimum(k, num_tokens - k))
        return chosen | recent

    def observe(self, probs: Tensor) -> None:
        row = to_fixed_point(probs.sum(dim=2) if self.groups > 1 else probs.sum(dim=(1, 2))[:, None])
        now, after = self.observed % self.span, (self.observed + 1) % self.span
        self.prefix[:, :, after] = self.prefix[:, :, now]
        self.prefix[:, :, after, :row.shape[-1]] += row
        self.observed += 1


class HeavyHitters(Selector):
    """H2O per KV head: k recent tokens plus heavy hitters by attention summed over all history, among the tokens
    the previous step kept."""

    def __init__(self, kv_sparsity: Sequence[float], kv_heads: int, max_tokens: int, device: torch.device):
        super().__init__(kv_sparsity, kv_heads, max_tokens, device)
        self.groups = kv_heads
        self.windows, self.budgets = self._per_step(swa_window), self._per_step(budget)
        self.scores = torch.zeros(self.batch, kv_heads, max_tokens, dtype=torch.int64, device=device)
        self.kept = torch.zeros(self.batch, kv_heads, max_tokens, dtype=torch.bool, device=device)

    def keep(self, num_tokens: int) -> Tensor:
        k, recent = self._recent(num_tokens)
        candidates = self.kept[..., :num_tokens] & ~recent
        # Every head of a sequence kept as many tokens, the previous step's recent window among them.
        heavy = torch.minimum(self.budgets[num_tokens] - k, candidates[:, 0].sum(dim=-1))
        chosen = top_older(torch.where(candidates, self.scores[..., :num_tokens], -1), heavy)
        self.kept[..., :num_tokens] = keep = chosen | recent
        return keep

    def observe(self, probs: Tensor) -> None:
        row = to_fixed_point(probs.sum(dim=2))
        self.scores[..., :row.shape[-1]] += row


@dataclass(frozen=True)
class Method:
    name: str
    make_selector: Callable[[Sequence[float], int, int, torch.device], Selector]
    int8_kv: bool = False
    sparse: bool = True  # evaluated at each requested sparsity (dense: once)


METHODS = {
    "dense": Method("dense", Dense, sparse=False),
    "swa": Method("swa", SlidingWindowSum),
    "swa-head": Method("swa-head", lambda *args: SlidingWindowSum(*args, per_head=True)),
    "swa-int8": Method("swa-int8", SlidingWindowSum, int8_kv=True),
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

"""`h2o` and `streamingllm` in the executor: a fixed budget of KV slots per sequence and KV head on the GPU; tokens
outside it are evicted for good.

The budget is the simulator's (`kept(n)` of its H2OPolicy / StreamingLLMPolicy, `self.sim`, from the one budget
function `alisa_sim.swa.eviction_kept`): kept(n) tokens are attended at a step with n cached tokens, the newest
included. It grows by at most one token a step, so a step either adds the new token to a free slot or first evicts
one:
- `streamingllm`: the oldest token after the `sinks` first ones (attention sinks), so it keeps the sinks and a recent
  window;
- `h2o`: per KV head, outside the kept(n) // 2 most recent tokens, the one with the least attention summed over every
  step since it arrived (over its head's query group; ties go to the older), as the simulator's H2O: heavy hitters
  and recent tokens, half each. The prompt's causal attention seeds the sums.
The kept tokens fill slots 0..count-1 of every (sequence, KV head), in no particular order, and are attended
densely; at kv_sparsity 0 nothing is ever evicted.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alisa_exec import ops
from alisa_exec.kernels import prefill_window_rows
from alisa_exec.kv_cache import GPU, Tiers
from alisa_exec.policies.base import ExecPolicy


class _EvictionExec(ExecPolicy):
    def __init__(self, wl, sim, dtype):
        super().__init__(wl, sim, dtype)
        self.capacity = sim.kept(self.positions)
        self.scored = sim.scored

    def allocate(self, tiers: Tiers) -> None:
        shape = (self.batch, self.spec.num_kv_heads, self.capacity, self.spec.dim_per_head)
        layers = range(self.spec.num_layers)
        self.keys = [tiers.empty(GPU, "kv", shape, self.dtype) for _ in layers]
        self.values = [tiers.empty(GPU, "kv", shape, self.dtype) for _ in layers]
        self.slot_positions = [tiers.empty(GPU, "kv_positions", shape[:3], torch.int64) for _ in layers]
        if self.scored:
            self.scores = [tiers.empty(GPU, "eviction_scores", shape[:3], torch.float32) for _ in layers]

    def kept(self, step: int) -> int:
        return self.sim.kept(self.prompt_len + step)

    def kv_bytes(self, step: int) -> tuple[int, int]:
        per_token = self.batch * self.spec.num_layers * self.spec.kv_bytes_per_token_per_layer(self.dtype.itemsize)
        return self.kept(step) * per_token, 0

    def step(self, step: int, prompt: Tensor) -> None:
        if step:
            kept, before = self.kept(step), self.kept(step - 1)
            if kept not in (before, before + 1):
                raise RuntimeError(f"{self.name}: the budget went from {before} to {kept} tokens in one step")
        super().step(step, prompt)

    def prefill_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        y = self.causal_attention(q, k, v)
        count = self.kept(0)
        with self.span("eviction", "selection"):
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [batch, kv_heads, s, d]
            chosen = self.prefill_keep(index, q.transpose(1, 2), keys, count)  # [batch, kv_heads, count]
            expand = chosen[..., None].expand(-1, -1, -1, keys.shape[-1])
            self.keys[index][:, :, :count] = keys.gather(2, expand)
            self.values[index][:, :, :count] = values.gather(2, expand)
            self.slot_positions[index][:, :, :count] = chosen
        self.tiers.tally("evicted_tokens", (self.prompt_len - count) * self.batch)
        return y

    def decode_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        step, n = self.run.step, self.run.num_tokens
        count = self.kept(step)
        evict = count == self.kept(step - 1)
        with self.span("eviction", "selection"):
            if evict:
                slot = self.victim(index, n, count)[..., None]  # [batch, kv_heads, 1]
            else:
                slot = torch.full((self.batch, self.spec.num_kv_heads, 1), count - 1, device=q.device)
            expand = slot[..., None].expand(-1, -1, -1, k.shape[-1])
            self.keys[index].scatter_(2, expand, k.transpose(1, 2))
            self.values[index].scatter_(2, expand, v.transpose(1, 2))
            self.slot_positions[index].scatter_(2, slot, torch.full_like(slot, n - 1))
            if self.scored:
                self.scores[index].scatter_(2, slot, torch.zeros(slot.shape, device=q.device))
        if evict:
            self.tiers.tally("evicted_tokens", self.batch)
        with self.span("attention", "attention"):
            out, probs = ops.packed_attention(q[:, 0], self.keys[index][:, :, :count],
                                              self.values[index][:, :, :count], per_head=True)
        if self.scored:
            with self.span("eviction", "selection"):
                self.scores[index][:, :, :count] += probs
        return out.reshape(self.batch, 1, -1)

    def prefill_keep(self, index: int, q: Tensor, keys: Tensor, kept: int) -> Tensor:
        """Positions of the `kept` prompt tokens kept after the prefill, [batch, kv_heads, kept]."""
        raise NotImplementedError

    def victim(self, index: int, n: int, count: int) -> Tensor:
        """The slot to evict at a step with n tokens and `count` slots in use, [batch, kv_heads]."""
        raise NotImplementedError


class StreamingLLMExec(_EvictionExec):
    name = "streamingllm"

    def sinks(self, kept: int) -> int:
        return min(self.wl.policy.sinks, kept - 1)

    def prefill_keep(self, index: int, q: Tensor, keys: Tensor, kept: int) -> Tensor:
        s = self.prompt_len
        sinks = self.sinks(kept)
        chosen = torch.cat((torch.arange(sinks), torch.arange(s - (kept - sinks), s))).to(keys.device)
        return chosen.expand(self.batch, self.spec.num_kv_heads, kept)

    def victim(self, index: int, n: int, count: int) -> Tensor:
        positions = self.slot_positions[index][:, :, :count]
        candidates = torch.where(positions >= self.sinks(count), positions, torch.iinfo(torch.int64).max)
        return candidates.argmin(dim=-1)


class H2OExec(_EvictionExec):
    name = "h2o"

    def prefill_keep(self, index: int, q: Tensor, keys: Tensor, kept: int) -> Tensor:
        s = self.prompt_len
        # Attention each prompt token received from the prompt's queries, summed over its KV head's query group.
        received = prefill_window_rows(q, keys, s, per_head=True).sum(dim=2)  # [batch, kv_heads, s]
        recent = kept // 2
        older = received[..., :s - recent]
        heavy = kept - recent
        # Ties to the older token: stable sort of the negated sums keeps position order among equals.
        order = torch.sort(-older, dim=-1, stable=True).indices[..., :heavy]
        recent_positions = torch.arange(s - recent, s, device=keys.device).expand(*older.shape[:2], recent)
        chosen = torch.cat((order.sort(dim=-1).values, recent_positions), dim=-1)
        self.scores[index][:, :, :kept] = received.gather(2, chosen)
        return chosen

    def victim(self, index: int, n: int, count: int) -> Tensor:
        positions = self.slot_positions[index][:, :, :count]
        scores = self.scores[index][:, :, :count]
        outside = positions < n - count // 2  # not among the recent half (which includes the new token)
        masked = torch.where(outside, scores, float("inf"))
        lowest = masked.min(dim=-1, keepdim=True).values
        tied = outside & (masked == lowest)
        return torch.where(tied, positions, torch.iinfo(torch.int64).max).argmin(dim=-1)

"""`h2o` and `streamingllm` in the executor: a fixed budget of KV slots per sequence and KV head on the GPU; tokens
outside it are evicted for good.

The budget is the simulator's (`kept(n)` of its H2OPolicy / StreamingLLMPolicy, `self.sim`): kept(n) tokens are
attended at a step with n cached tokens, the newest included. It grows by at most one token a step, so a step either
adds the new token to a free slot or first evicts one:
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

from alisa_exec.kernels import dense_decode_attention, prefill_window_rows
from alisa_exec.kv_cache import GPU, Tiers
from alisa_exec.model import Transformer
from alisa_exec.policies.base import ExecPolicy, StepLog


class _EvictionExec(ExecPolicy):
    scored = False

    def __init__(self, wl, sim, dtype):
        super().__init__(wl, sim, dtype)
        self.capacity = sim.kept(self.positions)

    def allocate(self, tiers: Tiers) -> None:
        shape = (self.batch, self.spec.num_kv_heads, self.capacity, self.spec.dim_per_head)
        layers = range(self.spec.num_layers)
        self.keys = [tiers.empty(GPU, "kv", shape, self.dtype) for _ in layers]
        self.values = [tiers.empty(GPU, "kv", shape, self.dtype) for _ in layers]
        self.slot_positions = [tiers.empty(GPU, "kv_positions", shape[:3], torch.int64) for _ in layers]
        if self.scored:
            self.scores = [tiers.empty(GPU, "eviction_scores", shape[:3], torch.float32) for _ in layers]

    def kv_bytes(self) -> tuple[int, int]:
        per_token = self.batch * self.spec.num_layers * self.spec.kv_bytes_per_token_per_layer(self.dtype.itemsize)
        return self.count * per_token, 0

    def generate(self, model: Transformer, prompt: Tensor, log: StepLog, decode_steps: int | None = None) -> Tensor:
        s = self.prompt_len
        out = torch.empty(self.batch, self.gen_len, dtype=torch.long, device=prompt.device)
        log.begin("prefill", "prefill", 1, self.batch * s, self.batch)
        self.count = self.sim.kept(s)
        positions = torch.arange(s, device=prompt.device)
        rope = model.rope(positions)
        x = self.embed(model, prompt, positions)
        for index, layer in enumerate(model.layers):
            self.timeline.layer = index
            x = self.layer(layer, x, rope, lambda q, k, v, index=index: self.prefill_attend(index, q, k, v))
        self.timeline.layer = -1
        out[:, :1] = self.sample(model, x)
        log.end(*self.kv_bytes(), {"evicted_tokens": (s - self.count) * self.batch})
        for step in range(1, self.last_step(decode_steps) + 1):
            n = s + step
            log.begin("decode", f"decode {step}", 1, self.batch, self.batch)
            kept = self.sim.kept(n)
            if kept not in (self.count, self.count + 1):
                raise RuntimeError(f"{self.name}: the budget went from {self.count} to {kept} tokens in one step")
            evict, self.count = kept == self.count, kept
            positions = torch.tensor([n - 1], device=prompt.device)
            rope = model.rope(positions)
            x = self.embed(model, out[:, step - 1:step], positions)
            for index, layer in enumerate(model.layers):
                self.timeline.layer = index
                x = self.layer(layer, x, rope, lambda q, k, v, index=index: self.attend(index, n, evict, q, k, v))
            self.timeline.layer = -1
            out[:, step:step + 1] = self.sample(model, x)
            log.end(*self.kv_bytes(), {"evicted_tokens": self.batch if evict else 0})
        return out

    def prefill_attend(self, index: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        y = self.causal_attention(q, k, v)
        with self.span("eviction", "selection"):
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [batch, kv_heads, s, d]
            chosen = self.prefill_keep(index, q.transpose(1, 2), keys)  # [batch, kv_heads, count]
            expand = chosen[..., None].expand(-1, -1, -1, keys.shape[-1])
            self.keys[index][:, :, :self.count] = keys.gather(2, expand)
            self.values[index][:, :, :self.count] = values.gather(2, expand)
            self.slot_positions[index][:, :, :self.count] = chosen
        return y

    def attend(self, index: int, n: int, evict: bool, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        count = self.count
        with self.span("eviction", "selection"):
            if evict:
                slot = self.victim(index, n)[..., None]  # [batch, kv_heads, 1]
            else:
                slot = torch.full((self.batch, self.spec.num_kv_heads, 1), count - 1, device=q.device)
            expand = slot[..., None].expand(-1, -1, -1, k.shape[-1])
            self.keys[index].scatter_(2, expand, k.transpose(1, 2))
            self.values[index].scatter_(2, expand, v.transpose(1, 2))
            self.slot_positions[index].scatter_(2, slot, torch.full_like(slot, n - 1))
            if self.scored:
                self.scores[index].scatter_(2, slot, torch.zeros(slot.shape, device=q.device))
        with self.span("attention", "attention"):
            out, probs = dense_decode_attention(q[:, 0], self.keys[index][:, :, :count],
                                                self.values[index][:, :, :count], per_head=True)
        if self.scored:
            with self.span("eviction", "selection"):
                self.scores[index][:, :, :count] += probs
        return out.reshape(self.batch, 1, -1)

    def prefill_keep(self, index: int, q: Tensor, keys: Tensor) -> Tensor:
        """Positions of the prompt tokens kept after the prefill, [batch, kv_heads, count]."""
        raise NotImplementedError

    def victim(self, index: int, n: int) -> Tensor:
        """The slot to evict at a step with n tokens, [batch, kv_heads]."""
        raise NotImplementedError


class StreamingLLMExec(_EvictionExec):
    name = "streamingllm"

    def sinks(self, kept: int) -> int:
        return min(self.wl.policy.sinks, kept - 1)

    def prefill_keep(self, index: int, q: Tensor, keys: Tensor) -> Tensor:
        s, kept = self.prompt_len, self.count
        sinks = self.sinks(kept)
        chosen = torch.cat((torch.arange(sinks), torch.arange(s - (kept - sinks), s))).to(keys.device)
        return chosen.expand(self.batch, self.spec.num_kv_heads, kept)

    def victim(self, index: int, n: int) -> Tensor:
        positions = self.slot_positions[index][:, :, :self.count]
        candidates = torch.where(positions >= self.sinks(self.count), positions, torch.iinfo(torch.int64).max)
        return candidates.argmin(dim=-1)


class H2OExec(_EvictionExec):
    name = "h2o"
    scored = True

    def prefill_keep(self, index: int, q: Tensor, keys: Tensor) -> Tensor:
        s, kept = self.prompt_len, self.count
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

    def victim(self, index: int, n: int) -> Tensor:
        positions = self.slot_positions[index][:, :, :self.count]
        scores = self.scores[index][:, :, :self.count]
        outside = positions < n - self.count // 2  # not among the recent half (which includes the new token)
        masked = torch.where(outside, scores, float("inf"))
        lowest = masked.min(dim=-1, keepdim=True).values
        tied = outside & (masked == lowest)
        return torch.where(tied, positions, torch.iinfo(torch.int64).max).argmin(dim=-1)

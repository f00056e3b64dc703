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
densely; at kv_sparsity 0 nothing is ever evicted. The choice and the stores are named ops (`ops.keep_prompt`,
`ops.evict_victim`, `ops.slot_store`, `ops.score_update`), which the profile times and the simulator prices.
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
            ops.keep_prompt(keys, values, self.slots(index), self.scores[index] if self.scored else None,
                            self.attention_rows(q, keys), count, self.sinks(count))
        self.tiers.tally("evicted_tokens", (self.prompt_len - count) * self.batch)
        return y

    def decode_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        step, n = self.run.step, self.run.num_tokens
        count = self.kept(step)
        evict = count == self.kept(step - 1)
        scores = self.scores[index] if self.scored else None
        with self.span("eviction", "selection"):
            slot = ops.evict_victim(self.slot_positions[index][:, :, :count],
                                    None if scores is None else scores[:, :, :count], n - count // 2,
                                    self.sinks(count)) if evict else count - 1
            ops.slot_store(self.slots(index), scores, slot, k, v, n - 1)
        if evict:
            self.tiers.tally("evicted_tokens", self.batch)
        with self.span("attention", "attention"):
            out, probs = ops.packed_attention(q[:, 0], self.keys[index][:, :, :count],
                                              self.values[index][:, :, :count], per_head=True)
        if self.scored:
            with self.span("score_update", "selection"):
                ops.score_update(scores, probs)
        return out.reshape(self.batch, 1, -1)

    def slots(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.keys[index], self.values[index], self.slot_positions[index]

    def sinks(self, kept: int) -> int:
        """The first tokens never evicted (StreamingLLM's attention sinks) at a budget of `kept`."""
        return 0

    def attention_rows(self, q: Tensor, keys: Tensor) -> Tensor | None:
        """What the prefill's choice of tokens is made from, if anything: H2O's prompt attention rows."""
        return None


class StreamingLLMExec(_EvictionExec):
    name = "streamingllm"

    def sinks(self, kept: int) -> int:
        return min(self.wl.policy.sinks, kept - 1)


class H2OExec(_EvictionExec):
    name = "h2o"

    def attention_rows(self, q: Tensor, keys: Tensor) -> Tensor:
        """The prompt's causal attention rows, summed over each KV head's query group, [batch, kv_heads, s, s]."""
        return prefill_window_rows(q.transpose(1, 2), keys, self.prompt_len, per_head=True)

"""`h2o` and `streamingllm`: fixed-budget KV eviction (kept tokens only, all on the GPU, the rest dropped for good).

Both keep the tokens SWA attends to, `alisa_sim.swa.kv_budget` (min(n, 2k)), one fewer on a step where that budget
grows by two (`eviction_kept`: an evicted token does not come back), so their KV memory is about (1 - kv_sparsity)
of dense. H2O keeps per-head heavy hitters (attention summed over all history) and recent tokens, half each, and
pays a per-head score update and eviction each step; StreamingLLM keeps `sinks` first tokens and a recent window
and pays nothing to choose them.
"""

from __future__ import annotations

from alisa_sim.ops import LayerTemplate, make_op
from alisa_sim.policies.base import MemoryUse, Policy
from alisa_sim.swa import eviction_kept



class _EvictionPolicy(Policy):
    scored = False  # H2O also keeps each kept token's accumulated attention, per KV head

    def kept(self, context: int) -> int:
        return eviction_kept(context, self.wl.policy.kv_sparsity, self.prompt_len)

    def token_rows(self, step: int) -> dict[str, float]:
        """Evicted rows: the prompt beyond the budget, then one per sequence and layer on a step whose budget did not
        grow (the new token takes an evicted token's slot)."""
        if step == 0:
            evicted = self.prompt_len - self.kept(self.prompt_len)
        else:
            evicted = int(self.kept(self.context(step)) == self.kept(self.context(step - 1)))
        return {"evicted_tokens": evicted * self.batch * self.model.num_layers} if evicted else {}

    def static_memory(self) -> MemoryUse:
        """Weights and working buffers, and beside the KV slots the position each slot holds (int64) and, for H2O,
        its score (fp32), per sequence, KV head and layer."""
        m = self.model
        slots = self.batch * m.num_kv_heads * self.kept(self.positions) * m.num_layers
        scores = {"eviction_scores": 4 * slots} if self.scored else {}
        return MemoryUse(gpu={"weights": m.weight_bytes, **self.activation_buffers(), "kv_positions": 8 * slots,
                              **scores})

    def kv_memory(self, context: int) -> MemoryUse:
        return MemoryUse(gpu={"kv": self.kv_bytes(self.kept(context))})

    def prefill_template(self) -> LayerTemplate:
        return self.add_compute_chain(LayerTemplate(), self.batch * self.prompt_len, self.prefill_attention_op(),
                                      "prefill")

    def decode_template(self, step: int) -> LayerTemplate:
        kept = self.kept(self.context(step))
        t = self.add_compute_chain(LayerTemplate(), self.batch, self.decode_attention_op(kept, path="packed_attention"),
                                   "decode")
        self.add_eviction_cost(t, kept)
        return t

    def add_eviction_cost(self, template: LayerTemplate, kept: int) -> None:
        """Work to choose the tokens to keep, if any."""


class H2OPolicy(_EvictionPolicy):
    name = "h2o"
    scored = True

    def add_eviction_cost(self, template: LayerTemplate, kept: int) -> None:
        # fp32 accumulated score per head and kept token: read the new probabilities, update, find the lowest.
        nbytes = 4 * 3 * self.batch * self.model.num_heads * kept
        template.add(make_op("h2o_eviction", "gpu", {"selection": self.cost.hbm_s(nbytes)},
                             host_s=self.host_of("local_sum", "topk")),
                     after=("attention",))

    def prefill_template(self) -> LayerTemplate:
        """The prompt pass, then the attention every prompt token received from the prompt's queries (explicit
        rows, as the executor scores the heavy hitters it keeps)."""
        t, m = super().prefill_template(), self.model
        s = self.prompt_len
        t.add(self._gpu_op("eviction", {"selection": (("window_rows", {
            "b": self.batch, "R": s, "L": s, "h": m.num_heads, "kv": m.num_kv_heads, "d": m.dim_per_head}),)}),
            after=("attention",))
        return t


class StreamingLLMPolicy(_EvictionPolicy):
    name = "streamingllm"

    def kept(self, context: int) -> int:
        return min(context, max(self.wl.policy.sinks + 1, super().kept(context)))

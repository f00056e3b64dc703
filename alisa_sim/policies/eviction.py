"""`h2o` and `streamingllm`: fixed-budget KV eviction (kept tokens only, all on the GPU, the rest dropped for good).

Both keep the tokens SWA attends to, `alisa_sim.swa.kv_budget` (min(n, 2k)), one fewer on a step where that budget
grows by two (`eviction_kept`: an evicted token does not come back), so their KV memory is about (1 - kv_sparsity)
of dense. H2O keeps per-head heavy hitters (attention summed over all history) and recent tokens, half each, and
pays a per-head score update each step; StreamingLLM keeps `sinks` first tokens and a recent window. Both pay the
executor's named ops for their choice and stores (`keep_prompt`, `evict_victim`, `slot_store`, `score_update`).
"""

from __future__ import annotations

from alisa_sim.ops import LayerTemplate
from alisa_sim.policies.base import MemoryUse, Policy
from alisa_sim.swa import eviction_kept



class _EvictionPolicy(Policy):
    scored = False  # H2O also keeps each kept token's accumulated attention, per KV head

    def kept(self, context: int) -> int:
        return eviction_kept(context, self.wl.policy.kv_sparsity, self.prompt_len)

    def token_rows(self, step: int) -> dict[str, float]:
        """Evicted rows: the prompt beyond the budget, then one per sequence and layer on a step whose budget did not
        grow (the new token takes an evicted token's slot)."""
        evicted = self.prompt_len - self.kept(self.prompt_len) if step == 0 else int(self.evicts(step))
        return {"evicted_tokens": evicted * self.batch * self.model.num_layers} if evicted else {}

    def evicts(self, step: int) -> bool:
        """Whether decode step `step` evicts a token (its budget did not grow)."""
        return self.kept(self.context(step)) == self.kept(self.context(step - 1))

    def decode_variant(self, step: int) -> object:
        return self.phase(step), self.evicts(step)

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
        """The prompt pass; after its attention, the prompt tokens kept written into their slots."""
        m, s = self.model, self.prompt_len
        keep = (("keep_prompt", {"b": self.batch, "kv": m.num_kv_heads, "L": s, "d": m.dim_per_head,
                                 "e": m.dtype_bytes, "scored": int(self.scored)}),)
        return self.add_compute_chain(LayerTemplate(), self.batch * s, self.prefill_attention_op(), "prefill",
                                      after_attention=(self._gpu_op("eviction",
                                                                    {"selection": self.prompt_choice() + keep}),))

    def prompt_choice(self) -> tuple[tuple[str, dict[str, int]], ...]:
        """What the prefill's choice of tokens is made from, if anything (named ops)."""
        return ()

    def decode_template(self, step: int) -> LayerTemplate:
        """The new token's K/V stored in a free slot or, once the budget stops growing, in the slot of the token it
        evicts; attention over the kept slots (and H2O's score update)."""
        kept, m = self.kept(self.context(step)), self.model
        victim = (("evict_victim", {"b": self.batch, "kv": m.num_kv_heads, "T": kept, "scored": int(self.scored)}),)
        store = (("slot_store", {"b": self.batch, "kv": m.num_kv_heads, "d": m.dim_per_head, "e": m.dtype_bytes,
                                 "scored": int(self.scored)}),)
        eviction = self._gpu_op("eviction", {"selection": (victim if self.evicts(step) else ()) + store})
        update = (self._gpu_op("score_update", {"selection": (("score_update", {
            "b": self.batch, "kv": m.num_kv_heads, "T": kept}),)}),) if self.scored else ()
        return self.add_compute_chain(LayerTemplate(), self.batch,
                                      self.decode_attention_op(kept, path="packed_attention"), "decode",
                                      before_attention=(eviction,), after_attention=update)


class H2OPolicy(_EvictionPolicy):
    name = "h2o"
    scored = True

    def prompt_choice(self) -> tuple[tuple[str, dict[str, int]], ...]:
        """The attention every prompt token received from the prompt's queries (explicit rows)."""
        m = self.model
        return (("window_rows", {"b": self.batch, "R": self.prompt_len, "L": self.prompt_len, "h": m.num_heads,
                                 "kv": m.num_kv_heads, "d": m.dim_per_head}),)


class StreamingLLMPolicy(_EvictionPolicy):
    name = "streamingllm"

    def kept(self, context: int) -> int:
        return min(context, max(self.wl.policy.sinks + 1, super().kept(context)))

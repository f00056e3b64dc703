"""`zero`: DeepSpeed ZeRO-Inference. Layer weights in CPU memory, streamed to the GPU layer by layer (prefetched
one layer ahead into two buffers) for every step; embeddings and the whole KV cache on the GPU."""

from __future__ import annotations

from alisa_sim.ops import LayerTemplate
from alisa_sim.policies.base import MemoryUse, Policy


class ZeroPolicy(Policy):
    name = "zero"

    def placement(self) -> dict[str, float]:
        embedding_share = self.model.embedding_weight_bytes / self.model.weight_bytes
        return {"weights_gpu": embedding_share, "kv_gpu": 1.0}

    def static_memory(self) -> MemoryUse:
        # On the GPU, "weights" are the embeddings, final norm and LM head; the layers' stream through two buffers.
        return MemoryUse(gpu={"weights": self.model.embedding_weight_bytes,
                              "weight_staging": 2 * self.model.layer_weight_bytes, **self.activation_buffers(),
                              **self.static_kv_slack().gpu},
                         cpu={"layer_weights": self.model.num_layers * self.model.layer_weight_bytes})

    def kv_memory(self, context: int) -> MemoryUse:
        return MemoryUse(gpu={"kv": self.kv_bytes(context)})

    def _template(self, rows: int, attention, kind: str) -> LayerTemplate:
        template = LayerTemplate()
        template.add(self.copy_op("weight_load", "h2d", self.model.layer_weight_bytes, self.wl.policy.pinned))
        self.add_compute_chain(template, rows, attention, kind, qkv_after=("weight_load",))
        template.link("out_proj_mlp", "weight_load", lag=2)  # a weight buffer is free once layer l-2 is done
        return template

    def prefill_template(self) -> LayerTemplate:
        return self._template(self.batch * self.prompt_len, self.static_prefill_attention_op(), "prefill")

    def decode_template(self, step: int) -> LayerTemplate:
        return self._template(self.batch, self.static_decode_attention_op(), "decode")

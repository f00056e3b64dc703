"""`dense`: weights and the whole KV cache on the GPU, full attention; out of memory when they do not fit."""

from __future__ import annotations

from alisa_sim.ops import LayerTemplate
from alisa_sim.policies.base import MemoryUse, Policy


class DensePolicy(Policy):
    name = "dense"

    def static_memory(self) -> MemoryUse:
        return MemoryUse(gpu={"weights": self.model.weight_bytes, **self.activation_buffers()})

    def kv_memory(self, context: int) -> MemoryUse:
        return MemoryUse(gpu={"kv": self.kv_bytes(context)})

    def prefill_template(self) -> LayerTemplate:
        rows = self.batch * self.prompt_len
        return self.add_compute_chain(LayerTemplate(), rows, self.prefill_attention_op())

    def decode_template(self, step: int) -> LayerTemplate:
        attention = self.decode_attention_op(self.context(step))
        return self.add_compute_chain(LayerTemplate(), self.batch, attention)

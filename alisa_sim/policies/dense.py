"""`dense`: weights and the whole KV cache on the GPU, full attention; out of memory when they do not fit."""

from __future__ import annotations

from alisa_sim.ops import LayerTemplate
from alisa_sim.policies.base import MemoryUse, Policy


class DensePolicy(Policy):
    name = "dense"

    def static_memory(self) -> MemoryUse:
        packed = {"packed_weights": self.model.projection_weight_bytes} if self.packs_weights else {}
        return MemoryUse(gpu={"weights": self.model.weight_bytes, **packed, **self.activation_buffers(),
                              **self.static_kv_slack().gpu})

    def kv_memory(self, context: int) -> MemoryUse:
        return MemoryUse(gpu={"kv": self.kv_bytes(context)})

    @property
    def packs_weights(self) -> bool:
        return self.wl.hardware.device_kind == "cpu" and self.model.dtype_bytes == 4

    def prefill_template(self) -> LayerTemplate:
        return self.add_compute_chain(LayerTemplate(), self.batch * self.prompt_len, self.static_prefill_attention_op(),
                                      "prefill")

    def decode_template(self, step: int) -> LayerTemplate:
        return self.add_compute_chain(LayerTemplate(), self.batch, self.static_decode_attention_op(), "decode")

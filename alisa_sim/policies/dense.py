"""`dense`: weights and the whole KV cache on the GPU, full attention; out of memory when they do not fit."""

from __future__ import annotations

from alisa_sim.ops import LayerTemplate
from alisa_sim.policies.base import MemoryUse, Policy, StepPlan


class DensePolicy(Policy):
    name = "dense"

    def static_memory(self) -> MemoryUse:
        return MemoryUse(gpu={"weights": self.model.weight_bytes, **self.activation_buffers()})

    def kv_memory(self, context: int) -> MemoryUse:
        return MemoryUse(gpu={"kv": self.kv_bytes(context)})

    def prefill(self) -> StepPlan:
        rows = self.batch * self.prompt_len
        return StepPlan(self.add_compute_chain(LayerTemplate(), rows, self.prefill_attention_op()), phase=1)

    def decode(self, step: int) -> StepPlan:
        attention = self.decode_attention_op(self.context(step))
        return StepPlan(self.add_compute_chain(LayerTemplate(), self.batch, attention), phase=1)

"""`accelerate`: HF Accelerate-style KV offload. Weights on the GPU; the whole KV cache in CPU memory, each
layer's KV streamed to the GPU every step (prefetched one layer ahead into two staging buffers) and each new
token's KV written back. Only the new token goes back, which makes this a lower bound on Accelerate's traffic."""

from __future__ import annotations

from alisa_sim.ops import LayerTemplate
from alisa_sim.policies.base import MemoryUse, Policy


class AcceleratePolicy(Policy):
    name = "accelerate"

    def placement(self) -> dict[str, float]:
        return {"weights_gpu": 1.0, "kv_gpu": 0.0}

    def phase(self, step: int) -> int:
        return 2

    def token_rows(self, step: int) -> dict[str, float]:
        rows = self.batch * self.model.num_layers
        if step == 0:
            return {"offloaded_tokens": rows * self.prompt_len}
        return {"fetched_tokens": rows * (self.context(step) - 1), "offloaded_tokens": rows}

    def _layer_kv_bytes(self, tokens: int) -> float:
        return tokens * self.model.kv_bytes_per_token_per_layer()

    def static_memory(self) -> MemoryUse:
        staging = 2 * self._layer_kv_bytes(self.batch * self.positions)  # two layers' KV, as it is read
        return MemoryUse(gpu={"weights": self.model.weight_bytes, "kv_staging": staging, **self.activation_buffers()})

    def kv_memory(self, context: int) -> MemoryUse:
        return MemoryUse(cpu={"kv": self.kv_bytes(context)})

    def prefill_template(self) -> LayerTemplate:
        rows = self.batch * self.prompt_len
        template = LayerTemplate()
        self.add_compute_chain(template, rows, self.prefill_attention_op(), "prefill")
        template.add(self.copy_op("kv_store", "d2h", self._layer_kv_bytes(rows), self.wl.policy.pinned),
                     after=("qkv_proj",))
        return template

    def decode_template(self, step: int) -> LayerTemplate:
        context = self.context(step)
        pinned = self.wl.policy.pinned
        template = LayerTemplate()
        template.add(self.copy_op("kv_load", "h2d", self._layer_kv_bytes(self.batch * (context - 1)), pinned))
        self.add_compute_chain(template, self.batch, self.decode_attention_op(context), "decode",
                               attention_after=("kv_load",))
        template.link("attention", "kv_load", lag=2)  # a staging buffer is reused once attention two layers back read it
        template.add(self.copy_op("kv_store", "d2h", self._layer_kv_bytes(self.batch), pinned), after=("qkv_proj",))
        return template

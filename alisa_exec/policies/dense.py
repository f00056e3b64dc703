"""`dense` and `zero` in the executor: the whole KV cache on the GPU in static buffers, full attention.

`dense` (the simulator's DensePolicy): weights on the GPU. On CUDA its decode step (the layer loop every policy runs,
over static token and position buffers) is captured once as a CUDA graph (`alisa_exec.generate.capture_graph`, the
generator's) and replayed, so the host's per-kernel launch cost does not bound small batches; the steps timed op by
op (`detail_limit` of them) run eagerly. On the CPU, `alisa-exec run --compile` compiles the same decode step with
TorchInductor, weights frozen (packed for MKL's GEMM by Inductor, as `Transformer.pack_weights` packs them eagerly),
so that its small ops (norms, rotary, attention, KV stores, residuals) run fused rather than one dispatch each; the
same `detail_limit` steps run eagerly, op by op.

`zero` (the simulator's ZeroPolicy, DeepSpeed ZeRO-Inference): every layer's weights live in CPU memory (pinned
unless the workload says `pinned: false`), one contiguous block per layer, and stream to the GPU layer by layer for
every step: two GPU buffers, the next layer's copy issued on the H2D stream while this layer computes, a buffer
refilled once the layer two back that read it is done. Embeddings, the final norm and the LM head stay on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch._inductor.config as inductor_config
from torch import Tensor, nn

from alisa_exec import ops
from alisa_exec.generate import capture_graph
from alisa_exec.kv_cache import CPU, GPU, Tiers
from alisa_exec.model import Block, Transformer, mkl_packable
from alisa_exec.policies.base import ExecPolicy, Run
from alisa_exec.timeline import Timeline
from alisa_sim.model_spec import aligned_seq_len

COMPILE_OPTIONS = {
    "cpp_wrapper": True,  # the graph's calls issued from C++, not a Python line each (about 1 ms a step)
    # The model and its modules are fixed for the run (one compile per policy and run): checking them at every call
    # costs about a millisecond a step, a thirtieth of SmolLM2's.
    "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
}


class DenseExec(ExecPolicy):
    name = "dense"
    detail_limit = 4  # the prefill and three decode steps run eagerly, op by op; the others replay the graph
    cuda_graph = True

    def __init__(self, wl, sim, dtype):
        super().__init__(wl, sim, dtype)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.compile_decode = False  # the executor sets it: `alisa-exec run --compile` on the CPU
        self.compiled_forward = None
        self.decode_mask: Tensor | None = None  # [1, positions] additive mask of the step in the layers

    def allocate(self, tiers: Tiers) -> None:
        spec = self.spec
        shape = (self.batch, spec.num_kv_heads, aligned_seq_len(self.positions), spec.dim_per_head)
        self.keys = [tiers.empty(GPU, "kv", shape, self.dtype) for _ in range(spec.num_layers)]
        self.values = [tiers.empty(GPU, "kv", shape, self.dtype) for _ in range(spec.num_layers)]

    def weight_placement(self, model: Transformer, tiers: Tiers) -> None:
        """On the CPU, the projections' and LM head's weights are also kept packed for MKL's GEMM at the decode
        step's batch (a GEMM of a few rows otherwise spends most of its time packing the whole weight)."""
        super().weight_placement(model, tiers)
        if self.sim.packs_weights and mkl_packable(tiers.device, self.dtype):
            tiers.count(GPU, "packed_weights", model.packable_bytes())
            if not tiers.dry and not self.compile_decode:  # compiled, Inductor packs a copy of the same size
                model.pack_weights(self.batch)

    def kv_bytes(self, step: int) -> tuple[int, int]:
        return self.batch * (self.prompt_len + step) * self.spec.kv_bytes_per_token(self.dtype.itemsize), 0

    def prefill_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        y = self.causal_attention(q, k, v)
        with self.span("kv_store", "elementwise"):
            ops.kv_store(self.keys[index], self.values[index], slice(0, self.prompt_len), k, v)
        return y

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        # Decode attention spans the whole static buffer, later positions masked (what the CUDA graph replays at any
        # position): the mask rows of the step's positions, taken once for every layer.
        self.decode_mask = self.run.model.causal_mask[positions]
        return super().forward(tokens, positions)

    def decode_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        positions = self.run.positions
        with self.span("attention", "attention"):
            ops.kv_store(self.keys[index], self.values[index], positions, k, v)
            return ops.masked_attention(q, self.keys[index], self.values[index], self.decode_mask)

    # ---- the CUDA graph --------------------------------------------------------------------------------------------
    def uses_graph(self) -> bool:
        return self.cuda_graph and self.tiers.cuda and self.logits_log is None

    def replays_decode(self) -> bool:
        """Whether decode steps that are not timed op by op replay a CUDA graph or run compiled."""
        return self.uses_graph() or (self.compile_decode and self.logits_log is None)

    def new_run(self, model: Transformer, prompt: Tensor) -> Run:
        run = super().new_run(model, prompt)
        if self.uses_graph() and self.graph is None:
            self.run = run
            self.capture()
        if self.compile_decode and self.compiled_forward is None:
            self.quiet_timeline = Timeline(self.tiers.device, set())
            # Compiled at its first call (the warm-up's first decode step), for this batch and these shapes.
            self.compiled_forward = torch.compile(self.forward, dynamic=False, options=COMPILE_OPTIONS)
        return run

    def capture(self) -> None:
        """Record one decode step over static token and position buffers (at the last position, which the run's
        last step writes before reading it; until then the mask hides it)."""
        device = self.tiers.device
        self.graph_token = torch.zeros(self.batch, 1, dtype=torch.long, device=device)
        self.graph_position = torch.full((1,), self.positions - 1, dtype=torch.long, device=device)
        timeline, self.timeline = self.timeline, Timeline(device, set())  # no op spans inside the graph
        self.run.prefill = False
        try:
            self.graph = capture_graph(lambda: self.graph_token.copy_(self.forward(self.graph_token,
                                                                                   self.graph_position)))
        finally:
            self.timeline = timeline

    def step(self, step: int, prompt: Tensor) -> None:
        if step == 0 or not self.replays_decode() or self.timeline.recording:
            super().step(step, prompt)
            return
        out = self.run.out
        if self.graph is None:
            self.compiled_step(step, out)
            return
        self.graph_token.copy_(out[:, step - 1:step])
        self.graph_position.fill_(self.prompt_len + step - 1)
        self.graph.replay()
        out[:, step:step + 1] = self.graph_token

    def compiled_step(self, step: int, out: Tensor) -> None:
        """A decode step through the compiled forward, with one quiet timeline (nothing to record inside, and the
        same object every step, so that the compiled code's guards hold from step to step)."""
        positions = torch.full((1,), self.prompt_len + step - 1, dtype=torch.long, device=out.device)
        timeline, self.timeline = self.timeline, self.quiet_timeline
        try:
            # Weights are constants, which Inductor packs once for MKL (set here, not in the options: Dynamo reads it
            # while tracing, to keep the parameters as constants rather than graph inputs).
            with inductor_config.patch(freezing=True):
                out[:, step:step + 1] = self.compiled_forward(out[:, step - 1:step], positions)
        finally:
            self.timeline = timeline


@dataclass
class ZeroRun(Run):
    weights_loaded: list = field(default_factory=lambda: [None, None])  # the latest copy into each weight buffer
    weights_used: list = field(default_factory=lambda: [None, None])  # the last layer that read each buffer


class ZeroExec(DenseExec):
    name = "zero"
    detail_limit = None
    cuda_graph = False  # the weight stream's copies and events run eagerly

    def load_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu")  # the layers never all sit on the GPU

    def weight_placement(self, model: Transformer, tiers: Tiers) -> None:
        layer_params = [list(layer.named_parameters()) for layer in model.layers]
        if any(p.dtype != self.dtype for params in layer_params for _, p in params):
            raise ValueError(f"zero streams layers whose parameters are all {self.dtype}")
        self.layer_numel = sum(p.numel() for _, p in layer_params[0])
        in_layers = {id(p) for params in layer_params for _, p in params}
        tiers.count(GPU, "weights", sum(p.numel() * p.element_size() for p in model.parameters()
                                        if id(p) not in in_layers))
        pinned = self.wl.policy.pinned
        self.host_weights = [tiers.empty(CPU, "layer_weights", (self.layer_numel,), self.dtype, pinned)
                             for _ in model.layers]
        self.weight_stage = [tiers.empty(GPU, "weight_staging", (self.layer_numel,), self.dtype) for _ in range(2)]
        if tiers.dry:
            return
        for host, layer, params in zip(self.host_weights, model.layers, layer_params):
            host.copy_(torch.cat([p.detach().flatten() for _, p in params]))
            layer.to("meta")  # the staged copies stand in for it
        for name, child in model.named_children():
            if name != "layers":
                child.to(tiers.device)  # embeddings, the final norm and the LM head live on the GPU
        self.staged_layers = [self._bind(buffer, [name for name, _ in layer_params[0]]) for buffer in self.weight_stage]

    def _bind(self, buffer: Tensor, names: list[str]) -> Block:
        """A layer whose parameters are views into one flat weight buffer (so copying into it loads the layer)."""
        with torch.device("meta"):
            layer = Block(self.spec).to(self.dtype)
        offset = 0
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            module = layer.get_submodule(module_name)
            shape = getattr(module, leaf).shape
            view = buffer[offset:offset + shape.numel()].view(shape)
            setattr(module, leaf, nn.Parameter(view, requires_grad=False))
            offset += shape.numel()
        return layer

    def new_run(self, model: Transformer, prompt: Tensor) -> ZeroRun:
        return ZeroRun(model, super().new_run(model, prompt).out)

    def before_layer(self, index: int, group: int) -> None:
        self.one_layer_ahead(index, self.load)

    def load(self, index: int) -> None:
        """Copy layer `index`'s weights into its buffer (H2D stream), once the layer two back is done with it."""
        run, buffer = self.run, index % 2
        run.weights_loaded[buffer] = self.tiers.copy(self.weight_stage[buffer], self.host_weights[index], "h2d",
                                                     "weight_load", after=(run.weights_used[buffer],))

    def block(self, index: int) -> Block:
        self.tiers.wait("compute", self.run.weights_loaded[index % 2])
        return self.staged_layers[index % 2]

    def after_layer(self, index: int) -> None:
        self.run.weights_used[index % 2] = self.tiers.event()

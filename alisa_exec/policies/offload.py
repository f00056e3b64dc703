"""`accelerate` and `flexgen` in the executor: the KV cache (or a static share of its heads) in CPU memory, streamed.

`accelerate` (the simulator's AcceleratePolicy): every layer's whole KV cache lives in the CPU pool (pinned unless
the workload says `pinned: false`); each decode step copies a layer's cached rows into one of two GPU staging
buffers on the H2D stream one layer ahead, appends the new token there, attends, and writes the new token back
(D2H).

`flexgen` (the simulator's FlexGenPolicy, whose `setting` the LP search chose or the workload pinned):
- KV split along heads: the first `gpu_kv_heads` KV heads of every token in a GPU pool, the other `cpu_kv_heads` in
  the CPU pool;
- weights split by `percent` (wg/wc): the last wc share of the output rows of each layer's four projections lives in
  CPU memory (pinned with `pin_weight`) and is copied into one of two GPU buffers one layer ahead; norms and
  embeddings stay on the GPU;
- the batch runs as `num_gpu_batches` GPU batches of `gpu_batch_size` in FlexGen's zig-zag order: per layer, every
  GPU batch in turn, the CPU heads' KV of the next batch loaded while this one computes;
- `cpu_attention` (FlexGen's --cpu-cache-compute): the CPU heads' query and new K/V go down, attention over them runs
  on the CPU, and the output comes back. It reads the cache in its own dtype (SDPA accumulates in float32) rather
  than copying it to float32 first as FlexGen does, which is about 3x faster on a CPU: if anything, this FlexGen is
  quicker than the original and than the simulator's model of it;
- activations between layers live on the CPU when hc >= 50% (FlexGen places a tensor where its midpoint falls):
  each GPU batch's hidden state goes down after a layer and comes back before the next.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from alisa_exec import ops
from alisa_exec.kv_cache import CPU, GPU, TokenRows, Tiers
from alisa_exec.model import Block, Transformer
from alisa_exec.policies.base import ExecPolicy, Run, kv_rows, split_kv

PROJECTIONS = ("attention.wqkv", "attention.wo", "feed_forward.w_up", "feed_forward.w_down")


@dataclass
class OffloadRun(Run):
    """A streaming run's events: each staging buffer's latest load and the attention that read it last, each
    (layer, GPU batch)'s latest store to the CPU, and FlexGen's weight buffers' latest load and use."""

    stored: list[list] = field(default_factory=list)
    loaded: list = field(default_factory=lambda: [None, None])
    consumed: list = field(default_factory=lambda: [None, None])
    weights_loaded: list = field(default_factory=lambda: [None, None])
    weights_used: list = field(default_factory=lambda: [None, None])


def attend_rows(q: Tensor, rows: Tensor, kv_heads: int, on_host: bool = False) -> Tensor:
    """Decode attention of q [batch, 1, heads, d] over token rows [T, batch, 2 x kv_heads x d], [batch, 1, heads x d]
    out (`on_host`: FlexGen's CPU attention)."""
    return (ops.cpu_attention if on_host else ops.rows_attention)(q, *split_kv(rows.transpose(0, 1), kv_heads))


class AccelerateExec(ExecPolicy):
    name = "accelerate"

    def allocate(self, tiers: Tiers) -> None:
        pinned = self.wl.policy.pinned
        self.cpu = [TokenRows(tiers, CPU, "kv", self.positions, self.batch, self.kv_width, self.dtype, pinned=pinned)
                    for _ in range(self.spec.num_layers)]
        self.stage = [TokenRows(tiers, GPU, "kv_staging", self.positions, self.batch, self.kv_width, self.dtype)
                      for _ in range(2)]

    def kv_bytes(self, step: int) -> tuple[int, int]:
        return 0, (self.prompt_len + step) * self.batch * self.spec.num_layers * self.cpu[0].row_bytes

    def new_run(self, model: Transformer, prompt: Tensor) -> OffloadRun:
        layers = self.spec.num_layers
        return OffloadRun(model, super().new_run(model, prompt).out, stored=[[None] for _ in range(layers)])

    def before_layer(self, index: int, group: int) -> None:
        if not self.run.prefill:
            self.one_layer_ahead(index, self.load)

    def prefill_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        y = self.causal_attention(q, k, v)
        self.run.stored[index][0] = self.tiers.copy_rows((self.cpu[index].data[:self.prompt_len],), (kv_rows(k, v),),
                                                         "d2h", "kv_store", "offloaded_tokens",
                                                         self.prompt_len * self.batch)
        return y

    def load(self, index: int) -> None:
        """Copy layer `index`'s n - 1 cached rows into its staging buffer (H2D stream)."""
        run, buffer = self.run, index % 2
        cached = run.num_tokens - 1
        run.loaded[buffer] = self.tiers.copy_rows((self.stage[buffer].data[:cached],), (self.cpu[index].data[:cached],),
                                                  "h2d", "kv_load", "fetched_tokens", cached * self.batch,
                                                  after=(run.consumed[buffer], run.stored[index][0]))

    def decode_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        run, n = self.run, self.run.num_tokens
        stage = self.stage[index % 2]
        self.tiers.wait("compute", run.loaded[index % 2])
        with self.span("attention", "attention"):
            stage.data[n - 1] = kv_rows(k, v)[0]
            y = attend_rows(q, stage.data[:n], self.spec.num_kv_heads)
        run.consumed[index % 2] = self.tiers.event()
        run.stored[index][0] = self.tiers.copy_rows((self.cpu[index].data[n - 1],), (stage.data[n - 1],), "d2h",
                                                    "kv_store", "offloaded_tokens", self.batch)
        return y


class SplitWeights:
    """The CPU share of one layer's projections: the last rows of each weight (and bias), and where they go on the
    GPU."""

    def __init__(self, tiers: Tiers, layer: Block, share: float, pinned: bool, dtype: torch.dtype):
        self.rows: dict[str, int] = {}
        self.cpu: dict[str, tuple[Tensor, Tensor | None]] = {}
        for name in PROJECTIONS:
            linear: nn.Linear = layer.get_submodule(name)
            total = linear.weight.shape[0]
            cpu_rows = round(total * share)
            self.rows[name] = total - cpu_rows
            if cpu_rows:
                shape = (cpu_rows, linear.weight.shape[1])
                weight = tiers.empty(CPU, "weights", shape, dtype, pinned)
                bias = None if linear.bias is None else tiers.empty(CPU, "weights", (cpu_rows,), dtype, pinned)
                self.cpu[name] = (weight, bias)

    def move_out(self, layer: Block) -> None:
        """Copy the CPU share out of the layer's GPU parameters and keep only the GPU rows there."""
        for name, (weight, bias) in self.cpu.items():
            linear: nn.Linear = layer.get_submodule(name)
            keep = self.rows[name]
            weight.copy_(linear.weight[keep:])
            linear.weight = nn.Parameter(linear.weight[:keep].clone(), requires_grad=False)
            if bias is not None:
                bias.copy_(linear.bias[keep:])
                linear.bias = nn.Parameter(linear.bias[:keep].clone(), requires_grad=False)


class FlexGenExec(ExecPolicy):
    name = "flexgen"
    notes = ("flexgen: each layer projection's CPU share is its last wc share of output rows; norms and embeddings "
             "stay on the GPU (the simulator moves no embedding weights either)",)

    def __init__(self, wl, sim, dtype):
        super().__init__(wl, sim, dtype)
        self.gbs, self.ngb = sim.gbs, sim.ngb
        self.gpu_heads, self.cpu_heads = sim.gpu_kv_heads, sim.cpu_kv_heads
        self.cpu_attention = sim.cpu_attention
        self.weight_share = sim.weights_cpu_share
        self.hidden_on_cpu = sim.hidden_on_cpu
        self.head_dim = self.spec.dim_per_head

    # ---- memory --------------------------------------------------------------------------------------------------
    def weight_placement(self, model: Transformer, tiers: Tiers) -> None:
        self.split: list[SplitWeights | None] = [None] * self.spec.num_layers
        if self.weight_share > 0:
            self.split = [SplitWeights(tiers, layer, self.weight_share, self.wl.policy.pin_weight, self.dtype)
                          for layer in model.layers]
            if not tiers.dry:
                for layer, split in zip(model.layers, self.split):
                    split.move_out(layer)
        gpu = sum(p.numel() * p.element_size() for p in model.parameters())
        moved = sum(w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
                    for split in self.split if split for w, b in split.cpu.values())
        tiers.count(GPU, "weights", gpu - (moved if tiers.dry else 0))
        self.weight_stage = []
        if self.weight_share > 0:
            for _ in range(2):
                self.weight_stage.append({name: (tiers.empty(GPU, "weight_staging", w.shape, self.dtype),
                                                 None if b is None else tiers.empty(GPU, "weight_staging", b.shape,
                                                                                    self.dtype))
                                          for name, (w, b) in self.split[0].cpu.items()})

    def allocate(self, tiers: Tiers) -> None:
        layers, P = range(self.spec.num_layers), self.positions

        def pools(tier: str, heads: int) -> list[list[TokenRows]]:
            if not heads:
                return []
            return [[TokenRows(tiers, tier, "kv", P, self.gbs, 2 * heads * self.head_dim, self.dtype)
                     for _ in range(self.ngb)] for _ in layers]

        self.gpu_kv, self.cpu_kv = pools(GPU, self.gpu_heads), pools(CPU, self.cpu_heads)
        self.stage = []
        if self.cpu_heads and not self.cpu_attention:
            self.stage = [TokenRows(tiers, GPU, "kv_staging", P, self.gbs, 2 * self.cpu_heads * self.head_dim,
                                    self.dtype) for _ in range(2)]
        home = (self.batch, self.prompt_len, self.spec.hidden_size)
        if self.hidden_on_cpu:
            self.hidden_home = tiers.empty(CPU, "activations_home", home, self.dtype)
        else:  # the layer loop's hidden states of every GPU batch, held on the GPU between layers
            tiers.count(GPU, "activations_home", math.prod(home) * self.dtype.itemsize)

    def kv_bytes(self, step: int) -> tuple[int, int]:
        per = (self.prompt_len + step) * self.batch * self.spec.num_layers * 2 * self.head_dim * self.dtype.itemsize
        return per * self.gpu_heads, per * self.cpu_heads

    # ---- the block schedule ----------------------------------------------------------------------------------------
    def new_run(self, model: Transformer, prompt: Tensor) -> OffloadRun:
        layers = self.spec.num_layers
        return OffloadRun(model, super().new_run(model, prompt).out, stored=[[None] * self.ngb for _ in range(layers)])

    @property
    def row_groups(self) -> tuple[slice, ...]:
        """The GPU batches in FlexGen's zig-zag order: per layer, every GPU batch in turn."""
        return tuple(slice(k * self.gbs, (k + 1) * self.gbs) for k in range(self.ngb))

    def before_layer(self, index: int, group: int) -> None:
        """Weights one layer ahead, the CPU heads' KV one GPU batch ahead."""
        layers = self.spec.num_layers
        if index == 0 and group == 0:
            self.load_weights(0)
            self.load_kv(0, 0)
        if group == 0 and index + 1 < layers:
            self.load_weights(index + 1)
        following = (index, group + 1) if group + 1 < self.ngb else (index + 1, 0)
        if following[0] < layers:
            self.load_kv(*following)

    def after_layer(self, index: int) -> None:
        self.run.weights_used[index % 2] = self.tiers.event()

    def layer_input(self, x: Tensor, rows: slice, index: int) -> Tensor:
        return self.hidden_in(x, rows, index)

    def after_group(self, index: int, group: int, y: Tensor) -> None:
        self.hidden_out(y, self.row_groups[group])

    def hidden_in(self, x: Tensor, rows: slice, index: int) -> Tensor:
        """A GPU batch's hidden state as the layer reads it: from its CPU home after the first layer, when the plan
        keeps activations on the CPU."""
        if not self.hidden_on_cpu or index == 0:
            return x[rows]
        home = self.hidden_home[rows, :x.shape[1]]
        buffer = torch.empty_like(x[rows])
        self.tiers.wait("compute", self.tiers.copy(buffer, home, "h2d", "hidden_load"))
        return buffer

    def hidden_out(self, y: Tensor, rows: slice) -> None:
        """A GPU batch's layer output goes to its CPU home, when the plan keeps activations on the CPU."""
        if self.hidden_on_cpu:
            self.tiers.host_wait(self.tiers.copy(self.hidden_home[rows, :y.shape[1]], y, "d2h", "hidden_store"))

    def load_weights(self, index: int) -> None:
        """Copy layer `index`'s CPU share of the weights into a GPU buffer (H2D stream, one layer ahead)."""
        if not self.weight_stage:
            return
        run, buffer = self.run, index % 2
        for name, (weight, bias) in self.split[index].cpu.items():
            stage_weight, stage_bias = self.weight_stage[buffer][name]
            after = (run.weights_used[buffer],)
            run.weights_loaded[buffer] = self.tiers.copy(stage_weight, weight, "h2d", "weight_load", after)
            if bias is not None:
                run.weights_loaded[buffer] = self.tiers.copy(stage_bias, bias, "h2d", "weight_load", after)

    def project(self, index: int, name: str, layer: Block, x: Tensor) -> Tensor:
        """A projection whose last output rows may live on the CPU (then read from the staged copy)."""
        linear: nn.Linear = layer.get_submodule(name)
        y = ops.project(linear, x)
        if self.weight_stage and name in self.split[index].cpu:
            self.tiers.wait("compute", self.run.weights_loaded[index % 2])
            weight, bias = self.weight_stage[index % 2][name]
            y = torch.cat((y, ops.project(linear, x, weight, bias)), dim=-1)
        return y

    # ---- KV ----------------------------------------------------------------------------------------------------------
    def load_kv(self, index: int, k: int) -> None:
        """Copy the CPU heads' cached KV of GPU batch k of layer `index` into a staging buffer (decode steps)."""
        run = self.run
        if not self.stage or run.prefill:
            return
        buffer, cached = (index * self.ngb + k) % 2, run.num_tokens - 1
        run.loaded[buffer] = self.tiers.copy_rows((self.stage[buffer].data[:cached],),
                                                  (self.cpu_kv[index][k].data[:cached],), "h2d", "kv_load",
                                                  "fetched_tokens", cached * self.gbs,
                                                  after=(run.consumed[buffer], run.stored[index][k]))

    def split_rows(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Token rows [seq, gbs, width] of the GPU heads and of the CPU heads."""
        g = self.gpu_heads
        return kv_rows(k[:, :, :g], v[:, :, :g]), kv_rows(k[:, :, g:], v[:, :, g:])

    def prefill_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        gpu_rows, cpu_rows = self.split_rows(k, v)
        n = self.prompt_len
        y = self.causal_attention(q, k, v)
        if self.gpu_heads:
            self.gpu_kv[index][group].data[:n] = gpu_rows
        if self.cpu_heads:
            self.run.stored[index][group] = self.tiers.copy_rows((self.cpu_kv[index][group].data[:n],), (cpu_rows,),
                                                                 "d2h", "kv_store", "offloaded_tokens", n * self.gbs)
        return y

    def decode_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        run, n = self.run, self.run.num_tokens
        gpu_rows, cpu_rows = self.split_rows(k, v)
        split = self.gpu_heads * (self.spec.num_heads // self.spec.num_kv_heads)
        outputs = []
        if self.gpu_heads:
            with self.span("attention", "attention"):
                pool = self.gpu_kv[index][group].data
                pool[n - 1] = gpu_rows[0]
                outputs.append(attend_rows(q[:, :, :split], pool[:n], self.gpu_heads))
        if self.cpu_heads and self.cpu_attention:
            outputs.append(self.cpu_attend(index, group, n, q[:, :, split:], cpu_rows[0]))
        elif self.cpu_heads:
            buffer = (index * self.ngb + group) % 2
            stage = self.stage[buffer].data
            self.tiers.wait("compute", run.loaded[buffer])
            with self.span("attention_cpu_heads", "attention"):
                stage[n - 1] = cpu_rows[0]
                outputs.append(attend_rows(q[:, :, split:], stage[:n], self.cpu_heads))
            run.consumed[buffer] = self.tiers.event()
            run.stored[index][group] = self.tiers.copy_rows((self.cpu_kv[index][group].data[n - 1],), (stage[n - 1],),
                                                            "d2h", "kv_store", "offloaded_tokens", self.gbs)
        return torch.cat(outputs, dim=-1)

    def cpu_attend(self, index: int, k_batch: int, n: int, q: Tensor, new_rows: Tensor) -> Tensor:
        """Attention of the CPU heads on the CPU over the cache: q and the new K/V go down, the output comes back."""
        tiers, pool = self.tiers, self.cpu_kv[index][k_batch].data
        q_host = tiers.pinned(torch.empty(q.shape, dtype=q.dtype))
        tiers.host_wait(tiers.copy(q_host, q, "d2h", "qkv_to_cpu", pinned=True),
                        tiers.copy_rows((pool[n - 1],), (new_rows,), "d2h", "qkv_to_cpu", "offloaded_tokens", self.gbs))
        with self.span("cpu_attention", "cpu", track="cpu"):
            y = attend_rows(q_host, pool[:n], self.cpu_heads, on_host=True)
        out = torch.empty(y.shape, dtype=y.dtype, device=q.device)
        tiers.wait("compute", tiers.copy(out, tiers.pinned(y), "h2d", "attention_to_gpu", pinned=True))
        return out

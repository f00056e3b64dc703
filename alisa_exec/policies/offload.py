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

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from alisa_exec.kv_cache import CPU, GPU, TokenRows, Tiers
from alisa_exec.model import Block, Transformer
from alisa_exec.policies.base import ExecPolicy, StepLog, kv_rows, split_kv

PROJECTIONS = ("attention.wqkv", "attention.wo", "feed_forward.w_up", "feed_forward.w_down")


def attend_rows(q: Tensor, rows: Tensor, kv_heads: int) -> Tensor:
    """Decode attention of q [batch, 1, heads, d] over token rows [T, batch, 2 x kv_heads x d], [batch, 1, heads x d]
    out."""
    keys, values = split_kv(rows.transpose(0, 1), kv_heads)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=kv_heads != q.shape[2])
    return y.transpose(1, 2).flatten(2)


class AccelerateExec(ExecPolicy):
    name = "accelerate"

    def allocate(self, tiers: Tiers) -> None:
        pinned = self.wl.policy.pinned
        self.cpu = [TokenRows(tiers, CPU, "kv", self.positions, self.batch, self.kv_width, self.dtype, pinned=pinned)
                    for _ in range(self.spec.num_layers)]
        self.stage = [TokenRows(tiers, GPU, "kv_staging", self.positions, self.batch, self.kv_width, self.dtype)
                      for _ in range(2)]

    def kv_bytes(self, tokens: int) -> tuple[int, int]:
        return 0, tokens * self.batch * self.spec.num_layers * self.cpu[0].row_bytes

    def generate(self, model: Transformer, prompt: Tensor, log: StepLog, decode_steps: int | None = None) -> Tensor:
        layers = self.spec.num_layers
        self.loaded, self.consumed, self.stored = [None, None], [None, None], [None] * layers
        out = torch.empty(self.batch, self.gen_len, dtype=torch.long, device=prompt.device)
        s = self.prompt_len
        log.begin("prefill", "prefill", 2, self.batch * s, self.batch)
        positions = torch.arange(s, device=prompt.device)
        rope = model.rope(positions)
        x = self.embed(model, prompt, positions)
        for index, layer in enumerate(model.layers):
            self.timeline.layer = index
            x = self.layer(layer, x, rope, lambda q, k, v, index=index: self.prefill_attend(index, q, k, v))
        self.timeline.layer = -1
        out[:, :1] = self.sample(model, x)
        log.end(*self.kv_bytes(s))
        for step in range(1, self.last_step(decode_steps) + 1):
            n = s + step
            log.begin("decode", f"decode {step}", 2, self.batch, self.batch)
            positions = torch.tensor([n - 1], device=prompt.device)
            rope = model.rope(positions)
            self.load(0, n)
            x = self.embed(model, out[:, step - 1:step], positions)
            for index, layer in enumerate(model.layers):
                self.timeline.layer = index
                if index + 1 < layers:
                    self.load(index + 1, n)
                x = self.layer(layer, x, rope, lambda q, k, v, index=index: self.attend(index, n, q, k, v))
            self.timeline.layer = -1
            out[:, step:step + 1] = self.sample(model, x)
            log.end(*self.kv_bytes(n), {"fetched_tokens": (n - 1) * self.batch * layers,
                                        "offloaded_tokens": self.batch * layers})
        return out

    def prefill_attend(self, index: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        y = self.causal_attention(q, k, v)
        self.stored[index] = self.tiers.copy(self.cpu[index].data[:self.prompt_len], kv_rows(k, v), "d2h", "kv_store")
        return y

    def load(self, index: int, n: int) -> None:
        """Copy layer `index`'s n - 1 cached rows into its staging buffer (H2D stream)."""
        buffer = index % 2
        self.loaded[buffer] = self.tiers.copy(self.stage[buffer].data[:n - 1], self.cpu[index].data[:n - 1], "h2d",
                                              "kv_load", after=(self.consumed[buffer], self.stored[index]))

    def attend(self, index: int, n: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        stage = self.stage[index % 2]
        self.tiers.wait("compute", self.loaded[index % 2])
        with self.span("attention", "attention"):
            stage.data[n - 1] = kv_rows(k, v)[0]
            y = attend_rows(q, stage.data[:n], self.spec.num_kv_heads)
        self.consumed[index % 2] = self.tiers.event()
        self.stored[index] = self.tiers.copy(self.cpu[index].data[n - 1], stage.data[n - 1], "d2h", "kv_store")
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
        self.hidden_on_cpu = sim.activations_cpu_share >= 0.5
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
        if self.hidden_on_cpu:
            self.hidden_home = tiers.empty(CPU, "activations_home", (self.batch, self.prompt_len,
                                                                     self.spec.hidden_size), self.dtype)

    def kv_bytes(self, tokens: int) -> tuple[int, int]:
        per = tokens * self.batch * self.spec.num_layers * 2 * self.head_dim * self.dtype.itemsize
        return per * self.gpu_heads, per * self.cpu_heads

    # ---- the block schedule ----------------------------------------------------------------------------------------
    def generate(self, model: Transformer, prompt: Tensor, log: StepLog, decode_steps: int | None = None) -> Tensor:
        self.model = model
        layers = self.spec.num_layers
        self.weights_loaded, self.weights_used = [None, None], [None, None]
        self.loaded, self.consumed = [None, None], [None, None]
        self.stored = [[None] * self.ngb for _ in range(layers)]
        out = torch.empty(self.batch, self.gen_len, dtype=torch.long, device=prompt.device)
        phase = self.sim.phase(0)
        s = self.prompt_len
        log.begin("prefill", "prefill", phase, self.batch * s, self.batch)
        self.counters = {"fetched_tokens": 0, "offloaded_tokens": 0}
        out[:, :1] = self.run_block(prompt, torch.arange(s, device=prompt.device), s)
        log.end(*self.kv_bytes(s), self.counters)
        for step in range(1, self.last_step(decode_steps) + 1):
            n = s + step
            log.begin("decode", f"decode {step}", phase, self.batch, self.batch)
            self.counters = {"fetched_tokens": 0, "offloaded_tokens": 0}
            positions = torch.tensor([n - 1], device=prompt.device)
            out[:, step:step + 1] = self.run_block(out[:, step - 1:step], positions, n)
            log.end(*self.kv_bytes(n), self.counters)
        return out

    def run_block(self, tokens: Tensor, positions: Tensor, n: int) -> Tensor:
        """One step of the whole block: layer by layer, GPU batch by GPU batch (zig-zag); n tokens cached after it."""
        model, layers = self.model, self.spec.num_layers
        rope = model.rope(positions)
        x = self.embed(model, tokens, positions)
        self.load_weights(0)
        self.load_kv(0, 0, n)
        for index, layer in enumerate(model.layers):
            self.timeline.layer = index
            if index + 1 < layers:
                self.load_weights(index + 1)
            for k in range(self.ngb):
                following = (index, k + 1) if k + 1 < self.ngb else (index + 1, 0)
                if following[0] < layers:
                    self.load_kv(*following, n)
                rows = slice(k * self.gbs, (k + 1) * self.gbs)
                x_in = self.hidden_in(x, rows, index)
                x[rows] = self.block_layer(index, layer, x_in, rope,
                                           lambda q, kk, v, index=index, k=k: self.attend(index, k, n, q, kk, v))
                self.hidden_out(x, rows)
            self.weights_used[index % 2] = self.tiers.event()
        self.timeline.layer = -1
        return self.sample(model, x)

    def hidden_in(self, x: Tensor, rows: slice, index: int) -> Tensor:
        """A GPU batch's hidden state as the layer reads it: from its CPU home after the first layer, when the plan
        keeps activations on the CPU."""
        if not self.hidden_on_cpu or index == 0:
            return x[rows]
        home = self.hidden_home[rows, :x.shape[1]]
        buffer = torch.empty_like(x[rows])
        self.tiers.wait("compute", self.tiers.copy(buffer, home, "h2d", "hidden_load"))
        return buffer

    def hidden_out(self, x: Tensor, rows: slice) -> None:
        if self.hidden_on_cpu:
            self.tiers.host_wait(self.tiers.copy(self.hidden_home[rows, :x.shape[1]], x[rows], "d2h", "hidden_store"))

    def load_weights(self, index: int) -> None:
        """Copy layer `index`'s CPU share of the weights into a GPU buffer (H2D stream, one layer ahead)."""
        if not self.weight_stage:
            return
        buffer = index % 2
        for name, (weight, bias) in self.split[index].cpu.items():
            stage_weight, stage_bias = self.weight_stage[buffer][name]
            after = (self.weights_used[buffer],)
            self.weights_loaded[buffer] = self.tiers.copy(stage_weight, weight, "h2d", "weight_load", after)
            if bias is not None:
                self.weights_loaded[buffer] = self.tiers.copy(stage_bias, bias, "h2d", "weight_load", after)

    def linear(self, index: int, name: str, layer: Block, x: Tensor) -> Tensor:
        """A projection whose last output rows may live on the CPU (then read from the staged copy)."""
        linear: nn.Linear = layer.get_submodule(name)
        y = linear(x)
        if self.weight_stage and name in self.split[index].cpu:
            self.tiers.wait("compute", self.weights_loaded[index % 2])
            weight, bias = self.weight_stage[index % 2][name]
            y = torch.cat((y, F.linear(x, weight, bias)), dim=-1)
        return y

    def block_layer(self, index: int, layer: Block, x: Tensor, rope, attend) -> Tensor:
        with self.span("qkv_proj", "gemm"):
            qkv = self.linear(index, "attention.wqkv", layer, layer.attention_norm(x))
            q, k, v = layer.attention.split_heads(qkv, rope)
        y = attend(q, k, v)
        with self.span("out_proj_mlp", "gemm"):
            h = x + self.linear(index, "attention.wo", layer, y)
            up = self.linear(index, "feed_forward.w_up", layer, layer.ffn_norm(h))
            return h + self.linear(index, "feed_forward.w_down", layer, layer.feed_forward.activate(up))

    # ---- KV ----------------------------------------------------------------------------------------------------------
    def load_kv(self, index: int, k: int, n: int) -> None:
        """Copy the CPU heads' cached KV of GPU batch k of layer `index` into a staging buffer (decode steps)."""
        if not self.stage or n == self.prompt_len:
            return
        buffer = (index * self.ngb + k) % 2
        self.loaded[buffer] = self.tiers.copy(self.stage[buffer].data[:n - 1], self.cpu_kv[index][k].data[:n - 1],
                                              "h2d", "kv_load", after=(self.consumed[buffer], self.stored[index][k]))
        self.counters["fetched_tokens"] += (n - 1) * self.gbs

    def split_rows(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Token rows [seq, gbs, width] of the GPU heads and of the CPU heads."""
        g = self.gpu_heads
        return kv_rows(k[:, :, :g], v[:, :, :g]), kv_rows(k[:, :, g:], v[:, :, g:])

    def attend(self, index: int, k_batch: int, n: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        gpu_rows, cpu_rows = self.split_rows(k, v)
        group = self.spec.num_heads // self.spec.num_kv_heads
        split = self.gpu_heads * group
        prefill = q.shape[1] > 1
        if prefill:
            y = self.causal_attention(q, k, v)
            if self.gpu_heads:
                self.gpu_kv[index][k_batch].data[:n] = gpu_rows
            if self.cpu_heads:
                self.stored[index][k_batch] = self.tiers.copy(self.cpu_kv[index][k_batch].data[:n], cpu_rows, "d2h",
                                                              "kv_store")
                self.counters["offloaded_tokens"] += n * self.gbs
            return y
        outputs = []
        if self.gpu_heads:
            with self.span("attention", "attention"):
                pool = self.gpu_kv[index][k_batch].data
                pool[n - 1] = gpu_rows[0]
                outputs.append(attend_rows(q[:, :, :split], pool[:n], self.gpu_heads))
        if self.cpu_heads:
            self.counters["offloaded_tokens"] += self.gbs
            if self.cpu_attention:
                outputs.append(self.cpu_attend(index, k_batch, n, q[:, :, split:], cpu_rows[0]))
            else:
                buffer = (index * self.ngb + k_batch) % 2
                stage = self.stage[buffer].data
                self.tiers.wait("compute", self.loaded[buffer])
                with self.span("attention_cpu_heads", "attention"):
                    stage[n - 1] = cpu_rows[0]
                    outputs.append(attend_rows(q[:, :, split:], stage[:n], self.cpu_heads))
                self.consumed[buffer] = self.tiers.event()
                self.stored[index][k_batch] = self.tiers.copy(self.cpu_kv[index][k_batch].data[n - 1], stage[n - 1],
                                                              "d2h", "kv_store")
        return torch.cat(outputs, dim=-1)

    def cpu_attend(self, index: int, k_batch: int, n: int, q: Tensor, new_rows: Tensor) -> Tensor:
        """Attention of the CPU heads on the CPU over the cache: q and the new K/V go down, the output comes back."""
        tiers, pool = self.tiers, self.cpu_kv[index][k_batch].data
        q_host = torch.empty(q.shape, dtype=q.dtype, pin_memory=tiers.cuda)
        tiers.host_wait(tiers.copy(q_host, q, "d2h", "qkv_to_cpu"), tiers.copy(pool[n - 1], new_rows, "d2h",
                                                                                "qkv_to_cpu"))
        with self.span("cpu_attention", "cpu", track="cpu"):
            y = attend_rows(q_host, pool[:n], self.cpu_heads)
        out = torch.empty(y.shape, dtype=y.dtype, device=q.device)
        tiers.wait("compute", tiers.copy(out, y.pin_memory() if tiers.cuda else y, "h2d", "attention_to_gpu"))
        return out

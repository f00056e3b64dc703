"""`alisa` in the executor: Sparse Window Attention over a GPU window and a pinned CPU pool, in three phases.

Every placement decision is the simulator's (`alisa_sim.policies.alisa.AlisaPolicy`, `self.sim`):
`residency(step)` says how many of the n tokens of every sequence are on the GPU (the newest), live on the CPU, and
deleted (the oldest); the planner's p1, p2, alpha and beta are in it. `selected(n)` is the number attended.

The cache, per layer:
- a GPU window: a ring of token rows [G, batch, 2 x kv_dim], G the most tokens any step keeps on the GPU plus one
  slot, so writing the newest token never overwrites a row that is still being copied out;
- a CPU pool of token rows by position (pinned). A token is copied there (D2H stream) one step before the plan moves
  it off the GPU, so a step's fetches never wait on that step's own offloads;
- with Phase III in the plan, the layer inputs of the tokens that will be deleted, written to the CPU when computed
  (the simulator's `recompute_source: layer_input`);
- with kv_sparsity > 0, the kernels' `LocalAttentionSum` (the windowed attention sum and the recent + top-k pick).
K/V rows and layer inputs are INT8 in both tiers when the plan says `int8`.

A decode step, per layer: the positions selected at the end of the previous step are split by residency. The live
CPU ones are gathered on the host from the pinned pool and copied into a GPU staging buffer on the H2D stream one
layer ahead (two buffers, each refilled once the attention two layers back has read it); the deleted ones' layer
inputs likewise, and their K and V are recomputed on the GPU (norm, K/V projection, rotary). The new token's K/V
goes into the window. All selected rows are packed (window rows gathered on the GPU, dequantized when INT8) and
attended densely (the simulator's `attention_kernel: gather`); the head-summed probabilities update the selection,
which then picks the next step's positions (copied to the host for the next step's gathers when tokens live on the
CPU). At kv_sparsity 0 every token is attended and no selection state is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alisa_exec.kernels import LocalAttentionSum, dense_decode_attention, prefill_window_rows
from alisa_exec.kv_cache import CPU, GPU, INT8_GROUP, TokenRows, Tiers
from alisa_exec.model import Transformer
from alisa_exec.policies.base import ExecPolicy, StepLog, kv_rows, split_kv, unsupported

COUNTERS = ("fetched_tokens", "recomputed_tokens", "offloaded_tokens")


class AlisaExec(ExecPolicy):
    name = "alisa"
    notes = ("alisa: attention packs the selected rows, then attends densely (the simulator's attention_kernel "
             "'gather'), whatever attention_kernel says",
             "alisa: fetched_tokens, recomputed_tokens and offloaded_tokens count token rows (one token of one layer "
             "of one sequence) moved H2D, recomputed, and moved D2H")

    def __init__(self, wl, sim, dtype):
        super().__init__(wl, sim, dtype)
        cfg = sim.cfg
        if not cfg.dynamic_scheduling:
            raise unsupported("dynamic_scheduling", False, "the static head split is the paper's ablation")
        if cfg.storage != "all":
            raise unsupported("storage", cfg.storage, "which offloaded tokens to drop for good is not defined")
        if cfg.selection != "per_layer":
            raise unsupported("selection", cfg.selection, "the executor selects one token set per layer")
        if cfg.recompute_source != "layer_input":
            raise unsupported("recompute_source", cfg.recompute_source, "the executor recomputes from layer inputs")
        self.sparsity, self.int8 = cfg.kv_sparsity, cfg.int8
        self.residency = [sim.residency(step) for step in range(self.decode_steps + 1)]
        self.cpu_end = [self.prompt_len + step - r.on_gpu for step, r in enumerate(self.residency)]
        self.deleted_end = [r.deleted for r in self.residency]
        self.input_end = max(self.deleted_end)  # positions whose layer inputs are kept for recompute
        self.offload_end = max(self.cpu_end)
        self.window = min(self.positions, max(r.on_gpu for r in self.residency) + 1)
        self.attended = sim.selected(self.positions)[1]

    # ---- memory --------------------------------------------------------------------------------------------------
    def allocate(self, tiers: Tiers) -> None:
        spec, batch, layers = self.spec, self.batch, range(self.spec.num_layers)
        group = min(INT8_GROUP, spec.dim_per_head)
        self.ring = [TokenRows(tiers, GPU, "kv", self.window, batch, self.kv_width, self.dtype, self.int8, group)
                     for _ in layers]
        self.cpu = [TokenRows(tiers, CPU, "kv", self.offload_end, batch, self.kv_width, self.dtype, self.int8, group)
                    for _ in layers] if self.offload_end else []
        self.inputs = [TokenRows(tiers, CPU, "layer_inputs", self.input_end, batch, spec.hidden_size, self.dtype,
                                 self.int8) for _ in layers] if self.input_end else []
        self.selection = []
        if self.sparsity > 0:
            for _ in layers:
                state = LocalAttentionSum(batch, self.positions, self.sparsity, tiers.gpu_device, self.prompt_len)
                tiers.count(GPU, "selection_state", sum(t.numel() * t.element_size() for t in
                                                        (state.scores, state.ring_positions, state.ring_probs)))
                self.selection.append(state)
        rows = batch * self.attended  # the most rows one layer can fetch or recompute in a step
        if self.offload_end:
            self.kv_stage = [self.ring[0].staging(tiers, GPU, "kv_staging", rows) for _ in range(2)]
            self.kv_host = [self.cpu[0].staging(tiers, CPU, "kv_staging", rows) for _ in range(2)]
            # (sequence, slot in the attended list, position) of each staged row, one contiguous block per copy
            self.index_stage = [tiers.empty(GPU, "kv_staging", (3 * rows,), torch.int64) for _ in range(2)]
            self.index_host = [tiers.empty(CPU, "kv_staging", (3 * rows,), torch.int64) for _ in range(2)]
            self.selected_host = tiers.empty(CPU, "selection_indices", (spec.num_layers, rows), torch.int32)
        self.input_stage = self.input_host = None
        if self.input_end:
            self.input_stage = [self.inputs[0].staging(tiers, GPU, "kv_staging", rows) for _ in range(2)]
            self.input_host = [self.inputs[0].staging(tiers, CPU, "kv_staging", rows) for _ in range(2)]
        self.workspace = tiers.empty(GPU, "attention_workspace", (batch, self.attended, self.kv_width), self.dtype)

    # ---- the run ---------------------------------------------------------------------------------------------------
    def generate(self, model: Transformer, prompt: Tensor, log: StepLog, decode_steps: int | None = None) -> Tensor:
        self.model = model
        layers = self.spec.num_layers
        for index, state in enumerate(self.selection):  # a fresh selection state for every run (one at a time)
            self.selection[index] = None
            self.selection[index] = LocalAttentionSum(self.batch, self.positions, self.sparsity, state.scores.device,
                                                      self.prompt_len)
        self.selected_device: list[Tensor | None] = [None] * layers
        self.selected_event = [None] * layers  # the step's selection has reached the host
        self.offload_event = [None] * layers  # the latest offload of a layer has landed in the CPU pool
        self.fetched = [None, None]  # the latest H2D into each staging buffer
        self.consumed = [None, None]  # the attention that read each staging buffer last
        self.pending: list[tuple | None] = [None] * layers
        out = torch.empty(self.batch, self.gen_len, dtype=torch.long, device=prompt.device)
        out[:, :1] = self.prefill(prompt, log)
        for step in range(1, self.last_step(decode_steps) + 1):
            out[:, step:step + 1] = self.decode(out[:, step - 1:step], step, log)
        return out

    def needs_host(self, step: int) -> bool:
        """Whether a step reads anything from the CPU (so its selection must reach the host)."""
        return step <= self.decode_steps and self.cpu_end[step] > 0

    def lookahead_end(self, step: int, computed: int) -> int:
        """Offload target after `step`: every position the next step keeps off the GPU (that exists already)."""
        following = min(step + 1, self.decode_steps)
        return min(computed, max(self.cpu_end[step], self.cpu_end[following]))

    def prefill(self, prompt: Tensor, log: StepLog) -> Tensor:
        model, s = self.model, self.prompt_len
        log.begin("prefill", "prefill", self.residency[0].phase, self.batch * s, self.batch)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.offloaded = 0
        self.offload_to = self.lookahead_end(0, s)
        positions = torch.arange(s, device=prompt.device)
        rope = model.rope(positions)
        x = self.embed(model, prompt, positions)
        for index, layer in enumerate(model.layers):
            self.timeline.layer = index
            x = self.layer(layer, x, rope, lambda q, k, v, index=index, x_in=x: self.prefill_attend(index, x_in, q, k,
                                                                                                    v))
        self.timeline.layer = -1
        token = self.sample(model, x)
        self.offloaded = self.offload_to
        log.end(*self.kv_bytes(0), self.counters)
        return token

    def prefill_attend(self, index: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s, tiers = self.prompt_len, self.tiers
        y = self.causal_attention(q, k, v)
        ring = self.ring[index]
        with self.span("kv_store", "elementwise"):
            stored = ring.encode(kv_rows(k, v))  # [s, batch, width] per part
            kept = torch.arange(self.cpu_end[0], s, device=q.device)
            for part, rows in zip(ring.parts, stored):
                part[kept % self.window] = rows[self.cpu_end[0]:]
        if self.offload_to:
            for part, rows in zip(self.cpu[index].parts, stored):
                self.offload_event[index] = tiers.copy(part[:self.offload_to], rows[:self.offload_to], "d2h",
                                                       "kv_offload")
            self.counters["offloaded_tokens"] += self.offload_to * self.batch
        if self.input_end:
            self.store_inputs(index, x_in, 0)
        if self.selection:
            with self.span("selection", "selection"):
                state = self.selection[index]
                state.seed(prefill_window_rows(q.transpose(1, 2), k.transpose(1, 2), state.capacity))
                self.select_next(index, s + 1, 1)
        return y

    def store_inputs(self, index: int, x_in: Tensor, first: int) -> None:
        """Keep the layer inputs of positions first.. (those the plan will delete) on the CPU."""
        rows = x_in.transpose(0, 1)[:max(0, self.input_end - first)]
        if not len(rows):
            return
        inputs = self.inputs[index]
        with self.span("input_store", "elementwise"):
            stored = inputs.encode(rows)
        for part, encoded in zip(inputs.parts, stored):
            # The host waits on a layer's offload event before gathering from its CPU pools, inputs included.
            self.offload_event[index] = self.tiers.copy(part[first:first + len(rows)], encoded, "d2h", "input_offload")

    def select_next(self, index: int, num_tokens: int, step: int) -> None:
        """Pick the positions layer `index` attends at `step` (with num_tokens cached) and send them to the host when
        that step reads from the CPU."""
        if step > self.decode_steps:
            return
        selected = self.selection[index].select(num_tokens)
        self.selected_device[index] = selected
        if self.needs_host(step):
            host = self.selected_host[index, :selected.numel()]
            self.selected_event[index] = self.tiers.copy(host, selected.flatten(), "d2h", "selection_to_host")
            self.tiers.moved["d2h"] -= selected.numel() * selected.element_size()  # indices, not KV: not counted

    def selected_positions(self, index: int, num_tokens: int, host: bool) -> Tensor:
        """The positions a layer attends this step, [batch, T], on the device or on the host."""
        if not self.selection:
            device = "cpu" if host else self.workspace.device
            return torch.arange(num_tokens, dtype=torch.int32, device=device).expand(self.batch, num_tokens)
        if not host:
            return self.selected_device[index]
        self.tiers.host_wait(self.selected_event[index])
        tokens = self.sim.selected(num_tokens)[1]
        return self.selected_host[index, :self.batch * tokens].view(self.batch, tokens)

    def decode(self, token: Tensor, step: int, log: StepLog) -> Tensor:
        model = self.model
        n = self.prompt_len + step
        log.begin("decode", f"decode {step}", self.residency[step].phase, self.batch, self.batch)
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.offload_to = self.lookahead_end(step, n)
        # Live CPU rows [deleted_end, fetch_end) come from the pool; the newest token is always read from the window.
        self.fetch_end = min(self.cpu_end[step], self.offloaded)
        self.step, self.num_tokens = step, n
        positions = torch.tensor([n - 1], device=token.device)
        rope = model.rope(positions)
        self.prefetch(0)
        x = self.embed(model, token, positions)
        for index, layer in enumerate(model.layers):
            self.timeline.layer = index
            if index + 1 < len(model.layers):
                self.prefetch(index + 1)
            x = self.layer(layer, x, rope, lambda q, k, v, index=index, x_in=x: self.attend(index, x_in, q, k, v))
        self.timeline.layer = -1
        token = self.sample(model, x)
        self.offloaded = max(self.offloaded, self.offload_to)
        log.end(*self.kv_bytes(step), self.counters)
        return token

    def prefetch(self, index: int) -> None:
        """Gather layer `index`'s selected CPU rows (and the layer inputs of its selected deleted tokens) on the host
        and start their copy into a GPU staging buffer."""
        deleted_end, fetch_end, tiers = self.deleted_end[self.step], self.fetch_end, self.tiers
        if fetch_end <= deleted_end and deleted_end == 0:
            self.pending[index] = None
            return
        buffer = index % 2
        with self.span("host_gather", "cpu", track="cpu"):
            tiers.host_wait(self.offload_event[index], self.fetched[buffer])
            selected = self.selected_positions(index, self.num_tokens, host=True)
            live = (selected >= deleted_end) & (selected < fetch_end)
            deleted = selected < deleted_end
            entries = []
            for mask, rows, host in ((live, self.cpu, self.kv_host), (deleted, self.inputs, self.input_host)):
                seq, slot = mask.nonzero(as_tuple=True)
                position = selected[seq, slot].long()
                if len(seq):
                    rows[index].flat_rows(position * self.batch + seq, tuple(p[:len(seq)] for p in host[buffer]))
                entries.append((seq, slot, position))
            fetched, recomputed = len(entries[0][0]), len(entries[1][0])
            total = fetched + recomputed
            if total:
                indices = torch.stack([torch.cat(parts) for parts in zip(*entries)])
                self.index_host[buffer][:3 * total].view(3, total).copy_(indices)
        after = (self.consumed[buffer],)
        for stage, host, count, name in ((self.kv_stage, self.kv_host, fetched, "kv_fetch"),
                                         (self.input_stage, self.input_host, recomputed, "input_fetch")):
            if count:
                for dst, src in zip(stage[buffer], host[buffer]):
                    self.fetched[buffer] = tiers.copy(dst[:count], src[:count], "h2d", name, after)
        if total:
            self.fetched[buffer] = tiers.copy(self.index_stage[buffer][:3 * total], self.index_host[buffer][:3 * total],
                                              "h2d", "indices", after)
            tiers.moved["h2d"] -= 3 * total * 8  # indices, not KV: not counted
        self.counters["fetched_tokens"] += fetched
        self.counters["recomputed_tokens"] += recomputed
        self.pending[index] = (buffer, fetched, recomputed, self.fetched[buffer])

    def attend(self, index: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, tiers, ring, batch = self.num_tokens, self.tiers, self.ring[index], self.batch
        with self.span("kv_store", "elementwise"):
            tiers.wait("compute", self.offload_event[index])  # the slot reused has been copied out
            ring.write((n - 1) % self.window, kv_rows(k, v)[0])
        if n - 1 < self.input_end:
            self.store_inputs(index, x_in, n - 1)
        selected = self.selected_positions(index, n, host=False)
        with self.span("gather", "attention"):
            packed = self.workspace[:, :selected.shape[1]]
            packed.copy_(ring.gather(selected % self.window))
        if self.pending[index] is not None:
            self.unpack(index, packed)
        with self.span("attention", "attention"):
            keys, values = split_kv(packed, self.spec.num_kv_heads)
            out, probs = dense_decode_attention(q[:, 0], keys, values)
        if self.selection:
            with self.span("selection", "selection"):
                self.selection[index].push(selected, probs)
                self.select_next(index, n + 1, self.step + 1)
        if self.offload_to > self.offloaded:
            self.offload(index)
        return out.reshape(batch, 1, -1)

    def unpack(self, index: int, packed: Tensor) -> None:
        """Put the fetched rows and the recomputed K/V of the deleted selected tokens in their places."""
        buffer, fetched, recomputed, ready = self.pending[index]
        self.tiers.wait("compute", ready)
        seq, slot, position = self.index_stage[buffer][:3 * (fetched + recomputed)].view(3, -1)
        if fetched:
            with self.span("unpack", "attention"):
                packed[seq[:fetched], slot[:fetched]] = self.ring[index].decode(
                    tuple(p[:fetched] for p in self.kv_stage[buffer]))
        if recomputed:
            with self.span("recompute", "recompute"):
                attention = self.model.layers[index].attention
                x_rows = self.inputs[index].decode(tuple(p[:recomputed] for p in self.input_stage[buffer]))
                rope = self.model.rope(position[fetched:])
                k, v = attention.project_kv(self.model.layers[index].attention_norm(x_rows)[None], rope)
                packed[seq[fetched:], slot[fetched:]] = kv_rows(k, v)[:, 0].to(packed.dtype)
        self.consumed[buffer] = self.tiers.event()

    def offload(self, index: int) -> None:
        """Copy window rows [offloaded, offload_to) to the CPU pool (in up to two runs of the ring)."""
        first, end, window = self.offloaded, self.offload_to, self.window
        while first < end:
            run = min(end - first, window - first % window)
            slots = slice(first % window, first % window + run)
            for dst, src in zip(self.cpu[index].parts, self.ring[index].parts):
                self.offload_event[index] = self.tiers.copy(dst[first:first + run], src[slots], "d2h", "kv_offload")
            first += run
        self.counters["offloaded_tokens"] += (end - self.offloaded) * self.batch

    def kv_bytes(self, step: int) -> tuple[int, int]:
        """KV bytes held on the GPU and on the CPU (live KV and stored layer inputs) at a step, as the plan places
        them."""
        r, per = self.residency[step], self.batch * self.spec.num_layers
        gpu = r.on_gpu * per * self.ring[0].row_bytes
        cpu = r.on_cpu * per * self.cpu[0].row_bytes if self.cpu else 0
        if self.inputs:
            cpu += min(self.prompt_len + step, self.input_end) * per * self.inputs[0].row_bytes
        return gpu, cpu

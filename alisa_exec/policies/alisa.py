"""`alisa` in the executor: Sparse Window Attention over a GPU window and a pinned CPU pool, in three phases.

Every placement decision is the simulator's (`alisa_sim.policies.alisa.AlisaPolicy`, `self.sim`, made with its
planner's schedule by whoever made it): `residency(step)` says how many of the n tokens of every sequence are on the
GPU (the newest), live on the CPU, and deleted (the oldest); the planner's p1, p2, alpha and beta are in it.
`selected(n)` is the number attended.

The cache, per layer:
- a GPU window: a ring of token rows [G, batch, 2 x kv_dim], G the most tokens any step keeps on the GPU plus one
  slot, so writing the newest token never overwrites a row that is still being copied out;
- a CPU pool of token rows by position (pinned). A token is copied there (D2H stream) one step before the plan moves
  it off the GPU, so a step's fetches never wait on that step's own offloads;
- with Phase III in the plan, the layer inputs of the tokens that will be deleted, written to the CPU when computed
  (the simulator's `recompute_source: layer_input`);
- with kv_sparsity > 0, the kernels' `LocalAttentionSum` (the windowed attention sum and the recent + top-k pick),
  with the plan's `swa_current` (the current token on top of 2k, or inside) and `swa_self_weight`.
K/V rows and layer inputs are INT8 in both tiers when the plan says `int8`, quantized by the INT8 store kernel.

A decode step, per layer: the positions selected at the end of the previous step are split by residency. The live
CPU ones are gathered on the host from the pinned pool and copied into a GPU staging buffer on the H2D stream one
layer ahead (two buffers, each refilled once the attention two layers back has read it); the deleted ones' layer
inputs likewise, and their K and V are recomputed on the GPU (norm, K/V projection, rotary) into the same staging
buffer after the fetched rows, in the cache's format. The new token's K/V goes into the window. Attention, by the
plan's `attention_kernel`:
- `fused`: the sparse decode kernel reads the window ring and the staging buffer in place over one index list
  (ring slots, and staged rows as negative entries), INT8 dequantized in the kernel, and returns the head-summed
  probabilities in the same pass (its PyTorch form, with the same results, on the CPU device);
- `gather`: the paper's explicit gather: the selected rows are packed into a workspace (window rows gathered on the
  GPU and dequantized, staged rows unpacked into their slots), then attended densely.
The head-summed probabilities update the selection, which then picks the next step's positions (copied to the host
for the next step's gathers when tokens live on the CPU). At kv_sparsity 0 every token is attended and no selection
state is kept.

With `selector: k4-capped` (docs/executor.md) each layer also keeps a 4-bit copy of every position's keys on the GPU;
a decode step chooses per KV head after the layer's Q projection (the query over the copy, held to the SWA set the
sums picked at the end of the previous step), and only then copies that choice to the host, gathers the picks'
one-KV-head rows and copies them up; SWA's sums take the copy's attention over SWA's own set.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from alisa_exec import ops
from alisa_exec.kernels import LocalAttentionSum, prefill_window_rows
from alisa_exec.key_copy import KeyCopy
from alisa_exec.kv_cache import CPU, GPU, TokenRows, Tiers, int8_group
from alisa_exec.model import Transformer
from alisa_exec.policies.base import ExecPolicy, Run, kv_rows, split_kv, unsupported


@dataclass
class AlisaRun(Run):
    """One generation's state: each layer's selected positions and the events that order the tiers' copies."""

    selected_device: list = field(default_factory=list)  # per layer: the positions attended at this step [batch, T]
    selected_event: list = field(default_factory=list)  # per layer: the step's selection has reached the host
    offload_event: list = field(default_factory=list)  # per layer: its latest offload has landed in the CPU pool
    fetched: list = field(default_factory=lambda: [None, None])  # the latest H2D into each staging buffer
    consumed: list = field(default_factory=lambda: [None, None])  # the attention that read each staging buffer last
    pending: list = field(default_factory=list)  # per layer: (buffer, fetched, recomputed, ready) of its staged rows
    offloaded: int = 0  # positions [0, offloaded) are in the CPU pool
    offload_to: int = 0  # ... and [0, offload_to) once this step's offloads land
    fetch_end: int = 0  # live CPU rows [deleted_end, fetch_end) are read from the pool this step


class AlisaExec(ExecPolicy):
    name = "alisa"
    notes = ("alisa: fetched_tokens, recomputed_tokens and offloaded_tokens count token rows (one token of one layer "
             "of one sequence) moved H2D, recomputed, and moved D2H",)

    def __init__(self, wl, sim, dtype):
        super().__init__(wl, sim, dtype)
        cfg = sim.cfg
        if not cfg.dynamic_scheduling:
            raise unsupported("dynamic_scheduling", False, "the static head split is the paper's ablation (run "
                              "`flexgen` for a static head split)")
        if cfg.storage != "all":
            raise unsupported("storage", cfg.storage, "which offloaded tokens to drop for good is not defined")
        if cfg.selection != "per_layer":
            raise unsupported("selection", cfg.selection, "the executor selects one token set per layer (per-head "
                              "selection is measured by `alisa-exec eval`, method swa-head)")
        if cfg.recompute_source != "layer_input":
            raise unsupported("recompute_source", cfg.recompute_source, "the executor recomputes from layer inputs")
        self.sparsity, self.int8, self.fused = cfg.kv_sparsity, cfg.int8, cfg.attention_kernel == "fused"
        self.residency = [sim.residency(step) for step in range(self.decode_steps + 1)]
        self.cpu_end = [self.prompt_len + step - r.on_gpu for step, r in enumerate(self.residency)]
        self.deleted_end = [r.deleted for r in self.residency]
        self.input_end = max(self.deleted_end)  # positions whose layer inputs are kept for recompute
        self.offload_end = max(self.cpu_end)
        self.window = sim.ring_slots()
        self.attended = sim.selected(self.positions)[1]
        self.capped = cfg.selector == "k4-capped"
        if self.capped:
            self.notes += ("alisa k4-capped: fetched_tokens counts rows of one KV head (one KV head's K and V of one "
                           "token of one layer of one sequence)",)

    # ---- memory --------------------------------------------------------------------------------------------------
    def allocate(self, tiers: Tiers) -> None:
        spec, batch, layers = self.spec, self.batch, range(self.spec.num_layers)
        group = int8_group(spec.dim_per_head)  # groups never straddle heads
        self.ring = [TokenRows(tiers, GPU, "kv", self.window, batch, self.kv_width, self.dtype, self.int8, group)
                     for _ in layers]
        self.cpu = [TokenRows(tiers, CPU, "kv", self.offload_end, batch, self.kv_width, self.dtype, self.int8, group)
                    for _ in layers] if self.offload_end else []
        self.inputs = [TokenRows(tiers, CPU, "layer_inputs", self.input_end, batch, spec.hidden_size, self.dtype,
                                 self.int8) for _ in layers] if self.input_end else []
        self.selection = []
        if self.sparsity > 0:
            for _ in layers:
                state = LocalAttentionSum(batch, self.positions, self.sparsity, tiers.gpu_device, self.prompt_len,
                                          triton=tiers.triton, current=self.sim.cfg.swa_current,
                                          self_weight=self.sim.cfg.swa_self_weight)
                tiers.count(GPU, "selection_state", state.nbytes)
                self.selection.append(state)
        rows = batch * self.attended  # the most rows one layer can fetch or recompute in a step
        if self.capped:  # the 4-bit copy of every position's keys; rows of one KV head each
            self.key_copy = [KeyCopy(tiers, GPU, self.positions, batch, spec.num_kv_heads, spec.dim_per_head,
                                     self.dtype) for _ in layers]
            rows *= spec.num_kv_heads
        if self.offload_end and self.capped:
            kv = spec.num_kv_heads
            self.kv_stage = [self.ring[0].head_staging(tiers, GPU, "kv_staging", rows, kv) for _ in range(2)]
            self.kv_host = [self.cpu[0].head_staging(tiers, CPU, "kv_staging", rows, kv) for _ in range(2)]
        elif self.offload_end:
            self.kv_stage = [self.ring[0].staging(tiers, GPU, "kv_staging", rows) for _ in range(2)]
            self.kv_host = [self.cpu[0].staging(tiers, CPU, "kv_staging", rows) for _ in range(2)]
        if self.offload_end:
            # (sequence, slot in the attended list, position) of each staged row, one contiguous block per copy
            self.index_stage = [tiers.empty(GPU, "kv_staging", (3 * rows,), torch.int64) for _ in range(2)]
            self.index_host = [tiers.empty(CPU, "kv_staging", (3 * rows,), torch.int64) for _ in range(2)]
            self.selected_host = tiers.empty(CPU, "selection_indices", (spec.num_layers, rows), torch.int32)
        self.input_stage = self.input_host = []
        if self.input_end:
            self.input_stage = [self.inputs[0].staging(tiers, GPU, "kv_staging", rows) for _ in range(2)]
            self.input_host = [self.inputs[0].staging(tiers, CPU, "kv_staging", rows) for _ in range(2)]
        if not self.fused:
            self.workspace = tiers.empty(GPU, "attention_workspace", (batch, self.attended, self.kv_width), self.dtype)

    def kv_bytes(self, step: int) -> tuple[int, int]:
        """KV bytes held on the GPU and on the CPU (live KV and stored layer inputs) at a step, as the plan places
        them."""
        r, per = self.residency[step], self.batch * self.spec.num_layers
        gpu = r.on_gpu * per * self.ring[0].row_bytes
        cpu = r.on_cpu * per * self.cpu[0].row_bytes if self.cpu else 0
        if self.inputs:
            cpu += min(self.prompt_len + step, self.input_end) * per * self.inputs[0].row_bytes
        return gpu, cpu

    # ---- the run ---------------------------------------------------------------------------------------------------
    def new_run(self, model: Transformer, prompt: Tensor) -> AlisaRun:
        for state in self.selection:
            state.reset()
        layers = self.spec.num_layers
        return AlisaRun(model, super().new_run(model, prompt).out, selected_device=[None] * layers,
                        selected_event=[None] * layers, offload_event=[None] * layers, pending=[None] * layers)

    def step(self, step: int, prompt: Tensor) -> None:
        run, n = self.run, self.prompt_len + step
        run.offload_to = self.lookahead_end(step, n)
        # Live CPU rows [deleted_end, fetch_end) come from the pool; the newest token is always read from the window.
        run.fetch_end = min(self.cpu_end[step], run.offloaded)
        super().step(step, prompt)
        run.offloaded = max(run.offloaded, run.offload_to)

    def before_layer(self, index: int, group: int) -> None:
        if not self.run.prefill and not self.capped:  # k4-capped fetches once the layer's query has chosen
            self.one_layer_ahead(index, self.prefetch)

    def needs_host(self, step: int) -> bool:
        """Whether a step reads anything from the CPU (so its selection must reach the host)."""
        return step <= self.decode_steps and self.cpu_end[step] > 0

    def lookahead_end(self, step: int, computed: int) -> int:
        """Offload target after `step`: every position the next step keeps off the GPU (that exists already)."""
        following = min(step + 1, self.decode_steps)
        return min(computed, max(self.cpu_end[step], self.cpu_end[following]))

    def prefill_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        s, run = self.prompt_len, self.run
        y = self.causal_attention(q, k, v)
        ring, rows = self.ring[index], kv_rows(k, v)  # [s, batch, width]
        kept = self.cpu_end[0]
        with self.span("kv_store", "elementwise"):
            ring.store(torch.arange(kept, s, device=q.device) % self.window, rows[kept:])
        if run.offload_to:
            with self.span("kv_quantize", "elementwise"):
                stored = ring.encode(rows[:run.offload_to])
            run.offload_event[index] = self.tiers.copy_rows(
                tuple(part[:run.offload_to] for part in self.cpu[index].parts), stored, "d2h", "kv_offload",
                "offloaded_tokens", run.offload_to * self.batch)
        if self.input_end:
            self.store_inputs(index, x_in, 0)
        if self.capped:
            with self.span("key_copy", "elementwise"):
                ops.key_copy_store(self.key_copy[index], 0, k)
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
        # The host waits on a layer's offload event before gathering from its CPU pools, inputs included.
        self.run.offload_event[index] = self.tiers.copy_rows(
            tuple(part[first:first + len(rows)] for part in inputs.parts), stored, "d2h", "input_offload")

    def select_next(self, index: int, num_tokens: int, step: int) -> None:
        """Pick the positions layer `index` attends at `step` (with num_tokens cached; with k4-capped SWA's set, which
        caps that step's choice) and send them to the host when that step reads from the CPU."""
        if step > self.decode_steps:
            return
        selected = self.selection[index].select(num_tokens)
        self.run.selected_device[index] = selected
        if self.needs_host(step) and not self.capped:
            self.selection_to_host(index, selected)

    def selection_to_host(self, index: int, selected: Tensor) -> None:
        host = self.selected_host[index, :selected.numel()]
        self.run.selected_event[index] = self.tiers.copy(host, selected.flatten(), "d2h", "selection_to_host",
                                                         payload=False)

    def selected_positions(self, index: int, num_tokens: int, host: bool) -> Tensor:
        """The positions a layer attends this step, [batch, T] ([batch x kv_heads, T] on the host with k4-capped), on
        the device or on the host."""
        if not self.selection:
            device = "cpu" if host else self.tiers.gpu_device
            return torch.arange(num_tokens, dtype=torch.int32, device=device).expand(self.batch, num_tokens)
        if not host:
            return self.run.selected_device[index]
        self.tiers.host_wait(self.run.selected_event[index])
        tokens = self.sim.selected(num_tokens)[1]
        lists = self.batch * (self.spec.num_kv_heads if self.capped else 1)
        return self.selected_host[index, :lists * tokens].view(lists, tokens)

    def prefetch(self, index: int) -> None:
        """Gather layer `index`'s selected CPU rows (and the layer inputs of its selected deleted tokens) on the host
        and start their copy into a GPU staging buffer."""
        run, tiers = self.run, self.tiers
        deleted_end, fetch_end = self.deleted_end[run.step], run.fetch_end
        if fetch_end <= deleted_end and deleted_end == 0:
            run.pending[index] = None
            return
        buffer = index % 2
        with self.span("host_gather", "cpu", track="cpu"):
            tiers.host_wait(run.offload_event[index], run.fetched[buffer])
            selected = self.selected_positions(index, run.num_tokens, host=True)
            live, deleted = ops.stage_indices(selected, deleted_end, fetch_end, self.index_host[buffer])
            seq, _, position = live
            if len(seq) and self.capped:  # one KV head's row an entry, whose "sequence" is sequence x kv_heads + head
                kv = self.spec.num_kv_heads
                self.cpu[index].head_rows(position * self.batch + seq // kv, seq % kv, kv,
                                          self.kv_host[buffer].first(len(seq)))
            elif len(seq):
                self.cpu[index].flat_rows(position * self.batch + seq, self.kv_host[buffer].first(len(seq)))
            seq, _, position = deleted  # none under k4-capped, which deletes nothing
            if len(seq):
                self.inputs[index].flat_rows(position * self.batch + seq, self.input_host[buffer].first(len(seq)))
            fetched, recomputed = len(live[0]), len(deleted[0])
            total = fetched + recomputed
        after = (run.consumed[buffer],)
        if fetched:
            run.fetched[buffer] = tiers.copy_rows(self.kv_stage[buffer].first(fetched),
                                                  self.kv_host[buffer].first(fetched), "h2d", "kv_fetch",
                                                  "fetched_tokens", fetched, after)
        if recomputed:
            run.fetched[buffer] = tiers.copy_rows(self.input_stage[buffer].first(recomputed),
                                                  self.input_host[buffer].first(recomputed), "h2d", "input_fetch",
                                                  after=after)
        if total:
            run.fetched[buffer] = tiers.copy(self.index_stage[buffer][:3 * total], self.index_host[buffer][:3 * total],
                                             "h2d", "indices", after, payload=False)
        run.pending[index] = (buffer, fetched, recomputed, run.fetched[buffer])

    def decode_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        run, n, tiers, ring = self.run, self.run.num_tokens, self.tiers, self.ring[index]
        with self.span("kv_store", "elementwise"):
            tiers.wait("compute", run.offload_event[index])  # the slot reused has been copied out
            ring.store((n - 1) % self.window, kv_rows(k, v))
        if n - 1 < self.input_end:
            self.store_inputs(index, x_in, n - 1)
        selected = self.selected_positions(index, n, host=False)
        if self.capped:
            swa_selected = selected
            selected, swa_row = self.choose_by_query(index, q[:, 0], k, n, swa_selected)
        staged = self.stage(index) if run.pending[index] is not None else None
        if self.fused:
            with self.span("attention", "attention"):
                indices = (selected % self.window).to(torch.int32)
                views = None
                if staged is not None:
                    buffer, seq, slot = staged
                    indices.view(-1, indices.shape[-1])[seq, slot] = -1 - torch.arange(len(seq), dtype=torch.int32,
                                                                                       device=indices.device)
                    stage, kv = self.kv_stage[buffer], self.spec.num_kv_heads
                    views = stage.head_views(kv) if self.capped else stage.kv_views(kv)
                out, probs = ops.sparse_attention(q[:, 0], *ring.kv_views(self.spec.num_kv_heads), indices, views,
                                                  tiers.triton)
        else:
            with self.span("gather", "attention"):
                packed = self.workspace[:, :selected.shape[1]]
                packed.copy_(ring.gather(selected % self.window))
                if staged is not None:
                    buffer, seq, slot = staged
                    packed[seq, slot] = self.kv_stage[buffer].decode(self.kv_stage[buffer].first(len(seq)))
            with self.span("attention", "attention"):
                out, probs = ops.packed_attention(q[:, 0], *split_kv(packed, self.spec.num_kv_heads))
        if staged is not None:
            run.consumed[staged[0]] = tiers.event()
        if self.selection:
            with self.span("selection", "selection"):
                if self.capped:  # SWA alongside sums the copy's attention over its own set
                    self.selection[index].push(swa_selected, swa_row)
                else:
                    self.selection[index].push(selected, probs)
                self.select_next(index, n + 1, run.step + 1)
        if run.offload_to > run.offloaded:
            self.offload(index)
        return out.reshape(self.batch, 1, -1)

    def choose_by_query(self, index: int, q: Tensor, k: Tensor, n: int, swa_selected: Tensor) -> tuple[Tensor, Tensor]:
        """k4-capped: the new token's key into the 4-bit copy, the step's query over the copy, the capped choice per KV
        head ([batch, kv_heads, T], and the row SWA's sums take); when the step reads from the CPU, the choice goes to
        the host and the layer's CPU rows are gathered and copied up now (the choice needs this layer's query, so
        nothing is fetched a layer ahead)."""
        with self.span("key_copy", "elementwise"):
            ops.key_copy_store(self.key_copy[index], n - 1, k)
        with self.span("selection", "selection"):
            probs = ops.key_copy_attention(q, self.key_copy[index], n)
            selected, swa_row = ops.capped_pick(probs, swa_selected, self.sim.recent(n), self.tiers.triton)
        if self.needs_host(self.run.step):
            self.selection_to_host(index, selected)
            self.prefetch(index)
        return selected, swa_row

    def stage(self, index: int) -> tuple[int, Tensor, Tensor] | None:
        """Make layer `index`'s staged rows ready: wait for the fetched ones, recompute the K/V of the selected
        deleted tokens after them (in the cache's format); (buffer, sequence and slot of each staged row), or None
        when the step selected nothing off the GPU."""
        buffer, fetched, recomputed, ready = self.run.pending[index]
        if not fetched + recomputed:
            return None
        self.tiers.wait("compute", ready)
        seq, slot, position = self.index_stage[buffer][:3 * (fetched + recomputed)].view(3, -1)
        if recomputed:
            with self.span("recompute", "recompute"):
                layer = self.run.model.layers[index]
                x_rows = self.inputs[index].decode(self.input_stage[buffer].first(recomputed))
                k, v = ops.project_kv(layer.attention, ops.norm(layer.attention_norm, x_rows)[None],
                                      ops.rope(self.run.model, position[fetched:]))
                self.kv_stage[buffer].store(slice(fetched, fetched + recomputed), kv_rows(k, v))
            self.tiers.tally("recomputed_tokens", recomputed)
        return buffer, seq, slot

    def offload(self, index: int) -> None:
        """Copy window rows [offloaded, offload_to) to the CPU pool (in up to two runs of the ring)."""
        run, window = self.run, self.window
        first, end = run.offloaded, run.offload_to
        while first < end:
            count = min(end - first, window - first % window)
            slots = slice(first % window, first % window + count)
            run.offload_event[index] = self.tiers.copy_rows(
                tuple(part[first:first + count] for part in self.cpu[index].parts),
                tuple(part[slots] for part in self.ring[index].parts), "d2h", "kv_offload", "offloaded_tokens",
                count * self.batch)
            first += count

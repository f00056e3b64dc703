"""What the executor's policies share: the step driver and the decoder's layer loop (written once, with the KV cache
behind `prefill_attend` / `decode_attend` hooks), greedy sampling, and the per-step records the Result is built from.

A policy runs the plan of the simulator's policy object for the same workload (`self.sim`, made by whoever made the
policy, with its planner's plan): it reads the placement decisions from it (residency per step, head split, block
pool, kept tokens) rather than deriving them again. It allocates its pools through `Tiers` (first in a dry run on
the meta device, for the memory check), then generates. What one generation holds between steps lives in one `Run`
object (a subclass per policy), made fresh for every run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from alisa_exec import ops
from alisa_exec.kv_cache import GPU, ROW_COUNTERS, Tiers
from alisa_exec.model import Block, Transformer
from alisa_exec.timeline import Timeline
from alisa_sim.errors import SpecError
from alisa_sim.policies import Policy
from alisa_sim.results import StepRow
from alisa_sim.workload import ResolvedWorkload

ALL_ROWS = slice(None)  # the layer loop's one row group when a policy runs the whole batch at once


@dataclass(frozen=True)
class StepInfo:
    """The step about to run: its kind, label, KV phase, token rows computed and sequences sampled."""

    kind: str  # "prefill" | "decode"
    label: str
    phase: int
    tokens: int
    sequences: int


@dataclass
class StepRecord:
    """One measured step, before its time is known (the timeline resolves that after the run)."""

    step: int
    info: StepInfo
    gpu_kv_bytes: int
    cpu_kv_bytes: int
    h2d_bytes: int
    d2h_bytes: int
    counters: dict[str, int]

    def row(self, start_s: float, time_s: float) -> StepRow:
        i = self.info
        return StepRow(self.step, i.kind, i.label, i.phase, start_s, time_s, i.tokens, i.sequences, self.gpu_kv_bytes,
                       self.cpu_kv_bytes, self.h2d_bytes, self.d2h_bytes, dict(self.counters))


class StepLog:
    """Opens and closes steps: the bytes the tiers moved and the rows they tallied in between, the timeline's step
    mark, the record."""

    def __init__(self, tiers: Tiers, timeline: Timeline, on_step: Callable[[StepRecord], None] | None = None):
        self.tiers, self.timeline, self.on_step = tiers, timeline, on_step
        self.records: list[StepRecord] = []
        self._open: tuple[StepInfo, dict, dict, dict] | None = None

    def begin(self, info: StepInfo) -> None:
        t = self.tiers
        self._open = (info, dict(t.moved), dict(t.index_moved), dict(t.tallies))

    def end(self, gpu_kv_bytes: int, cpu_kv_bytes: int, counters: dict[str, int] | None = None) -> StepRecord:
        self.timeline.end_step()
        info, moved, index_moved, tallies = self._open
        t = self.tiers
        rows = {name: t.tallies[name] - tallies[name] for name in ROW_COUNTERS}
        index_bytes = {f"{d}_index_bytes": t.index_moved[d] - index_moved[d] for d in ("h2d", "d2h")}
        record = StepRecord(len(self.records), info, int(gpu_kv_bytes), int(cpu_kv_bytes),
                            t.moved["h2d"] - moved["h2d"], t.moved["d2h"] - moved["d2h"],
                            {**rows, **index_bytes, **(counters or {})})
        self.records.append(record)
        if self.on_step:
            self.on_step(record)
        return record


@dataclass
class Run:
    """What one generation holds between steps: the model, the tokens so far, where the step is, and the plan
    counters a policy reports (vLLM's preemptions, ...). Policies extend it with their own state."""

    model: Transformer
    out: Tensor  # [batch, gen_len] greedy tokens
    step: int = 0
    num_tokens: int = 0  # tokens cached once the step's new token is written
    prefill: bool = True  # the step is a prompt pass
    positions: Tensor | None = None  # the positions of the tokens in the layers now
    counters: dict[str, int] = field(default_factory=dict)
    layers: list[Block] = field(init=False)  # the model's layers, a plain list (the layer loop indexes it per layer)

    def __post_init__(self):
        self.layers = list(self.model.layers)


class ExecPolicy(ABC):
    """One KV policy in the executor: allocate its pools, then generate `gen_len` greedy tokens per sequence."""

    name: str
    notes: tuple[str, ...] = ()
    detail_limit: int | None = None  # steps timed op by op at most (None: the executor's default)

    def __init__(self, wl: ResolvedWorkload, sim: Policy, dtype: torch.dtype):
        self.wl, self.sim, self.spec, self.dtype = wl, sim, wl.model, dtype
        w = wl.workload
        self.batch, self.prompt_len, self.gen_len = w.batch_size, w.prompt_len, w.gen_len
        self.decode_steps = wl.decode_steps
        self.positions = w.prompt_len + w.gen_len - 1  # the last generated token's KV is never computed
        self.kv_width = 2 * self.spec.kv_dim
        self.timeline: Timeline | None = None
        self.tiers: Tiers | None = None
        self.run: Run | None = None
        self.logits_log: list[Tensor] | None = None  # a list to keep every sampled step's logits in (tests)

    # ---- memory --------------------------------------------------------------------------------------------------
    @abstractmethod
    def allocate(self, tiers: Tiers) -> None:
        """Allocate every pool, staging buffer and selection state of the run through `tiers`."""

    def transient_gpu_bytes(self) -> dict[str, int]:
        """Working memory beside the pools, as the simulator's policy counts it (the widest layer activation of the
        prefill and the logits), in this run's dtype."""
        static = self.sim.static_memory().gpu
        return {purpose: int(static[purpose]) for purpose in ("activations", "logits") if purpose in static}

    def load_device(self, device: torch.device) -> torch.device:
        """Where the weights are loaded before `weight_placement` (the run's device, unless a policy streams them)."""
        return device

    def weight_placement(self, model: Transformer, tiers: Tiers) -> None:
        """Move what the plan keeps off the GPU out of it (weights stay on the GPU unless a policy says otherwise)."""
        tiers.count(GPU, "weights", sum(p.numel() * p.element_size() for p in model.parameters()))

    def start(self, tiers: Tiers, timeline: Timeline) -> None:
        """Run on these tiers, recording ops (copies included) on this timeline."""
        self.tiers, self.timeline = tiers, timeline
        tiers.timeline = timeline

    # ---- the step driver -------------------------------------------------------------------------------------------
    def generate(self, model: Transformer, prompt: Tensor, log: StepLog, decode_steps: int | None = None) -> Tensor:
        """Greedy tokens [batch, gen_len] (the prefill's first), recording every step in `log`; with `decode_steps`,
        only the prefill and that many decode steps of the plan (a warm-up), the other tokens left unset."""
        self.run = run = self.new_run(model, prompt)
        step = 0
        while (info := self.next_step(step, decode_steps)) is not None:
            run.step, run.num_tokens, run.counters = step, self.prompt_len + step, {}
            run.prefill = info.kind == "prefill"
            log.begin(info)
            self.step(step, prompt)
            log.end(*self.kv_bytes(step), run.counters)
            step += 1
        return self.tokens(run)

    def new_run(self, model: Transformer, prompt: Tensor) -> Run:
        """The state of a fresh generation."""
        return Run(model, torch.zeros(self.batch, self.gen_len, dtype=torch.long, device=prompt.device))

    def next_step(self, step: int, decode_steps: int | None) -> StepInfo | None:
        """The step to run next (None: the run is over): the prefill, then the plan's decode steps."""
        last = self.decode_steps if decode_steps is None else min(decode_steps, self.decode_steps)
        if step > last:
            return None
        if step == 0:
            return StepInfo("prefill", "prefill", self.sim.phase(0), self.batch * self.prompt_len, self.batch)
        return StepInfo("decode", f"decode {step}", self.sim.phase(step), self.batch, self.batch)

    def step(self, step: int, prompt: Tensor) -> None:
        """Run one step of every sequence: its tokens through the layers, the next token sampled into `run.out`."""
        out = self.run.out
        if step == 0:
            positions = torch.arange(self.prompt_len, device=prompt.device)
            out[:, :1] = self.forward(prompt, positions)
        else:
            positions = torch.full((1,), self.prompt_len + step - 1, dtype=torch.long, device=prompt.device)
            out[:, step:step + 1] = self.forward(out[:, step - 1:step], positions)

    def tokens(self, run: Run) -> Tensor:
        return run.out

    @abstractmethod
    def kv_bytes(self, step: int) -> tuple[int, int]:
        """KV bytes held on the GPU and on the CPU at the end of a step, as the plan places them."""

    # ---- the layer loop --------------------------------------------------------------------------------------------
    @property
    def row_groups(self) -> tuple[slice, ...]:
        """The batch's rows as the layer loop runs them: all at once, or GPU batch by GPU batch (FlexGen)."""
        return (ALL_ROWS,)

    def forward(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """The decoder over tokens [rows, seq] at positions [seq] (or [rows, seq]): embedding, every layer with the
        policy's attention, the LM head; returns the greedy next tokens [rows, 1]."""
        model = self.run.model
        rope = ops.rope(model, positions)
        with self.span("embedding", "elementwise"):
            x = ops.embed(model, tokens, positions)
        self.run.positions = positions
        for index in range(self.spec.num_layers):
            self.timeline.layer = index
            outputs = []
            for group, rows in enumerate(self.row_groups):
                self.before_layer(index, group)
                layer = self.block(index)
                x_in = self.layer_input(x, rows, index)
                outputs.append(self.layer(index, group, layer, x_in, rope))
                self.after_group(index, group, outputs[-1])
            self.after_layer(index)
            x = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        self.timeline.layer = -1
        return self.sample(model, x)

    def layer(self, index: int, group: int, layer: Block, x: Tensor, rope) -> Tensor:
        """One decoder layer with the policy's attention: x + wo(attend(q, k, v)), then the MLP block."""
        with self.span("qkv_proj", "gemm"):
            qkv = self.project(index, "attention.wqkv", layer, ops.norm(layer.attention_norm, x))
            q, k, v = ops.split_heads(layer.attention, qkv, rope)
        if self.run.prefill:
            y = self.prefill_attend(index, group, x, q, k, v)
        else:
            y = self.decode_attend(index, group, x, q, k, v)
        with self.span("out_proj_mlp", "gemm"):
            h = ops.residual(x, self.project(index, "attention.wo", layer, y))
            up = self.project(index, "feed_forward.w_up", layer, ops.norm(layer.ffn_norm, h))
            return ops.residual(h, self.project(index, "feed_forward.w_down", layer, ops.activate(layer.feed_forward,
                                                                                                  up)))

    def block(self, index: int) -> Block:
        """The layer whose weights the step uses (its staged copy when weights are streamed)."""
        return self.run.layers[index]

    def project(self, index: int, name: str, layer: Block, x: Tensor) -> Tensor:
        return ops.project(projection(layer, name), x)

    def layer_input(self, x: Tensor, rows: slice, index: int) -> Tensor:
        return x if rows == ALL_ROWS else x[rows]

    def before_layer(self, index: int, group: int) -> None:
        """Issue what must be under way before a layer's group runs (prefetches of what comes next)."""

    def one_layer_ahead(self, index: int, fetch: Callable[[int], None]) -> None:
        """Prefetch one layer ahead: `fetch(0)` before layer 0, and `fetch(index + 1)` before layer `index`."""
        if index == 0:
            fetch(0)
        if index + 1 < self.spec.num_layers:
            fetch(index + 1)

    def after_group(self, index: int, group: int, y: Tensor) -> None:
        """After a group's layer output is computed."""

    def after_layer(self, index: int) -> None:
        """After every group of a layer ran."""

    @abstractmethod
    def prefill_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """A prompt pass's attention in layer `index` (x_in: the layer's input), storing the KV; [rows, s, q_dim]."""

    @abstractmethod
    def decode_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """A decode step's attention in layer `index`, storing the new token's KV; [rows, 1, q_dim]."""

    # ---- shared pieces ---------------------------------------------------------------------------------------------
    def span(self, name: str, kind: str, track: str = "gpu", stream=None):
        return self.timeline.span(track, name, kind, stream)

    def causal_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with self.span("attention", "attention"):
            return ops.causal_attention(q, k, v)

    def sample(self, model: Transformer, x: Tensor) -> Tensor:
        """Greedy next tokens [batch, 1] from the last position's hidden state (its logits kept in `logits_log`
        when that is a list)."""
        with self.span("lm_head", "gemm"):
            logits = ops.lm_head(model, x)
            if self.logits_log is not None:
                self.logits_log.append(logits[:, 0].cpu())
            return ops.argmax(logits)


def projection(layer: Block, name: str) -> nn.Linear:
    """The layer's projection by dotted name ("attention.wqkv"): attribute by attribute, as the layer loop asks four
    times a layer per step (`nn.Module.get_submodule` checks each step's type; a compiled step traces this as is)."""
    module = layer
    for attribute in name.split("."):
        module = getattr(module, attribute)
    return module


def split_kv(rows: Tensor, kv_heads: int) -> tuple[Tensor, Tensor]:
    """K and V [batch, kv_heads, T, d] of token rows [batch, T, 2 x kv_dim] (views, no copy)."""
    batch, tokens, width = rows.shape
    kv = rows.view(batch, tokens, 2, kv_heads, width // (2 * kv_heads))
    return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def kv_rows(k: Tensor, v: Tensor) -> Tensor:
    """Token rows [seq, batch, 2 x kv_dim] of k and v [batch, seq, kv_heads, d]."""
    return torch.cat((k.flatten(2), v.flatten(2)), dim=-1).transpose(0, 1)


def unsupported(what: str, value, why: str) -> SpecError:
    return SpecError(f"policy.{what} = {value!r} is simulated but not executed: {why}")


def ceil_div(a: int, b: int) -> int:
    return -(-a // b) if b else 0

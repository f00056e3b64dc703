"""What the executor's KV policies share: the decoder's layer loop with the KV cache behind an `attend` hook, the dense
causal prefill, greedy sampling, and the per-step records the Result is built from.

A policy runs the plan of the simulator's policy object for the same workload (`self.sim`): it reads the placement
decisions from it (residency per step, head split, block pool, kept tokens) rather than deriving them again. It
allocates its pools through `Tiers` (first in a dry run on the meta device, for the memory check), then generates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from alisa_exec.kv_cache import Tiers
from alisa_exec.model import Block, Transformer
from alisa_exec.timeline import Timeline
from alisa_sim.errors import SpecError
from alisa_sim.policies import Policy
from alisa_sim.workload import ResolvedWorkload

Attend = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass
class StepRecord:
    """One measured step (the prefill, a decode step, or one of vLLM's iterations). Token counters count token rows:
    one token's K and V (or layer input) in one layer of one sequence."""

    step: int
    kind: str  # "prefill" | "decode"
    label: str
    phase: int
    rows: int  # token rows computed: prompt tokens in a prefill, one per sequence in a decode step
    sequences: int
    gpu_kv_bytes: int = 0
    cpu_kv_bytes: int = 0
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    counters: dict[str, int] = field(default_factory=dict)


class StepLog:
    """Opens and closes steps: the bytes the tiers moved in between, the timeline's step mark, the record."""

    def __init__(self, tiers: Tiers, timeline: Timeline, on_step: Callable[[StepRecord], None] | None = None):
        self.tiers, self.timeline, self.on_step = tiers, timeline, on_step
        self.records: list[StepRecord] = []
        self._moved = dict(tiers.moved)
        self._open: dict | None = None

    def begin(self, kind: str, label: str, phase: int, rows: int, sequences: int) -> None:
        self._moved = dict(self.tiers.moved)
        self._open = dict(kind=kind, label=label, phase=phase, rows=rows, sequences=sequences)

    def end(self, gpu_kv_bytes: int, cpu_kv_bytes: int, counters: dict[str, int] | None = None) -> StepRecord:
        self.timeline.end_step()
        moved = {d: self.tiers.moved[d] - self._moved[d] for d in ("h2d", "d2h")}
        record = StepRecord(len(self.records), **self._open, gpu_kv_bytes=int(gpu_kv_bytes),
                            cpu_kv_bytes=int(cpu_kv_bytes), h2d_bytes=moved["h2d"], d2h_bytes=moved["d2h"],
                            counters=dict(counters or {}))
        self.records.append(record)
        if self.on_step:
            self.on_step(record)
        return record


class ExecPolicy(ABC):
    """One KV policy in the executor: allocate its pools, then generate `gen_len` greedy tokens per sequence."""

    name: str
    notes: tuple[str, ...] = ()

    def __init__(self, wl: ResolvedWorkload, sim: Policy, dtype: torch.dtype):
        self.wl, self.sim, self.spec, self.dtype = wl, sim, wl.model, dtype
        w = wl.workload
        self.batch, self.prompt_len, self.gen_len = w.batch_size, w.prompt_len, w.gen_len
        self.decode_steps = wl.decode_steps
        self.positions = w.prompt_len + w.gen_len - 1  # the last generated token's KV is never computed
        self.kv_width = 2 * self.spec.kv_dim
        self.timeline: Timeline | None = None
        self.tiers: Tiers | None = None
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

    def weight_placement(self, model: Transformer, tiers: Tiers) -> None:
        """Move what the plan keeps off the GPU out of it (weights stay on the GPU unless a policy says otherwise)."""
        tiers.count("gpu", "weights", sum(p.numel() * p.element_size() for p in model.parameters()))

    # ---- the run ---------------------------------------------------------------------------------------------------
    @abstractmethod
    def generate(self, model: Transformer, prompt: Tensor, log: StepLog, decode_steps: int | None = None) -> Tensor:
        """Greedy tokens [batch, gen_len] (the prefill's first), recording every step in `log`; with `decode_steps`,
        only the prefill and that many decode steps of the plan (a warm-up), the other tokens left unset."""

    def last_step(self, decode_steps: int | None) -> int:
        return self.decode_steps if decode_steps is None else min(decode_steps, self.decode_steps)

    def start(self, tiers: Tiers, timeline: Timeline) -> None:
        """Run on these tiers, recording ops (copies included) on this timeline."""
        self.tiers, self.timeline = tiers, timeline
        tiers.timeline = timeline

    # ---- shared pieces of a forward pass -----------------------------------------------------------------------------
    def span(self, name: str, kind: str, track: str = "compute", stream=None):
        return self.timeline.span(track, name, kind, stream)

    def layer(self, layer: Block, x: Tensor, rope, attend: Attend) -> Tensor:
        """One decoder layer with the policy's attention: x + wo(attend(q, k, v)), then the MLP block."""
        with self.span("qkv_proj", "gemm"):
            q, k, v = layer.attention.split_heads(layer.attention.wqkv(layer.attention_norm(x)), rope)
        y = attend(q, k, v)
        with self.span("out_proj_mlp", "gemm"):
            h = x + layer.attention.wo(y)
            return h + layer.feed_forward(layer.ffn_norm(h))

    def causal_attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Causal attention of a prompt pass over its own tokens: q [b, s, heads, d], k and v [b, s, kv_heads, d]."""
        with self.span("attention", "attention"):
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, enable_gqa=k.shape[2] != q.shape[2])
            return y.transpose(1, 2).flatten(2)

    def sample(self, model: Transformer, x: Tensor) -> Tensor:
        """Greedy next tokens [batch, 1] from the last position's hidden state (its logits kept in `logits_log`
        when that is a list)."""
        with self.span("lm_head", "gemm"):
            logits = model.logits(x[:, -1:])
            if self.logits_log is not None:
                self.logits_log.append(logits[:, 0].cpu())
            return logits.argmax(dim=-1)

    def embed(self, model: Transformer, tokens: Tensor, positions: Tensor) -> Tensor:
        with self.span("embedding", "elementwise"):
            return model.embed(tokens, positions)


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


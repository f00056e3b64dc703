"""`flexgen`: FlexGen's offloading (Sheng et al., ICML 2023) with its own knobs.

Weights, KV cache and activations are split between GPU and CPU by `percent = [wg, wc, cg, cc, hg, hc]`; the
KV split is static and along heads. The batch is a block of `num_gpu_batches` GPU batches of `gpu_batch_size`
sequences, run in FlexGen's zig-zag order: each layer's weights are loaded once and serve every GPU batch of
the block before the next layer. Per layer and GPU batch: the CPU share of the weights (once per layer), the
batch's CPU-resident activations and KV are loaded, the layer computes, and the new token's KV and the
activations go back. With `cpu_attention` (FlexGen's --cpu-cache-compute) attention over the CPU-resident heads
runs on the CPU instead: q, k, v of those heads go down, their attention output comes up. All buffers are
double-buffered, so loads of the next layer or batch overlap compute; `overlap: false` runs it all serially.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alisa_sim.ops import LayerTemplate, make_op
from alisa_sim.policies.base import MemoryUse, Policy


@dataclass(frozen=True)
class FlexGenSetting:
    """A complete FlexGen policy: placement percentages and block shape."""

    percent: tuple[float, float, float, float, float, float]
    gpu_batch_size: int
    num_gpu_batches: int
    cpu_attention: bool

    def cli(self) -> str:
        """The policy as FlexGen's command-line flags."""
        flags = (f"--percent {' '.join(f'{p:g}' for p in self.percent)} --gpu-batch-size {self.gpu_batch_size} "
                 f"--num-gpu-batches {self.num_gpu_batches}")
        return flags + (" --cpu-cache-compute" if self.cpu_attention else "")


def flexgen_static_memory(policy: Policy, weights_cpu: float, kv_cpu: float, activations_cpu: float,
                          cpu_attention: bool) -> MemoryUse:
    """FlexGen's resident memory for CPU shares of weights, KV and activations (affine in the shares, which is what
    the LP policy search relies on): homes of weights and activations, double buffers for what is streamed."""
    m, gbs, prompt = policy.model, policy.setting.gpu_batch_size, policy.prompt_len
    hidden = m.hidden_size * m.dtype_bytes
    all_prompt_hidden = policy.batch * prompt * hidden
    # FlexGen splits every weight tensor, embeddings included, by the same percentages.
    gpu = {"weights": (1 - weights_cpu) * m.weight_bytes,
           "activations_home": (1 - activations_cpu) * all_prompt_hidden,
           "weight_staging": 2 * weights_cpu * m.layer_weight_bytes,
           "activation_staging": 2 * activations_cpu * gbs * prompt * hidden,
           **policy.activation_buffers(gbs)}
    if not cpu_attention:
        gpu["kv_staging"] = 2 * kv_cpu * gbs * policy.positions * m.kv_bytes_per_token_per_layer()
    cpu = {"weights": weights_cpu * m.weight_bytes, "activations_home": activations_cpu * all_prompt_hidden}
    return MemoryUse(gpu=gpu, cpu=cpu)


class FlexGenPolicy(Policy):
    name = "flexgen"

    def __init__(self, workload, cost, setting: FlexGenSetting):
        """`setting` is the workload's, completed by the LP search (`alisa_sim.planner.make_policy`)."""
        super().__init__(workload, cost)
        self.setting = setting
        self.cfg = workload.policy
        wg, wc, cg, cc, hg, hc = (p / 100 for p in setting.percent)
        # FlexGen keeps the hidden states wholly on one device (its activation home); a split share goes where most
        # of it is, as the executor runs it. The LP search prices the share itself (affine in it).
        self.hidden_on_cpu = hc >= 0.5
        self.weights_cpu_share, self.activations_cpu_share = wc, float(self.hidden_on_cpu)
        m = self.model
        # The KV split is along heads: whole KV heads on the GPU, the rest on the CPU.
        self.gpu_kv_heads = math.floor(m.num_kv_heads * cg + 1e-9)  # FlexGen: int(heads * share)
        self.cpu_kv_heads = m.num_kv_heads - self.gpu_kv_heads
        self.gbs, self.ngb = setting.gpu_batch_size, setting.num_gpu_batches
        self.cpu_attention = setting.cpu_attention and self.cpu_kv_heads > 0
        self._wired: dict[tuple, LayerTemplate] = {}  # block layers' DAGs by the ops of their slots

    @property
    def overlap(self) -> bool:
        return self.wl.workload.overlap and self.cfg.overlap

    @property
    def kv_cpu_share(self) -> float:
        return self.cpu_kv_heads / self.model.num_kv_heads

    def placement(self) -> dict[str, float]:
        return {"weights_gpu": 1 - self.weights_cpu_share, "kv_gpu": 1 - self.kv_cpu_share,
                "activations_gpu": 1 - self.activations_cpu_share}

    def plan(self) -> dict:
        plan = super().plan()
        chosen = dict(percent=list(self.setting.percent), gpu_batch_size=self.gbs, num_gpu_batches=self.ngb,
                      cpu_attention=self.setting.cpu_attention)
        plan["params"].update(chosen)
        plan["workload"]["policy"].update(chosen)  # so running the plan runs this very setting
        plan["flexgen_cli"] = self.setting.cli()
        return plan

    def phase(self, step: int) -> int:
        return 2 if self.cpu_kv_heads else 1

    def host_key(self, phase: int) -> str:
        return "flexgen-cpu-attention" if self.cpu_attention else "flexgen"

    # ---- sizes -------------------------------------------------------------------------------------------------
    def token_rows(self, step: int) -> dict[str, float]:
        """Rows of the CPU heads' KV: the prompt's and each new token's go down; without CPU attention, every cached
        row comes up each decode step (a row counts once, whatever share of the heads it carries)."""
        if not self.cpu_kv_heads:
            return {}
        rows = self.batch * self.model.num_layers
        if step == 0:
            return {"offloaded_tokens": rows * self.prompt_len}
        fetched = {} if self.cpu_attention else {"fetched_tokens": rows * (self.context(step) - 1)}
        return {**fetched, "offloaded_tokens": rows}

    def _kv_per_token_layer(self, kv_heads: int) -> float:
        return 2 * kv_heads * self.model.dim_per_head * self.model.dtype_bytes

    def _hidden_bytes(self, rows: int) -> float:
        return rows * self.model.hidden_size * self.model.dtype_bytes

    def static_memory(self) -> MemoryUse:
        return flexgen_static_memory(self, self.weights_cpu_share, self.kv_cpu_share, self.activations_cpu_share,
                                     self.cpu_attention)

    def kv_memory(self, context: int) -> MemoryUse:
        total = self.kv_bytes(context)
        return MemoryUse(gpu={"kv": (1 - self.kv_cpu_share) * total}, cpu={"kv": self.kv_cpu_share * total})

    # ---- the block schedule ------------------------------------------------------------------------------------
    # FlexGen's overlapped loop, per layer j and GPU batch k (a "slot"): load the next layer's weights (when k = 0),
    # load the next slot's KV and activations, compute this slot, store the previous slot's KV and activations,
    # then synchronize. So every op of a slot waits for every op of the slot before; the loads and stores of a slot
    # move the same bytes for every batch, which is why a slot needs no batch index beyond its own name.
    def _copy(self, name: str, direction: str, nbytes: float, pinned: bool = True):
        return self.copy_op(name, direction, nbytes, pinned) if nbytes > 0 else None

    def _block_layer(self, rows_per_seq: int, context: int) -> LayerTemplate:
        """One layer over every GPU batch of the block; `rows_per_seq` is prompt_len in the prefill, 1 in decode."""
        m, gbs = self.model, self.gbs
        prefill = rows_per_seq > 1
        kind = "prefill" if prefill else "decode"
        rows = gbs * rows_per_seq
        slots = []
        for k in range(self.ngb):
            ops: list = []  # in issue order; None for a transfer of nothing
            if k == 0:
                ops.append(self._copy("weight_load", "h2d", self.weights_cpu_share * m.layer_weight_bytes,
                                      self.cfg.pin_weight))
            ops.append(self._copy(f"hidden_load_b{k}", "h2d", self.activations_cpu_share * self._hidden_bytes(rows)))
            cpu_kv_bytes = self._kv_per_token_layer(self.cpu_kv_heads)
            if not prefill and not self.cpu_attention:
                ops.append(self._copy(f"kv_load_b{k}", "h2d", gbs * (context - 1) * cpu_kv_bytes))
            ops.append(self.pre_attention_op(rows, kind, f"qkv_proj_b{k}"))
            ops += self._attention_ops(k, prefill, context)
            ops.append(self.post_attention_op(rows, f"out_proj_mlp_b{k}"))
            if prefill or not self.cpu_attention:
                # FlexGen writes new KV into slices of the preallocated CPU cache: strided copies that run at
                # pageable speed, not pinned (its published T4 throughput; the executor's copies of whole rows
                # into its pinned pool are the one op it prices otherwise: docs/executor.md).
                ops.append(self._copy(f"kv_store_b{k}", "d2h", rows * cpu_kv_bytes, pinned=False))
            ops.append(self._copy(f"hidden_store_b{k}", "d2h", self.activations_cpu_share * self._hidden_bytes(rows)))
            slots.append([op for op in ops if op is not None])
        # The DAG depends only on which ops each slot has: wired once (hundreds of edges for a large block), the
        # decode steps' templates put their own ops into it.
        key = tuple(tuple((op.name, op.resource) for op in ops) for ops in slots)
        if (wired := self._wired.get(key)) is None:
            wired = self._wired[key] = self._wire(slots)
        return self.head_and_tail(wired.with_ops([op for ops in slots for op in ops]), self.batch * rows_per_seq, kind)

    @classmethod
    def _wire(cls, slots: list[list]) -> LayerTemplate:
        """A layer of these slots (each a list of ops in issue order): every op of a slot after every op of the
        slot before, and the first slot after the previous layer's last."""
        t = LayerTemplate()
        previous: list[str] = []
        for k, ops in enumerate(slots):
            current = cls._add_slot(t, ops, previous)
            if k == 0:
                first_slot = current
            previous = current
        for src in previous:  # the layer's first slot waits for the previous layer's last slot
            for dst in first_slot:
                t.link(src, dst, lag=1)
        return t

    @staticmethod
    def _add_slot(t: LayerTemplate, ops: list, previous: list[str]) -> list[str]:
        """Add a slot's ops, each after every op of the previous slot of this layer; the slot's compute (and the
        CPU attention's copies) run in order."""
        names: list[str] = []
        compute_chain: list[str] = []
        for op in ops:
            after = tuple(previous)
            if op.resource in ("gpu", "cpu") or op.name.startswith(("qkv_to_cpu", "kv_to_cpu", "attention_to_gpu")):
                after += tuple(compute_chain[-1:])  # the layer's compute runs in order
                compute_chain.append(op.name)
            t.add(op, after=after)
            names.append(op.name)
        return names

    def _attention_ops(self, k: int, prefill: bool, context: int) -> list:
        """Attention of GPU batch k, in compute order."""
        m, gbs = self.model, self.gbs
        if prefill:
            return [self.prefill_attention_op(gbs, f"attention_b{k}")]
        if not self.cpu_attention:  # the GPU heads over their pool, the CPU heads over their staged copy
            shapes = [self._cache_shape(context, heads, gbs) for heads in (self.gpu_kv_heads, self.cpu_kv_heads)
                      if heads]
            return [self._gpu_op(f"attention_b{k}", {"attention": tuple(("rows_attention", s) for s in shapes)})]
        ops = []
        if self.gpu_kv_heads:
            ops.append(self.decode_attention_op(context, gbs, self.gpu_kv_heads, f"attention_b{k}"))
        group = m.num_heads // m.num_kv_heads
        cpu_heads = self.cpu_kv_heads * group
        # q to a transient host buffer, the new token's K/V into the CPU cache: two copies.
        ops.append(self.copy_op(f"qkv_to_cpu_b{k}", "d2h", gbs * cpu_heads * m.dim_per_head * m.dtype_bytes))
        ops.append(self.copy_op(f"kv_to_cpu_b{k}", "d2h", gbs * 2 * self.cpu_kv_heads * m.dim_per_head * m.dtype_bytes))
        # FlexGen (and the executor) computes CPU attention in fp32 over the cache, streaming it as 4-byte values.
        call = ("cpu_attention", {**self._cache_shape(context, self.cpu_kv_heads, gbs), "e": 4})
        cpu_s, host_s = self._priced(call)
        ops.append(make_op(f"cpu_attention_b{k}", "cpu", {"cpu": cpu_s}, host_s=host_s,
                           calls=((call[0], tuple(sorted(call[1].items()))),)))
        out_bytes = gbs * cpu_heads * m.dim_per_head * m.dtype_bytes
        ops.append(self.copy_op(f"attention_to_gpu_b{k}", "h2d", out_bytes))
        return ops

    def prefill_template(self) -> LayerTemplate:
        return self._block_layer(self.prompt_len, self.prompt_len)

    def decode_template(self, step: int) -> LayerTemplate:
        return self._block_layer(1, self.context(step))

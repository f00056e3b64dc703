"""`alisa`: ALISA (Zhao, Wu, Wang, ISCA 2024): Sparse Window Attention, three-phase token-level KV scheduling with
recompute, and INT8 KV. Every choice the paper leaves open is an option; docs/alisa-model.md explains each.

Per decode step with n cached tokens, SWA attends to k = max(1, round(n*r/2)) recent tokens and k globally
selected older ones (r = 1 - kv_sparsity). Weights and activations stay on the GPU. The KV cache moves through
three phases: I (all on the GPU), II from step p1 (the most recent tokens on the GPU, the rest on the CPU; only
the selected CPU-resident tokens come back each step, prefetched a layer ahead; tokens leaving the GPU window go
down), III from step p2 (a share beta of the oldest CPU KV is deleted and, when selected, recomputed on the GPU
from its stored layer input). How many global picks are old enough to live on the CPU (or to be deleted) is a
property of the model's attention, read from `selection_stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alisa_sim.ops import LayerTemplate, make_op
from alisa_sim.policies.base import MemoryUse, Policy
from alisa_sim.selection_stats import load_selection_stats
from alisa_sim.swa import swa_window

# INT8 KV: one byte per value plus an fp16 scale and zero point per group of 64 channels of a token.
INT8_GROUP = 64
INT8_BYTES_PER_VALUE = 1 + 4 / INT8_GROUP


@dataclass(frozen=True)
class AlisaSchedule:
    """The planner's choice: phase switch steps, the least CPU share of KV and the deleted share of CPU KV."""

    p1: int  # first decode step of Phase II
    p2: int  # first decode step of Phase III (past the last step: never)
    alpha: float
    beta: float


@dataclass(frozen=True)
class Residency:
    """Where the n cached tokens of every sequence live at one step (token counts per sequence)."""

    phase: int
    on_gpu: int
    on_cpu: int  # live KV on the CPU
    deleted: int  # oldest tokens whose KV was deleted (recomputed from the stored layer input when selected)


class AlisaPolicy(Policy):
    """Built without a schedule, the policy answers sizes, budgets and the traffic of a schedule passed in (what
    the schedule search asks); `alisa_sim.planner.make_policy` builds it with the searched schedule."""

    name = "alisa"

    def __init__(self, workload, cost, schedule: AlisaSchedule | None = None):
        super().__init__(workload, cost)
        self.cfg = cfg = workload.policy
        self.r = 1 - cfg.kv_sparsity
        self.stats = load_selection_stats(cfg.selection_stats)
        self.value_bytes = INT8_BYTES_PER_VALUE if cfg.int8 else self.model.dtype_bytes
        self.kv_token_layer = self.model.kv_bytes_per_token_per_layer(self.value_bytes)
        self.input_token_layer = self.model.hidden_size * self.value_bytes  # stored layer input, same format
        self.gpu_tokens = self._gpu_token_budget()
        # The static split of the ablation: every token's KV split along heads, sized for the longest context.
        longest = workload.max_context()
        self.static_cpu_share = max(cfg.alpha or 0.0, 1 - self.gpu_tokens / longest)
        self._schedule = schedule

    @property
    def schedule(self) -> AlisaSchedule:
        if self._schedule is None:
            raise RuntimeError("this ALISA policy has no schedule yet: build it with alisa_sim.planner.make_policy")
        return self._schedule

    # ---- sizes and budgets -----------------------------------------------------------------------------------------
    def selected(self, context: int) -> tuple[int, int]:
        """(k, tokens attended): k recent plus k global picks, or every token while n < 2k."""
        k = swa_window(context, self.cfg.kv_sparsity)
        return k, min(context, 2 * k)

    def _selection_state_bytes(self) -> float:
        """The executor's selection state per sequence and layer (per head with per-head selection): int64 local
        sums over every position, and a ring of the last k + 1 attention rows (as wide as 2k or the prompt)."""
        if self.cfg.kv_sparsity == 0:
            return 0.0  # attending to every token needs no selection
        per_layer = self.model.num_heads if self.cfg.selection == "per_head" else 1
        positions = self.wl.max_context() - 1  # the last generated token's KV is never computed
        k = swa_window(positions, self.cfg.kv_sparsity)
        # int64 sums per position; the ring's int32 positions and fp32 probabilities, k + 1 rows of max(2k, s)
        per_sequence = 8 * positions + 8 * (k + 1) * max(2 * k, self.prompt_len)
        return self.batch * self.model.num_layers * per_layer * per_sequence

    def _staging_bytes(self) -> dict[str, float]:
        """Two prefetch buffers of one layer's selected tokens (and their layer inputs when recompute is on), and
        with the gather kernel the packed K/V the attention reads."""
        m = self.model
        k, attended = self.selected(self.wl.max_context())
        per_token = self.kv_token_layer + (self.input_token_layer if self.cfg.recompute else 0)
        staging = {"kv_staging": 2 * self.batch * attended * per_token}
        if self.cfg.attention_kernel == "gather":
            staging["attention_workspace"] = self.batch * attended * 2 * m.kv_dim * m.dtype_bytes
        return staging

    def static_memory(self) -> MemoryUse:
        return MemoryUse(gpu={"weights": self.model.weight_bytes, **self._staging_bytes(),
                              "selection_state": self._selection_state_bytes(), **self.activation_buffers()})

    def _gpu_token_budget(self) -> int:
        """Tokens per sequence whose KV fits on the GPU next to everything else."""
        free = self.wl.gpu_capacity_bytes - self.static_memory().gpu_bytes
        return max(0, int(free // (self.batch * self.model.num_layers * self.kv_token_layer)))

    def natural_p1(self) -> int:
        """The first decode step whose KV no longer fits the GPU budget (past the run: never)."""
        return max(0, self.gpu_tokens - self.prompt_len + 1)

    # ---- residency -------------------------------------------------------------------------------------------------
    def residency(self, step: int, schedule: AlisaSchedule | None = None) -> Residency:
        s = schedule or self.schedule
        n = self.context(step)
        if not self.cfg.dynamic_scheduling:
            on_cpu = round(n * self.static_cpu_share)  # a share of every token (along heads), counted in tokens
            return Residency(2 if on_cpu else 1, n - on_cpu, on_cpu, 0)
        if step < s.p1 and n <= self.gpu_tokens:
            return Residency(1, n, 0, 0)
        on_cpu = min(n, max(math.ceil(s.alpha * n), n - self.gpu_tokens))
        if self.cfg.recompute and step >= s.p2:
            deleted = math.floor(s.beta * on_cpu)
            return Residency(3, n - on_cpu, on_cpu - deleted, deleted)
        return Residency(2, n - on_cpu, on_cpu, 0)

    def phase(self, step: int) -> int:
        return self.residency(step).phase

    def kv_memory(self, context: int) -> MemoryUse:
        step = context - self.prompt_len
        res = self.residency(step)
        per_token = self.batch * self.model.num_layers
        cpu_kv = res.on_cpu * (self.r if self.cfg.storage == "sparse_only" else 1.0)
        cpu = {"kv": cpu_kv * per_token * self.kv_token_layer}
        if self.cfg.recompute and self.cfg.dynamic_scheduling:
            # Every offloaded token keeps its layer input so that it can be deleted and recomputed later.
            cpu["layer_inputs"] = (res.on_cpu + res.deleted) * per_token * self.input_token_layer
        return MemoryUse(gpu={"kv": res.on_gpu * per_token * self.kv_token_layer}, cpu=cpu)

    def placement(self) -> dict[str, float]:
        end = self.residency(self.wl.decode_steps)
        n = self.context(self.wl.decode_steps)
        return {"weights_gpu": 1.0, "kv_gpu_at_end": end.on_gpu / n, "kv_cpu_at_end": end.on_cpu / n,
                "kv_deleted_at_end": end.deleted / n}

    def plan(self) -> dict:
        plan = super().plan()
        # A schedule that never leaves Phase I has p1 past the run; p2 is pinned no earlier so the plan validates.
        chosen = {"p1": self.schedule.p1, "p2": max(self.schedule.p2, self.schedule.p1), "alpha": self.schedule.alpha,
                  "beta": self.schedule.beta}
        plan["params"].update(chosen)
        plan["workload"]["policy"].update(chosen)  # so running the plan runs this very schedule
        plan["gpu_kv_budget_tokens"] = self.gpu_tokens
        return plan

    # ---- per-step traffic ----------------------------------------------------------------------------------------
    def picks(self, step: int, schedule: AlisaSchedule | None = None) -> tuple[float, float]:
        """Per sequence and layer: (selected tokens to fetch from the CPU, deleted tokens to recompute)."""
        res = self.residency(step, schedule)
        n = self.context(step)
        k, attended = self.selected(n)
        if not self.cfg.dynamic_scheduling:
            return attended * self.static_cpu_share, 0.0  # every selected token has its CPU heads on the CPU
        if res.phase == 1:
            return 0.0, 0.0
        local_on_cpu = max(0, min(k, attended) - res.on_gpu)
        global_picks = attended - min(k, attended)
        older_than_gpu = self.stats.share_older_than(res.on_gpu / n, self.cfg.kv_sparsity)
        deleted = self.stats.share_older_than(1 - res.deleted / n, self.cfg.kv_sparsity) if res.deleted else 0.0
        return local_on_cpu + global_picks * (older_than_gpu - deleted), global_picks * deleted

    def offloaded(self, step: int, schedule: AlisaSchedule | None = None) -> int:
        """Tokens per sequence that leave the GPU window at this step (the prefill offloads its own)."""
        now = self.residency(step, schedule)
        if step > 1:
            before = self.residency(step - 1, schedule)
        else:  # what the prefill left on the GPU (it offloads the prompt beyond the budget itself)
            on_gpu = min(self.prompt_len, self.gpu_tokens)
            before = Residency(1, on_gpu, self.prompt_len - on_gpu, 0)
        return max(0, (now.on_cpu + now.deleted) - (before.on_cpu + before.deleted))

    # ---- templates ---------------------------------------------------------------------------------------------------
    def _attention_op(self, attended: int):
        m = self.model
        args = (self.batch, attended, m.num_heads, m.num_kv_heads, m.dim_per_head, self.value_bytes)
        if self.cfg.attention_kernel == "gather":
            seconds = self.cost.gathered_decode_attention_s(*args)
        else:
            seconds = self.cost.decode_attention_s(*args)
        path = "packed_attention" if self.cfg.attention_kernel == "gather" else "sparse_attention"
        return make_op("attention", "gpu", {"attention": seconds}, host_s=self.host_of(path))

    def _selection_op(self, rows: int, context: int):
        """Local-sum update over the attention row and top-k: memory-bound passes over fp32 sums."""
        per_layer = self.model.num_heads if self.cfg.selection == "per_head" else 1
        return self._gpu_op("selection", {"selection": (("local_sum", {"b": rows * per_layer, "T": context}),
                                                        ("topk", {"b": rows * per_layer, "L": context}))})

    def _recompute_op(self, tokens: float):
        m, rows = self.model, max(1, math.ceil(tokens))
        if self.cfg.recompute_source == "layer_input":
            seconds = self.cost.gemm_s(rows, m.hidden_size, 2 * m.kv_dim)
        else:  # through every earlier layer: on average (L - 1) / 2 full layers per recomputed token
            seconds = (m.num_layers - 1) / 2 * sum(self.cost.gemm_s(g.m, g.k, g.n) for g in m.layer_gemms(rows))
        return make_op("recompute", "gpu", {"recompute": seconds}, host_s=self.host_of("norm", "project", "split_heads"))

    def decode_template(self, step: int, schedule: AlisaSchedule | None = None) -> LayerTemplate:
        n = self.context(step)
        k, attended = self.selected(n)
        fetch, recompute = self.picks(step, schedule)
        t = LayerTemplate()
        buffered = ()
        if fetch > 0:
            t.add(self.copy_op("kv_fetch", "h2d", self.batch * fetch * self.kv_token_layer))
            buffered += ("kv_fetch",)
        if recompute > 0 and self.cfg.recompute_source == "layer_input":
            t.add(self.copy_op("input_fetch", "h2d", self.batch * recompute * self.input_token_layer))
            buffered += ("input_fetch",)
        t.add(self.pre_attention_op(self.batch))
        before_attention = ("qkv_proj",) + buffered
        if recompute > 0:
            t.add(self._recompute_op(self.batch * recompute),
                  after=("input_fetch",) if "input_fetch" in buffered else ())
            before_attention += ("recompute",)
        t.add(self._attention_op(attended), after=before_attention)
        t.add(self._selection_op(self.batch, n), after=("attention",))  # the picks of the next step
        t.add(self.post_attention_op(self.batch), after=("selection",))
        t.link("out_proj_mlp", "qkv_proj", lag=1)
        for name in buffered:  # two staging buffers: reused once attention two layers back has read them
            t.link("attention", name, lag=2)
        offloaded = self.offloaded(step, schedule) if self.cfg.dynamic_scheduling else self.static_cpu_share
        if offloaded > 0:
            per_token = self.kv_token_layer + (self.input_token_layer if self.cfg.recompute else 0)
            t.add(self.copy_op("kv_offload", "d2h", self.batch * offloaded * per_token), after=("qkv_proj",))
        return self.head_and_tail(t, self.batch)

    def prefill_template(self) -> LayerTemplate:
        rows = self.batch * self.prompt_len
        t = LayerTemplate()
        self.add_compute_chain(t, rows, self.prefill_attention_op())
        k, _ = self.selected(self.prompt_len)
        # Seed the local sums from the prompt's last k attention rows.
        t.add(self._selection_op(self.batch * k, self.prompt_len), after=("attention",))
        on_cpu = self.prompt_len - min(self.prompt_len, self.gpu_tokens) if self.cfg.dynamic_scheduling \
            else self.prompt_len * self.static_cpu_share
        if on_cpu > 0:
            t.add(self.copy_op("kv_offload", "d2h", self.batch * on_cpu * self.kv_token_layer), after=("qkv_proj",))
        return t

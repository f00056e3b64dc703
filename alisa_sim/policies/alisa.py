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
from alisa_sim.swa import kv_budget, swa_window

# INT8 KV: one byte per value plus a scale and a zero point (in the model's dtype) per group of up to 64 channels of
# a token, as the executor's kernels store it.
INT8_GROUP = 64


def int8_group(width: int, most: int = INT8_GROUP) -> int:
    """Channels per INT8 group for rows of `width`: the largest power of two up to `most` that divides it (the
    kernels' groups are powers of two; `most` itself for the widths of real models)."""
    group = 1
    while group * 2 <= most and width % (group * 2) == 0:
        group *= 2
    return group


def int8_bytes_per_value(width: int, dtype_bytes: int) -> float:
    """Bytes per INT8 value of a row of `width` channels, its groups' scale and zero point included."""
    return 1 + 2 * dtype_bytes / int8_group(width)


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
        m = self.model
        # groups never straddle heads; a stored layer input is grouped along the hidden size
        self.value_bytes = int8_bytes_per_value(m.dim_per_head, m.dtype_bytes) if cfg.int8 else m.dtype_bytes
        self.kv_token_layer = m.kv_bytes_per_token_per_layer(self.value_bytes)
        input_value = int8_bytes_per_value(m.hidden_size, m.dtype_bytes) if cfg.int8 else m.dtype_bytes
        self.input_token_layer = m.hidden_size * input_value  # stored layer input, same format
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
        return swa_window(context, self.cfg.kv_sparsity), kv_budget(context, self.cfg.kv_sparsity)

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

    def cpu_end(self, step: int, schedule: AlisaSchedule | None = None) -> int:
        """Positions [0, cpu_end) of every sequence are off the GPU (live on the CPU or deleted) at a step; it never
        decreases from one step to the next."""
        res = self.residency(min(step, self.wl.decode_steps), schedule)
        return res.on_cpu + res.deleted

    def input_end(self, schedule: AlisaSchedule | None = None) -> int:
        """Positions [0, input_end) keep their layer input on the CPU: every token the plan ever deletes (the last
        step deletes the most)."""
        if not (self.cfg.recompute and self.cfg.dynamic_scheduling):
            return 0
        return self.residency(self.wl.decode_steps, schedule).deleted

    def offload_end(self, step: int, schedule: AlisaSchedule | None = None) -> int:
        """Positions [0, offload_end) are in the CPU pool after a step: a token goes down one step before the plan
        moves it off the GPU (of the tokens that exist by then)."""
        if step < 0:
            return 0
        return min(self.context(step), self.cpu_end(step + 1, schedule))

    def kv_memory(self, context: int) -> MemoryUse:
        step = context - self.prompt_len
        res = self.residency(step)
        per_token = self.batch * self.model.num_layers
        cpu_kv = res.on_cpu * (self.r if self.cfg.storage == "sparse_only" else 1.0)
        cpu = {"kv": cpu_kv * per_token * self.kv_token_layer}
        if self.cfg.recompute and self.cfg.dynamic_scheduling and self.input_end():
            # The tokens the plan will delete keep their layer input, written when the token is computed.
            cpu["layer_inputs"] = min(context, self.input_end()) * per_token * self.input_token_layer
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
        # The newest token's K/V is always in the GPU window; the rest of [deleted, cpu_end) is live on the CPU.
        live_on_cpu = max(0, min(self.cpu_end(step, schedule), n - 1) - res.deleted)
        if self.cfg.kv_sparsity == 0:  # every token is attended: the fetched and recomputed rows are exact
            return float(live_on_cpu), float(res.deleted)
        # the k most recent tokens are always attended: those live on the CPU are fetched
        local_on_cpu = max(0, min(self.cpu_end(step, schedule), n - 1) - max(n - min(k, attended), res.deleted))
        global_picks = attended - min(k, attended)
        older_than_gpu = self.stats.share_older_than(res.on_gpu / n, self.cfg.kv_sparsity)
        deleted = self.stats.share_older_than(1 - res.deleted / n, self.cfg.kv_sparsity) if res.deleted else 0.0
        return local_on_cpu + global_picks * (older_than_gpu - deleted), global_picks * deleted

    def offloaded(self, step: int, schedule: AlisaSchedule | None = None) -> int:
        """Tokens per sequence copied to the CPU pool at this step (the prefill offloads its own)."""
        return self.offload_end(step, schedule) - self.offload_end(step - 1, schedule)

    def inputs_stored(self, step: int, schedule: AlisaSchedule | None = None) -> int:
        """Layer inputs per sequence written to the CPU at this step: the prompt's and then each new token's, for
        the positions the plan will delete."""
        first = 0 if step == 0 else self.context(step) - 1
        return max(0, min(self.context(step), self.input_end(schedule)) - first)

    def token_rows(self, step: int) -> dict[str, float]:
        rows = self.batch * self.model.num_layers
        counters = {"offloaded_tokens": rows * self.offloaded(step)}
        if step > 0:
            fetch, recompute = self.picks(step)
            counters.update(fetched_tokens=rows * fetch, recomputed_tokens=rows * recompute)
        return {name: count for name, count in counters.items() if count}

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
        if self.cfg.dynamic_scheduling:
            offloaded = self.batch * (self.offloaded(step, schedule) * self.kv_token_layer
                                      + self.inputs_stored(step, schedule) * self.input_token_layer)
        else:
            per_token = self.kv_token_layer + (self.input_token_layer if self.cfg.recompute else 0)
            offloaded = self.batch * self.static_cpu_share * per_token
        if offloaded > 0:
            t.add(self.copy_op("kv_offload", "d2h", offloaded), after=("qkv_proj",))
        return self.head_and_tail(t, self.batch)

    def prefill_template(self, schedule: AlisaSchedule | None = None) -> LayerTemplate:
        rows = self.batch * self.prompt_len
        t = LayerTemplate()
        self.add_compute_chain(t, rows, self.prefill_attention_op())
        k, _ = self.selected(self.prompt_len)
        # Seed the local sums from the prompt's last k attention rows.
        t.add(self._selection_op(self.batch * k, self.prompt_len), after=("attention",))
        schedule = schedule or self._schedule
        if self.cfg.dynamic_scheduling and schedule is not None:
            offloaded = self.batch * (self.offloaded(0, schedule) * self.kv_token_layer
                                      + self.inputs_stored(0, schedule) * self.input_token_layer)
        elif self.cfg.dynamic_scheduling:  # no schedule yet (the search's bound): the prompt beyond the budget
            offloaded = self.batch * (self.prompt_len - min(self.prompt_len, self.gpu_tokens)) * self.kv_token_layer
        else:
            offloaded = self.batch * self.prompt_len * self.static_cpu_share * self.kv_token_layer
        if offloaded > 0:
            t.add(self.copy_op("kv_offload", "d2h", offloaded), after=("qkv_proj",))
        return t

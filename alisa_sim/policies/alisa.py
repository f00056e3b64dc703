"""`alisa`: ALISA (Zhao, Wu, Wang, ISCA 2024): Sparse Window Attention, three-phase token-level KV scheduling with
recompute, and INT8 KV. Every choice the paper leaves open is an option; docs/alisa-model.md explains each.

Per decode step with n cached tokens, SWA attends to k = max(1, round(n*r/2)) recent tokens and k globally
selected older ones (r = 1 - kv_sparsity), and the current token on top of them (`swa_current: extra`, the default:
2k + 1) or as one of the k recent ones (`inside`: 2k), `alisa_sim.swa.kv_budget`. Weights and activations stay on the GPU. The KV cache moves through
three phases: I (all on the GPU), II from step p1 (the most recent tokens on the GPU, the rest on the CPU; only
the selected CPU-resident tokens come back each step, prefetched a layer ahead; tokens leaving the GPU window go
down), III from step p2 (a share beta of the oldest CPU KV is deleted and, when selected, recomputed on the GPU
from its stored layer input). How many global picks are old enough to live on the CPU (or to be deleted) is a
property of the model's attention, read from `selection_stats`, or replayed from a measured run (`selection_trace`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from alisa_sim.model_spec import Gemm
from alisa_sim.ops import LayerTemplate, make_op
from alisa_sim.policies.base import MemoryUse, Policy
from alisa_sim.errors import SpecError
from alisa_sim.selection_stats import K4_CAPPED_STATS, load_selection_stats
from alisa_sim.selection_trace import load_selection_trace
from alisa_sim.swa import kv_budget, swa_recent, swa_window

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
        self.capped = cfg.selector == "k4-capped"
        # k4-capped picks per KV head: an index list per sequence and KV head, each fetched row one head's of a token
        self.row_heads = self.model.num_kv_heads if self.capped else 1
        self.index_lists = self.batch * self.row_heads
        self.stats = load_selection_stats(cfg.selection_stats or (K4_CAPPED_STATS if self.capped else None))
        self.trace = load_selection_trace(cfg.selection_trace).decode_steps() if cfg.selection_trace else None
        m = self.model
        # groups never straddle heads; a stored layer input is grouped along the hidden size
        self.value_bytes = int8_bytes_per_value(m.dim_per_head, m.dtype_bytes) if cfg.int8 else m.dtype_bytes
        self.kv_token_layer = m.kv_bytes_per_token_per_layer(self.value_bytes)
        input_value = int8_bytes_per_value(m.hidden_size, m.dtype_bytes) if cfg.int8 else m.dtype_bytes
        self.input_token_layer = m.hidden_size * input_value  # stored layer input, same format
        self._schedule = None  # the GPU budget is what a schedule starts from
        self.gpu_tokens = self._gpu_token_budget()
        # The static split of the ablation: every token's KV split along heads, sized for the longest context.
        longest = workload.max_context()
        self.static_cpu_share = max(cfg.alpha or 0.0, 1 - self.gpu_tokens / longest)
        self._schedule = schedule
        self._ring_slots: dict[AlisaSchedule, int] = {}
        if self.trace is not None and schedule is not None:
            self._check_trace()

    @property
    def schedule(self) -> AlisaSchedule:
        if self._schedule is None:
            raise RuntimeError("this ALISA policy has no schedule yet: build it with alisa_sim.planner.make_policy")
        return self._schedule

    # ---- sizes and budgets -----------------------------------------------------------------------------------------
    def selected(self, context: int) -> tuple[int, int]:
        """(k, tokens attended): the recent window plus k global picks (`kv_budget` with the policy's `swa_current`),
        or every token while n is below that."""
        s = self.cfg.kv_sparsity
        return swa_window(context, s), kv_budget(context, s, self.cfg.swa_current)

    def recent(self, context: int) -> int:
        """Newest tokens every step attends (the current one included): k, or k + 1 with `swa_current: extra`."""
        return swa_recent(context, self.cfg.kv_sparsity, self.cfg.swa_current)

    def _selection_state_bytes(self) -> float:
        """The executor's selection state per sequence and layer (per head with per-head selection): int64 local
        sums over every position, and a ring of the last k + 1 attention rows (as wide as the longest selection or the
        prompt)."""
        if self.cfg.kv_sparsity == 0:
            return 0.0  # attending to every token needs no selection
        per_layer = self.model.num_heads if self.cfg.selection == "per_head" else 1
        positions = self.wl.max_context() - 1  # the last generated token's KV is never computed
        k, attended = self.selected(positions)
        # int64 sums per position; the ring's int32 positions and fp32 probabilities, k + 1 rows of max(budget, s)
        per_sequence = 8 * positions + 8 * (k + 1) * max(attended, self.prompt_len)
        return self.batch * self.model.num_layers * per_layer * per_sequence

    def _staging_bytes(self, offloads: bool, recomputes: bool) -> dict[str, float]:
        """Two prefetch buffers of one layer's selected tokens (and of their layer inputs when the plan deletes
        tokens), each with the (sequence, slot, position) int64 index list of its rows, when the plan keeps tokens
        off the GPU; with the gather kernel, the packed K/V the attention reads."""
        m = self.model
        attended = self.selected(self.positions)[1]
        per_token = (self.kv_token_layer if offloads else 0) + (self.input_token_layer if recomputes else 0)
        # an index entry per staged row (with k4-capped, per KV head's row)
        index_list = 3 * 8 * self.row_heads if offloads and self.cfg.dynamic_scheduling else 0
        staging = {"kv_staging": 2 * self.batch * attended * (per_token + index_list)}
        if self.cfg.attention_kernel == "gather":
            staging["attention_workspace"] = self.batch * attended * 2 * m.kv_dim * m.dtype_bytes
        return staging

    def static_memory(self) -> MemoryUse:
        """Weights, working buffers and selection state, and the executor's preallocated KV: with a schedule, its
        window ring, CPU pool and stored layer inputs (reserved beyond each step's live KV, `kv_slack`), the staging
        buffers on both sides and the host's copy of the selection, as it allocates them; without one (the GPU budget
        the schedule search starts from), the most a schedule can need on the GPU: staging for fetches and
        recomputes, and one spare ring slot."""
        m = self.model
        gpu = {"weights": m.weight_bytes, "selection_state": self._selection_state_bytes(), **self.activation_buffers()}
        if self.capped:  # the 4-bit copy of every position's keys: d / 2 levels, a scale and a minimum a KV head
            gpu["key_copy"] = (self.positions * self.batch * m.num_layers * m.num_kv_heads
                               * (m.dim_per_head // 2 + 2 * m.dtype_bytes))
        if self._schedule is None or not self.cfg.dynamic_scheduling:
            ring_slot = m.num_layers * self.batch * self.kv_token_layer if self.cfg.dynamic_scheduling else 0.0
            return MemoryUse(gpu={**gpu, **self._staging_bytes(True, self.cfg.recompute), "kv": ring_slot})
        per_position = m.num_layers * self.batch
        offloaded = max(self.cpu_end(step) for step in range(self.wl.decode_steps + 1))
        inputs = self.input_end()
        staging = self._staging_bytes(offloaded > 0, inputs > 0)
        pools = self.kv_slack(MemoryUse(gpu={"kv": self.ring_slots() * per_position * self.kv_token_layer},
                                        cpu={"kv": offloaded * per_position * self.kv_token_layer,
                                             "layer_inputs": inputs * per_position * self.input_token_layer}))
        host = {"kv_staging": staging["kv_staging"]}
        if offloaded:  # each layer's selection (per KV head with k4-capped), int32 positions
            host["selection_indices"] = m.num_layers * self.index_lists * self.selected(self.positions)[1] * 4
        return MemoryUse(gpu={**gpu, **staging, **pools.gpu}, cpu={**host, **pools.cpu})

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

    def host_key(self, phase: int) -> str:
        return f"alisa-phase-{phase}"  # each phase's hooks (prefetch, offload, recompute) run their own Python

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
    def _check_trace(self) -> None:
        """A selection trace replays the plan it was measured under: the same steps, and at each decode step the
        same phase and KV bytes on each tier (so the same tokens live where the run kept them)."""
        path, wl = self.cfg.selection_trace, self.wl.workload
        for row in self.trace.values():
            if row.step > self.wl.decode_steps:
                raise SpecError(f"selection_trace {path}: decode step {row.step} is past this run's last step "
                                f"{self.wl.decode_steps}")
        for step in range(1, self.wl.decode_steps + 1):
            row = self.trace.get(step)
            if row is None:
                raise SpecError(f"selection_trace {path}: no decode step {step} (it traces {len(self.trace)} decode "
                                f"steps, this run has {self.wl.decode_steps})")
            kv = self.kv_memory(self.context(step))
            held = (self.phase(step), kv.gpu_bytes, kv.cpu_bytes)
            if (row.phase, row.gpu_kv_bytes, row.cpu_kv_bytes) != held:
                raise SpecError(
                    f"selection_trace {path}: at decode step {step} the traced run was in Phase {row.phase} with "
                    f"{row.gpu_kv_bytes} / {row.cpu_kv_bytes} bytes of KV on the GPU / CPU, this plan in Phase "
                    f"{held[0]} with {held[1]} / {held[2]} (batch {wl.batch_size}, prompt {wl.prompt_len}): a trace "
                    "replays only the plan it was measured under (pin its p1, p2, alpha and beta)")

    def _traced_rows(self, step: int, schedule: AlisaSchedule | None) -> tuple[int, int] | None:
        """The run's (fetched, recomputed) token rows at a decode step, under the plan's own schedule only (the
        schedule search's candidates are priced from the statistics)."""
        if self.trace is None or step == 0 or (schedule is not None and schedule != self._schedule):
            return None
        row = self.trace[step]
        return row.fetched_tokens, row.recomputed_tokens

    def picks(self, step: int, schedule: AlisaSchedule | None = None) -> tuple[float, float]:
        """Per sequence and layer: (selected tokens to fetch from the CPU, deleted tokens to recompute; with k4-capped
        rows of one KV head); a selection trace's rows spread evenly over the step's layers and sequences."""
        traced = self._traced_rows(step, schedule)
        if traced is not None:
            rows = self.batch * self.model.num_layers
            return traced[0] / rows, traced[1] / rows
        res = self.residency(step, schedule)
        n = self.context(step)
        attended = self.selected(n)[1]
        if not self.cfg.dynamic_scheduling:
            return attended * self.static_cpu_share, 0.0  # every selected token has its CPU heads on the CPU
        if res.phase == 1:
            return 0.0, 0.0
        # The newest token's K/V is always in the GPU window; the rest of [deleted, cpu_end) is live on the CPU.
        live_on_cpu = max(0, min(self.cpu_end(step, schedule), n - 1) - res.deleted)
        if self.cfg.kv_sparsity == 0:  # every token is attended: the fetched and recomputed rows are exact
            return float(live_on_cpu), float(res.deleted)
        # the recent window is always attended: its tokens live on the CPU are fetched
        recent = self.recent(n)
        local_on_cpu = max(0, min(self.cpu_end(step, schedule), n - 1) - max(n - recent, res.deleted))
        global_picks = attended - recent
        older_than_gpu = self.stats.share_older_than(res.on_gpu / n, self.cfg.kv_sparsity)
        deleted = self.stats.share_older_than(1 - res.deleted / n, self.cfg.kv_sparsity) if res.deleted else 0.0
        fetched = local_on_cpu + global_picks * (older_than_gpu - deleted)
        return self.row_heads * fetched, self.row_heads * global_picks * deleted

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
            fetch, recompute = self._traced_rows(step, None) or (rows * picks for picks in self.picks(step))
            counters.update(fetched_tokens=fetch, recomputed_tokens=recompute)
        return {name: count for name, count in counters.items() if count}

    # ---- templates ---------------------------------------------------------------------------------------------------
    # Every op below prices the executor's named ops as `alisa_exec.policies.alisa` issues them, call for call
    # (tests/exec/test_op_ledger.py): the window ring, the CPU pools in parts (INT8 levels, scales, zero points),
    # the host gathers and index lists of the prefetch, the recompute, the selection and its copy to the host.
    def ring_slots(self, schedule: AlisaSchedule | None = None) -> int:
        """Rows of the executor's GPU window ring: the most tokens a step keeps on the GPU, plus one slot, so the
        newest token never overwrites a row still being copied out (at most every position of the run)."""
        schedule = schedule or self.schedule
        if schedule not in self._ring_slots:
            most = max(self.residency(step, schedule).on_gpu for step in range(self.wl.decode_steps + 1))
            self._ring_slots[schedule] = min(self.wl.max_context() - 1, most + 1)
        return self._ring_slots[schedule]

    def _part_bytes(self, width: int, group: int) -> tuple[float, ...]:
        """Bytes a stored row of `width` values takes in each of its parts: the values, or INT8 levels, scales
        and zero points (a scale and a zero point per group of channels, in the model's dtype)."""
        e = self.model.dtype_bytes
        if not self.cfg.int8:
            return (width * e,)
        groups = width // int8_group(width, group)
        return (width, groups * e, groups * e)

    def _kv_parts(self) -> tuple[float, ...]:
        m = self.model
        return self._part_bytes(2 * m.kv_dim, int8_group(m.dim_per_head))

    def _fetched_parts(self) -> tuple[float, ...]:
        """Bytes of a fetched row in each part: a token's K/V row, or one KV head's of it with k4-capped."""
        return tuple(part / self.row_heads for part in self._kv_parts())

    def _input_parts(self) -> tuple[float, ...]:
        return self._part_bytes(self.model.hidden_size, INT8_GROUP)

    def _store_call(self, batch: int, tokens: int, width: int) -> tuple[str, dict[str, int]]:
        """Rows written into a cache in its format: INT8 quantized, or stored as they are."""
        e = self.model.dtype_bytes
        if self.cfg.int8:
            return "kv_quantize", {"rows": batch * tokens, "width": width, "e": e}
        return "kv_store", {"b": batch, "T": tokens, "width": width, "e": e}

    def _rows_copy(self, name: str, direction: str, rows: float, parts: tuple[float, ...], payload: bool = True):
        return self.copy_op(name, direction, rows * sum(parts), pieces=tuple(rows * part for part in parts),
                            payload=payload)

    def _attention_op(self, attended: int, staged: bool):
        """The new token's K/V into the window ring, then attention over the attended tokens (ring slots and, when
        the step fetched or recomputed any, staged rows in one index list with the fused kernel; a packed copy of
        them with the gather kernel)."""
        m = self.model
        store = self._store_call(self.batch, 1, 2 * m.kv_dim)
        if self.cfg.attention_kernel == "gather":
            args = (self.batch, attended, m.num_heads, m.num_kv_heads, m.dim_per_head, self.value_bytes)
            seconds, host_s = self._priced(store)
            return make_op("attention", "gpu", {"attention": seconds + self.cost.gathered_decode_attention_s(*args)},
                           host_s=host_s + self.host_of("packed_attention"))
        shape = {**self._cache_shape(attended), "e": 1 if self.cfg.int8 else m.dtype_bytes}
        path = "staged_sparse_attention" if staged else "sparse_attention"
        return self._gpu_op("attention", {"elementwise": (store,), "attention": ((path, shape),)})

    def _selection_op(self, step: int, context: int):
        """The step's attention row pushed into the local sums, then (unless it is the last step) the next step's
        picks over n + 1 tokens (per head with per-head selection); the prefill (step 0) seeds the sums with the
        prompt's last attention rows, as many as the sums' ring holds."""
        per_layer = self.model.num_heads if self.cfg.selection == "per_head" else 1
        rows = self.batch * per_layer
        if step == 0:
            m = self.model
            capacity = swa_window(self.wl.max_context() - 1, self.cfg.kv_sparsity) + 1
            seed = ("window_rows", {"b": self.batch, "R": min(capacity, context), "L": context, "h": m.num_heads,
                                    "kv": m.num_kv_heads, "d": m.dim_per_head})
            pushes = (seed,) + (("local_sum", {"b": rows, "T": context}),) * min(capacity, context)
        else:
            pushes = (("local_sum", {"b": rows, "T": self.selected(context)[1]}),)
        picks = (("topk", {"b": rows, "L": context + 1}),) if step < self.wl.decode_steps else ()
        return self._gpu_op("selection", {"selection": pushes + picks})

    def _selection_copy(self, step: int, schedule: AlisaSchedule | None):
        """The next step's picks copied to the host when that step reads from the CPU (an index list)."""
        following = step + 1
        if self.capped or following > self.wl.decode_steps or not self.cpu_end(following, schedule):
            return None  # k4-capped's SWA set stays on the GPU (its own choice goes to the host, `_choice_ops`)
        return self.copy_op("selection_to_host", "d2h", self.batch * self.selected(self.context(following))[1] * 4,
                            payload=False)

    def _key_copy_op(self, tokens: int):
        m = self.model
        return self._gpu_op("key_copy", {"elementwise": (("key_copy_store", {"rows": self.batch * tokens,
                                                                           "kv": m.num_kv_heads, "d": m.dim_per_head,
                                                                           "e": m.dtype_bytes}),)})

    def _choice_ops(self, step: int, schedule: AlisaSchedule | None, context: int) -> list:
        """k4-capped: the new key into the 4-bit copy, the step's query over the copy and the capped choice per KV
        head, and that choice to the host when the step reads from the CPU (an index list per sequence and KV
        head)."""
        m = self.model
        attended = self.selected(context)[1]
        shape = {"b": self.batch, "L": context, "h": m.num_heads, "kv": m.num_kv_heads, "d": m.dim_per_head,
                 "e": m.dtype_bytes}
        choose = self._gpu_op("choose", {"selection": (
            ("key_copy_attention", shape),
            ("capped_pick", {"b": self.batch, "kv": m.num_kv_heads, "L": context,
                             "m": attended - self.recent(context)}))})
        ops = [self._key_copy_op(1), choose]
        if self.cpu_end(step, schedule):
            ops.append(self.copy_op("selection_to_host", "d2h", self.index_lists * attended * 4, payload=False))
        return ops

    def _recompute_op(self, tokens: float):
        """K/V of the selected deleted tokens: their stored layer inputs decoded, normed and projected to K and V
        (rotary applied), stored into the staging buffer in the cache's format."""
        m, rows = self.model, max(1, math.ceil(tokens))
        if self.cfg.recompute_source != "layer_input":  # through every earlier layer: (L - 1) / 2 of them on average
            seconds = (m.num_layers - 1) / 2 * sum(self.cost.gemm_s(g.m, g.k, g.n) for g in m.layer_gemms(rows))
            return make_op("recompute", "gpu", {"recompute": seconds},
                           host_s=self.host_of("norm", "project", "split_heads"))
        decode = (("kv_dequantize", {"rows": rows, "width": m.hidden_size, "e": m.dtype_bytes}),) if self.cfg.int8 else ()
        calls = decode + (("norm", self._norm(rows)), self._project(Gemm("kv_proj", rows, m.hidden_size, 2 * m.kv_dim)),
                          self._store_call(1, rows, 2 * m.kv_dim))
        return self._gpu_op("recompute", {"recompute": calls})

    def _offload_ops(self, step: int, schedule: AlisaSchedule | None, first: int, end: int) -> list:
        """Window rows [first, end) of every sequence to the CPU pool, in the ring's contiguous runs (each run's
        parts one copy each), and the step's new layer inputs of tokens the plan deletes (their own copies)."""
        ops, parts, window = [], self._kv_parts(), self.ring_slots(schedule)
        runs = []
        while first < end:
            count = min(end - first, window - first % window)
            runs.append(count)
            first += count
        if runs:
            pieces = tuple(count * self.batch * part for count in runs for part in parts)
            ops.append(self.copy_op("kv_offload", "d2h", sum(pieces), pieces=pieces))
        stored = self.inputs_stored(step, schedule) if self.cfg.recompute and self.cfg.dynamic_scheduling else 0
        if stored:
            ops.append(self._rows_copy("input_offload", "d2h", self.batch * stored, self._input_parts()))
        return ops

    def _prefetch_ops(self, step: int, schedule: AlisaSchedule | None, attended: int, fetch: float,
                      recompute: float) -> list:
        """A step that keeps tokens off the GPU: the host splits each layer's selection (`attended` positions per
        sequence) into the CPU rows to fetch and the deleted ones to recompute, gathers those rows (the deleted ones'
        layer inputs) from the pinned pools into staging, and copies them to the GPU with the index list of
        (sequence, slot, position) per row."""
        if not self.cpu_end(step, schedule):
            return []
        fetched, recomputed = self.batch * fetch, self.batch * recompute
        if self.capped:  # one-KV-head rows, gathered in one call (it deletes nothing)
            gathers = (("head_gather", {"rows": int(fetched), "row_bytes": int(sum(self._fetched_parts()))}),) \
                if fetched else ()
        else:
            gathers = tuple(("host_gather", {"bytes": int(rows * part)}) for rows, parts in
                            ((fetched, self._kv_parts()), (recomputed, self._input_parts())) if rows for part in parts)
        calls = (("stage_indices", {"b": self.index_lists, "T": attended}),) + gathers
        seconds, host_s = self._priced(*calls)
        ops = [make_op("host_gather", "cpu", {"cpu": seconds}, host_s=host_s,
                       calls=tuple((op, tuple(sorted(shape.items()))) for op, shape in calls))]
        if fetched:
            ops.append(self._rows_copy("kv_fetch", "h2d", fetched, self._fetched_parts()))
        if recomputed:
            ops.append(self._rows_copy("input_fetch", "h2d", recomputed, self._input_parts()))
        if fetched + recomputed:
            ops.append(self.copy_op("indices", "h2d", 3 * (fetched + recomputed) * 8, payload=False))
        return ops

    def decode_template(self, step: int, schedule: AlisaSchedule | None = None) -> LayerTemplate:
        n = self.context(step)
        attended = self.selected(n)[1]
        fetch, recompute = self.picks(step, schedule)
        t = LayerTemplate()
        buffered = ()
        phase = self.residency(step, schedule).phase
        self.set_pricing_phase(phase)
        if self.capped:  # the choice needs the layer's query: its fetch follows it, inside the layer
            t.add(self.pre_attention_op(self.batch, "decode", phase=phase))
            choice, prefetch = self._choice_ops(step, schedule, n), self._prefetch_ops(step, schedule, attended, fetch, 0)
            chain = ("qkv_proj",)
            for op in choice + prefetch:
                t.add(op, after=chain[-1:])
                chain += (op.name,)
            buffered = tuple(op.name for op in prefetch)
            before_attention = ("qkv_proj",) + tuple(op.name for op in choice) + tuple(
                name for name in buffered if name != "host_gather")
        elif self.cfg.dynamic_scheduling:
            for op in self._prefetch_ops(step, schedule, attended, fetch, recompute):
                t.add(op, after=buffered[-1:])
                buffered += (op.name,)
        elif fetch > 0:  # the static head split: every selected token's CPU heads come up
            t.add(self.copy_op("kv_fetch", "h2d", self.batch * fetch * self.kv_token_layer))
            buffered += ("kv_fetch",)
        if not self.capped:
            t.add(self.pre_attention_op(self.batch, "decode", phase=phase))
            before_attention = ("qkv_proj",) + tuple(name for name in buffered if name != "host_gather")
        if recompute > 0:
            t.add(self._recompute_op(self.batch * recompute),
                  after=("input_fetch",) if "input_fetch" in buffered else ())
            before_attention += ("recompute",)
        staged = self.cfg.dynamic_scheduling and fetch + recompute > 0  # as the executor's prefetch stages them
        t.add(self._attention_op(attended, staged), after=before_attention)
        after_attention = ("attention",)
        if self.cfg.kv_sparsity > 0:
            t.add(self._selection_op(step, n), after=after_attention)  # the picks of the next step
            after_attention = ("selection",)
            copy = self._selection_copy(step, schedule)
            if copy is not None:
                t.add(copy, after=after_attention)
        t.add(self.post_attention_op(self.batch), after=after_attention)
        t.link("out_proj_mlp", "qkv_proj", lag=1)
        for name in buffered:  # two staging buffers: reused once attention two layers back has read them
            if name != "host_gather":
                t.link("attention", name, lag=2)
        if self.cfg.dynamic_scheduling:
            for op in self._offload_ops(step, schedule, self.offload_end(step - 1, schedule),
                                        self.offload_end(step, schedule)):
                t.add(op, after=("qkv_proj",))
        else:
            per_token = self.kv_token_layer + (self.input_token_layer if self.cfg.recompute else 0)
            offloaded = self.batch * self.static_cpu_share * per_token
            if offloaded > 0:
                t.add(self.copy_op("kv_offload", "d2h", offloaded), after=("qkv_proj",))
        return self.head_and_tail(t, self.batch, "decode", phase)

    def prefill_template(self, schedule: AlisaSchedule | None = None) -> LayerTemplate:
        """The prompt pass; its K/V written into the window ring (the tokens the GPU keeps), the tokens bound for the
        CPU encoded and copied there, the layer inputs of tokens the plan deletes stored, the local sums seeded."""
        m, s = self.model, self.prompt_len
        rows = self.batch * s
        t = LayerTemplate()
        schedule = schedule or self._schedule
        phase = self.residency(0, schedule).phase if schedule is not None else 1
        self.set_pricing_phase(phase)
        self.add_compute_chain(t, rows, self.prefill_attention_op(), "prefill", phase=phase)
        if not self.cfg.dynamic_scheduling:
            offloaded = self.batch * s * self.static_cpu_share * self.kv_token_layer
            if offloaded > 0:
                t.add(self.copy_op("kv_offload", "d2h", offloaded), after=("qkv_proj",))
            return t
        if schedule is not None:
            kept, offload_to = self.cpu_end(0, schedule), self.offload_end(0, schedule)
        else:  # no schedule yet (the search's bound): the prompt beyond the budget
            kept = offload_to = s - min(s, self.gpu_tokens)
        stores = ((self._store_call(self.batch, s - kept, 2 * m.kv_dim),) if s > kept else ()) + \
            ((self._store_call(self.batch, offload_to, 2 * m.kv_dim),) if offload_to and self.cfg.int8 else ())
        stored_inputs = min(s, self.input_end(schedule)) if schedule is not None else 0
        if stored_inputs and self.cfg.int8:
            stores += (self._store_call(self.batch, stored_inputs, m.hidden_size),)
        if stores:
            t.add(self._gpu_op("kv_store", {"elementwise": stores}), after=("attention",))
        if self.capped:
            t.add(self._key_copy_op(s), after=("qkv_proj",))
        if offload_to:
            t.add(self._rows_copy("kv_offload", "d2h", self.batch * offload_to, self._kv_parts()), after=("qkv_proj",))
        if stored_inputs:
            t.add(self._rows_copy("input_offload", "d2h", self.batch * stored_inputs, self._input_parts()),
                  after=("qkv_proj",))
        if self.cfg.kv_sparsity > 0:
            t.add(self._selection_op(0, s), after=("attention",))
            copy = self._selection_copy(0, schedule) if schedule is not None else None
            if copy is not None:
                t.add(copy, after=("selection",))
        return t

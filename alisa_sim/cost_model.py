"""CostModel: op times in seconds, interpolated from the raw measurements of a hardware profile.

GPU times are device times (CUDA-event timed in the profiles); the host's cost of issuing an op is separate
(`host_s`: the profile's `launch_overhead_s` per kernel launch), and the engine puts it on the host resource. Every
measured point is reproduced exactly; between points time follows a power law (linear in log-log), below the measured
range it stays at the smallest measured time (the latency floor) and above it grows at the edge point's rate.
"""

from __future__ import annotations

import math
from collections import defaultdict
from functools import lru_cache

import numpy as np

from alisa_sim.hardware import NAMED_OPS, HardwareProfile, op_work

COPY_DIRECTIONS = ("h2d", "d2h")
# Eager PyTorch calls per named op as the executor issues it (for rows derived without a host measurement: the host
# cost is this many launches at the profile's launch_overhead_s).
EAGER_CALLS = {"project": 1, "project_packed": 1, "norm": 4, "activate": 2, "split_heads": 8, "residual": 1, "embed": 2,
               "argmax": 1, "causal_attention": 3, "window_rows": 6, "masked_attention": 4, "rows_attention": 3,
               "packed_attention": 8, "sparse_attention": 10, "staged_sparse_attention": 16, "paged_attention": 10,
               "cpu_attention": 3, "kv_store": 2, "block_store": 1, "kv_quantize": 8, "kv_dequantize": 3, "keep_prompt": 9,
               "evict_victim": 6, "slot_store": 5, "score_update": 1, "key_copy_store": 12,
               "key_copy_attention": 14, "capped_pick": 16, "local_sum": 6,
               "topk": 6, "copy_h2d_pinned": 1, "copy_h2d_pageable": 1, "copy_d2h_pinned": 1, "copy_d2h_pageable": 1,
               "host_gather": 1, "head_gather": 6, "stage_indices": 14}
# Memory-bound ops derived as bytes over the HBM bandwidth, at work sizes from 4 KiB to 4 GiB.
_BANDWIDTH_OPS = ("norm", "activate", "split_heads", "residual", "embed", "argmax", "kv_store", "block_store",
                  "kv_quantize", "kv_dequantize", "keep_prompt", "evict_victim", "slot_store", "score_update",
                  "key_copy_store", "key_copy_attention", "capped_pick", "local_sum", "topk")
_DERIVED_ROWS = tuple(4**i for i in range(0, 13, 2))
# Bytes per element of the dtypes CPU attention rows are measured in.
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def per_instance_cache(method):
    """`method` (bound) memoized for its instance alone: a class-level lru_cache would keep every instance it saw
    alive (a calibration builds thousands of cost models)."""
    return lru_cache(maxsize=1 << 16)(method)


class _LogLogCurve:
    """Time over a work size (elements, bytes or FLOPs): log-log interpolation between measured points, the first
    point's time below them, the last point's rate above them. Repeated sizes are merged by geometric mean."""

    def __init__(self, sizes, times, floor_s: float | None = None):
        """With `floor_s`, sizes below the measured ones scale down at the first point's rate, not below floor_s
        (for curves whose first point is already bandwidth-bound); without it, they take the first point's time."""
        self.floor_s = floor_s
        log_sizes, inverse = np.unique(np.log(np.asarray(sizes, dtype=float)), return_inverse=True)
        log_times = np.bincount(inverse, np.log(np.asarray(times, dtype=float))) / np.bincount(inverse)
        self.log_sizes = log_sizes
        self.log_times = log_times
        self.max_size = math.exp(log_sizes[-1])
        self.max_time = math.exp(log_times[-1])

    def __call__(self, size: float) -> float:
        if size <= 0:
            return 0.0
        if size >= self.max_size:
            return self.max_time * size / self.max_size
        if self.floor_s is not None and math.log(size) < self.log_sizes[0]:
            return max(self.floor_s, math.exp(self.log_times[0]) * size / math.exp(self.log_sizes[0]))
        # np.interp clamps to the first point's time below the measured range: the latency floor.
        return math.exp(float(np.interp(math.log(size), self.log_sizes, self.log_times)))


def decode_kv_bytes(batch, context, num_kv_heads, head_dim, dtype_bytes):
    """K and V bytes one decode step reads (scalars or numpy arrays)."""
    return 2 * batch * context * num_kv_heads * head_dim * dtype_bytes


def causal_attention_flops(batch, prompt_len, num_heads, head_dim):
    """Prefill attention FLOPs: QK^T and PV over the causal lower triangle, half of 4*b*H*L^2*D."""
    return 2 * batch * num_heads * head_dim * prompt_len**2


def _bandwidth_shape(op: str, rows: int) -> dict[str, int]:
    """A shape of `op` over `rows` rows of width 1024 (fp16) for bandwidth-derived rows."""
    keys = NAMED_OPS[op][0]
    if op in ("kv_store", "block_store"):  # rows tokens of 1024 values
        return {"b": 1, "T": rows, "width": 1024, "e": 2}
    if op == "slot_store":  # one row a sequence and KV head: rows sequences of 8 KV heads of 128 values
        return {"b": rows, "kv": 8, "d": 128, "e": 2, "scored": 1}
    values = {"rows": rows, "width": 1024, "e": 2, "gated": 1, "rms": 1, "b": 1, "T": rows * 1024, "L": rows * 1024,
              "kv": 1, "d": 128, "scored": 1, "h": 1, "m": 1}
    return {key: values[key] for key in keys}


def derived_op_rows(profile: HardwareProfile) -> list[dict]:
    """Named-op rows for every op the profile does not time itself, derived from its other tables and marked
    "derived": projections are the GEMM table, attention paths (and the prefill's window rows) the decode and prefill
    attention tables, CPU attention the CPU section, copies the link table (host gathers, and ALISA's split of its
    selection, at the CPU copy bandwidth), elementwise and selection ops bytes over the measured HBM bandwidth (never
    below one launch_overhead_s: back-to-back small kernels run at the rate the host issues them); host cost
    EAGER_CALLS x launch_overhead_s."""
    gpu, measured = profile.gpu, {row.op for row in profile.gpu.ops if row.source == "measured"}
    floor_s, hbm_Bps = gpu.launch_overhead_s, gpu.hbm_GBps * 1e9
    shapes: dict[str, list[tuple[dict, float]]] = {
        "project": [({"m": r.m, "k": r.k, "n": r.n, "e": 2}, r.s) for r in gpu.gemm_fp16],
        "project_packed": [({"m": r.m, "k": r.k, "n": r.n, "e": 2}, r.s) for r in gpu.gemm_fp16],
        "causal_attention": [({"b": r.b, "L": r.L, "h": r.H, "d": r.D}, r.s) for r in gpu.prefill_attention_fp16],
        # As causal attention of the same FLOPs (all R = L rows): a lower bound, as the rows are explicit and fp32.
        "window_rows": [({"b": r.b, "R": r.L, "L": r.L, "h": r.H, "kv": r.H, "d": r.D}, r.s)
                        for r in gpu.prefill_attention_fp16],
        "cpu_attention": [({"b": r.b, "T": r.L, "h": r.H, "kv": r.H, "d": r.D, "e": _DTYPE_BYTES[r.dtype]}, r.s)
                          for r in profile.cpu.decode_attention],
    }
    decode = [({"b": r.b, "T": r.L, "h": r.H, "kv": r.H, "d": r.D, "e": 2}, r.s) for r in gpu.decode_attention_fp16]
    # Packed attention reads K/V already packed (H2O's slots, vLLM's gathered blocks) and the fused sparse kernel
    # reads its index list's rows in place: both as dense decode attention over the tokens they attend.
    shapes.update({"masked_attention": decode, "rows_attention": decode, "packed_attention": decode,
                   "sparse_attention": decode, "staged_sparse_attention": decode, "paged_attention": decode})
    for direction in COPY_DIRECTIONS:
        for memory in ("pinned", "pageable"):
            shapes[f"copy_{direction}_{memory}"] = [({"bytes": r.bytes}, getattr(r, f"{direction}_{memory}_s"))
                                                    for r in profile.link.copies]
    shapes["host_gather"] = [({"bytes": r.bytes}, max(floor_s, 2 * r.bytes / (profile.cpu.copy_GBps * 1e9)))
                             for r in profile.link.copies]
    shapes["head_gather"] = [({"rows": r.bytes // 256, "row_bytes": 256},
                               max(floor_s, 2 * r.bytes / (profile.cpu.copy_GBps * 1e9))) for r in profile.link.copies]
    shapes["stage_indices"] = [(shape, max(floor_s, op_work("stage_indices", shape) / (profile.cpu.copy_GBps * 1e9)))
                               for shape in ({"b": 1, "T": rows} for rows in _DERIVED_ROWS)]
    for op in _BANDWIDTH_OPS:
        shapes[op] = [(shape, max(floor_s, op_work(op, shape) / hbm_Bps))
                      for shape in (_bandwidth_shape(op, rows) for rows in _DERIVED_ROWS)]
    return [{"op": op, "shape": shape, "s": seconds, "host_s": EAGER_CALLS[op] * gpu.launch_overhead_s,
             "source": "derived"} for op in NAMED_OPS if op not in measured for shape, seconds in shapes[op]]


# The shape key a named op's rows grow along (its length); with the batch `b` of cache ops, the other keys name the
# op's family (head layout, width, dtype), which its rows are grouped by.
_LENGTH_KEYS = {"project": "m", "project_packed": "m", "causal_attention": "L", "window_rows": "L", "topk": "L",
                "local_sum": "T", "kv_store": "T", "block_store": "T", "masked_attention": "T",
                "rows_attention": "T", "packed_attention": "T", "sparse_attention": "T",
                "staged_sparse_attention": "T", "paged_attention": "T", "cpu_attention": "T", "keep_prompt": "L", "evict_victim": "T",
                "score_update": "T", "key_copy_attention": "L", "capped_pick": "L",
                "copy_h2d_pinned": "bytes", "copy_h2d_pageable": "bytes", "copy_d2h_pinned": "bytes",
                "copy_d2h_pageable": "bytes", "host_gather": "bytes", "stage_indices": "T"}


def op_family(op: str, shape: dict[str, int]) -> tuple[tuple[str, int], ...]:
    """The op's family of a shape: every key but its length and batch."""
    length = _LENGTH_KEYS.get(op, "rows")
    return tuple(sorted((key, value) for key, value in shape.items() if key not in (length, "b")))


class _BatchCurves:
    """One family's time over work: one log-log curve (the first row's time below the rows), or for attention over a
    cache (ops over `b` sequences of `T` tokens) one curve per measured batch interpolated in log batch (the nearest
    batch's curve outside them), each scaling down below its smallest row at that row's rate, not below the family's
    fastest row (a large batch's smallest cache is already bandwidth-bound)."""

    def __init__(self, op: str, rows: list[dict]):
        self.op = op
        by_batch = defaultdict(list)
        for row in rows:
            by_batch[row["shape"]["b"] if "T" in row["shape"] else 1].append((op_work(op, row["shape"]), row["s"]))
        floor_s = min(row["s"] for row in rows) if len(by_batch) > 1 else None
        batches = sorted(by_batch)
        self._log_batches = np.log(np.array(batches, dtype=float))
        self._curves = [_LogLogCurve(*zip(*by_batch[b]), floor_s=floor_s) for b in batches]

    def __call__(self, work: float, batch: int) -> float:
        if len(self._curves) == 1:
            return self._curves[0](work)
        log_batch = math.log(batch)
        above = int(np.searchsorted(self._log_batches, log_batch))
        if above == 0 or above == len(self._curves):  # outside the measured batches: the nearest batch's curve
            return self._curves[min(above, len(self._curves) - 1)](work)
        pair = slice(above - 1, above + 1)  # only the two batches around it enter the interpolation
        log_times = [math.log(curve(work)) for curve in self._curves[pair]]
        return math.exp(float(np.interp(log_batch, self._log_batches[pair], log_times)))


# Shape keys that switch an op's variant (a gated MLP, H2O's scored rule): a family of the other variant is never
# nearer than one of the same, whatever its sizes.
_VARIANT_KEYS = ("gated", "scored", "rms")


def _family_point(family: tuple[tuple[str, int], ...]) -> list[float]:
    """Where a family lies for the nearest-family search: log sizes, and its variant flags far apart."""
    return [1e3 * value if key in _VARIANT_KEYS else math.log(max(1, value)) for key, value in family]


class _OpCurve:
    """A named op's time over its work, from the rows of its family of the asked shape, else the nearest one (in
    log space over the family keys, of the same variant: a profile measured at the model's own head layout and
    widths prices it from those rows exactly; another family's rows price it by its work)."""

    def __init__(self, op: str, rows: list[dict]):
        self.op = op
        families = defaultdict(list)
        for row in rows:
            families[op_family(op, row["shape"])].append(row)
        self._families = list(families)
        self._index = {family: i for i, family in enumerate(self._families)}
        self._family_points = np.array([_family_point(family) for family in self._families], dtype=float)
        self._curves = [_BatchCurves(op, families[family]) for family in self._families]

    def __call__(self, shape: dict[str, int]) -> float:
        work = op_work(self.op, shape)
        if work <= 0:
            return 0.0
        nearest = 0
        if (family := op_family(self.op, shape)) in self._index:  # measured at this family: its own rows
            nearest = self._index[family]
        elif len(self._families) > 1:
            asked = np.array(_family_point(family))
            nearest = int(np.argmin(np.abs(self._family_points - asked).sum(axis=1)))
        return self._curves[nearest](work, shape.get("b", 1))


_GEMM_OPS = ("project", "project_packed")


class _GemmCurves:
    """A GEMM op's time: one curve over m per measured (k, n) family. An unmeasured (k, n) takes the nearest
    measured family in log (k, n) scaled by the FLOPs ratio, never below the fastest measured GEMM (the kernel
    latency floor)."""

    def __init__(self, rows: list[dict]):
        m_and_s = defaultdict(list)
        for row in rows:
            m_and_s[row["shape"]["k"], row["shape"]["n"]].append((row["shape"]["m"], row["s"]))
        self._families = list(m_and_s)
        self._log_kn = np.log(np.array(self._families, dtype=float))
        self._curves = [_LogLogCurve(*zip(*m_and_s[family])) for family in self._families]
        self._floor_s = min(row["s"] for row in rows)
        self._time = per_instance_cache(self._time)

    def __call__(self, m: int, k: int, n: int) -> float:
        return self._time(m, k, n)

    def _time(self, m: int, k: int, n: int) -> float:
        if min(m, k, n) <= 0:
            return 0.0
        nearest = int(np.argmin(np.hypot(*(self._log_kn - np.log([k, n])).T)))
        family_k, family_n = self._families[nearest]
        return max(self._floor_s, self._curves[nearest](m) * (k * n) / (family_k * family_n))


class CostModel:
    """Op times (seconds) on one machine, from its HardwareProfile."""

    def __init__(self, profile: HardwareProfile):
        self.profile = profile
        for name in ("decode_attention_s", "gathered_decode_attention_s", "prefill_attention_s"):
            setattr(self, name, per_instance_cache(getattr(self, name)))
        gpu, link, cpu = profile.gpu, profile.link, profile.cpu
        self.launch_overhead_s: float = gpu.launch_overhead_s

        # Named ops: the profile's measured rows, and ops it does not time derived from its tables now (a derived row
        # written in the file is ignored, so a profile whose tables are edited or fitted prices its ops from them).
        self.op_rows: dict[str, list[dict]] = defaultdict(list)
        own = [row.model_dump() for row in gpu.ops if row.source == "measured"]
        for row in own + derived_op_rows(profile):
            self.op_rows[row["op"]].append(row)
        self._op_curves = {op: _OpCurve(op, rows) for op, rows in self.op_rows.items() if op not in _GEMM_OPS}
        self._op_host_s = {op: float(np.median([r["host_s"] for r in rows])) for op, rows in self.op_rows.items()}

        # GEMMs (the executor's `project`, weights streamed, and `project_packed`): per op one curve over m per
        # measured (k, n) family.
        self._gemms = {op: _GemmCurves(self.op_rows[op]) for op in _GEMM_OPS}
        # How much longer each op family runs inside real steps than its rows (gpu.in_step): a factor over work, per
        # policy context and pooled over all (context None).
        self._in_step: dict[tuple[str | None, str], dict[tuple, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
        for row in gpu.in_step:
            self._in_step[row.policy, row.op][tuple(sorted(row.family.items()))] = (np.log(row.work),
                                                                                   np.log(row.factor))
        self._in_step_points = {key: (list(curves), np.array([_family_point(f) for f in curves], dtype=float))
                                for key, curves in self._in_step.items()}

        # Decode attention: one curve over KV bytes per measured batch (rows are fp16, MHA: kv heads = H).
        bytes_and_s = defaultdict(list)
        for row in gpu.decode_attention_fp16:
            bytes_and_s[row.b].append((decode_kv_bytes(row.b, row.L, row.H, row.D, 2), row.s))
        batches = sorted(bytes_and_s)
        self._decode_log_batches = np.log(np.array(batches, dtype=float))
        # A large batch's shortest measured cache is already bandwidth-bound: below it, scale down to the fastest
        # decode attention measured at all (the kernel latency).
        decode_floor = min(row.s for row in gpu.decode_attention_fp16)
        self._decode_curves = [_LogLogCurve(*zip(*bytes_and_s[b]), floor_s=decode_floor) for b in batches]

        # Gathered decode attention (index the selected 20% of the cache, then attend): a curve over gathered bytes.
        gathered = defaultdict(list)
        for row in gpu.decode_attention_fp16:
            if row.gather20_s:
                gathered[row.b].append((decode_kv_bytes(row.b, round(0.2 * row.L), row.H, row.D, 2), row.gather20_s))
        self._gather_log_batches = np.log(np.array(sorted(gathered), dtype=float))
        gather_floor = min((row.gather20_s for row in gpu.decode_attention_fp16 if row.gather20_s), default=None)
        self._gather_curves = [_LogLogCurve(*zip(*gathered[b]), floor_s=gather_floor) for b in sorted(gathered)]

        prefill = gpu.prefill_attention_fp16
        self._prefill_curve = _LogLogCurve([causal_attention_flops(r.b, r.L, r.H, r.D) for r in prefill],
                                           [r.s for r in prefill])
        self._hbm_Bps = gpu.hbm_GBps * 1e9

        sizes = [row.bytes for row in link.copies]
        self._copy_curves = {(direction, pinned): _LogLogCurve(
            sizes, [getattr(row, f"{direction}_{'pinned' if pinned else 'pageable'}_s") for row in link.copies])
            for direction in COPY_DIRECTIONS for pinned in (True, False)}

        # CPU decode attention: bandwidth per batch, rows of one batch pooled (total bytes / total time).
        cpu_bytes, cpu_s = defaultdict(float), defaultdict(float)
        for row in cpu.decode_attention:
            cpu_bytes[row.b] += decode_kv_bytes(row.b, row.L, row.H, row.D, _DTYPE_BYTES[row.dtype])
            cpu_s[row.b] += row.s
        cpu_batches = sorted(cpu_bytes)
        self._cpu_attention_log_batches = np.log(np.array(cpu_batches, dtype=float))
        self._cpu_attention_log_Bps = np.log([cpu_bytes[b] / cpu_s[b] for b in cpu_batches])
        self._cpu_gemm_flops_per_s = {dtype: tflops * 1e12 for dtype, tflops in cpu.gemm_tflops.items()}
        self._cpu_copy_Bps = cpu.copy_GBps * 1e9

    # ---- host ---------------------------------------------------------------------------------------------------

    def host_s(self, kernels: int) -> float:
        """Host time to issue an op of `kernels` eager kernel launches (or copy calls)."""
        return kernels * self.launch_overhead_s

    def op_host_s(self, op: str) -> float:
        """The host's time issuing one named op's eager calls (the median of its rows; on a CPU device the op's
        rows hold all of its time in `s`, and this is 0 for measured rows)."""
        self._check_op(op)
        return self._op_host_s[op]

    # ---- named ops ----------------------------------------------------------------------------------------------

    @staticmethod
    def _check_op(op: str) -> None:
        if op not in NAMED_OPS:
            raise ValueError(f"unknown op {op!r} (the executor's named ops: {', '.join(NAMED_OPS)})")

    def op_s(self, op: str, context: str | None = None, **shape: int) -> float:
        """Device time of one named executor op at a shape (NAMED_OPS keys), interpolated over its work along the
        profile's rows for that op (`project` is gemm_s), times its in-step factor under the policy `context`."""
        self._check_op(op)
        if op in _GEMM_OPS:
            alone = self._gemms[op](shape["m"], shape["k"], shape["n"])
        else:
            alone = self._op_curves[op](shape)
        return alone * self.in_step_factor(op, shape, context) if self._in_step else alone

    def in_step_factor(self, op: str, shape: dict[str, int], context: str | None = None) -> float:
        """How much longer the op runs inside the executor's steps than its rows say: its family's factor at this
        shape's work under the policy `context` (a Policy's `in_step_key`), else over all policies, else (but for a
        GEMM) the nearest timed family's over all policies, as rows are looked up, at the same length and batch; 1
        where the profile timed no family of it in steps. A GEMM's factor is mostly where its weights sit (a small
        model's stay in cache from step to step, a large one's stream), so it holds for its own widths only."""
        if op_work(op, shape) <= 0:
            return 1.0
        family = op_family(op, shape)
        for key in ((context, op), (None, op)):
            if family in self._in_step.get(key, {}):
                return self._factor(self._in_step[key][family], op, shape)
        if op in _GEMM_OPS or (None, op) not in self._in_step:
            return 1.0
        families, points = self._in_step_points[None, op]
        keys = dict(families[int(np.argmin(np.abs(points - np.array(_family_point(family))).sum(axis=1)))])
        nearest = {**keys, **{key: value for key, value in shape.items() if key not in keys}}
        return self._factor(self._in_step[None, op][op_family(op, nearest)], op, nearest)

    @staticmethod
    def _factor(curve: tuple[np.ndarray, np.ndarray], op: str, shape: dict[str, int]) -> float:
        log_work, log_factor = curve
        return math.exp(float(np.interp(math.log(op_work(op, shape)), log_work, log_factor)))

    # ---- GPU ----------------------------------------------------------------------------------------------------

    def gemm_s(self, m: int, k: int, n: int) -> float:
        """(m x k) @ (k x n) in the device dtype, weights streamed (the executor's `project`)."""
        return self._gemms["project"](m, k, n)

    def decode_attention_s(self, batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int,
                           kv_dtype_bytes: float = 2) -> float:
        """One query token per sequence over `context` cached tokens. Memory-bound (a few FLOPs per byte, far below any
        GPU's ridge point), so the time follows the KV bytes read: GQA and INT8 enter there, num_heads does not.
        Interpolated in log batch between the measured batches' curves over bytes."""
        nbytes = decode_kv_bytes(batch, context, num_kv_heads, head_dim, kv_dtype_bytes)
        if nbytes <= 0:
            return 0.0
        # Outside the measured batches np.interp keeps the nearest batch's curve: the bytes already carry the scaling.
        log_times = [math.log(curve(nbytes)) for curve in self._decode_curves]
        return math.exp(float(np.interp(math.log(batch), self._decode_log_batches, log_times)))

    def gathered_decode_attention_s(self, batch: int, selected: int, num_heads: int, num_kv_heads: int, head_dim: int,
                                    kv_dtype_bytes: float = 2) -> float:
        """Explicit-gather sparse attention: gather `selected` tokens' K/V per sequence into a packed tensor, then
        attend densely (the profile's measured 20%-gathered SDPA rows, by gathered bytes). Without such rows, a
        dense attention over the selection plus an HBM pass to write the packed copy."""
        nbytes = decode_kv_bytes(batch, selected, num_kv_heads, head_dim, kv_dtype_bytes)
        if nbytes <= 0:
            return 0.0
        if not self._gather_curves:
            return self.decode_attention_s(batch, selected, num_heads, num_kv_heads, head_dim, kv_dtype_bytes) \
                + self.hbm_s(2 * nbytes)
        log_times = [math.log(curve(nbytes)) for curve in self._gather_curves]
        return math.exp(float(np.interp(math.log(batch), self._gather_log_batches, log_times)))

    def prefill_attention_s(self, batch: int, prompt_len: int, num_heads: int, head_dim: int) -> float:
        """Causal attention over the prompt, by FLOPs along the measured achieved-rate curve."""
        return self._prefill_curve(causal_attention_flops(batch, prompt_len, num_heads, head_dim))

    def hbm_s(self, nbytes: float) -> float:
        """A memory-bound GPU kernel moving nbytes (read + write) at the measured HBM copy bandwidth."""
        return nbytes / self._hbm_Bps

    # ---- CPU <-> GPU link ---------------------------------------------------------------------------------------

    def copy_s(self, nbytes: float, direction: str, pinned: bool = True) -> float:
        """One host<->device transfer; direction "h2d" or "d2h"."""
        if direction not in COPY_DIRECTIONS:
            raise ValueError(f"copy direction must be one of {COPY_DIRECTIONS}, got {direction!r}")
        return self._copy_curves[direction, pinned](nbytes)

    def h2d_bandwidth(self, nbytes: float, pinned: bool = True) -> float:
        """Effective host-to-device bytes per second for one transfer of nbytes."""
        return nbytes / self.copy_s(nbytes, "h2d", pinned)

    # ---- CPU ----------------------------------------------------------------------------------------------------

    def cpu_gemm_s(self, m: int, k: int, n: int, dtype: str = "float32") -> float:
        rate = self._cpu_gemm_flops_per_s.get(dtype)
        if rate is None:
            raise ValueError(f"no CPU GEMM rate for dtype {dtype!r} (profile has {sorted(self._cpu_gemm_flops_per_s)})")
        return 2 * m * k * n / rate

    def cpu_decode_attention_s(self, batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int,
                               kv_dtype_bytes: float = 4) -> float:
        """Decode attention on the CPU: KV bytes over the measured CPU attention bandwidth at this batch (interpolated
        in log batch, the end rows' bandwidth outside them). Memory-bound, so num_heads does not enter."""
        nbytes = decode_kv_bytes(batch, context, num_kv_heads, head_dim, kv_dtype_bytes)
        if nbytes <= 0:
            return 0.0
        log_Bps = np.interp(math.log(batch), self._cpu_attention_log_batches, self._cpu_attention_log_Bps)
        return nbytes / math.exp(float(log_Bps))

    def cpu_copy_s(self, nbytes: float) -> float:
        """A multi-threaded host memory copy moving nbytes (read + write, as copy_GBps counts them)."""
        return nbytes / self._cpu_copy_Bps

"""`alisa-exec profile`: measure this machine into a hardware profile (hw_profiles/NAME.yaml) that the simulator reads.

Every figure is the median of repeated runs (at least a few, and at least 20 ms of them) after a warm-up, timed with
CUDA events on the GPU and the host clock on the CPU. GEMMs run over the (k, n) shapes of the model presets' layers;
attention is torch's scaled_dot_product_attention (decode: one query over L cached tokens, also with 20% of the
tokens gathered first; prefill: causal over L).
With `--device cpu` the "gpu" section measures the CPU itself as the device (in float32, the executor's CPU dtype,
under the profile's *_fp16 table names) and the "link" section measures host-to-host copies; the provenance says so.
"""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.nn import functional as F

from alisa_exec import ops
from alisa_exec.device import cpu_name, default_dtype
from alisa_exec.kernels.selection import LocalAttentionSum, prefill_window_rows
from alisa_exec.key_copy import KeyCopy
from alisa_exec.kv_cache import Tiers, TokenRows, int8_group
from alisa_exec.model import Transformer, mkl_packable, pack_weight
from alisa_sim.calibrate import write_profile_yaml
from alisa_sim.errors import SpecError, validate
from alisa_sim.hardware import HardwareProfile
from alisa_sim.model_spec import PRESETS, ModelSpec, aligned_seq_len, load_model_spec
from alisa_sim.swa import SWA_CURRENT_DEFAULT, kv_budget, swa_recent

KiB, MiB, GiB = 2**10, 2**20, 2**30
GATHER_SHARE = 0.2  # the share of cached tokens the gathered decode-attention variant keeps
# Weights a streamed projection rotates over: more bytes than any last-level cache, as a decode step reads each
# layer's weights once (CPU L3 and GPU L2 are well under this).
STREAMED_WEIGHT_BYTES = 256 * MiB
# The largest fp32 attention-row tensor the profile materializes for `window_rows` (a GPU grid's 8k prompt at
# R = L would take 8.6 GB); larger shapes are priced from the measured ones by their FLOPs.
WINDOW_ROWS_BYTES = 1 << 30
# The block size of the pools vLLM's block store and in-place attention are timed on (the workload default, as
# vLLM's).
PAGED_BLOCK = 16
# At most this many distinct weights per projection shape: a tiny layer's weights (a 64 x 64 probe's 16 KiB) would
# otherwise make tens of thousands of copies, each packed for MKL again (measured: 10-23 GB of heap); so few bytes
# stay in the last-level cache anyway, as the tiny model's own do in a run.
MAX_STREAMED_WEIGHTS = 1024


@dataclass(frozen=True)
class Grid:
    """What to measure: shapes and sizes for one kind of run."""

    gemm_kn: tuple[tuple[int, int], ...]
    gemm_m: tuple[int, ...]
    heads: int
    head_dim: int
    decode_bL: tuple[tuple[int, int], ...]
    prefill_bL: tuple[tuple[int, int], ...]
    copy_bytes: tuple[int, ...]
    bidirectional_bytes: int
    device_copy_bytes: int
    peak_gemm_size: int
    host_copy_bytes: int
    host_gemm_size: int
    host_decode_bL: tuple[tuple[int, int], ...]
    reps: int


def preset_gemm_shapes() -> tuple[tuple[int, int], ...]:
    """Every distinct (k, n) of the presets' layer GEMMs and LM heads."""
    shapes = set()
    for name in PRESETS:
        spec = load_model_spec(name)
        shapes.update((g.k, g.n) for g in spec.layer_gemms(1) + [spec.lm_head_gemm(1)])
    return tuple(sorted(shapes))


def _decode_grid(batches, lengths, max_tokens):
    return tuple((b, L) for b in batches for L in lengths if b * L <= max_tokens)


# Copies from 1 KiB: the executor copies single token rows and index lists of a few KiB, which a table starting at
# 64 KiB priced at its latency floor (1.6-2.7x the measured copy time over the CPU validation loop).
GPU_FULL = Grid(gemm_kn=preset_gemm_shapes(), gemm_m=(1, 4, 16, 64, 256, 1024, 4096, 16384), heads=32, head_dim=128,
                decode_bL=_decode_grid((1, 8, 32, 64), (256, 1024, 4096, 16384), 2**19),
                prefill_bL=((1, 512), (8, 512), (1, 2048), (8, 2048), (1, 8192)),
                copy_bytes=tuple(KiB * 4**i for i in range(12)), bidirectional_bytes=256 * MiB,
                device_copy_bytes=GiB, peak_gemm_size=8192, host_copy_bytes=GiB, host_gemm_size=2048,
                host_decode_bL=((1, 1024), (8, 1024), (32, 1024), (8, 4096)), reps=10)
GPU_QUICK = Grid(gemm_kn=((4096, 4096), (4096, 12288), (4096, 16384), (16384, 4096), (4096, 50272)),
                 gemm_m=(1, 16, 256, 4096), heads=32, head_dim=128, decode_bL=_decode_grid((1, 32), (256, 4096), 2**17),
                 prefill_bL=((1, 512), (8, 512)), copy_bytes=tuple(KiB * 4**i for i in range(9)),
                 bidirectional_bytes=64 * MiB, device_copy_bytes=256 * MiB, peak_gemm_size=4096,
                 host_copy_bytes=256 * MiB, host_gemm_size=1024, host_decode_bL=((1, 1024), (8, 1024)), reps=5)
CPU_FULL = Grid(gemm_kn=preset_gemm_shapes(), gemm_m=(1, 16, 64, 256), heads=32, head_dim=128,
                decode_bL=_decode_grid((1, 8, 32), (256, 1024, 4096), 2**15),
                prefill_bL=((1, 128), (1, 512), (4, 512), (1, 2048)),
                copy_bytes=tuple(KiB * 4**i for i in range(10)),
                bidirectional_bytes=64 * MiB, device_copy_bytes=256 * MiB, peak_gemm_size=2048,
                host_copy_bytes=256 * MiB, host_gemm_size=2048, host_decode_bL=((1, 1024), (8, 1024), (8, 4096)),
                reps=5)
CPU_QUICK = Grid(gemm_kn=((256, 256), (256, 1024), (1024, 256), (1024, 1024)), gemm_m=(1, 4, 16, 64, 256, 1024, 2048),
                 heads=8, head_dim=64, decode_bL=_decode_grid((1, 4, 16, 32), (32, 128, 512), 2**14),
                 prefill_bL=((1, 64), (2, 256), (1, 512), (8, 64), (32, 64)),
                 copy_bytes=(KiB, 4 * KiB, 16 * KiB, 64 * KiB, MiB, 16 * MiB), bidirectional_bytes=16 * MiB,
                 device_copy_bytes=64 * MiB, peak_gemm_size=1024, host_copy_bytes=64 * MiB, host_gemm_size=1024,
                 host_decode_bL=((1, 512), (4, 512)),
                 reps=5)


class Bench:
    """Median device time of a callable on one device, over at least `reps` runs and at least `min_time_s` of them."""

    def __init__(self, device: torch.device, reps: int, min_time_s: float = 0.02, max_reps: int = 1000):
        self.device, self.reps, self.min_time_s, self.max_reps = device, reps, min_time_s, max_reps
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _once(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    def time_s(self, fn: Callable[[], object]) -> float:
        fn()
        self.sync()
        times: list[float] = []
        while len(times) < self.reps or (sum(times) < self.min_time_s and len(times) < self.max_reps):
            times.append(self._once(fn))
        return statistics.median(times)

    def host_s(self, fn: Callable[[], object]) -> float:
        """The host's time issuing fn's eager calls, without waiting for the device (CUDA); on a CPU device the
        issue is the op's own time, already in `time_s`, so 0."""
        if not self.cuda:
            return 0.0
        times = []
        for _ in range(self.reps):
            self.sync()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        self.sync()
        return statistics.median(times)


def _rand(*shape: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=device, dtype=dtype)


def distinct_views(pool: torch.Tensor, numel: int) -> list[torch.Tensor]:
    """Non-overlapping `numel`-element views into a flat `pool` (at most MAX_STREAMED_WEIGHTS; one fresh tensor if
    none fits): an op that takes them in turn reads memory it has not touched since its last turn, as the executor's
    ops read weights and caches last touched a layer or a step ago, not the cache-hot buffer of a tight loop."""
    count = min(MAX_STREAMED_WEIGHTS, pool.numel() // numel)
    if count == 0:
        return [torch.empty(numel, dtype=pool.dtype, device=pool.device, pin_memory=pool.is_pinned()).fill_(1)]
    return [pool[i * numel:(i + 1) * numel] for i in range(count)]


def in_turn(views: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """A callable giving the next of `views` at each call, round and round."""
    turn = iter(range(1 << 62))
    return lambda: views[next(turn) % len(views)]


def streamed_pool(device: torch.device, pinned: bool = False) -> torch.Tensor:
    """STREAMED_WEIGHT_BYTES of bytes on `device` (pinned host memory with `pinned`) for `distinct_views`, written
    once so that every page is mapped before anything is timed."""
    return torch.empty(STREAMED_WEIGHT_BYTES, dtype=torch.uint8, device=device, pin_memory=pinned).fill_(1)


def measure_gemms(bench: Bench, grid: Grid, dtype: torch.dtype) -> list[dict]:
    rows = []
    for k, n in grid.gemm_kn:
        b = _rand(k, n, device=bench.device, dtype=dtype)
        for m in grid.gemm_m:
            a = _rand(m, k, device=bench.device, dtype=dtype)
            rows.append({"m": m, "k": k, "n": n, "s": bench.time_s(lambda: torch.matmul(a, b))})
    return rows


def peak_tflops(bench: Bench, size: int, dtype: torch.dtype) -> float:
    a, b = (_rand(size, size, device=bench.device, dtype=dtype) for _ in range(2))
    return 2 * size**3 / bench.time_s(lambda: torch.matmul(a, b)) / 1e12


def measure_decode_attention(bench: Bench, shapes: tuple[tuple[int, int], ...], H: int, D: int, dtype: torch.dtype,
                             gathered: bool) -> list[dict]:
    """One query per sequence over L cached tokens for each (b, L); `gathered` adds `gather20_s`, the same after
    gathering 20% of the tokens by index."""
    rows = []
    for b, L in shapes:
        q = _rand(b, H, 1, D, device=bench.device, dtype=dtype)
        k, v = (_rand(b, H, L, D, device=bench.device, dtype=dtype) for _ in range(2))
        row = {"b": b, "L": L, "H": H, "D": D, "s": bench.time_s(lambda: F.scaled_dot_product_attention(q, k, v))}
        if gathered:
            keep = torch.randperm(L, device=bench.device)[:max(1, round(L * GATHER_SHARE))].sort().values

            def gather_and_attend():
                return F.scaled_dot_product_attention(q, k.index_select(2, keep), v.index_select(2, keep))

            row["gather20_s"] = bench.time_s(gather_and_attend)
        rows.append(row)
    return rows


def measure_prefill_attention(bench: Bench, grid: Grid, dtype: torch.dtype) -> list[dict]:
    rows = []
    for b, L in grid.prefill_bL:
        q, k, v = (_rand(b, grid.heads, L, grid.head_dim, device=bench.device, dtype=dtype) for _ in range(3))
        seconds = bench.time_s(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        rows.append({"b": b, "L": L, "H": grid.heads, "D": grid.head_dim, "s": seconds})
    return rows


def copy_GBps(bench: Bench, nbytes: int) -> float:
    """Tensor copy on the bench's device, bytes read + written per second / 1e9."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=bench.device).fill_(1)
    dst = torch.empty_like(src)
    return 2 * nbytes / bench.time_s(lambda: dst.copy_(src)) / 1e9


def launch_overhead_s(device: torch.device, launches: int = 2000) -> float:
    """Host time to issue one tiny eager op (on the CPU it includes running it, which is the point there too)."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(launches):
        x.add_(1)
    elapsed = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
    return elapsed / launches


def measure_cuda_link(bench: Bench, grid: Grid) -> tuple[list[dict], float]:
    """H2D and D2H by size, pinned and pageable; and the per-direction share left with both directions at once."""
    rows = []
    for nbytes in grid.copy_bytes:
        dev = torch.empty(nbytes, dtype=torch.uint8, device=bench.device)
        pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        pageable = torch.empty(nbytes, dtype=torch.uint8)
        rows.append({
            "bytes": nbytes,
            "h2d_pinned_s": bench.time_s(lambda: dev.copy_(pinned, non_blocking=True)),
            "d2h_pinned_s": bench.time_s(lambda: pinned.copy_(dev, non_blocking=True)),
            "h2d_pageable_s": bench.time_s(lambda: dev.copy_(pageable)),
            "d2h_pageable_s": bench.time_s(lambda: pageable.copy_(dev)),
        })
    size = grid.bidirectional_bytes
    host_in, host_out = (torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(2))
    dev_in, dev_out = (torch.empty(size, dtype=torch.uint8, device=bench.device) for _ in range(2))
    streams = torch.cuda.Stream(), torch.cuda.Stream()

    def both_directions():
        main = torch.cuda.current_stream()
        for stream in streams:
            stream.wait_stream(main)
        with torch.cuda.stream(streams[0]):
            dev_in.copy_(host_in, non_blocking=True)
        with torch.cuda.stream(streams[1]):
            host_out.copy_(dev_out, non_blocking=True)
        for stream in streams:
            main.wait_stream(stream)

    one_way_s = (bench.time_s(lambda: dev_in.copy_(host_in, non_blocking=True))
                 + bench.time_s(lambda: host_out.copy_(dev_out, non_blocking=True))) / 2
    return rows, min(1.0, one_way_s / bench.time_s(both_directions))


def measure_host_copies(bench: Bench, grid: Grid) -> tuple[list[dict], float]:
    """The CPU device's stand-in for a link: host-to-host copies by size (pinned = pageable), each between buffers
    taken in turn from pools beyond the caches (`distinct_views`), and the per-copy share left with two copies
    running at once on two threads."""
    rows = []
    sources, destinations = streamed_pool(torch.device("cpu")), streamed_pool(torch.device("cpu"))
    for nbytes in grid.copy_bytes:
        a, b = in_turn(distinct_views(sources, nbytes)), in_turn(distinct_views(destinations, nbytes))
        forward, backward = bench.time_s(lambda: b().copy_(a())), bench.time_s(lambda: a().copy_(b()))
        rows.append({"bytes": nbytes, "h2d_pinned_s": forward, "d2h_pinned_s": backward,
                     "h2d_pageable_s": forward, "d2h_pageable_s": backward})
    size = grid.bidirectional_bytes
    pairs = [(torch.ones(size, dtype=torch.uint8), torch.empty(size, dtype=torch.uint8)) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        def both():
            for future in [pool.submit(dst.copy_, src) for src, dst in pairs]:
                future.result()

        one_way_s = bench.time_s(lambda: pairs[0][1].copy_(pairs[0][0]))
        return rows, min(1.0, one_way_s / bench.time_s(both))


def measure_host(grid: Grid) -> dict:
    """The CPU section: memory, copy bandwidth on one thread and on all, GEMM rates, fp32 decode attention."""
    bench = Bench(torch.device("cpu"), grid.reps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        memcpy = copy_GBps(bench, grid.host_copy_bytes)
    finally:
        torch.set_num_threads(threads)
    rows = measure_decode_attention(bench, grid.host_decode_bL, grid.heads, grid.head_dim, torch.float32,
                                    gathered=False)
    return {
        "name": f"{cpu_name()} ({os.cpu_count()} logical CPUs)",
        "cores": os.cpu_count(),
        "memory_bytes": host_memory_bytes(),
        "memcpy_GBps": memcpy,
        "copy_GBps": copy_GBps(bench, grid.host_copy_bytes),
        "gemm_tflops": {name: peak_tflops(bench, grid.host_gemm_size, dtype)
                        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))},
        "decode_attention": [{**row, "dtype": "float32"} for row in rows],
    }


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def driver_version() -> str:
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False).stdout.strip()
        if out:
            return out.splitlines()[0]
    return "unknown (no nvidia-smi)"


def software_versions(device: torch.device) -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {"torch": str(torch.__version__), "triton": str(triton_version),
            "driver": driver_version() if device.type == "cuda" else "none (CPU device)",
            "python": platform.python_version()}


def profile_spec(grid: Grid) -> ModelSpec:
    """The LLaMA-style layer (GQA 2:1, SwiGLU, RoPE) whose ops the named-op rows time at the grid's head shape."""
    hidden = grid.heads * grid.head_dim
    return ModelSpec(name="profile-llama", family="llama", hidden_size=hidden, num_layers=1, num_heads=grid.heads,
                     num_kv_heads=max(1, grid.heads // 2), ffn_dim=2 * hidden, vocab_size=4 * hidden,
                     max_position_embeddings=max(L for _, L in grid.decode_bL + grid.prefill_bL),
                     tie_word_embeddings=False, norm_eps=1e-5)


def measure_named_ops(bench: Bench, grid: Grid, dtype: torch.dtype, models: tuple[ModelSpec, ...] = ()) -> list[dict]:
    """The executor's own named ops (alisa_sim.hardware.NAMED_OPS), called as the executor calls them at the grid's
    shapes: projections over weights streamed from more than a cache's worth of distinct buffers (also packed for
    MKL on a CPU device), every attention path, the elementwise ops, KV stores, INT8 store/decode, SWA selection,
    tier copies and host gathers; for the grid's own LLaMA-style layer and for every model in `models` (at its head
    layout and widths, its GEMMs and LM head)."""
    rows_out: list[dict] = []

    def add(op: str, shape: dict[str, int], fn: Callable[[], object]) -> None:
        rows_out.append({"op": op, "shape": shape, "s": bench.time_s(fn), "host_s": bench.host_s(fn),
                         "source": "measured"})

    families = set(grid.gemm_kn)
    for spec in models:
        families.update((g.k, g.n) for g in spec.layer_gemms(1) + [spec.lm_head_gemm(1)])
    _measure_projections(bench, grid, dtype, sorted(families), add)
    for spec in (profile_spec(grid), *models):
        _measure_layer_ops(bench, grid, dtype, spec, add)
    _measure_copies(bench, grid, add)
    _measure_stage_indices(grid, add)
    return rows_out


def _measure_projections(bench: Bench, grid: Grid, dtype: torch.dtype, families: list[tuple[int, int]],
                         add: Callable) -> None:
    """`project` (and `project_packed` where the executor packs weights) per (k, n) family and m of the grid."""
    device, e = bench.device, torch.empty((), dtype=dtype).element_size()
    pool = _rand(STREAMED_WEIGHT_BYTES // e, device=device, dtype=dtype)  # distinct weights, views into one pool
    packable = mkl_packable(device, dtype)
    for k, n in families:
        buffers = [view.view(n, k) for view in distinct_views(pool, k * n)]
        linear = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        for m in grid.gemm_m:
            x, weight = _rand(1, m, k, device=device, dtype=dtype), in_turn(buffers)
            add("project", {"m": m, "k": k, "n": n, "e": e}, lambda: ops.project(linear, x, weight()))
            if packable and m <= max(b for b, _ in grid.decode_bL):  # packed at a decode batch's rows
                layers = [torch.nn.Module() for _ in buffers]
                for layer, weight in zip(layers, buffers):
                    layer.weight, layer.bias = weight, None
                    pack_weight(layer, "packed_weight", weight, m)
                packed = in_turn(layers)
                add("project_packed", {"m": m, "k": k, "n": n, "e": e}, lambda: ops.project(packed(), x))
                del layers, packed  # the packed copies go before the next m packs its own


def _paged_pool(b: int, L: int, width: int, device: torch.device, dtype: torch.dtype) -> tuple[TokenRows, torch.Tensor]:
    """A vLLM pool of token rows with L slots for each of b sequences, in blocks of PAGED_BLOCK slots handed out in
    shuffled order (as a pool's free list is after preemptions), and each sequence's slots [b, L]."""
    blocks = -(-L // PAGED_BLOCK)
    order = torch.randperm(b * blocks, device=device).view(b, blocks, 1)
    slots = (order * PAGED_BLOCK + torch.arange(PAGED_BLOCK, device=device)).flatten(1)[:, :L]
    pool = TokenRows(Tiers(device), "gpu", "kv", b * blocks * PAGED_BLOCK, 1, width, dtype)
    pool.store(slice(None), _rand(b * blocks * PAGED_BLOCK, 1, width, device=device, dtype=dtype))
    return pool, slots.contiguous()


def _measure_layer_ops(bench: Bench, grid: Grid, dtype: torch.dtype, spec: ModelSpec, add: Callable) -> None:
    """Every op of one layer of `spec` but its projections, at the grid's rows, prompts and caches."""
    device, e = bench.device, torch.empty((), dtype=dtype).element_size()
    spec = spec.model_copy(update={"num_layers": 1, "max_position_embeddings": max(
        spec.max_position_embeddings, *(L for _, L in grid.decode_bL + grid.prefill_bL))})
    model = Transformer(spec).to(device=device, dtype=dtype)
    model.setup_tables(spec.max_position_embeddings)
    layer, kv, d = model.layers[0], spec.num_kv_heads, spec.dim_per_head
    hidden, width = spec.hidden_size, spec.q_dim + 2 * spec.kv_dim
    for rows in sorted({m for m in grid.gemm_m}):
        x = _rand(1, rows, hidden, device=device, dtype=dtype)
        up = _rand(1, rows, (1 + int(spec.gated_mlp)) * spec.ffn_dim, device=device, dtype=dtype)
        qkv = _rand(1, rows, width, device=device, dtype=dtype)
        rope = ops.rope(model, torch.arange(rows, device=device) % spec.max_position_embeddings)
        tokens = torch.randint(spec.vocab_size, (1, rows), device=device)
        positions = torch.arange(rows, device=device) % spec.max_position_embeddings
        logits = _rand(rows, 1, spec.vocab_size, device=device, dtype=torch.float32)
        add("norm", {"rows": rows, "width": hidden, "rms": int(spec.rms_norm), "e": e},
            lambda: ops.norm(layer.attention_norm, x))
        add("activate", {"rows": rows, "width": spec.ffn_dim, "gated": int(spec.gated_mlp), "e": e},
            lambda: ops.activate(layer.feed_forward, up))
        add("split_heads", {"rows": rows, "width": width, "e": e}, lambda: ops.split_heads(layer.attention, qkv, rope))
        add("residual", {"rows": rows, "width": hidden, "e": e}, lambda: x + x)
        add("embed", {"rows": rows, "width": hidden, "e": e}, lambda: ops.embed(model, tokens, positions))
        add("argmax", {"rows": rows, "width": spec.vocab_size}, lambda: ops.argmax(logits))
        tiers = Tiers(device)
        store = TokenRows(tiers, "gpu", "kv", rows, 1, width, dtype, int8=True)
        values = _rand(rows, 1, width, device=device, dtype=dtype)
        add("kv_quantize", {"rows": rows, "width": width, "e": e}, lambda: store.store(slice(None), values))
        add("kv_dequantize", {"rows": rows, "width": width, "e": e}, lambda: store.read(slice(None)))
    for b, L in grid.prefill_bL:
        q = _rand(b, L, spec.num_heads, d, device=device, dtype=dtype)
        k_, v_ = (_rand(b, L, kv, d, device=device, dtype=dtype) for _ in range(2))
        add("causal_attention", {"b": b, "L": L, "h": spec.num_heads, "d": d}, lambda: ops.causal_attention(q, k_, v_))
        q_heads, k_heads = q.transpose(1, 2), k_.transpose(1, 2)
        for rows in sorted({L, max(1, L // 8)}):  # all of them (H2O), or a window's worth (ALISA's seed)
            if b * kv * rows * L * 4 > WINDOW_ROWS_BYTES:
                continue
            add("window_rows", {"b": b, "R": rows, "L": L, "h": spec.num_heads, "kv": kv, "d": d},
                lambda: prefill_window_rows(q_heads, k_heads, rows))
        cache = [_rand(b, kv, aligned_seq_len(L + 1), d, device=device, dtype=dtype) for _ in range(2)]
        for tokens, where in ((L, slice(0, L)), (1, torch.tensor([L], device=device))):
            new_k, new_v = k_[:, :tokens], v_[:, :tokens]
            add("kv_store", {"b": b, "T": tokens, "width": 2 * kv * d, "e": e},
                lambda: ops.kv_store(*cache, where, new_k, new_v))
        _measure_keep_prompt(k_.transpose(1, 2), v_.transpose(1, 2), q_heads, add)
        prompt_copy = KeyCopy(Tiers(device), "gpu", L, b, kv, d, dtype)
        add("key_copy_store", {"rows": b * L, "kv": kv, "d": d, "e": e}, lambda: ops.key_copy_store(prompt_copy, 0, k_))
        pool, slots = _paged_pool(b, L, 2 * kv * d, device, dtype)
        rows = _rand(L, b, 2 * kv * d, device=device, dtype=dtype)
        add("block_store", {"b": b, "T": L, "width": 2 * kv * d, "e": e},
            lambda: ops.block_store(pool.data[:, 0], slots, rows))
    for b, L in grid.decode_bL:
        q = _rand(b, 1, spec.num_heads, d, device=device, dtype=dtype)
        keys, values_ = (_rand(b, kv, L, d, device=device, dtype=dtype) for _ in range(2))
        mask = torch.zeros(1, L, device=device, dtype=dtype)
        lengths = torch.full((b,), L, device=device, dtype=torch.int32)
        shape = {"b": b, "T": L, "h": spec.num_heads, "kv": kv, "d": d, "e": e}
        add("masked_attention", shape, lambda: ops.masked_attention(q, keys, values_, mask))
        add("rows_attention", shape, lambda: ops.rows_attention(q, keys, values_))
        add("packed_attention", shape, lambda: ops.packed_attention(q[:, 0], keys, values_))
        _measure_slot_ops(b, L, keys, values_, add, store=L == min(T for b_, T in grid.decode_bL if b_ == b))
        _measure_key_copy_ops(q[:, 0], keys, add, store=L == min(T for b_, T in grid.decode_bL if b_ == b),
                              triton=bench.cuda)
        _measure_head_gather(b, L, kv, d, dtype, add)
        # As vLLM's decode calls it: each sequence's new row stored at its slot, then its slots of the shared pool
        # attended in place.
        pool, slots = _paged_pool(b, L, 2 * kv * d, device, dtype)
        paged_views = [view.expand(b, -1, -1, -1) for view in pool.kv_views(kv)]
        newest, new_rows = slots[:, -1:], _rand(1, b, 2 * kv * d, device=device, dtype=dtype)
        add("block_store", {"b": b, "T": 1, "width": 2 * kv * d, "e": e},
            lambda: ops.block_store(pool.data[:, 0], newest, new_rows))
        add("paged_attention", shape, lambda: ops.paged_attention(q[:, 0], *paged_views, slots, lengths, bench.cuda))
        selected = max(1, round(L * GATHER_SHARE))
        # As ALISA's executor calls it: one index list per sequence into a window ring of token rows, read in place
        # in the model's dtype or as INT8 levels with their scales and zero points (the PyTorch form off the GPU
        # dequantizes what it gathers, so INT8 is not a quarter of the fp32 time there).
        indices = torch.randperm(L, device=device)[:selected].sort().values.to(torch.int32).expand(b, -1).contiguous()
        # With staged rows (fetched or recomputed this step, in a staging buffer shared by the sequences): every
        # other entry of the index list names one, as a negative entry.
        staged_indices = indices.clone()
        staged_count = staged_indices[:, ::2].numel()
        staged_indices[:, ::2] = -1 - torch.arange(staged_count, device=device, dtype=torch.int32).view(b, -1)
        for int8 in (False, True):
            ring = TokenRows(Tiers(device), "gpu", "kv", L, b, 2 * kv * d, dtype, int8, int8_group(d))
            ring.store(slice(None), _rand(L, b, 2 * kv * d, device=device, dtype=dtype))
            views = ring.kv_views(kv)
            add("sparse_attention", {**shape, "T": selected, "e": 1 if int8 else e},
                lambda: ops.sparse_attention(q[:, 0], *views, indices, None, bench.cuda))
            stage = ring.staging(Tiers(device), "gpu", "kv_stage", staged_count)
            stage.store(slice(None), _rand(staged_count, 1, 2 * kv * d, device=device, dtype=dtype))
            staged_views = stage.kv_views(kv)
            add("staged_sparse_attention", {**shape, "T": selected, "e": 1 if int8 else e},
                lambda: ops.sparse_attention(q[:, 0], *views, staged_indices, staged_views, bench.cuda))
        scores = LocalAttentionSum(b, L, GATHER_SHARE, device)
        positions = torch.arange(scores.width, device=device, dtype=torch.int32).expand(b, -1)
        probs = torch.rand(b, scores.width, device=device)

        def push_and_select():
            scores.push(positions, probs)
            return scores.select(L)
        add("local_sum", {"b": b, "T": L}, lambda: scores.push(positions, probs) or scores.reset())
        add("topk", {"b": b, "L": L}, push_and_select)
    cpu = torch.device("cpu")
    for b, L in grid.host_decode_bL + (grid.decode_bL if device.type == "cpu" else ()):
        q = _rand(b, 1, spec.num_heads, d, device=cpu, dtype=dtype)
        keys, values_ = (_rand(b, kv, L, d, device=cpu, dtype=dtype) for _ in range(2))
        add("cpu_attention", {"b": b, "T": L, "h": spec.num_heads, "kv": kv, "d": d, "e": e},
            lambda: ops.cpu_attention(q, keys, values_))


def _measure_keep_prompt(keys: torch.Tensor, values: torch.Tensor, q_heads: torch.Tensor, add: Callable) -> None:
    """H2O's and StreamingLLM's prefill choice (`keep_prompt`) over a prompt's K/V [b, kv_heads, L, d], keeping half
    of it (H2O from the prompt's attention rows, where they fit in WINDOW_ROWS_BYTES, as `window_rows`)."""
    b, kv, L, d = keys.shape
    e = keys.element_size()
    slots = tuple(torch.empty_like(keys) for _ in range(2)) + (
        torch.empty(b, kv, L, dtype=torch.int64, device=keys.device),)
    shape = {"b": b, "kv": kv, "L": L, "d": d, "e": e}
    add("keep_prompt", {**shape, "scored": 0}, lambda: ops.keep_prompt(keys, values, slots, None, None, L // 2, 4))
    if b * kv * L * L * 4 <= WINDOW_ROWS_BYTES:
        rows = prefill_window_rows(q_heads, keys, L, per_head=True)
        scores = torch.empty(b, kv, L, dtype=torch.float32, device=keys.device)
        add("keep_prompt", {**shape, "scored": 1},
            lambda: ops.keep_prompt(keys, values, slots, scores, rows, L // 2, 0))


def _measure_key_copy_ops(q: torch.Tensor, keys: torch.Tensor, add: Callable, store: bool, triton: bool) -> None:
    """k4-capped's decode-step ops over L cached keys [b, kv_heads, L, d] (q [b, heads, d]): the query over the 4-bit
    copy, the capped choice at 1 - GATHER_SHARE sparsity (and, with `store`: its shape has no L, the new key into the copy)."""
    b, kv, L, d = keys.shape
    e, heads = keys.element_size(), q.shape[1]
    copy = KeyCopy(Tiers(keys.device), "gpu", L, b, kv, d, keys.dtype)
    copy.store(0, keys)
    add("key_copy_attention", {"b": b, "L": L, "h": heads, "kv": kv, "d": d, "e": e},
        lambda: ops.key_copy_attention(q, copy, L))
    probs = ops.key_copy_attention(q, copy, L)
    sparsity = 1 - GATHER_SHARE
    recent, budget = swa_recent(L, sparsity, SWA_CURRENT_DEFAULT), kv_budget(L, sparsity, SWA_CURRENT_DEFAULT)
    # SWA's set: `budget - recent` older positions spread over the history, then the recent window
    older = torch.linspace(0, L - recent - 1, budget - recent, device=keys.device).long()
    swa_selected = torch.cat((older, torch.arange(L - recent, L, device=keys.device))).expand(b, -1).contiguous()
    add("capped_pick", {"b": b, "kv": kv, "L": L, "m": budget - recent},
        lambda: ops.capped_pick(probs, swa_selected, recent, triton))
    if store:
        new_key = keys[:, :, -1:].transpose(1, 2)
        add("key_copy_store", {"rows": b, "kv": kv, "d": d, "e": e}, lambda: ops.key_copy_store(copy, L - 1, new_key))


def _measure_head_gather(b: int, L: int, kv: int, d: int, dtype: torch.dtype, add: Callable) -> None:
    """k4-capped's host gather of one-KV-head rows (a fifth of each sequence and head's L tokens) from a CPU pool of
    K/V rows, in the model's dtype and INT8, as its prefetch gathers them (`TokenRows.head_rows`)."""
    cpu = torch.device("cpu")
    picks = b * kv * max(1, round(L * GATHER_SHARE))
    index, heads = torch.randint(L * b, (picks,)), torch.randint(kv, (picks,))
    for int8 in (False, True):
        pool = TokenRows(Tiers(cpu), "cpu", "kv", L, b, 2 * kv * d, dtype, int8, int8_group(d))
        stage = pool.head_staging(Tiers(cpu), "cpu", "kv_staging", picks, kv).first(picks)
        add("head_gather", {"rows": picks, "row_bytes": pool.row_bytes // kv},
            lambda: pool.head_rows(index, heads, kv, stage))


def _measure_slot_ops(b: int, T: int, keys: torch.Tensor, values: torch.Tensor, add: Callable,
                      store: bool) -> None:
    """H2O's and StreamingLLM's decode-step ops over T slots in use of K/V slot buffers [b, kv_heads, T, d]: the
    victim's search, H2O's score update and (with `store`: its shape has no T) the new token's store at a slot."""
    device, (_, kv, _, d) = keys.device, keys.shape
    positions = torch.randperm(T, device=device).expand(b, kv, T).contiguous()
    scores = torch.rand(b, kv, T, device=device)
    probs = torch.rand(b, kv, T, device=device)
    new_k, new_v = (_rand(b, 1, kv, d, device=device, dtype=keys.dtype) for _ in range(2))
    slot_buffers = (keys, values, positions)
    for scored in (0, 1):
        held = scores if scored else None
        add("evict_victim", {"b": b, "kv": kv, "T": T, "scored": scored},
            lambda: ops.evict_victim(positions, held, T - T // 2, 4))
        victims = ops.evict_victim(positions, held, T - T // 2, 4)
        if store:
            add("slot_store", {"b": b, "kv": kv, "d": d, "e": keys.element_size(), "scored": scored},
                lambda: ops.slot_store(slot_buffers, held, victims, new_k, new_v, T))
    add("score_update", {"b": b, "kv": kv, "T": T}, lambda: ops.score_update(scores, probs))


def _measure_copies(bench: Bench, grid: Grid, add: Callable) -> None:
    """Tier copies by size and direction, pinned and pageable, and host gathers of a fifth of a pool's rows, each
    over buffers taken in turn from pools beyond the caches (`distinct_views`)."""
    device = bench.device
    pools = {"pinned": streamed_pool(torch.device("cpu"), pinned=bench.cuda),
             "pageable": streamed_pool(torch.device("cpu"))}
    dev_pool = streamed_pool(device)
    for nbytes in grid.copy_bytes:
        dev = in_turn(distinct_views(dev_pool, nbytes))
        for memory, pool in pools.items():
            host = in_turn(distinct_views(pool, nbytes))
            add(f"copy_h2d_{memory}", {"bytes": nbytes}, lambda: dev().copy_(host(), non_blocking=bench.cuda))
            add(f"copy_d2h_{memory}", {"bytes": nbytes}, lambda: host().copy_(dev(), non_blocking=bench.cuda))
        rows_host = in_turn([view.view(-1, 256) for view in distinct_views(pools["pageable"], nbytes)])
        picked = torch.randperm(nbytes // 256)[:max(1, nbytes // 256 // 5)]
        add("host_gather", {"bytes": picked.numel() * 256}, lambda: torch.index_select(rows_host(), 0, picked))


def _measure_stage_indices(grid: Grid, add: Callable) -> None:
    """ALISA's host-side split of a step's selection at the grid's decode batches: every cached token attended, or
    a gathered share of them, a quarter of the positions deleted and a quarter live on the CPU (on host tensors,
    as the executor's prefetch holds its selection there)."""
    for b, L in grid.decode_bL:
        for T in sorted({L, max(1, round(L * GATHER_SHARE))}):
            selected = torch.randperm(L)[:T].sort().values.to(torch.int32).expand(b, -1).contiguous()
            out = torch.empty(3 * b * T, dtype=torch.int64)
            add("stage_indices", {"b": b, "T": T}, lambda: ops.stage_indices(selected, L // 4, L // 2, out))


# The executor's own host time beyond its named ops is measured on a model whose ops cost next to nothing, under
# each policy at a few depths and batches (alisa_exec.overhead); two KV heads, so FlexGen can keep one on the CPU.
OVERHEAD_SPEC = ModelSpec(name="overhead-probe", family="llama", hidden_size=64, num_layers=1, num_heads=2,
                          num_kv_heads=2, ffn_dim=128, vocab_size=64, max_position_embeddings=64,
                          tie_word_embeddings=False, norm_eps=1e-5)


def measure_profile(name: str, device: torch.device, quick: bool,
                    progress: Callable[[str], None] = lambda _: None, models: tuple[ModelSpec, ...] = ()) -> dict:
    """Measure the machine into a profile mapping (validated against the HardwareProfile schema); the named ops
    also at the head layouts, widths and GEMMs of `models`."""
    cuda = device.type == "cuda"
    grid = (GPU_QUICK if quick else GPU_FULL) if cuda else (CPU_QUICK if quick else CPU_FULL)
    dtype = default_dtype(device)
    bench = Bench(device, grid.reps)
    mode = "quick" if quick else "full"
    torch.manual_seed(0)

    progress("GEMMs")
    gemms = measure_gemms(bench, grid, dtype)
    progress("attention")
    decode = measure_decode_attention(bench, grid.decode_bL, grid.heads, grid.head_dim, dtype, gathered=True)
    prefill = measure_prefill_attention(bench, grid, dtype)
    progress("the executor's named ops")
    named = measure_named_ops(bench, grid, dtype, (*models, OVERHEAD_SPEC))
    progress("copies")
    copies, bidirectional = measure_cuda_link(bench, grid) if cuda else measure_host_copies(bench, grid)
    progress("host CPU")
    host = measure_host(grid)
    device_name = torch.cuda.get_device_name(device) if cuda else f"{cpu_name()} (the CPU as the device)"
    machine = f"{platform.node()}: {device_name if cuda else cpu_name()}, {os.cpu_count()} logical CPUs, " \
              f"{host_memory_bytes() / GiB:.0f} GiB host memory"
    timing = "CUDA events" if cuda else "the host clock"
    method = (f"alisa-exec profile ({mode}) on {device.type}: median of at least {grid.reps} runs (and at least "
              f"{bench.min_time_s} s of them) after a warm-up, timed with {timing}; GEMM torch.matmul, attention torch "
              f"scaled_dot_product_attention (H={grid.heads}, "
              f"D={grid.head_dim}, {str(dtype).removeprefix('torch.')}); CPU section with torch on "
              f"{torch.get_num_threads()} threads")
    if cuda:
        gpu_note = (f"{device_name}: memory from torch, hbm_GBps from a {grid.device_copy_bytes} byte device-to-device "
                    f"copy (read + write), peak_fp16_tflops from a {grid.peak_gemm_size}^3 fp16 GEMM, "
                    "launch_overhead_s = host time per tiny eager op")
        link_note = ("H2D/D2H by size, pinned and pageable host memory; bidirectional_factor = one-way pinned time / "
                     f"time with both directions at once ({grid.bidirectional_bytes} bytes each way)")
        link_name = "CPU-GPU link"
        notes = []
    else:
        gpu_note = ("the CPU measured as the device, in float32 (the executor's CPU dtype) under the *_fp16 table "
                    f"names: memory = host memory, hbm_GBps = a {grid.device_copy_bytes} byte tensor copy, "
                    f"peak_fp16_tflops = a {grid.peak_gemm_size}^3 float32 GEMM, launch_overhead_s = time per tiny op")
        link_note = ("no CPU-GPU link on a CPU device: host-to-host tensor copies by size (pinned = pageable); "
                     "bidirectional_factor from two copies at once on two threads "
                     f"({grid.bidirectional_bytes} bytes each)")
        link_name = "host memory copies (no GPU)"
        notes = ["--device cpu: the gpu section is the CPU itself in float32 and the link section host copies, "
                 "for predicting `alisa-exec run --device cpu`"]
    if quick:
        notes.append("--quick: a reduced grid of shapes and sizes, for CI; not for predictions of large models")
    if models:
        notes.append("named ops also timed at the layers of " + ", ".join(spec.name for spec in models))
    profile = {
        "name": name,
        "description": f"measured by alisa-exec profile{' --quick' if quick else ''} --device {device.type}: {machine}",
        "device_kind": device.type,
        "provenance": {"machine": machine, "date": datetime.date.today().isoformat(), "method": method,
                       "software": software_versions(device), "notes": notes},
        "gpu": {
            "source": {"kind": "measured", "note": gpu_note},
            "name": device_name,
            "memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else host_memory_bytes(),
            "hbm_GBps": copy_GBps(bench, grid.device_copy_bytes),
            "peak_fp16_tflops": peak_tflops(bench, grid.peak_gemm_size, dtype),
            "dtype": str(dtype).removeprefix("torch."),
            "launch_overhead_s": launch_overhead_s(device),
            "gemm_fp16": gemms,
            "decode_attention_fp16": decode,
            "prefill_attention_fp16": prefill,
            "ops": named,
        },
        "link": {"source": {"kind": "measured", "note": link_note}, "name": link_name, "copies": copies,
                 "bidirectional_factor": bidirectional},
        "cpu": {"source": {"kind": "measured", "note": (
            f"torch: memcpy on one thread, copy on {torch.get_num_threads()} threads (both read + write, "
            f"{grid.host_copy_bytes} bytes), GEMM rate of a {grid.host_gemm_size}^3 product by dtype, "
            "float32 decode attention")}, **host},
    }
    validate(HardwareProfile, profile, f"measured profile {name}")
    return profile


def fastest_of(rounds: list[dict]) -> dict:
    """One profile from rounds of the same measurement taken at different times: each time (`s`, `*_s`) the least
    and each rate (`*GBps`, `*tflops`) the most over the rounds, any other figure their median; shapes and sizes must
    agree. Other work on a shared machine only slows a round down, so the fastest round of each row is its least
    disturbed measurement, as the fastest try of a run is (benchmarks/cpu_validation.py)."""
    if not rounds:
        raise ValueError("no rounds to merge")

    def merge(values: list, key: str, where: str):
        first = values[0]
        if isinstance(first, dict):
            if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
                raise ValueError(f"{where}: the rounds hold different fields")
            return {k: merge([v[k] for v in values], k, f"{where}/{k}") for k in first}
        if isinstance(first, list):
            if any(not isinstance(v, list) or len(v) != len(first) for v in values):
                raise ValueError(f"{where}: the rounds hold different numbers of rows")
            return [merge([v[i] for v in values], key, f"{where}[{i}]") for i in range(len(first))]
        if isinstance(first, float):
            if key == "s" or key.endswith("_s"):
                return min(values)
            if key.endswith("GBps") or key.endswith("tflops") or where.split("/")[-2:-1] == ["gemm_tflops"]:
                return max(values)
            return statistics.median(values)
        if isinstance(first, (bool, int)) and any(v != first for v in values):
            raise ValueError(f"{where}: the rounds differ ({values}); merge rounds of one grid on one machine")
        return first  # names, notes and other text: the first round's

    merged = merge(rounds, "", "profile")
    if len(rounds) > 1:
        dates = sorted({r["provenance"]["date"] for r in rounds})
        when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
        merged["provenance"]["notes"] = [*merged["provenance"]["notes"], (
            f"the fastest of {len(rounds)} rounds of this measurement ({when}): each time the least, each rate the "
            "most and any other figure the median over the rounds")]
    validate(HardwareProfile, merged, "merged profile")
    return merged


def write_profile(profile: dict, path: Path) -> None:
    """Write the measured profile YAML whole or not at all."""
    write_profile_yaml(profile, path, "Measured by `alisa-exec profile`; see provenance. Re-measure rather than edit.")


def check_out_path(path: Path) -> str:
    """The profile's name (the file stem) from an output path, which must be a .yaml file."""
    if path.suffix not in (".yaml", ".yml"):
        raise SpecError(f"--out {path}: a profile is a YAML file, e.g. hw_profiles/NAME.yaml")
    if path.exists() and path.is_dir():
        raise SpecError(f"--out {path} is a folder; give the YAML file to write")
    return path.stem

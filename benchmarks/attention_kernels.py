"""Benchmark of SWA decode attention: dense SDPA over the whole cache, explicit gather, and the fused Triton kernel.

For batch {1, 8, 32, 64} x cached tokens L {1024, 4096, 16384} x KV sparsity {0.5, 0.8, 0.9}, 32 heads of 128
(multi-head, the paper's OPT and LLaMA shapes), fp16 and INT8 K/V, one layer's decode attention by each path:

- dense: `scaled_dot_product_attention` over all L fp16 tokens (what runs without SWA; INT8 rows show it too);
- gather: the explicit-gather mode (gather the selected K/V, dequantizing INT8, then attention in PyTorch), with
  the gather copy alone in its own column (the paper's Fig. 11 breakdown);
- fused: `sparse_decode_attention`, output and head-summed probabilities in one pass over the index list;
- tiered: the same kernel as the executor calls it, over its tiered cache (`TokenRows`: a slot-major window ring of
  K/V rows holding the k recent tokens, and a staging buffer holding the k older picks as if fetched from the CPU).

The index list is the k most recent tokens plus k random older ones, sorted, k = `swa_window(L, sparsity)`.
"MB read" is what the fused kernel must read (the selected K/V rows, their INT8 scales and zero points, the index
list, q); "% HBM" is that over its time, against a device-to-device copy measured in the same run. Timings are
Triton's `do_bench` medians (L2 flushed before each call). "err" is the fused output's largest difference from
the explicit-gather output. Targets (issue 13), on an H100/H200: at 80% sparsity and L >= 4096, fused >= 4x faster
than dense and above 75% of HBM bandwidth.

    python benchmarks/attention_kernels.py [--out reports/kernels/CARD.json]  # CUDA; a few minutes on one H100
    python benchmarks/attention_kernels.py --smoke                             # tiny shapes; no GPU: the Triton interpreter
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

FULL_GRID = dict(batches=(1, 8, 32, 64), lengths=(1024, 4096, 16384), sparsities=(0.5, 0.8, 0.9), heads=32,
                 head_dim=128)
SMOKE_GRID = dict(batches=(1, 2), lengths=(64,), sparsities=(0.5, 0.8), heads=4, head_dim=16)
TARGET_SPARSITY, TARGET_MIN_LENGTH, TARGET_SPEEDUP, TARGET_HBM = 0.8, 4096, 4.0, 0.75


def parse_args(doc: str = __doc__) -> argparse.Namespace:
    """--smoke and --out, as this benchmark and benchmarks/k4_capped.py take them."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, to check the harness (on the CPU interpreter when there is no GPU)")
    parser.add_argument("--out", type=Path, help="write the rows and the machine as JSON here, the table beside it")
    return parser.parse_args()


def bench_device(smoke: bool, script: str):
    """CUDA, or with --smoke the CPU under the Triton interpreter (set before triton is first imported); None (after
    saying why) without either."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if not smoke:
        print(f"This benchmark times GPU kernels and needs CUDA, which this machine does not have.\n"
              f"`python benchmarks/{script} --smoke` runs it on tiny shapes on the CPU, under the Triton "
              "interpreter, to check that it works (its timings mean nothing).")
        return None
    os.environ["TRITON_INTERPRET"] = "1"
    return torch.device("cpu")


def milliseconds(device, fn) -> float:
    """Triton's `do_bench` median on CUDA; the median of 3 runs elsewhere."""
    import triton

    if device.type == "cuda":
        return triton.testing.do_bench(fn, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    args = parse_args()
    device = bench_device(args.smoke, "attention_kernels.py")
    if device is None:
        return 1
    import torch
    from rich.console import Console
    from rich.table import Table

    import triton

    from alisa_exec.kernels import (QuantizedKV, gather_decode_attention, gather_kv, sparse_decode_attention,
                                    store_quantized, swa_window)
    from alisa_exec.kv_cache import GPU, TokenRows, Tiers, int8_group

    grid = SMOKE_GRID if args.smoke else FULL_GRID

    def hbm_bytes_per_s() -> float | None:
        if device.type != "cuda":
            return None
        src = torch.empty(2**30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        seconds = milliseconds(device, lambda: dst.copy_(src)) / 1e3
        return 2 * src.numel() / seconds  # read and write

    def index_list(batch: int, length: int, k: int) -> torch.Tensor:
        """The k most recent positions and k random older ones, sorted, [batch, min(length, 2k)]."""
        older = torch.rand(batch, length - k, device=device).topk(min(k, length - k), dim=1).indices
        recent = torch.arange(length - k, length, device=device).expand(batch, k)
        return torch.cat([older.sort(dim=1).values, recent], dim=1).to(torch.int32)

    def bytes_to_read(q: torch.Tensor, k_cache, indices: torch.Tensor) -> int:
        batch, num_tokens = indices.shape
        if isinstance(k_cache, QuantizedKV):
            row_bytes = k_cache.data.shape[3] + 2 * k_cache.scale.shape[3] * k_cache.scale.element_size()
            kv_heads = k_cache.data.shape[1]
        else:
            row_bytes = k_cache.shape[3] * k_cache.element_size()
            kv_heads = k_cache.shape[1]
        return 2 * batch * kv_heads * num_tokens * row_bytes + indices.numel() * 4 + q.numel() * q.element_size()

    hbm = hbm_bytes_per_s()
    heads, head_dim = grid["heads"], grid["head_dim"]

    def tiered(q: torch.Tensor, int8: bool, length: int, k: int) -> float:
        """The kernel over the executor's tiered cache: a ring of the k recent tokens' rows and a staging buffer of
        k older rows per sequence, as the executor's index list names them (ring slots, then -1 - staged row)."""
        batch = q.shape[0]
        tiers = Tiers(device)
        ring = TokenRows(tiers, GPU, "kv", k + 1, batch, 2 * heads * head_dim, torch.float16, int8, int8_group(head_dim))
        stage = ring.staging(tiers, GPU, "kv_staging", batch * k)
        ring.store(slice(0, k + 1), torch.randn(k + 1, batch, ring.width, dtype=torch.float16, device=device))
        stage.store(slice(0, batch * k), torch.randn(batch * k, 1, ring.width, dtype=torch.float16, device=device))
        staged = -1 - torch.arange(batch * k, device=device, dtype=torch.int32).view(batch, k)
        recent = torch.arange(k, device=device, dtype=torch.int32).expand(batch, k)
        indices = torch.cat([staged, recent], dim=1)
        views = ring.kv_views(heads), stage.kv_views(heads)
        return milliseconds(device, lambda: sparse_decode_attention(q, *views[0], indices, staged=views[1]))

    def measure_cache(batch: int, length: int) -> list[dict]:
        """Every sparsity and KV format over one random cache of `batch` sequences of `length` tokens."""
        q = torch.randn(batch, heads, head_dim, dtype=torch.float16, device=device)
        k_cache, v_cache = (torch.randn(batch, heads, length, head_dim, dtype=torch.float16, device=device)
                            for _ in range(2))
        quantized = []
        for values in (k_cache, v_cache):
            cache = QuantizedKV.empty(batch, heads, length, head_dim, torch.float16, device)
            store_quantized(cache, torch.arange(length, device=device), values)
            quantized.append(cache)
        dense_ms = milliseconds(device, lambda: torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None], k_cache, v_cache))
        rows = []
        for sparsity in grid["sparsities"]:
            k = swa_window(length, sparsity)
            indices = index_list(batch, length, k)
            for kv_name, (kc, vc) in (("fp16", (k_cache, v_cache)), ("int8", quantized)):
                tiered_ms = tiered(q, kv_name == "int8", length, k)
                fused_out, _ = sparse_decode_attention(q, kc, vc, indices)
                gather_out, _ = gather_decode_attention(q, kc, vc, indices)
                fused_ms = milliseconds(device, lambda: sparse_decode_attention(q, kc, vc, indices))
                gather_ms = milliseconds(device, lambda: gather_decode_attention(q, kc, vc, indices))
                copy_ms = milliseconds(device, lambda: (gather_kv(kc, indices, q.dtype), gather_kv(vc, indices, q.dtype)))
                read = bytes_to_read(q, kc, indices)
                rows.append(dict(kv=kv_name, batch=batch, length=length, sparsity=sparsity,
                                 tokens=indices.shape[1], dense_ms=dense_ms, gather_ms=gather_ms,
                                 gather_copy_ms=copy_ms, fused_ms=fused_ms, tiered_ms=tiered_ms,
                                 fused_bytes_read=read,
                                 fused_GBps=read / fused_ms / 1e6,
                                 fused_hbm_fraction=None if hbm is None else read / (fused_ms / 1e3) / hbm,
                                 max_abs_err=float((fused_out.float() - gather_out.float()).abs().max())))
        return rows

    rows = []
    for length in grid["lengths"]:
        for batch in grid["batches"]:
            print(f"b={batch} L={length}", file=sys.stderr, flush=True)
            rows += measure_cache(batch, length)
            if device.type == "cuda":
                torch.cuda.empty_cache()  # the next cache may be several times larger

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    machine = dict(card=card, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                   hbm_GBps=None if hbm is None else hbm / 1e9, smoke=args.smoke)
    title = (f"SWA decode attention, {heads} heads x {head_dim}: {card}, {machine['date']}, torch {torch.__version__}, "
             f"triton {triton.__version__}, CUDA {torch.version.cuda}, measured HBM "
             + ("n/a" if hbm is None else f"{hbm / 1e9:.0f} GB/s"))
    table = Table(title=title)
    for column in ("KV", "b", "L", "sparsity", "T", "dense ms", "gather ms", "gather copy ms", "fused ms",
                   "tiered ms", "fused vs dense", "fused vs gather", "MB read", "GB/s", "% HBM", "err"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["kv"], str(row["batch"]), str(row["length"]), f"{row['sparsity']:.1f}", str(row["tokens"]),
                      f"{row['dense_ms']:.4f}", f"{row['gather_ms']:.4f}", f"{row['gather_copy_ms']:.4f}",
                      f"{row['fused_ms']:.4f}", f"{row['tiered_ms']:.4f}", f"{row['dense_ms'] / row['fused_ms']:.2f}x",
                      f"{row['gather_ms'] / row['fused_ms']:.2f}x", f"{row['fused_bytes_read'] / 1e6:.1f}",
                      f"{row['fused_GBps']:.0f}",
                      "n/a" if row["fused_hbm_fraction"] is None else f"{100 * row['fused_hbm_fraction']:.0f}%",
                      f"{row['max_abs_err']:.1e}")
    console = Console(width=200, record=True)
    console.print(table)
    target_rows = [r for r in rows if r["sparsity"] == TARGET_SPARSITY and r["length"] >= TARGET_MIN_LENGTH]
    if target_rows:
        speedups = [r["dense_ms"] / r["fused_ms"] for r in target_rows]
        line = (f"At {TARGET_SPARSITY:.0%} sparsity and L >= {TARGET_MIN_LENGTH}: fused vs dense "
                f"{min(speedups):.2f}x to {max(speedups):.2f}x (target >= {TARGET_SPEEDUP:.0f}x)")
        if hbm is not None:
            fractions = [r["fused_hbm_fraction"] for r in target_rows]
            line += f", {min(fractions):.0%} to {max(fractions):.0%} of HBM (target > {TARGET_HBM:.0%})"
        console.print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(machine=machine, rows=rows), indent=1) + "\n")
        args.out.with_suffix(".txt").write_text(console.export_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of `k4-capped`'s per-layer choice against SWA's: what one decode step of one layer spends choosing.

For batch {1, 64} x cached tokens L {640, 2048} at 80% KV sparsity, OPT-30B's head layout (56 heads of
128, fp16), the executor's own named ops on the device:

- swa: `LocalAttentionSum.push` and `select` (the windowed sums' update and the next step's pick, Triton on CUDA);
- copy attn: `ops.key_copy_attention`, the step's query over the 4-bit copy of all L keys;
- pick loop / pick kernel: `ops.capped_pick` with the greedy as its PyTorch loop (a few eager ops per older pick)
  and as the `capped_choice` Triton kernel (one launch), and whether the two chose the same.

Timings are `benchmarks/attention_kernels.py`'s: Triton's `do_bench` medians on CUDA (3 runs' median under the
interpreter, which mean nothing).

    python benchmarks/k4_capped.py [--out reports/kernels/k4-CARD.json]  # CUDA
    python benchmarks/k4_capped.py --smoke                                # tiny shapes; no GPU: the interpreter
"""

from __future__ import annotations

import datetime
import json

from attention_kernels import bench_device, milliseconds, parse_args  # benchmarks/ is on sys.path when this script runs

FULL_GRID = dict(batches=(1, 64), lengths=(640, 2048), heads=56, kv_heads=56, head_dim=128)
SMOKE_GRID = dict(batches=(1, 2), lengths=(40,), heads=4, kv_heads=2, head_dim=16)
SPARSITY = 0.8


def main() -> int:
    args = parse_args(__doc__)
    device = bench_device(args.smoke, "k4_capped.py")
    if device is None:
        return 1
    import torch
    import triton
    from rich.console import Console
    from rich.table import Table

    from alisa_exec import ops
    from alisa_exec.kernels import LocalAttentionSum
    from alisa_exec.key_copy import KeyCopy
    from alisa_exec.kv_cache import GPU, Tiers
    from alisa_sim.swa import SWA_CURRENT_DEFAULT, swa_recent

    grid = SMOKE_GRID if args.smoke else FULL_GRID
    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def ms(fn) -> float:
        return milliseconds(device, fn)

    heads, kv_heads, head_dim = grid["heads"], grid["kv_heads"], grid["head_dim"]
    rows = []
    for batch in grid["batches"]:
        for length in grid["lengths"]:
            keys = torch.randn(batch, kv_heads, length, head_dim, device=device, dtype=dtype)
            q = torch.randn(batch, heads, head_dim, device=device, dtype=dtype)
            copy = KeyCopy(Tiers(device), GPU, length, batch, kv_heads, head_dim, dtype)
            copy.store(0, keys)
            swa = LocalAttentionSum(batch, length + 1, SPARSITY, device, triton=True)
            swa_selected = swa.select(length)
            probs = ops.key_copy_attention(q, copy, length)
            recent = swa_recent(length, SPARSITY, SWA_CURRENT_DEFAULT)
            width = swa_selected.shape[1]
            row_probs = torch.rand(batch, width, device=device)

            def swa_step():
                swa.push(swa_selected, row_probs)
                return swa.select(length)
            loop, _ = ops.capped_pick(probs, swa_selected, recent, triton=False)
            kernel, _ = ops.capped_pick(probs, swa_selected, recent, triton=True)
            rows.append(dict(batch=batch, length=length, picks=width - recent,
                             swa_ms=ms(swa_step),
                             copy_attention_ms=ms(lambda: ops.key_copy_attention(q, copy, length)),
                             pick_loop_ms=ms(lambda: ops.capped_pick(probs, swa_selected, recent, False)),
                             pick_kernel_ms=ms(lambda: ops.capped_pick(probs, swa_selected, recent, True)),
                             same=bool(torch.equal(loop, kernel))))

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    machine = dict(card=card, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda, smoke=args.smoke)
    table = Table(title=f"k4-capped's choice vs SWA's, one layer, {heads} heads x {head_dim} ({kv_heads} KV), "
                        f"{SPARSITY:.0%}: {card}, {machine['date']}, torch {torch.__version__}, triton "
                        f"{triton.__version__}, CUDA {torch.version.cuda}")
    for column in ("b", "L", "picks", "swa ms", "copy attn ms", "pick loop ms", "pick kernel ms", "loop / kernel",
                   "k4 (kernel) / swa", "same"):
        table.add_column(column, justify="right")
    for row in rows:
        k4_ms = row["copy_attention_ms"] + row["pick_kernel_ms"]
        table.add_row(str(row["batch"]), str(row["length"]), str(row["picks"]), f"{row['swa_ms']:.4f}",
                      f"{row['copy_attention_ms']:.4f}", f"{row['pick_loop_ms']:.4f}", f"{row['pick_kernel_ms']:.4f}",
                      f"{row['pick_loop_ms'] / row['pick_kernel_ms']:.1f}x", f"{k4_ms / row['swa_ms']:.1f}x",
                      "yes" if row["same"] else "NO")
    console = Console(width=200, record=True)
    console.print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(machine=machine, rows=rows), indent=1) + "\n")
        args.out.with_suffix(".txt").write_text(console.export_text())
    return 0 if all(row["same"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())

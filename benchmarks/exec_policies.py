"""Every executor policy under one GPU memory budget per batch: measured tokens/s beside the simulator's prediction for
the very plan that ran.

Default (issue 7): OPT-6.7B with dummy fp16 weights, prompt 128, 512 generated tokens, batch 8, 16, 32 and 64. The
GPU budget (`memory.gpu_gb`) at a batch is what ALISA's plan holds besides the KV cache (weights, staging, selection
state, activations, logits, as the simulator counts them) plus 15% of the batch's INT8 KV cache at the longest
context (--kv-on-gpu), so ALISA at 80% KV sparsity is in Phase II from the prompt on, and in Phase III where its
planner finds recompute worth it (batch 64 on a measured H100/H200 profile). Policies at that budget: alisa (80%),
flexgen (its LP's placement), accelerate, vllm (max_model_len = prompt + generated), dense, h2o and streamingllm
(80%). dense, vllm, h2o and streamingllm need their (kept) KV cache on the GPU; where the shared budget cannot hold
it they run at their own budget (dense's weights, buffers and KV cache over vLLM's 0.9 utilization), marked "own".

A run is `alisa_exec.executor.plan_run` (the simulator's policy object for the workload, re-planned for less when
the executor holds more than the simulator counts) and `execute`; the prediction is the simulation of that same
plan (`ExecutorPlan.simulation`) on the card's profile (hw_profiles/h100.yaml or h200.yaml by the device name, or
--hardware). Targets at batch 64: ALISA >= 2x FlexGen and ahead of accelerate; the prediction error of every run.

Time: accelerate and FlexGen at batch 64 take minutes each (the whole KV cache, or most weights, cross PCIe every
step), so runs go in priority order (batch 64 of alisa, accelerate and flexgen first, then the other policies from
the largest batch down, then the slow baselines at smaller batches); a run predicted to overrun what is left of
--budget-s is skipped, and one that passes --max-run-s is aborted, its throughput then reported as an upper bound
("< x"). Both are marked. On one H100/H200, from the repository root (pip install -e '.[exec,dev]'), about 7 min:
    python benchmarks/exec_policies.py --out reports/exec_policies
On the CPU, a smoke run with a tiny model and a quick CPU profile (under a minute):
    python benchmarks/exec_policies.py --smoke
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if "--smoke" in sys.argv:  # off the GPU only Triton's interpreter loads; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alisa_exec import executor  # noqa: E402
from alisa_exec.executor import size  # noqa: E402
from alisa_exec.overhead import add_executor_overhead  # noqa: E402
from alisa_exec.profiler import measure_profile, software_versions, write_profile  # noqa: E402
from alisa_exec.device import DTYPES, default_dtype, device_name, resolve_device  # noqa: E402
from alisa_exec.weights import DUMMY  # noqa: E402
from alisa_sim.errors import SpecError  # noqa: E402
from alisa_sim.workload import resolve_workload  # noqa: E402

SPARSITY = 0.8
SLOW = ("flexgen", "accelerate", "zero")
OWN_BUDGET = ("dense", "vllm", "h2o", "streamingllm")  # run at their own budget where the shared one is too small
TARGET_VS_FLEXGEN = 2.0
SMOKE_MODEL = dict(name="tiny-opt", family="opt", hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=4,
                   ffn_dim=256, vocab_size=512, max_position_embeddings=128, tie_word_embeddings=True, norm_eps=1e-5,
                   dtype_bytes=4)


def policies(prompt_len: int, gen_len: int) -> dict[str, dict]:
    return {"alisa": {"name": "alisa", "kv_sparsity": SPARSITY},
            "flexgen": {"name": "flexgen"},
            "accelerate": {"name": "accelerate"},
            "vllm": {"name": "vllm", "max_model_len": prompt_len + gen_len},
            "dense": {"name": "dense"},
            "h2o": {"name": "h2o", "kv_sparsity": SPARSITY},
            "streamingllm": {"name": "streamingllm", "kv_sparsity": SPARSITY},
            "zero": {"name": "zero"}}


def order(batches: list[int], names: list[str]) -> list[tuple[int, str]]:
    """Runs by priority: the targets at the largest batch, the fast policies at every batch, the slow ones last."""
    descending = sorted(batches, reverse=True)
    first = [(descending[0], name) for name in ("alisa", "accelerate", "flexgen") if name in names]
    fast = [(b, name) for b in descending for name in names if name not in SLOW and (b, name) not in first]
    slow = [(b, name) for b in descending for name in names if name in SLOW and (b, name) not in first]
    return first + fast + slow


def workload_data(args, batch: int, policy: dict, gpu_gb: float | None) -> dict:
    data = {"model": args.model, "hardware": args.hardware, "batch_size": batch, "prompt_len": args.prompt_len,
            "gen_len": args.gen_len, "policy": policy}
    if gpu_gb is not None:
        data["memory"] = {"gpu_gb": gpu_gb}
    return data


def budget_gb(args, batch: int, dtype: torch.dtype) -> float:
    """What ALISA's plan holds besides the KV cache plus --kv-on-gpu of its KV cache at the longest context."""
    wl = resolve_workload(workload_data(args, batch, policies(args.prompt_len, args.gen_len)["alisa"], None))
    sim = executor.simulator_policy(executor._with(wl, dtype, wl.gpu_capacity_bytes))
    kv = batch * wl.max_context() * wl.model.num_layers * sim.kv_token_layer
    return (sim.static_memory().gpu_bytes + args.kv_on_gpu * kv) / 1e9


def plan_summary(plan: executor.ExecutorPlan) -> str:
    sim, name = plan.sim, plan.sim.name
    if name == "alisa":
        s = sim.schedule
        return f"p1={s.p1} p2={s.p2} beta={s.beta:g}, {sim.gpu_tokens} GPU tok"
    if name == "flexgen":
        return sim.setting.cli().replace("--gpu-batch-size", "gbs").replace("--num-gpu-batches", "x")
    if name == "vllm":
        return f"{sim.gpu_blocks} blocks of {sim.block_size}"
    return ""


class RunAborted(Exception):
    """A run passed its time limit (raised from the executor's per-step callback)."""

    def __init__(self, steps: int):
        super().__init__(f"aborted after {steps} steps")
        self.steps = steps


def own_budget_gb(args, batch: int, dtype: torch.dtype) -> float:
    """A budget for the policies that need the whole (kept) KV cache on the GPU: dense's weights, working buffers and
    KV cache at the longest context, over vLLM's default 0.9 utilization."""
    wl = resolve_workload(workload_data(args, batch, {"name": "dense"}, None))
    sim = executor.simulator_policy(executor._with(wl, dtype, wl.gpu_capacity_bytes))
    return (sim.static_memory().gpu_bytes + sim.kv_memory(wl.max_context()).gpu_bytes) / 0.9 / 1e9


def predict(args, batch: int, name: str, gpu_gb: float, device, dtype):
    """(workload, executor plan, the simulation of the plan); SpecError if it does not fit."""
    wl = resolve_workload(workload_data(args, batch, policies(args.prompt_len, args.gen_len)[name], gpu_gb))
    plan = executor.plan_run(wl, device, dtype)
    return wl, plan, plan.simulation


def run_one(args, batch: int, name: str, budgets: dict, device, dtype, started: float) -> dict:
    row = {"batch": batch, "policy": name, "gpu_gb": budgets["shared"][batch]}
    try:
        try:
            wl, plan, predicted = predict(args, batch, name, row["gpu_gb"], device, dtype)
        except SpecError as exc:
            if name not in OWN_BUDGET:
                raise
            row.update(gpu_gb=budgets["own"][batch], budget="own", shared_budget_why=str(exc).splitlines()[0][:200])
            wl, plan, predicted = predict(args, batch, name, row["gpu_gb"], device, dtype)
    except SpecError as exc:
        return {**row, "status": "does not fit", "why": str(exc).splitlines()[0][:300]}
    predicted_s = sum(r.duration_s for r in predicted.steps)
    decode = [r.duration_s for r in predicted.decode_steps]
    row.update(plan=plan_summary(plan), replans=plan.replans,
               predicted_tok_s=batch * args.gen_len / predicted_s, predicted_s=predicted_s,
               predicted_step_ms=1e3 * sum(decode) / max(1, len(decode)))
    left = args.budget_s - (time.perf_counter() - started) - args.setup_s
    if predicted_s > left:
        return {**row, "status": f"skipped (predicted {predicted_s:.0f} s, {max(0.0, left):.0f} s left)"}
    limit = min(left, args.max_run_s)
    t0 = time.perf_counter()

    def on_step(record) -> None:
        if time.perf_counter() - t0 > limit:
            raise RunAborted(record.step + 1)

    try:
        measured = executor.execute(plan, device, dtype, DUMMY, 0, on_step=on_step)
        result = executor.build_result(plan, measured, device_name(device), dtype, DUMMY)
    except RunAborted as stop:
        elapsed = time.perf_counter() - t0
        # The whole run would take longer than this, so its throughput is below batch x gen_len / elapsed.
        return {**row, "status": f"aborted at {elapsed:.0f} s ({stop.steps} of {len(predicted.steps)} steps)",
                "measured_tok_s_below": batch * args.gen_len / elapsed, "wall_s": elapsed}
    m = result["metrics"]
    phases = sorted({p["phase"] for p in result["phases"]})
    row.update(status="measured", measured_tok_s=m["throughput_tok_s"], total_s=m["total_s"],
               measured_step_ms=1e3 * m["decode_step_s"]["mean"], h2d_gb=m["h2d_bytes"] / 1e9,
               phases="/".join(map(str, phases)), wall_s=time.perf_counter() - t0,
               peak_gpu_gb=m["peak_gpu_bytes"] / 1e9, error=m["throughput_tok_s"] / row["predicted_tok_s"] - 1)
    return row


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if hasattr(torch.accelerator, "empty_host_cache"):
            torch.accelerator.empty_host_cache()


def targets(rows: list[dict], batch: int) -> list[str]:
    """ALISA against FlexGen and accelerate at one batch; an aborted baseline gives a lower bound on the ratio."""
    at = {r["policy"]: r for r in rows if r["batch"] == batch}
    alisa = at.get("alisa", {}).get("measured_tok_s")
    lines = []
    goals = (("flexgen", TARGET_VS_FLEXGEN, f">= {TARGET_VS_FLEXGEN:g}x"), ("accelerate", 1.0, "> 1x"))
    for other, need, text in goals:
        row = at.get(other, {})
        theirs = row.get("measured_tok_s") or row.get("measured_tok_s_below")
        if not (alisa and theirs):
            lines.append(f"batch {batch}: alisa / {other}: not measured")
            continue
        ratio = alisa / theirs
        ok = ratio >= need if other == "flexgen" else ratio > need
        bound = "" if "measured_tok_s" in row else " at least (the baseline was aborted)"
        lines.append(f"batch {batch}: alisa / {other} = {ratio:.2f}x{bound} (target {text}): {'ok' if ok else 'MISS'}")
    return lines


def measured_cell(row: dict) -> str:
    if row.get("status") == "measured":
        return f"{row['measured_tok_s']:.1f}"
    return f"< {row['measured_tok_s_below']:.1f}" if "measured_tok_s_below" in row else "-"


def budget_cell(row: dict) -> str:
    return size(row["gpu_gb"] * 1e9) + (" (own)" if row.get("budget") == "own" else "")


def render(rows: list[dict], title: str) -> Table:
    table = Table("batch", "policy", "plan", "GPU\nbudget", "phases", "measured\ntok/s", "predicted\ntok/s",
                  "error", "decode step ms\nmeasured / pred.", "H2D GB", "status", title=title)
    for r in rows:
        measured = r.get("status") == "measured"
        table.add_row(str(r["batch"]), r["policy"], r.get("plan", ""), budget_cell(r), r.get("phases", ""),
                      measured_cell(r),
                      f"{r['predicted_tok_s']:.1f}" if "predicted_tok_s" in r else "-",
                      f"{r['error']:+.0%}" if measured else "-",
                      (f"{r['measured_step_ms']:.2f} / " if measured else "- / ")
                      + (f"{r['predicted_step_ms']:.2f}" if "predicted_step_ms" in r else "-"),
                      f"{r['h2d_gb']:.1f}" if measured else "-",
                      r["status"] if r["status"] != "does not fit" else f"does not fit: {r['why'][:60]}")
    return table


def markdown(rows: list[dict], header: str, target_lines: list[str]) -> str:
    lines = [header, "", "| batch | policy | plan | GPU budget | phases | measured tok/s | predicted tok/s | error | "
             "decode step ms (measured / predicted) | H2D GB | status |", "|" + "---|" * 11]
    for r in rows:
        measured = r.get("status") == "measured"
        lines.append(
            f"| {r['batch']} | {r['policy']} | {r.get('plan', '')} | {budget_cell(r)} | {r.get('phases', '')} | "
            + measured_cell(r) + " | "
            + (f"{r['predicted_tok_s']:.1f}" if "predicted_tok_s" in r else "-") + " | "
            + (f"{r['error']:+.0%}" if measured else "-") + " | "
            + (f"{r['measured_step_ms']:.2f}" if measured else "-") + " / "
            + (f"{r['predicted_step_ms']:.2f}" if "predicted_step_ms" in r else "-") + " | "
            + (f"{r['h2d_gb']:.1f}" if measured else "-") + " | "
            + (r["status"] if r["status"] != "does not fit" else f"does not fit: {r['why']}") + " |")
    return "\n".join(lines + [""] + [f"- {line}" for line in target_lines]) + "\n"


def card_profile(device: torch.device) -> str:
    """The measured profile of this card (hw_profiles/h100.yaml or h200.yaml) by its name."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key in ("H200", "H100"):
            if key in name:
                return key.lower()
        raise SystemExit(f"no measured profile for {name}: pass --hardware (e.g. one made by `alisa-exec profile`)")
    return "h100"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-6.7b", help="a preset or a JSON mapping of ModelSpec fields")
    parser.add_argument("--batches", default="8,16,32,64", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--policies", default=",".join(policies(0, 0)), type=lambda s: s.split(","))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=512)
    parser.add_argument("--hardware", help="profile for the plans and predictions (default: the card's)")
    parser.add_argument("--device", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", choices=tuple(DTYPES))
    parser.add_argument("--kv-on-gpu", type=float, help="share of ALISA's KV cache at the longest context the GPU "
                        "budget leaves room for (default 0.15; 0.5 with --smoke, so that the tiny model offloads too)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="wall-time budget: runs predicted to overrun "
                        "what is left are skipped")
    parser.add_argument("--max-run-s", type=float, default=100.0, help="a run is aborted past this (its throughput "
                        "is then reported as a bound)")
    parser.add_argument("--setup-s", type=float, default=15.0, help="allowance per run for loading and allocating")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU with a quick CPU profile")
    parser.add_argument("--out", type=Path, help="folder for exec_policies-<device>-<date>.json and .md")
    if "--smoke" in (sys.argv[1:] if argv is None else argv):  # smoke defaults; explicit flags still win
        parser.set_defaults(device="cpu", model=json.dumps(SMOKE_MODEL), batches=[2, 4], prompt_len=32, gen_len=16)
    args = parser.parse_args(argv)
    if args.kv_on_gpu is None:
        args.kv_on_gpu = 0.5 if args.smoke else 0.15
    args.model = json.loads(args.model) if args.model.lstrip().startswith("{") else args.model
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    log = Console(stderr=True).print
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        if args.hardware is None and args.smoke:
            args.hardware = str(Path(scratch) / "cpu-quick.yaml")
            write_profile(add_executor_overhead(measure_profile("cpu-quick", device, quick=True,
                                                                progress=lambda _: None), device),
                          Path(args.hardware))
        args.hardware = args.hardware or card_profile(device)
        budgets = {"shared": {batch: budget_gb(args, batch, dtype) for batch in args.batches},
                    "own": {batch: own_budget_gb(args, batch, dtype) for batch in args.batches}}
        rows = []
        for batch, name in order(args.batches, args.policies):
            log(f"batch {batch}: {name} ({time.perf_counter() - started:.0f} s in)")
            row = run_one(args, batch, name, budgets, device, dtype, started)
            log(f"  {size(row['gpu_gb'] * 1e9)} budget: {row['status']}"
                + (f": {row['measured_tok_s']:.1f} tok/s measured, {row['predicted_tok_s']:.1f} predicted"
                   if row["status"] == "measured" else ""))
            rows.append(row)
            free_memory(device)
    rows.sort(key=lambda r: (r["batch"], args.policies.index(r["policy"])))
    card, date = device_name(device), datetime.date.today().isoformat()
    versions = software_versions(device)
    model_name = args.model if isinstance(args.model, str) else args.model["name"]
    header = (f"{model_name}, dummy weights, {str(dtype).removeprefix('torch.')}, prompt {args.prompt_len}, "
              f"gen {args.gen_len}, on {card}, {date}; predictions on profile {Path(args.hardware).stem}; "
              + ", ".join(f"{k} {v}" for k, v in versions.items()))
    measured = [r for r in rows if r["status"] == "measured"]
    target_lines = targets(rows, max(args.batches))
    if measured:
        mape = sum(abs(r["error"]) for r in measured) / len(measured)
        target_lines.append(f"prediction error (throughput): mean |error| {mape:.0%} over {len(measured)} runs, "
                            f"worst {max(measured, key=lambda r: abs(r['error']))['error']:+.0%}")
    console.print(render(rows, header))
    for line in target_lines:
        console.print(line)
    log(f"benchmark wall time {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"exec_policies-{device.type}-{date}"
        stem.with_suffix(".json").write_text(json.dumps({"header": header, "card": card, "date": date,
                                                         "versions": versions, "rows": rows,
                                                         "targets": target_lines}, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(rows, header, target_lines))
        log(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

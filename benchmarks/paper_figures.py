"""The ALISA paper's Figs. 9, 11 and 12 as the simulator predicts them: prints the tables docs/paper-comparison.md quotes."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor

from rich.console import Console
from rich.table import Table

from alisa_sim.cost_model import CostModel
from alisa_sim.hardware import load_hardware_profile
from alisa_sim.planner import cost_model_of, make_policy
from alisa_sim.results import build_result
from alisa_sim.selection_stats import UNIFORM_STATS
from alisa_sim.simulator import simulate
from alisa_sim.workload import resolve_workload

FIG9_MODELS = [("opt-6.7b", "paper-v100-32g"), ("opt-13b", "paper-v100-32g"), ("llama-7b", "paper-v100-32g"),
               ("llama-13b", "paper-v100-32g"), ("opt-30b", "paper-h100-80g"), ("llama-33b", "paper-h100-80g")]
FIG9_BATCHES = (4, 8, 16, 32, 64)
FIG9_POLICIES = ("zero", "accelerate", "flexgen", "vllm", "alisa")
SPARSITIES = (0.5, 0.8, 0.9)


def run(model: str, hardware: str, batch: int, policy: dict) -> dict:
    wl = resolve_workload({"model": model, "hardware": hardware, "batch_size": batch, "prompt_len": 128,
                           "gen_len": 512, "policy": policy})
    return build_result(simulate(wl))


def fig9_point(point: tuple) -> tuple:
    model, hardware, batch, name = point
    policy = {"name": name, "kv_sparsity": 0.8} if name == "alisa" else {"name": name}
    metrics = run(model, hardware, batch, policy)["metrics"]
    return point, None if metrics["oom"] else metrics["throughput_tok_s"]


def _expected_cpu_ms(point: tuple) -> float:
    """A grid point's rough CPU time on the 2-core development machine (from a measured grid), so that the pool
    starts the longest first and no long point is left for the end."""
    _, _, batch, policy = point
    return {"zero": 20, "accelerate": 120, "flexgen": 200, "vllm": 90 + 4 * batch, "alisa": 40 + 4 * batch}[policy]


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished child processes (on a shared machine wall time also counts the others'
    work; this does not)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def fig9(console: Console, workers: int) -> None:
    points = [(m, h, b, p) for m, h in FIG9_MODELS for b in FIG9_BATCHES for p in FIG9_POLICIES]
    start, workers_cpu = time.perf_counter(), _children_cpu_s()
    # FlexGen's LP imports scipy on first use, and each profile is parsed and priced once: done before the pool
    # forks, no worker pays for them.
    import scipy.optimize  # noqa: F401
    for hardware in dict.fromkeys(hardware for _, hardware in FIG9_MODELS):
        cost_model_of(load_hardware_profile(hardware))
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("fork")) as pool:
        results = dict(pool.map(fig9_point, sorted(points, key=_expected_cpu_ms, reverse=True)))
    wall, workers_cpu = time.perf_counter() - start, _children_cpu_s() - workers_cpu
    table = Table("model", "hardware", "batch", *FIG9_POLICIES, "ALISA / FlexGen", "ALISA / vLLM",
                  title=f"Fig. 9: throughput (tok/s), s=128 n=512, ALISA at 80% KV sparsity; {len(points)} "
                        f"simulations in {wall:.1f} s on {workers} processes ({workers_cpu:.1f} CPU-s in them, "
                        f"load average {os.getloadavg()[0]:.1f})")
    def ratio(a, b) -> str:
        return "-" if a is None or b is None else f"{a / b:.2f}x"

    for model, hardware in FIG9_MODELS:
        for batch in FIG9_BATCHES:
            row = {p: results[model, hardware, batch, p] for p in FIG9_POLICIES}
            table.add_row(model, hardware, str(batch), *("OOM" if v is None else f"{v:.0f}" for v in row.values()),
                          ratio(row["alisa"], row["flexgen"]), ratio(row["alisa"], row["vllm"]))
    console.print(table)


def fig11(console: Console) -> None:
    table = Table("model", "kv sparsity", "dense attention (us)", "SWA fused: attention + selection (us)",
                  "SWA explicit gather: attention + selection (us)",
                  title="Fig. 11: one attention module on the H200, b=64, sequence 128, fp16 KV")
    for model in ("opt-6.7b", "opt-30b"):
        def module_us(policy: dict) -> float:
            wl = resolve_workload({"model": model, "hardware": "h200", "batch_size": 64, "prompt_len": 128,
                                   "gen_len": 2, "policy": policy})
            ops = {op.name: op.duration_s for op in make_policy(wl, CostModel(wl.hardware)).decode_template(1).ops}
            return 1e6 * (ops["attention"] + ops.get("selection", 0.0))

        dense = module_us({"name": "dense"})
        for sparsity in SPARSITIES:
            common = {"name": "alisa", "kv_sparsity": sparsity, "int8": False}
            table.add_row(model, f"{sparsity:g}", f"{dense:.0f}", f"{module_us({**common, 'attention_kernel': 'fused'}):.0f}",
                          f"{module_us({**common, 'attention_kernel': 'gather'}):.0f}")
    console.print(table)


def fig12(console: Console, stats: str | None, label: str) -> None:
    flexgen = run("opt-30b", "paper-h100-80g", 64, {"name": "flexgen"})["metrics"]["throughput_tok_s"]
    phases = Table("kv sparsity", "INT8", "p1", "p2", "beta", "phase I / II / III time (s)",
                   "GPU / CPU KV at end (GB)", "total (s)", "total without recompute (s)", "recompute speed-up",
                   title=f"Fig. 12: OPT-30B, b=64, s=128, n=512 on paper-h100-80g (20 GB/s link), {label}")
    ablation = Table("kv sparsity", "FlexGen (tok/s)", "SWA, static split", "+ dynamic scheduling", "+ INT8",
                     title=f"Fig. 12 ablation: throughput (tok/s) and the gain of each step, {label}")
    for sparsity in SPARSITIES:
        for int8 in (False, True):
            policy = {"name": "alisa", "kv_sparsity": sparsity, "int8": int8, "selection_stats": stats}
            result = run("opt-30b", "paper-h100-80g", 64, {**policy, "recompute": True})
            without = run("opt-30b", "paper-h100-80g", 64, {**policy, "recompute": False})["metrics"]["total_s"]
            params, by_phase = result["plan"]["params"], {p["phase"]: p for p in result["phases"]}
            end = result["phases"][-1]
            phases.add_row(f"{sparsity:g}", str(int8), str(params["p1"]), str(params["p2"]), f"{params['beta']:g}",
                           " / ".join(f"{by_phase[i]['time_s']:.1f}" if i in by_phase else "-" for i in (1, 2, 3)),
                           f"{end['gpu_kv_bytes_end'] / 1e9:.1f} / {end['cpu_kv_bytes_end'] / 1e9:.1f}",
                           f"{result['metrics']['total_s']:.1f}", f"{without:.1f}",
                           f"{without / result['metrics']['total_s']:.2f}x")
        steps = [run("opt-30b", "paper-h100-80g", 64, {"name": "alisa", "kv_sparsity": sparsity,
                                                       "selection_stats": stats, **options})
                 ["metrics"]["throughput_tok_s"] for options in (
                     {"dynamic_scheduling": False, "int8": False, "recompute": False},
                     {"dynamic_scheduling": True, "int8": False, "recompute": True},
                     {"dynamic_scheduling": True, "int8": True, "recompute": True})]
        ablation.add_row(f"{sparsity:g}", f"{flexgen:.0f}", f"{steps[0]:.0f} ({steps[0] / flexgen:.2f}x)",
                         f"{steps[1]:.0f} ({steps[1] / steps[0]:.2f}x)", f"{steps[2]:.0f} ({steps[2] / steps[1]:.2f}x)")
    console.print(phases)
    console.print(ablation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--figures", default="9,11,12")
    args = parser.parse_args()
    console = Console(width=200)
    figures = set(args.figures.split(","))
    if "9" in figures:
        fig9(console, args.workers)
    if "11" in figures:
        fig11(console)
    if "12" in figures:
        fig12(console, None, "measured selection_stats (SmolLM2-135M)")
        fig12(console, str(UNIFORM_STATS), "picks spread evenly over the ages")


if __name__ == "__main__":
    main()

"""Wall time of whole simulations on this machine: OPT-30B, b=64, s=128, n=512 (target under 1 s) and the paper's
full Fig. 9 grid (target under 30 s)."""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from rich.console import Console
from rich.table import Table

from alisa_sim.simulator import simulate
from alisa_sim.workload import resolve_workload

import paper_figures  # benchmarks/ is on sys.path when this script runs

CASES = [
    # (label, model, policy, hardware); the first is the target case
    ("target", "opt-30b", "accelerate", "paper-h100-80g"),
    ("", "opt-30b", "zero", "paper-h100-80g"),
    ("", "opt-6.7b", "dense", "h200"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fig9-workers", type=int, default=2,
                        help="also simulate the paper's full Fig. 9 grid on this many processes (0: skip)")
    args = parser.parse_args()
    table = Table("case", "model", "policy", "hardware", "steps", "layers simulated / total",
                  "wall median (s)", "wall min (s)", "predicted total (s)",
                  title=f"alisa-sim speed, b=64 s=128 n=512, {platform.processor() or platform.machine()}, "
                        f"median of {args.repeats}")
    for label, model, policy, hardware in CASES:
        data = {"model": model, "hardware": hardware, "batch_size": 64, "prompt_len": 128, "gen_len": 512,
                "policy": {"name": policy}}
        walls = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            wl = resolve_workload(data)  # loading the profile and building the cost model is part of a run
            sim = simulate(wl)
            walls.append(time.perf_counter() - start)
        simulated = sum(r.timing.simulated_layers for r in sim.steps)
        total = sum(r.timing.num_layers for r in sim.steps)
        predicted = "oom" if sim.oom_error else f"{sum(r.duration_s for r in sim.steps):.1f}"
        table.add_row(label, model, policy, hardware, str(len(sim.steps)), f"{simulated} / {total}",
                      f"{statistics.median(walls):.3f}", f"{min(walls):.3f}", predicted)
    Console(width=160).print(table)
    if args.fig9_workers:
        # The whole grid: every model, batch and policy of Fig. 9 (target: under 30 s on a 2-core machine).
        paper_figures.fig9(Console(width=200), args.fig9_workers)


if __name__ == "__main__":
    main()

"""Wall time of whole simulations on this machine (target: OPT-30B, b=64, s=128, n=512, accelerate, under 1 s)."""

from __future__ import annotations

import argparse
import platform
import statistics
import time

from rich.console import Console
from rich.table import Table

from alisa_sim.simulator import simulate
from alisa_sim.workload import resolve_workload

CASES = [
    # (label, model, policy, hardware); the first is the target case
    ("target", "opt-30b", "accelerate", "paper-h100-80g"),
    ("", "opt-30b", "zero", "paper-h100-80g"),
    ("", "opt-6.7b", "dense", "h200"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
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


if __name__ == "__main__":
    main()

"""Wall time of whole simulations on this machine: OPT-30B, b=64, s=128, n=512 (target under 0.5 s), a long-context
what-if (a LLaMA-3-8B-shaped model generating 100,000 tokens, target under 5 s) and the paper's full Fig. 9 grid
(150 simulations, target under 10 s on 2 processes). Each run includes loading the workload and building the policy
(planners included); the long case also builds the Result JSON."""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

from rich.console import Console
from rich.table import Table

from alisa_sim.results import build_result
from alisa_sim.simulator import simulate
from alisa_sim.workload import resolve_workload

import paper_figures  # benchmarks/ is on sys.path when this script runs

LLAMA3_8B = {"name": "llama-3-8b", "family": "llama", "hidden_size": 4096, "num_layers": 32, "num_heads": 32,
             "num_kv_heads": 8, "ffn_dim": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
             "tie_word_embeddings": False, "norm_eps": 1e-5, "rope_theta": 500000.0}
CASES = [
    # (label, model, policy, hardware, batch, gen_len); the first is the target case
    ("target", "opt-30b", "accelerate", "paper-h100-80g", 64, 512),
    ("", "opt-30b", "zero", "paper-h100-80g", 64, 512),
    ("", "opt-30b", "alisa", "paper-h100-80g", 64, 512),
    ("", "opt-6.7b", "dense", "h200", 64, 512),
    ("long context", LLAMA3_8B, "dense", "h200", 1, 100_000),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fig9-workers", type=int, default=2,
                        help="also simulate the paper's full Fig. 9 grid on this many processes (0: skip)")
    args = parser.parse_args()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    table = Table("case", "model", "policy", "hardware", "batch", "steps", "steps interpolated",
                  "layers simulated / total", "wall median (s)", "wall min (s)", "CPU min (s)", "predicted total (s)",
                  title=f"alisa-sim speed, s=128, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                        f"load average {load} at the start, median of {args.repeats}")
    for label, model, policy, hardware, batch, gen_len in CASES:
        data = {"model": model, "hardware": hardware, "batch_size": batch, "prompt_len": 128, "gen_len": gen_len,
                "policy": {"name": policy}}
        walls, cpus = [], []
        for _ in range(args.repeats if gen_len <= 512 else 1):
            start, cpu = time.perf_counter(), time.process_time()
            wl = resolve_workload(data)  # loading the profile and building the cost model is part of a run
            sim = simulate(wl)
            if gen_len > 512:
                build_result(sim)
            walls.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
        simulated = sum(r.timing.simulated_layers for r in sim.steps)
        total = sum(r.timing.num_layers for r in sim.steps)
        predicted = "oom" if sim.oom_error else f"{sum(r.duration_s for r in sim.steps):.1f}"
        table.add_row(label, wl.model.name, policy, hardware, str(batch), str(len(sim.steps)),
                      str(sim.interpolated_steps), f"{simulated} / {total}", f"{statistics.median(walls):.3f}",
                      f"{min(walls):.3f}", f"{min(cpus):.3f}", predicted)
    Console(width=200).print(table)
    if args.fig9_workers:
        # The whole grid: every model, batch and policy of Fig. 9 (target: under 10 s on 2 processes).
        paper_figures.fig9(Console(width=200), args.fig9_workers)


if __name__ == "__main__":
    main()

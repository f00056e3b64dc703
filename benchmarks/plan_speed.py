"""Wall and CPU time of `alisa-sim plan` on the paper's workloads (target under 2 s each, interpreter start included), and how
much of each planner's search the cost-model bounds and sampled steps spared."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # (workload file, policy override); the first is issue 18's slow case (27.7 s before the pruning)
    ("workloads/paper/fig9-opt30b-b64.yaml", "flexgen"),
    ("workloads/paper/fig9-opt30b-b64.yaml", None),
    ("workloads/paper/fig12-opt30b.yaml", None),
    ("workloads/paper/fig12-opt30b.yaml", "flexgen"),
    ("workloads/paper/fig11-attention-opt6.7b.yaml", None),
    ("workloads/opt-13b-zero-16g.yaml", "flexgen"),
    ("workloads/opt-13b-zero-16g.yaml", "alisa"),
    ("workloads/opt-30b-accelerate.yaml", None),
]


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished child processes (less disturbed by the shared machine's other tenants
    than wall time)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _plan_args(path: str, policy: str | None) -> list[str]:
    return ["plan", path, "--json"] + (["--policy", policy] if policy else [])


def _what_was_spared(plan: dict) -> str:
    if "candidates" in plan:  # FlexGen
        rows = plan["candidates"]
    else:  # ALISA: its choice and the alternatives; other policies have no search
        rows = [plan["chosen"], *plan["alternatives"]] if "chosen" in plan else []
    schedules = {json.dumps({k: v for k, v in row.items() if k != "what"}, sort_keys=True) for row in rows}
    simulated = {s for s in schedules if json.loads(s)["pruned"] is None}
    text = f"{len(simulated)} of {len(schedules)} candidates simulated in full" if rows else "no search"
    if search := plan.get("phase3_search"):
        if search["sampled_steps"]:
            text += (f"; Phase III: {search['pairs_timed']} of {search['pairs']} "
                     "(beta, step) pairs timed")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from alisa_sim.cli import main as sim_main

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    table = Table("workload", "policy", "process wall median (s)", "process CPU median (s)", "in-process median (s)",
                  "what the search spared",
                  title=f"alisa-sim plan, {platform.processor() or platform.machine()}, median of {args.repeats}, "
                        f"load average {load} at the start")
    for path, policy in CASES:
        walls, cpus, inside = [], [], []
        for _ in range(args.repeats):
            start, cpu = time.perf_counter(), _children_cpu_s()
            done = subprocess.run([sys.executable, "-m", "alisa_sim.cli", *_plan_args(path, policy)], cwd=ROOT,
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                  check=True)
            walls.append(time.perf_counter() - start)
            cpus.append(_children_cpu_s() - cpu)
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = sim_main(_plan_args(str(ROOT / path), policy))  # wherever the script is run from
            inside.append(time.perf_counter() - start)
            if code:
                raise SystemExit(f"alisa-sim plan {path} failed in-process (exit code {code})")
        plan = json.loads(done.stdout)
        table.add_row(path, policy or plan["policy"], f"{sorted(walls)[len(walls) // 2]:.2f}",
                      f"{sorted(cpus)[len(cpus) // 2]:.2f}", f"{sorted(inside)[len(inside) // 2]:.2f}",
                      _what_was_spared(plan))
    Console(width=160).print(table)


if __name__ == "__main__":
    main()

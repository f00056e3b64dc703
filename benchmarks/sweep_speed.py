"""Wall time of a whole sweep on the local process pool and on Ray, and a check that both give the same table.

    python benchmarks/sweep_speed.py [--sweep workloads/sweeps/fig9.yaml] [--workers 2] [--skip-ray]

Points whose policy this build does not register are left out (the table would only hold failed rows for them).
Ray is started locally, bound to 127.0.0.1, with `--workers` CPUs; its start-up is timed apart from the sweep.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alisa_sim.sweep import load_sweep, run_sweep
from alisa_sim.workload import POLICY_NAMES

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(ROOT / "workloads" / "sweeps" / "fig9.yaml"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args(argv)
    console = Console()
    _, points = load_sweep(args.sweep)
    left_out = sorted({p.workload["policy"]["name"] for p in points} - set(POLICY_NAMES))
    points = [p for p in points if p.workload["policy"]["name"] in POLICY_NAMES]
    base_dir = str(Path(args.sweep).resolve().parent)
    table = Table("backend", "workers", "points", "ok", "oom", "failed", "wall (s)",
                  title=f"{Path(args.sweep).name}: {len(points)} points"
                        + (f" (left out, not in this build: {', '.join(left_out)})" if left_out else ""))
    with tempfile.TemporaryDirectory() as folder:
        tables = {}
        runs = [("local", None)] + ([] if args.skip_ray else [("ray", None)])
        for backend, _ in runs:
            extra = ""
            if backend == "ray":
                import ray

                t0 = time.perf_counter()
                ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
                         _node_ip_address="127.0.0.1")
                extra = f" (+ {time.perf_counter() - t0:.1f} s Ray start)"
            try:
                out = Path(folder) / f"{backend}.csv"
                outcome = run_sweep(points, out, base_dir=base_dir, backend=backend, workers=args.workers,
                                    progress=sys.stderr.isatty())
            finally:
                if backend == "ray":
                    ray.shutdown()
            c = outcome.counts
            table.add_row(backend, str(args.workers), str(outcome.points), str(c["ok"]), str(c["oom"]),
                          str(c["failed"]), f"{outcome.wall_s:.1f}{extra}")
            tables[backend] = out.read_bytes()
        console.print(table)
        if len(tables) == 2:
            same = tables["local"] == tables["ray"]
            console.print("tables identical: " + ("[green]yes[/]" if same else "[red]NO[/]"))
            return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

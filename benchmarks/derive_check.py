"""Check of the datasheet route on the cards we measured: derive h100 from its datasheet with the curves of h200
alone (and h200 with h100's), simulate the paper's Fig. 9 grid and held-out workloads on the derived and on the
measured profile, and print the error of the derived profile's prefill and mean decode step (docs/hardware.md)."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alisa_sim.hardware_derive import DATASHEET_DIR, derive_from_file, profile_yaml
from alisa_sim.sweep import Point, SweepSpec, expand, point_id, read_table, run_sweep

FIG9 = Path(__file__).resolve().parent.parent / "workloads" / "sweeps" / "fig9.yaml"
# Not in Fig. 9: other lengths, models and policies (model, batch, prompt, generated, policy).
HELD_OUT = [("opt-6.7b", 1, 512, 64, "dense"), ("opt-6.7b", 32, 512, 64, "dense"),
            ("llama-13b", 16, 1024, 128, "vllm"), ("pythia-12b", 8, 256, 64, "accelerate"),
            ("opt-13b", 32, 1920, 64, "alisa"), ("llama-7b", 16, 512, 128, "h2o"),
            ("llama-33b", 4, 1024, 64, "streamingllm"), ("opt-30b", 32, 512, 32, "flexgen"),
            ("pythia-6.9b", 64, 128, 32, "dense"), ("llama-7b", 8, 4096, 32, "dense")]
CHECKS = [("h100", "h100-sxm.yaml", "h200"), ("h200", "h200-sxm.yaml", "h100")]  # measured, its datasheet, curves
METRICS = ("prefill_s", "decode_step_mean_s")
THRESHOLD_PCT = 15.0


def fig9_workloads(batches: list[int] | None = None) -> list[dict]:
    """The Fig. 9 grid's workloads (its models, policies and lengths; its batches or those given)."""
    import yaml

    spec = SweepSpec.model_validate(yaml.safe_load(FIG9.read_text()))
    return [p.workload for p in expand(spec) if batches is None or p.workload["batch_size"] in batches]


def held_out_workloads() -> list[dict]:
    return [{"model": m, "batch_size": b, "prompt_len": s, "gen_len": n, "policy": {"name": p}}
            for m, b, s, n, p in HELD_OUT]


def points_on(workloads: list[dict], hardware: str) -> list[Point]:
    points = []
    for workload in workloads:
        workload = {**workload, "hardware": hardware}
        points.append(Point(point_id(workload), workload))
    return points


def errors(measured_rows: list[dict], derived_rows: list[dict]) -> list[dict]:
    """Per workload: both statuses and, where both ran, the derived profile's error per metric (percent)."""
    out = []
    for meas, der in zip(measured_rows, derived_rows):
        row = {"workload": f"{meas['model']} b={meas['batch_size']} s={meas['prompt_len']} n={meas['gen_len']} "
                           f"{meas['policy']}", "status": (meas["status"], der["status"])}
        for metric in METRICS:
            ok = meas["status"] == der["status"] == "ok"
            row[metric] = 100 * (float(der[metric]) - float(meas[metric])) / float(meas[metric]) if ok else None
        out.append(row)
    return out


def summary(rows: list[dict]) -> dict:
    result = {"runs": sum(r[METRICS[0]] is not None for r in rows),
              "status_mismatch": sum(r["status"][0] != r["status"][1] for r in rows)}
    for metric in METRICS:
        values = [abs(r[metric]) for r in rows if r[metric] is not None]
        result[metric] = (sum(values) / len(values), max(values), sum(v <= THRESHOLD_PCT for v in values)) \
            if values else None
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worst", type=int, default=5, help="list this many worst workloads per check")
    parser.add_argument("--batches", help="comma-separated subset of Fig. 9's batches (default: all of 4-64)")
    parser.add_argument("--check", choices=[measured for measured, _, _ in CHECKS],
                        help="only the check of this measured profile (default: both)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    console = Console(width=160)
    table = Table("measured", "derived from", "workloads", "ran", "OOM differs", "prefill MAPE / worst / within 15%",
                  "decode step MAPE / worst / within 15%",
                  title="derived (datasheet + one other card's curves) vs measured profile, error of the derived, %")
    worst_lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for measured, sheet, curves in [c for c in CHECKS if args.check in (None, c[0])]:
            derived = Path(tmp) / f"{measured}-from-{curves}.yaml"
            derived.write_text(profile_yaml(derive_from_file(DATASHEET_DIR / sheet, [curves], derived.stem),
                                            "benchmarks/derive_check.py"))
            for name, workloads in (("Fig. 9", fig9_workloads(batches)), ("held out", held_out_workloads())):
                tables = []
                for hardware in (measured, str(derived)):
                    out = Path(tmp) / f"{Path(hardware).stem}-{name.replace(' ', '').replace('.', '')}.csv"
                    points = points_on(workloads, hardware)
                    run_sweep(points, out, workers=args.workers, progress=False)
                    done = read_table(out)
                    tables.append([done[p.id] for p in points])
                rows = errors(*tables)
                s = summary(rows)
                cells = ["-" if s[m] is None else f"{s[m][0]:.1f} / {s[m][1]:.1f} / {s[m][2]} of {s['runs']}"
                         for m in METRICS]
                table.add_row(measured, f"{sheet} + {curves}", name, str(s["runs"]), str(s["status_mismatch"]), *cells)
                ranked = sorted((r for r in rows if r[METRICS[1]] is not None), key=lambda r: -abs(r[METRICS[1]]))
                worst_lines += [f"{measured} from {curves}, {name}: {r['workload']}: prefill {r['prefill_s']:+.1f}%, "
                                f"decode step {r['decode_step_mean_s']:+.1f}%" for r in ranked[:args.worst]]
                worst_lines += [f"{measured} from {curves}, {name}: {r['workload']}: status measured {r['status'][0]}, "
                                f"derived {r['status'][1]}" for r in rows if r["status"][0] != r["status"][1]]
    console.print(table)
    for line in worst_lines:
        console.print(line)


if __name__ == "__main__":
    main()

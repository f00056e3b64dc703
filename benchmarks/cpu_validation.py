"""The CPU validation loop: the simulator's predictions against real runs on this machine's CPU.

1. `alisa-exec profile --device cpu --quick` measures the CPU into a profile.
2. A small model at a few batches and lengths, under each policy of `LOOP_POLICIES` that the executor runs
   (`alisa_exec.policies.EXEC_POLICIES`), run by `alisa-exec run --device cpu` (measured) and by `alisa-sim run`
   on that profile (predicted). A policy joins the loop by being added to `LOOP_POLICIES`.
3. `alisa-sim validate` over all pairs: the error of the measured profile as it is.
4. `alisa-sim calibrate` on the fit half of the runs, then `alisa-sim run` of the held-out half on the fitted
   profile and `alisa-sim validate` of those: the error a calibrated profile makes on runs it was not fitted to.

    python benchmarks/cpu_validation.py [--repeats N] [--out reports/validation/cpu] [--work reports/runs/...]

runs every loop in WORK/loop-<i>/ (all results, traces and HTML; git ignores reports/runs/) and keeps in OUT what is
committed: OUT/summary.json and OUT/README.md with the spread over the repeats, and per loop the measured and the
fitted profile and both validation.json files. tests/exec/test_validation_loop.py runs one loop.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import shutil
import statistics
import sys
from pathlib import Path

import yaml

from alisa_exec.cli import main as exec_main
from alisa_exec.policies import EXEC_POLICIES
from alisa_sim.calibrate import describe_values
from alisa_sim.cli import main as sim_main
from alisa_sim.workload import POLICY_NAMES

# A small OPT-style model in float32 (the executor's CPU dtype), its GEMMs near the quick CPU profile's grid. Its
# decode step is part weight streaming (50 MB of weights), part per-op host cost (about 27 eager ops per layer).
MODEL = dict(name="small-opt", family="opt", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=8, ffn_dim=2048,
             vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True, norm_eps=1e-5, dtype_bytes=4)
# (batch, prompt_len, gen_len, split): the fit half calibrates the profile, the held-out half checks it.
CASES = [
    (1, 32, 32, "fit"),
    (2, 64, 32, "holdout"),
    (4, 128, 32, "fit"),
    (8, 32, 32, "holdout"),
    (16, 64, 32, "fit"),
    (4, 256, 32, "holdout"),
]
METRIC = "decode_step_mean_s"
# The policies the loop validates, where the executor runs them. Each adds 2 x 6 CPU runs (about 8 s) to the CI
# test: add one once its CPU runs are checked to keep the loop within the bound of tests/exec/test_validation_loop.py.
LOOP_POLICIES = ("dense",)
KEPT = ("cpu-quick.yaml", "cpu-quick-fitted.yaml", "uncalibrated/validation.json", "calibrated/validation.json")
# What the calibration fits: the host time per GEMM / attention call (a CPU device runs the eager framework's per-op
# work and the kernels on the same cores, one after the other) and the GEMM and attention table scales (the quick
# profile times each GEMM on a cache-hot matrix; the model streams its weights), and the copy scale, which calibrate
# leaves alone while no policy in the loop moves KV or weights.
FIT_PARAMETERS = ("host", "gemm", "attention", "copy")
# Each workload is run this many times and the run with the least decode time kept: other work on the machine only
# ever slows a run down, so the fastest is the least disturbed measurement.
EXEC_TRIES = 2
# One torch thread, for the profile and the runs alike: on a 2-core machine shared with other work, two threads that
# wait on each other at every op's barrier turn any competing process into millisecond stalls (measured: quick-profile
# GEMMs of 10 us timed at 7 ms); one thread per core keeps both sides' timings repeatable.
THREADS = 1


def loop_policies() -> list[str]:
    """The policies of the loop that both sides run."""
    return [policy for policy in LOOP_POLICIES if policy in EXEC_POLICIES and policy in POLICY_NAMES]


def _call(main, argv: list[str]) -> str:
    """Run a command line in this process; its stdout, and an error naming the command when it fails."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {code}: {err.getvalue().strip()}")
    return out.getvalue()


@contextlib.contextmanager
def torch_threads(count: int):
    """Run torch on `count` threads meanwhile (profile and runs alike)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def run_loop(folder: Path, log=lambda _: None, threads: int = THREADS) -> dict:
    """One loop into `folder`; returns the uncalibrated and calibrated validation documents and the fit."""
    with torch_threads(threads):
        return _run_loop(folder, log)


def _run_loop(folder: Path, log) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    profile = folder / "cpu-quick.yaml"
    log("profiling the CPU (alisa-exec profile --device cpu --quick)")
    _call(exec_main, ["profile", "--device", "cpu", "--quick", "--out", str(profile)])
    split: dict[str, list[str]] = {"fit": [], "holdout": []}
    for batch, prompt_len, gen_len, part in CASES:
        for policy in loop_policies():
            name = f"{MODEL['name']}-b{batch}-s{prompt_len}-n{gen_len}-{policy}"
            workload = folder / "workloads" / f"{name}.yaml"
            workload.parent.mkdir(parents=True, exist_ok=True)
            workload.write_text(yaml.safe_dump({"model": MODEL, "hardware": str(profile.resolve()),
                                                "batch_size": batch, "prompt_len": prompt_len, "gen_len": gen_len,
                                                "policy": {"name": policy}}, sort_keys=False))
            log(f"{name}: alisa-exec run --device cpu (best of {EXEC_TRIES}), alisa-sim run")
            tries = [folder / "tries" / name / str(i) for i in range(EXEC_TRIES)]
            for attempt in tries:
                _call(exec_main, ["run", str(workload), "--device", "cpu", "--out", str(attempt)])
            best = min(tries, key=lambda t: json.loads((t / "result.json").read_text())["metrics"]["decode_s"])
            shutil.copytree(best, folder / "measured" / name)
            _call(sim_main, ["run", str(workload), "--out", str(folder / "predicted" / name)])
            split[part].append(name)
    measured = folder / "measured"
    uncalibrated = json.loads(_call(sim_main, ["validate", str(folder / "predicted"), str(measured), "--json",
                                               "--out", str(folder / "uncalibrated")]))
    fitted = folder / "cpu-quick-fitted.yaml"
    log("calibrating on the fit half")
    fit = json.loads(_call(sim_main, ["calibrate", *(str(measured / n / "result.json") for n in split["fit"]),
                                      "--hardware", str(profile), "--out", str(fitted), "--json",
                                      "--params", ",".join(FIT_PARAMETERS),
                                      "--holdout", *(str(measured / n / "result.json") for n in split["holdout"])]))
    for name in split["holdout"]:
        _call(sim_main, ["run", str(measured / name / "result.json"), "--hardware", str(fitted.resolve()),
                         "--out", str(folder / "predicted-fitted" / name)])
    calibrated = json.loads(_call(sim_main, [
        "validate", str(folder / "predicted-fitted"), *(str(measured / n / "result.json") for n in split["holdout"]),
        "--json", "--out", str(folder / "calibrated")]))
    return {"uncalibrated": uncalibrated, "calibrated": calibrated, "fit": fit}


def summarize(loops: list[dict]) -> dict:
    """Per metric and side (uncalibrated over all pairs, calibrated over the held-out ones): every loop's MAPE and
    worst error, and their spread."""
    out = {}
    for side in ("uncalibrated", "calibrated"):
        out[side] = {}
        for metric in loops[0][side]["summary"]:
            mapes = [loop[side]["summary"][metric]["mape"] for loop in loops]
            worsts = [loop[side]["summary"][metric]["worst"] for loop in loops]
            if None in mapes:
                continue
            out[side][metric] = {"mape": mapes, "worst": worsts, "mape_mean": statistics.fmean(mapes),
                                 "mape_max": max(mapes), "worst_max": max(worsts),
                                 "mape_stdev": statistics.stdev(mapes) if len(mapes) > 1 else 0.0}
    out["fitted"] = [loop["fit"]["values"] for loop in loops]
    return out


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"# CPU validation loop ({meta['date']})", "",
             f"Machine: {meta['cpu']}; {meta['versions']}; torch on {meta['torch_threads']} thread(s); "
             f"{meta['repeats']} loops of "
             f"`python benchmarks/cpu_validation.py`; policies {', '.join(meta['policies'])}; "
             f"{len(CASES)} workloads of {MODEL['name']} (batch, prompt, generated: "
             + ", ".join(f"{b}/{s}/{n}" for b, s, n, _ in CASES) + ").", "",
             "MAPE and worst absolute error in percent, min-max over the loops. Uncalibrated: the quick CPU profile "
             "as measured, all pairs. Calibrated: the profile fitted on the fit half, on the held-out half.", "",
             "| metric | uncalibrated MAPE | uncalibrated worst | calibrated MAPE | calibrated worst |",
             "|---|---|---|---|---|"]
    for metric in summary["uncalibrated"]:
        if metric == "peak_gpu_bytes":  # on the CPU device: the growth of resident memory, not comparable
            continue
        cells = []
        for side in ("uncalibrated", "calibrated"):
            s = summary[side].get(metric)
            cells += ["-", "-"] if s is None else [f"{min(s['mape']):.1f}-{max(s['mape']):.1f}",
                                                   f"{min(s['worst']):.1f}-{max(s['worst']):.1f}"]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += ["", "Peak memory is left out: on the CPU device the executor reports the growth of the process's "
              "resident memory, which the simulator's accounting does not model (validation.json has it).",
              "", "Fitted per loop: " + "; ".join(describe_values(values) for values in summary["fitted"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="reports/validation/cpu")
    parser.add_argument("--work", default="reports/runs/cpu-validation")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads for the profile and the runs")
    args = parser.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    loops = []
    for i in range(args.repeats):
        loop = run_loop(work / f"loop-{i}", log=lambda what: print(f"[loop {i}] {what}", file=sys.stderr),
                        threads=args.threads)
        loops.append(loop)
        print(f"loop {i}: decode step MAPE uncalibrated {loop['uncalibrated']['summary'][METRIC]['mape']:.1f}%, "
              f"calibrated (held out) {loop['calibrated']['summary'][METRIC]['mape']:.1f}%")
        for kept in KEPT:
            (out / f"loop-{i}" / kept).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(work / f"loop-{i}" / kept, out / f"loop-{i}" / kept)
    summary = summarize(loops)
    profile = yaml.safe_load((out / "loop-0" / "cpu-quick.yaml").read_text())
    meta = {"date": datetime.date.today().isoformat(), "cpu": profile["provenance"]["machine"],
            "versions": ", ".join(f"{k} {v}" for k, v in profile["provenance"]["software"].items()),
            "repeats": args.repeats, "policies": loop_policies(), "torch_threads": args.threads}
    (out / "summary.json").write_text(json.dumps({"meta": meta, **summary}, indent=1) + "\n")
    (out / "README.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

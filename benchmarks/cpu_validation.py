"""The validation loop: the simulator's predictions against real runs of every executor policy on this machine.

1. `alisa-exec profile --device DEVICE --quick --models ...` measures the device into a profile, its named ops also
   at the two models' layers, in one round before each try of the runs; the profile is the rounds' fastest figure
   of each row (`fastest_of`), as each point's measurement is its fastest try (or `--profile PATH` takes one).
2. `POINTS`: tiny OPT and LLaMA/GQA models, batch 1 to 32, prompt 32 to 512, under every policy variant of
   `VARIANTS` (dense, accelerate, flexgen with and without CPU attention, vLLM recompute and swap, ALISA in Phase
   I/II/III in the model's dtype and INT8 at sparsity 0.5 and 0.8, ALISA with the `k4-capped` selector in Phase I and
   II, H2O, StreamingLLM), memory budgets tight enough to force each variant's phase. Each point's workload is run by `alisa-exec run` (measured) and `alisa-sim run` on the
   profile (predicted), and their per-step traffic (bytes, token rows, phase) is compared: it must be equal. ALISA
   at kv_sparsity > 0 is predicted with the measured run's selection replayed (`selection_trace`): which tokens
   SWA picks, and so how many rows it fetches or recomputes, is the model's attention on the run's data, not the
   machine's; the same points predicted from the selection statistics instead (`predicted-stats/`) give the H2D
   error that costs, reported apart.
3. `alisa-sim validate` over all pairs: the error of the profile as measured, per variant and overall.
4. `alisa-sim calibrate` on the fit half of the points (every other one), `alisa-sim run` of the held-out half on the
   fitted profile and `alisa-sim validate` of those: the error a calibrated profile makes on runs it was not fitted to.

    python benchmarks/cpu_validation.py [--device cpu|cuda] [--profile PATH] [--points N] [--repeats N]
                                        [--out reports/validation/cpu] [--work reports/runs/cpu-validation]
    python benchmarks/cpu_validation.py --repredict WORK/loop-<i> --profile OTHER.yaml [--out DIR]

runs every loop in WORK/loop-<i>/ (all results, traces and HTML; git ignores reports/runs/) and keeps in OUT what is
committed: OUT/summary.json and OUT/README.md (a table per variant and overall, machine, date and versions), and per
loop the profile, the fitted profile and both validation.json files. tests/exec/test_validation_loop.py runs a few
points of it. `--repredict` predicts a finished loop's measured runs again from another profile and prints its
table (see `repredict`): how to tell whether a change to the profile or the cost model prices the runs better.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from alisa_exec.cli import main as exec_main
from alisa_exec.policies import EXEC_POLICIES
from alisa_exec.profiler import fastest_of, write_profile
from alisa_sim.calibrate import describe_values
from alisa_sim.cli import main as sim_main
from alisa_sim.selection_trace import replaying_selection
from alisa_sim.validate import summarize as summarize_pairs

# Tiny models, small enough that 28 points run in minutes on two cores, their shapes near the quick profile's grid.
MODELS = {
    "opt": dict(name="tiny-opt", family="opt", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4,
                ffn_dim=1024, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=True, norm_eps=1e-5),
    "gqa": dict(name="tiny-llama-gqa", family="llama", hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                ffn_dim=704, vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False, norm_eps=1e-5),
}
# The executor's dtype per device, and its size for the simulator's model.
DTYPES = {"cpu": ("float32", 4), "cuda": ("float16", 2)}
GEN_LEN = 16
# (model, batch, prompt_len) per variant, in order: --points N takes the first N. ALISA, H2O and StreamingLLM run
# their selection under the Triton interpreter on the CPU, so their shapes stay small.
WIDE = [("opt", 1, 512), ("gqa", 32, 64), ("gqa", 8, 256), ("opt", 16, 32)]
SMALL = [("gqa", 4, 128), ("opt", 1, 32), ("opt", 2, 64), ("gqa", 8, 32)]
ALISA = {"name": "alisa", "recompute": True}
PHASE_3 = {"p2": 4, "beta": 0.5}
# k4-capped: the choice per KV head from the step's query (it deletes nothing: no per-head recompute)
K4_CAPPED = {"name": "alisa", "kv_sparsity": 0.8, "selector": "k4-capped", "recompute": False}  # pinned: the planner would stay in Phase II on so short a run
# Pinned past the last decode step: on a quick profile measured on a busy machine the planner may start Phase III,
# and a Phase II variant is to measure Phase II.
PHASE_2 = {"p2": GEN_LEN}


@dataclass(frozen=True)
class Variant:
    """One policy configuration of the loop: its policy block, the memory budget (None: the hardware's; "tight":
    about the least the plan fits in, which forces offloading, Phase II, and vLLM preemptions), its shapes."""

    name: str
    policy: dict
    budget: str | None
    shapes: tuple


VARIANTS = (
    Variant("dense", {"name": "dense"}, None, (WIDE[0], WIDE[1])),
    Variant("accelerate", {"name": "accelerate"}, None, (WIDE[2], WIDE[3])),
    Variant("flexgen", {"name": "flexgen", "percent": [100, 0, 50, 50, 100, 0], "cpu_attention": False}, None,
            (WIDE[1], WIDE[0])),
    Variant("flexgen-cpu-attention", {"name": "flexgen", "percent": [100, 0, 50, 50, 100, 0], "cpu_attention": True},
            None, (WIDE[3], WIDE[2])),
    Variant("vllm-recompute", {"name": "vllm", "preemption_mode": "recompute", "block_size": 16, "swap_space": 0.05},
            "tight", (WIDE[2], WIDE[1])),
    Variant("vllm-swap", {"name": "vllm", "preemption_mode": "swap", "block_size": 16, "swap_space": 0.05}, "tight",
            (WIDE[1], WIDE[2])),
    Variant("alisa-0.5-phase-1", {**ALISA, "kv_sparsity": 0.5, "int8": False}, None, (SMALL[0], SMALL[1])),
    Variant("alisa-0.8-int8-phase-1", {**ALISA, "kv_sparsity": 0.8, "int8": True}, None, (SMALL[2], SMALL[3])),
    Variant("alisa-0.5-phase-2", {**ALISA, **PHASE_2, "kv_sparsity": 0.5, "int8": False}, "tight", (SMALL[1], SMALL[0])),
    Variant("alisa-0.8-int8-phase-2", {**ALISA, **PHASE_2, "kv_sparsity": 0.8, "int8": True}, "tight", (SMALL[3], SMALL[2])),
    Variant("alisa-0.5-phase-3", {**ALISA, **PHASE_3, "kv_sparsity": 0.5, "int8": False}, "tight",
            (SMALL[2], SMALL[1])),
    Variant("alisa-0.8-int8-phase-3", {**ALISA, **PHASE_3, "kv_sparsity": 0.8, "int8": True}, "tight",
            (SMALL[0], SMALL[3])),
    Variant("alisa-k4-capped-phase-1", {**K4_CAPPED, "int8": False}, None, (SMALL[1], SMALL[2])),
    Variant("alisa-k4-capped-int8-phase-2", {**K4_CAPPED, **PHASE_2, "int8": True}, "tight", (SMALL[0], SMALL[3])),
    Variant("h2o", {"name": "h2o", "kv_sparsity": 0.5}, None, (SMALL[0], SMALL[2])),
    Variant("streamingllm", {"name": "streamingllm", "kv_sparsity": 0.5}, None, (SMALL[3], SMALL[1])),
)
METRICS = ("decode_step_mean_s", "prefill_s", "throughput_tok_s")
METRIC = "decode_step_mean_s"
# Per step, what the simulator and the executor must count alike (docs/executor.md says where they cannot).
TRAFFIC_FIELDS = ("kind", "phase", "tokens", "sequences", "gpu_kv_bytes", "cpu_kv_bytes", "h2d_bytes", "d2h_bytes",
                  "fetched_tokens", "offloaded_tokens", "recomputed_tokens", "evicted_tokens", "preemptions",
                  "swapped_out_blocks", "swapped_in_blocks")
KEPT = ("profile.yaml", "profile-fitted.yaml", "uncalibrated/validation.json", "calibrated/validation.json")
# What the calibration fits: the host time per GEMM / attention call, the GEMM and attention table scales (the quick
# profile times cache-hot matrices; the model streams its weights) and the copy scale (the points move KV and weights).
FIT_PARAMETERS = ("host", "gemm", "attention", "copy")
# Each workload is run this many times (a pass over every point per try) and the run with the least total time kept:
# other work on the machine only ever slows a run down, so the fastest is the least disturbed measurement (its
# total, not its decode time alone: the prefill is one step, timed once a run, and a point validates both).
EXEC_TRIES = 3
# One torch thread, for the profile and the runs alike: on a 2-core machine shared with other work, two threads that
# wait on each other at every op's barrier turn any competing process into millisecond stalls (measured: quick-profile
# GEMMs of 10 us timed at 7 ms); one thread per core keeps both sides' timings repeatable.
THREADS = 1


@dataclass(frozen=True)
class Point:
    """One workload of the loop: a variant at one shape, in the fit or the held-out half."""

    variant: Variant
    model: str
    batch: int
    prompt_len: int
    split: str

    @property
    def name(self) -> str:
        return f"{self.variant.name}--{self.model}-b{self.batch}-s{self.prompt_len}-n{GEN_LEN}"


def points(per_variant: int | None = None, variants=VARIANTS) -> list[Point]:
    """The loop's points: at most `per_variant` shapes of each variant the executor runs, alternately fit and
    held out."""
    chosen = [(variant, shape) for variant in variants if variant.policy["name"] in EXEC_POLICIES
              for shape in variant.shapes[:per_variant]]
    return [Point(variant, model, batch, prompt_len, "fit" if i % 2 == 0 else "holdout")
            for i, (variant, (model, batch, prompt_len)) in enumerate(chosen)]


# The machine-speed reference: a fixed mix of the executor's ops, timed while the profile is measured and before each
# run. Its ratio says how much slower (> 1) or faster the machine was at a point than while it was profiled; with
# its correlation to the points' errors it tells a machine that drifts from a profile that misprices.
REFERENCE_POOL_BYTES = 64 * 2**20  # the decode GEMM's weights rotate over more than a last-level cache


def machine_reference(device: str) -> Callable[[], float]:
    """The reference mix on `device` and this process's threads, its inputs built once: each call times it, in
    seconds (a decode GEMM over streamed weights, a prefill GEMM, a decode attention and a norm, each the median of
    its repetitions)."""
    import torch

    from alisa_exec import ops
    from alisa_exec.profiler import Bench, distinct_views, in_turn

    dev = torch.device(device)
    bench, linear = Bench(dev, reps=15), torch.nn.Linear(256, 1024, bias=False, device=dev)
    pool = torch.randn(REFERENCE_POOL_BYTES // 4, device=dev)
    weights = in_turn([view.view(1024, 256) for view in distinct_views(pool, 256 * 1024)])
    x1, x2048 = torch.randn(1, 1, 256, device=dev), torch.randn(1, 2048, 256, device=dev)
    q, keys = torch.randn(8, 1, 8, 32, device=dev), torch.randn(8, 2, 256, 32, device=dev)
    norm = torch.nn.LayerNorm(256, device=dev)
    mix = (lambda: ops.project(linear, x1, weights()), lambda: ops.project(linear, x2048),
           lambda: ops.rows_attention(q, keys, keys), lambda: ops.norm(norm, x1))
    return lambda: sum(bench.time_s(fn) for fn in mix)


def _profile_apart(argv: list[str]) -> None:
    """`alisa-exec profile` in a process of its own, on this process's torch threads: its streamed-weight pools
    would otherwise stay in this process's heap, taken from the host memory the runs' plans may use."""
    import subprocess

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    done = subprocess.run([sys.executable, "-m", "alisa_exec.cli", *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"alisa-exec {' '.join(argv)} exited {done.returncode}: {done.stderr.strip()}")


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


def workload_data(point: Point, profile: Path, device: str, gpu_gb: float | None = None) -> dict:
    policy = dict(point.variant.policy)
    if policy["name"] == "flexgen":
        policy.update(gpu_batch_size=point.batch, num_gpu_batches=1)
    data = {"model": {**MODELS[point.model], "dtype_bytes": DTYPES[device][1]}, "hardware": str(profile.resolve()),
            "batch_size": point.batch, "prompt_len": point.prompt_len, "gen_len": GEN_LEN, "policy": policy}
    if gpu_gb is not None:
        data["memory"] = {"gpu_gb": gpu_gb}
    return data


def tight_gpu_gb(point: Point, profile: Path, device: str) -> float:
    """About the least memory.gpu_gb the executor's plan of the point fits in (a bisection in log space)."""
    import torch

    from alisa_exec import executor
    from alisa_sim.errors import SpecError
    from alisa_sim.workload import resolve_workload

    low, high = 1e-5, 10.0
    for _ in range(18):
        middle = (low * high) ** 0.5
        try:
            executor.plan_run(resolve_workload(workload_data(point, profile, device, middle)), torch.device(device),
                              getattr(torch, DTYPES[device][0]))
            high = middle
        except SpecError:
            low = middle
    return high


def traffic_differences(predicted: dict, measured: dict) -> list[str]:
    """Where two Results' steps differ in what they count (empty when the traffic is equal)."""
    sim, ex = predicted["steps"], measured["steps"]
    if len(sim) != len(ex):
        return [f"{len(sim)} simulated steps, {len(ex)} executed"]
    return [f"step {i} {field}: sim {s.get(field, 0)} exec {e.get(field, 0)}" for i, (s, e) in enumerate(zip(sim, ex))
            for field in TRAFFIC_FIELDS if s.get(field, 0) != e.get(field, 0)]


def total_h2d_error_pct(predicted: dict, measured: dict) -> float:
    """Error of a run's total H2D payload bytes, in percent of the measured ones."""
    want = sum(step.get("h2d_bytes", 0) for step in measured["steps"])
    have = sum(step.get("h2d_bytes", 0) for step in predicted["steps"])
    return 100.0 * (have - want) / want if want else 0.0


def run_loop(folder: Path, selected: list[Point] | None = None, device: str = "cpu", profile: Path | None = None,
             log=lambda _: None, threads: int = THREADS, calibrate: bool = True) -> dict:
    """One loop into `folder`; returns the uncalibrated and calibrated validation documents, the fit, the traffic
    differences per point and the points' variants. Without `calibrate`, the loop stops after the uncalibrated
    validation (calibrated None, fit empty)."""
    with torch_threads(threads):
        return _run_loop(folder, points() if selected is None else selected, device, profile, log, calibrate)


def _run_loop(folder: Path, selected: list[Point], device: str, given: Path | None, log, calibrate: bool) -> dict:
    given_profile = given.read_bytes() if given is not None else None  # it may be a previous loop's, in `folder`
    if folder.exists():
        shutil.rmtree(folder)  # a previous loop's runs: this loop measures and predicts every point afresh
    folder.mkdir(parents=True)
    profile = folder / "profile.yaml"
    if given is None:
        # The named ops also at the loop's two models' layers (their head layouts, widths and GEMMs).
        specs = []
        for key in sorted({point.model for point in selected}):
            spec = folder / "models" / f"{key}.yaml"
            spec.parent.mkdir(parents=True, exist_ok=True)
            spec.write_text(yaml.safe_dump({"model": MODELS[key]}, sort_keys=False))
            specs.append(str(spec))
    reference_s = machine_reference(device)
    rounds: list[Path] = []
    profile_speeds: list[float] = []

    def profile_round() -> None:
        """One round of the profile, measured apart, with the reference mix timed around it."""
        rounds.append(folder / "profile-rounds" / f"round-{len(rounds)}.yaml")
        rounds[-1].parent.mkdir(parents=True, exist_ok=True)
        command = ["profile", "--device", device, "--quick", "--models", ",".join(specs), "--out", str(rounds[-1])]
        log(f"profiling, round {len(rounds)} of {EXEC_TRIES} (alisa-exec {' '.join(command)})")
        before = reference_s()
        _profile_apart(command)
        profile_speeds.append((before + reference_s()) / 2)

    if given is None:
        profile_round()
        shutil.copyfile(rounds[0], profile)  # the runs plan from it; the plans do not depend on its times
    else:  # when the given profile was measured is unknown: the speed now stands for it
        profile.write_bytes(given_profile)
        profile_speeds.append(reference_s())
    split: dict[str, list[str]] = {"fit": [], "holdout": []}
    traffic: dict[str, list[str]] = {}
    workloads, documents = {}, {}
    for point in selected:
        gpu_gb = tight_gpu_gb(point, profile, device) if point.variant.budget == "tight" else None
        documents[point.name] = workload_data(point, profile, device, gpu_gb)
        workloads[point.name] = folder / "workloads" / f"{point.name}.yaml"
        workloads[point.name].parent.mkdir(parents=True, exist_ok=True)
        workloads[point.name].write_text(yaml.safe_dump(documents[point.name], sort_keys=False))
    # Each try runs every point once: a slow spell of the machine then costs a point one try, not all of them. A
    # measured profile is measured in as many rounds, one before each try, and each of its rows is the fastest
    # round's: the runs' kept try and the profile's rows are then both the least disturbed of the same spells.
    speed: dict[str, list[float]] = {point.name: [] for point in selected}
    for attempt in range(EXEC_TRIES):
        if given is None and attempt > 0:
            profile_round()
        for point in selected:
            log(f"{point.name}: alisa-exec run --device {device} (try {attempt + 1} of {EXEC_TRIES})")
            speed[point.name].append(reference_s())
            _call(exec_main, ["run", str(workloads[point.name]), "--device", device, "--dtype", DTYPES[device][0],
                              "--out", str(folder / "tries" / point.name / str(attempt))])
    if given is None:
        write_profile(fastest_of([yaml.safe_load(path.read_text()) for path in rounds]), profile)
    reference_profile = min(profile_speeds)
    replays, stats_h2d, slowdown = {}, {}, {}
    for point in selected:
        name = point.name
        tries = [folder / "tries" / name / str(i) for i in range(EXEC_TRIES)]
        best = min(range(EXEC_TRIES),
                   key=lambda i: json.loads((tries[i] / "result.json").read_text())["metrics"]["total_s"])
        slowdown[name] = speed[name][best] / reference_profile
        shutil.copytree(tries[best], folder / "measured" / name)
        measured_file = folder / "measured" / name / "result.json"
        measured_result = json.loads(measured_file.read_text())
        replayed = replaying_selection(documents[name], measured_file.resolve())
        replays[name] = workloads[name]
        if replayed is not documents[name]:
            replays[name] = folder / "workloads-replayed" / f"{name}.yaml"
            replays[name].parent.mkdir(parents=True, exist_ok=True)
            replays[name].write_text(yaml.safe_dump(replayed, sort_keys=False))
            _call(sim_main, ["run", str(workloads[name]), "--out", str(folder / "predicted-stats" / name)])
            stats_h2d[name] = total_h2d_error_pct(
                json.loads((folder / "predicted-stats" / name / "result.json").read_text()), measured_result)
        _call(sim_main, ["run", str(replays[name]), "--out", str(folder / "predicted" / name)])
        traffic[name] = traffic_differences(json.loads((folder / "predicted" / name / "result.json").read_text()),
                                            measured_result)
        split[point.split].append(name)
    measured = folder / "measured"
    uncalibrated = json.loads(_call(sim_main, ["validate", str(folder / "predicted"), str(measured), "--json",
                                               "--out", str(folder / "uncalibrated")]))
    loop = {"uncalibrated": uncalibrated, "calibrated": None, "fit": {}, "traffic": traffic,
            "stats_h2d_error_pct": stats_h2d, "variants": {p.name: p.variant.name for p in selected},
            "machine_slowdown": slowdown}
    if not calibrate:
        return loop
    fitted = folder / "profile-fitted.yaml"
    log("calibrating on the fit half")
    try:
        fit = json.loads(_call(sim_main, ["calibrate", *(str(measured / n / "result.json") for n in split["fit"]),
                                          "--hardware", str(profile), "--out", str(fitted), "--json",
                                          "--params", ",".join(FIT_PARAMETERS), "--holdout",
                                          *(str(measured / n / "result.json") for n in split["holdout"])]))
    except RuntimeError as refused:  # calibrate refuses a fit that is worse than the profile as measured
        return {**loop, "fit": {"refused": str(refused)}}
    for name in split["holdout"]:
        _call(sim_main, ["run", str(replays[name]), "--hardware", str(fitted.resolve()),
                         "--out", str(folder / "predicted-fitted" / name)])
    calibrated = json.loads(_call(sim_main, [
        "validate", str(folder / "predicted-fitted"), *(str(measured / n / "result.json") for n in split["holdout"]),
        "--json", "--out", str(folder / "calibrated")]))
    return {**loop, "calibrated": calibrated, "fit": fit}


def repredict(loop_folder: Path, profile: Path, out: Path) -> dict:
    """A finished loop's measured runs predicted again from another profile: each point's workload (its replayed
    selection included) by `alisa-sim run` on `profile` into OUT/predicted/, then `alisa-sim validate` into
    OUT/validation/. Nothing is measured again, so two ways of pricing the executor's ops are compared on the same
    runs, which on a machine whose speed moves between loops is the one fair comparison. Returns the validation."""
    measured = loop_folder / "measured"
    if not measured.is_dir() or not any(measured.iterdir()):
        raise FileNotFoundError(f"{loop_folder} holds no measured runs (a loop's WORK/loop-<i> folder)")
    if out.exists():
        shutil.rmtree(out)
    for run in sorted(path.name for path in measured.iterdir()):
        replayed = loop_folder / "workloads-replayed" / f"{run}.yaml"
        source = replayed if replayed.is_file() else loop_folder / "workloads" / f"{run}.yaml"
        document = {**yaml.safe_load(source.read_text()), "hardware": str(profile.resolve())}
        workload = out / "workloads" / f"{run}.yaml"
        workload.parent.mkdir(parents=True, exist_ok=True)
        workload.write_text(yaml.safe_dump(document, sort_keys=False))
        _call(sim_main, ["run", str(workload), "--out", str(out / "predicted" / run)])
    return json.loads(_call(sim_main, ["validate", str(out / "predicted"), str(measured), "--json",
                                       "--out", str(out / "validation")]))


def repredicted_table(validation: dict) -> str:
    """The metrics' MAPE and worst error, and predicted over measured busy seconds by op kind, of a repredict."""
    lines = ["| metric | MAPE | worst |", "|---|---|---|"]
    lines += [f"| {metric} | {validation['summary'][metric]['mape']:.1f}% | {validation['summary'][metric]['worst']:.1f}% |"
              for metric in METRICS]
    lines += ["", "| op kind | predicted / measured |", "|---|---|"]
    lines += [f"| {kind} | x{row['ratio']:.2f} |" for kind, row in validation["breakdown"].items()]
    return "\n".join(lines)


def by_variant(loop: dict, side: str) -> dict[str, dict]:
    """One side's summary per variant and overall ("all")."""
    document = loop[side]
    if document is None:
        return {}
    groups: dict[str, list[dict]] = {"all": document["pairs"]}
    for pair in document["pairs"]:
        groups.setdefault(loop["variants"][pair["label"]], []).append(pair)
    return {group: summarize_pairs(pairs) for group, pairs in groups.items()}


def slowdown_error_correlation(loop: dict) -> float | None:
    """Pearson's r between the machine's slowdown at each point's kept run and the point's signed uncalibrated
    decode-step error (near -1: the error is the machine's drift)."""
    import numpy as np

    pairs = [(loop["machine_slowdown"][p["label"]], p["metrics"][METRIC]["error_pct"])
             for p in loop["uncalibrated"]["pairs"] if p["metrics"].get(METRIC, {}).get("error_pct") is not None]
    if len(pairs) < 3:
        return None
    slowdown, error = np.array(pairs).T
    return float(np.corrcoef(slowdown, error)[0, 1]) if slowdown.std() > 0 and error.std() > 0 else None


def reproducibility(loops: list[dict]) -> dict[str, dict]:
    """Per metric, how far each later loop's measurement of a point lies from the first loop's (MAPE, worst and the
    median ratio, over the points all loops measured), and the floor that spread puts under any one profile's error:
    per point the least mean absolute percentage error one predicted value can have against every loop's
    measurement (a value at one of the measurements minimises it), averaged over the points."""
    import numpy as np

    measured = [{p["label"]: p["metrics"] for p in loop["uncalibrated"]["pairs"]} for loop in loops
                if loop["uncalibrated"]]
    if len(measured) < 2:
        return {}
    out = {}
    for metric in METRICS:
        runs = [np.array([loop[label][metric]["measured"] for loop in measured]) for label in measured[0]
                if all(loop.get(label, {}).get(metric, {}).get("measured") for loop in measured)]
        if not runs:
            continue
        ratios = np.array([r[1:] / r[0] for r in runs]).ravel()
        errors = 100.0 * np.abs(ratios - 1.0)
        floor = [min(np.mean(np.abs(value - r) / r) for value in r) for r in runs]
        out[metric] = {"mape": float(errors.mean()), "worst": float(errors.max()),
                       "median_ratio": float(np.median(ratios)), "floor_mape": 100.0 * float(np.mean(floor)),
                       "points": len(runs)}
    return out


def summarize(loops: list[dict]) -> dict:
    """Per side (uncalibrated over all pairs, calibrated over the held-out ones), group and metric: every loop's
    MAPE and worst error and their spread; the traffic differences; the fitted values."""
    out = {}
    for side in ("uncalibrated", "calibrated"):
        per_loop = [by_variant(loop, side) for loop in loops]
        out[side] = {}
        for group in dict.fromkeys(g for summary in per_loop for g in summary):
            out[side][group] = {}
            for metric in METRICS:
                found = [s[group][metric] for s in per_loop if group in s and s[group][metric]["mape"] is not None]
                if not found:
                    continue
                mapes, worsts = [f["mape"] for f in found], [f["worst"] for f in found]
                out[side][group][metric] = {"mape": mapes, "worst": worsts, "mape_mean": statistics.fmean(mapes),
                                            "mape_max": max(mapes), "worst_max": max(worsts),
                                            "worst_pair": found[worsts.index(max(worsts))]["worst_pair"]}
    out["traffic_differences"] = {name: diffs for loop in loops for name, diffs in loop["traffic"].items() if diffs}
    stats = {}
    for loop in loops:
        for name, error in loop["stats_h2d_error_pct"].items():
            stats.setdefault(loop["variants"][name], []).append(error)
    out["stats_h2d_error_pct"] = stats
    out["breakdown"] = [loop["uncalibrated"].get("breakdown", {}) for loop in loops if loop["uncalibrated"]]
    out["machine_slowdown"] = [loop["machine_slowdown"] for loop in loops]
    out["slowdown_error_correlation"] = [slowdown_error_correlation(loop) for loop in loops]
    out["reproducibility"] = reproducibility(loops)
    out["fitted"] = [loop["fit"].get("values") for loop in loops]
    out["refused"] = [loop["fit"]["refused"] for loop in loops if "refused" in loop["fit"]]
    return out


def _cell(summary: dict, side: str, group: str, metric: str) -> str:
    s = summary[side].get(group, {}).get(metric)
    if s is None:
        return "- | -"
    return f"{min(s['mape']):.1f}-{max(s['mape']):.1f} | {min(s['worst']):.1f}-{max(s['worst']):.1f}"


def markdown(summary: dict, meta: dict) -> str:
    lines = [f"# Validation loop on {meta['device']} ({meta['date']})", "",
             f"Machine: {meta['machine']}; {meta['versions']}; torch on {meta['torch_threads']} thread(s); "
             f"{meta['repeats']} loop(s) of `python benchmarks/cpu_validation.py {meta['argv']}`; "
             f"{meta['points']} points ({', '.join(f'{m} {s}' for m, s in MODELS.items())}; {GEN_LEN} generated).",
             "", "MAPE and worst absolute error in percent, min-max over the loops. Uncalibrated: the quick profile "
             "as measured, all points. Calibrated: the profile fitted on every other point, on the others (held "
             "out).", ""]
    differing = summary["traffic_differences"]
    lines += ["Traffic (per-step bytes, token rows, phase): equal on every point." if not differing else
              f"Traffic differs on {len(differing)} point(s): " + "; ".join(
                  f"{name}: {diffs[0]}" for name, diffs in differing.items()), ""]
    if summary["stats_h2d_error_pct"]:
        lines += ["ALISA at kv_sparsity > 0 is predicted with each run's selection replayed (`selection_trace`). "
                  "Predicted from the selection statistics instead, its total H2D bytes are off by " + "; ".join(
                      f"{variant} {min(errors):+.1f} to {max(errors):+.1f}%"
                      for variant, errors in summary["stats_h2d_error_pct"].items()) + " (per point).", ""]
    slowdowns = [ratio for loop in summary["machine_slowdown"] for ratio in loop.values()]
    if slowdowns:
        correlations = [r for r in summary["slowdown_error_correlation"] if r is not None]
        lines += ["Machine speed: a fixed mix of the executor's ops (`machine_reference`), timed around each "
                  "profile round and before each run, took "
                  f"x{min(slowdowns):.2f}-{max(slowdowns):.2f} (median x{statistics.median(slowdowns):.2f}) of its "
                  "fastest profile round's seconds before the kept runs. "
                  + (f"Pearson's r of that slowdown with the signed decode-step error: "
                     f"{', '.join(f'{r:+.2f}' for r in correlations)} (per loop)." if correlations else ""), ""]
    if summary.get("reproducibility"):
        lines += ["Reproducibility: the same points measured in a later loop against the first loop, "
                  + "; ".join(f"{metric} MAPE {r['mape']:.1f}% (worst {r['worst']:.1f}%, median ratio "
                              f"x{r['median_ratio']:.2f}, {r['points']} points; one prediction per point can come "
                              f"no closer to every loop's runs than {r['floor_mape']:.1f}% MAPE)"
                              for metric, r in summary["reproducibility"].items()) + ".", ""]
    if summary["refused"]:
        lines += ["Calibration refused: " + "; ".join(summary["refused"]), ""]
    groups = list(summary["uncalibrated"])
    for metric in METRICS:
        lines += [f"## {metric}", "", "| variant | uncalibrated MAPE | worst | held-out MAPE | worst |",
                  "|---|---|---|---|---|"]
        lines += [f"| {group} | {_cell(summary, 'uncalibrated', group, metric)} | "
                  f"{_cell(summary, 'calibrated', group, metric)} |" for group in groups[1:] + groups[:1]]
        lines.append("")
    breakdowns = [loop for loop in summary["breakdown"] if loop]
    if breakdowns:
        lines += ["## Where the time goes", "", "Busy seconds by op kind over all points, uncalibrated: predicted / "
                  "measured per loop (idle: the compute track waiting on copies or the host; gemm and elementwise "
                  "summed, as the executor's projection spans hold their norms and activations).", "",
                  "| op kind | " + " | ".join(f"loop {i}" for i in range(len(breakdowns))) + " |",
                  "|---|" + "---|" * len(breakdowns)]
        for kind in dict.fromkeys(kind for loop in breakdowns for kind in loop):
            cells = ["-" if loop.get(kind, {}).get("ratio") is None else f"x{loop[kind]['ratio']:.2f}"
                     for loop in breakdowns]
            lines.append(f"| {kind} | " + " | ".join(cells) + " |")
        lines.append("")
    fitted = [describe_values(values) for values in summary["fitted"] if values]
    if fitted:
        lines += ["Fitted per loop: " + "; ".join(fitted), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=tuple(DTYPES), default="cpu")
    parser.add_argument("--profile", help="use this hardware profile (measure none)")
    parser.add_argument("--points", type=int, help="at most N workloads per variant (default: all)")
    parser.add_argument("--variants", help="comma-separated variant names (default: all): "
                                           + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", help="default reports/validation/cpu (with --repredict: LOOP/repredicted)")
    parser.add_argument("--work", default="reports/runs/cpu-validation")
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads for the profile and the runs")
    parser.add_argument("--repredict", metavar="LOOP", help="run nothing: predict the measured runs of a finished "
                        "loop's folder (WORK/loop-<i>) again from --profile, into --out (default LOOP/repredicted)")
    args = parser.parse_args(argv)
    if args.profile and not Path(args.profile).is_file():
        print(f"error: no profile {args.profile}", file=sys.stderr)
        return 2
    if args.repredict:
        if not args.profile:
            print("error: --repredict needs the --profile to predict from", file=sys.stderr)
            return 2
        loop_folder = Path(args.repredict)
        out = Path(args.out) if args.out else loop_folder / "repredicted"
        try:
            validation = repredict(loop_folder, Path(args.profile), out)
        except (FileNotFoundError, RuntimeError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(repredicted_table(validation))
        return 0
    if args.points is not None and args.points < 1:
        print("error: --points must be at least 1", file=sys.stderr)
        return 2
    by_name = {v.name: v for v in VARIANTS}
    names = args.variants.split(",") if args.variants else list(by_name)
    unknown = [name for name in names if name not in by_name]
    if unknown:
        print(f"error: unknown variants {', '.join(unknown)} (known: {', '.join(by_name)})", file=sys.stderr)
        return 2
    out, work = Path(args.out or "reports/validation/cpu"), Path(args.work)
    selected = points(args.points, [by_name[name] for name in names])
    loops = []
    for i in range(args.repeats):
        loop = run_loop(work / f"loop-{i}", selected, args.device, Path(args.profile) if args.profile else None,
                        log=lambda what: print(f"[loop {i}] {what}", file=sys.stderr), threads=args.threads)
        loops.append(loop)
        held_out = loop["calibrated"]["summary"][METRIC]["mape"] if loop["calibrated"] else None
        print(f"loop {i}: decode step MAPE uncalibrated {loop['uncalibrated']['summary'][METRIC]['mape']:.1f}%, "
              f"calibrated (held out) " + (f"{held_out:.1f}%" if held_out is not None else "refused"))
        for kept in KEPT:
            if (work / f"loop-{i}" / kept).is_file():
                (out / f"loop-{i}" / kept).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(work / f"loop-{i}" / kept, out / f"loop-{i}" / kept)
    summary = summarize(loops)
    profile = yaml.safe_load((work / "loop-0" / "profile.yaml").read_text())
    provenance = profile.get("provenance", {})
    meta = {"date": datetime.date.today().isoformat(), "device": args.device,
            "machine": provenance.get("machine", profile.get("name")),
            "versions": ", ".join(f"{k} {v}" for k, v in provenance.get("software", {}).items()),
            "repeats": args.repeats, "points": len(selected), "torch_threads": args.threads,
            "argv": " ".join(argv if argv is not None else sys.argv[1:])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"meta": meta, **summary}, indent=1) + "\n")
    (out / "README.md").write_text(markdown(summary, meta))
    print(markdown(summary, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())

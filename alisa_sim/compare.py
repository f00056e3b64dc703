"""`alisa-sim compare WORKLOAD.yaml --policies alisa,flexgen,vllm [--batches 8,32,64]`: one workload under several
policies and batch sizes, simulated side by side: a table with ratios against a baseline policy, a plotly page, the
Result JSON of every run, and `--json` with vLLM's benchmark key names where they exist.

The workload file's policy keeps its knobs when it is among the compared ones; the others run with their defaults
(and their planners). A `--set policy.KNOB=...` applies to every compared policy that has that knob.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alisa_sim.errors import SpecError, load_json_file, load_yaml_file
from alisa_sim.overrides import add_set_argument, parse_assignment
from alisa_sim.provenance import default_label
from alisa_sim.results import build_result, write_json_atomic
from alisa_sim.simulator import simulate
from alisa_sim.sweep import _policy_fields
from alisa_sim.units import gb, gib, memory_names, result_on_cpu_device
from alisa_sim.workload import POLICY_NAMES, load_workload


def _names(text: str, flag: str) -> list[str]:
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise SpecError(f"{flag}: no values given")
    return values


def parse_batches(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        batches = [int(value) for value in _names(text, "--batches")]
    except ValueError:
        raise SpecError(f"--batches: {text!r} is not a comma-separated list of integers") from None
    if min(batches) < 1:
        raise SpecError("--batches: batch sizes must be at least 1")
    return batches


def file_policy(path: str | Path) -> dict:
    """The policy mapping the workload file (or plan / Result JSON) names."""
    path = Path(path)
    data = load_json_file(path, "plan").get("workload") if path.suffix == ".json" \
        else load_yaml_file(path, "workload")
    policy = data.get("policy") if isinstance(data, dict) else None
    return policy if isinstance(policy, dict) else {}


def policy_overrides(policy: str, assignments: list[str]) -> tuple[list[str], list[str]]:
    """The --set assignments that apply to `policy` and those skipped (a policy knob it does not have)."""
    fields = _policy_fields(policy) or set()
    kept, skipped = [], []
    for text in assignments:
        path, _ = parse_assignment(text)
        is_knob = path[0] == "policy" and len(path) > 1
        (skipped if is_knob and path[1] not in fields else kept).append(text)
    return kept, skipped


def vllm_keys(workload: dict, metrics: dict) -> dict:
    """The run in the key names of vLLM's benchmarks: benchmark_throughput's JSON (tokens_per_second counts prompt
    and output tokens) and benchmark_serving's latency and output-throughput keys (every request of the batch gets
    its first token when the batched prefill ends)."""
    requests = workload["batch_size"]
    total_tokens = requests * (workload["prompt_len"] + workload["gen_len"])
    elapsed = metrics["total_s"]
    step = metrics["decode_step_s"]
    return {"elapsed_time": elapsed, "num_requests": requests, "total_num_tokens": total_tokens,
            "requests_per_second": requests / elapsed, "tokens_per_second": total_tokens / elapsed,
            "output_throughput": metrics["throughput_tok_s"], "mean_ttft_ms": metrics["prefill_s"] * 1e3,
            "mean_tpot_ms": step["mean"] * 1e3, "median_tpot_ms": step["p50"] * 1e3, "p90_tpot_ms": step["p90"] * 1e3}


def run_compare(path: str, policies: list[str], batches: list[int] | None, baseline: str, hardware: str | None,
                assignments: list[str], label: str) -> tuple[dict, list[dict]]:
    """The comparison document and the Result of every run (one per policy and batch)."""
    own = file_policy(path)
    applied = {policy: policy_overrides(policy, assignments) for policy in policies}
    skipped_notes = [f"{policy}: --set {text} (no such knob)" for policy, (_, skipped) in applied.items()
                     for text in skipped]
    rows, results = [], []
    for batch in batches or [None]:
        for policy in policies:
            sets = applied[policy][0] + ([f"batch_size={batch}"] if batch is not None else [])
            wl = load_workload(path, hardware=hardware, policy=None if own.get("name") == policy else policy,
                               overrides=sets)
            result = {"label": label, **build_result(simulate(wl))}
            results.append(result)
            m = result["metrics"]
            row = {"policy": policy, "batch_size": wl.workload.batch_size, "oom": bool(m.get("oom")),
                   "reason": m.get("error"), "metrics": {k: v for k, v in m.items() if k != "error"}}
            if not row["oom"]:
                row["vllm"] = vllm_keys(result["workload"], m)
            rows.append(row)
    by_key = {(row["policy"], row["batch_size"]): row for row in rows}
    for row in rows:
        base = by_key.get((baseline, row["batch_size"]))
        ok = not row["oom"] and base is not None and not base["oom"]
        row["vs_baseline"] = {
            "throughput_x": row["metrics"]["throughput_tok_s"] / base["metrics"]["throughput_tok_s"] if ok else None,
            "decode_step_speedup_x": (base["metrics"]["decode_step_s"]["mean"] / row["metrics"]["decode_step_s"]["mean"]
                                      if ok and row["metrics"]["decode_step_s"]["mean"] else None)}
    first = results[0]
    document = {"label": label, "workload": str(path), "model": first["model"], "hardware": first["hardware"],
                "baseline": baseline, "policies": policies, "batches": sorted({row["batch_size"] for row in rows}),
                "skipped_overrides": skipped_notes, "run": first["run"], "runs": rows,
                "units": {"*_bytes": "bytes", "*_s": "seconds", "*_ms": "milliseconds", "throughput": "tokens/s"}}
    return document, results


def short_reason(reason: str | None) -> str:
    """An OOM reason's first clause for the table (compare.json keeps all of it)."""
    return (reason or "out of memory").split(":")[0].split(" needs ")[0]


def print_table(document: dict, on_cpu_device: bool, console: Console) -> None:
    device, host = memory_names(on_cpu_device)
    table = Table("policy", "batch", "throughput (tok/s)", f"x {document['baseline']}", "prefill (ms)",
                  "decode step mean / p90 (ms)", f"peak {device} / {host} memory", "PCIe H2D + D2H", "OOM",
                  title=f"{document['label']}: {document['model']} on {document['hardware']} (memory GiB = 2^30 bytes, "
                        f"traffic GB = 10^9 bytes)")
    for row in document["runs"]:
        m = row["metrics"]
        memory = f"{gib(m['peak_gpu_bytes'])} / {gib(m['peak_cpu_bytes'])}" \
            if m["peak_gpu_bytes"] or m["peak_cpu_bytes"] else "-"
        if row["oom"]:
            table.add_row(row["policy"], str(row["batch_size"]), "-", "-", "-", "-", memory, "-",
                          f"[red]{short_reason(row['reason'])}[/]")
            continue
        ratio = row["vs_baseline"]["throughput_x"]
        table.add_row(row["policy"], str(row["batch_size"]), f"{m['throughput_tok_s']:.1f}",
                      "-" if ratio is None else f"{ratio:.2f}x", f"{m['prefill_s'] * 1e3:.1f}",
                      f"{m['decode_step_s']['mean'] * 1e3:.2f} / {m['decode_step_s']['p90'] * 1e3:.2f}", memory,
                      f"{gb(m['h2d_bytes'])} + {gb(m['d2h_bytes'])}", "no")
    console.print(table)
    for note in document["skipped_overrides"]:
        console.print(f"[yellow]not applied[/] {note}")


def compare_figures(document: dict) -> dict:
    """Throughput over batch per policy (OOM points marked) and the throughput ratio to the baseline."""
    import plotly.graph_objects as go

    from alisa_sim.report import COLORS, throughput_figure

    panel = f"{document['model']} on {document['hardware']}"
    points = [{"panel": panel, "line": row["policy"], "batch": row["batch_size"],
               "throughput": None if row["oom"] else row["metrics"]["throughput_tok_s"], "oom": row["reason"]}
              for row in document["runs"]]
    figures = {"throughput": throughput_figure(points, title=f"{document['label']}: throughput vs batch")}
    ratio = go.Figure()
    for color, policy in zip(COLORS * 4, document["policies"]):
        mine = [row for row in document["runs"] if row["policy"] == policy]
        ratio.add_trace(go.Bar(x=[str(row["batch_size"]) for row in mine], name=policy, marker_color=color,
                               y=[row["vs_baseline"]["throughput_x"] for row in mine],
                               text=["OOM" if row["oom"] else f"{row['vs_baseline']['throughput_x']:.2f}x"
                                     if row["vs_baseline"]["throughput_x"] is not None else "" for row in mine],
                               textposition="outside"))
    ratio.add_hline(y=1.0, line_dash="dash", line_color="grey")
    ratio.update_layout(barmode="group", title=f"Throughput relative to {document['baseline']} at the same batch",
                        xaxis_title="batch", yaxis_title=f"throughput / {document['baseline']}'s", height=480)
    figures["ratio"] = ratio
    return figures


def cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from alisa_sim.report import png_note, write_html

    policies = _names(args.policies, "--policies")
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        raise SpecError(f"--policies: unknown policy {', '.join(unknown)} (known: {', '.join(POLICY_NAMES)})")
    baseline = args.baseline or policies[0]
    if baseline not in policies:
        raise SpecError(f"--baseline {baseline}: not among --policies {','.join(policies)}")
    label = args.label or default_label(args.workload)
    document, results = run_compare(args.workload, policies, parse_batches(args.batches), baseline, args.hardware,
                                    args.set, label)
    out = Path(args.out) if args.out else Path("reports") / "runs" / f"compare-{label}-{document['hardware']}"
    for result, row in zip(results, document["runs"]):
        write_json_atomic(out / "runs" / f"{row['policy']}-b{row['batch_size']}" / "result.json", result)
    write_json_atomic(out / "compare.json", document)
    figures = compare_figures(document)
    write_html(figures, out / "compare.html", f"alisa-sim compare: {label}")
    png = png_note(figures, out) if args.png else ""
    if args.json:
        print(json.dumps(document, indent=1))
        return 0
    print_table(document, result_on_cpu_device(results[0]), console)
    console.print(f"wrote {out / 'compare.json'}, {out / 'compare.html'}{png} and {len(results)} Result JSONs under "
                  f"{out / 'runs'}")
    return 0


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser("compare", help="one workload under several policies and batches: a table with ratios "
                                             "to a baseline, a plotly page, --json in vLLM's benchmark key names")
    compare.add_argument("workload", help="workload YAML file (or a plan / Result JSON)")
    compare.add_argument("--policies", default="alisa,flexgen,vllm,accelerate,zero",
                         help="comma-separated policies (default alisa,flexgen,vllm,accelerate,zero)")
    compare.add_argument("--batches", help="comma-separated batch sizes (default: the workload's)")
    compare.add_argument("--baseline", help="the policy ratios are taken against (default: the first of --policies)")
    compare.add_argument("--hardware", help="hardware profile name or YAML path, overriding the workload's")
    compare.add_argument("--label", help="the comparison's name (default: the workload file's stem)")
    compare.add_argument("--out", help="output folder (default reports/runs/compare-<label>-<hardware>)")
    compare.add_argument("--png", action="store_true", help="also write PNG figures (needs kaleido and Chromium)")
    compare.add_argument("--json", action="store_true", help="print compare.json to stdout instead of the table")
    add_set_argument(compare)
    compare.set_defaults(handler=cmd_compare)


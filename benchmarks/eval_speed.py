"""Speed of the accuracy evaluation (`alisa-exec eval`): decoded tokens/s per method and setting on a sample of the
text, and the projected time of the full table of issue 15 (every method at 0.5 / 0.8 / 0.9, contexts 1024 and
2048, decoding from token 0 and after a prefill of half the window) over --target-tokens tokens.

The sample is the first --tokens tokens of the text, cut into windows of each context; each method runs its three
sparsities in one masked pass over those windows, after one shared dense prefill per batch of windows, exactly as
`eval` runs them. A method's time per window is taken as constant, so the projection scales it by the target's
windows (larger batches amortise the per-row work better, so the projection is an upper bound as long as the
machine's load stays the same). The load average is printed with the table: on a shared machine every time here
scales with it.

    python benchmarks/eval_speed.py --tokens 2048            # SmolLM2-135M on WikiText-2 test, bfloat16
    python benchmarks/eval_speed.py --tokens 2048 --methods dense,swa,k4-head --contexts 1024
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alisa_exec.accuracy.command import ProgressLines  # noqa: E402
from alisa_exec.accuracy.evaluate import (EvalSettings, evaluate, load_eval_model, planned_tokens,  # noqa: E402
                                          prefill_tokens, resolve_model, tokenize)
from alisa_exec.accuracy.methods import METHODS, parse_methods  # noqa: E402

SPARSITIES = [0.5, 0.8, 0.9]
PREFILLS = [0.0, 0.5]
BUDGET_S = 30 * 60  # the target for the full table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--text", default=str(Path(__file__).resolve().parents[2] / "shared/data/wikitext-2/test.txt"))
    parser.add_argument("--tokens", type=int, default=2048, help="sample: the first N tokens (default 2048)")
    parser.add_argument("--target-tokens", type=int, default=32768, help="the full table's tokens (default 32768)")
    parser.add_argument("--contexts", default="1024,2048")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    args = parser.parse_args()
    console = Console()
    contexts = [int(c) for c in args.contexts.split(",")]
    methods = parse_methods(args.methods)
    model_path = resolve_model(args.model)
    tokens = tokenize(model_path, Path(args.text))
    model = load_eval_model(model_path, torch.device("cpu"), getattr(torch, args.dtype))
    load_before = os.getloadavg()[0]
    rows = {}  # (method, context, prefill) -> (decoded tokens per second, seconds per window)
    started = time.perf_counter()
    for context in contexts:
        settings = EvalSettings(contexts=[context], methods=methods, sparsities=SPARSITIES, prefills=PREFILLS,
                                max_tokens=args.tokens, batch_tokens=args.tokens)
        windows = args.tokens // context
        progress = ProgressLines(Console(stderr=True), planned_tokens(len(tokens), settings))
        for row in evaluate(model, tokens, settings, progress.advance)["results"]:
            runs = len(SPARSITIES) if METHODS[row["method"]].sparse else 1
            seconds = row["seconds"] * runs  # every sparsity of the method in one pass
            decoded = windows * (context - row["prefill"]) * runs
            rows[row["method"], context, row["prefill"]] = (decoded / seconds, seconds / windows)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]

    settings_measured = [(c, prefill_tokens(p, c)) for c in contexts for p in PREFILLS]
    table = Table("method", *(f"{c}" + (f" p{p}" if p else "") for c, p in settings_measured),
                  title=f"decoded tokens/s per method and setting ({args.dtype}, sparsities "
                        f"{', '.join(map(str, SPARSITIES))} in one pass)")
    projected = 0.0
    for method in methods:
        cells = []
        for context, prefill in settings_measured:
            per_second, per_window = rows[method.name, context, prefill]
            cells.append(f"{per_second:,.0f}")
            projected += per_window * (args.target_tokens // context)
        table.add_row(method.name, *cells)
    console.print(table)
    fits = int(args.target_tokens * BUDGET_S / projected)
    console.print(f"sample: {args.tokens} tokens, measured in {elapsed:.0f} s, load average {load_before:.1f} before "
                  f"and {load_after:.1f} after, {torch.get_num_threads()} threads")
    console.print(f"projected full table over {args.target_tokens:,} tokens ({len(methods)} methods, contexts "
                  f"{args.contexts}, both settings): {projected / 60:,.1f} min; in {BUDGET_S // 60} min about "
                  f"{fits:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())

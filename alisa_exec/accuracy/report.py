"""The accuracy report: perplexity against KV sparsity per method (the ALISA paper's Fig. 8) as a self-contained
plotly HTML page (a PNG too when kaleido can find Chromium), and the perplexity table in Markdown."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from alisa_sim.report import log_ticks

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _settings(rows: list[dict]) -> list[tuple[int, int]]:
    """(context, prefill) pairs in order; a row without a prefill was decoded from its first token."""
    return sorted({(r["context"], r.get("prefill", 0)) for r in rows})


def _setting_name(context: int, prefill: int) -> str:
    return f"context {context}" + (f", prefill {prefill}" if prefill else ", decode from token 0")


def perplexity_figure(report: dict) -> go.Figure:
    """One panel per context: perplexity over KV sparsity per method, dense (no KV cut) as a dashed black baseline
    across each panel and in the legend; the title on two lines so no width cuts it."""
    rows = report["results"]
    settings = _settings(rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure = make_subplots(rows=1, cols=len(settings), subplot_titles=[_setting_name(*s) for s in settings])
    palette = ["#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
               "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39"]
    shown = set()
    for col, setting in enumerate(settings, start=1):
        for index, method in enumerate(methods):
            points = sorted((r["sparsity"], r["perplexity"]) for r in rows
                            if _settings([r])[0] == setting and r["method"] == method)
            if not points:
                continue
            if method == "dense":
                dense = points[0][1]
                figure.add_trace(go.Scatter(x=[0.0, 1.0], y=[dense, dense], mode="lines",
                                            name=f"dense (no KV cut; {dense:.2f} at {_setting_name(*settings[0])})"
                                            if col == 1 else f"dense, {_setting_name(*setting)}",
                                            legendgroup="dense", showlegend=col == 1,
                                            line={"color": "black", "dash": "dash"},
                                            hovertemplate=f"dense: perplexity {dense:.3f}<extra></extra>"),
                                 row=1, col=col)
                continue
            figure.add_trace(go.Scatter(x=[p[0] for p in points], y=[p[1] for p in points], mode="lines+markers",
                                        name=method, legendgroup=method, showlegend=method not in shown,
                                        line_color=palette[index % len(palette)]),
                             row=1, col=col)
            shown.add(method)
        # The whole range of KV sparsity, so a run at one sparsity still shows where it sits and the dense line
        figure.update_xaxes(title_text="KV sparsity (share of cached tokens not attended)", range=[0, 1], row=1,
                            col=col)
        values = [r["perplexity"] for r in rows if _settings([r])[0] == setting]
        # Perplexities within a factor of a few of each other: ticks closer than 1-2-5
        figure.update_yaxes(type="log", title_text="perplexity (log)" if col == 1 else None,
                            tickvals=log_ticks(values, (1, 1.5, 2, 2.5, 3, 4, 5, 7)), row=1, col=col)
    # A merged report (eval-report) gives each run's token count
    tokens = report.get("tokens_evaluated") or " / ".join(
        dict.fromkeys(str(run["tokens_evaluated"]) for run in report.get("runs", []) if "tokens_evaluated" in run))
    title = (f"Perplexity vs KV sparsity<br><sup>{report['model']} on {Path(report['text']).name}, "
             f"{tokens or '?'} tokens</sup>")
    # Tall enough for the legend's one line per method (past a dozen methods it was cut off)
    figure.update_layout(title={"text": title, "x": 0.02, "xanchor": "left"}, template="plotly_white",
                         width=max(900, 480 * len(settings) + 260), height=max(520, 240 + 26 * len(methods)),
                         margin={"t": 110})
    return figure


def chromium_path() -> str | None:
    """A Chromium or Chrome kaleido can drive (BROWSER_PATH first), or None."""
    candidates = [os.environ.get("BROWSER_PATH")] + [shutil.which(name) for name in BROWSERS]
    return next((c for c in candidates if c and Path(c).is_file()), None)


def perplexity_table(report: dict) -> str:
    """Markdown: one row per method, one column per (context, prefill, sparsity); dense fills every column of its
    setting; a cell not measured is empty."""
    rows = report["results"]
    settings = _settings(rows)
    sparsities = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
    value = {(r["method"], *_settings([r])[0], r["sparsity"]): r["perplexity"] for r in rows}
    columns = [(c, p, s) for c, p in settings for s in sparsities
               if any((m, c, p, s) in value for m in {r["method"] for r in rows})]
    header = ["method"] + [f"{c}{f' p{p}' if p else ''} @ {s:g}" for c, p, s in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for c, p, s in columns:
            ppl = value.get((method, c, p, 0.0 if method == "dense" else s))
            cells.append("" if ppl is None else f"{ppl:.2f}")
        lines.append("| " + " | ".join([method] + cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """perplexity.html, perplexity.png (when Chromium is present) and table.md in `out_dir`; the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = perplexity_figure(report)
    written = [out_dir / "perplexity.html", out_dir / "table.md"]
    figure.write_html(written[0], include_plotlyjs=True)
    written[1].write_text(perplexity_table(report))
    browser = chromium_path()
    if browser and importlib.util.find_spec("kaleido"):
        os.environ.setdefault("BROWSER_PATH", browser)
        figure.write_image(out_dir / "perplexity.png", scale=2)
        written.append(out_dir / "perplexity.png")
    return written

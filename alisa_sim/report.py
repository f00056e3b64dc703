"""Figures of results (`alisa-sim report`) and of validations: plotly HTML that opens offline (plotly.js inline), and
PNG where kaleido and a Chromium are installed.

Report figures: throughput versus batch per policy (the ALISA paper's Fig. 9), per-phase time and KV memory
(Fig. 12), busy time by op kind, and GPU / CPU KV occupancy over the steps. Inputs are Result JSONs (both runners
write them) and sweep tables (CSV from `alisa-sim sweep`, which feed the throughput figure only).
"""

from __future__ import annotations

import csv
import html
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from alisa_sim.errors import SpecError
from alisa_sim.validate import METRICS, LoadedResult, describe, load_result, result_files

GB = 1e9
COLORS = qualitative.Plotly + qualitative.D3


# ---- inputs --------------------------------------------------------------------------------------------------------

def load_inputs(paths: list[str | Path]) -> tuple[list[LoadedResult], list[dict]]:
    """Result JSONs (files, or folders searched for result.json) and the rows of sweep CSV tables."""
    results, rows = [], []
    json_refs = []
    for ref in paths:
        if Path(ref).suffix == ".csv":
            rows += read_sweep_table(Path(ref))
        else:
            json_refs.append(ref)
    results = [load_result(path) for path in result_files(json_refs)] if json_refs else []
    return results, rows


def read_sweep_table(path: Path) -> list[dict]:
    if not path.is_file():
        raise SpecError(f"sweep table not found: {path}")
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing = {"model", "hardware", "batch_size", "policy", "status", "throughput_tok_s"} - set(rows[0] if rows else {})
    if not rows or missing:
        raise SpecError(f"{path}: not a sweep table from alisa-sim sweep (missing columns: "
                        f"{', '.join(sorted(missing)) or 'no rows'})")
    return rows


def result_label(result: LoadedResult) -> str:
    return f"{describe(result.data['workload'])} ({result.source}, {result.data.get('hardware')})"


def throughput_points(results: list[LoadedResult], rows: list[dict]) -> list[dict]:
    """(model on hardware, policy line, batch, throughput) from Results and the finished rows of sweep tables."""
    points = []
    for r in results:
        wl, m = r.data["workload"], r.data["metrics"]
        if not m.get("oom"):
            model = r.data.get("model") or describe(wl).split()[0]
            points.append({"panel": f"{model} on {r.data.get('hardware')}",
                           "line": f"{wl['policy']['name']} ({r.source})",
                           "batch": int(wl["batch_size"]), "throughput": float(m["throughput_tok_s"])})
    for row in rows:
        if row["status"] == "ok":
            line = row["policy"] + (f" s={row['kv_sparsity']}" if row.get("kv_sparsity") else "")
            points.append({"panel": f"{row['model']} on {row['hardware']}", "line": line,
                           "batch": int(row["batch_size"]), "throughput": float(row["throughput_tok_s"])})
    return points


# ---- report figures ------------------------------------------------------------------------------------------------

def _grid(count: int, columns: int = 3) -> tuple[int, int]:
    cols = min(columns, max(1, count))
    return -(-count // cols), cols


def throughput_figure(points: list[dict]) -> go.Figure:
    """Fig. 9 style: one panel per model and machine, throughput over batch, one line per policy."""
    panels = sorted({p["panel"] for p in points})
    lines = sorted({p["line"] for p in points})
    rows, cols = _grid(len(panels))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=panels, horizontal_spacing=0.07,
                        vertical_spacing=min(0.25, 0.6 / rows))
    in_legend: set[str] = set()
    for index, panel in enumerate(panels):
        row, col = divmod(index, cols)
        for color, line in zip(COLORS * 4, lines):
            mine = sorted((p["batch"], p["throughput"]) for p in points if p["panel"] == panel and p["line"] == line)
            if mine:
                fig.add_trace(go.Scatter(x=[b for b, _ in mine], y=[t for _, t in mine], name=line, legendgroup=line,
                                         showlegend=line not in in_legend, mode="lines+markers",
                                         line={"color": color}), row=row + 1, col=col + 1)
                in_legend.add(line)
        fig.update_xaxes(type="log", title_text="batch", tickvals=sorted({p["batch"] for p in points}),
                         row=row + 1, col=col + 1)
        fig.update_yaxes(title_text="tokens/s", row=row + 1, col=col + 1)
    fig.update_layout(title="Throughput vs batch per policy (generated tokens / total time)",
                      height=max(420, 400 * rows))
    return fig


def phase_figure(results: list[LoadedResult]) -> go.Figure:
    """Fig. 12 style: decode time in each KV phase (stacked) and, per phase, the GPU KV with the CPU KV stacked on
    it at the phase's end, per run."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("decode time by KV phase", "KV held at each phase's end"),
                        horizontal_spacing=0.1)
    labels = [result_label(r) for r in results]
    phases = sorted({p["phase"] for r in results for p in r.data.get("phases", [])})
    below = [0.0] * len(results)
    for color, phase in zip(COLORS, phases):
        mine = [[p for p in r.data["phases"] if p["phase"] == phase] for r in results]
        times = [sum(p["time_s"] for p in ps) for ps in mine]
        fig.add_trace(go.Bar(x=labels, y=times, base=below, name=f"phase {phase} time", marker_color=color,
                             offsetgroup="time", legendgroup=f"phase {phase}"), row=1, col=1)
        below = [b + t for b, t in zip(below, times)]
        gpu = [ps[-1]["gpu_kv_bytes_end"] / GB if ps else 0.0 for ps in mine]
        cpu = [ps[-1]["cpu_kv_bytes_end"] / GB if ps else 0.0 for ps in mine]
        fig.add_trace(go.Bar(x=labels, y=gpu, name=f"phase {phase} GPU KV", marker_color=color,
                             offsetgroup=str(phase), legendgroup=f"phase {phase}"), row=1, col=2)
        fig.add_trace(go.Bar(x=labels, y=cpu, base=gpu, name=f"phase {phase} CPU KV", marker_color=color,
                             marker_pattern_shape="/", offsetgroup=str(phase), legendgroup=f"phase {phase}"),
                      row=1, col=2)
    fig.update_layout(barmode="group", title="Per-phase time and KV memory", height=600)
    fig.update_yaxes(title_text="seconds", row=1, col=1)
    fig.update_yaxes(title_text="GB (CPU hatched, on top of GPU)", row=1, col=2)
    fig.update_xaxes(tickangle=-30)
    return fig


def breakdown_figure(results: list[LoadedResult]) -> go.Figure:
    """Busy time by op kind per run (stacked; streams overlap, so a bar can exceed the run's total time)."""
    labels = [result_label(r) for r in results]
    kinds = [k for k in dict.fromkeys(k for r in results for k in r.data.get("breakdown_s", {}))
             if any(r.data["breakdown_s"].get(k) for r in results)]
    fig = go.Figure()
    for color, kind in zip(COLORS, kinds):
        fig.add_trace(go.Bar(y=labels, x=[r.data["breakdown_s"].get(kind, 0.0) for r in results], name=kind,
                             orientation="h", marker_color=color))
    fig.update_layout(barmode="stack", title="Time by op kind (busy seconds per stream; idle = GPU waiting)",
                      xaxis_title="seconds", height=max(360, 120 + 40 * len(results)))
    return fig


def occupancy_figure(results: list[LoadedResult]) -> go.Figure:
    """KV bytes held on the GPU and on the CPU after each step."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("GPU KV", "CPU KV"), horizontal_spacing=0.08)
    for color, r in zip(COLORS * 4, results):
        steps = r.data.get("steps", [])
        label = result_label(r)
        for col, device in ((1, "gpu"), (2, "cpu")):
            fig.add_trace(go.Scatter(x=[s["step"] for s in steps], y=[s[f"{device}_kv_bytes"] / GB for s in steps],
                                     name=label, legendgroup=label, showlegend=col == 1, mode="lines",
                                     line={"color": color}), row=1, col=col)
    fig.update_xaxes(title_text="step (0 = prefill)")
    fig.update_yaxes(title_text="GB")
    fig.update_layout(title="KV occupancy over steps", height=480)
    return fig


def report_figures(results: list[LoadedResult], rows: list[dict]) -> dict[str, go.Figure]:
    """The report's figures by file stem; those without data are left out."""
    figures = {}
    points = throughput_points(results, rows)
    if points:
        figures["throughput"] = throughput_figure(points)
    ran = [r for r in results if not r.oom]
    if any(r.data.get("phases") for r in ran):
        figures["phases"] = phase_figure([r for r in ran if r.data.get("phases")])
    if any(r.data.get("breakdown_s") for r in ran):
        figures["breakdown"] = breakdown_figure([r for r in ran if r.data.get("breakdown_s")])
    if any(r.data.get("steps") for r in ran):
        figures["occupancy"] = occupancy_figure([r for r in ran if r.data.get("steps")])
    if not figures:
        raise SpecError("nothing to plot: no finished run among the inputs")
    return figures


# ---- validation figures --------------------------------------------------------------------------------------------

def scatter_figure(document: dict) -> go.Figure:
    """Predicted against measured for every metric, log axes, with the y = x line of a perfect prediction."""
    names = [name for name in METRICS if document["summary"][name]["pairs"]]
    rows, cols = _grid(len(names))
    titles = [f"{METRICS[n][0]}: MAPE {document['summary'][n]['mape']:.1f}%" for n in names]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=min(0.28, 0.6 / rows))
    for index, name in enumerate(names):
        row, col = divmod(index, cols)
        pairs = [p for p in document["pairs"] if p["metrics"][name]["error_pct"] is not None]
        measured = [p["metrics"][name]["measured"] for p in pairs]
        predicted = [p["metrics"][name]["predicted"] for p in pairs]
        low, high = min(measured + predicted) / 1.5, max(measured + predicted) * 1.5
        fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="y = x", legendgroup="y=x",
                                 showlegend=index == 0, line={"color": "grey", "dash": "dash"}),
                      row=row + 1, col=col + 1)
        fig.add_trace(go.Scatter(x=measured, y=predicted, mode="markers", name="runs", legendgroup="runs",
                                 showlegend=index == 0, marker={"color": COLORS[0], "size": 9},
                                 text=[f"{p['workload']}: {p['metrics'][name]['error_pct']:+.1f}%" for p in pairs],
                                 hoverinfo="text"), row=row + 1, col=col + 1)
        fig.update_xaxes(type="log", title_text="measured", row=row + 1, col=col + 1)
        fig.update_yaxes(type="log", title_text="predicted", row=row + 1, col=col + 1)
    fig.update_layout(title="Predicted vs measured", height=max(420, 420 * rows))
    return fig


def step_curves_figure(pairs: list[tuple[LoadedResult, LoadedResult]]) -> go.Figure:
    """Decode step time over the steps, measured (solid) and predicted (dashed), one colour per pair."""
    fig = go.Figure()
    for color, (predicted, measured) in zip(COLORS * 4, pairs):
        label = describe(measured.data["workload"])
        for result, dash, side in ((measured, "solid", "measured"), (predicted, "dash", "predicted")):
            steps = [s for s in result.data.get("steps", []) if s["step"] > 0 and s.get("kind", "decode") == "decode"]
            fig.add_trace(go.Scatter(x=[s["step"] for s in steps], y=[s["time_s"] * 1e3 for s in steps],
                                     name=f"{label} {side}", legendgroup=label, mode="lines",
                                     line={"color": color, "dash": dash}))
    fig.update_layout(title="Decode step time: measured (solid) and predicted (dashed)", xaxis_title="decode step",
                      yaxis_title="ms", height=520)
    return fig


# ---- output --------------------------------------------------------------------------------------------------------

def write_html(figures: dict[str, go.Figure], path: Path, title: str, intro: str = "") -> Path:
    """One self-contained page: plotly.js inline once, then every figure."""
    parts = [fig.to_html(full_html=False, include_plotlyjs=index == 0, div_id=f"figure-{name}",
                         config={"displaylogo": False})
             for index, (name, fig) in enumerate(figures.items())]
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:1.5em} .figure{margin-bottom:2em}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{intro}"
            + "".join(f'<div class="figure">{part}</div>' for part in parts) + "</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page)
    tmp.replace(path)
    return path


def write_pngs(figures: dict[str, go.Figure], folder: Path) -> tuple[list[Path], str | None]:
    """PNG of every figure through kaleido; ([], why) when kaleido or its Chromium is missing."""
    paths = [folder / f"{name}.png" for name in figures]
    try:
        pio.write_images(list(figures.values()), paths, width=1400)
    except Exception as exc:  # kaleido missing, no Chromium, or the browser failed to start: the HTML still stands
        return [], f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return paths, None

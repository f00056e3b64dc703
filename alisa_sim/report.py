"""Figures of results (`alisa-sim report`) and of validations: plotly HTML that opens offline (plotly.js inline), and
PNG where kaleido and a Chromium are installed.

Report figures: throughput versus batch per policy (the ALISA paper's Fig. 9), per-phase time and KV memory
(Fig. 12), busy time by op kind, and GPU / CPU KV occupancy over the steps. Inputs are Result JSONs (both runners
write them) and sweep tables (CSV from `alisa-sim sweep`, which feed the throughput figure only).
"""

from __future__ import annotations

import csv
import html
import math
from collections import Counter
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from alisa_sim.errors import SpecError
from alisa_sim.units import GiB, memory_names, result_on_cpu_device
from alisa_sim.validate import METRICS, LoadedResult, describe, load_result, pair_name, result_files

COLORS = qualitative.Plotly + qualitative.D3
LOG_AXIS_RATIO = 100
DEFAULT_PNG_HEIGHT = 500
OOM_DODGE = 1.06  # x factor between neighbouring lines' out-of-memory marks on the log batch axis
# Engine resources of the op kinds that do not run on the GPU compute stream (alisa_sim.ops.KINDS).
STREAM_OF_KIND = {"h2d": "H2D", "d2h": "D2H", "cpu": "CPU"}
# Each validated metric's unit in the figures and the factor from the Result's value (seconds, bytes) to it.
METRIC_UNITS = {"prefill_s": ("s", 1.0), "decode_step_mean_s": ("ms", 1e3), "total_s": ("s", 1.0),
                "throughput_tok_s": ("tok/s", 1.0), "peak_gpu_bytes": ("GiB", 1 / GiB)}


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
    """A run as legends name it: its label (the workload file's stem unless given) or, for a Result without one,
    its workload, with the side and the machine."""
    name = result.data.get("label") or describe(result.data["workload"])
    return f"{name} ({result.source}, {result.data.get('hardware')})"


def unique_labels(results: list[LoadedResult]) -> list[str]:
    """result_label of each run, with the workload (then a count) appended where two runs would share one."""
    labels = [result_label(r) for r in results]
    shared = {label for label in labels if labels.count(label) > 1}
    labels = [f"{label}: {describe(r.data['workload'])}" if label in shared else label
              for label, r in zip(labels, results)]
    counts, seen = Counter(labels), Counter()
    unique = []
    for label in labels:
        seen[label] += 1
        unique.append(f"{label} #{seen[label]}" if counts[label] > 1 else label)
    return unique


def on_cpu_device(results: list[LoadedResult]) -> bool:
    """Whether every run had the CPU as its device (their memories are then "device" and "host")."""
    return bool(results) and all(result_on_cpu_device(r.data) for r in results)


def throughput_points(results: list[LoadedResult], rows: list[dict]) -> list[dict]:
    """(model on hardware, line, batch, throughput or None, OOM reason) from Results and the finished rows of sweep
    tables. A Result's line is its label and policy, so runs of different workload files are different lines."""
    points = []
    for r in results:
        wl, m = r.data["workload"], r.data["metrics"]
        model = r.data.get("model") or describe(wl).split()[0]
        name = f"{r.data['label']} · " if r.data.get("label") else ""
        points.append({"panel": f"{model} on {r.data.get('hardware')}",
                       "line": f"{name}{wl['policy']['name']} ({r.source})", "batch": int(wl["batch_size"]),
                       "throughput": None if m.get("oom") else float(m["throughput_tok_s"]),
                       "oom": m.get("error", "out of memory") if m.get("oom") else None})
    for row in rows:
        if row["status"] in ("ok", "oom"):
            line = row["policy"] + (f" s={row['kv_sparsity']}" if row.get("kv_sparsity") else "")
            points.append({"panel": f"{row['model']} on {row['hardware']}", "line": line,
                           "batch": int(row["batch_size"]),
                           "throughput": float(row["throughput_tok_s"]) if row["status"] == "ok" else None,
                           "oom": (row.get("error") or "out of memory") if row["status"] == "oom" else None})
    return points


# ---- report figures ------------------------------------------------------------------------------------------------

def _grid(count: int, columns: int = 3) -> tuple[int, int]:
    cols = min(columns, max(1, count))
    return -(-count // cols), cols


def needs_log_axis(values: list[float]) -> bool:
    """Lines that differ by 100x or more are read on a log axis (on a linear one the small ones are flat at 0)."""
    positive = [v for v in values if v and v > 0]
    return bool(positive) and max(positive) >= LOG_AXIS_RATIO * min(positive)


def log_ticks(values: list[float], mantissas: tuple[float, ...] = (1, 2, 5)) -> list[float]:
    """Tick values m x 10^k (m in `mantissas`) covering `values` (plotly labels a log axis's minor ticks with bare
    digits)."""
    positive = [v for v in values if v and v > 0]
    low, high = math.floor(math.log10(min(positive))), math.ceil(math.log10(max(positive)))
    ticks = [m * 10.0**k for k in range(low, high + 1) for m in mantissas]
    inside = [t for t in ticks if min(positive) / 2 <= t <= max(positive) * 2]
    return inside or ticks


def throughput_figure(points: list[dict], title: str = "Throughput vs batch per policy (generated tokens / total "
                                                       "time)") -> go.Figure:
    """Fig. 9 style: one panel per model and machine, throughput over batch, one line per policy; runs out of
    memory are red crosses along the panel's floor (hover: why); a log y axis where lines differ by 100x."""
    panels = sorted({p["panel"] for p in points})
    lines = sorted({p["line"] for p in points})
    rows, cols = _grid(len(panels))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=panels, horizontal_spacing=0.07,
                        vertical_spacing=min(0.25, 0.6 / rows))
    in_legend: set[str] = set()
    for index, panel in enumerate(panels):
        row, col = divmod(index, cols)
        mine = [p for p in points if p["panel"] == panel]
        ran = [p["throughput"] for p in mine if p["throughput"] is not None]
        log = needs_log_axis(ran)
        floor = (min(ran) / 2 if log else 0.0) if ran else 1.0
        for number, (color, line) in enumerate(zip(COLORS * 4, lines)):
            ok = sorted((p["batch"], p["throughput"]) for p in mine
                        if p["line"] == line and p["throughput"] is not None)
            if ok:
                fig.add_trace(go.Scatter(x=[b for b, _ in ok], y=[t for _, t in ok], name=line, legendgroup=line,
                                         showlegend=line not in in_legend, mode="lines+markers",
                                         line={"color": color},
                                         hovertemplate="batch %{x}: %{y:.1f} tok/s<extra>" + line + "</extra>"),
                              row=row + 1, col=col + 1)
                in_legend.add(line)
            oom = sorted((p["batch"], p["oom"]) for p in mine if p["line"] == line and p["throughput"] is None)
            if oom:
                # Side by side along the floor: several policies may run out of memory at the same batch.
                dodge = OOM_DODGE ** (number - (len(lines) - 1) / 2)
                fig.add_trace(go.Scatter(x=[b * dodge for b, _ in oom], y=[floor] * len(oom), mode="markers",
                                         name=f"{line}: out of memory", legendgroup=line,
                                         showlegend=f"{line} oom" not in in_legend,
                                         marker={"color": color, "symbol": "x", "size": 12,
                                                 "line": {"color": "black", "width": 1}},
                                         text=[f"{line}, batch {b}: out of memory: {why}" for b, why in oom],
                                         hoverinfo="text"), row=row + 1, col=col + 1)
                in_legend.add(f"{line} oom")
        fig.update_xaxes(type="log", title_text="batch", tickvals=sorted({p["batch"] for p in points}),
                         row=row + 1, col=col + 1)
        if log:
            fig.update_yaxes(type="log", title_text="tokens/s (log)", tickvals=log_ticks(ran + [floor]),
                             row=row + 1, col=col + 1)
        else:
            fig.update_yaxes(title_text="tokens/s", rangemode="tozero", row=row + 1, col=col + 1)
    marked = " (x: out of memory, hover for why)" if any(p["throughput"] is None for p in points) else ""
    fig.update_layout(title=title + marked, height=max(420, 400 * rows))
    return fig


def phase_figure(results: list[LoadedResult]) -> go.Figure:
    """Fig. 12 style: decode time in each KV phase (stacked) and, per phase, the device KV with the host KV stacked
    on it at the phase's end, per run."""
    device, host = memory_names(on_cpu_device(results))
    fig = make_subplots(rows=1, cols=2, subplot_titles=("decode time by KV phase", "KV held at each phase's end"),
                        horizontal_spacing=0.1)
    labels = unique_labels(results)
    phases = sorted({p["phase"] for r in results for p in r.data.get("phases", [])})
    below = [0.0] * len(results)
    for color, phase in zip(COLORS, phases):
        mine = [[p for p in r.data["phases"] if p["phase"] == phase] for r in results]
        times = [sum(p["time_s"] for p in ps) for ps in mine]
        fig.add_trace(go.Bar(x=labels, y=times, base=below, name=f"phase {phase} time", marker_color=color,
                             offsetgroup="time", legendgroup=f"phase {phase}"), row=1, col=1)
        below = [b + t for b, t in zip(below, times)]
        gpu = [ps[-1]["gpu_kv_bytes_end"] / GiB if ps else 0.0 for ps in mine]
        cpu = [ps[-1]["cpu_kv_bytes_end"] / GiB if ps else 0.0 for ps in mine]
        fig.add_trace(go.Bar(x=labels, y=gpu, name=f"phase {phase} {device} KV", marker_color=color,
                             offsetgroup=str(phase), legendgroup=f"phase {phase}"), row=1, col=2)
        fig.add_trace(go.Bar(x=labels, y=cpu, base=gpu, name=f"phase {phase} {host} KV", marker_color=color,
                             marker_pattern_shape="/", offsetgroup=str(phase), legendgroup=f"phase {phase}"),
                      row=1, col=2)
    fig.update_layout(barmode="group", title="Per-phase time and KV memory", height=600)
    fig.update_yaxes(title_text="seconds", row=1, col=1)
    fig.update_yaxes(title_text=f"GiB ({host} hatched, on top of {device})", row=1, col=2)
    fig.update_xaxes(tickangle=-30)
    return fig


def stream_of(kind: str, overlap: bool) -> str:
    """The stream (engine resource) an op kind's time is spent on; everything is one serial stream without
    overlap."""
    return STREAM_OF_KIND.get(kind, "GPU compute") if overlap else "serial"


def breakdown_figure(results: list[LoadedResult]) -> go.Figure:
    """Busy time by op kind on each stream of each run: one bar per stream (GPU compute with its idle time, H2D, D2H,
    CPU; one serial bar with overlap off), so no bar passes the run's total time, marked by a black line."""
    labels = unique_labels(results)
    device, _ = memory_names(on_cpu_device(results))
    kinds = [k for k in dict.fromkeys(k for r in results for k in r.data.get("breakdown_s", {}))
             if any(r.data["breakdown_s"].get(k) for r in results)]
    rows = []  # (run index, stream)
    for index, r in enumerate(results):
        overlap = r.data["workload"].get("overlap", True)
        rows += [(index, stream) for stream in dict.fromkeys(stream_of(k, overlap) for k in kinds
                                                             if r.data["breakdown_s"].get(k))]
    # Two-level categories: the run, then its streams.
    categories = [[labels[i] for i, _ in rows], [stream.replace("GPU", device) for _, stream in rows]]
    fig = go.Figure()
    for color, kind in zip(COLORS, kinds):
        values = [results[i].data["breakdown_s"].get(kind, 0.0)
                  if stream_of(kind, results[i].data["workload"].get("overlap", True)) == stream else 0.0
                  for i, stream in rows]
        fig.add_trace(go.Bar(y=categories, x=values, name=kind, orientation="h", marker_color=color,
                             hovertemplate="%{y}: " + kind + " %{x:.4g} s<extra></extra>"))
    fig.add_trace(go.Scatter(y=categories, x=[results[i].data["metrics"].get("total_s") for i, _ in rows],
                             mode="markers", name="run's total time",
                             marker={"symbol": "line-ns", "size": 18, "line": {"color": "black", "width": 3}},
                             hovertemplate="%{y}: total %{x:.4g} s<extra></extra>"))
    fig.update_layout(barmode="stack", title="Time by op kind, per stream (streams run at once; each bar stops at "
                                             "or before the run's total time, the black mark)",
                      xaxis_title="seconds", yaxis={"autorange": "reversed", "dtick": 1},
                      height=max(360, 160 + 26 * len(rows) + 10 * len(results)))
    return fig


def occupancy_figure(results: list[LoadedResult]) -> go.Figure:
    """KV bytes held on the device and on the host after each step."""
    device, host = memory_names(on_cpu_device(results))
    fig = make_subplots(rows=1, cols=2, subplot_titles=(f"{device} KV", f"{host} KV"), horizontal_spacing=0.08)
    for color, r, label in zip(COLORS * 4, results, unique_labels(results)):
        steps = r.data.get("steps", [])
        for col, side in ((1, "gpu"), (2, "cpu")):
            fig.add_trace(go.Scatter(x=[s["step"] for s in steps], y=[s[f"{side}_kv_bytes"] / GiB for s in steps],
                                     name=label, legendgroup=label, showlegend=col == 1, mode="lines",
                                     line={"color": color}), row=1, col=col)
    fig.update_xaxes(title_text="step (0 = prefill)")
    fig.update_yaxes(title_text="GiB")
    fig.update_layout(title="KV occupancy over steps", height=480)
    return fig


def report_figures(results: list[LoadedResult], rows: list[dict]) -> dict[str, go.Figure]:
    """The report's figures by file stem; those without data are left out."""
    figures = {}
    points = throughput_points(results, rows)
    if any(p["throughput"] is not None for p in points):
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

def metric_label(name: str, document: dict) -> str:
    """A validated metric's name; GPU memory is the device's when every measured run had the CPU as its device."""
    on_cpu = bool(document["pairs"]) and all(p.get("cpu_device") for p in document["pairs"])
    label = METRICS[name][0]
    return label.replace("GPU", memory_names(True)[0]) if on_cpu else label


def scatter_figure(document: dict) -> go.Figure:
    """Predicted against measured for every metric in its unit, log axes, with the y = x line of a perfect
    prediction; hovering a point names its run and gives both values and the error."""
    names = [name for name in METRICS if document["summary"][name]["pairs"]]
    rows, cols = _grid(len(names))
    titles = [f"{metric_label(n, document)} ({METRIC_UNITS[n][0]}): MAPE {document['summary'][n]['mape']:.1f}%"
              for n in names]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.08,
                        vertical_spacing=min(0.28, 0.6 / rows))
    for index, name in enumerate(names):
        row, col = divmod(index, cols)
        unit, scale = METRIC_UNITS[name]
        pairs = [p for p in document["pairs"] if p["metrics"][name]["error_pct"] is not None]
        measured = [p["metrics"][name]["measured"] * scale for p in pairs]
        predicted = [p["metrics"][name]["predicted"] * scale for p in pairs]
        low, high = min(measured + predicted) / 1.5, max(measured + predicted) * 1.5
        fig.add_trace(go.Scatter(x=[low, high], y=[low, high], mode="lines", name="y = x", legendgroup="y=x",
                                 showlegend=index == 0, line={"color": "grey", "dash": "dash"}, hoverinfo="skip"),
                      row=row + 1, col=col + 1)
        fig.add_trace(go.Scatter(x=measured, y=predicted, mode="markers", name="runs", legendgroup="runs",
                                 showlegend=index == 0, marker={"color": COLORS[0], "size": 9},
                                 text=[f"{pair_name(p)}<br>measured {m:.4g} {unit}, predicted {q:.4g} {unit}, "
                                       f"error {p['metrics'][name]['error_pct']:+.1f}%"
                                       for p, m, q in zip(pairs, measured, predicted)],
                                 hoverinfo="text"), row=row + 1, col=col + 1)
        ticks = log_ticks([low, high])
        fig.update_xaxes(type="log", title_text=f"measured ({unit})", tickvals=ticks, row=row + 1, col=col + 1)
        fig.update_yaxes(type="log", title_text=f"predicted ({unit})", tickvals=ticks, row=row + 1, col=col + 1)
    fig.update_layout(title="Predicted vs measured (hover a point for its run)", height=max(420, 420 * rows))
    return fig


def step_curves_figure(pairs: list[tuple[LoadedResult, LoadedResult]]) -> go.Figure:
    """Decode step time over the steps, measured (solid) and predicted (dashed), one colour per pair."""
    fig = go.Figure()
    for color, (predicted, measured) in zip(COLORS * 4, pairs):
        label = measured.data.get("label") or predicted.data.get("label")
        label = f"{label}: {describe(measured.data['workload'])}" if label else describe(measured.data["workload"])
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
        # Each at its layout's height: tall figures (many runs) would be squeezed into kaleido's default.
        pio.write_images(list(figures.values()), paths, width=1400,
                         height=[fig.layout.height or DEFAULT_PNG_HEIGHT for fig in figures.values()])
    except Exception as exc:  # kaleido missing, no Chromium, or the browser failed to start: the HTML still stands
        return [], f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return paths, None


def png_note(figures: dict[str, go.Figure], folder: Path) -> str:
    """Write the PNGs and say so for the command's last line: " and N PNG", or " (no PNG: why)"."""
    written, why = write_pngs(figures, folder)
    return f" and {len(written)} PNG" if written else f" (no PNG: {why})"

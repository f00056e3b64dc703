"""`alisa-sim report` and the validation HTML: self-contained pages whose figures render in headless Chromium
(non-empty SVG, no console errors; skipped without Chromium), PNG through kaleido where it works, bad input."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from alisa_sim.cli import main
from alisa_sim.results import build_result
from alisa_sim.simulator import simulate
from alisa_sim.sweep import SweepSpec, expand, run_sweep
from alisa_sim.workload import resolve_workload

CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)
# Put in front of a copy of the page: records uncaught errors and console.error calls, and after load writes them
# into the DOM that --dump-dom prints.
ERROR_CAPTURE = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push("uncaught: " + e.message));
const __consoleError = console.error;
console.error = (...args) => { window.__errors.push(args.join(" ")); __consoleError(...args); };
window.addEventListener("load", () => setTimeout(() => {
  const pre = document.createElement("pre"); pre.id = "captured-errors";
  pre.textContent = JSON.stringify(window.__errors); document.body.appendChild(pre); }, 500));
</script>"""


def _result(folder, **overrides):
    data = {"model": "opt-6.7b", "hardware": "paper-h100-80g", "batch_size": 8, "prompt_len": 64, "gen_len": 16,
            "policy": {"name": "accelerate"}, **overrides}
    path = folder / f"r{len(list(folder.glob('*')))}" / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(build_result(simulate(resolve_workload(data)))))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    results = folder / "results"
    results.mkdir()
    _result(results)
    _result(results, policy={"name": "dense"}, batch_size=4)
    _result(results, policy={"name": "zero"})
    _result(results, memory={"gpu_gb": 1})  # out of memory: skipped by every figure
    table = folder / "sweep.csv"
    points = expand(SweepSpec.model_validate({"base": {"prompt_len": 64, "gen_len": 8}, "models": ["opt-6.7b"],
                                              "hardware": ["paper-v100-32g"], "batches": [4, 8],
                                              "policies": ["dense", "accelerate"]}))
    run_sweep(points, table, workers=1, progress=False)
    return results, table


def render(page, tmp_path) -> tuple[str, list[str]]:
    """The DOM of `page` after it loaded in headless Chromium, and the errors its scripts reported."""
    probe = tmp_path / f"probe-{page.name}"
    probe.write_text(page.read_text().replace("<head>", "<head>" + ERROR_CAPTURE, 1))
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    captured = re.search(r'<pre id="captured-errors">(.*?)</pre>', done.stdout, re.S)
    assert captured, "the page never finished loading"
    errors = json.loads(captured.group(1).replace("&quot;", '"'))
    errors += [line for line in done.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    return done.stdout, errors


def assert_rendered(dom: str, names: list[str]) -> None:
    for name in names:
        start = dom.index(f'id="figure-{name}"')
        block = dom[start:dom.find('class="figure"', start + 1) if 'class="figure"' in dom[start + 1:] else None]
        assert 'class="main-svg"' in block, f"figure {name} has no SVG"
        assert re.search(r'class="(trace|point)[ "]', block), f"figure {name} drew no trace"


def test_report_writes_self_contained_html_with_every_figure(tmp_path, inputs, capsys):
    results, table = inputs
    out = tmp_path / "report"
    assert main(["report", str(results), str(table), "--out", str(out), "--no-png"]) == 0
    assert "throughput, phases, breakdown, occupancy" in capsys.readouterr().out
    page = (out / "report.html").read_text()
    assert "<script src=" not in page  # nothing fetched: offline
    assert page.count("Plotly.newPlot") == 4 and len(page) > 3_000_000  # plotly.js inline, once


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_report_figures_render_in_headless_chromium(tmp_path, inputs):
    results, table = inputs
    out = tmp_path / "report"
    assert main(["report", str(results), str(table), "--out", str(out), "--no-png"]) == 0
    dom, errors = render(out / "report.html", tmp_path)
    assert errors == []
    assert_rendered(dom, ["throughput", "phases", "breakdown", "occupancy"])


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_validation_html_renders(tmp_path, inputs):
    results, _ = inputs
    predicted = json.loads((results / "r0" / "result.json").read_text())
    measured = dict(predicted, source="exec")
    measured["metrics"] = dict(predicted["metrics"], decode_step_s={k: v * 1.2 for k, v in
                                                                    predicted["metrics"]["decode_step_s"].items()})
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "result.json").write_text(json.dumps(measured))
    out = tmp_path / "validation"
    assert main(["validate", str(results / "r0"), str(tmp_path / "m"), "--out", str(out)]) == 0
    dom, errors = render(out / "validation.html", tmp_path)
    assert errors == []
    assert_rendered(dom, ["scatter", "steps"])


def test_png_export_or_a_clear_note(tmp_path, inputs, capsys):
    results, table = inputs
    out = tmp_path / "report"
    assert main(["report", str(table), "--out", str(out)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    try:
        import kaleido  # noqa: F401
    except ImportError:
        assert "no PNG" in text
        return
    if "no PNG" in text:
        pytest.skip(f"kaleido is installed but could not export: {text}")
    png = (out / "throughput.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_nothing_to_plot_and_bad_tables_exit_2(tmp_path, capsys):
    oom = _result(tmp_path, memory={"gpu_gb": 1})
    assert main(["report", str(oom), "--out", str(tmp_path / "o"), "--no-png"]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    assert main(["report", str(bad), "--out", str(tmp_path / "o"), "--no-png"]) == 2
    assert "not a sweep table" in capsys.readouterr().err


# ---- what the figures show --------------------------------------------------------------------------------------

def test_out_of_memory_runs_are_marked_and_wide_ranges_get_a_log_axis():
    from alisa_sim.report import throughput_figure

    points = [{"panel": "m on h", "line": "dense", "batch": b, "throughput": t, "oom": None}
              for b, t in ((4, 10.0), (8, 20.0))]
    points += [{"panel": "m on h", "line": "dense", "batch": 64, "throughput": None, "oom": "out of GPU memory"},
               {"panel": "m on h", "line": "zero", "batch": 4, "throughput": 0.05, "oom": None}]
    fig = throughput_figure(points)
    oom = [t for t in fig.data if t.name == "dense: out of memory"]
    assert len(oom) == 1 and oom[0].marker.symbol == "x" and "out of GPU memory" in oom[0].text[0]
    assert fig.layout.yaxis.type == "log"  # 20 / 0.05 = 400x
    assert min(fig.layout.yaxis.tickvals) <= 0.05 and "out of memory" in fig.layout.title.text
    close = throughput_figure([p for p in points if p["line"] == "dense"])
    assert close.layout.yaxis.type in (None, "linear")


def test_breakdown_bars_stop_at_the_runs_total(tmp_path):
    from alisa_sim.report import breakdown_figure
    from alisa_sim.validate import load_results

    _result(tmp_path)  # accelerate: GPU compute and H2D overlap
    _result(tmp_path, overlap=False)
    results = load_results([tmp_path])
    fig = breakdown_figure(results)
    bars = [t for t in fig.data if t.type == "bar"]
    total = next(t for t in fig.data if t.name == "run's total time")
    categories = list(zip(*bars[0].y))
    assert {stream for _, stream in categories} == {"GPU compute", "H2D", "D2H", "serial"}
    for row, (run, stream) in enumerate(categories):
        stacked = sum(bar.x[row] for bar in bars)
        assert stacked <= total.x[row] * (1 + 1e-9), (run, stream)
        if stream in ("GPU compute", "serial"):
            assert stacked == pytest.approx(total.x[row], rel=1e-6)  # compute + idle, or everything in series


def test_runs_of_different_workloads_never_share_a_legend_entry(tmp_path):
    from alisa_sim.report import throughput_points, unique_labels
    from alisa_sim.validate import load_results

    for name, sparsity in (("sparse-a", 0.5), ("sparse-b", 0.9)):
        path = _result(tmp_path, policy={"name": "alisa", "kv_sparsity": sparsity})
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "label": name}))
    _result(tmp_path, policy={"name": "alisa", "kv_sparsity": 0.7})  # no label: named by its workload
    _result(tmp_path, policy={"name": "alisa", "kv_sparsity": 0.6})
    results = load_results([tmp_path])
    assert len(set(unique_labels(results))) == 4
    lines = {p["line"] for p in throughput_points(results, [])}
    assert {"sparse-a · alisa (sim)", "sparse-b · alisa (sim)"} <= lines


def test_validation_scatter_has_units_and_names_its_points():
    from alisa_sim.report import scatter_figure

    def metrics(value):
        return {name: {"predicted": value * 1.1, "measured": value, "error_pct": 10.0} for name in (
            "prefill_s", "decode_step_mean_s", "total_s", "throughput_tok_s", "peak_gpu_bytes")}

    pairs = [{"label": "run-a", "workload": "opt b=1", "metrics": metrics(0.5)},
             {"label": None, "workload": "opt b=2", "metrics": metrics(2.0)}]
    summary = {name: {"mape": 10.0, "worst": 10.0, "worst_pair": "x", "pairs": 2} for name in pairs[0]["metrics"]}
    fig = scatter_figure({"pairs": pairs, "summary": summary})
    titles = [fig.layout[f"xaxis{i or ''}"].title.text for i in range(6) if f"xaxis{i or ''}" in fig.layout]
    assert {"measured (s)", "measured (ms)", "measured (tok/s)", "measured (GiB)"} <= set(titles)
    points = next(t for t in fig.data if t.name == "runs")
    assert points.text[0].startswith("run-a: opt b=1") and "measured 0.5 s" in points.text[0]
    assert points.text[1].startswith("opt b=2")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_perplexity_plot_has_a_dense_baseline_and_renders(tmp_path):
    from alisa_exec.accuracy.report import perplexity_figure, write_report

    report = json.loads((Path(__file__).resolve().parent.parent / "reports" / "accuracy" / "results.json").read_text())
    fig = perplexity_figure(report)
    dense = [t for t in fig.data if t.legendgroup == "dense"]
    settings = {(r["context"], r.get("prefill", 0)) for r in report["results"]}
    assert len(dense) == len(settings) and sum(bool(t.showlegend) for t in dense) == 1
    assert dense[0].line.dash == "dash" and "<br>" in fig.layout.title.text and fig.layout.width >= 900
    written = write_report(report, tmp_path / "accuracy")
    dom, errors = render(written[0], tmp_path)
    assert errors == [] and 'class="main-svg"' in dom


@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (apt-get install chromium)")
def test_compare_page_renders(tmp_path):
    workload = tmp_path / "w.yaml"
    workload.write_text(json.dumps({"model": "opt-6.7b", "hardware": "paper-h100-80g", "batch_size": 4,
                                    "prompt_len": 32, "gen_len": 4, "policy": {"name": "dense"},
                                    "memory": {"gpu_gb": 16}}))
    out = tmp_path / "cmp"
    assert main(["compare", str(workload), "--policies", "dense,accelerate", "--batches", "4,256",
                 "--out", str(out), "--json"]) == 0
    dom, errors = render(out / "compare.html", tmp_path)
    assert errors == []
    assert_rendered(dom, ["throughput", "ratio"])

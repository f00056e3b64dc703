"""`alisa-sim compare`: one table of policies x batches with ratios to a baseline and OOM reasons, vLLM's benchmark
key names in --json, a Result per run, a plotly page; overrides applied per policy; bad input exits 2."""

import json

import pytest
import yaml

from alisa_sim.cli import main
from alisa_sim.validate import load_results

WORKLOAD = {"model": "opt-6.7b", "hardware": "paper-h100-80g", "batch_size": 8, "prompt_len": 64, "gen_len": 8,
            "policy": {"name": "alisa", "kv_sparsity": 0.5}, "memory": {"gpu_gb": 16}}


@pytest.fixture()
def workload(tmp_path):
    path = tmp_path / "opt-small.yaml"
    path.write_text(yaml.safe_dump(WORKLOAD))
    return path


def _compare(workload, tmp_path, capsys, *extra):
    out = tmp_path / "cmp"
    assert main(["compare", str(workload), "--policies", "alisa,flexgen,dense,accelerate", "--batches", "4,128",
                 "--baseline", "accelerate", "--out", str(out), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out), out


def test_compare_table_ratios_and_oom_reasons(workload, tmp_path, capsys):
    document, out = _compare(workload, tmp_path, capsys)
    runs = {(r["policy"], r["batch_size"]): r for r in document["runs"]}
    assert set(runs) == {(p, b) for p in ("alisa", "flexgen", "dense", "accelerate") for b in (4, 128)}
    assert document["baseline"] == "accelerate" and document["label"] == "opt-small"
    dense_big = runs["dense", 128]
    assert dense_big["oom"] and "GPU memory" in dense_big["reason"] and "vllm" not in dense_big
    assert dense_big["vs_baseline"]["throughput_x"] is None
    for (policy, batch), row in runs.items():
        base = runs["accelerate", batch]
        if not row["oom"] and not base["oom"]:
            assert row["vs_baseline"]["throughput_x"] == pytest.approx(
                row["metrics"]["throughput_tok_s"] / base["metrics"]["throughput_tok_s"])
    assert runs["accelerate", 4]["vs_baseline"]["throughput_x"] == pytest.approx(1.0)
    # The file's own policy keeps its knobs; the others run with their defaults.
    results = {(r.data["workload"]["policy"]["name"], r.data["workload"]["batch_size"]): r.data
               for r in load_results([out / "runs"])}
    assert results["alisa", 4]["workload"]["policy"]["kv_sparsity"] == 0.5
    assert results["flexgen", 4]["workload"]["policy"] == {"name": "flexgen", "percent": None, "gpu_batch_size": None,
                                                           "num_gpu_batches": None, "cpu_attention": None,
                                                           "overlap": True, "pin_weight": True}
    assert all(r["label"] == "opt-small" for r in results.values())
    assert (out / "compare.html").read_text().count("Plotly.newPlot") == 2


def test_compare_json_speaks_vllms_benchmark_keys(workload, tmp_path, capsys):
    document, _ = _compare(workload, tmp_path, capsys)
    row = next(r for r in document["runs"] if r["policy"] == "alisa" and r["batch_size"] == 4)
    m, v = row["metrics"], row["vllm"]
    assert v["num_requests"] == 4 and v["elapsed_time"] == m["total_s"]
    assert v["total_num_tokens"] == 4 * (64 + 8)
    assert v["tokens_per_second"] == pytest.approx(4 * 72 / m["total_s"])  # vLLM counts prompt + output tokens
    assert v["requests_per_second"] == pytest.approx(4 / m["total_s"])
    assert v["output_throughput"] == m["throughput_tok_s"]
    assert v["mean_ttft_ms"] == pytest.approx(m["prefill_s"] * 1e3)
    assert v["mean_tpot_ms"] == pytest.approx(m["decode_step_s"]["mean"] * 1e3)
    assert document["run"]["profile"]["name"] == "paper-h100-80g"


def test_policy_overrides_apply_where_the_knob_exists(workload, tmp_path, capsys):
    document, out = _compare(workload, tmp_path, capsys, "--set", "policy.kv_sparsity=0.9", "--set", "gen_len=4")
    assert document["skipped_overrides"] == ["flexgen: --set policy.kv_sparsity=0.9 (no such knob)",
                                             "dense: --set policy.kv_sparsity=0.9 (no such knob)",
                                             "accelerate: --set policy.kv_sparsity=0.9 (no such knob)"]
    results = load_results([out / "runs"])
    assert {r.data["workload"]["gen_len"] for r in results} == {4}
    assert {r.data["workload"]["policy"].get("kv_sparsity") for r in results
            if r.data["workload"]["policy"]["name"] == "alisa"} == {0.9}


def test_compare_prints_a_table(workload, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["compare", str(workload), "--policies", "dense,accelerate", "--batches", "4,128",
                 "--out", str(tmp_path / "c")]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("x dense", "GiB", "GB", "out of GPU memory", "1.00x", "compare.html"):
        assert expected in text, expected


@pytest.mark.parametrize("args, message", [
    (["--policies", "alisa,nope"], "unknown policy nope"),
    (["--policies", "alisa", "--baseline", "vllm"], "--baseline vllm: not among"),
    (["--batches", "4,x"], "--batches"),
    (["--batches", "0"], "at least 1"),
    (["--set", "batch_size=-3"], "field 'batch_size'"),
    (["--set", "nonsense=1"], "field 'nonsense'"),
])
def test_bad_compare_input_exits_2(workload, tmp_path, capsys, args, message):
    out = tmp_path / "bad"
    assert main(["compare", str(workload), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()

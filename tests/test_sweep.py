"""`alisa-sim sweep`: grid expansion (groups, the sparsity axis), the CSV table streamed by a local process pool and
by Ray (identical tables), failed and out-of-memory points as rows, reruns that skip done points, a worker that dies,
bad sweep files; the shipped Fig. 9 grid."""

import csv
import os
from pathlib import Path

import pytest
import yaml

from alisa_sim.cli import main
from alisa_sim.sweep import COLUMNS, SweepSpec, expand, load_sweep, read_table, run_point, run_sweep
from alisa_sim.workload import POLICY_NAMES

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(name="tiny-opt", family="opt", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=1024,
            vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True, norm_eps=1e-5)
SMALL_SWEEP = {
    "base": {"prompt_len": 32, "gen_len": 8},
    "models": [TINY, "opt-6.7b"],
    "hardware": ["h100"],
    "batches": [1, 4],
    "policies": ["dense", "accelerate"],
    "groups": [{}, {"models": ["opt-6.7b"], "batches": [2], "policies": [{"name": "dense"}],
                    "hardware": ["h100"]}],
}


def _points(data=SMALL_SWEEP):
    return expand(SweepSpec.model_validate(data))


def _rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def dies_on_batch_4(point, base_dir):
    """A point runner whose worker process dies (no exception, no row) on batch 4."""
    if point.workload["batch_size"] == 4:
        os._exit(3)
    return run_point(point, base_dir)


def test_grid_expansion_groups_sparsity_and_stable_ids():
    points = _points()
    assert len(points) == 2 * 2 * 2 + 1  # the second group's single point is not in the first
    first = points[0].workload
    assert first == {"prompt_len": 32, "gen_len": 8, "model": TINY, "hardware": "h100", "batch_size": 1,
                     "policy": {"name": "dense"}}
    assert [p.id for p in points] == [p.id for p in _points()] and len({p.id for p in points}) == len(points)
    sparse = _points({**SMALL_SWEEP, "groups": [], "policies": ["dense", "alisa", "not-yet-a-policy"],
                      "sparsities": [0.5, 0.8]})
    by_policy = {}
    for p in sparse:
        by_policy.setdefault(p.workload["policy"]["name"], []).append(p.workload["policy"].get("kv_sparsity"))
    assert by_policy["dense"] == [None] * 4  # no kv_sparsity knob: once per model and batch
    assert by_policy["not-yet-a-policy"] == [0.5, 0.8] * 4  # unknown to this build: given the axis
    if "alisa" in POLICY_NAMES:
        assert by_policy["alisa"] == [0.5, 0.8] * 4


def test_local_sweep_streams_rows_records_failures_and_oom_and_rerun_skips_done(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    data = {**SMALL_SWEEP, "policies": ["dense", "no-such-policy"], "groups": [],
            "models": [TINY, "opt-13b"], "base": {"prompt_len": 32, "gen_len": 8, "memory": {"gpu_gb": 20}}}
    sweep.write_text(yaml.safe_dump(data))
    out = tmp_path / "table.csv"
    assert main(["sweep", str(sweep), "--workers", "2", "--out", str(out)]) == 1  # failed points: exit 1
    text = capsys.readouterr().out
    assert "not in this build" in text and "failed" in text
    rows = _rows(out)
    assert list(rows[0]) == list(COLUMNS) and len(rows) == 8
    status = {(r["model"], r["batch_size"], r["policy"]): r["status"] for r in rows}
    assert status[("tiny-opt", "1", "dense")] == "ok"
    assert status[("opt-13b", "4", "dense")] == "oom"  # 26 GB of weights in a 20 GB GPU
    assert all(s == "failed" for (_, _, policy), s in status.items() if policy == "no-such-policy")
    assert "no-such-policy" in next(r["error"] for r in rows if r["status"] == "failed")
    ok = next(r for r in rows if r["status"] == "ok")
    assert float(ok["throughput_tok_s"]) > 0 and float(ok["total_s"]) > 0
    assert [r["point"] for r in rows] == [p.id for p in load_sweep(sweep)[1]]  # rewritten in grid order

    before = out.read_bytes()
    assert main(["sweep", str(sweep), "--workers", "2", "--out", str(out)]) == 1
    assert "4 already done, now 0 ok, 0 out of memory, 4 failed" in " ".join(capsys.readouterr().out.split())
    assert out.read_bytes() == before  # failed points retried, nothing else rerun, same table


def test_killed_run_partial_line_and_dead_worker(tmp_path):
    points = _points()
    out = tmp_path / "table.csv"
    outcome = run_sweep(points, out, workers=2, progress=False, run=dies_on_batch_4)
    rows = {r["point"]: r for r in _rows(out)}
    assert len(rows) == len(points)
    for p in points:
        expected = "failed" if p.workload["batch_size"] == 4 else "ok"
        assert rows[p.id]["status"] == expected, p.workload
    assert outcome.counts == {"ok": 5, "oom": 0, "failed": 4}
    assert all("worker process died" in rows[p.id]["error"] for p in points if p.workload["batch_size"] == 4)
    # A run killed while writing leaves a partial last line: it is ignored and the rerun finishes the table.
    with out.open("a") as handle:
        handle.write(points[0].id + ",ok,tiny")
    outcome = run_sweep(points, out, workers=2, progress=False)
    assert outcome.skipped == 5 and outcome.counts["ok"] == 4
    assert all(r["status"] == "ok" for r in read_table(out).values()) and len(_rows(out)) == len(points)


@pytest.mark.parametrize("content,message", [
    ("models: [opt-6.7b]\nbatches: [1]\npolicies: [dense]\nbogus: 1\n", "bogus"),
    ("models: [opt-6.7b]\nbatches: [1]\npolicies: [dense]\n", "no 'hardware' axis"),
    ("hardware: [h100]\nmodels: [opt-6.7b]\nbatches: [0]\npolicies: [dense]\n", "batches"),
    ("- just a list\n", "mapping"),
])
def test_bad_sweep_files_exit_2_with_one_message(tmp_path, capsys, content, message):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(content)
    assert main(["sweep", str(sweep), "--out", str(tmp_path / "t.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alisa-sim: error:") and message in err
    assert not (tmp_path / "t.csv").exists()


def test_a_table_of_another_format_is_not_appended_to(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({**SMALL_SWEEP, "groups": []}))
    out = tmp_path / "t.csv"
    out.write_text("a,b\n1,2\n")
    assert main(["sweep", str(sweep), "--out", str(out), "--workers", "1"]) == 2
    assert "not a sweep table" in capsys.readouterr().err


def test_fig9_grid_is_the_papers():
    spec, points = load_sweep(ROOT / "workloads" / "sweeps" / "fig9.yaml")
    assert len(points) == 6 * 5 * 5
    pairs = {(p.workload["model"], p.workload["hardware"]) for p in points}
    assert pairs == {(m, "paper-v100-32g") for m in ("opt-6.7b", "opt-13b", "llama-7b", "llama-13b")} | \
        {(m, "paper-h100-80g") for m in ("opt-30b", "llama-33b")}
    assert {p.workload["batch_size"] for p in points} == {4, 8, 16, 32, 64}
    assert {p.workload["prompt_len"] for p in points} == {128} and {p.workload["gen_len"] for p in points} == {512}
    alisa = [p.workload["policy"] for p in points if p.workload["policy"]["name"] == "alisa"]
    assert len(alisa) == 30 and all(policy["kv_sparsity"] == 0.8 for policy in alisa)


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


def test_ray_backend_gives_the_local_table(tmp_path, local_ray):
    points = _points()
    failing = _points({**SMALL_SWEEP, "groups": [], "models": ["no-such-model"], "batches": [1],
                       "policies": ["dense"]})
    local, remote = tmp_path / "local.csv", tmp_path / "ray.csv"
    run_sweep(points + failing, local, workers=2, progress=False)
    outcome = run_sweep(points + failing, remote, backend="ray", workers=2, progress=False)
    assert outcome.counts == {"ok": len(points), "oom": 0, "failed": 1}
    assert remote.read_bytes() == local.read_bytes()
    assert "no-such-model" in _rows(remote)[-1]["error"]

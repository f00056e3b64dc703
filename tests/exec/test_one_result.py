"""One Result and one trace for both runners: every policy's `alisa-exec run` and `alisa-sim run` Result JSON validates
against the one schema (`alisa_sim.results.ResultSchema`), every policy's exec trace has the same tracks, and the
step rows carry the bytes and token rows each step moved."""

import json

import pytest
import yaml

from alisa_exec.cli import main
from alisa_exec.policies import EXEC_POLICIES
from alisa_exec.kv_cache import ROW_COUNTERS
from alisa_sim.cli import main as sim_main
from alisa_sim.results import validate_result

MODEL = dict(name="tiny-llama", family="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
             ffn_dim=64, vocab_size=50, max_position_embeddings=64, tie_word_embeddings=False, norm_eps=1e-5,
             dtype_bytes=4)
POLICIES = {"dense": {}, "zero": {}, "alisa": {"kv_sparsity": 0.5, "p1": 1, "alpha": 0.5, "p2": 3, "beta": 0.5},
            "flexgen": {"percent": [50, 50, 50, 50, 100, 0], "gpu_batch_size": 2, "num_gpu_batches": 1},
            "accelerate": {}, "vllm": {"block_size": 4, "swap_space": 0.0001}, "h2o": {"kv_sparsity": 0.5},
            "streamingllm": {"kv_sparsity": 0.5}}
EXEC_TRACKS = ["steps", "GPU compute", "H2D copy", "D2H copy", "CPU"]


def test_every_policy_the_executor_runs_is_here():
    assert set(POLICIES) == set(EXEC_POLICIES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(exec Result, exec trace, sim Result) of a tiny run of every policy."""
    found = {}
    for name, params in POLICIES.items():
        folder = tmp_path_factory.mktemp(name)
        workload = folder / "workload.yaml"
        workload.write_text(yaml.safe_dump({"model": MODEL, "hardware": "h100", "batch_size": 2, "prompt_len": 8,
                                            "gen_len": 6, "memory": {"gpu_gb": 0.005},
                                            "policy": {"name": name, **params}}))
        assert main(["run", str(workload), "--device", "cpu", "--out", str(folder / "exec")]) == 0
        assert sim_main(["run", str(workload), "--out", str(folder / "sim")]) == 0
        found[name] = tuple(json.loads((folder / where / what).read_text())
                            for where, what in (("exec", "result.json"), ("exec", "trace.json"),
                                                ("sim", "result.json")))
    return found


@pytest.mark.parametrize("name", list(POLICIES))
def test_both_runners_results_follow_one_schema(runs, name):
    measured, _, predicted = runs[name]
    for result in (measured, predicted):
        validate_result(result)
    assert measured["source"] == "exec" and predicted["source"] == "sim"
    assert measured["workload"] == predicted["workload"] and measured["plan"] == predicted["plan"]
    assert [s["kind"] for s in measured["steps"]][:1] == ["prefill"]
    # The same steps (vLLM's: the same scheduler's iterations), in the same phases.
    assert [(s["kind"], s["label"], s["phase"], s["tokens"]) for s in measured["steps"]] == [
        (s["kind"], s["label"], s["phase"], s["tokens"]) for s in predicted["steps"]]


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_step_row_counts_its_traffic(runs, name):
    measured, _, _ = runs[name]
    for row in measured["steps"]:
        assert set(ROW_COUNTERS) | {"h2d_index_bytes", "d2h_index_bytes"} <= set(row)
    m = measured["metrics"]
    assert m["h2d_bytes"] == sum(s["h2d_bytes"] for s in measured["steps"])
    assert m["d2h_bytes"] == sum(s["d2h_bytes"] for s in measured["steps"])
    for counter in ROW_COUNTERS:
        assert m[counter] == sum(s[counter] for s in measured["steps"])
    moved = m["h2d_bytes"] + m["d2h_bytes"]
    assert (moved > 0) == (name in ("alisa", "flexgen", "accelerate", "zero")), moved


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policys_trace_has_the_same_tracks(runs, name):
    _, trace, _ = runs[name]
    events = trace["traceEvents"]
    tracks = [e["args"]["name"] for e in sorted((e for e in events if e.get("name") == "thread_name"),
                                                key=lambda e: e["tid"])]
    assert tracks == EXEC_TRACKS
    counters = [e for e in events if e["ph"] == "C"]
    assert counters[0]["ts"] == 0 and counters[0]["args"] == {"gpu": 0, "cpu": 0}
    prefill = next(e for e in events if e["ph"] == "X" and e["tid"] == 0)
    assert prefill["args"] == {"kind": "prefill"}  # a prefill has no decode phase
    assert {e["tid"] for e in events if e["ph"] == "X"} >= {0, 1}  # steps, and ops on the GPU compute track


def test_the_simulators_serial_track_appears_only_with_overlap_off(tmp_path):
    for overlap in (True, False):
        workload = tmp_path / "w.yaml"
        workload.write_text(yaml.safe_dump({"model": MODEL, "hardware": "h100", "batch_size": 2, "prompt_len": 8,
                                            "gen_len": 4, "overlap": overlap, "policy": {"name": "accelerate"}}))
        assert sim_main(["run", str(workload), "--out", str(tmp_path / str(overlap))]) == 0
        trace = json.loads((tmp_path / str(overlap) / "trace.json").read_text())
        names = [e["args"]["name"] for e in trace["traceEvents"] if e.get("name") == "thread_name"]
        assert ("serial (overlap off)" in names) == (not overlap)
        assert names[:5] == EXEC_TRACKS

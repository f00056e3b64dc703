"""The tiered KV cache and `alisa-exec run` of tiered plans on the CPU: token rows (plain and INT8), the dry run that
sizes a plan before anything is allocated, plans that cannot fit (exit 2, one message, no output), the Result JSON
against the simulator's, the trace's tracks, Plan JSON input, and Ctrl-C leaving a complete Result or none."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from alisa_exec import executor
from alisa_exec.cli import main
from alisa_exec.kv_cache import CPU, GPU, TokenRows, Tiers
from alisa_sim.cli import main as sim_main
from alisa_sim.errors import SpecError
from alisa_sim.ops import KINDS
from alisa_sim.workload import load_workload

DEVICE = torch.device("cpu")
MODEL = dict(name="tiny-llama", family="llama", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
             ffn_dim=128, vocab_size=100, max_position_embeddings=256, tie_word_embeddings=False, norm_eps=1e-5,
             dtype_bytes=4)


def write_workload(folder: Path, policy: dict, gpu_gb: float | None = None, **overrides) -> Path:
    data = {"model": MODEL, "hardware": "h100", "batch_size": 4, "prompt_len": 16, "gen_len": 24, "policy": policy,
            **overrides}
    if gpu_gb is not None:
        data["memory"] = {"gpu_gb": gpu_gb}
    path = folder / "workload.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tight_gb(folder: Path, policy: dict) -> float:
    """About the smallest memory.gpu_gb the plan fits in."""
    low, high = 1e-5, 1e-2
    for _ in range(16):
        middle = (low * high) ** 0.5
        try:
            executor.plan_run(load_workload(write_workload(folder, policy, middle)), DEVICE, torch.float32)
            high = middle
        except SpecError:
            low = middle
    return high


# ---- token rows ----------------------------------------------------------------------------------------------------

def test_int8_rows_round_trip_within_half_a_step():
    tiers = Tiers(DEVICE)
    rows = TokenRows(tiers, GPU, "kv", 5, 3, 128, torch.float32, int8=True, group=64)
    values = torch.randn(5, 3, 128)
    rows.store(slice(0, 5), values)
    step = rows.scale.float().repeat_interleave(64, dim=-1)
    assert ((rows.read(slice(0, 5)) - values).abs() <= step / 2 + 1e-6).all()
    assert rows.row_bytes == 128 + 2 * 2 * 4  # levels, then a float32 scale and zero per group of 64


@pytest.mark.parametrize("int8", [False, True])
def test_gather_reads_each_sequences_own_slots(int8):
    tiers = Tiers(DEVICE)
    rows = TokenRows(tiers, CPU, "kv", 7, 2, 16, torch.float32, int8=int8, group=8)
    rows.store(slice(0, 7), torch.randn(7, 2, 16))
    slots = torch.tensor([[6, 0, 3], [1, 1, 5]])
    stored = rows.read(slice(0, 7))
    want = torch.stack([stored[slots[b], b] for b in range(2)])
    assert torch.equal(rows.gather(slots), want)
    staged = rows.staging(tiers, CPU, "kv_staging", 3)
    rows.flat_rows(slots[1] * 2 + 1, staged.first(3))
    assert torch.equal(rows.decode(staged.first(3)), want[1])


def test_a_dry_run_counts_what_allocation_holds():
    dry, real = Tiers(DEVICE, dry=True), Tiers(DEVICE)
    for tiers in (dry, real):
        TokenRows(tiers, GPU, "kv", 9, 4, 32, torch.float32, int8=True, group=16)
        TokenRows(tiers, CPU, "layer_inputs", 3, 4, 48, torch.float16)
    assert dry.held == real.held == {GPU: {"kv": 9 * 4 * (32 + 2 * 2 * 4)}, CPU: {"layer_inputs": 3 * 4 * 48 * 2}}
    assert dry.empty(GPU, "x", (2, 2), torch.float32).device.type == "meta"


@pytest.mark.parametrize("policy", [
    {"name": "dense"},
    {"name": "zero"},
    {"name": "alisa", "kv_sparsity": 0.5, "p2": 3, "beta": 0.5},
    {"name": "accelerate"},
    {"name": "flexgen", "percent": [50, 50, 50, 50, 100, 0], "gpu_batch_size": 2, "num_gpu_batches": 2,
     "cpu_attention": True},
    {"name": "vllm", "block_size": 8, "swap_space": 0.001},
    {"name": "h2o", "kv_sparsity": 0.5},
])
def test_the_plans_memory_is_what_the_run_allocates(tmp_path, policy):
    wl = load_workload(write_workload(tmp_path, policy, gpu_gb=tight_gb(tmp_path, policy)))
    plan = executor.plan_run(wl, DEVICE, torch.float32)
    measured = executor.execute(plan, DEVICE, torch.float32, "dummy", 0)
    assert measured.peak_gpu_bytes == sum(plan.gpu_bytes.values())  # the GPU tier plus the transient working set
    assert measured.peak_cpu_bytes == sum(plan.cpu_bytes.values())


# ---- alisa-exec run ------------------------------------------------------------------------------------------------

def run_cli(workload: Path, out: Path, *extra: str) -> int:
    return main(["run", str(workload), "--device", "cpu", "--out", str(out), *extra])


def test_tight_alisa_run_writes_the_simulators_result_keys_and_a_trace_with_copy_tracks(tmp_path, capsys):
    policy = {"name": "alisa", "kv_sparsity": 0.5, "int8": False, "p2": 4, "beta": 0.5}
    gpu_gb = tight_gb(tmp_path, policy)
    workload = write_workload(tmp_path, policy, gpu_gb)
    out = tmp_path / "exec"
    assert run_cli(workload, out) == 0
    printed = capsys.readouterr().out
    assert "plan: alisa:" in printed and "KV phases" in printed
    result = json.loads((out / "result.json").read_text())
    assert sim_main(["run", str(workload), "--out", str(tmp_path / "sim")]) == 0
    predicted = json.loads((tmp_path / "sim" / "result.json").read_text())
    assert result["source"] == "exec" and result["workload"] == predicted["workload"]
    assert set(predicted) <= set(result) and set(predicted["metrics"]) <= set(result["metrics"])
    assert set(predicted["steps"][0]) <= set(result["steps"][0])
    assert set(result["breakdown_s"]) == set(KINDS) | {"idle"}
    m = result["metrics"]
    assert m["total_s"] == pytest.approx(m["prefill_s"] + m["decode_s"])
    assert m["throughput_tok_s"] == pytest.approx(4 * 24 / m["total_s"])
    assert m["h2d_bytes"] == sum(s["h2d_bytes"] for s in result["steps"]) > 0
    assert m["recomputed_tokens"] > 0 and m["fetched_tokens"] > 0 and m["offloaded_tokens"] > 0
    assert [p["phase"] for p in result["phases"]] == [2, 3]  # the tight budget puts the prompt on the CPU
    assert result["phases"][0]["first_step"] == 1 and result["phases"][1]["first_step"] == 4
    assert result["plan"]["params"]["p2"] == 4 and result["plan"]["policy"] == "alisa"
    assert result["plan_gpu_capacity_bytes"] <= gpu_gb * 1e9
    assert sum(result["memory_plan"]["gpu_bytes"].values()) <= gpu_gb * 1e9

    trace = json.loads((out / "trace.json").read_text())
    tracks = {e["args"]["name"]: e["tid"] for e in trace["traceEvents"] if e["ph"] == "M" and "tid" in e}
    assert {"steps", "GPU compute", "H2D copy", "D2H copy", "CPU"} <= set(tracks)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    by_track = {tid: [e for e in spans if e["tid"] == tid] for tid in tracks.values()}
    assert len(by_track[tracks["steps"]]) == 24
    for name in ("GPU compute", "H2D copy", "D2H copy", "CPU"):
        assert by_track[tracks[name]], name
    assert {e["name"] for e in by_track[tracks["H2D copy"]]} >= {"kv_fetch", "input_fetch"}
    assert {e["name"] for e in by_track[tracks["GPU compute"]]} >= {"qkv_proj", "attention", "selection", "recompute"}


def test_the_executor_runs_the_plan_json_the_simulator_wrote(tmp_path, capsys):
    workload = write_workload(tmp_path, {"name": "alisa", "kv_sparsity": 0.0, "int8": False}, gpu_gb=0.00068)
    assert sim_main(["plan", str(workload), "--json"]) == 0
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(capsys.readouterr().out)
    planned = json.loads(plan_path.read_text())
    assert run_cli(plan_path, tmp_path / "out") == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["workload"] == planned["workload"]
    assert result["plan"]["params"] == planned["params"]  # the same p1, p2, alpha, beta
    assert result["plan"]["gpu_kv_budget_tokens"] == planned["gpu_kv_budget_tokens"] < 16 + 24 - 1
    assert result["plan_gpu_capacity_bytes"] == 0.00068e9  # fitted as planned, no re-planning


@pytest.mark.parametrize("policy,gpu_gb,message", [
    ({"name": "accelerate"}, 0.0002, "does not fit by the simulator's accounting: out of GPU memory before the "
                                     "prefill"),
    ({"name": "vllm", "block_size": 8}, 0.004, "does not fit by the simulator's accounting: out of GPU memory for "
                                               "vLLM's KV pool"),
    ({"name": "alisa", "selection": "per_head"}, None, "policy.selection = 'per_head' is simulated but not executed"),
    ({"name": "alisa", "dynamic_scheduling": False}, None, "dynamic_scheduling = False is simulated but not"),
])
def test_a_plan_that_cannot_run_exits_2_before_allocating(tmp_path, capsys, policy, gpu_gb, message):
    out = tmp_path / "out"
    assert run_cli(write_workload(tmp_path, policy, gpu_gb), out) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("alisa-exec: error:") and "Traceback" not in err
    assert not out.exists()


def test_the_executor_plans_for_what_it_really_holds(tmp_path):
    """The simulator counts what the executor holds on the GPU: SWA's selection state, the staging buffers with
    their row indices, the window ring's spare slot. At the tightest budget the plan needs no second planning and
    the executor's bytes are the simulated peak."""
    policy = {"name": "alisa", "kv_sparsity": 0.5, "int8": False, "p2": 2, "beta": 0.5}
    wl = load_workload(write_workload(tmp_path, policy, tight_gb(tmp_path, policy)))
    plan = executor.plan_run(wl, DEVICE, torch.float32)
    assert plan.replans == 0 and not any("planned for" in note for note in plan.notes)
    assert sum(plan.gpu_bytes.values()) == plan.simulation.peak_gpu_bytes <= wl.gpu_capacity_bytes
    assert plan.gpu_bytes["selection_state"] == plan.sim.static_memory().gpu["selection_state"]


def test_an_interrupt_while_writing_leaves_no_result(tmp_path, monkeypatch, capsys):
    import alisa_sim.results as results

    def interrupted_replace(source, target):  # Ctrl-C once the temporary files are written, before the renames
        assert Path(source).name.startswith(".") and ".writing-" in Path(source).name
        raise KeyboardInterrupt

    monkeypatch.setattr(results.os, "replace", interrupted_replace)
    out = tmp_path / "out"
    assert run_cli(write_workload(tmp_path, {"name": "accelerate"}), out) == 130
    assert "interrupted (SIGINT) before its outputs were written" in capsys.readouterr().err
    assert list(out.iterdir()) == []  # not even the temporary files


def test_ctrl_c_during_a_run_leaves_a_complete_result_or_none(tmp_path):
    # Long enough (seconds) that the signal lands mid-run, whatever the machine's speed.
    workload = write_workload(tmp_path, {"name": "alisa", "kv_sparsity": 0.5}, gen_len=2000, prompt_len=32,
                              model={**MODEL, "max_position_embeddings": 4096})
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "alisa_exec.cli", "run", str(workload), "--device", "cpu",
                                "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                               env=env)
    for line in process.stderr:
        if "generating" in line:
            break
    time.sleep(1.0)
    process.send_signal(signal.SIGINT)
    err = process.stderr.read()
    assert process.wait(timeout=60) == 130, err
    assert "interrupted" in err and "Traceback" not in err
    files = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert files in ([], ["result.json"], ["result.json", "trace.json"])
    if files:
        assert json.loads((out / "result.json").read_text())["metrics"]["oom"] is False


def test_policies_benchmark_smoke(tmp_path, monkeypatch, capsys, quick_cpu_profile):
    """benchmarks/exec_policies.py on the CPU: a tiny model, the session's quick CPU profile (the GPU check's dry run
    runs --smoke measuring its own), measured beside predicted."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import exec_policies

    gen_len = 8
    assert exec_policies.main(["--smoke", "--batches", "2", "--policies", "alisa,flexgen,h2o", "--hardware",
                               str(quick_cpu_profile), "--gen-len", str(gen_len), "--out", str(tmp_path)]) == 0
    report = json.loads(next(tmp_path.glob("exec_policies-cpu-*.json")).read_text())
    rows = {row["policy"]: row for row in report["rows"]}
    assert set(rows) == {"alisa", "flexgen", "h2o"} and all(row["batch"] == 2 for row in rows.values())
    for row in rows.values():
        assert row["status"] == "measured" and row["measured_tok_s"] > 0 and row["predicted_tok_s"] > 0
    # The planner's Phase III start depends on the session's quick profile (measured beside the other tests); the
    # run must follow the plan, whichever it is: decode steps 1 .. gen_len - 1 are Phase II before p2, III from it.
    p2 = int(re.search(r"p2=(\d+)", rows["alisa"]["plan"]).group(1))
    assert "p1=0" in rows["alisa"]["plan"]
    assert rows["alisa"]["phases"] == "/".join(sorted({"2" if step < p2 else "3" for step in range(1, gen_len)}))
    assert "alisa / flexgen" in capsys.readouterr().out
    assert (tmp_path / next(tmp_path.glob("*.json")).with_suffix(".md").name).exists()
    del sys.modules["exec_policies"]

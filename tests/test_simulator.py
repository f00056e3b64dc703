"""Whole simulations: physics sanity against the measured profiles, out-of-memory results, the Result and trace contracts."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alisa_sim import engine, simulator
from alisa_sim.cli import main
from alisa_sim.cost_model import CostModel
from alisa_sim.results import build_result
from alisa_sim.simulator import simulate
from alisa_sim.trace import build_trace
from alisa_sim.workload import resolve_workload


def _workload(**overrides):
    data = {"model": "opt-6.7b", "hardware": "h200", "batch_size": 8, "prompt_len": 128, "gen_len": 32,
            "policy": {"name": "dense"}}
    data.update(overrides)
    return resolve_workload(data)


def _result(**overrides):
    return build_result(simulate(_workload(**overrides)))


@pytest.mark.parametrize("model", ["opt-6.7b", "llama-13b", "pythia-12b"])
@pytest.mark.parametrize("batch", [1, 8, 32])
@pytest.mark.parametrize("hardware", ["h200", "h100", "paper-v100-32g"])
def test_dense_decode_step_never_beats_hbm(model, batch, hardware):
    wl = _workload(model=model, batch_size=batch, hardware=hardware, gen_len=8)
    sim = simulate(wl)
    bandwidth = wl.hardware.gpu.hbm_GBps * 1e9
    for record in sim.decode_steps:
        context = wl.workload.prompt_len + record.step
        must_read = wl.model.weight_bytes + batch * context * wl.model.kv_bytes_per_token()
        assert record.duration_s >= must_read / bandwidth


@pytest.mark.parametrize("hardware", ["paper-h100-80g", "h200", "t4-16g"])
@pytest.mark.parametrize("batch", [1, 16])
def test_accelerate_never_beats_pcie(hardware, batch):
    wl = _workload(hardware=hardware, batch_size=batch, policy={"name": "accelerate"}, gen_len=16)
    cost = CostModel(wl.hardware)
    sim = simulate(wl)
    for record in sim.decode_steps:
        kv_bytes = batch * (wl.workload.prompt_len + record.step - 1) * wl.model.kv_bytes_per_token()
        per_layer = kv_bytes / wl.model.num_layers
        assert record.duration_s >= kv_bytes / cost.h2d_bandwidth(per_layer)


@pytest.mark.parametrize("policy", ["dense", "accelerate", "zero"])
@pytest.mark.parametrize("model,batch", [("opt-6.7b", 4), ("llama-7b", 32), ("opt-13b", 16)])
def test_overlap_is_never_slower_than_additive(policy, model, batch):
    kwargs = dict(model=model, batch_size=batch, policy={"name": policy}, hardware="paper-h100-80g")
    overlapped = _result(**kwargs)["metrics"]
    additive = _result(overlap=False, **kwargs)["metrics"]
    assert overlapped["total_s"] <= additive["total_s"] * (1 + 1e-12)
    for key in ("prefill_s", "decode_s"):
        assert overlapped[key] <= additive[key] * (1 + 1e-12)


def test_zero_streams_weights_every_step():
    wl = _workload(policy={"name": "zero"}, hardware="paper-h100-80g", gen_len=4)
    result = build_result(simulate(wl))
    layers_bytes = wl.model.num_layers * wl.model.layer_weight_bytes
    assert result["metrics"]["h2d_bytes"] == pytest.approx(4 * layers_bytes, rel=1e-6)  # prefill + 3 decode steps
    step = result["metrics"]["decode_step_s"]["mean"]
    assert step >= layers_bytes / 20e9  # the paper machine's 20 GB/s link


@pytest.mark.parametrize("policy", ["accelerate", "zero", "dense"])
def test_collapsing_layers_changes_nothing(monkeypatch, policy):
    kwargs = dict(model="opt-30b", batch_size=16, policy={"name": policy}, hardware="paper-h100-80g", gen_len=6)
    collapsed = simulate(_workload(**kwargs))
    assert all(r.timing.simulated_layers < 48 for r in collapsed.steps)
    monkeypatch.setattr(engine, "_FIRST_UNROLL", 10_000)
    full = simulate(_workload(**kwargs))
    assert all(r.timing.simulated_layers == 48 for r in full.steps)
    for a, b in zip(collapsed.steps, full.steps):
        assert a.duration_s == pytest.approx(b.duration_s, rel=1e-9)


def test_result_contract():
    result = _result(policy={"name": "accelerate"})
    json.dumps(result)
    assert result["source"] == "sim" and result["hardware"] == "h200"
    m = result["metrics"]
    assert set(m) >= {"prefill_s", "decode_s", "total_s", "throughput_tok_s", "decode_step_s", "peak_gpu_bytes",
                      "peak_cpu_bytes", "h2d_bytes", "d2h_bytes", "oom"}
    assert m["total_s"] == pytest.approx(m["prefill_s"] + m["decode_s"])
    assert m["throughput_tok_s"] == pytest.approx(8 * 32 / m["total_s"])
    assert m["decode_step_s"]["max"] >= m["decode_step_s"]["p90"] >= m["decode_step_s"]["p50"] > 0
    assert [(p["phase"], p["first_step"], p["last_step"]) for p in result["phases"]] == [(2, 1, 31)]
    assert result["phases"][0]["cpu_kv_bytes_end"] == 8 * (128 + 31) * 4 * 32 * 4096
    assert m["peak_cpu_bytes"] == result["phases"][0]["cpu_kv_bytes_end"]
    assert set(result["breakdown_s"]) >= {"gemm", "attention", "selection", "h2d", "d2h", "recompute", "cpu", "idle"}
    assert result["breakdown_s"]["idle"] > 0  # the GPU waits on PCIe
    assert len(result["steps"]) == 32
    assert result["plan"]["policy"] == "accelerate" and result["plan"]["placement"]["kv_gpu"] == 0.0


def test_trace_has_a_track_per_resource_and_kv_counters():
    sim = simulate(_workload(policy={"name": "accelerate"}, gen_len=100))
    trace = build_trace(sim, op_detail_steps=10)
    events = trace["traceEvents"]
    names = {e["args"]["name"] for e in events if e.get("name") == "thread_name"}
    assert {"GPU compute", "H2D copy", "D2H copy", "CPU", "steps"} <= names
    counters = [e for e in events if e["ph"] == "C"]
    assert len(counters) == 101 and counters[-1]["args"]["cpu"] > counters[0]["args"]["cpu"]
    ops = [e for e in events if e["ph"] == "X" and e["tid"] != 0]
    assert {e["args"]["step"] for e in ops} == set(trace["otherData"]["op_detail_steps"])
    assert len(trace["otherData"]["op_detail_steps"]) == 10
    per_step = [e for e in ops if e["args"]["step"] == 99]
    assert len(per_step) == 32 * 5 + 2  # 5 ops a layer, embedding and LM head
    step_slice = next(e for e in events if e.get("name") == "decode 99")
    assert max(e["ts"] + e["dur"] for e in per_step if e["tid"] == 1) == pytest.approx(
        step_slice["ts"] + step_slice["dur"])


def test_dense_model_that_does_not_fit_is_an_oom_result(tmp_path, capsys):
    result = _result(model="opt-30b", hardware="t4-16g")
    assert result["metrics"]["oom"] is True
    assert "out of GPU memory before the prefill" in result["metrics"]["error"]
    assert "weights 59.95" in result["metrics"]["error"]
    path = tmp_path / "w.yaml"
    path.write_text("model: opt-30b\nhardware: t4-16g\nbatch_size: 1\nprompt_len: 8\ngen_len: 2\npolicy: {name: dense}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "out of GPU memory" in capsys.readouterr().err
    written = json.loads((tmp_path / "out" / "result.json").read_text())
    assert written["metrics"]["oom"] is True
    assert not (tmp_path / "out" / "trace.json").exists()


def test_kv_growth_runs_out_of_memory_at_the_step_it_overflows():
    # OPT-6.7B: 13.3 GB weights + 0.5 MB of KV per token on a GPU capped at 16 GB.
    result = _result(batch_size=16, prompt_len=128, gen_len=512, memory={"gpu_gb": 16})
    assert result["metrics"]["oom"] is True
    assert "out of GPU memory in decode " in result["metrics"]["error"]


def test_cli_json_and_files(tmp_path, capsys):
    path = tmp_path / "w.yaml"
    path.write_text("model: llama-7b\nhardware: h100\nbatch_size: 4\nprompt_len: 64\ngen_len: 8\npolicy: {name: zero}\n")
    assert main(["run", str(path), "--out", str(tmp_path / "out"), "--json", "--policy", "accelerate"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["workload"]["policy"]["name"] == "accelerate"
    assert json.loads((tmp_path / "out" / "result.json").read_text()) == printed
    assert json.loads((tmp_path / "out" / "trace.json").read_text())["traceEvents"]
    assert main(["run", str(path), "--out", str(tmp_path / "out2")]) == 0
    assert "throughput" in capsys.readouterr().out


def test_simulator_runs_without_torch(tmp_path):
    """alisa_sim must never import torch or triton: run the CLI with both made unimportable."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['triton'] = None\n"
            "from alisa_sim.cli import main\n"
            f"sys.exit(main(['run', 'workloads/opt-30b-accelerate.yaml', '--out', {str(tmp_path)!r}, '--json']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["metrics"]["throughput_tok_s"] > 0


LLAMA3_8B = {"name": "llama-3-8b", "family": "llama", "hidden_size": 4096, "num_layers": 32, "num_heads": 32,
             "num_kv_heads": 8, "ffn_dim": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
             "tie_word_embeddings": False, "norm_eps": 1e-5, "rope_theta": 500000.0}


def _step_by_step(monkeypatch, wl):
    """The same run with every decode step simulated (no run of steps collapsed)."""
    with monkeypatch.context() as patch:
        patch.setattr(simulator._DecodeRuns, "affine_run", lambda self, anchor, last: [])
        return simulate(wl)


@pytest.mark.parametrize("case", [
    # dense across the end of the profile's measured attention sizes (log-log cells below it, linear above)
    dict(model=LLAMA3_8B, batch_size=1, prompt_len=64_000, gen_len=3000),
    dict(model=LLAMA3_8B, batch_size=4, prompt_len=2000, gen_len=1500, overlap=False),
    dict(model="opt-6.7b", batch_size=16, prompt_len=128, gen_len=600, policy={"name": "accelerate"},
         hardware="paper-h100-80g"),
    dict(model="opt-6.7b", batch_size=8, prompt_len=128, gen_len=400, policy={"name": "zero"}),
    dict(model="opt-6.7b", batch_size=8, prompt_len=128, gen_len=400, policy={"name": "h2o", "kv_sparsity": 0.8}),
    dict(model="opt-30b", batch_size=64, prompt_len=128, gen_len=512, policy={"name": "alisa", "kv_sparsity": 0.8},
         hardware="paper-h100-80g"),
    dict(model="opt-13b", batch_size=32, prompt_len=128, gen_len=300, policy={"name": "flexgen"},
         hardware="paper-v100-32g"),
])
def test_collapsed_steps_equal_step_by_step_simulation(monkeypatch, case):
    wl = _workload(**case)
    collapsed, full = simulate(wl), _step_by_step(monkeypatch, wl)
    assert full.interpolated_steps == 0 and len(collapsed.steps) == len(full.steps)
    for a, b in zip(collapsed.steps, full.steps):
        assert a.duration_s == pytest.approx(b.duration_s, rel=1e-6)
        assert a.start_s == pytest.approx(b.start_s, rel=1e-6)
        assert (a.phase, a.gpu_kv_bytes, a.cpu_kv_bytes, a.plan.label) == (b.phase, b.gpu_kv_bytes, b.cpu_kv_bytes,
                                                                           b.plan.label)
        assert (a.timing.h2d_bytes, a.timing.d2h_bytes) == (b.timing.h2d_bytes, b.timing.d2h_bytes)
    print(f"{collapsed.interpolated_steps} of {wl.decode_steps} decode steps interpolated")
    ra, rb = build_result(collapsed), build_result(full)
    assert ra["metrics"]["peak_gpu_bytes"] == rb["metrics"]["peak_gpu_bytes"]
    for key in ("total_s", "decode_s", "throughput_tok_s"):
        assert ra["metrics"][key] == pytest.approx(rb["metrics"][key], rel=1e-6)
    for kind, seconds in rb["breakdown_s"].items():  # within 1e-6 of the run's time
        assert ra["breakdown_s"][kind] == pytest.approx(seconds, abs=1e-6 * rb["metrics"]["total_s"])
    if case["model"] == LLAMA3_8B:
        assert collapsed.interpolated_steps > wl.decode_steps / 2  # most steps of a dense run are interpolated
        step = collapsed.steps[len(collapsed.steps) // 2]  # an interpolated step still has its op schedule
        assert step.plan.template is None
        assert max(e.end for e in step.timing.events()) == pytest.approx(step.duration_s, rel=1e-6)


def test_decode_plans_of_the_collapsing_driver_are_the_policys():
    wl = _workload(policy={"name": "alisa", "kv_sparsity": 0.8}, model="opt-30b", hardware="paper-h100-80g",
                   batch_size=64, gen_len=40)
    sim = simulate(wl)
    for record, plan in zip(sim.steps, sim.policy.steps()):
        ours = record.plan
        assert (ours.phase, ours.kv, ours.kind, ours.label, ours.tokens, ours.sequences, ours.counters) == (
            plan.phase, plan.kv, plan.kind, plan.label, plan.tokens, plan.sequences, plan.counters)


def test_progress_stays_quiet_on_short_runs_and_prints_lines_off_a_terminal():
    import io

    from rich.console import Console

    wl = _workload(gen_len=50)
    ticks = iter(range(1000))
    quiet_out, lines_out = io.StringIO(), io.StringIO()
    quiet = simulator.SimulationProgress(wl, Console(file=quiet_out), after_s=1e9, clock=lambda: 0.0)
    simulate(wl, on_step=quiet)
    assert quiet_out.getvalue() == "" and quiet.done == 8 * 50
    # A clock that advances 1 s per step: a line once 3 s have passed, then every 10 s, and one at the end.
    lines = simulator.SimulationProgress(wl, Console(file=lines_out, width=200), after_s=3, every_s=10,
                                         clock=lambda: float(next(ticks)))
    simulate(wl, on_step=lines)
    printed = lines_out.getvalue().splitlines()
    assert printed[-1].startswith("simulating: 100% (400/400 tokens)")
    assert len(printed) == 6 and printed[0] == "simulating: 6% (24/400 tokens), 3 s elapsed, about 47 s left"
    bar_out = io.StringIO()
    with simulator.SimulationProgress(wl, Console(file=bar_out, force_terminal=True, width=120), after_s=3,
                                      clock=lambda: float(next(ticks))) as bar:
        simulate(wl, on_step=bar)
    assert "simulating" in bar_out.getvalue() and "tokens" in bar_out.getvalue()


def _cpu_profile(tmp_path: Path, dtype: str | None) -> Path:
    """The H100 profile's numbers as a CPU-device profile measured in `dtype` (None: a profile without the field)."""
    data = yaml.safe_load((Path(__file__).resolve().parent.parent / "hw_profiles" / "h100.yaml").read_text())
    data["device_kind"] = "cpu"
    if dtype:
        data["gpu"]["dtype"] = dtype
    path = tmp_path / f"cpu-{dtype}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("dtype, expected", [("float32", 4), (None, 4), ("bfloat16", 2)])
def test_a_model_spec_without_its_dtype_takes_the_profiles(tmp_path, dtype, expected):
    profile = _cpu_profile(tmp_path, dtype)
    assert _workload(model="llama-7b", hardware=str(profile)).model.dtype_bytes == expected
    spec = {"name": "tiny", "family": "llama", "hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
            "ffn_dim": 128, "vocab_size": 100, "max_position_embeddings": 256, "tie_word_embeddings": True,
            "norm_eps": 1e-5}
    assert _workload(model=spec, hardware=str(profile)).model.dtype_bytes == expected
    assert _workload(model={**spec, "dtype_bytes": 2}, hardware=str(profile)).model.dtype_bytes == 2  # said: kept
    assert _workload(model=spec, hardware="h100").model.dtype_bytes == 2


def test_paths_in_a_workload_are_its_folders_and_on_the_command_line_the_cwds(tmp_path, monkeypatch):
    profile = _cpu_profile(tmp_path, "float32")
    (tmp_path / "sub").mkdir()
    workload = tmp_path / "sub" / "w.yaml"
    workload.write_text(f"model: opt-6.7b\nhardware: ../{profile.name}\nbatch_size: 1\nprompt_len: 8\ngen_len: 2\n"
                        "policy: {name: dense}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "sub/w.yaml", "--out", "a"]) == 0  # the file's own ref, from its folder
    assert main(["run", "sub/w.yaml", "--hardware", profile.name, "--out", "b"]) == 0  # the cwd's
    for out in ("a", "b"):
        assert json.loads((tmp_path / out / "result.json").read_text())["model"] == "opt-6.7b"

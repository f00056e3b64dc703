"""`alisa-exec profile` and `alisa-exec run` on the CPU: the profile loads in the simulator, runs write a valid Result
JSON and Chrome trace, and bad input exits 2 with one message and no half-written output."""

import json
import runpy
import sys

import pytest
import torch
import yaml

from alisa_exec.cli import main
from alisa_sim.cost_model import CostModel
from alisa_sim.hardware import load_hardware_profile
from alisa_sim.ops import KINDS
from alisa_sim.model_spec import load_model_spec
from tiny_models import TINY_SPEC

BATCH, PROMPT_LEN, GEN_LEN = 3, 12, 6
METRICS = {"prefill_s", "decode_s", "total_s", "throughput_tok_s", "decode_step_s", "peak_gpu_bytes", "peak_cpu_bytes",
           "h2d_bytes", "d2h_bytes", "oom"}


def write_workload(folder, profile, **overrides):
    data = {"model": TINY_SPEC, "hardware": str(profile), "batch_size": BATCH, "prompt_len": PROMPT_LEN,
            "gen_len": GEN_LEN, "policy": {"name": "dense"}, **overrides}
    path = folder / "workload.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_quick_cpu_profile_loads_in_the_simulator(quick_cpu_profile):
    profile = load_hardware_profile(quick_cpu_profile)
    assert profile.name == "cpu-quick"
    assert "CPU" in profile.gpu.source.note and "host" in profile.link.source.note
    assert {"torch", "triton", "driver"} <= profile.provenance.software.keys()
    cost = CostModel(profile)  # timings are not compared: other processes on a shared CI machine skew them
    assert cost.gemm_s(64, 512, 512) > 0 and cost.decode_attention_s(2, 100, 8, 8, 64) > 0
    assert cost.copy_s(2**20, "h2d") > 0 and cost.prefill_attention_s(1, 128, 8, 64) > 0


def test_run_writes_result_json_and_trace(tmp_path, quick_cpu_profile):
    out = tmp_path / "out"
    assert main(["run", str(write_workload(tmp_path, quick_cpu_profile)), "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["source"] == "exec"
    assert result["workload"]["batch_size"] == BATCH and result["workload"]["model"] == TINY_SPEC
    assert result["hardware"] == "cpu-quick" and result["plan"]["policy"] == "dense"
    m = result["metrics"]
    assert METRICS <= m.keys() and m["oom"] is False
    assert m["total_s"] == pytest.approx(m["prefill_s"] + m["decode_s"])
    assert m["throughput_tok_s"] == pytest.approx(BATCH * GEN_LEN / m["total_s"])
    assert m["decode_step_s"]["max"] >= m["decode_step_s"]["p90"] >= m["decode_step_s"]["p50"] > 0
    assert m["peak_gpu_bytes"] > 0
    assert [s["step"] for s in result["steps"]] == list(range(GEN_LEN))
    kv_per_token = 2 * TINY_SPEC["num_layers"] * 2 * 8 * 4  # K and V, 2 layers, 2 kv heads x 8 dims, fp32
    assert result["phases"] == [{"phase": 1, "first_step": 1, "last_step": GEN_LEN - 1, "time_s": m["decode_s"],
                                 "gpu_kv_bytes_end": BATCH * (PROMPT_LEN + GEN_LEN - 1) * kv_per_token,
                                 "cpu_kv_bytes_end": 0}]
    assert set(result["breakdown_s"]) == set(KINDS) | {"idle"}
    assert result["breakdown_s"]["gemm"] > 0 and result["breakdown_s"]["attention"] > 0

    trace = json.loads((out / "trace.json").read_text())
    steps = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] == 0]
    assert [e["name"] for e in steps] == ["prefill"] + [f"decode {i}" for i in range(1, GEN_LEN)]
    assert all(e["dur"] > 0 for e in steps)
    assert all(a["ts"] + a["dur"] == pytest.approx(b["ts"]) for a, b in zip(steps, steps[1:]))
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert {"steps", "GPU compute", "H2D copy", "D2H copy", "CPU"} <= names
    ops = {e["name"] for e in trace["traceEvents"] if e["ph"] == "X" and e["tid"] != 0}
    assert {"qkv_proj", "attention", "out_proj_mlp", "lm_head"} <= ops  # dense runs the same layer loop


def test_run_with_hf_weights_and_json_output(tmp_path, quick_cpu_profile, tiny_hf_models, capsys):
    _, folder = tiny_hf_models["llama-gqa"]
    model = load_model_spec(str(folder)).model_dump()
    workload = write_workload(tmp_path, quick_cpu_profile, model=model)
    assert main(["run", str(workload), "--device", "cpu", "--weights", str(folder), "--out", str(tmp_path / "o"),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["weights"] == str(folder) and result["dtype"] == "float32"
    assert result == json.loads((tmp_path / "o" / "result.json").read_text())


@pytest.mark.parametrize("overrides,weights,message", [
    ({"policy": {"name": "alisa", "selection": "per_head"}}, "dummy", "is simulated but not executed"),
    ({"memory": {"gpu_gb": 1e-6}}, "dummy", "does not fit"),
    ({"model": "pythia-6.9b"}, "dummy", "gpt_neox"),
    ({}, "/no/such/weights", "not 'dummy'"),
])
def test_bad_runs_exit_2_with_one_message_and_no_output(tmp_path, quick_cpu_profile, capsys, overrides, weights,
                                                        message):
    out = tmp_path / "out"
    workload = write_workload(tmp_path, quick_cpu_profile, **overrides)
    assert main(["run", str(workload), "--device", "cpu", "--weights", weights, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("alisa-exec: error:")
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when there is no CUDA GPU")
def test_cuda_without_a_gpu_exits_2(tmp_path, quick_cpu_profile, capsys):
    assert main(["run", str(write_workload(tmp_path, quick_cpu_profile)), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_profile_out_must_be_a_yaml_file(tmp_path, capsys):
    assert main(["profile", "--device", "cpu", "--quick", "--out", str(tmp_path / "profile.txt")]) == 2
    assert "YAML file" in capsys.readouterr().err


def test_console_script_reports_a_missing_workload_without_a_traceback(tmp_path, monkeypatch, capsys):
    """`python -m alisa_exec.cli`: its `__main__` block exits with main's code (run here, in this process)."""
    monkeypatch.setattr(sys, "argv", ["alisa-exec", "run", str(tmp_path / "missing.yaml")])
    with pytest.warns(RuntimeWarning, match="found in sys.modules"), pytest.raises(SystemExit) as exited:
        runpy.run_module("alisa_exec.cli", run_name="__main__")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "workload file not found" in err and "Traceback" not in err


def test_run_takes_the_simulators_plan_json(tmp_path, quick_cpu_profile, capsys):
    """`alisa-sim plan --json` writes the plan the executor runs: the same workload, measured."""
    from alisa_sim.cli import main as sim_main

    assert sim_main(["plan", str(write_workload(tmp_path, quick_cpu_profile)), "--json"]) == 0
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(capsys.readouterr().out)
    out = tmp_path / "out"
    assert main(["run", str(plan_path), "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["workload"] == json.loads(plan_path.read_text())["workload"]
    assert result["metrics"]["throughput_tok_s"] > 0

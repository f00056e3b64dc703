"""`--set KEY=VALUE` overrides (validated like the file), run labels and the run metadata every Result records, and
the units and names the summaries print."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from alisa_sim.cli import main
from alisa_sim.errors import SpecError
from alisa_sim.hardware import load_hardware_profile
from alisa_sim.overrides import apply_overrides, parse_assignment
from alisa_sim.provenance import profile_hash

REPO = Path(__file__).resolve().parent.parent
CPU_PROFILE = REPO / "reports" / "validation" / "cpu" / "loop-0" / "profile.yaml"
WORKLOAD = {"model": "opt-6.7b", "hardware": "paper-h100-80g", "batch_size": 4, "prompt_len": 32, "gen_len": 4,
            "policy": {"name": "alisa"}}


@pytest.fixture()
def workload(tmp_path):
    path = tmp_path / "small-alisa.yaml"
    path.write_text(yaml.safe_dump(WORKLOAD))
    return path


@pytest.mark.parametrize("text, path, value", [
    ("batch_size=64", ["batch_size"], 64), ("policy.kv_sparsity=0.9", ["policy", "kv_sparsity"], 0.9),
    ("overlap=false", ["overlap"], False), ("policy.name=vllm", ["policy", "name"], "vllm"),
    ("memory={gpu_gb: 16}", ["memory"], {"gpu_gb": 16}), ("model=opt-13b", ["model"], "opt-13b"),
    ("policy.percent=[0,100,0,100,100,0]", ["policy", "percent"], [0, 100, 0, 100, 100, 0]),
])
def test_assignments_read_values_as_yaml(text, path, value):
    assert parse_assignment(text) == (path, value)


def test_overrides_nest_copy_and_refuse_to_descend_into_values():
    data = {"batch_size": 1, "policy": {"name": "alisa"}}
    changed = apply_overrides(data, ["memory.gpu_gb=16", "policy.kv_sparsity=0.5", "batch_size=2"])
    assert changed == {"batch_size": 2, "policy": {"name": "alisa", "kv_sparsity": 0.5}, "memory": {"gpu_gb": 16}}
    assert data == {"batch_size": 1, "policy": {"name": "alisa"}}
    with pytest.raises(SpecError, match="'batch_size' is 1, not a mapping"):
        apply_overrides(data, ["batch_size.x=3"])
    for bad in ("batch_size", "=3", "policy..x=1"):
        with pytest.raises(SpecError, match="expected KEY=VALUE"):
            parse_assignment(bad)


def test_run_applies_overrides_after_policy_and_records_them(workload, tmp_path, capsys):
    argv = ["run", str(workload), "--policy", "h2o", "--set", "policy.kv_sparsity=0.6", "--set", "batch_size=2",
            "--out", str(tmp_path / "o"), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["workload"]["policy"] == {"name": "h2o", "kv_sparsity": 0.6}
    assert result["workload"]["batch_size"] == 2
    assert result["run"]["command"] == "alisa-sim " + " ".join(argv)
    assert result == json.loads((tmp_path / "o" / "result.json").read_text())


@pytest.mark.parametrize("assignment, message", [
    ("batch_size=-1", "field 'batch_size'"), ("policy.kv_sparsity=1.5", "field 'policy.alisa.kv_sparsity'"),
    ("policy.bogus=1", "field 'policy.alisa.bogus'"), ("hardware=no-such-gpu", "unknown hardware profile"),
])
def test_bad_overrides_exit_2_naming_the_key(workload, tmp_path, capsys, assignment, message):
    for command in ("run", "plan"):
        assert main([command, str(workload), "--set", assignment, "--out", str(tmp_path / "o")] if command == "run"
                    else [command, str(workload), "--set", assignment]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        if "field" in message:
            assert f"--set {assignment}" in err
    assert not (tmp_path / "o").exists()


def test_plan_takes_overrides_and_prints_never(workload, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["plan", str(workload), "--set", "policy.kv_sparsity=0.7"]) == 0
    text = capsys.readouterr().out
    assert "never" in text  # 4 generated tokens at batch 4 never leave Phase I
    assert main(["plan", str(workload), "--set", "policy.kv_sparsity=0.7", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["params"]["kv_sparsity"] == 0.7


def test_every_result_says_what_it_is(workload, tmp_path, capsys):
    assert main(["run", str(workload), "--out", str(tmp_path / "a"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["label"] == "small-alisa"  # the workload file's stem
    run = result["run"]
    assert run["version"] == "0.1.0" and run["device"] == "gpu"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert run["git"]["commit"] == commit.strip() and isinstance(run["git"]["dirty"], bool)
    assert run["date"][:4] >= "2026" and run["date"].endswith("+00:00")
    profile = load_hardware_profile("paper-h100-80g")
    expected = hashlib.sha256(json.dumps(profile.model_dump(mode="json"), sort_keys=True,
                                         separators=(",", ":")).encode()).hexdigest()
    assert run["profile"] == {"name": "paper-h100-80g", "sha256": expected}
    assert profile_hash(load_hardware_profile("paper-v100-32g")) != expected
    # A run of a Result JSON keeps its label; --label names a run.
    assert main(["run", str(tmp_path / "a" / "result.json"), "--out", str(tmp_path / "b"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "small-alisa"
    assert main(["run", str(workload), "--label", "mine", "--out", str(tmp_path / "c"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["label"] == "mine"


def test_summary_units_and_device_names(workload, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["run", str(workload), "--out", str(tmp_path / "g")]) == 0
    text = capsys.readouterr().out
    assert "peak GPU / CPU memory" in text and " GiB / " in text and " GB / " in text
    tiny = {"name": "tiny-opt", "family": "opt", "hidden_size": 256, "num_layers": 2, "num_heads": 4,
            "num_kv_heads": 4, "ffn_dim": 1024, "vocab_size": 1000, "max_position_embeddings": 512,
            "tie_word_embeddings": True, "norm_eps": 1e-5}
    assert main(["run", str(workload), "--hardware", str(CPU_PROFILE), "--set", f"model={json.dumps(tiny)}",
                 "--set", "policy={name: dense}", "--out", str(tmp_path / "c")]) == 0
    text = capsys.readouterr().out
    assert "peak device / host memory" in text and "device KV at end" in text and "peak GPU" not in text

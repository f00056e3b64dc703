"""Specs: model byte counts, and every way a workload, model or profile can be wrong (one message, exit 2)."""

import json
import re

import pytest
import yaml

from alisa_sim.cli import main
from alisa_sim import hardware
from alisa_sim.errors import SpecError
from alisa_sim.model_spec import PRESETS, load_model_spec
from alisa_sim.workload import load_workload

GOOD = {"model": "opt-13b", "hardware": "h200", "batch_size": 8, "prompt_len": 128, "gen_len": 16,
        "policy": {"name": "dense"}}


def _write(tmp_path, data, name="w.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if isinstance(data, dict) else data)
    return path


def test_opt13b_kv_and_weight_bytes():
    m = load_model_spec("opt-13b")
    assert m.kv_bytes_per_token() == 4 * m.num_layers * m.hidden_size
    assert 64 * 512 * m.kv_bytes_per_token() / 1e9 == pytest.approx(26.8, abs=0.05)
    assert m.weight_bytes / 1e9 == pytest.approx(25.7, abs=0.1)


@pytest.mark.parametrize("name,params_b", [("opt-6.7b", 6.66), ("opt-30b", 29.97), ("llama-7b", 6.74),
                                            ("llama-13b", 13.02), ("llama-33b", 32.53), ("pythia-6.9b", 6.86),
                                            ("pythia-12b", 11.85)])
def test_preset_parameter_counts_match_public_models(name, params_b):
    assert load_model_spec(name).num_params / 1e9 == pytest.approx(params_b, abs=0.01)


def test_gqa_from_hf_config(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "max_position_embeddings": 8192,
           "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000}
    (tmp_path / "smollm2").mkdir()
    (tmp_path / "smollm2" / "config.json").write_text(json.dumps(cfg))
    m = load_model_spec(str(tmp_path / "smollm2"))
    assert (m.num_kv_heads, m.dim_per_head, m.kv_dim) == (3, 64, 192)
    assert m.num_params / 1e6 == pytest.approx(134.5, abs=0.1)  # SmolLM2-135M
    assert m.kv_bytes_per_token() == 2 * 30 * 192 * 2
    qkv = m.layer_gemms(4)[0]
    assert (qkv.k, qkv.n) == (576, 576 + 2 * 192)


def test_flops_per_op():
    m = load_model_spec("opt-6.7b")
    h = m.hidden_size
    assert sum(g.flops for g in m.layer_gemms(1)) == 2 * 12 * h * h
    assert m.decode_attention_flops(2, 100) == 4 * 2 * h * 100
    assert m.prefill_attention_flops(1, 16) == 2 * h * 16 * 16


def test_good_workload_loads(tmp_path):
    wl = load_workload(_write(tmp_path, GOOD))
    assert wl.model.name == "opt-13b" and wl.hardware.name == "h200" and wl.decode_steps == 15


def test_every_preset_loads_on_every_profile(tmp_path):
    for preset in PRESETS:
        for profile in ("h200", "h100", "paper-h100-80g", "paper-v100-32g", "t4-16g"):
            load_workload(_write(tmp_path, {**GOOD, "model": preset, "hardware": profile}))


BAD = [
    ({k: v for k, v in GOOD.items() if k != "batch_size"}, "field 'batch_size': Field required"),
    ({**GOOD, "batch_size": "many"}, "field 'batch_size'"),
    ({**GOOD, "prompt_len": -4}, "field 'prompt_len': Input should be greater than 0"),
    ({**GOOD, "gen_len": 0}, "field 'gen_len'"),
    ({**GOOD, "model": "gpt-5"}, "unknown model 'gpt-5'"),
    ({**GOOD, "hardware": "tpu-v9"}, "unknown hardware profile 'tpu-v9'"),
    ({**GOOD, "policy": {"name": "magic"}}, "field 'policy'"),
    ({**GOOD, "policy": {"name": "dense", "percent": [1]}}, "field 'policy.dense.percent': Extra inputs"),
    ({**GOOD, "bacth_size": 3}, "field 'bacth_size': Extra inputs are not permitted"),
    ({**GOOD, "memory": {"gpu_gb": -1}}, "field 'memory.gpu_gb'"),
    ({**GOOD, "memory": {"gpu_gb": 500}}, "memory.gpu_gb = 500 GB exceeds"),
    ({**GOOD, "prompt_len": 2000, "gen_len": 100}, "exceeds opt-13b's 2048 learned positions"),
    ({**GOOD, "model": "llama-33b", "memory": {"gpu_gb": 10, "cpu_gb": 20}}, "do not fit even in GPU + CPU"),
]


def test_the_cpu_profile_not_measured_yet_says_how_to_measure_it(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "PROFILE_DIR", tmp_path)  # a checkout where nobody has measured this machine
    with pytest.raises(SpecError, match=re.escape(f"alisa-exec profile --device cpu --quick --out {tmp_path}/cpu.yaml")):
        hardware.load_hardware_profile("cpu")


@pytest.mark.parametrize("data,message", BAD)
def test_bad_workload_is_one_clear_message_and_exit_2(tmp_path, capsys, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(SpecError, match=re.escape(message)):
        load_workload(path)
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alisa-sim: error:") and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("content,message", [
    ("model: [unclosed", "not valid YAML"),
    ("- a list", "expected a YAML mapping"),
])
def test_malformed_files(tmp_path, content, message):
    with pytest.raises(SpecError, match=message):
        load_workload(_write(tmp_path, content))


def test_missing_workload_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "workload file not found" in capsys.readouterr().err


def test_bad_hf_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(SpecError, match="unsupported model_type 'bert'"):
        load_model_spec(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "opt", "hidden_size": 8}))
    with pytest.raises(SpecError, match="lacks field 'num_hidden_layers'"):
        load_model_spec(str(tmp_path / "config.json"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2,
                                                      "num_attention_heads": 3, "num_key_value_heads": 2,
                                                      "intermediate_size": 16, "vocab_size": 10}))
    with pytest.raises(SpecError, match="must be a multiple of num_kv_heads"):
        load_model_spec(str(tmp_path / "config.json"))


def test_bad_profile_file(tmp_path):
    path = _write(tmp_path, {"name": "x", "description": "y"}, "profile.yaml")
    with pytest.raises(SpecError, match="field 'provenance': Field required"):
        load_workload(_write(tmp_path, {**GOOD, "hardware": str(path)}))

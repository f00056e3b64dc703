"""Fixtures for the executor tests: tiny random Hugging Face models saved as safetensors folders."""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tiny_models import TINY_CONFIGS  # noqa: E402  (after the import checks)


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory):
    """name -> (HF model in eval mode, folder with its config.json and model.safetensors)."""
    models = {}
    for i, (name, make_config) in enumerate(TINY_CONFIGS.items()):
        torch.manual_seed(i)
        config = make_config()
        cls = transformers.OPTForCausalLM if config.model_type == "opt" else transformers.LlamaForCausalLM
        model = cls(config).eval()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        models[name] = (model, folder)
    return models

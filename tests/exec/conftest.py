"""Fixtures for the executor tests: tiny random Hugging Face models saved as safetensors folders, and the session's
quick CPU profile."""

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


@pytest.fixture(scope="session")
def quick_cpu_profile(gpu_check_dry_run):
    """`alisa-exec profile --device cpu --quick` on one torch thread, for every test that needs a measured CPU profile:
    the one the GPU check's dry run measures in its profile stage (tests/conftest.py), so that the session measures
    it once. One thread, as benchmarks/cpu_validation.py measures and runs, so that the validation loop's timing bound
    holds under load."""
    done, out = gpu_check_dry_run
    path = out / "cpu-quick.yaml"
    assert path.is_file(), f"the GPU check's dry run returned no quick CPU profile:\n{done.stdout[-3000:]}"
    return path

"""Fixtures for the executor tests: tiny random Hugging Face models saved as safetensors folders, and one quick CPU
profile measured for the whole session."""

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
def quick_cpu_profile(tmp_path_factory):
    """`alisa-exec profile --device cpu --quick`, measured once for every test that needs a measured CPU profile. On
    one torch thread, as benchmarks/cpu_validation.py measures and runs (its THREADS says why: on a shared machine two
    threads time competing work as stalls), so that the validation loop's timing bound holds under load."""
    from alisa_exec.cli import main

    path = tmp_path_factory.mktemp("profiles") / "cpu-quick.yaml"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["profile", "--device", "cpu", "--quick", "--out", str(path)]) == 0
    finally:
        torch.set_num_threads(threads)
    return path

"""On a CUDA GPU: the CUDA-graph decode agrees with eager decode and with HF, `run`/`profile` work on the device,
and the dense benchmark runs end to end on a tiny model."""

import json
import sys
from pathlib import Path

import pytest
import torch

from alisa_exec.cli import main
from alisa_exec.generate import Generator
from alisa_exec.weights import DUMMY, load_model
from alisa_sim.hardware import load_hardware_profile
from alisa_sim.model_spec import load_model_spec
from tiny_models import TINY_SPEC, VOCAB, hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")
BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.parametrize("name", ["opt", "llama-gqa"])
def test_cuda_graph_decode_matches_eager_and_hf(tiny_hf_models, name):
    hf, folder = tiny_hf_models[name]
    prompt = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(4))
    want = hf_greedy(hf, prompt, 12)
    model = load_model(load_model_spec(str(folder)), str(folder), torch.float32, CUDA)
    graphed = Generator(model, 3, 9 + 12 - 1)
    assert graphed.cuda_graph
    assert torch.equal(graphed.generate(prompt.to(CUDA), 12).tokens, want)
    eager = Generator(model, 3, 9 + 12 - 1, cuda_graph=False)
    assert torch.equal(eager.generate(prompt.to(CUDA), 12).tokens, want)


def test_fp16_dummy_generation_is_deterministic():
    spec = load_model_spec(TINY_SPEC)
    model = load_model(spec, DUMMY, torch.float16, CUDA)
    generator = Generator(model, 4, 40)
    prompt = torch.randint(0, spec.vocab_size, (4, 24), device=CUDA)
    first, second = generator.generate(prompt, 17), generator.generate(prompt, 17)
    assert torch.equal(first.tokens, second.tokens)
    assert all(s > 0 for s in first.decode_step_s)


def test_profile_and_run_on_the_gpu(tmp_path):
    profile = tmp_path / "gpu-quick.yaml"
    assert main(["profile", "--device", "cuda", "--quick", "--out", str(profile)]) == 0
    assert load_hardware_profile(profile).gpu.name == torch.cuda.get_device_name()
    workload = tmp_path / "w.yaml"
    workload.write_text(json.dumps({"model": TINY_SPEC, "hardware": str(profile), "batch_size": 4, "prompt_len": 32,
                                    "gen_len": 9, "policy": {"name": "dense"}}))
    assert main(["run", str(workload), "--device", "cuda", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["device"] == torch.cuda.get_device_name() and result["dtype"] == "float16"
    m, breakdown = result["metrics"], result["breakdown_s"]
    assert m["peak_gpu_bytes"] > 0 and m["h2d_bytes"] == 4 * 32 * 8 and m["d2h_bytes"] == 4 * 9 * 8
    assert breakdown["gemm"] > 0 and breakdown["attention"] > 0 and breakdown["elementwise"] > 0


def test_dense_benchmark_runs_on_a_tiny_model(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import exec_dense

    model = json.dumps({**TINY_SPEC, "family": "opt", "num_kv_heads": TINY_SPEC["num_heads"],
                        "tie_word_embeddings": True})
    assert exec_dense.main(["--model", model, "--batches", "1,2", "--prompt-len", "16", "--gen-len", "4",
                            "--out", str(tmp_path)]) == 0
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["hf_speedup"] > 0 for r in rows)
    del sys.modules["exec_dense"]

"""`alisa-exec run --compile`: dense's CPU decode step compiled by TorchInductor (weights frozen) generates the eager
step's tokens, compiles once per run (one graph, no recompiles from step to step), times its `detail_limit`
steps op by op, and is refused for what it does not compile."""

import pytest
import torch
import yaml

from alisa_exec import executor
from alisa_exec.cli import main
from test_exec_policies import SEED, workload

pytest.importorskip("torch._inductor")
GEN_LEN = 10


def _generate(folder, compile_decode: bool):
    plan = executor.plan_run(workload(folder, {"name": "dense"}, batch=2, gen_len=GEN_LEN), torch.device("cpu"),
                             torch.float32)
    measured = executor.execute(plan, torch.device("cpu"), torch.float32, str(folder), SEED,
                                compile_decode=compile_decode)
    return plan, measured


def test_the_compiled_step_generates_the_eager_tokens_in_one_graph(tiny_hf_models):
    import torch._dynamo.utils as dynamo_utils

    # LLaMA with GQA: rotary, RMSNorm, SwiGLU and grouped heads (the OPT path is a subset of its op kinds)
    folder = tiny_hf_models["llama-gqa"][1]
    _, eager = _generate(folder, compile_decode=False)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    plan, compiled = _generate(folder, compile_decode=True)
    assert torch.equal(compiled.tokens, eager.tokens)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # compiled in the warm-up, reused by every step
    assert not dynamo_utils.counters["recompiles"]
    assert plan.policy.compiled_forward is not None and not hasattr(plan.policy.run.layers[0].attention.wqkv,
                                                                    "packed_weight")  # Inductor packs, not us
    timed = {span.step for span in compiled.spans}
    assert 0 < len(timed) <= plan.policy.detail_limit  # the other steps ran compiled, untimed op by op
    assert any("compiled by TorchInductor" in note for note in plan.policy.notes)


@pytest.mark.parametrize("policy", ["alisa", "zero", "flexgen"])
def test_compile_is_refused_for_what_it_does_not_compile(tmp_path, capsys, policy):
    from tiny_models import TINY_SPEC

    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({"model": TINY_SPEC, "hardware": "h200", "batch_size": 2, "prompt_len": 8,
                                    "gen_len": 4, "policy": {"name": policy}}))
    out = tmp_path / "out"
    assert main(["run", str(path), "--device", "cpu", "--compile", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"--compile compiles dense's decode step on the CPU, not {policy}'s" in err
    assert not out.exists()


def test_compile_without_a_cxx_compiler_is_refused(tmp_path, capsys, monkeypatch):
    from tiny_models import TINY_SPEC

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    path = tmp_path / "w.yaml"
    path.write_text(yaml.safe_dump({"model": TINY_SPEC, "hardware": "h200", "batch_size": 2, "prompt_len": 8,
                                    "gen_len": 4, "policy": {"name": "dense"}}))
    assert main(["run", str(path), "--device", "cpu", "--compile", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "'no-such-compiler-here' is not on the PATH" in err
    assert not (tmp_path / "out").exists()

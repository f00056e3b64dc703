"""The executor's host time beyond its named ops, per policy: `alisa-exec profile` measures a row for every policy's
hooks (ALISA's per phase), and the simulator charges each step exactly its own policy's row (dense's where a policy
has none), per step and per layer."""

import math

import pytest
import torch
import yaml

from alisa_exec.overhead import OVERHEAD_PROBES
from alisa_sim.hardware import HardwareProfile, load_hardware_profile
from alisa_sim.simulator import simulate
from alisa_sim.workload import ResolvedWorkload, Workload, resolve_workload

LAYERS, BATCH = 3, 2


def test_the_profile_measures_every_policys_hooks(quick_cpu_profile):
    rows = yaml.safe_load(quick_cpu_profile.read_text())["gpu"]["host_overheads"]
    measured = {(row["policy"], row["kind"]) for row in rows}
    expected = {(key, kind) for key in OVERHEAD_PROBES if key != "alisa" for kind in ("prefill", "decode")}
    expected |= {("alisa-phase-1", "prefill")} | {(f"alisa-phase-{phase}", "decode") for phase in (1, 2, 3)}
    assert measured == expected
    assert all(math.isfinite(row[f]) and row[f] >= 0 for row in rows for f in ("step_s", "layer_s"))
    assert any(row["layer_s"] > 0 for row in rows)


def cpu_profile(rows: list[dict]) -> HardwareProfile:
    """A shipped profile as a CPU device (host and device one resource: host time adds to a step) with `rows`."""
    data = load_hardware_profile("h100").model_dump(mode="json")
    data["device_kind"] = "cpu"
    data["gpu"]["host_overheads"] = rows
    return HardwareProfile.model_validate(data)


def decode_steps(policy: dict, hardware: HardwareProfile) -> list[tuple[int, float]]:
    data = {"model": {"name": "tiny", "family": "llama", "hidden_size": 128, "num_layers": LAYERS, "num_heads": 4,
                      "num_kv_heads": 2, "ffn_dim": 256, "vocab_size": 256, "max_position_embeddings": 512,
                      "tie_word_embeddings": False, "norm_eps": 1e-5},
            "hardware": "h100", "batch_size": BATCH, "prompt_len": 16, "gen_len": 12, "policy": policy}
    wl = resolve_workload(Workload.model_validate(data))
    result = simulate(ResolvedWorkload(wl.workload, wl.model, hardware))
    return [(step.phase, step.duration_s) for step in result.steps if step.plan.kind == "decode"]


def row(policy: str, step_s: float, layer_s: float, kind: str = "decode", sequence_s: float = 0.0) -> dict:
    return {"policy": policy, "kind": kind, "step_s": step_s, "sequence_s": sequence_s, "layer_s": layer_s}


@pytest.mark.parametrize("policy, own", [({"name": "h2o", "kv_sparsity": 0.5}, "h2o"),
                                         ({"name": "streamingllm", "kv_sparsity": 0.5}, None),  # dense's row
                                         ({"name": "dense"}, "dense")])
def test_each_step_pays_its_own_policys_host_time(policy, own):
    bare = decode_steps(policy, cpu_profile([]))
    rows = [row("dense", 1e-3, 2e-4), row("h2o", 3e-3, 5e-4, sequence_s=4e-4), row("dense", 7.0, 7.0, "prefill")]
    charged = decode_steps(policy, cpu_profile(rows))
    step_s, layer_s = (3e-3 + BATCH * 4e-4, 5e-4) if own == "h2o" else (1e-3, 2e-4)
    assert [t - b for (_, t), (_, b) in zip(charged, bare)] == pytest.approx([step_s + LAYERS * layer_s] * len(bare),
                                                                            rel=1e-9)


def test_alisa_pays_each_phases_host_time():
    policy = {"name": "alisa", "kv_sparsity": 0.5, "int8": False, "p1": 4, "p2": 8, "alpha": 0.5, "beta": 0.5}
    per_phase = {1: (1e-3, 1e-4), 2: (2e-3, 3e-4), 3: (4e-3, 9e-4)}
    bare = decode_steps(policy, cpu_profile([]))
    charged = decode_steps(policy, cpu_profile([row(f"alisa-phase-{p}", *v) for p, v in per_phase.items()]))
    assert {phase for phase, _ in bare} == {1, 2, 3}
    for (phase, t), (_, b) in zip(charged, bare):
        step_s, layer_s = per_phase[phase]
        assert t - b == pytest.approx(step_s + LAYERS * layer_s, rel=1e-9)


def test_a_policy_whose_probe_fails_is_left_out_and_said(quick_cpu_profile, monkeypatch):
    from alisa_exec import overhead

    monkeypatch.setattr(overhead, "OVERHEAD_PROBES", {"dense": {"name": "dense"},
                                                      "broken": {"name": "alisa", "p1": 5, "p2": 2}})
    warnings = []
    rows = overhead.measure_executor_overhead(yaml.safe_load(quick_cpu_profile.read_text()), torch.device("cpu"),
                                              torch.float32, warnings.append)
    assert {row["policy"] for row in rows} == {"dense"}
    assert len(warnings) == 1 and "broken" in warnings[0] and "p2 (2) must not come before p1 (5)" in warnings[0]

"""The validation loop (benchmarks/cpu_validation.py) as a CI check on the CPU: eight points over several policies
(dense, flexgen with CPU attention, vLLM swap under a tight pool, ALISA in Phase II at sparsity 0.5 and 0.8 with
INT8 and in Phase III at 0.5, its selection replayed from the run, ALISA's k4-capped selector with INT8 in Phase II,
H2O), each measured by `alisa-exec run` and
predicted by `alisa-sim run` on the session's quick CPU profile, each workload run once (the script's best of two
is for its timing table, not for what is asserted here), uncalibrated (the dry run of benchmarks/gpu_check.py runs
the script's calibration step, tests/test_validate.py the calibration itself); then a second loop into the same
folder, which starts afresh.

Asserted: every step's counted traffic (kind, phase, token rows, KV bytes per tier, H2D/D2H bytes, fetched /
offloaded / recomputed / evicted rows, preemptions, swapped blocks) equal between the two Results of each point, and
every point paired by `alisa-sim validate`, and the machine's slowdown against the profile's recorded per point;
predicted again from the same profile (`repredict`), the same runs give the same errors, and from a profile with
slower attention rows only the attention's predicted seconds grow.
The MAPE is printed; timing is bounded only loosely (a predicted decode
step within 20x of the measured one), because the machine is shared and noisy: the table is
benchmarks/cpu_validation.py's to report (README "Predicted vs measured").
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import yaml

LOOP_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_validation.py"
VARIANTS = ("dense", "flexgen-cpu-attention", "vllm-swap", "alisa-0.5-phase-2", "alisa-0.8-int8-phase-2",
            "alisa-0.5-phase-3", "alisa-k4-capped-int8-phase-2", "h2o")
LOOSE_FACTOR = 20.0


@pytest.fixture(scope="module")
def cpu_validation():
    spec = importlib.util.spec_from_file_location("cpu_validation", LOOP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def small_points(module):
    """One small shape per variant: the smallest batch x prompt of its shapes."""
    chosen = [v for v in module.VARIANTS if v.name in VARIANTS]
    assert [v.name for v in chosen] == list(VARIANTS)
    small = [module.Variant(v.name, v.policy, v.budget, (min(v.shapes, key=lambda s: s[1] * s[2]),)) for v in chosen]
    return module.points(1, small)


def test_a_short_loop_has_equal_traffic_and_prints_its_mape(tmp_path, capsys, monkeypatch, cpu_validation,
                                                            quick_cpu_profile):
    selected = small_points(cpu_validation)
    monkeypatch.setattr(cpu_validation, "EXEC_TRIES", 1)
    loop = cpu_validation.run_loop(tmp_path, selected, profile=quick_cpu_profile, calibrate=False)
    differing = {name: diffs[:3] for name, diffs in loop["traffic"].items() if diffs}
    assert not differing, differing
    assert sorted(loop["traffic"]) == sorted(p.name for p in selected)
    summary = loop["uncalibrated"]["summary"]
    with capsys.disabled():
        print("\nshort validation loop, uncalibrated quick CPU profile: " + ", ".join(
            f"{metric} MAPE {summary[metric]['mape']:.1f}% (worst {summary[metric]['worst']:.1f}%)"
            for metric in cpu_validation.METRICS))
    assert summary[cpu_validation.METRIC]["pairs"] == len(selected)
    for pair in loop["uncalibrated"]["pairs"]:
        step = pair["metrics"][cpu_validation.METRIC]
        assert 1 / LOOSE_FACTOR < step["predicted"] / step["measured"] < LOOSE_FACTOR, pair["workload"]
    assert set(loop["stats_h2d_error_pct"]) == {p.name for p in selected if p.variant.name.startswith("alisa")}
    # The machine's speed at each kept run against the profile's, from the reference mix timed before it.
    assert set(loop["machine_slowdown"]) == {p.name for p in selected}
    assert all(0 < ratio < LOOSE_FACTOR for ratio in loop["machine_slowdown"].values())
    # Predicted again from the same profile, the same runs give the same errors; from one whose attention rows take
    # twice as long, only the attention's predicted seconds grow.
    same = cpu_validation.repredict(tmp_path, quick_cpu_profile, tmp_path / "same")
    assert same["summary"] == loop["uncalibrated"]["summary"]
    slower = yaml.safe_load(quick_cpu_profile.read_text())
    for row in slower["gpu"]["ops"]:
        row["s"] *= 2 if row["op"].endswith("_attention") else 1
    (tmp_path / "slower.yaml").write_text(yaml.safe_dump(slower, sort_keys=False))
    other = cpu_validation.repredict(tmp_path, tmp_path / "slower.yaml", tmp_path / "slower")
    before, after = loop["uncalibrated"]["breakdown"], other["breakdown"]
    assert after["gemm+elementwise"]["predicted_s"] == pytest.approx(before["gemm+elementwise"]["predicted_s"])
    assert after["attention"]["predicted_s"] > 1.5 * before["attention"]["predicted_s"]
    assert after["attention"]["measured_s"] == before["attention"]["measured_s"]
    again = cpu_validation.run_loop(tmp_path, selected[:1], profile=quick_cpu_profile, calibrate=False)
    assert sorted(again["traffic"]) == [selected[0].name] and not again["traffic"][selected[0].name]


def test_a_measured_profile_is_measured_in_a_round_before_each_try_and_merged(tmp_path, monkeypatch, cpu_validation):
    from alisa_exec.profiler import fastest_of

    point = small_points(cpu_validation)[0]
    monkeypatch.setattr(cpu_validation, "EXEC_TRIES", 2)
    said = []
    loop = cpu_validation.run_loop(tmp_path, [point], profile=None, calibrate=False, log=said.append)
    order = [line.split(" ")[0] for line in said if line.startswith("profiling") or "alisa-exec run" in line]
    assert order == ["profiling,", f"{point.name}:", "profiling,", f"{point.name}:"]
    rounds = sorted((tmp_path / "profile-rounds").glob("round-*.yaml"))
    assert len(rounds) == 2
    merged = yaml.safe_load((tmp_path / "profile.yaml").read_text())
    assert merged == fastest_of([yaml.safe_load(path.read_text()) for path in rounds])
    assert not loop["traffic"][point.name]


def test_reproducibility_is_the_spread_of_the_same_points_between_loops(cpu_validation):
    def loop(*steps):
        return {"uncalibrated": {"pairs": [
            {"label": f"p{i}", "metrics": {metric: {"measured": step} for metric in cpu_validation.METRICS}}
            for i, step in enumerate(steps)]}}

    spread = cpu_validation.reproducibility([loop(1.0, 2.0), loop(1.5, 2.0)])[cpu_validation.METRIC]
    assert spread["mape"] == pytest.approx(25.0) and spread["worst"] == pytest.approx(50.0)
    assert spread["median_ratio"] == pytest.approx(1.25) and spread["points"] == 2
    # p0: one value for both 1.0 and 1.5 errs at least (0 + 1/3) / 2 on average (at 1.0); p1 not at all
    assert spread["floor_mape"] == pytest.approx(100 * (1 / 6) / 2)
    assert cpu_validation.reproducibility([loop(1.0, 2.0)]) == {}

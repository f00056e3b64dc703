"""The CPU validation loop (benchmarks/cpu_validation.py) as a CI check: `alisa-exec profile --device cpu --quick`, a
small model under the loop's policies (LOOP_POLICIES there, where the executor runs them), measured by `alisa-exec
run --device cpu` and predicted by `alisa-sim run` on that profile, the profile calibrated on half the runs and
validated on the other half.

The bound on the held-out MAPE of the mean decode step comes from repeated loops on this project's 2-core machine
while other jobs ran on it, recorded in reports/validation/cpu/: 10 loops gave 18.8-28.8% (worst single run 41.9%),
6 earlier ones under heavier load (load average 4-5) 13.8-27.7%, and single test runs up to 34.8%; before each
workload was run twice keeping the faster run, 8 loops gave 17.5-62.6%. The bound, 50%, is 1.4x the worst loop
seen, so the check fails on a broken loop (a calibration that no longer fits, a simulator or executor change that
moves decode time by several times), not on a loaded machine. The profile as
measured, uncalibrated, predicts decode steps 5-10x too fast on this CPU (the quick profile times cache-hot GEMMs
while the model streams its weights, and a CPU device pays the per-op host cost in series with the work; see
README "Predicted vs measured"): that MAPE is printed, not bounded.
"""

import importlib.util
from pathlib import Path

import pytest

BOUND_PCT = 50.0
METRIC = "decode_step_mean_s"
LOOP_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "cpu_validation.py"


@pytest.fixture(scope="module")
def cpu_validation():
    spec = importlib.util.spec_from_file_location("cpu_validation", LOOP_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_validation_loop_decode_step_mape(tmp_path, capsys, cpu_validation):
    loop = cpu_validation.run_loop(tmp_path)
    uncalibrated = loop["uncalibrated"]["summary"][METRIC]
    calibrated = loop["calibrated"]["summary"][METRIC]
    with capsys.disabled():
        print(f"\nCPU validation loop ({', '.join(cpu_validation.loop_policies())}): mean decode step MAPE "
              f"{uncalibrated['mape']:.1f}% with the quick profile as measured ({uncalibrated['pairs']} pairs), "
              f"{calibrated['mape']:.1f}% (worst {calibrated['worst']:.1f}%) on {calibrated['pairs']} held-out runs "
              f"with the fitted profile (bound {BOUND_PCT:.0f}%)")
    runs = len(cpu_validation.CASES) * len(cpu_validation.loop_policies())
    assert uncalibrated["pairs"] == runs
    assert calibrated["pairs"] == sum(case[-1] == "holdout" for case in cpu_validation.CASES) * len(
        cpu_validation.loop_policies())
    fit = loop["fit"]["mape_pct"]
    assert fit["fit_after"][METRIC] < fit["fit_before"][METRIC]
    assert calibrated["mape"] < BOUND_PCT
    assert (tmp_path / "cpu-quick-fitted.yaml").read_text().count("kind: fitted") == 1
    assert (tmp_path / "calibrated" / "validation.html").is_file()

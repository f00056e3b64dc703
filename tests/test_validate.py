"""`alisa-sim validate` and `alisa-sim calibrate`: pairing by workload and policy, per-metric errors, MAPE and worst,
validation.json and its HTML, bad input; a calibration that recovers known multipliers from synthetic measurements
and writes a fitted profile copy with that provenance."""

import copy
import json

import pytest
import yaml

from alisa_sim.calibrate import adjusted_profile, calibrate, prepare_runs
from alisa_sim.cli import main
from alisa_sim.hardware import load_hardware_profile
from alisa_sim.results import build_result
from alisa_sim.simulator import simulate
from alisa_sim.validate import load_results, validate
from alisa_sim.workload import ResolvedWorkload, resolve_workload

TINY = dict(name="tiny-opt", family="opt", hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=4, ffn_dim=1024,
            vocab_size=1024, max_position_embeddings=512, tie_word_embeddings=True, norm_eps=1e-5)


def _workload(**overrides):
    return {"model": TINY, "hardware": "h100", "batch_size": 4, "prompt_len": 32, "gen_len": 8,
            "policy": {"name": "dense"}, **overrides}


def _simulated(workload: dict, profile=None) -> dict:
    wl = resolve_workload(workload)
    if profile is not None:
        wl = ResolvedWorkload(wl.workload, wl.model, profile)
    return build_result(simulate(wl))


def _as_measured(result: dict, scale: float = 1.0, memory_scale: float = 1.0) -> dict:
    """A stand-in for an alisa-exec Result: the same workload, times scaled."""
    measured = copy.deepcopy(result)
    measured["source"] = "exec"
    m = measured["metrics"]
    for key in ("prefill_s", "decode_s", "total_s"):
        m[key] *= scale
    m["decode_step_s"] = {k: v * scale for k, v in m["decode_step_s"].items()}
    m["throughput_tok_s"] /= scale
    m["peak_gpu_bytes"] = int(m["peak_gpu_bytes"] * memory_scale)
    for step in measured["steps"]:
        step["time_s"] *= scale
    return measured


def _write(folder, name, data):
    path = folder / name / "result.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def test_pairs_by_workload_and_policy_and_reports_errors(tmp_path, capsys):
    a = _simulated(_workload())
    b = _simulated(_workload(batch_size=8))
    _write(tmp_path / "pred", "a", a)
    _write(tmp_path / "pred", "b", b)
    _write(tmp_path / "meas", "a", _as_measured(a, scale=1.25, memory_scale=0.5))  # predicted 20% low
    _write(tmp_path / "meas", "b", _as_measured(b, scale=0.8))  # predicted 25% high
    b_other_hw = _as_measured(b, scale=0.8)
    b_other_hw["hardware"] = b_other_hw["workload"]["hardware"] = "somewhere-else"  # hardware is not in the key
    _write(tmp_path / "meas", "b2", b_other_hw)
    unmatched = _as_measured(_simulated(_workload(gen_len=4)))
    _write(tmp_path / "meas", "c", unmatched)
    out = tmp_path / "out"
    # Measured first: the order of the arguments does not matter.
    assert main(["validate", str(tmp_path / "meas"), str(tmp_path / "pred"), "--out", str(out), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document == json.loads((out / "validation.json").read_text())
    assert len(document["pairs"]) == 3 and len(document["unpaired"]) == 1
    errors = sorted(round(p["metrics"]["decode_step_mean_s"]["error_pct"], 6) for p in document["pairs"])
    assert errors == [-20.0, 25.0, 25.0]
    summary = document["summary"]
    assert set(summary) == {"prefill_s", "decode_step_mean_s", "total_s", "throughput_tok_s", "peak_gpu_bytes"}
    assert summary["decode_step_mean_s"]["mape"] == pytest.approx(70 / 3)
    assert summary["decode_step_mean_s"]["worst"] == pytest.approx(25.0)
    assert summary["throughput_tok_s"]["mape"] == pytest.approx(65 / 3)  # throughput errors: +25%, -20%, -20%
    assert summary["peak_gpu_bytes"]["worst"] == pytest.approx(100.0)
    html = (out / "validation.html").read_text()
    assert "plotly" in html and 'id="figure-scatter"' in html and 'id="figure-steps"' in html


def test_where_the_time_goes_by_op_kind(tmp_path, capsys, monkeypatch):
    """Busy seconds by op kind, predicted against measured, per pair and over the pairs: gemm and elementwise
    summed (the executor's projection spans hold both), and a kind only one side spent time on still shown."""
    monkeypatch.setenv("COLUMNS", "200")
    a, b = _simulated(_workload()), _simulated(_workload(batch_size=8))
    measured = []
    for result, scale in ((a, 2.0), (b, 0.5)):
        m = _as_measured(result)
        m["breakdown_s"] = {kind: seconds * scale for kind, seconds in result["breakdown_s"].items()}
        m["breakdown_s"]["elementwise"] += m["breakdown_s"].pop("gemm")
        m["breakdown_s"]["cpu"] = 0.25
        measured.append(m)
    for name, result in (("a", a), ("b", b)):
        _write(tmp_path / "pred", name, result)
    for name, result in zip("ab", measured):
        _write(tmp_path / "meas", name, result)
    document, _, _ = validate(load_results([tmp_path / "pred", tmp_path / "meas"]))
    pair = next(p for p in document["pairs"] if " b=4 " in p["workload"])
    assert "gemm" not in pair["breakdown_s"] and "elementwise" not in pair["breakdown_s"]
    assert pair["breakdown_s"]["gemm+elementwise"]["error_pct"] == pytest.approx(-50.0)
    assert pair["breakdown_s"]["cpu"] == {"predicted": 0.0, "measured": 0.25, "error_pct": -100.0}
    rows = document["breakdown"]["gemm+elementwise"]
    predicted = sum(r["breakdown_s"][k] for r in (a, b) for k in ("gemm", "elementwise"))
    assert rows["predicted_s"] == pytest.approx(predicted)
    assert rows["measured_s"] == pytest.approx(sum(m["breakdown_s"]["elementwise"] for m in measured))
    assert rows["mape"] == pytest.approx(75.0)  # -50% and +100%
    assert main(["validate", str(tmp_path / "pred"), str(tmp_path / "meas"), "--out", str(tmp_path / "o")]) == 0
    assert "where the time goes" in capsys.readouterr().out


def test_table_output_names_metrics(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # xdist's workers say 80, which wraps the table's headers
    a = _simulated(_workload())
    _write(tmp_path, "p", a)
    _write(tmp_path, "m", _as_measured(a, scale=1.1))
    assert main(["validate", str(tmp_path / "p"), str(tmp_path / "m"), "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "MAPE" in text and "prefill" in text and "validation.html" in text


@pytest.mark.parametrize("setup,message", [
    ("only-predicted", "nothing to validate"),
    ("two-predictions", "two predictions of the same workload"),
    ("not-a-result", "not a Result JSON"),
    ("missing", "result file not found"),
    ("bad-json", "not valid JSON"),
])
def test_bad_input_is_one_message_and_exit_2(tmp_path, capsys, setup, message):
    a = _simulated(_workload())
    paths = [str(_write(tmp_path, "p", a))]
    if setup == "two-predictions":
        paths += [str(_write(tmp_path, "p2", a)), str(_write(tmp_path, "m", _as_measured(a)))]
    elif setup == "not-a-result":
        paths.append(str(_write(tmp_path, "x", {"hello": 1})))
    elif setup == "missing":
        paths.append(str(tmp_path / "nope.json"))
    elif setup == "bad-json":
        bad = tmp_path / "bad.json"
        bad.write_text("{")
        paths.append(str(bad))
    assert main(["validate", *paths, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("alisa-sim: error:") and message in err and len(err.strip().splitlines()) == 1


def test_oom_pairs_have_no_errors_and_count_as_mismatch(tmp_path):
    fits = _simulated(_workload())
    too_big = _workload(memory={"gpu_gb": 0.001})
    predicted = _simulated(too_big)
    assert predicted["metrics"]["oom"]
    measured = _as_measured(fits)
    measured["workload"] = predicted["workload"]
    _write(tmp_path, "p", predicted)
    _write(tmp_path, "m", measured)
    document, _, _ = validate(load_results([tmp_path]))
    assert document["oom_mismatches"] == 1
    assert document["summary"]["decode_step_mean_s"]["mape"] is None


def test_calibration_recovers_known_factors_and_writes_a_fitted_profile(tmp_path, capsys):
    """Measurements made with a known-distorted profile: the fit finds the distortion and predicts held-out runs."""
    base = load_hardware_profile("h100")
    truth = adjusted_profile(base, {"gemm": 1.6, "host": 4e-5})
    fit_shapes = [dict(model="opt-6.7b", batch_size=1, prompt_len=32), dict(model="opt-6.7b", batch_size=16,
                                                                            prompt_len=512),
                  dict(model="opt-6.7b", batch_size=4, prompt_len=256)]
    held_shapes = [dict(model="opt-6.7b", batch_size=8, prompt_len=128)]
    for part, shapes in (("fit", fit_shapes), ("held", held_shapes)):
        for i, shape in enumerate(shapes):
            measured = _as_measured(_simulated(_workload(**shape), truth))
            _write(tmp_path / part, str(i), measured)
    out = tmp_path / "h100-fitted.yaml"
    assert main(["calibrate", str(tmp_path / "fit"), "--hardware", "h100", "--params", "host,gemm,copy",
                 "--holdout", str(tmp_path / "held"), "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inert"] == ["copy"]  # dense moves nothing over the link
    assert summary["values"]["gemm"] == pytest.approx(1.6, rel=0.05)
    assert summary["values"]["host"] == pytest.approx(4e-5, rel=0.05)
    assert summary["mape_pct"]["holdout"]["decode_step_mean_s"] < 2.0
    assert summary["mape_pct"]["fit_before"]["decode_step_mean_s"] > 20.0
    fitted = load_hardware_profile(out)
    assert fitted.name == "h100-fitted" and fitted.gpu.source.kind == "fitted"
    assert fitted.link.source.kind == "measured"  # copies were not fitted
    notes = " ".join(fitted.provenance.notes)
    assert "alisa-sim calibrate" in notes and "held-out" in notes and "not identifiable" in notes
    assert "Fitted by `alisa-sim calibrate`" in out.read_text().splitlines()[0]
    # The fitted profile predicts the held-out run it was not fitted on.
    measured = load_results([tmp_path / "held"])[0]
    again = _simulated(dict(measured.data["workload"], hardware=str(out)))
    assert again["metrics"]["decode_step_s"]["mean"] == pytest.approx(
        measured.data["metrics"]["decode_step_s"]["mean"], rel=0.02)


def test_calibration_refuses_overlapping_holdout_and_predicted_runs(tmp_path, capsys):
    measured = _write(tmp_path, "m", _as_measured(_simulated(_workload())))
    out = str(tmp_path / "x.yaml")
    assert main(["calibrate", str(measured), "--holdout", str(measured), "--out", out]) == 2
    assert "both a fit run and a held-out run" in capsys.readouterr().err
    predicted = _write(tmp_path, "p", _simulated(_workload()))
    assert main(["calibrate", str(predicted), "--out", out]) == 2
    assert "source exec" in capsys.readouterr().err
    assert main(["calibrate", str(measured), "--params", "gemm,nonsense", "--out", out]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["calibrate", str(measured), "--out", str(tmp_path / "x.txt")]) == 2


def test_fitted_profile_keeps_predictions_of_an_untouched_fit(tmp_path):
    """Resampling the GEMM table on the runs' shapes changes no prediction by itself."""
    base = load_hardware_profile("h100")
    measured = _write(tmp_path, "m", _as_measured(_simulated(_workload())))
    runs = prepare_runs(load_results([measured]), "h100")
    fit = calibrate(runs, base, ("copy",))  # inert: nothing is fitted
    assert fit.values == {} and fit.inert == ["copy"]
    assert runs[0].predict(fit.profile) == pytest.approx(runs[0].predict(base), rel=1e-12)
    assert yaml.safe_load(yaml.safe_dump(fit.profile.model_dump(mode="json")))["name"] == "h100"


def _skewed(result: dict, prefill_scale: float, decode_scale: float) -> dict:
    """A stand-in for an alisa-exec Result whose prefill and decode steps are off by different factors."""
    measured = copy.deepcopy(result)
    measured["source"] = "exec"
    m = measured["metrics"]
    m["prefill_s"] *= prefill_scale
    m["decode_s"] *= decode_scale
    m["decode_step_s"] = {k: v * decode_scale for k, v in m["decode_step_s"].items()}
    m["total_s"] = m["prefill_s"] + m["decode_s"]
    return measured


SHAPES = [dict(model="opt-6.7b", batch_size=1, prompt_len=32), dict(model="opt-6.7b", batch_size=4, prompt_len=256)]


def test_calibration_refuses_a_profile_that_predicts_its_own_runs_worse(tmp_path, capsys):
    """Prefill measured 4x the prediction, decode steps half of it: one GEMM factor cannot fix both; the fit (least
    squares in log) settles at x1.51, which takes the runs' error from 87.5% to 123%: refused, nothing written."""
    for i, shape in enumerate(SHAPES):
        _write(tmp_path / "fit", str(i), _skewed(_simulated(_workload(**shape)), 4.0, 0.5))
    out = tmp_path / "h100-fitted.yaml"
    assert main(["calibrate", str(tmp_path / "fit"), "--hardware", "h100", "--params", "gemm", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "calibration made its own fit runs worse" in err and "87.5% with the base profile" in err
    assert "no profile written" in err and "gemm x1.5" in err
    assert not out.exists() and not list(tmp_path.glob("*.yaml*"))


def test_calibration_reports_a_parameter_that_lands_at_its_bound(tmp_path, capsys):
    """Runs measured 50x slower than predicted: GEMM time is allowed at most x20, the fit ends there; the profile is
    still better than the base on the fit runs, so it is written, saying the factor is at its bound."""
    for i, shape in enumerate(SHAPES):
        _write(tmp_path / "fit", str(i), _as_measured(_simulated(_workload(**shape)), 50.0))
    out = tmp_path / "h100-fitted.yaml"
    args = ["calibrate", str(tmp_path / "fit"), "--hardware", "h100", "--params", "gemm", "--out", str(out)]
    assert main(args + ["--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["at_bound"] == {"gemm": "upper"} and summary["values"]["gemm"] == pytest.approx(20, rel=0.02)
    assert summary["mape_pct"]["fit_after"]["decode_step_mean_s"] < summary["mape_pct"]["fit_before"][
        "decode_step_mean_s"]
    notes = " ".join(load_hardware_profile(out).provenance.notes)
    assert "gemm x20 (at its upper bound)" in notes and "gemm (upper bound)" in notes
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "at its upper bound" in printed and "ended at the upper end of its range" in printed

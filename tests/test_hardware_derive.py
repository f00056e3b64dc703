"""The datasheet route: derived profiles cite their datasheets, transfer the measured curves faithfully (identity on
the card's own curves, the right scaling on others), predict the measured cards from each other, and the
`alisa-sim hardware` commands list, show and derive with clear errors."""

import json

import pytest
import yaml

from alisa_sim.cli import main
from alisa_sim.hardware import load_hardware_profile
from alisa_sim.hardware_derive import (DATASHEET_DIR, PCIE_LANE_GBps, derive_from_file, derive_profile,
                                       installed_measured_profiles, load_datasheet, measured_datasheets, profile_yaml)
from alisa_sim.profile_builder import _Row
from alisa_sim.results import build_result
from alisa_sim.simulator import simulate
from alisa_sim.workload import resolve_workload

DERIVED = ["a100-40g-sxm", "a100-80g-sxm", "a10g", "h100-pcie", "l4", "l40s", "rtx-3090", "rtx-4090", "t4", "v100-32g"]


def _spec(name, **changes):
    data = yaml.safe_load((DATASHEET_DIR / f"{name}.yaml").read_text())
    for section, fields in changes.items():
        data[section] = {**data[section], **fields} if isinstance(fields, dict) else fields
    return data


@pytest.mark.parametrize("name", DERIVED)
def test_derived_profiles_cite_their_datasheet_and_never_beat_it(name):
    profile = load_hardware_profile(name)
    spec = load_datasheet(DATASHEET_DIR / f"{name}.yaml")
    assert {getattr(profile, s).source.kind for s in ("gpu", "link", "cpu")} == {"derived"}
    notes = " ".join(profile.provenance.notes)
    assert f"datasheet: {spec.gpu.source}" in notes and spec.gpu.source in profile.gpu.source.note
    assert "curves of h100, h200" in notes and ("nearest architecture" in notes or spec.gpu.architecture == "hopper")
    assert 0.98 * spec.gpu.memory_GiB * 2**30 < profile.gpu.memory_bytes < spec.gpu.memory_GiB * 2**30  # driver's share
    assert profile.gpu.peak_fp16_tflops == spec.gpu.fp16_tflops
    assert profile.cpu.memory_bytes == int(spec.host.memory_GiB * 2**30) and profile.cpu.cores == spec.host.cores
    best_gemm = max(2 * r.m * r.k * r.n / r.s for r in profile.gpu.gemm_fp16) / 1e12
    assert best_gemm < spec.gpu.fp16_tflops
    kv_Bps = max(4 * r.b * r.L * r.H * r.D / r.s for r in profile.gpu.decode_attention_fp16)
    assert kv_Bps < spec.gpu.memory_GBps * 1e9
    largest = profile.link.copies[-1]
    assert largest.bytes / largest.h2d_pinned_s < PCIE_LANE_GBps[spec.link.pcie_gen] * spec.link.lanes * 1e9
    assert profile.link.name == f"PCIe gen{spec.link.pcie_gen} x{spec.link.lanes}"


def test_the_cards_own_curves_give_back_its_measured_tables():
    measured = measured_datasheets()
    profiles = installed_measured_profiles(measured)
    spec = load_datasheet(DATASHEET_DIR / "h100-sxm.yaml").model_copy(update={"curves_from": ["h100"]})
    derived, h100 = derive_profile(spec, profiles, measured), profiles["h100"]
    for table in ("gemm_fp16", "decode_attention_fp16", "prefill_attention_fp16"):
        for mine, theirs in zip(derived["gpu"][table], h100["gpu"][table]):
            assert mine["s"] == pytest.approx(theirs["s"], rel=1e-3)  # 4 significant digits
    for mine, theirs in zip(derived["link"]["copies"], h100["link"]["copies"]):
        assert mine["h2d_pinned_s"] == pytest.approx(theirs["h2d_pinned_s"], rel=1e-3)
    assert derived["cpu"]["copy_GBps"] == pytest.approx(h100["cpu"]["copy_GBps"], rel=1e-3)


def test_curves_move_with_the_datasheet_figures():
    measured = measured_datasheets()
    profiles = installed_measured_profiles(measured)
    base = load_datasheet(DATASHEET_DIR / "h100-sxm.yaml").model_copy(update={"curves_from": ["h100"]})
    gpu = base.gpu.model_copy(update={"memory_GBps": base.gpu.memory_GBps / 2, "fp16_tflops": base.gpu.fp16_tflops / 4})
    link = base.link.model_copy(update={"pcie_gen": 3})
    slower = derive_profile(base.model_copy(update={"gpu": gpu, "link": link}), profiles, measured, "slower")
    h100 = profiles["h100"]
    big_decode = [(m["s"], t["s"]) for m, t in zip(slower["gpu"]["decode_attention_fp16"],
                                                   h100["gpu"]["decode_attention_fp16"]) if t["b"] * t["L"] >= 2**17]
    assert all(1.8 < m / t <= 2.0 for m, t in big_decode)  # memory-bound: half the bandwidth, twice the time
    big_gemm = [(m["s"], t["s"]) for m, t in zip(slower["gpu"]["gemm_fp16"], h100["gpu"]["gemm_fp16"])
                if t["m"] >= 4096]
    assert all(3.5 < m / t <= 4.0 for m, t in big_gemm)  # compute-bound: a quarter of the peak, 4x the time
    gen3, gen5 = slower["link"]["copies"][-1], h100["link"]["copies"][-1]
    assert gen3["h2d_pinned_s"] / gen5["h2d_pinned_s"] == pytest.approx(4.0, rel=0.05)  # gen3 x16 / gen5 x16


@pytest.mark.parametrize("measured_name, sheet, curves", [("h100", "h100-sxm", "h200"), ("h200", "h200-sxm", "h100")])
def test_a_measured_card_from_the_other_ones_curves_predicts_its_runs(tmp_path, measured_name, sheet, curves):
    """A few of benchmarks/derive_check.py's workloads (docs/hardware.md has the whole table)."""
    derived = tmp_path / f"{measured_name}-from-{curves}.yaml"
    derived.write_text(profile_yaml(derive_from_file(DATASHEET_DIR / f"{sheet}.yaml", [curves]), "a test"))
    for workload in ({"model": "opt-13b", "batch_size": 16, "prompt_len": 128, "gen_len": 64,
                      "policy": {"name": "alisa"}},
                     {"model": "llama-7b", "batch_size": 8, "prompt_len": 1024, "gen_len": 16,
                      "policy": {"name": "dense"}}):
        metrics = [build_result(simulate(resolve_workload({**workload, "hardware": hardware})))["metrics"]
                   for hardware in (measured_name, str(derived))]
        for read in (lambda m: m["prefill_s"], lambda m: m["decode_step_s"]["mean"]):
            assert read(metrics[1]) == pytest.approx(read(metrics[0]), rel=0.15), workload


def test_hardware_list_and_show(capsys):
    assert main(["hardware", "list", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(DERIVED) | {"h100", "h200", "t4-16g"} <= set(rows)
    assert rows["l4"]["kind"] == "derived" and rows["h100"]["kind"] == "measured"
    assert rows["l4"]["gpu_memory_GiB"] == pytest.approx(24.0, rel=0.02)
    assert main(["hardware", "show", "a10g"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "estimated, not published" in text and " GiB" in text and "gen4" in text


def test_hardware_derive_writes_a_profile_the_simulator_runs(tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    assert main(["hardware", "derive", str(DATASHEET_DIR / "l4.yaml"), "--curves-from", "h200", "--out", str(out)]) == 0
    profile = load_hardware_profile(out)
    assert "curves of h200 (named by curves_from)" in profile.provenance.notes[0]
    assert out.read_text().startswith("# Derived from a datasheet by `alisa-sim hardware derive")
    capsys.readouterr()
    assert main(["run", str(DATASHEET_DIR.parent.parent / "workloads" / "paper" / "fig9-opt30b-b64.yaml"),
                 "--hardware", str(out), "--set", "model=opt-6.7b", "--set", "gen_len=8", "--out",
                 str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["run"]["profile"]["name"] == "l4"  # the spec's name
    assert main(["hardware", "derive", str(DATASHEET_DIR / "l4.yaml"), "--out", str(out)]) == 2  # exists
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("change, message", [
    ({"gpu": {"memory_GBps": -1}}, "field 'gpu.memory_GBps'"),
    ({"link": {"pcie_gen": 7}}, "field 'link.pcie_gen'"),
    ({"gpu": {"architecture": "kepler"}}, "field 'gpu.architecture'"),
    ({"curves_from": ["a100"]}, "curves_from a100: not a measured profile"),
    ({"host": {"ram": 4}}, "field 'host.ram'"),
])
def test_bad_datasheet_specs_exit_2_naming_the_field(tmp_path, capsys, change, message):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(_spec("l4", **change)))
    assert main(["hardware", "derive", str(spec), "--out", str(tmp_path / "o.yaml")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "o.yaml").exists()


def test_missing_spec_and_unknown_profile_exit_2(tmp_path, capsys):
    assert main(["hardware", "derive", str(tmp_path / "none.yaml")]) == 2
    assert "datasheet spec file not found" in capsys.readouterr().err
    assert main(["hardware", "show", "no-such-gpu"]) == 2
    assert "unknown hardware profile 'no-such-gpu'" in capsys.readouterr().err


def test_rows_stay_yaml_rows():
    """Derived rows are the builder's flow-style rows (one YAML line each), as the committed files have them."""
    measured = measured_datasheets()
    profile = derive_profile(load_datasheet(DATASHEET_DIR / "t4.yaml"), installed_measured_profiles(measured), measured)
    assert isinstance(profile["gpu"]["gemm_fp16"][0], _Row) and isinstance(profile["link"]["copies"][0], _Row)

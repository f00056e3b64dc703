"""Named ops timed inside the executor's real steps (alisa_exec.in_step): each call's interval, the factor curves
against the profile's rows, and the cost model pricing an op at its row times its family's factor."""

import time

import pytest
import torch
import yaml

from alisa_exec.in_step import UNFACTORED, factor_rows, intervals, timed_calls
from alisa_exec.ledger import recording
from alisa_exec.overhead import OVERHEAD_PROBES
from alisa_exec.profiler import OVERHEAD_SPEC
from alisa_sim.cost_model import CostModel, op_family
from alisa_sim.hardware import NAMED_OPS, HardwareProfile, InStepRow, op_work
from alisa_sim.results import simulated_rows

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def bare_profile(quick_cpu_profile):
    """The session's quick CPU profile without its in-step factors and host overheads: the rows alone."""
    data = yaml.safe_load(quick_cpu_profile.read_text())
    data["gpu"]["in_step"], data["gpu"]["host_overheads"] = [], []
    return data


def test_the_quick_profile_holds_in_step_factors_of_the_probe_model(quick_cpu_profile):
    rows = yaml.safe_load(quick_cpu_profile.read_text())["gpu"]["in_step"]
    assert rows and all(InStepRow.model_validate(row) for row in rows)
    ops = {row["op"] for row in rows}
    assert {"project", "norm", "kv_store", "local_sum", "topk"} <= ops and not ops & set(UNFACTORED)


def test_intervals_run_from_each_issue_to_the_next_and_end_at_the_step():
    marks = [("norm", {"rows": 1}, 0.0), ("end", None, 0.5),  # the warm-up's step: before the start, left out
             ("start", None, 1.0), ("embed", {"rows": 1}, 1.25), ("norm", {"rows": 1}, 1.5), ("end", None, 2.0),
             ("project", {"m": 1}, 2.5), ("end", None, 3.5)]
    assert intervals(marks) == [(0, "embed", {"rows": 1}, 0.25), (0, "norm", {"rows": 1}, 0.5),
                                (1, "project", {"m": 1}, 1.0)]


def test_a_real_run_times_every_named_op_it_issues(bare_profile):
    hardware = HardwareProfile.model_validate(bare_profile)
    spec = OVERHEAD_SPEC.model_copy(update={"dtype_bytes": 4})
    with recording() as issued:
        t0 = time.perf_counter()
        calls = timed_calls(hardware, spec, OVERHEAD_PROBES["h2o"], 2, 8, CPU, torch.float32)
        wall_s = time.perf_counter() - t0
    assert {key for key, _, _, _ in calls} == {"h2o"}
    calls = [call[1:] for call in calls]
    # the timed run's ops are the last ones issued (the warm-up's come first), in the same order
    assert [(op, shape) for op, shape, _ in calls] == issued[-len(calls):]
    assert {op for op, _, _ in calls} <= set(NAMED_OPS) and {"evict_victim", "score_update"} <= {c[0] for c in calls}
    assert all(seconds > 0 for _, _, seconds in calls) and sum(c[2] for c in calls) < wall_s


def test_factor_rows_are_in_step_over_row_per_family_and_policy(bare_profile):
    cost = CostModel(HardwareProfile.model_validate(bare_profile))
    shapes = [("norm", {"rows": rows, "width": 64, "rms": 1, "e": 4}) for rows in (1, 2, 4, 8)]
    shapes += [("project", {"m": m, "k": 64, "n": 192, "e": 4}) for m in (1, 8)]
    dense = [("dense", op, shape, 3.0 * cost.op_s(op, **shape)) for op, shape in shapes for _ in range(3)]
    dense.append(("dense", "copy_h2d_pinned", {"bytes": 4096}, 1.0))  # priced from the link table: no factor
    h2o = [("h2o", op, shape, 5.0 * cost.op_s(op, **shape)) for op, shape in shapes[:4]]
    rows = factor_rows(cost, dense + h2o)
    assert [(row["policy"], row["op"], row["family"], row["calls"]) for row in rows] == [
        (None, "norm", {"e": 4, "rms": 1, "width": 64}, 16), (None, "project", {"e": 4, "k": 64, "n": 192}, 6),
        ("dense", "norm", {"e": 4, "rms": 1, "width": 64}, 12), ("dense", "project", {"e": 4, "k": 64, "n": 192}, 6),
        ("h2o", "norm", {"e": 4, "rms": 1, "width": 64}, 4)]
    factors = {(row["policy"], row["op"]): row["factor"] for row in rows}
    assert factors["dense", "norm"] == pytest.approx([3.0] * 4) and factors["h2o", "norm"] == pytest.approx([5.0] * 4)
    assert factors[None, "project"] == pytest.approx([3.0] * 2)
    assert rows[0]["work"] == [op_work("norm", shape) for _, shape in shapes[:4]]
    for row in rows:
        InStepRow.model_validate(row)


def test_the_cost_model_prices_an_op_at_its_row_times_its_familys_factor(bare_profile):
    alone = CostModel(HardwareProfile.model_validate(bare_profile))
    norm = {"rows": 2, "width": 64, "rms": 1, "e": 4}
    low, high = op_work("norm", norm), op_work("norm", {**norm, "rows": 8})
    data = {**bare_profile, "gpu": {**bare_profile["gpu"], "in_step": [
        {"op": "norm", "family": dict(op_family("norm", norm)), "work": [low, high], "factor": [2.0, 4.0],
         "calls": 4},
        {"op": "project", "family": {"e": 4, "k": 64, "n": 64}, "work": [1.0], "factor": [0.5], "calls": 1},
        {"op": "norm", "family": dict(op_family("norm", norm)), "policy": "h2o", "work": [low], "factor": [3.0],
         "calls": 1}]}}
    in_step = CostModel(HardwareProfile.model_validate(data))
    assert in_step.op_s("norm", **norm) == pytest.approx(2.0 * alone.op_s("norm", **norm))
    assert in_step.in_step_factor("norm", {**norm, "rows": 4}) == pytest.approx(2.0 * 2 ** 0.5)  # log-log between
    assert in_step.in_step_factor("norm", {**norm, "rows": 64}) == pytest.approx(4.0)  # the end value beyond
    assert in_step.in_step_factor("norm", {**norm, "rows": 1}) == pytest.approx(2.0)
    # another width of norm takes the nearest timed family's factor at the same rows; a GEMM only its own family's
    assert in_step.in_step_factor("norm", {"rows": 2, "width": 256, "rms": 1, "e": 4}) == pytest.approx(2.0)
    assert in_step.op_s("project", m=4, k=64, n=64, e=4) == pytest.approx(0.5 * alone.op_s("project", m=4, k=64,
                                                                                             n=64, e=4))
    assert in_step.in_step_factor("project", {"m": 4, "k": 256, "n": 256, "e": 4}) == 1.0
    assert in_step.in_step_factor("activate", {"rows": 2, "width": 64, "gated": 1, "e": 4}) == 1.0
    # under a policy with a curve of its own, that one; under another, the pooled one
    assert in_step.op_s("norm", "h2o", **norm) == pytest.approx(3.0 * alone.op_s("norm", **norm))
    assert in_step.in_step_factor("norm", norm, "vllm") == pytest.approx(2.0)


def test_alisa_steps_are_keyed_and_priced_by_their_phase(bare_profile):
    """The in-step stage labels each ALISA step with its phase's key, and the simulator prices each phase's
    template from that phase's factors."""
    from alisa_sim.simulator import simulate
    from alisa_sim.workload import ResolvedWorkload, Workload

    hardware = HardwareProfile.model_validate(bare_profile)
    spec = OVERHEAD_SPEC.model_copy(update={"dtype_bytes": 4})
    keys = {key for key, _, _, _ in timed_calls(hardware, spec, OVERHEAD_PROBES["alisa"], 1, 8, CPU, torch.float32)}
    assert keys == {"alisa-phase-1", "alisa-phase-2", "alisa-phase-3"}
    norm = {"rows": 1, "width": 64, "rms": 1, "e": 4}
    rows = [{"op": "norm", "family": dict(op_family("norm", norm)), "policy": f"alisa-phase-{phase}",
             "work": [op_work("norm", norm)], "factor": [factor], "calls": 1}
            for phase, factor in ((1, 1.0), (3, 50.0))]
    timed = HardwareProfile.model_validate({**bare_profile, "gpu": {**bare_profile["gpu"], "in_step": rows}})
    workload = Workload.model_validate({"model": spec.model_dump(), "hardware": "h100", "batch_size": 1,
                                        "prompt_len": 8, "gen_len": 39, "policy": OVERHEAD_PROBES["alisa"],
                                        "memory": {"gpu_gb": 0.25}})
    steps = {}
    for profile in (hardware, timed):
        result = simulate(ResolvedWorkload(workload, spec, profile))
        steps[profile is timed] = [(row.phase, row.time_s) for row in simulated_rows(result) if row.kind == "decode"]
    for (phase, plain), (_, priced) in zip(steps[False], steps[True]):
        assert (priced > 1.5 * plain) if phase == 3 else priced == pytest.approx(plain)

"""The profiler times the executor's own named ops, and the cost model prices ops from those rows by name."""

import pytest
import torch
import yaml

from alisa_exec import ops
from alisa_exec.kernels.selection import LocalAttentionSum, prefill_window_rows
from alisa_exec.kv_cache import Tiers, TokenRows
from alisa_exec.profiler import CPU_QUICK, Bench, fastest_of, measure_named_ops
from alisa_sim.cost_model import CostModel
from alisa_sim.hardware import NAMED_OPS, HardwareProfile, load_hardware_profile, op_work

# Each named op and the executor callable it times (alisa_exec.ops functions, or the cache's, selection's and tiers'
# own calls).
EXECUTOR_CALLS = {
    "project": ops.project, "project_packed": ops.project, "norm": ops.norm, "activate": ops.activate,
    "split_heads": ops.split_heads, "residual": ops.residual, "embed": ops.embed, "argmax": ops.argmax,
    "causal_attention": ops.causal_attention, "masked_attention": ops.masked_attention,
    "rows_attention": ops.rows_attention, "packed_attention": ops.packed_attention,
    "sparse_attention": ops.sparse_attention, "staged_sparse_attention": ops.sparse_attention,
    "paged_attention": ops.paged_attention,
    "cpu_attention": ops.cpu_attention, "kv_store": ops.kv_store, "block_store": ops.block_store,
    "kv_quantize": TokenRows.store, "kv_dequantize": TokenRows.read,
    "window_rows": prefill_window_rows, "keep_prompt": ops.keep_prompt, "evict_victim": ops.evict_victim,
    "slot_store": ops.slot_store, "score_update": ops.score_update, "local_sum": LocalAttentionSum.push, "topk": LocalAttentionSum.select, "copy_h2d_pinned": Tiers.copy,
    "copy_h2d_pageable": Tiers.copy, "copy_d2h_pinned": Tiers.copy, "copy_d2h_pageable": Tiers.copy,
    "host_gather": TokenRows.flat_rows, "stage_indices": ops.stage_indices, "key_copy_store": ops.key_copy_store,
    "key_copy_attention": ops.key_copy_attention, "capped_pick": ops.capped_pick, "head_gather": TokenRows.head_rows,
}


@pytest.fixture(scope="module")
def named_rows(quick_cpu_profile):
    """The named-op rows of the session's `alisa-exec profile --device cpu --quick`."""
    return yaml.safe_load(quick_cpu_profile.read_text())["gpu"]["ops"]


def test_every_named_op_is_an_executor_call_and_the_profiler_times_each(named_rows, quick_cpu_profile):
    assert set(EXECUTOR_CALLS) == set(NAMED_OPS)
    assert {row["op"] for row in named_rows} == set(NAMED_OPS)
    assert all(row["source"] == "measured" and row["s"] > 0 and row["host_s"] == 0 for row in named_rows)
    assert {row.op for row in load_hardware_profile(quick_cpu_profile).gpu.ops} == set(NAMED_OPS)


def test_the_cost_model_reads_measured_rows_by_name(named_rows):
    profile = load_hardware_profile("h200").model_dump()
    profile["gpu"]["ops"] = named_rows
    cost = CostModel(HardwareProfile.model_validate(profile))
    for row in named_rows:
        same_work = [other for other in named_rows if other["op"] == row["op"]
                     and op_work(row["op"], other["shape"]) == op_work(row["op"], row["shape"])]
        if row["op"] not in ("project", "project_packed") and len(same_work) == 1:  # rows of equal work are merged by geometric mean
            assert cost.op_s(row["op"], **row["shape"]) == pytest.approx(row["s"], rel=1e-6)
    gemm = next(row for row in named_rows if row["op"] == "project")
    shape = gemm["shape"]
    assert cost.gemm_s(shape["m"], shape["k"], shape["n"]) == pytest.approx(gemm["s"], rel=1e-6)
    assert cost.op_host_s("norm") == 0.0  # on a CPU device the issue is in the op's own time


def test_an_unknown_op_name_is_an_error():
    cost = CostModel(load_hardware_profile("h200"))
    with pytest.raises(ValueError, match="unknown op 'layernorm'"):
        cost.op_s("layernorm", rows=1, width=8, e=2)
    with pytest.raises(ValueError, match="unknown op"):
        cost.op_host_s("layernorm")
    profile = load_hardware_profile("h200").model_dump()
    profile["gpu"]["ops"] = [{"op": "layernorm", "shape": {"rows": 1}, "s": 1e-5, "host_s": 0.0,
                              "source": "measured"}]
    with pytest.raises(ValueError, match="unknown op"):
        HardwareProfile.model_validate(profile)


def test_attention_rows_of_different_query_heads_are_priced_apart():
    """GQA: the same cache (KV heads, width, bytes) attended by more query heads is more compute; rows measured at
    two query-head counts are two families, each priced from its own rows (not merged as equal work)."""
    profile = load_hardware_profile("h200").model_dump()
    rows = [{"op": "masked_attention", "shape": {"b": b, "T": T, "h": h, "kv": 2, "d": 32, "e": 4},
             "s": s * (2.5 if h == 8 else 1.0), "host_s": 0.0, "source": "measured"}
            for h in (2, 8) for b, T, s in ((1, 32, 1e-5), (1, 512, 4e-5), (32, 32, 4e-5), (32, 512, 4e-4))]
    profile["gpu"]["ops"] = rows
    cost = CostModel(HardwareProfile.model_validate(profile))
    for row in rows:
        assert cost.op_s("masked_attention", **row["shape"]) == pytest.approx(row["s"], rel=1e-6)
    old = {**rows[0], "shape": {key: value for key, value in rows[0]["shape"].items() if key != "h"}}
    profile["gpu"]["ops"] = [old]
    with pytest.raises(ValueError, match="no query-head count 'h'.*measure it again"):
        HardwareProfile.model_validate(profile)


def test_shipped_profiles_derive_every_named_op():
    profile = load_hardware_profile("h200")
    assert {row.op for row in profile.gpu.ops} == set(NAMED_OPS)
    assert {row.source for row in profile.gpu.ops} == {"derived"}


def test_named_ops_are_timed_at_each_models_layer_and_priced_from_its_own_rows(monkeypatch):
    """`--models`: the rows of a model's head layout and widths, which the cost model picks over the grid's own
    layer (the nearest family) when it prices that model's shapes."""
    from dataclasses import replace

    from alisa_exec import profiler

    # Which rows are measured does not depend on how many distinct weight buffers a projection streams: 256 MiB of
    # them is tens of thousands of packed copies of the tiny model's weights (minutes); 4 MiB is still several each.
    monkeypatch.setattr(profiler, "STREAMED_WEIGHT_BYTES", 4 * 2**20)

    from tiny_models import TINY_SPEC
    from alisa_sim.model_spec import ModelSpec

    grid = replace(CPU_QUICK, gemm_kn=((256, 256),), gemm_m=(1, 4), decode_bL=((1, 32), (4, 32)),
                   prefill_bL=((1, 16),), copy_bytes=(64 * 1024,), host_decode_bL=((1, 32),))
    spec = ModelSpec(**TINY_SPEC)
    rows = measure_named_ops(Bench(torch.device("cpu"), 2, min_time_s=0.0), grid, torch.float32, (spec,))
    attention = [row for row in rows if row["op"] == "rows_attention" and row["shape"]["kv"] == spec.num_kv_heads
                 and row["shape"]["d"] == spec.dim_per_head]
    assert len(attention) == len(grid.decode_bL)
    assert {(row["shape"]["k"], row["shape"]["n"]) for row in rows if row["op"] == "project"} >= {
        (g.k, g.n) for g in spec.layer_gemms(1)}
    profile = load_hardware_profile("h200").model_dump()
    profile["gpu"]["ops"] = rows
    cost = CostModel(HardwareProfile.model_validate(profile))
    for row in attention:
        assert cost.op_s("rows_attention", **row["shape"]) == pytest.approx(row["s"], rel=1e-6)


def _scaled(profile: dict, factor: float) -> dict:
    """A copy of a profile whose every time is `factor` times as long and every rate `factor` times as slow."""
    def scale(value, key, parent):
        if isinstance(value, dict):
            return {k: scale(v, k, key) for k, v in value.items()}
        if isinstance(value, list):
            return [scale(v, key, parent) for v in value]
        if isinstance(value, float) and (key == "s" or key.endswith("_s")):
            return value * factor
        if isinstance(value, float) and (key.endswith("GBps") or key.endswith("tflops") or parent == "gemm_tflops"):
            return value / factor
        return value
    return scale(profile, "", "")


def test_profile_rounds_merge_into_each_rows_fastest(quick_cpu_profile):
    measured = yaml.safe_load(quick_cpu_profile.read_text())
    slow, fast = _scaled(measured, 1.5), _scaled(measured, 0.5)
    merged = fastest_of([slow, measured, fast])
    # every time and rate is the fastest round's, shapes untouched, and the merge says what it did
    assert {k: v for k, v in merged.items() if k != "provenance"} == {k: v for k, v in fast.items() if k != "provenance"}
    assert "fastest of 3 rounds" in merged["provenance"]["notes"][-1]
    # row by row: one round fastest in one row, another in the next
    mixed = yaml.safe_load(quick_cpu_profile.read_text())
    mixed["gpu"]["ops"][0]["s"] *= 0.25
    merged = fastest_of([mixed, fast])
    assert merged["gpu"]["ops"][0]["s"] == mixed["gpu"]["ops"][0]["s"]
    assert merged["gpu"]["ops"][1]["s"] == fast["gpu"]["ops"][1]["s"]
    other_grid = yaml.safe_load(quick_cpu_profile.read_text())
    other_grid["gpu"]["gemm_fp16"][0]["m"] += 1
    with pytest.raises(ValueError, match="rounds differ"):
        fastest_of([measured, other_grid])
    fewer_rows = yaml.safe_load(quick_cpu_profile.read_text())
    fewer_rows["gpu"]["ops"].pop()
    with pytest.raises(ValueError, match="different numbers of rows"):
        fastest_of([measured, fewer_rows])

"""CostModel: reproduces every measured point, interpolates and extrapolates as documented, keeps the physics."""

import numpy as np
import pytest

from alisa_sim.cost_model import CostModel
from alisa_sim.hardware import load_hardware_profile

EXACT = 1e-6


@pytest.fixture(scope="module")
def h200():
    return load_hardware_profile("h200")


@pytest.fixture(scope="module")
def cost(h200):
    return CostModel(h200)


def test_reproduces_measured_gemm_rows(cost, h200):
    for row in h200.gpu.gemm_fp16:
        assert cost.gemm_s(row.m, row.k, row.n) == pytest.approx(row.s, rel=EXACT), row


def test_reproduces_measured_decode_attention_rows(cost, h200):
    for row in h200.gpu.decode_attention_fp16:
        assert cost.decode_attention_s(row.b, row.L, row.H, row.H, row.D) == pytest.approx(row.s, rel=EXACT), row


def test_reproduces_measured_prefill_attention_rows(cost, h200):
    for row in h200.gpu.prefill_attention_fp16:
        assert cost.prefill_attention_s(row.b, row.L, row.H, row.D) == pytest.approx(row.s, rel=EXACT), row


def test_reproduces_measured_copy_rows(cost, h200):
    for row in h200.link.copies:
        for direction in ("h2d", "d2h"):
            assert cost.copy_s(row.bytes, direction) == pytest.approx(getattr(row, f"{direction}_pinned_s"), rel=EXACT)
            assert cost.copy_s(row.bytes, direction, pinned=False) == pytest.approx(
                getattr(row, f"{direction}_pageable_s"), rel=EXACT)


def _non_decreasing(times):
    return all(later >= earlier for earlier, later in zip(times, times[1:]))


# The smallest measured sizes sit on a noisy latency floor (e.g. a 64-row GEMM timed faster than a 16-row one) and
# are reproduced as measured; above that floor time must grow with size, inside and beyond the measured range.
def test_monotone_in_size_above_the_latency_floor(cost, h200):
    sizes = np.geomspace(64, 1 << 18, 60).astype(int)
    for k, n in {(row.k, row.n) for row in h200.gpu.gemm_fp16}:
        assert _non_decreasing([cost.gemm_s(int(m), k, n) for m in sizes]), (k, n)
    contexts = np.geomspace(256, 1 << 17, 60).astype(int)
    for batch in (1, 3, 8, 20, 64, 200):
        assert _non_decreasing([cost.decode_attention_s(batch, int(L), 32, 32, 128) for L in contexts]), batch
    for context in (4096, 30000):  # at short contexts small batches are all latency floor
        assert _non_decreasing([cost.decode_attention_s(int(b), context, 32, 32, 128) for b in np.geomspace(1, 512, 40)])
    assert _non_decreasing([cost.prefill_attention_s(4, int(L), 32, 128) for L in np.geomspace(16, 1 << 15, 60)])
    nbytes = np.geomspace(1 << 20, 1 << 33, 60)
    for direction in ("h2d", "d2h"):
        for pinned in (True, False):
            assert _non_decreasing([cost.copy_s(size, direction, pinned) for size in nbytes])


@pytest.mark.parametrize("name", ["paper-v100-32g", "t4-16g"])
def test_roofline_profiles_are_monotone_everywhere(name):
    cost = CostModel(load_hardware_profile(name))
    assert _non_decreasing([cost.gemm_s(int(m), 4096, 4096) for m in np.geomspace(1, 1 << 16, 60)])
    assert _non_decreasing([cost.decode_attention_s(8, int(L), 32, 32, 128) for L in np.geomspace(1, 1 << 16, 60)])
    assert _non_decreasing([cost.copy_s(size, "h2d") for size in np.geomspace(1, 1 << 32, 60)])


def test_unmeasured_gemm_shape_is_nearest_family_scaled_by_flops(cost):
    # (4096, 10240) is nearest, in log (k, n), to the measured (4096, 11008) family.
    assert cost.gemm_s(4096, 4096, 10240) == pytest.approx(cost.gemm_s(4096, 4096, 11008) * 10240 / 11008, rel=EXACT)
    # (8192, 28672) is nearest to (5120, 20480).
    ratio = 8192 * 28672 / (5120 * 20480)
    assert cost.gemm_s(1024, 8192, 28672) == pytest.approx(cost.gemm_s(1024, 5120, 20480) * ratio, rel=EXACT)


def test_tiny_gemm_never_below_the_fastest_measured_gemm(cost, h200):
    assert cost.gemm_s(1, 64, 64) == pytest.approx(min(row.s for row in h200.gpu.gemm_fp16), rel=EXACT)


def test_gemm_beyond_measured_m_grows_at_the_edge_rate(cost):
    assert cost.gemm_s(65536, 4096, 4096) == pytest.approx(4 * cost.gemm_s(16384, 4096, 4096), rel=EXACT)


def test_gqa_and_int8_read_fewer_bytes_so_are_faster(cost):
    mha = cost.decode_attention_s(32, 4096, 32, 32, 128)
    gqa = cost.decode_attention_s(32, 4096, 32, 8, 128)
    assert gqa < mha
    assert gqa == pytest.approx(cost.decode_attention_s(32, 1024, 32, 32, 128), rel=EXACT)
    int8 = cost.decode_attention_s(32, 4096, 32, 32, 128, kv_dtype_bytes=1)
    assert int8 < mha
    assert int8 == pytest.approx(cost.decode_attention_s(32, 2048, 32, 32, 128), rel=EXACT)


def test_decode_attention_extrapolates_by_bandwidth(cost):
    # Beyond the longest measured context and the largest measured batch, time grows with the bytes read.
    assert cost.decode_attention_s(64, 65536, 32, 32, 128) == pytest.approx(
        16 * cost.decode_attention_s(64, 4096, 32, 32, 128), rel=EXACT)
    assert cost.decode_attention_s(128, 4096, 32, 32, 128) == pytest.approx(
        2 * cost.decode_attention_s(64, 4096, 32, 32, 128), rel=EXACT)


def test_decode_attention_between_batches_lies_between_them(cost):
    between = cost.decode_attention_s(16, 2048, 32, 32, 128)
    # Same bytes per step as b=8, L=4096 and b=32, L=1024.
    low, high = sorted([cost.decode_attention_s(8, 4096, 32, 32, 128), cost.decode_attention_s(32, 1024, 32, 32, 128)])
    assert low <= between <= high


def test_copy_latency_floor_and_large_transfer_rate(cost, h200):
    smallest, largest = h200.link.copies[0], h200.link.copies[-1]
    assert cost.copy_s(1024, "h2d") == pytest.approx(smallest.h2d_pinned_s, rel=EXACT)
    assert cost.copy_s(4 * largest.bytes, "d2h") == pytest.approx(4 * largest.d2h_pinned_s, rel=EXACT)
    assert cost.copy_s(largest.bytes, "h2d", pinned=False) > cost.copy_s(largest.bytes, "h2d")
    assert cost.h2d_bandwidth(largest.bytes) == pytest.approx(largest.bytes / largest.h2d_pinned_s, rel=EXACT)
    with pytest.raises(ValueError, match="direction"):
        cost.copy_s(1024, "d2d")


def test_paper_h100_link_moves_a_gigabyte_at_20_GBps():
    cost = CostModel(load_hardware_profile("paper-h100-80g"))
    assert cost.copy_s(1e9, "h2d") == pytest.approx(1e9 / 20e9, rel=0.01)
    assert cost.copy_s(1e9, "d2h") == pytest.approx(1e9 / 20e9, rel=0.01)
    assert cost.h2d_bandwidth(1e9) == pytest.approx(20e9, rel=0.01)


def test_t4_answers_flexgens_fitted_rates():
    """FlexGen's CostModelConfig for its GCP T4 (GB = 2**30, T = 1e12), through the cost model's queries."""
    cost = CostModel(load_hardware_profile("t4-16g"))
    GiB = 2**30
    # Link: pinned H2D at ctog_bdw, pinned D2H at gtoc_bdw_hidden, pageable D2H (KV stores) at gtoc_bdw_cache.
    assert cost.copy_s(GiB, "h2d") == pytest.approx(1 / 12.89, rel=1e-3)
    assert cost.copy_s(GiB, "d2h") == pytest.approx(1 / 4.82, rel=1e-3)
    assert cost.copy_s(GiB, "d2h", pinned=False) == pytest.approx(1 / 0.97, rel=1e-3)
    assert cost.copy_s(GiB, "h2d", pinned=False) > cost.copy_s(GiB, "h2d")
    # GEMM: mm_flops_p for prefill-sized m (an unmeasured (k, n) too), mm_flops_g for decode-sized m.
    flops = 2 * 8192 * 7168 * 7168
    assert cost.gemm_s(8192, 7168, 7168) == pytest.approx(flops / 21.24e12, rel=0.01)
    assert cost.gemm_s(64, 4096, 4096) == pytest.approx(2 * 64 * 4096 * 4096 / 4.3e12, rel=0.05)
    # Attention: prefill at bmm_flops_p over FlexGen's full-matrix FLOPs (4 b L^2 H D); decode at 79e9 fp16 KV bytes/s.
    assert cost.prefill_attention_s(8, 2048, 32, 128) == pytest.approx(4 * 8 * 2048**2 * 32 * 128 / 9.97e12, rel=0.01)
    kv_fp16 = 2 * 32 * 4096 * 32 * 128 * 2
    assert cost.decode_attention_s(32, 4096, 32, 32, 128) == pytest.approx(kv_fp16 / 79e9, rel=1e-3)
    # CPU decode attention: cpu_flops = 12.3e9 fp16 KV bytes/s, queried in fp32 bytes: 24.6e9.
    for batch, context in ((1, 1024), (8, 2048), (32, 1024), (64, 8192)):
        kv_fp32 = 2 * batch * context * 32 * 128 * 4
        assert cost.cpu_decode_attention_s(batch, context, 32, 32, 128) == pytest.approx(kv_fp32 / 24.6e9, rel=1e-3)


def test_hbm_and_cpu_figures(cost, h200):
    assert cost.hbm_s(1e9) == pytest.approx(1e9 / (h200.gpu.hbm_GBps * 1e9), rel=EXACT)
    assert cost.cpu_copy_s(1e9) == pytest.approx(1e9 / (h200.cpu.copy_GBps * 1e9), rel=EXACT)
    for dtype, tflops in h200.cpu.gemm_tflops.items():
        assert cost.cpu_gemm_s(64, 4096, 4096, dtype) == pytest.approx(2 * 64 * 4096 * 4096 / (tflops * 1e12), rel=EXACT)
    with pytest.raises(ValueError, match="float64"):
        cost.cpu_gemm_s(1, 1, 1, "float64")


def test_cpu_decode_attention_by_bytes_over_measured_bandwidth(cost, h200):
    (row_b32,) = [row for row in h200.cpu.decode_attention if row.b == 32]
    assert cost.cpu_decode_attention_s(32, row_b32.L, 32, 32, 128) == pytest.approx(row_b32.s, rel=EXACT)
    # Two rows at b=8: their pooled bandwidth, applied to any context at that batch.
    rows_b8 = [row for row in h200.cpu.decode_attention if row.b == 8]
    pooled_Bps = sum(2 * 8 * r.L * r.H * r.D * 4 for r in rows_b8) / sum(r.s for r in rows_b8)
    assert cost.cpu_decode_attention_s(8, 2048, 32, 32, 128) == pytest.approx(2 * 8 * 2048 * 32 * 128 * 4 / pooled_Bps,
                                                                              rel=EXACT)
    assert cost.cpu_decode_attention_s(8, 2048, 32, 8, 128) == pytest.approx(
        cost.cpu_decode_attention_s(8, 2048, 32, 32, 128) / 4, rel=EXACT)


def test_no_work_takes_no_time(cost):
    assert cost.copy_s(0, "h2d") == 0.0
    assert cost.decode_attention_s(8, 0, 32, 32, 128) == 0.0
    assert cost.prefill_attention_s(8, 0, 32, 128) == 0.0
    assert cost.gemm_s(0, 4096, 4096) == 0.0
    assert cost.cpu_decode_attention_s(8, 0, 32, 32, 128) == 0.0


def test_launch_overhead_comes_from_the_profile(cost, h200):
    assert cost.launch_overhead_s == h200.gpu.launch_overhead_s


def test_a_dropped_cost_model_is_freed(h200):
    """Its memoized op times die with it (a calibration builds thousands of cost models: a cache shared by the class
    would keep each one alive, 15 GB in a 28-point fit)."""
    import gc
    import weakref

    model = CostModel(h200)
    model.gemm_s(4, 4096, 4096), model.decode_attention_s(4, 512, 32, 8, 128), model.prefill_attention_s(1, 64, 8, 64)
    gemms = weakref.ref(model._gemms["project"])
    dropped = weakref.ref(model)
    del model
    gc.collect()
    assert dropped() is None and gemms() is None


def test_an_op_variant_is_priced_from_its_own_variants_rows(h200):
    """H2O's scored victim search and StreamingLLM's are one op with a `scored` flag: a shape of one variant takes
    its own variant's rows, even where the other variant was measured at the asked head layout and this one not."""
    profile = h200.model_dump()
    profile["gpu"]["ops"] = [
        {"op": "evict_victim", "shape": {"b": 1, "kv": 8, "T": T, "scored": 0}, "s": 1e-6 * T, "host_s": 0.0,
         "source": "measured"} for T in (64, 256)] + [
        {"op": "evict_victim", "shape": {"b": 1, "kv": 2, "T": T, "scored": 1}, "s": 1e-3 * T, "host_s": 0.0,
         "source": "measured"} for T in (64, 256)]
    cost = CostModel(type(h200).model_validate(profile))
    assert cost.op_s("evict_victim", b=1, kv=8, T=64, scored=0) == pytest.approx(64e-6, rel=EXACT)
    assert cost.op_s("evict_victim", b=1, kv=2, T=64, scored=1) == pytest.approx(64e-3, rel=EXACT)
    # Scored at 8 KV heads: only the scored rows (at 2 KV heads) price it, by its work (12 bytes a slot).
    assert cost.op_s("evict_victim", b=1, kv=8, T=64, scored=1) == pytest.approx(4 * 64e-3, rel=EXACT)

"""The SimPy engine: stream semantics, overlap vs serial, and the exactness of collapsing periodic layers."""

import random

import pytest

from alisa_sim.engine import MemoryPool, OutOfMemory, StepSimulator
from alisa_sim.ops import LayerTemplate, make_op


def _offload_layer(load_s, qkv_s, attn_s, mlp_s, store_s) -> LayerTemplate:
    """Accelerate-shaped layer: KV prefetch (double-buffered), compute chain, write-back of the new token."""
    t = LayerTemplate()
    t.add(make_op("kv_load", "h2d", {"h2d": load_s}, nbytes=100))
    t.add(make_op("qkv_proj", "gpu", {"gemm": qkv_s}))
    t.add(make_op("attention", "gpu", {"attention": attn_s}), after=("qkv_proj", "kv_load"))
    t.add(make_op("out_proj_mlp", "gpu", {"gemm": mlp_s}), after=("attention",))
    t.link("out_proj_mlp", "qkv_proj", lag=1)
    t.link("attention", "kv_load", lag=2)
    t.add(make_op("kv_store", "d2h", {"d2h": store_s}, nbytes=10), after=("qkv_proj",))
    t.tail.append(make_op("lm_head", "gpu", {"gemm": 0.5}))
    return t


def _full_gpu_end(template, layers, overlap=True):
    """Reference: simulate every layer, no collapsing."""
    sim = StepSimulator(overlap)
    ends, _ = sim._simulate(template, layers)
    key = "out_proj_mlp"
    return ends[(layers - 1, key)] + sum(op.duration_s for op in template.tail)


def test_serial_mode_adds_every_op():
    t = _offload_layer(3.0, 1.0, 2.0, 1.5, 0.25)
    timing = StepSimulator(overlap=False).run_step(t, 10)
    assert timing.duration_s == pytest.approx(10 * (3.0 + 1.0 + 2.0 + 1.5 + 0.25) + 0.5)


def test_transfer_bound_pipeline_runs_at_transfer_rate():
    # Loads dominate: after the first load, each layer costs one load; compute hides behind it.
    t = _offload_layer(3.0, 0.1, 0.2, 0.3, 0.01)
    timing = StepSimulator().run_step(t, 40)
    assert timing.duration_s == pytest.approx(40 * 3.0 + 0.2 + 0.3 + 0.5)
    assert timing.simulated_layers < 40  # collapsed
    assert timing.h2d_bytes == 40 * 100 and timing.d2h_bytes == 40 * 10


@pytest.mark.parametrize("seed", range(40))
def test_collapsed_step_equals_full_simulation(seed):
    rng = random.Random(seed)
    durations = [rng.choice([0.0, rng.uniform(0.01, 5.0)]) if i == 4 else rng.uniform(0.01, 5.0) for i in range(5)]
    layers = rng.choice([7, 12, 33, 48, 80])
    t = _offload_layer(*durations)
    timing = StepSimulator().run_step(t, layers)
    assert timing.duration_s == pytest.approx(_full_gpu_end(t, layers), rel=1e-9)
    events = list(timing.events())
    assert len(events) == layers * 5 + 1
    assert max(e.end for e in events if e.resource == "gpu") == pytest.approx(timing.duration_s, rel=1e-9)


def test_overlap_is_never_slower_than_serial():
    rng = random.Random(7)
    for _ in range(30):
        t = _offload_layer(*(rng.uniform(0.01, 4.0) for _ in range(5)))
        overlapped = StepSimulator(True).run_step(t, 24).duration_s
        serial = StepSimulator(False).run_step(t, 24).duration_s
        assert overlapped <= serial + 1e-12


def test_copy_backlog_carries_into_next_step():
    t = LayerTemplate()
    t.add(make_op("compute", "gpu", {"gemm": 1.0}))
    t.add(make_op("kv_store", "d2h", {"d2h": 5.0}), after=("compute",))
    sim = StepSimulator()
    first = sim.run_step(t, 1)
    assert first.duration_s == pytest.approx(1.0)
    assert first.carry_s["d2h"] == pytest.approx(5.0)
    second = sim.run_step(t, 1)
    stores = [e for e in second.events() if e.name == "kv_store"]
    assert stores[0].start == pytest.approx(5.0)  # waits for the previous step's store to drain


def test_launch_floor_applies_when_kernels_are_tiny():
    op = make_op("tiny", "gpu", {"gemm": 1e-7, "elementwise": 1e-7}, kernels=4, launch_overhead_s=5e-6)
    assert op.duration_s == pytest.approx(2e-5)
    assert dict(op.parts)["gemm"] == pytest.approx(1e-5)


def test_template_rejects_unknown_dependencies():
    t = LayerTemplate()
    with pytest.raises(ValueError):
        t.add(make_op("a", "gpu", {"gemm": 1.0}), after=("missing",))
    with pytest.raises(ValueError):
        make_op("b", "tpu", {"gemm": 1.0})


def test_memory_pool_tracks_peak_and_reports_overflow():
    import simpy

    pool = MemoryPool(simpy.Environment(), "GPU", capacity_bytes=100)
    pool.hold({"weights": 60, "kv": 30}, "at start")
    pool.hold({"kv": 10}, "later")
    assert pool.peak_bytes == 90 and pool.container.level == 70
    with pytest.raises(OutOfMemory, match=r"out of GPU memory at step 9: needs 1.1e-07 GB \(weights 6e-08"):
        pool.hold({"kv": 50}, "at step 9")

"""The engine: stream and host semantics, overlap vs serial, CPU devices, and the exactness of collapsing periodic
layers, all against a plain SimPy model of the same machine that simulates every layer."""

import random

import pytest
import simpy

from alisa_sim.engine import HOST, SERIAL, MemoryPool, OutOfMemory, StepSimulator
from alisa_sim.ops import LayerTemplate, make_op


def _offload_layer(load_s, qkv_s, attn_s, mlp_s, store_s, host_s=(0.0,) * 5) -> LayerTemplate:
    """Accelerate-shaped layer: KV prefetch (double-buffered), compute chain, write-back of the new token."""
    t = LayerTemplate()
    t.add(make_op("kv_load", "h2d", {"h2d": load_s}, host_s[0], nbytes=100))
    t.add(make_op("qkv_proj", "gpu", {"gemm": qkv_s}, host_s[1]))
    t.add(make_op("attention", "gpu", {"attention": attn_s}, host_s[2]), after=("qkv_proj", "kv_load"))
    t.add(make_op("out_proj_mlp", "gpu", {"gemm": mlp_s}, host_s[3]), after=("attention",))
    t.link("out_proj_mlp", "qkv_proj", lag=1)
    t.link("attention", "kv_load", lag=2)
    t.add(make_op("kv_store", "d2h", {"d2h": store_s}, host_s[4], nbytes=10), after=("qkv_proj",))
    t.head.append(make_op("embedding", "gpu", {"elementwise": 0.05}, 0.01))
    t.tail.append(make_op("lm_head", "gpu", {"gemm": 0.5}, 0.02))
    return t


def _simpy_reference(template, layers, overlap=True, host_is_device=False, carry=None):
    """Every layer simulated with SimPy processes: the host issues the ops in program order; each resource runs its
    queue in that order, an op starting once issued, its dependencies done and the resource free. Returns the step
    duration, the carry and {(layer, name): (start, end)}."""
    carry = carry or {}
    env = simpy.Environment()
    program = ([(-1, op) for op in template.head] + [(layer, op) for layer in range(layers) for op in template.ops]
               + [(layers, op) for op in template.tail])
    issued = {(layer, op.name): env.event() for layer, op in program}
    done = {(layer, op.name): env.event() for layer, op in program}
    spans = {}

    def lane(op):
        return op.resource if overlap and not host_is_device else SERIAL

    def host():
        for layer, op in program:
            if not host_is_device:
                yield env.timeout(op.host_s)
            issued[layer, op.name].succeed()

    def stream(name, queue):
        if carry.get(name):
            yield env.timeout(carry[name])
        for layer, op in queue:
            waits = [issued[layer, op.name]]
            if 0 <= layer < layers:
                waits += [done[layer - lag, src] for src, lag in template.dependencies(op.name) if layer >= lag]
            for event in waits:
                if not event.processed:
                    yield event
            start = env.now
            yield env.timeout(op.duration_s + (op.host_s if host_is_device else 0.0))
            spans[layer, op.name] = (start, env.now)
            done[layer, op.name].succeed()

    queues = {}
    for layer, op in program:
        queues.setdefault(lane(op), []).append((layer, op))
    env.process(host())
    for name, queue in queues.items():
        env.process(stream(name, queue))
    env.run()
    ends = {name: max([carry.get(name, 0.0)] + [spans[layer, op.name][1] for layer, op in queue])
            for name, queue in queues.items()}
    duration = ends.get("gpu" if overlap and not host_is_device else SERIAL, 0.0)
    return duration, {name: end - duration for name, end in ends.items() if end > duration}, spans


def test_serial_mode_adds_every_op():
    t = _offload_layer(3.0, 1.0, 2.0, 1.5, 0.25)
    timing = StepSimulator(overlap=False).run_step(t, 10)
    assert timing.duration_s == pytest.approx(0.01 + 0.05 + 10 * (3.0 + 1.0 + 2.0 + 1.5 + 0.25) + 0.5)


def test_transfer_bound_pipeline_runs_at_transfer_rate():
    # Loads dominate: after the first load, each layer costs one load; compute hides behind it.
    t = _offload_layer(3.0, 0.1, 0.2, 0.3, 0.01)
    timing = StepSimulator().run_step(t, 40)
    # the first load waits for the head's launch
    assert timing.duration_s == pytest.approx(0.01 + 40 * 3.0 + 0.2 + 0.3 + 0.5)
    assert timing.simulated_layers < 40  # collapsed
    assert timing.h2d_bytes == 40 * 100 and timing.d2h_bytes == 40 * 10


@pytest.mark.parametrize("seed", range(60))
def test_collapsed_step_equals_full_simpy_simulation(seed):
    rng = random.Random(seed)
    durations = [rng.choice([0.0, rng.uniform(0.01, 5.0)]) if i == 4 else rng.uniform(0.01, 5.0) for i in range(5)]
    # Host costs from negligible to binding (a launch-bound layer), sometimes only on some ops.
    scale = rng.choice([0.0, 0.01, 1.0, 4.0])
    hosts = [rng.choice([0.0, rng.uniform(0.0, scale)]) for _ in range(5)]
    layers = rng.choice([1, 7, 12, 33, 48, 80])
    overlap, host_is_device = rng.choice([(True, False), (False, False), (True, True)])
    carry = {"d2h": rng.uniform(0, 20.0)} if rng.random() < 0.3 else {}
    t = _offload_layer(*durations, host_s=hosts)
    timing = StepSimulator(overlap, host_is_device).time_step(t, layers, carry)
    duration, expected_carry, spans = _simpy_reference(t, layers, overlap, host_is_device, carry)
    assert timing.duration_s == pytest.approx(duration, rel=1e-9)
    assert timing.carry_s.keys() == expected_carry.keys()
    for name, seconds in expected_carry.items():
        assert timing.carry_s[name] == pytest.approx(seconds, rel=1e-9, abs=1e-9)
    events = list(timing.events())
    assert len(events) == len(spans) == layers * 5 + 2
    for event in events:
        assert (event.start, event.end) == pytest.approx(spans[event.layer, event.name], rel=1e-9, abs=1e-9)
    assert timing.busy_s[HOST] == pytest.approx(0.01 + layers * sum(hosts) + 0.02)


def test_tiny_ops_run_at_the_hosts_pace_and_long_ones_hide_it():
    t = LayerTemplate()
    t.add(make_op("a", "gpu", {"elementwise": 1e-6}, host_s=5e-6))
    t.add(make_op("b", "gpu", {"elementwise": 1e-6}, host_s=5e-6), after=("a",))
    timing = StepSimulator().run_step(t, 32)
    assert timing.duration_s == pytest.approx(64 * 5e-6 + 1e-6)  # the GPU waits on every launch
    assert timing.busy_s["gpu"] == pytest.approx(64e-6) and timing.busy_s[HOST] == pytest.approx(64 * 5e-6)
    t.add(make_op("c", "gpu", {"gemm": 1e-4}, host_s=5e-6), after=("b",))
    timing = StepSimulator().run_step(t, 32)
    # Past the first layer the host runs ahead: the device time sets the pace, the launches cost only the first.
    assert timing.duration_s == pytest.approx(3 * 5e-6 + 32 * 1e-4 + 31 * 2e-6)


def test_on_a_cpu_device_host_and_device_time_add():
    t = _offload_layer(3.0, 1.0, 2.0, 1.5, 0.25, host_s=(0.1,) * 5)
    timing = StepSimulator(host_is_device=True).run_step(t, 10)
    assert timing.duration_s == pytest.approx(0.06 + 10 * (3.0 + 1.0 + 2.0 + 1.5 + 0.25 + 0.5) + 0.52)
    assert timing.carry_s == {}
    assert {e.resource for e in timing.events()} == {"gpu", "h2d", "d2h"}  # reported by resource, run in series


def test_overlap_is_never_slower_than_serial():
    rng = random.Random(7)
    for _ in range(30):
        t = _offload_layer(*(rng.uniform(0.01, 4.0) for _ in range(5)), host_s=[rng.uniform(0, 1) for _ in range(5)])
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


def test_a_pair_linked_twice_keeps_the_shorter_lag():
    t = LayerTemplate()
    t.add(make_op("load", "h2d", {"h2d": 1.0}))
    t.add(make_op("compute", "gpu", {"gemm": 1.0}), after=("load",))
    t.link("load", "compute", lag=1)
    assert t.dependencies("compute") == [("load", 0)]
    assert StepSimulator().run_step(t, 3).duration_s == pytest.approx(4.0)


def test_template_rejects_unknown_dependencies_and_bad_ops():
    t = LayerTemplate()
    with pytest.raises(ValueError):
        t.add(make_op("a", "gpu", {"gemm": 1.0}), after=("missing",))
    with pytest.raises(ValueError):
        make_op("b", "tpu", {"gemm": 1.0})
    with pytest.raises(ValueError):
        make_op("c", "gpu", {"gemm": 1.0}, host_s=-1.0)


def test_memory_pool_tracks_peak_and_reports_overflow():
    pool = MemoryPool("GPU", capacity_bytes=100)
    pool.hold({"weights": 60, "kv": 30}, "at start")
    pool.hold({"kv": 10}, "later")
    assert pool.peak_bytes == 90 and pool.level_bytes == 70
    with pytest.raises(OutOfMemory, match=r"out of GPU memory at step 9: needs 1.1e-07 GB \(weights 6e-08"):
        pool.hold({"kv": 50}, "at step 9")


def test_the_layer_dag_as_a_networkx_graph():
    t = _offload_layer(3.0, 1.0, 2.0, 1.5, 0.25)
    graph = t.graph
    assert list(graph.nodes) == [op.name for op in t.ops]
    assert graph.edges["kv_load", "attention"]["lag"] == 0 and graph.edges["attention", "kv_load"]["lag"] == 2
    assert graph.nodes["attention"]["op"].duration_s == 2.0

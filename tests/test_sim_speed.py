"""What the simulator reuses for speed changes nothing: priced ops, FlexGen's wired block DAG, templates' cached
structure, unchanged memory holds; and a simulation never imports networkx."""

import subprocess
import sys
from pathlib import Path

import pytest

from alisa_sim.cost_model import CostModel
from alisa_sim.engine import MemoryPool, OutOfMemory
from alisa_sim.ops import LayerTemplate, make_op
from alisa_sim.planner import make_policy
from alisa_sim.workload import resolve_workload

ROOT = Path(__file__).resolve().parent.parent


def _workload(policy: dict, **overrides):
    data = {"model": "opt-13b", "hardware": "paper-v100-32g", "batch_size": 32, "prompt_len": 128, "gen_len": 64,
            "policy": policy}
    return resolve_workload({**data, **overrides})


def _fingerprint(template: LayerTemplate) -> tuple:
    """Everything the engine reads off a template: structure, and every op in full."""
    return template.structure(), tuple(template.head), tuple(template.ops), tuple(template.tail)


@pytest.mark.parametrize("policy", [
    {"name": "flexgen"},
    {"name": "flexgen", "gpu_batch_size": 4, "num_gpu_batches": 8, "cpu_attention": True,
     "percent": [50, 50, 0, 100, 100, 0]},
    {"name": "accelerate"}, {"name": "zero"}, {"name": "vllm"}, {"name": "alisa", "kv_sparsity": 0.8},
    {"name": "h2o", "kv_sparsity": 0.8},
])
def test_templates_of_a_policy_that_reuses_its_work_equal_fresh_ones(policy):
    """A policy asked for many steps (its priced ops and FlexGen's wired DAG reused) gives each step the template a
    policy that builds only that step gives."""
    wl = _workload(policy)
    busy = make_policy(wl)
    steps = list(range(1, wl.decode_steps + 1, 7))
    reused = [_fingerprint(busy.decode_template(step)) for step in steps + steps]
    for step, first, again in zip(steps, reused, reused[len(steps):]):
        fresh = make_policy(wl, CostModel(wl.hardware))
        assert _fingerprint(fresh.decode_template(step)) == first == again
    assert _fingerprint(busy.prefill_template()) == _fingerprint(make_policy(wl).prefill_template())


def test_with_ops_keeps_the_edges_and_takes_only_the_same_ops():
    t = LayerTemplate()
    t.add(make_op("load", "h2d", {"h2d": 1.0}, nbytes=10))
    t.add(make_op("compute", "gpu", {"gemm": 2.0}), after=("load",))
    t.link("compute", "load", lag=2)
    t.head.append(make_op("embedding", "gpu", {"elementwise": 0.1}))
    ops = [make_op("load", "h2d", {"h2d": 3.0}, nbytes=30), make_op("compute", "gpu", {"gemm": 4.0})]
    other = t.with_ops(ops)
    assert other.structure() == t.structure() and other.ops == ops and other.head == t.head
    before = t.structure()
    other.add(make_op("store", "d2h", {"d2h": 1.0}), after=("compute",))  # the copy's ops and edges are its own
    other.link("store", "load", lag=1)
    assert other.structure() != before and t.structure() == before and t.dependencies("load") == [("compute", 2)]
    with pytest.raises(ValueError):
        t.with_ops(ops[::-1])
    with pytest.raises(ValueError):
        t.with_ops([make_op("load", "d2h", {"d2h": 1.0}), ops[1]])


def test_structure_follows_changes_to_the_template():
    t = LayerTemplate()
    t.add(make_op("a", "gpu", {"gemm": 1.0}))
    first = t.structure()
    t.head.append(make_op("embedding", "gpu", {"elementwise": 0.1}))
    assert t.structure() != first and t.structure()[0] == 1
    before_edge = t.structure()
    t.add(make_op("b", "h2d", {"h2d": 1.0}), after=("a",))
    assert t.structure() != before_edge
    with_b = t.structure()
    t.link("b", "a", lag=1)
    assert t.structure() != with_b and t.structure()[3] == ((("a", "b"), 0), (("b", "a"), 1))


def test_an_unchanged_hold_keeps_the_peak_and_a_changed_one_is_checked():
    pool = MemoryPool("GPU", 100)
    pool.hold({"weights": 60.0, "kv": 10.0}, "at the start")
    pool.hold({"kv": 10.0}, "in decode 1")
    assert (pool.level_bytes, pool.peak_bytes, pool.held) == (70.0, 70, {"weights": 60.0, "kv": 10.0})
    pool.hold({"kv": 5.0}, "in decode 2")
    assert (pool.level_bytes, pool.peak_bytes) == (65.0, 70)
    with pytest.raises(OutOfMemory, match="in decode 3"):
        pool.hold({"kv": 41.0}, "in decode 3")
    pool.hold({"new": 0.0}, "in decode 4")  # a purpose not held before is recorded, even at zero bytes
    assert "new" in pool.held


def test_a_reservation_adds_to_a_steps_purposes_and_holds_what_lies_within_it():
    pool = MemoryPool("CPU", 100, within={"swapped": "swap_space"})
    pool.reserve({"swap_space": 40.0, "kv": 5.0}, "before the prefill")  # kv: a pool's rows no step fills
    pool.hold({"kv": 20.0, "swapped": 30.0}, "in decode 1")
    assert (pool.level_bytes, pool.peak_usage) == (65.0, {"swap_space": 40.0, "kv": 25.0})
    pool.hold({"kv": 10.0, "swapped": 0.0}, "in decode 2")
    assert (pool.level_bytes, pool.peak_bytes) == (55.0, 65)
    with pytest.raises(OutOfMemory, match=r"in decode 3: needs .* \(swap_space 4e-08, kv 6.1e-08\)"):
        pool.hold({"kv": 56.0}, "in decode 3")
    assert pool.held == {"kv": 10.0, "swapped": 0.0}  # a hold that does not fit is not kept


def test_a_simulation_and_a_plan_do_not_import_networkx():
    """networkx (half a second to import) is only for drawing a template's DAG (LayerTemplate.graph)."""
    code = ("import sys; from alisa_sim.cli import main; "
            "main(['plan', 'workloads/paper/fig11-attention-opt6.7b.yaml', '--json']); "
            "assert 'networkx' not in sys.modules, 'networkx was imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_the_libyaml_loader_reads_every_committed_file_as_the_pure_python_one_does():
    """parse_yaml parses with libyaml: every profile, workload and sweep file reads exactly as with PyYAML's own
    parser (exponent floats without a dot included), and deep nesting still stops at Python's recursion limit."""
    import re

    import yaml

    from alisa_sim.errors import parse_yaml

    class PurePython(yaml.SafeLoader):
        pass

    PurePython.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                     list("-+0123456789"))
    files = sorted((ROOT / "hw_profiles").glob("*.yaml")) + sorted((ROOT / "workloads").rglob("*.yaml"))
    assert len(files) > 20
    for path in files:
        text = path.read_text()
        assert parse_yaml(text) == yaml.load(text, Loader=PurePython), path  # noqa: S506 - a SafeLoader
    assert parse_yaml("a: 1e-5\nb: &x [1, {c: d}]\nc: *x\n") == {"a": 1e-5, "b": [1, {"c": "d"}], "c": [1, {"c": "d"}]}
    # libyaml's own composer would overflow the C stack here; libyaml 0.2.6 on stops the scanner at 1000 levels,
    # an older one leaves it to Python's composer and its recursion limit
    with pytest.raises((RecursionError, yaml.YAMLError)) as stopped:
        parse_yaml("[" * 200_000 + "]" * 200_000)
    assert stopped.type is RecursionError or "maximum nesting depth" in str(stopped.value)


def test_one_cost_model_per_profile_and_a_shared_one_changes_no_result():
    from alisa_sim.planner import cost_model_of
    from alisa_sim.results import build_result
    from alisa_sim.simulator import simulate, simulate_with_policy

    wl = _workload({"name": "flexgen"})
    assert cost_model_of(wl.hardware) is cost_model_of(wl.hardware)
    shared = build_result(simulate(wl))
    fresh = build_result(simulate_with_policy(wl, make_policy(wl, CostModel(wl.hardware))))
    assert {k: v for k, v in shared.items() if k != "run"} == {k: v for k, v in fresh.items() if k != "run"}


@pytest.mark.parametrize("enabled", [True, False])
def test_a_simulation_leaves_the_cycle_collector_as_it_found_it(enabled):
    import gc

    from alisa_sim.simulator import simulate

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        sim = simulate(_workload({"name": "zero"}, gen_len=8))
        assert gc.isenabled() is enabled and len(sim.steps) == 8
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("policy", [{"name": "flexgen"}, {"name": "accelerate"}, {"name": "alisa", "kv_sparsity": 0.8},
                                    {"name": "zero"}])
@pytest.mark.parametrize("overlap", [True, False])
def test_the_step_time_bound_of_the_chord_check_holds(policy, overlap):
    """The collapsed runs' chord check rejects a step by an upper bound on its time before timing it: every op's
    host and device time in a row bounds what the engine finds, with overlap and without, GPU and CPU devices."""
    from alisa_sim.simulator import _DecodeRuns

    # GPU, and CPU device (in float32 there: a smaller model, so that it fits)
    for hardware, model in (("paper-v100-32g", "opt-13b"),
                            (str(ROOT / "reports/validation/cpu/loop-0/profile.yaml"), "opt-6.7b")):
        wl = _workload(policy, hardware=hardware, overlap=overlap, model=model)
        built = make_policy(wl)
        runs = _DecodeRuns(built, built.stepper(), wl.model.num_layers)
        for step in range(1, wl.decode_steps + 1, 9):
            _, timing = runs._idle(step)
            bound = runs._shape(step)[3]
            assert timing.duration_s <= bound < 3 * timing.duration_s

"""ALISA in the simulator: SWA traffic, the three phases, INT8, the schedule search, and the paper's Figs. 9, 11, 12."""

import json
from concurrent.futures import ProcessPoolExecutor

import pytest

from alisa_sim.cli import main
from alisa_sim.cost_model import CostModel
from alisa_sim.policies import make_policy
from alisa_sim.results import build_result
from alisa_sim.selection_stats import UNIFORM_STATS
from alisa_sim.simulator import simulate
from alisa_sim.swa import swa_window
from alisa_sim.workload import load_workload, resolve_workload

FIG12 = "workloads/paper/fig12-opt30b.yaml"


def _workload(policy: dict, model="opt-30b", hardware="paper-h100-80g", batch=64, prompt=128, gen=512, **extra):
    return resolve_workload({"model": model, "hardware": hardware, "batch_size": batch, "prompt_len": prompt,
                             "gen_len": gen, "policy": policy, **extra})


def _result(policy: dict, **kwargs) -> dict:
    return build_result(simulate(_workload(policy, **kwargs)))


def _throughput(policy: dict, **kwargs) -> float | None:
    metrics = _result(policy, **kwargs)["metrics"]
    return None if metrics["oom"] else metrics["throughput_tok_s"]


def _alisa(**options) -> dict:
    return {"name": "alisa", **options}


@pytest.mark.parametrize("n,sparsity,k", [(1, 0.8, 1), (10, 0.8, 1), (15, 0.8, 2), (100, 0.8, 10), (640, 0.8, 64),
                                          (640, 0.9, 32), (7, 0.0, 4), (1000, 0.5, 250)])
def test_swa_window(n, sparsity, k):
    assert swa_window(n, sparsity) == k


def test_phase_one_while_the_kv_fits():
    result = _result(_alisa(), batch=4)
    assert [p["phase"] for p in result["phases"]] == [1]
    assert result["metrics"]["h2d_bytes"] == 0 and result["metrics"]["d2h_bytes"] == 0


def test_phase_two_keeps_recent_tokens_on_the_gpu_and_fetches_cpu_picks():
    wl = _workload(_alisa(kv_sparsity=0.8, int8=False, recompute=False))
    policy = make_policy(wl, CostModel(wl.hardware))
    sim = simulate(wl)
    result = build_result(sim)
    p1 = policy.schedule.p1
    assert [p["phase"] for p in result["phases"]] == [1, 2]
    assert result["phases"][1]["first_step"] == p1 == policy.gpu_tokens - 128 + 1
    # GPU KV stays within the budget; the overflow goes to the CPU one token per step.
    budget = policy.gpu_tokens * 64 * wl.model.kv_bytes_per_token()
    assert max(r.gpu_kv_bytes for r in sim.steps) <= budget
    last = sim.decode_steps[-1]
    n = 128 + last.step
    k, _ = policy.selected(n)
    cpu_share = policy.stats.share_older_than(policy.gpu_tokens / n, 0.8)
    expected = 64 * k * cpu_share * wl.model.kv_bytes_per_token()  # global picks older than the GPU window
    assert last.timing.h2d_bytes == pytest.approx(expected, rel=0.01)
    assert last.timing.d2h_bytes == pytest.approx(64 * wl.model.kv_bytes_per_token(), rel=1e-6)


def test_selection_stats_decide_the_traffic(tmp_path):
    """Picks that all fall on the oldest tokens must all come over PCIe; picks on young tokens never do."""
    def stats_file(name, mass):
        edges = [i / 10 for i in range(11)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"format": "alisa-selection-stats/1", "model": "test", "text": "test",
                                    "context": 640, "measured_by": "test", "date": "2026-11-26",
                                    "age_edges": edges, "by_sparsity": {"0.8": mass}}))
        return str(path)

    old = stats_file("old", [0] * 9 + [1])
    young = stats_file("young", [0, 1] + [0] * 8)
    common = dict(kv_sparsity=0.8, int8=False, recompute=False)
    old_h2d = _result(_alisa(selection_stats=old, **common))["metrics"]["h2d_bytes"]
    young_h2d = _result(_alisa(selection_stats=young, **common))["metrics"]["h2d_bytes"]
    assert young_h2d == 0 < old_h2d


def test_int8_halves_kv_memory_and_traffic():
    fp16 = _result(_alisa(int8=False, recompute=False), hardware="h200", batch=16, memory={"gpu_gb": 66})
    int8 = _result(_alisa(int8=True, recompute=False), hardware="h200", batch=16, memory={"gpu_gb": 66})
    last16, last8 = fp16["steps"][-1], int8["steps"][-1]
    total16 = last16["gpu_kv_bytes"] + last16["cpu_kv_bytes"]
    total8 = last8["gpu_kv_bytes"] + last8["cpu_kv_bytes"]
    assert total8 / total16 == pytest.approx((1 + 4 / 64) / 2, rel=0.01)
    assert int8["metrics"]["h2d_bytes"] < 0.6 * fp16["metrics"]["h2d_bytes"]


def test_h2o_and_streamingllm_hold_only_their_budget():
    dense = _result({"name": "dense"}, hardware="h200", batch=8)
    for name in ("h2o", "streamingllm"):
        sparse = _result({"name": name, "kv_sparsity": 0.8}, hardware="h200", batch=8)
        ratio = sparse["steps"][-1]["gpu_kv_bytes"] / dense["steps"][-1]["gpu_kv_bytes"]
        assert ratio == pytest.approx(0.2, abs=0.01)
        assert sparse["metrics"]["decode_s"] < dense["metrics"]["decode_s"]


def test_plan_json_pins_the_schedule(tmp_path, capsys):
    assert main(["plan", FIG12, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert {"p1", "p2", "alpha", "beta"} <= plan["workload"]["policy"].keys()
    assert plan["alternatives"] and all(a["simulated_total_s"] for a in plan["alternatives"])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert main(["run", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"), "--json"]) == 0
    chosen_total = json.loads(capsys.readouterr().out)["metrics"]["total_s"]
    assert chosen_total <= min(a["simulated_total_s"] for a in plan["alternatives"]) * 1.02


def test_bad_alisa_options():
    from alisa_sim.errors import SpecError

    with pytest.raises(SpecError, match="p2 \\(3\\) must not come before p1 \\(9\\)"):
        _workload(_alisa(p1=9, p2=3))
    with pytest.raises(SpecError, match="kv_sparsity"):
        _workload(_alisa(kv_sparsity=1.0))
    with pytest.raises(SpecError, match="selection_stats file not found"):
        simulate(_workload(_alisa(selection_stats="/nonexistent.json")))


# ---- Fig. 12: OPT-30B, b=64, s=128, n=512, one H100 80 GB with a 20 GB/s link ------------------------------------

def _fig12(**options) -> dict:
    wl = load_workload(FIG12)
    policy = {**wl.workload.policy.model_dump(), **options}
    return _result(policy)


def _phase3_start(**options) -> float:
    phases = {p["phase"]: p for p in _fig12(**options)["phases"]}
    return phases[3]["first_step"] if 3 in phases else float("inf")


@pytest.mark.parametrize("stats", [None, str(UNIFORM_STATS)])
def test_fig12_higher_sparsity_enters_phase_three_later(stats):
    """With the measured selection_stats (SmolLM2: global picks mostly young) Phase III starts at 50% sparsity only;
    with picks spread evenly over the ages it starts at every sparsity, later the sparser (docs/paper-comparison.md)."""
    starts = [_phase3_start(kv_sparsity=sparsity, selection_stats=stats) for sparsity in (0.5, 0.8, 0.9)]
    assert starts == sorted(starts) and starts[0] < float("inf")
    if stats:
        assert starts[-1] < float("inf") and starts[0] < starts[-1]


@pytest.mark.parametrize("stats,sparsity", [(None, 0.5), (str(UNIFORM_STATS), 0.8)])
def test_fig12_recompute_cuts_total_time(stats, sparsity):
    """The paper: recompute cuts total time about 1.2-1.3x. The simulation (fp16 KV) gives 1.52x at 50% with the
    measured pick ages and 1.42x at 80% with uniform ones; where the fetches hide behind compute it gains nothing
    (docs/paper-comparison.md)."""
    with_recompute = _fig12(recompute=True, kv_sparsity=sparsity, selection_stats=stats)["metrics"]["total_s"]
    without = _fig12(recompute=False, kv_sparsity=sparsity, selection_stats=stats)["metrics"]["total_s"]
    assert with_recompute < without / 1.15


def test_fig12_ablation_every_step_gains():
    """SWA alone (static split), + dynamic scheduling (three phases), + INT8: each step is faster than the one
    before at every sparsity, and SWA's own gain over FlexGen grows with sparsity (docs/paper-comparison.md)."""
    flexgen = _result({"name": "flexgen"})["metrics"]["throughput_tok_s"]
    swa_gains = []
    for sparsity in (0.5, 0.8, 0.9):
        swa = _fig12(kv_sparsity=sparsity, dynamic_scheduling=False, int8=False, recompute=False)
        dynamic = _fig12(kv_sparsity=sparsity, dynamic_scheduling=True, int8=False, recompute=True)
        int8 = _fig12(kv_sparsity=sparsity, dynamic_scheduling=True, int8=True, recompute=True)
        steps = [m["metrics"]["throughput_tok_s"] for m in (swa, dynamic, int8)]
        assert steps[0] > flexgen and steps[1] > steps[0] and steps[2] > steps[1]
        swa_gains.append(steps[0] / flexgen)
    assert swa_gains == sorted(swa_gains)


# ---- Fig. 11: one attention module, b=64, sequence 128 -----------------------------------------------------------

@pytest.mark.parametrize("model", ["opt-6.7b", "opt-30b"])
def test_fig11_sparse_attention_module(model):
    """Attention plus selection of SWA against dense attention, one layer: the fused kernel beats dense at 80% and
    90% sparsity; the explicit gather (torch indexing, as measured on the H200) costs more than the fused kernel
    and, at 80%, more than dense attention itself."""
    def attention_module_s(policy):
        wl = _workload(policy, model=model, hardware="h200", batch=64, prompt=128, gen=2)
        ops = {op.name: op.duration_s for op in make_policy(wl, CostModel(wl.hardware)).decode_template(1).ops}
        return ops["attention"] + ops.get("selection", 0.0)

    dense = attention_module_s({"name": "dense"})
    for sparsity in (0.8, 0.9):
        fused = attention_module_s(_alisa(kv_sparsity=sparsity, int8=False, attention_kernel="fused"))
        gather = attention_module_s(_alisa(kv_sparsity=sparsity, int8=False, attention_kernel="gather"))
        assert fused < dense and gather > fused
    assert attention_module_s(_alisa(kv_sparsity=0.8, int8=False, attention_kernel="gather")) > dense


# ---- Fig. 9: throughput against the baselines ---------------------------------------------------------------------

FIG9_MODELS = [("opt-6.7b", "paper-v100-32g"), ("opt-13b", "paper-v100-32g"), ("llama-7b", "paper-v100-32g"),
               ("llama-13b", "paper-v100-32g"), ("opt-30b", "paper-h100-80g"), ("llama-33b", "paper-h100-80g")]
FIG9_BATCHES = (4, 8, 16, 32, 64)
FIG9_POLICIES = ("zero", "flexgen", "vllm", "alisa")


def _fig9_point(point):
    model, hardware, batch, policy = point
    spec = {"name": policy, "kv_sparsity": 0.8} if policy == "alisa" else {"name": policy}
    return point, _throughput(spec, model=model, hardware=hardware, batch=batch)


@pytest.fixture(scope="module")
def fig9():
    points = [(m, h, b, p) for m, h in FIG9_MODELS for b in FIG9_BATCHES for p in FIG9_POLICIES]
    with ProcessPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(_fig9_point, points))


def test_fig9_alisa_beats_flexgen_by_more_as_batch_grows(fig9):
    """The paper: 1.4-3.0x over FlexGen, growing with batch. The simulation agrees on the growth, and on >= 1.4x
    wherever FlexGen must keep a quarter or more of the dense KV cache off the GPU; there it goes far past 3x, and
    where (nearly) everything fits, the 7B models, ALISA gains only 1.2-1.3x (docs/paper-comparison.md)."""
    for model, hardware in FIG9_MODELS:
        wl = _workload({"name": "dense"}, model=model, hardware=hardware, batch=4)
        ratios = [fig9[model, hardware, b, "alisa"] / fig9[model, hardware, b, "flexgen"] for b in FIG9_BATCHES]
        assert all(later >= earlier * 0.97 for earlier, later in zip(ratios, ratios[1:])), (model, ratios)
        for batch, ratio in zip(FIG9_BATCHES, ratios):
            kv = batch * (128 + 512) * wl.model.kv_bytes_per_token()
            if wl.model.weight_bytes + kv - wl.gpu_capacity_bytes >= kv / 4:
                assert ratio >= 1.4, (model, batch, ratio)
        assert ratios[-1] >= 1.2


def test_fig9_alisa_over_vllm_at_large_batches_and_vllm_ahead_when_small(fig9):
    large = [fig9[m, h, 64, "alisa"] / fig9[m, h, 64, "vllm"] for m, h in FIG9_MODELS]
    assert max(large) >= 1.9
    for model, hardware in FIG9_MODELS[:4]:  # small models, small batch: everything fits, SWA only adds work
        assert fig9[model, hardware, 4, "vllm"] >= fig9[model, hardware, 4, "alisa"] * 0.99


def test_fig9_zero_runs_out_of_memory_at_large_batch(fig9):
    assert fig9["opt-13b", "paper-v100-32g", 64, "zero"] is None
    assert fig9["llama-13b", "paper-v100-32g", 64, "zero"] is None
    assert all(fig9[m, h, 4, "zero"] is not None for m, h in FIG9_MODELS)

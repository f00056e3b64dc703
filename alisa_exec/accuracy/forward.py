"""Forward passes of the executor's decoder with a KV-sparsity method applied as during decoding.

`masked_pass` scores a whole window in one pass, as H2O's evaluation does: each layer computes every query's scores
against every key at once, then walks the rows in order, row i attending only to what the method keeps at the
step with i + 1 cached tokens, and handing the row's attention to the method before row i + 1 is chosen. Rows of a
layer depend on earlier rows of the same layer only through the method's choice, so this equals decoding the
window one token at a time (`decode_pass`, which gathers the kept K and V of a growing cache like the SWA kernels
do); the tests check that. A method that reads K and V through INT8 quantizes each token's K and V on their own
(per token, per KV head, groups of 64 channels), as the INT8 cache does when a token is stored.

Both passes reuse the decoder's modules and weights (`alisa_exec.model.Transformer`); only attention differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from alisa_exec.accuracy.methods import Method, Selector
from alisa_exec.kernels.int8_kv import QuantizedKV, dequantize_rows, quantize_reference
from alisa_exec.model import OPT_POSITION_OFFSET, Block, Transformer, apply_rope, rope_tables

ROW_BLOCK = 128  # rows whose scores against the keys before them are computed at once
INT8_CHANNEL_GROUP = 64  # the INT8 cache's default group of channels
LOGIT_CHUNK = 128  # positions whose logits are materialized at once when scoring

# probe(layer, probs [batch, kv_heads, group, S, S], kept [batch, groups, S, S] bool): a layer's attention
Probe = Callable[[int, Tensor, Tensor], None]


def int8_roundtrip(x: Tensor) -> Tensor:
    """K or V [batch, kv_heads, seq, head_dim] as read back from the INT8 cache (each token quantized on its own)."""
    channel_group = math.gcd(INT8_CHANNEL_GROUP, x.shape[-1])
    data, scale, zero = quantize_reference(x, 1, channel_group)
    cache = QuantizedKV(data=data, scale=scale, zero=zero, token_group=1, channel_group=channel_group)
    return dequantize_rows(cache, torch.arange(x.shape[2], device=x.device), x.dtype)


def _embed(model: Transformer, tokens: Tensor, positions: Tensor) -> Tensor:
    x = model.tok_embeddings(tokens)
    if model.pos_embeddings is not None:
        x = x + model.pos_embeddings(positions + OPT_POSITION_OFFSET)
    return x


def _rope(model: Transformer, seq_len: int) -> tuple[Tensor, Tensor] | None:
    if model.spec.family != "llama":
        return None
    weight = model.tok_embeddings.weight
    return rope_tables(model.spec, seq_len, weight.dtype, weight.device)


def _qkv(block: Block, x: Tensor, rope: tuple[Tensor, Tensor] | None, int8_kv: bool):
    """Queries [batch, kv_heads, group, seq, d] and keys and values [batch, kv_heads, seq, d] of a layer's input."""
    attn = block.attention
    batch, seq, _ = x.shape
    q, k, v = attn.wqkv(block.attention_norm(x)).split([attn.q_dim, attn.kv_dim, attn.kv_dim], dim=-1)
    q = q.view(batch, seq, attn.num_heads, attn.head_dim)
    k = k.view(batch, seq, attn.num_kv_heads, attn.head_dim)
    v = v.view(batch, seq, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    q = q.transpose(1, 2).reshape(batch, attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, seq, attn.head_dim)
    k = k.transpose(1, 2)
    if int8_kv:
        k, v = int8_roundtrip(k), int8_roundtrip(v)
    return q, k, v


def _finish_block(block: Block, x: Tensor, y: Tensor) -> Tensor:
    """The rest of the layer after attention: y [batch, kv_heads, group, seq, d] is the attention output."""
    batch, _, _, seq, _ = y.shape
    h = x + block.attention.wo(y.permute(0, 3, 1, 2, 4).reshape(batch, seq, -1))
    return h + block.feed_forward(block.ffn_norm(h))


def lm_weight(model: Transformer) -> Tensor:
    """The output projection in at least fp32: logits are scored in full precision whatever the model's dtype."""
    weight = model.tok_embeddings.weight if model.output is None else model.output.weight
    return weight.to(_attention_dtype(weight.dtype))


def _attention_dtype(dtype: torch.dtype) -> torch.dtype:
    """Attention scores, probabilities and their sums are computed in at least fp32 (a bfloat16 model included)."""
    return torch.promote_types(dtype, torch.float32)


def _softmax_kept(scores: Tensor, keep: Tensor) -> Tensor:
    """Softmax of scores [batch, kv_heads, group, rows, n] over the kept tokens keep [batch, groups, rows, n]."""
    return torch.softmax(scores.masked_fill(~keep[:, :, None], float("-inf")), dim=-1)


def _row_by_row(scores: Tensor, selector: Selector, first: int) -> tuple[Tensor, Tensor]:
    """Kept tokens and probabilities of a block of rows of an attention-dependent selector, one row at a time: each
    row's choice depends on the rows before it. The block's dense causal softmax is taken at once, outside the
    loop (scores are overwritten); a row's probabilities are then its kept dense ones over their sum, equal to a
    softmax over the kept tokens but for the last bit."""
    batch, _, _, rows, width = scores.shape
    keep = torch.zeros(batch, selector.groups, rows, width, dtype=torch.bool, device=scores.device)
    future = torch.arange(width, device=scores.device) > torch.arange(first, first + rows, device=scores.device)[:, None]
    probs = torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1)
    threads = torch.get_num_threads()
    # The loop's ops are small: a second CPU thread only adds a barrier per op, which stalls for a whole
    # scheduler slice whenever another process holds the other core.
    torch.set_num_threads(1)
    try:
        for row in range(rows):
            count = first + row + 1
            keep[:, :, row, :count] = row_keep = selector.keep(count)
            row_probs = probs[..., row, :count]
            row_probs.mul_(row_keep[:, :, None])
            selector.observe(row_probs.div_(row_probs.sum(dim=-1, keepdim=True)))
    finally:
        torch.set_num_threads(threads)
    if not bool(probs.sum().isfinite()):
        raise FloatingPointError("every kept token's attention underflowed against the row's maximum")
    return keep, probs


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, selector: Selector, mask: Tensor | None, prefill: int,
                      probe: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Attention of the decoded rows (prefill..S-1) under the method, a block of rows at a time: q holds their
    queries [batch, kv_heads, group, S - prefill, d], k and v every row's keys and values [batch, kv_heads, S, d].
    Output [batch, kv_heads, group, S - prefill, d] and, with `probe`, the probabilities
    [batch, kv_heads, group, S - prefill, S] and the kept tokens [batch, groups, S - prefill, S]."""
    batch, kv_heads, group, rows, head_dim = q.shape
    seq = k.shape[2]
    y = torch.empty_like(q)
    all_probs = q.new_zeros(batch, kv_heads, group, rows, seq) if probe else None
    all_kept = torch.zeros(batch, selector.groups, rows, seq, dtype=torch.bool, device=q.device) if probe else None
    for first in range(prefill, seq, ROW_BLOCK):
        last = min(first + ROW_BLOCK, seq)
        block = slice(first - prefill, last - prefill)
        scores = (q[..., block, :] @ k[:, :, None, :last].transpose(-1, -2)) * head_dim ** -0.5
        if selector.static:
            keep = mask[:, :, first:last, :last]
            probs = _softmax_kept(scores, keep)
        elif selector.dense_choice:
            causal = torch.arange(last, device=q.device) <= torch.arange(first, last, device=q.device)[:, None]
            keep = selector.choose(first, torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
            probs = _softmax_kept(scores, keep)
        elif selector.query_choice:
            keep = selector.choose_by_query(first, q[..., block, :], k)
            probs = _softmax_kept(scores, keep)
        else:
            if selector.reads_queries:
                selector.see_queries(first, q[..., block, :], k)
            keep, probs = _row_by_row(scores, selector, first)
        y[..., block, :] = probs @ v[:, :, None, :last]
        if probe:
            all_probs[..., block, :last] = probs
            all_kept[:, :, block, :last] = keep
    return y, all_probs, all_kept


@dataclass
class DensePrefix:
    """A dense causal prefill of the first `length` tokens of some windows, shared by every method and sparsity
    decoded after it (a prefill's rows do not depend on the method): per layer the queries
    [windows, kv_heads, group, P, d], keys and values [windows, kv_heads, P, d] (attention dtype), and the final
    normed hidden states [windows, P, hidden]."""

    tokens: Tensor
    int8_kv: bool
    queries: list[Tensor]
    keys: list[Tensor]
    values: list[Tensor]
    hidden: Tensor

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    def probs(self, layer: int, windows: Tensor) -> Tensor:
        """The layer's dense prefill attention [batch, kv_heads, group, P, P] of the windows `windows` [batch]."""
        q, k = self.queries[layer][windows], self.keys[layer][windows]
        scores = (q @ k[:, :, None].transpose(-1, -2)) * q.shape[-1] ** -0.5
        future = torch.ones(self.length, self.length, dtype=torch.bool, device=q.device).triu(1)
        return torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)


@torch.no_grad()
def dense_prefix(model: Transformer, tokens: Tensor, int8_kv: bool = False) -> DensePrefix:
    """The dense prefill of windows' first tokens `tokens` [windows, P] (K and V through INT8 with `int8_kv`)."""
    prompt = tokens.shape[1]
    x = _embed(model, tokens, torch.arange(prompt, device=tokens.device))
    rope = _rope(model, prompt)
    queries, keys, values = [], [], []
    for block in model.layers:
        q, k, v = (t.to(_attention_dtype(x.dtype)) for t in _qkv(block, x, rope, int8_kv))
        y = F.scaled_dot_product_attention(q.flatten(1, 2), k, v, is_causal=True, enable_gqa=True).view(q.shape)
        x = _finish_block(block, x, y.to(x.dtype))
        queries.append(q)
        keys.append(k)
        values.append(v)
    return DensePrefix(tokens, int8_kv, queries, keys, values, model.norm(x))


@torch.no_grad()
def masked_pass(model: Transformer, tokens: Tensor, method: Method, kv_sparsity: Sequence[float],
                probe: Probe | None = None, prefill: int = 0, layer_done: Callable[[], None] | None = None,
                prefix: DensePrefix | None = None) -> Tensor:
    """Final normed hidden states [batch, S, hidden] of windows `tokens` [batch, S] decoded under `method`, each
    window at its own KV sparsity, after a dense prefill of the first `prefill` tokens (0: none); `layer_done()` is
    called after each layer.

    The prefill is `prefix` when given (computed once for several passes: sequence b continues its window
    b % windows, as `Tensor.repeat` lays out a batch of windows at several sparsities), else computed here. Only
    the decoded rows run through the layers under the method. Static methods without a probe attend through SDPA
    with their mask; every other case computes the attention a block of rows at a time and, with `probe`, hands
    each layer's to it (the prefill's rows are the dense ones)."""
    batch, seq = tokens.shape
    device = tokens.device
    if prefill and prefix is None:
        prefix = dense_prefix(model, tokens[:, :prefill], method.int8_kv)
    windows = torch.arange(batch, device=device) % (len(prefix.tokens) if prefill else 1)
    if prefill and (prefix.length != prefill or prefix.int8_kv != method.int8_kv
                    or not torch.equal(prefix.tokens[windows], tokens[:, :prefill])):
        raise ValueError("the dense prefix is not these windows' prefill")
    x = _embed(model, tokens[:, prefill:], torch.arange(prefill, seq, device=device))
    rope = _rope(model, seq)
    decoded_rope = None if rope is None else (rope[0][prefill:], rope[1][prefill:])
    def make_selector() -> Selector:  # one layer's, made when the layer runs (its state is freed after)
        return method.make_selector(kv_sparsity, model.spec.num_kv_heads, seq, device)

    first = make_selector()
    mask = first.mask(seq, prefill) if first.static else None
    fused = probe is None and mask is not None
    dtype = _attention_dtype(x.dtype)
    additive = (torch.zeros(mask[:, :, prefill:].shape, dtype=dtype, device=device).masked_fill_(
        ~mask[:, :, prefill:], float("-inf")) if fused and (prefill or method.name != "dense") else None)
    for index, block in enumerate(model.layers):
        q, k, v = (t.to(dtype) for t in _qkv(block, x, decoded_rope, method.int8_kv))
        if prefill:
            k = torch.cat([prefix.keys[index][windows], k], dim=2)
            v = torch.cat([prefix.values[index][windows], v], dim=2)
        if fused:
            y = F.scaled_dot_product_attention(q.flatten(1, 2), k, v, attn_mask=additive, is_causal=additive is None,
                                               enable_gqa=True).view(q.shape)
        else:
            selector = first if first.static else make_selector()
            prefill_probs = (prefix.probs(index, windows) if prefill and (selector.seeded or probe is not None)
                             else None)
            if prefill_probs is not None:
                selector.prefill_rows(0, prefill_probs)
            y, probs, kept = _masked_attention(q, k, v, selector, mask, prefill, probe is not None)
            if probe is not None:
                if prefill:
                    probs = torch.cat([F.pad(prefill_probs, (0, seq - prefill)), probs], dim=3)
                    kept = torch.cat([mask_of_prefill(prefill, seq, kept.shape[:2], device), kept], dim=2)
                probe(index, probs, kept)
            del probs, kept
        x = _finish_block(block, x, y.to(x.dtype))
        if layer_done is not None:
            layer_done()
    hidden = model.norm(x)
    return torch.cat([prefix.hidden[windows], hidden], dim=1) if prefill else hidden


def mask_of_prefill(prefill: int, seq: int, leading: tuple[int, ...], device: torch.device) -> Tensor:
    """What a prefill's rows attend, [*leading, prefill, seq] bool: every token up to their own."""
    causal = torch.ones(prefill, seq, dtype=torch.bool, device=device).tril()
    return causal.expand(*leading, -1, -1)


@torch.no_grad()
def token_nll(model: Transformer, hidden: Tensor, tokens: Tensor, first: int = 0,
              weight: Tensor | None = None) -> Tensor:
    """Negative log-likelihood [batch, S - 1 - first] (fp64) of tokens first+1..S-1 given the hidden states of the
    positions before; `weight` is `lm_weight(model)` when several calls share it."""
    weight = lm_weight(model) if weight is None else weight
    losses = []
    for start in range(first, tokens.shape[1] - 1, LOGIT_CHUNK):
        stop = min(start + LOGIT_CHUNK, tokens.shape[1] - 1)
        logits = F.linear(hidden[:, start:stop].to(weight.dtype), weight).float()
        losses.append(F.cross_entropy(logits.transpose(1, 2), tokens[:, start + 1:stop + 1], reduction="none"))
    return torch.cat(losses, dim=1).double()


@torch.no_grad()
def masked_logits(model: Transformer, tokens: Tensor, method: Method, kv_sparsity: Sequence[float],
                  prefill: int = 0) -> Tensor:
    """Logits of every position [batch, S, vocab] from `masked_pass`."""
    hidden = masked_pass(model, tokens, method, kv_sparsity, prefill=prefill)
    weight = lm_weight(model)
    return F.linear(hidden.to(weight.dtype), weight)


def _dense_prefill(block: Block, x: Tensor, rope: tuple[Tensor, Tensor] | None, int8_kv: bool, selector: Selector):
    """One layer of a dense causal prefill over x [batch, P, hidden]: the layer's output, K and V; the selector sees
    every attention row."""
    q, k, v = (t.to(_attention_dtype(x.dtype)) for t in _qkv(block, x, rope, int8_kv))
    prompt = x.shape[1]
    scores = (q @ k[:, :, None].transpose(-1, -2)) * q.shape[-1] ** -0.5
    future = torch.ones(prompt, prompt, dtype=torch.bool, device=x.device).triu(1)
    probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    selector.prefill_rows(0, probs)
    return _finish_block(block, x, (probs @ v[:, :, None]).to(x.dtype)), k, v


@torch.no_grad()
def decode_pass(model: Transformer, tokens: Tensor, method: Method, kv_sparsity: Sequence[float],
                prefill: int = 0) -> Tensor:
    """Logits of every position [batch, S, vocab]: a dense prefill of the first `prefill` tokens (its attention
    seeds the selectors), then decoding one token at a time: each step gathers the K and V the method keeps and
    attends to those only (the oracle chooses from the step's dense attention first), then shows the method its
    attention."""
    batch, seq = tokens.shape
    device = tokens.device
    rope = _rope(model, seq)
    weight = lm_weight(model)
    selectors = [method.make_selector(kv_sparsity, model.spec.num_kv_heads, seq, device) for _ in model.layers]
    keys: list[Tensor | None] = [None] * len(model.layers)
    values: list[Tensor | None] = [None] * len(model.layers)
    logits = []
    if prefill:
        x = _embed(model, tokens[:, :prefill], torch.arange(prefill, device=device))
        prompt_rope = None if rope is None else (rope[0][:prefill], rope[1][:prefill])
        for index, (block, selector) in enumerate(zip(model.layers, selectors)):
            x, keys[index], values[index] = _dense_prefill(block, x, prompt_rope, method.int8_kv, selector)
        logits.append(F.linear(model.norm(x).to(weight.dtype), weight))
    for step in range(prefill, seq):
        position = torch.tensor([step], device=device)
        x = _embed(model, tokens[:, step:step + 1], position)
        step_rope = None if rope is None else (rope[0][position], rope[1][position])
        for index, (block, selector) in enumerate(zip(model.layers, selectors)):
            q, k, v = (t.to(_attention_dtype(x.dtype)) for t in _qkv(block, x, step_rope, method.int8_kv))
            keys[index] = k if keys[index] is None else torch.cat([keys[index], k], dim=2)
            values[index] = v if values[index] is None else torch.cat([values[index], v], dim=2)
            kv_heads, group, head_dim = q.shape[1], q.shape[2], q.shape[-1]
            if selector.dense_choice:
                scores = (q @ keys[index][:, :, None].transpose(-1, -2)) * head_dim ** -0.5
                keep = selector.choose(step, torch.softmax(scores, dim=-1))[:, :, 0]
            elif selector.query_choice:
                keep = selector.choose_by_query(step, q, keys[index])[:, :, 0]
            else:
                if selector.reads_queries:
                    selector.see_queries(step, q, keys[index])
                keep = selector.keep(step + 1)
            keep = keep.expand(batch, kv_heads, -1)
            # Index lists of the kept positions, padded to the longest (sequences at other sparsities keep more).
            counts = keep.sum(dim=-1, keepdim=True)
            kept = torch.argsort(~keep, dim=-1, stable=True)[..., :int(counts.max())]
            padding = torch.arange(kept.shape[-1], device=device) >= counts
            gather = kept[..., None].expand(-1, -1, -1, head_dim)
            k_kept, v_kept = keys[index].gather(2, gather), values[index].gather(2, gather)
            scores = (q @ k_kept[:, :, None].transpose(-1, -2)) * head_dim ** -0.5
            probs = torch.softmax(scores.masked_fill(padding[:, :, None, None], float("-inf")), dim=-1)
            y = probs @ v_kept[:, :, None]
            full = torch.zeros(batch, kv_heads, group, step + 1, dtype=probs.dtype, device=device)
            selector.observe(full.scatter_(-1, kept[:, :, None].expand(-1, -1, group, -1), probs[..., 0, :]))
            x = _finish_block(block, x, y.to(x.dtype))
        logits.append(F.linear(model.norm(x).to(weight.dtype), weight))
    return torch.cat(logits, dim=1)

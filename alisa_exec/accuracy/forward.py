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
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

from alisa_exec.accuracy.methods import Method, Selector
from alisa_exec.kernels.int8_kv import QuantizedKV, dequantize_rows, quantize_reference
from alisa_exec.model import OPT_POSITION_OFFSET, Block, Transformer, apply_rope, rope_tables

INT8_CHANNEL_GROUP = 64  # the INT8 cache's default group of channels
LOGIT_CHUNK = 1024  # positions whose logits are materialized at once when scoring

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


def _lm_weight(model: Transformer) -> Tensor:
    return model.tok_embeddings.weight if model.output is None else model.output.weight


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, selector: Selector,
                      mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Attention of every row under the method: output [batch, kv_heads, group, S, d], probabilities
    [batch, kv_heads, group, S, S] and the kept tokens [batch, groups, S, S]."""
    seq = q.shape[3]
    scores = (q @ k[:, :, None].transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if selector.static:
        probs = torch.softmax(scores.masked_fill_(~mask[:, :, None], float("-inf")), dim=-1)
        kept = mask
    else:
        probs = torch.zeros_like(scores)
        kept = torch.zeros(q.shape[0], selector.groups, seq, seq, dtype=torch.bool, device=q.device)
        threads = torch.get_num_threads()
        # The loop's ops are small: a second CPU thread only adds a barrier per op, which stalls for a whole
        # scheduler slice whenever another process holds the other core.
        torch.set_num_threads(1)
        try:
            for row in range(seq):
                keep = selector.keep(row + 1)
                kept[:, :, row, :row + 1] = keep
                row_scores = scores[..., row, :row + 1].masked_fill(~keep[:, :, None], float("-inf"))
                probs[..., row, :row + 1] = row_probs = torch.softmax(row_scores, dim=-1)
                selector.observe(row_probs)
        finally:
            torch.set_num_threads(threads)
    return probs @ v[:, :, None], probs, kept


@torch.no_grad()
def masked_pass(model: Transformer, tokens: Tensor, method: Method, kv_sparsity: Sequence[float],
                probe: Probe | None = None) -> Tensor:
    """Final normed hidden states [batch, S, hidden] of windows `tokens` [batch, S] decoded under `method`, each
    window at its own KV sparsity.

    Static methods without a probe attend through SDPA with their mask (dense: causal); every other case
    materializes the probabilities and, with `probe`, hands each layer's to it."""
    batch, seq = tokens.shape
    device = tokens.device
    x = _embed(model, tokens, torch.arange(seq, device=device))
    rope = _rope(model, seq)
    def make_selector() -> Selector:  # one layer's, made when the layer runs (its state is freed after)
        return method.make_selector(kv_sparsity, model.spec.num_kv_heads, seq, device)

    first = make_selector()
    mask = first.mask(seq) if first.static else None
    fused = probe is None and mask is not None
    additive = (torch.zeros(mask.shape, dtype=x.dtype, device=device).masked_fill_(~mask, float("-inf"))
                if fused and method.name != "dense" else None)
    for index, block in enumerate(model.layers):
        q, k, v = _qkv(block, x, rope, method.int8_kv)
        if fused:
            y = F.scaled_dot_product_attention(q.flatten(1, 2), k, v, attn_mask=additive, is_causal=additive is None,
                                               enable_gqa=True).view(q.shape)
        else:
            y, probs, kept = _masked_attention(q, k, v, first if first.static else make_selector(), mask)
            if probe is not None:
                probe(index, probs, kept)
            del probs, kept
        x = _finish_block(block, x, y)
    return model.norm(x)


@torch.no_grad()
def token_nll(model: Transformer, hidden: Tensor, tokens: Tensor) -> Tensor:
    """Negative log-likelihood [batch, S - 1] (fp64) of tokens 1..S-1 given the hidden states of positions before."""
    weight = _lm_weight(model)
    losses = []
    for start in range(0, tokens.shape[1] - 1, LOGIT_CHUNK):
        stop = min(start + LOGIT_CHUNK, tokens.shape[1] - 1)
        logits = F.linear(hidden[:, start:stop], weight).float()
        losses.append(F.cross_entropy(logits.transpose(1, 2), tokens[:, start + 1:stop + 1], reduction="none"))
    return torch.cat(losses, dim=1).double()


@torch.no_grad()
def masked_logits(model: Transformer, tokens: Tensor, method: Method, kv_sparsity: Sequence[float]) -> Tensor:
    """Logits of every position [batch, S, vocab] from `masked_pass`."""
    return F.linear(masked_pass(model, tokens, method, kv_sparsity), _lm_weight(model))


@torch.no_grad()
def decode_pass(model: Transformer, tokens: Tensor, method: Method, kv_sparsity: Sequence[float]) -> Tensor:
    """Logits of every position [batch, S, vocab], decoding one token at a time from an empty cache: each step
    gathers the K and V the method keeps and attends to those only, then shows the method its attention."""
    batch, seq = tokens.shape
    device = tokens.device
    rope = _rope(model, seq)
    selectors = [method.make_selector(kv_sparsity, model.spec.num_kv_heads, seq, device) for _ in model.layers]
    keys: list[Tensor | None] = [None] * len(model.layers)
    values: list[Tensor | None] = [None] * len(model.layers)
    logits = []
    for step in range(seq):
        position = torch.tensor([step], device=device)
        x = _embed(model, tokens[:, step:step + 1], position)
        step_rope = None if rope is None else (rope[0][position], rope[1][position])
        for index, (block, selector) in enumerate(zip(model.layers, selectors)):
            q, k, v = _qkv(block, x, step_rope, method.int8_kv)
            keys[index] = k if step == 0 else torch.cat([keys[index], k], dim=2)
            values[index] = v if step == 0 else torch.cat([values[index], v], dim=2)
            kv_heads, group, head_dim = q.shape[1], q.shape[2], q.shape[-1]
            keep = selector.keep(step + 1).expand(batch, kv_heads, -1)
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
            x = _finish_block(block, x, y)
        logits.append(F.linear(model.norm(x), _lm_weight(model)))
    return torch.cat(logits, dim=1)

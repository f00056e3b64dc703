"""Every op the executor issues, by name: GEMM projections, norms, activations, rotary embeddings, the attention paths,
vLLM's paged-cache stores, H2O's and StreamingLLM's slot choice and stores, ALISA's host-side split of its selection
into the rows to fetch and to recompute, embeddings and the LM head, `k4-capped`'s 4-bit key copy, its attention and its capped choice. (INT8 quantize / dequantize are `TokenRows`'
store and decode, selection is the kernels' `LocalAttentionSum`, tier copies are `Tiers.copy`.) The policies' layer
loop calls these and nothing else, so what the profiler times at the executor's shapes is what a run executes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from alisa_exec.kernels import dense_decode_attention, gather_decode_attention, sparse_decode_attention
from alisa_exec.kernels.int8_kv import QuantizedKV
from alisa_exec.key_copy import KeyCopy, capped_choice, copy_probabilities, fixed_point_scores, swa_own_row
from alisa_exec.ledger import issued
from alisa_exec.model import Attention, FeedForward, Transformer, gemm, packed_weight_for

KVView = Tensor | QuantizedKV
def _rows(x: Tensor, width: int | None = None) -> dict[str, int]:
    width = width or x.shape[-1]
    return {"rows": x.numel() // width, "width": width, "e": x.element_size()}


def _cache(keys: KVView, q: Tensor) -> dict[str, int]:
    """The shape of attention over a cache (q [b, (s,) heads, d]): `e` is the bytes of a cached value (1 for INT8
    levels)."""
    data = keys.data if isinstance(keys, QuantizedKV) else keys
    return {"b": q.shape[0], "T": data.shape[2], "h": q.shape[-2], "kv": data.shape[1], "d": q.shape[-1],
            "e": data.element_size()}


def project(linear: nn.Linear, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """A GEMM projection: x @ W^T + b (the layer's own weights, or staged ones of the same shape)."""
    w = linear.weight if weight is None else weight
    packed = weight is None and packed_weight_for(linear, "packed_weight", x) is not None
    issued("project_packed" if packed else "project", m=x.numel() // w.shape[1], k=w.shape[1], n=w.shape[0],
           e=x.element_size())
    if weight is None:  # packed for MKL's GEMM on the CPU when `Transformer.pack_weights` packed it
        return gemm(x, linear.weight, linear.bias, linear, "packed_weight")
    return F.linear(x, weight, bias)


def norm(module: nn.Module, x: Tensor) -> Tensor:
    """LayerNorm (OPT) or RMSNorm (LLaMA)."""
    issued("norm", **_rows(x), rms=int(not isinstance(module, nn.LayerNorm)))
    return module(x)


def activate(feed_forward: FeedForward, up: Tensor) -> Tensor:
    """The MLP's nonlinearity (ReLU, or SwiGLU's gate)."""
    gated = int(feed_forward.gated)
    issued("activate", rows=up.numel() // up.shape[-1], width=up.shape[-1] // (1 + gated), gated=gated,
           e=up.element_size())
    return feed_forward.activate(up)


def split_heads(attention: Attention, qkv: Tensor, rope) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v per head from the fused projection, rotary embeddings applied (LLaMA)."""
    issued("split_heads", **_rows(qkv))
    return attention.split_heads(qkv, rope)


def residual(x: Tensor, y: Tensor) -> Tensor:
    """x + y, a block's skip connection."""
    issued("residual", **_rows(x))
    return x + y


def project_kv(attention: Attention, h: Tensor, rope) -> tuple[Tensor, Tensor]:
    """Only the K and V projections of normed layer inputs (recomputing deleted tokens' KV), rotary applied."""
    issued("project", m=h.numel() // h.shape[-1], k=h.shape[-1], n=2 * attention.kv_dim, e=h.element_size())
    return attention.project_kv(h, rope)


def embed(model: Transformer, tokens: Tensor, positions: Tensor) -> Tensor:
    issued("embed", rows=tokens.numel(), width=model.spec.hidden_size, e=model.tok_embeddings.weight.element_size())
    return model.embed(tokens, positions)


def rope(model: Transformer, positions: Tensor):
    return model.rope(positions)


def lm_head(model: Transformer, x: Tensor) -> Tensor:
    """fp32 logits of the last position (final norm and the LM head GEMM)."""
    last = x[:, -1:]
    head = model.head_weight()
    packed = packed_weight_for(model, "packed_head", last) is not None
    normed = norm(model.norm, last)
    issued("project_packed" if packed else "project", m=last.numel() // head.shape[1], k=head.shape[1],
           n=head.shape[0], e=last.element_size())
    return model.head_logits(normed)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """A prompt pass over its own tokens: q [b, s, heads, d], k and v [b, s, kv_heads, d] -> [b, s, heads x d]."""
    issued("causal_attention", b=q.shape[0], L=q.shape[1], h=q.shape[2], d=q.shape[3])
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.shape[2] != q.shape[2])
    return y.transpose(1, 2).flatten(2)


def kv_store(keys: Tensor, values: Tensor, positions: Tensor | slice, k: Tensor, v: Tensor) -> None:
    """Write new tokens' k and v [b, T, kv_heads, d] into static buffers [b, kv_heads, L, d] at `positions`."""
    issued("kv_store", b=k.shape[0], T=k.shape[1], width=2 * k.shape[2] * k.shape[3], e=k.element_size())
    if isinstance(positions, slice):
        keys[:, :, positions] = k.transpose(1, 2)
        values[:, :, positions] = v.transpose(1, 2)
    else:  # a decode step's positions
        keys.index_copy_(2, positions, k.transpose(1, 2))
        values.index_copy_(2, positions, v.transpose(1, 2))


def block_store(pool: Tensor, slots: Tensor, rows: Tensor) -> None:
    """vLLM's paged cache: token rows [T, b, width] written at their slots [b, T] of the pool (a prompt pass's rows,
    or a decode step's one new row per sequence)."""
    issued("block_store", b=slots.shape[0], T=slots.shape[1], width=pool.shape[-1], e=pool.element_size())
    pool[slots.T] = rows


def stage_indices(selected: Tensor, deleted_end: int, fetch_end: int, out: Tensor) -> tuple[tuple[Tensor, ...], ...]:
    """ALISA's prefetch on the host: of the positions each sequence attends [b, T], those live in the CPU pool
    [deleted_end, fetch_end) and those deleted [0, deleted_end) (to recompute), each as (sequence, slot, position);
    the staged rows' index list, the fetched ones first, written into `out` [>= 3 x staged] as 3 rows."""
    issued("stage_indices", b=selected.shape[0], T=selected.shape[1])
    entries = []
    for mask in ((selected >= deleted_end) & (selected < fetch_end), selected < deleted_end):
        seq, slot = mask.nonzero(as_tuple=True)
        entries.append((seq, slot, selected[seq, slot].long()))
    staged = sum(len(seq) for seq, _, _ in entries)
    torch.stack([torch.cat(parts) for parts in zip(*entries)], out=out[:3 * staged].view(3, staged))
    return entries[0], entries[1]


def masked_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Dense attention of q [b, s, heads, d] over a whole cache [b, kv_heads, L, d] under an additive mask [s, L]
    (the dense and zero policies' static buffers) -> [b, s, heads x d]."""
    issued("masked_attention", **_cache(keys, q))
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,  # broadcast over b, heads
                                       enable_gqa=keys.shape[1] != q.shape[2])
    return y.transpose(1, 2).flatten(2)


def rows_attention(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Decode attention of q [b, 1, heads, d] over every row of packed K/V [b, kv_heads, T, d] -> [b, 1, heads x d]
    (the offloading policies' staged caches)."""
    issued("rows_attention", **_cache(keys, q))
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=keys.shape[1] != q.shape[2])
    return y.transpose(1, 2).flatten(2)


def cpu_attention(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """`rows_attention` on the host over the CPU's share of the cache, computed in float32 as FlexGen does (CPUs
    have no fast half-precision kernels), returned in q's dtype."""
    issued("cpu_attention", **{**_cache(keys, q), "e": 4})
    y = F.scaled_dot_product_attention(q.transpose(1, 2).float(), keys.float(), values.float(),
                                       enable_gqa=keys.shape[1] != q.shape[2])
    return y.transpose(1, 2).flatten(2).to(q.dtype)


def packed_attention(q: Tensor, keys: Tensor, values: Tensor, per_head: bool = False) -> tuple[Tensor, Tensor]:
    """Decode attention of q [b, heads, d] over packed K/V [b, kv_heads, T, d], with the head-summed probabilities
    (ALISA's explicit-gather path; H2O's and StreamingLLM's slots, per KV head's query group with `per_head`)."""
    issued("packed_attention", **_cache(keys, q))
    return dense_decode_attention(q, keys, values, per_head=per_head)


def keep_prompt(keys: Tensor, values: Tensor, slots: tuple[Tensor, Tensor, Tensor], scores: Tensor | None,
                attention_rows: Tensor | None, kept: int, sinks: int) -> None:
    """H2O's and StreamingLLM's prefill: of the prompt's K/V [b, kv_heads, s, d], the `kept` tokens each (sequence,
    KV head) keeps written into slots 0..kept-1 of its slot buffers (keys, values, positions), in position order.
    H2O (`attention_rows`: the prompt's causal attention rows summed over each KV head's query group, [b, kv_heads,
    s, s]) keeps its kept // 2 most recent tokens and, of the older ones, those that received the most attention
    from the prompt's queries (ties to the older), whose sums seed `scores`;
    StreamingLLM keeps the `sinks` first tokens and the most recent rest."""
    batch, kv_heads, s, head_dim = keys.shape
    issued("keep_prompt", b=batch, kv=kv_heads, L=s, d=head_dim, e=keys.element_size(), scored=int(scores is not None))
    if attention_rows is None:
        chosen = torch.cat((torch.arange(sinks), torch.arange(s - (kept - sinks), s))).to(keys.device)
        chosen = chosen.expand(batch, kv_heads, kept)
    else:
        received = attention_rows.sum(dim=2)  # [b, kv_heads, s]
        recent = kept // 2
        older = received[..., :s - recent]
        # Ties to the older token: a stable sort of the negated sums keeps position order among equals.
        heavy = torch.sort(-older, dim=-1, stable=True).indices[..., :kept - recent]
        recent_positions = torch.arange(s - recent, s, device=keys.device).expand(batch, kv_heads, recent)
        chosen = torch.cat((heavy.sort(dim=-1).values, recent_positions), dim=-1)
        scores[:, :, :kept] = received.gather(2, chosen)
    expand = chosen[..., None].expand(-1, -1, -1, head_dim)
    slot_keys, slot_values, slot_positions = slots
    slot_keys[:, :, :kept] = keys.gather(2, expand)
    slot_values[:, :, :kept] = values.gather(2, expand)
    slot_positions[:, :, :kept] = chosen


def evict_victim(positions: Tensor, scores: Tensor | None, recent_from: int, sinks: int) -> Tensor:
    """The slot each (sequence, KV head) evicts, of the `count` in use (positions [b, kv_heads, count]), [b, kv_heads,
    1]: H2O's (with `scores`) the least-scored token before position `recent_from` (ties to the older), StreamingLLM's
    the oldest token after the `sinks` first ones."""
    batch, kv_heads, count = positions.shape
    issued("evict_victim", b=batch, kv=kv_heads, T=count, scored=int(scores is not None))
    last = torch.iinfo(torch.int64).max
    if scores is None:
        return torch.where(positions >= sinks, positions, last).argmin(dim=-1, keepdim=True)
    outside = positions < recent_from
    masked = torch.where(outside, scores, float("inf"))
    tied = outside & (masked == masked.min(dim=-1, keepdim=True).values)
    return torch.where(tied, positions, last).argmin(dim=-1, keepdim=True)


def slot_store(slots: tuple[Tensor, Tensor, Tensor], scores: Tensor | None, slot: Tensor | int, k: Tensor,
               v: Tensor, position: int) -> None:
    """A decode step's new token, k and v [b, 1, kv_heads, d], written at `slot` of its (sequence, KV head)'s slot
    buffers (a victim's [b, kv_heads, 1], or one free slot of them all) with its position (and, for H2O, a zero
    score)."""
    batch, _, kv_heads, head_dim = k.shape
    issued("slot_store", b=batch, kv=kv_heads, d=head_dim, e=k.element_size(), scored=int(scores is not None))
    if isinstance(slot, int):
        slot = torch.full((batch, kv_heads, 1), slot, device=k.device)
    slot_keys, slot_values, slot_positions = slots
    expand = slot[..., None].expand(-1, -1, -1, head_dim)
    slot_keys.scatter_(2, expand, k.transpose(1, 2))
    slot_values.scatter_(2, expand, v.transpose(1, 2))
    slot_positions.scatter_(2, slot, torch.full_like(slot, position))
    if scores is not None:
        scores.scatter_(2, slot, torch.zeros(slot.shape, device=slot.device))


def score_update(scores: Tensor, probs: Tensor) -> None:
    """H2O's accumulated attention: each kept token's probabilities this step [b, kv_heads, count], summed over its
    KV head's query group, added to its score."""
    issued("score_update", b=probs.shape[0], kv=probs.shape[1], T=probs.shape[2])
    scores[:, :, :probs.shape[2]] += probs


def sparse_attention(q: Tensor, keys: KVView, values: KVView, indices: Tensor, staged: tuple[KVView, KVView] | None,
                     triton: bool) -> tuple[Tensor, Tensor]:
    """The fused path: decode attention over ALISA's index lists into the cache in place (and a staging buffer), with
    the head-summed probabilities, in one pass: the Triton kernel, or its PyTorch form (same results) off the GPU."""
    # Staged rows are in the index list (as negative entries); with them the call is a named op of its own.
    issued("sparse_attention" if staged is None else "staged_sparse_attention",
           **{**_cache(keys, q), "T": indices.shape[-1]})
    return _fused_attention(q, keys, values, indices, staged, triton)


def paged_attention(q: Tensor, keys: KVView, values: KVView, slots: Tensor, lengths: Tensor,
                    triton: bool) -> tuple[Tensor, Tensor]:
    """vLLM's decode attention: each sequence's slots [b, T] of the shared pool (its first `lengths` valid) read in
    place through the fused path, as PagedAttention reads blocks. A named op of its own, not `sparse_attention`: over
    a pool's views and padded slot lists its PyTorch form costs per token 0.6x to 1.6x what ALISA's index lists into
    a ring do at nearby lengths (b = 32, quick CPU profile, 2026-12-03), so rows of both in one family made a curve
    that zig-zagged between the two paths."""
    issued("paged_attention", **{**_cache(keys, q), "T": slots.shape[-1]})
    return _fused_attention(q, keys, values, slots, None, triton, lengths)


def _fused_attention(q: Tensor, keys: KVView, values: KVView, indices: Tensor, staged: tuple[KVView, KVView] | None,
                     triton: bool, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
    if triton:
        return sparse_decode_attention(q, keys, values, indices, lengths, staged=staged)
    return gather_decode_attention(q, keys, values, indices, lengths, staged=staged)


def key_copy_store(copy: KeyCopy, first: int, k: Tensor) -> None:
    """`k4-capped`: keys k [b, n, kv_heads, d] of positions first.. into the layer's 4-bit copy."""
    batch, n, kv_heads, head_dim = k.shape
    issued("key_copy_store", rows=batch * n, kv=kv_heads, d=head_dim, e=k.element_size())
    copy.store(first, k.transpose(1, 2))


def key_copy_attention(q: Tensor, copy: KeyCopy, n: int) -> Tensor:
    """`k4-capped`: the decode query q [b, heads, d] over the 4-bit copy of the n cached keys, probabilities
    [b, kv_heads, group, n] per query head."""
    batch, heads, head_dim = q.shape
    kv_heads = copy.levels.shape[2]
    issued("key_copy_attention", b=batch, L=n, h=heads, kv=kv_heads, d=head_dim, e=q.element_size())
    groups = q.view(batch, kv_heads, heads // kv_heads, 1, head_dim)
    return copy_probabilities(n - 1, groups, copy.keys(n))[..., 0, :]


def capped_pick(probs: Tensor, swa_selected: Tensor, recent: int, triton: bool = False) -> tuple[Tensor, Tensor]:
    """`k4-capped`'s choice: of the n cached tokens, per KV head, the `recent` newest and as many older ones as SWA's
    set swa_selected [b, T] (sorted, its `recent` newest last) has, by the copy's attention probs [b, kv_heads,
    group, n] under SWA's age caps (`alisa_exec.key_copy.capped_choice`): sorted positions [b, kv_heads, T]; and the
    row SWA's sums take ([b, T] at swa_selected: the copy's attention over SWA's own set, summed over heads). The
    greedy in one Triton launch with `triton`."""
    batch, kv_heads, _, n = probs.shape
    picks = swa_selected.shape[1]
    issued("capped_pick", b=batch, kv=kv_heads, L=n, m=picks - recent)
    positions = torch.arange(n, device=probs.device)
    recent_mask = (positions >= n - recent).expand(batch, 1, n)
    swa_set = torch.zeros(batch, 1, n, dtype=torch.bool, device=probs.device)
    swa_set[:, 0].scatter_(1, swa_selected.long(), True)
    chosen = capped_choice(fixed_point_scores(probs), recent_mask, swa_set & ~recent_mask, triton, picks - recent)
    selected = torch.where(chosen, positions, n).sort(dim=-1).values[..., :picks].to(torch.int32)
    swa_row = swa_own_row(probs, swa_set).sum(dim=(1, 2)).gather(1, swa_selected.long())
    return selected, swa_row


def argmax(logits: Tensor) -> Tensor:
    """Greedy next tokens [batch, 1] of logits [batch, 1, vocab]."""
    issued("argmax", rows=logits.numel() // logits.shape[-1], width=logits.shape[-1])
    return logits.argmax(dim=-1)


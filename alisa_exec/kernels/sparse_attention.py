"""SWA decode attention over an index list of cached tokens, fused with the head-summed probabilities selection needs.

One decode query per sequence attends to the T tokens its index list names in one layer's KV cache, and the same
pass returns the attention probabilities of those tokens summed over heads (the next selection step's input).

KV layout. The kernel reads the executor's own cache, contiguous per sequence: K and V [batch, kv_heads,
max_seq_len, head_dim] with rows written by position, fp16/bf16, or INT8 (`QuantizedKV`, dequantized in the
kernel). SWA picks single tokens scattered over the whole history, so a paged pool would add a page-table lookup
per selected token without saving anything: a gathered row is one contiguous `head_dim` run either way, and the
executor's cache is static (sized once for the longest sequence), so paging would not even save memory.

Index list: positions [batch, T] shared by all heads of a sequence (ALISA's per-layer selection), or [batch,
kv_heads, T] per KV head (the per-head ablation), with `lengths` [batch] valid entries per sequence (the rest are
ignored). Grouped-query attention: query head h reads KV head h // (heads / kv_heads), as Hugging Face does.

Flash-decoding: the index list of each (sequence, KV head) is cut into splits handled by separate programs, so a
batch of one still fills the GPU. Each split program computes its query heads' scores against its tokens, keeps
an online softmax (running max, sum and weighted V) and writes the scores; a second kernel merges the splits'
partial outputs by their log-sum-exp and turns the scores into probabilities summed over heads.

Edge case: a sequence with no valid entries (length 0) gets output 0 and probabilities 0.

`gather_decode_attention` is the explicit-gather mode (gather the selected K/V into packed tensors, then dense
attention in PyTorch), used for the paper's attention-time breakdown and, in fp32, as the reference.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from alisa_exec.kernels.int8_kv import QuantizedKV, dequantize_rows

KVTensor = Tensor | QuantizedKV
LOG2E = 1.4426950408889634


# --- PyTorch: explicit gather, then dense attention (also the reference, in fp32) -------------------------------

def _cache_rows(cache: KVTensor, positions: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows of a cache at positions [batch or 1, kv_heads or 1, T] as [batch, kv_heads, T, d] in `dtype`."""
    if isinstance(cache, QuantizedKV):
        return dequantize_rows(cache, positions, dtype)
    batch, kv_heads, _, head_dim = cache.shape
    positions = positions.expand(batch, kv_heads, -1)
    return cache.gather(2, positions[..., None].expand(-1, -1, -1, head_dim)).to(dtype)


def gather_kv(cache: KVTensor, indices: Tensor, dtype: torch.dtype, staged: KVTensor | None = None) -> Tensor:
    """The rows an index list names, packed: [batch, kv_heads, T, d] in `dtype` (INT8 rows are dequantized).

    Entries outside [0, max_seq_len) (padding past a sequence's length) are clamped; attention masks them. With
    `staged` ([1, kv_heads, R, d], rows shared by every sequence), an entry e < 0 names staged row -e - 1.
    """
    positions = (indices if indices.dim() == 3 else indices[:, None, :]).long()
    max_seq_len = cache.data.shape[2] if isinstance(cache, QuantizedKV) else cache.shape[2]
    rows = _cache_rows(cache, positions.clamp(0, max_seq_len - 1), dtype)
    if staged is None:
        return rows
    batch = rows.shape[0]
    staged_rows = staged.data.shape[2] if isinstance(staged, QuantizedKV) else staged.shape[2]
    staged_positions = (-positions - 1).clamp(0, staged_rows - 1)  # [batch, 1 or kv_heads, T]
    # A staged cache has one batch row: look each sequence's entries up in it as one long index list.
    flat = staged_positions.permute(1, 0, 2).reshape(1, staged_positions.shape[1], -1)
    from_stage = _cache_rows(staged, flat, dtype)
    from_stage = from_stage.view(rows.shape[1], batch, -1, rows.shape[3]).transpose(0, 1)
    return torch.where((positions < 0)[..., None], from_stage, rows)


def dense_decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor | None = None,
                           sm_scale: float | None = None, per_head: bool = False) -> tuple[Tensor, Tensor]:
    """Attention of q [batch, heads, d] over packed k, v [batch, kv_heads, T, d], the first `lengths` tokens each.

    Returns the output [batch, heads, d] and the probabilities summed over heads, [batch, T] (all heads) or, with
    `per_head`, [batch, kv_heads, T] (each KV head's query group).
    """
    batch, heads, head_dim = q.shape
    kv_heads, num_tokens = k.shape[1], k.shape[2]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    q_groups = q.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    scores = (q_groups @ k.transpose(-1, -2)).float() * sm_scale  # [batch, kv_heads, group, T]
    if lengths is None:  # every entry counts
        probs = torch.softmax(scores, dim=-1)
    else:
        valid = (torch.arange(num_tokens, device=q.device) < lengths[:, None].to(q.device))[:, None, None, :]
        probs = torch.softmax(scores.masked_fill(~valid, float("-inf")), dim=-1)
        probs = torch.where(valid, probs, 0.0)  # an empty row is all -inf, whose softmax is NaN
    out = (probs.to(v.dtype) @ v).reshape(batch, heads, head_dim).to(q.dtype)
    head_summed = probs.sum(dim=2)
    return out, head_summed if per_head else head_summed.sum(dim=1)


def gather_decode_attention(q: Tensor, k_cache: KVTensor, v_cache: KVTensor, indices: Tensor,
                            lengths: Tensor | None = None, sm_scale: float | None = None,
                            staged: tuple[KVTensor, KVTensor] | None = None) -> tuple[Tensor, Tensor]:
    """Explicit-gather mode of `sparse_decode_attention` (same arguments and results): gather, then attend. It is
    also the fused path's plain PyTorch form on the CPU device."""
    k = gather_kv(k_cache, indices, q.dtype, None if staged is None else staged[0])
    v = gather_kv(v_cache, indices, q.dtype, None if staged is None else staged[1])
    return dense_decode_attention(q, k, v, lengths, sm_scale, per_head=indices.dim() == 3)


# --- Triton: split the index list across programs, then merge the splits ----------------------------------------

BLOCK_T = 64  # index-list entries per loop step: 64 gathered rows of K and of V in flight per program
TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


@triton.jit
def _load_rows(cache_ptr, scale_ptr, zero_ptr, seq_head_offset, param_offset, positions, slot_mask, stride_s,
               param_stride_s, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, QUANTIZED: tl.constexpr,
               TOKEN_GROUP: tl.constexpr, CHANNEL_GROUP: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Gather cache rows [BLOCK, HEAD_DIM_PAD] at `positions`, dequantized when the cache is INT8."""
    rows = seq_head_offset + positions * stride_s
    if QUANTIZED:
        # A [rows, channel groups, channels] tile, so each group's scale and zero load once and broadcast.
        groups = tl.arange(0, HEAD_DIM_PAD // CHANNEL_GROUP)
        dims = groups[None, :, None] * CHANNEL_GROUP + tl.arange(0, CHANNEL_GROUP)[None, None, :]
        mask = slot_mask[:, None, None] & (dims < HEAD_DIM)
        levels = tl.load(cache_ptr + rows[:, None, None] + dims, mask=mask, other=0)
        params = param_offset + (positions // TOKEN_GROUP)[:, None] * param_stride_s + groups[None, :]
        param_mask = slot_mask[:, None] & (groups[None, :] < HEAD_DIM // CHANNEL_GROUP)
        scale = tl.load(scale_ptr + params, mask=param_mask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + params, mask=param_mask, other=0.0).to(tl.float32)
        values = levels.to(tl.float32) * scale[:, :, None] + zero[:, :, None]
        values = tl.reshape(values, [positions.shape[0], HEAD_DIM_PAD])
    else:
        dims = tl.arange(0, HEAD_DIM_PAD)
        mask = slot_mask[:, None] & (dims < HEAD_DIM)[None, :]
        values = tl.load(cache_ptr + rows[:, None] + dims[None, :], mask=mask, other=0.0)
    return values.to(DOT_DTYPE)


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, k_scale_ptr, k_zero_ptr, v_scale_ptr, v_zero_ptr,
                  sk_ptr, sv_ptr, sk_scale_ptr, sk_zero_ptr, sv_scale_ptr, sv_zero_ptr,
                  indices_ptr, lengths_ptr, scores_ptr, split_lse_ptr, split_out_ptr,
                  sm_scale_log2, num_tokens, num_splits, split_len,
                  q_stride_b, q_stride_h,
                  kv_stride_b, kv_stride_h, kv_stride_s,
                  param_stride_b, param_stride_h, param_stride_s,
                  stage_stride_h, stage_stride_s, stage_param_stride_h, stage_param_stride_s,
                  indices_stride_b, indices_stride_h,
                  KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                  HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                  BLOCK: tl.constexpr, QUANTIZED: tl.constexpr, TOKEN_GROUP: tl.constexpr,
                  CHANNEL_GROUP: tl.constexpr, DOT_DTYPE: tl.constexpr, STAGED: tl.constexpr,
                  INPUT_PRECISION: tl.constexpr):
    """One (sequence, KV head, split): the GROUP query heads of that KV head over one slice of the index list.

    With STAGED, an index entry e < 0 reads row -e - 1 of the staging buffer (rows shared by every sequence)
    instead of the cache. Writes the scores (scaled, in log2 units) of the slice's tokens, and per head the slice's
    log-sum-exp and its output normalized within the slice (an empty slice writes -inf and 0).
    """
    seq_head = tl.program_id(0)
    split = tl.program_id(1)
    b, kv_head = (seq_head // KV_HEADS).to(tl.int64), seq_head % KV_HEADS  # 64-bit: a cache can pass 2^31 elements
    num_heads = KV_HEADS * GROUP
    length = tl.load(lengths_ptr + b)
    start = split * split_len
    end = tl.minimum(start + split_len, length)

    group_rows = tl.arange(0, GROUP_PAD)
    head_mask = group_rows < GROUP
    heads = kv_head * GROUP + group_rows
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    # Query rows beyond GROUP are zero padding: tl.dot needs at least 16 rows.
    q = tl.load(q_ptr + b * q_stride_b + heads[:, None] * q_stride_h + dims[None, :],
                mask=head_mask[:, None] & dim_mask[None, :], other=0.0).to(DOT_DTYPE)

    kv_offset = b * kv_stride_b + kv_head * kv_stride_h
    param_offset = b * param_stride_b + kv_head * param_stride_h
    stage_offset = kv_head * stage_stride_h
    stage_param_offset = kv_head * stage_param_stride_h
    indices_offset = b * indices_stride_b + kv_head * indices_stride_h
    scores_rows = (b * num_heads + heads) * num_tokens
    row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    row_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for block_start in range(start, end, BLOCK):
        slots = block_start + tl.arange(0, BLOCK)
        slot_mask = slots < end
        positions = tl.load(indices_ptr + indices_offset + slots, mask=slot_mask, other=0)
        in_cache = slot_mask & (positions >= 0)
        cache_positions = tl.where(in_cache, positions, 0)
        k = _load_rows(k_ptr, k_scale_ptr, k_zero_ptr, kv_offset, param_offset, cache_positions, in_cache,
                       kv_stride_s, param_stride_s, HEAD_DIM, HEAD_DIM_PAD, QUANTIZED, TOKEN_GROUP, CHANNEL_GROUP,
                       DOT_DTYPE)
        v = _load_rows(v_ptr, v_scale_ptr, v_zero_ptr, kv_offset, param_offset, cache_positions, in_cache,
                       kv_stride_s, param_stride_s, HEAD_DIM, HEAD_DIM_PAD, QUANTIZED, TOKEN_GROUP, CHANNEL_GROUP,
                       DOT_DTYPE)
        if STAGED:
            # Each row comes from one place: the other load is masked off and adds zeros.
            in_stage = slot_mask & (positions < 0)
            stage_rows = tl.where(in_stage, -positions - 1, 0)
            k += _load_rows(sk_ptr, sk_scale_ptr, sk_zero_ptr, stage_offset, stage_param_offset, stage_rows,
                            in_stage, stage_stride_s, stage_param_stride_s, HEAD_DIM, HEAD_DIM_PAD, QUANTIZED,
                            TOKEN_GROUP, CHANNEL_GROUP, DOT_DTYPE)
            v += _load_rows(sv_ptr, sv_scale_ptr, sv_zero_ptr, stage_offset, stage_param_offset, stage_rows,
                            in_stage, stage_stride_s, stage_param_stride_s, HEAD_DIM, HEAD_DIM_PAD, QUANTIZED,
                            TOKEN_GROUP, CHANNEL_GROUP, DOT_DTYPE)
        scores = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION) * sm_scale_log2
        scores = tl.where(slot_mask[None, :], scores, float("-inf"))
        tl.store(scores_ptr + scores_rows[:, None] + slots[None, :], scores,
                 mask=head_mask[:, None] & slot_mask[None, :])
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        correction = tl.exp2(row_max - new_max)
        p = tl.exp2(scores - new_max[:, None])
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision=INPUT_PRECISION)
        row_max = new_max

    nonempty = row_sum > 0
    lse = tl.where(nonempty, row_max + tl.log2(tl.where(nonempty, row_sum, 1.0)), float("-inf"))
    out = acc / tl.where(nonempty, row_sum, 1.0)[:, None]
    stat = (b * num_heads + heads) * num_splits + split
    tl.store(split_lse_ptr + stat, lse, mask=head_mask)
    tl.store(split_out_ptr + stat[:, None] * HEAD_DIM + dims[None, :], out,
             mask=head_mask[:, None] & dim_mask[None, :])


@triton.jit
def _merge_kernel(split_lse_ptr, split_out_ptr, scores_ptr, lengths_ptr, out_ptr, probs_ptr,
                  num_tokens, num_splits, slice_len, out_stride_b, out_stride_h,
                  NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                  SPLITS_PAD: tl.constexpr, HEADS_PER_ROW: tl.constexpr,
                  HEADS_PER_ROW_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Program (sequence, head) merges that head's split outputs, and sums the probabilities of one slice of a row.

    A row of probabilities sums HEADS_PER_ROW consecutive heads (all heads for a shared index list, one KV head's
    query group for per-head lists) and is cut into HEADS_PER_ROW slices, so the heads' programs share it.
    """
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_mask = splits < num_splits
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM

    # This head's output: the splits' outputs weighted by their share of the softmax denominator.
    stats = (b * NUM_HEADS + head) * num_splits + splits
    lse = tl.load(split_lse_ptr + stats, mask=split_mask, other=float("-inf"))
    top = tl.max(lse, axis=0)
    weight = tl.exp2(lse - tl.where(top == float("-inf"), 0.0, top))
    total = tl.sum(weight, axis=0)
    partial = tl.load(split_out_ptr + stats[:, None] * HEAD_DIM + dims[None, :],
                      mask=split_mask[:, None] & dim_mask[None, :], other=0.0)
    out = tl.sum(weight[:, None] * partial, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * out_stride_b + head * out_stride_h + dims, out.to(out_ptr.dtype.element_ty),
             mask=dim_mask)

    # One slice of the probability row of this head's row of heads.
    row = head // HEADS_PER_ROW
    part = head % HEADS_PER_ROW
    members = tl.arange(0, HEADS_PER_ROW_PAD)
    member_mask = members < HEADS_PER_ROW
    row_heads = row * HEADS_PER_ROW + members
    row_stats = (b * NUM_HEADS + row_heads)[:, None] * num_splits + splits[None, :]
    row_lse = tl.load(split_lse_ptr + row_stats, mask=member_mask[:, None] & split_mask[None, :],
                      other=float("-inf"))
    row_top = tl.max(row_lse, axis=1)
    row_top = tl.where(row_top == float("-inf"), 0.0, row_top)
    row_total = tl.sum(tl.exp2(row_lse - row_top[:, None]), axis=1)
    # A head with no tokens gets +inf, so its (absent) scores contribute exp2(-inf) = 0.
    has_tokens = row_total > 0
    head_lse = tl.where(has_tokens, row_top + tl.log2(tl.where(has_tokens, row_total, 1.0)), float("inf"))
    length = tl.load(lengths_ptr + b)
    start = part * slice_len
    end = tl.minimum(start + slice_len, num_tokens)
    scores_rows = (b * NUM_HEADS + row_heads) * num_tokens
    for block_start in range(start, end, BLOCK):
        slots = block_start + tl.arange(0, BLOCK)
        scores = tl.load(scores_ptr + scores_rows[:, None] + slots[None, :],
                         mask=member_mask[:, None] & (slots < length)[None, :], other=float("-inf"))
        probs = tl.sum(tl.exp2(scores - head_lse[:, None]), axis=0)
        tl.store(probs_ptr + (b * (NUM_HEADS // HEADS_PER_ROW) + row) * num_tokens + slots, probs, mask=slots < end)


def _default_splits(seq_heads: int, num_tokens: int, device: torch.device) -> int:
    """Enough splits for about four programs per multiprocessor; one per (sequence, KV head) off the GPU."""
    if device.type != "cuda":
        return 1
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(num_tokens, BLOCK_T), triton.cdiv(4 * multiprocessors, seq_heads)))


def _parts(cache: KVTensor) -> tuple[Tensor, Tensor, Tensor]:
    """A cache's data, scale and zero tensors (the data three times for a cache of values: never read)."""
    return (cache.data, cache.scale, cache.zero) if isinstance(cache, QuantizedKV) else (cache, cache, cache)


def sparse_decode_attention(q: Tensor, k_cache: KVTensor, v_cache: KVTensor, indices: Tensor,
                            lengths: Tensor | None = None, sm_scale: float | None = None,
                            num_splits: int | None = None,
                            staged: tuple[KVTensor, KVTensor] | None = None) -> tuple[Tensor, Tensor]:
    """Decode attention of q [batch, heads, d] over the cached tokens `indices` names, fused with their probabilities.

    `k_cache`, `v_cache`: [batch, kv_heads, max_seq_len, d] in q's dtype (fp16, bf16 or fp32), or `QuantizedKV`.
    `indices`: positions [batch, T], or [batch, kv_heads, T] per KV head; `lengths` [batch]: valid entries (all T
    when omitted). `staged`: K and V rows [1, kv_heads, R, d] beside the cache (in its format) that any sequence's
    entry e < 0 names as row -e - 1 (the executor's staging buffer of fetched and recomputed tokens). Returns the
    output [batch, heads, d] and the probabilities summed over heads, fp32, [batch, T] (or [batch, kv_heads, T]
    summed over each KV head's query group); 0 past a sequence's length.
    """
    batch, heads, head_dim = q.shape
    quantized = isinstance(k_cache, QuantizedKV)
    k_data, k_scale, k_zero = _parts(k_cache)
    v_data, v_scale, v_zero = _parts(v_cache)
    kv_heads = k_data.shape[1]
    if q.dtype not in TL_DTYPES or (not quantized and k_data.dtype != q.dtype):
        raise ValueError(f"q must be fp16, bf16 or fp32 and K/V of its dtype or INT8; got q {q.dtype}, "
                         f"K/V {k_data.dtype}")
    if heads % kv_heads or k_data.shape[0] != batch or k_data.shape[3] != head_dim:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_data.shape)}")
    if k_data.stride() != v_data.stride() or k_data.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("K and V must share one layout with contiguous rows, and q must have contiguous rows")
    if quantized and (k_scale.stride() != v_scale.stride() or k_zero.stride() != k_scale.stride()):
        raise ValueError("the INT8 scales and zero points of K and V must share one layout")
    if staged is not None:
        sk_data, sk_scale, sk_zero = _parts(staged[0])
        sv_data, sv_scale, sv_zero = _parts(staged[1])
        if (isinstance(staged[0], QuantizedKV) != quantized or sk_data.shape[1] != kv_heads
                or sk_data.shape[3] != head_dim or sk_data.stride() != sv_data.stride() or sk_data.stride(3) != 1
                or sk_data.dtype != k_data.dtype):
            raise ValueError(f"the staged rows {tuple(sk_data.shape)} {sk_data.dtype} are not in the cache's "
                             f"format {tuple(k_data.shape)} {k_data.dtype}")
        stage_strides = (sk_data.stride(1), sk_data.stride(2), sk_scale.stride(1), sk_scale.stride(2))
    else:  # the stage pointers are never read
        sk_data = sv_data = sk_scale = sk_zero = sv_scale = sv_zero = k_data
        stage_strides = (0, 0, 0, 0)
    group = heads // kv_heads
    per_head = indices.dim() == 3
    num_tokens = indices.shape[-1]
    indices = indices.to(torch.int32)
    indices_strides = (indices.stride(0), indices.stride(1) if per_head else 0)
    if lengths is None:
        lengths = torch.full((batch,), num_tokens, dtype=torch.int32, device=q.device)
    lengths = lengths.to(device=q.device, dtype=torch.int32)

    # The split count is a run-time argument, so a growing index list does not compile new kernels.
    num_splits = num_splits or _default_splits(batch * kv_heads, num_tokens, q.device)
    split_len = max(1, triton.cdiv(triton.cdiv(num_tokens, num_splits), BLOCK_T)) * BLOCK_T
    num_splits = max(1, triton.cdiv(num_tokens, split_len))
    scores = torch.empty(batch, heads, num_tokens, dtype=torch.float32, device=q.device)
    split_lse = torch.empty(batch, heads, num_splits, dtype=torch.float32, device=q.device)
    split_out = torch.empty(batch, heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    if quantized:
        param_strides = k_scale.stride()[:3]
        token_group, channel_group = k_cache.token_group, k_cache.channel_group
    else:
        param_strides, token_group, channel_group = (0, 0, 0), 1, 1
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    # bf16 tl.dot is wrong under the CPU interpreter, so it gets fp32 operands there.
    dot_dtype = tl.float32 if _interpreting() and q.dtype == torch.bfloat16 else TL_DTYPES[q.dtype]
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs 16 along the reduced axis
    _split_kernel[(batch * kv_heads, num_splits)](
        q, k_data, v_data, k_scale, k_zero, v_scale, v_zero, sk_data, sv_data, sk_scale, sk_zero, sv_scale, sv_zero,
        indices, lengths, scores, split_lse, split_out,
        sm_scale * LOG2E, num_tokens, num_splits, split_len,
        q.stride(0), q.stride(1),
        k_data.stride(0), k_data.stride(1), k_data.stride(2),
        *param_strides, *stage_strides, *indices_strides,
        KV_HEADS=kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK=BLOCK_T,
        QUANTIZED=quantized, TOKEN_GROUP=token_group, CHANNEL_GROUP=channel_group, DOT_DTYPE=dot_dtype,
        STAGED=staged is not None, INPUT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=3)

    heads_per_row = group if per_head else heads
    out = torch.empty_like(q)
    probs = torch.empty(batch, heads // heads_per_row, num_tokens, dtype=torch.float32, device=q.device)
    slice_len = triton.cdiv(triton.cdiv(num_tokens, heads_per_row), BLOCK_T) * BLOCK_T
    _merge_kernel[(batch, heads)](
        split_lse, split_out, scores, lengths, out, probs, num_tokens, num_splits, slice_len, out.stride(0),
        out.stride(1), NUM_HEADS=heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        SPLITS_PAD=triton.next_power_of_2(num_splits), HEADS_PER_ROW=heads_per_row,
        HEADS_PER_ROW_PAD=triton.next_power_of_2(heads_per_row), BLOCK=BLOCK_T, num_warps=4)
    return out, probs if per_head else probs[:, 0]

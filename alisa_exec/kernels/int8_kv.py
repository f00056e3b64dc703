"""INT8 KV cache: asymmetric min-max quantization fused into the store of new tokens' K or V, and its dequantization.

Each group of values gets a scale and a float zero point (the group's minimum, FlexGen's layout):
`q = clamp(floor((x - zero) / scale + 1/2), 0, 255)` stored as uint8, `x ~ q * scale + zero`, with
`scale = (max - min) / 255`. Rounding to the nearest level makes the round-trip error at most `scale / 2` per
element. `scale` and `zero` are stored in the values' own dtype (so the minimum is exact) and the quantization
uses them as stored, so the bound holds for what is read back; the scale is nudged up by one rounding step of
that dtype before it is stored, so the group's maximum still maps to at most 255 rather than clipping, whichever
way the conversion rounds. A constant group stores `scale = 1` and `q = 0`, exactly.

A group is `token_group` consecutive tokens by `channel_group` consecutive channels of one KV head:
`token_group = 1` is per-token groups of channels (the default; every new token is quantized on its own as it is
stored), `channel_group = 1, token_group = G` is channel-wise quantization across G tokens (statistics need all G
tokens, so such a cache is stored in whole, aligned blocks of G tokens, e.g. a prefill whose length is a multiple
of G). The layout mirrors the executor's `KVCache`: data [batch, kv_heads, max_seq_len, head_dim] written by
position, scale and zero [batch, kv_heads, max_seq_len / token_group, head_dim / channel_group].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

LEVELS = 255  # uint8 levels above zero


@dataclass
class QuantizedKV:
    """One layer's K (or V) in INT8: uint8 data and per-group scale and zero point."""

    data: Tensor
    scale: Tensor
    zero: Tensor
    token_group: int
    channel_group: int

    @classmethod
    def empty(cls, batch: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype,
              device: torch.device | str, channel_group: int = 64, token_group: int = 1) -> QuantizedKV:
        """A zeroed cache; `dtype` is the dtype of the values it stands for (scale and zero are kept in it)."""
        channel_group = min(channel_group, head_dim)
        if head_dim % channel_group or max_seq_len % token_group:
            raise ValueError(f"groups of {token_group} tokens x {channel_group} channels must tile "
                             f"{max_seq_len} tokens x {head_dim} channels")
        if channel_group & (channel_group - 1) or token_group & (token_group - 1):
            raise ValueError(f"group sizes must be powers of two, got {token_group} tokens x {channel_group} channels")
        params = (batch, kv_heads, max_seq_len // token_group, head_dim // channel_group)
        return cls(data=torch.zeros(batch, kv_heads, max_seq_len, head_dim, dtype=torch.uint8, device=device),
                   scale=torch.ones(params, dtype=dtype, device=device),
                   zero=torch.zeros(params, dtype=dtype, device=device),
                   token_group=token_group, channel_group=channel_group)

    @property
    def dtype(self) -> torch.dtype:
        return self.scale.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The whole cache as values, [batch, kv_heads, max_seq_len, head_dim] (in the values' dtype by default)."""
        return dequantize_rows(self, torch.arange(self.data.shape[2], device=self.data.device), dtype)


def dequantize_rows(cache: QuantizedKV, positions: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Rows at `positions` ([T] for all, [batch, 1, T] per sequence, [batch, kv_heads, T] per sequence and head) as
    values, [batch, kv_heads, T, d]."""
    batch, kv_heads, _, head_dim = cache.data.shape
    positions = positions.long().expand(batch, kv_heads, positions.shape[-1])
    rows = cache.data.gather(2, positions[..., None].expand(-1, -1, -1, head_dim))
    group_rows = (positions // cache.token_group)[..., None].expand(-1, -1, -1, cache.scale.shape[-1])
    # [..., channel groups, 1] parameters broadcast over [..., channel groups, channels]
    scale = cache.scale.gather(2, group_rows).float()[..., None]
    zero = cache.zero.gather(2, group_rows).float()[..., None]
    grouped = rows.view(*rows.shape[:3], head_dim // cache.channel_group, cache.channel_group).float()
    return (grouped * scale + zero).view(rows.shape).to(dtype or cache.dtype)


def quantize_reference(x: Tensor, token_group: int, channel_group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Plain PyTorch quantization of [batch, kv_heads, seq, d] (seq a multiple of token_group): data, scale, zero."""
    batch, kv_heads, seq, head_dim = x.shape
    groups = x.float().reshape(batch, kv_heads, seq // token_group, token_group, head_dim // channel_group,
                               channel_group)
    lo, hi = groups.amin(dim=(3, 5)), groups.amax(dim=(3, 5))
    scale = torch.where(hi > lo, (hi - lo) / LEVELS * (1 + torch.finfo(x.dtype).eps), 1.0).to(x.dtype)
    zero = lo.to(x.dtype)
    expand = (slice(None), slice(None), slice(None), None, slice(None), None)
    q = torch.floor((groups - zero.float()[expand]) / scale.float()[expand] + 0.5).clamp(0, LEVELS)
    return q.to(torch.uint8).reshape(x.shape), scale, zero


@triton.jit
def _quantize_store_kernel(x_ptr, positions_ptr, data_ptr, scale_ptr, zero_ptr, num_new,
                           x_stride_b, x_stride_h, x_stride_s,
                           data_stride_b, data_stride_h, data_stride_s,
                           param_stride_b, param_stride_h, param_stride_s,
                           KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, TOKEN_GROUP: tl.constexpr,
                           CHANNEL_GROUP: tl.constexpr, NUM_CHANNEL_GROUPS: tl.constexpr,
                           GROUPS_PER_PROGRAM: tl.constexpr, SCALE_EPS: tl.constexpr):
    """Quantize GROUPS_PER_PROGRAM token groups of new rows of one (sequence, KV head) and store them by position."""
    seq_head = tl.program_id(0)
    b, h = (seq_head // KV_HEADS).to(tl.int64), seq_head % KV_HEADS  # 64-bit: a cache can pass 2^31 elements
    # A tile [token groups, tokens in a group, channel groups, channels in a group]: reductions over axes 1 and 3
    # give one (min, max) per quantization group.
    group = tl.program_id(1) * GROUPS_PER_PROGRAM + tl.arange(0, GROUPS_PER_PROGRAM)[:, None, None, None]
    row = group * TOKEN_GROUP + tl.arange(0, TOKEN_GROUP)[None, :, None, None]
    channel_group = tl.arange(0, NUM_CHANNEL_GROUPS)[None, None, :, None]
    dim = channel_group * CHANNEL_GROUP + tl.arange(0, CHANNEL_GROUP)[None, None, None, :]
    mask = (row < num_new) & (dim < HEAD_DIM)

    x = tl.load(x_ptr + b * x_stride_b + h * x_stride_h + row * x_stride_s + dim, mask=mask, other=0.0)
    x = x.to(tl.float32)
    lo = tl.min(tl.min(tl.where(mask, x, float("inf")), axis=3, keep_dims=True), axis=1, keep_dims=True)
    hi = tl.max(tl.max(tl.where(mask, x, float("-inf")), axis=3, keep_dims=True), axis=1, keep_dims=True)
    # Quantize with the scale and zero as they will be stored, so the error bound holds for what is read back.
    scale = tl.where(hi > lo, (hi - lo) / 255.0 * (1.0 + SCALE_EPS), 1.0).to(scale_ptr.dtype.element_ty)
    zero = lo.to(zero_ptr.dtype.element_ty)
    q = tl.floor((x - zero.to(tl.float32)) / scale.to(tl.float32) + 0.5)
    q = tl.minimum(tl.maximum(q, 0.0), 255.0).to(tl.uint8)

    position = tl.load(positions_ptr + row, mask=row < num_new, other=0)
    tl.store(data_ptr + b * data_stride_b + h * data_stride_h + position * data_stride_s + dim, q, mask=mask)
    # Every token of a group writes the same scale and zero to the same place; only the first one needs to.
    first_of_group = (row % TOKEN_GROUP == 0) & (row < num_new) & (channel_group < HEAD_DIM // CHANNEL_GROUP)
    params = (b * param_stride_b + h * param_stride_h + (position // TOKEN_GROUP) * param_stride_s + channel_group)
    tl.store(scale_ptr + params, scale, mask=first_of_group)
    tl.store(zero_ptr + params, zero, mask=first_of_group)


def store_quantized(cache: QuantizedKV, positions: Tensor, x: Tensor) -> None:
    """Quantize new tokens' K or V, x [batch, kv_heads, seq, d], into `cache` at `positions` [seq].

    With `token_group > 1` the positions must be consecutive and start at a multiple of `token_group`, and seq
    must be a multiple of it (whole groups are quantized together).
    """
    batch, kv_heads, seq, head_dim = x.shape
    if x.dtype != cache.dtype or cache.data.shape[:2] != (batch, kv_heads) or cache.data.shape[3] != head_dim:
        raise ValueError(f"new values {tuple(x.shape)} {x.dtype} do not fit the cache "
                         f"{tuple(cache.data.shape)} of {cache.dtype}")
    if seq % cache.token_group:
        raise ValueError(f"{seq} new tokens are not whole groups of {cache.token_group}")
    if x.stride(3) != 1:
        x = x.contiguous()
    positions = positions.to(device=x.device, dtype=torch.int64)
    groups_per_program = max(1, 16 // cache.token_group)
    num_groups = seq // cache.token_group
    grid = (batch * kv_heads, triton.cdiv(num_groups, groups_per_program))
    _quantize_store_kernel[grid](
        x, positions, cache.data, cache.scale, cache.zero, seq,
        x.stride(0), x.stride(1), x.stride(2),
        cache.data.stride(0), cache.data.stride(1), cache.data.stride(2),
        cache.scale.stride(0), cache.scale.stride(1), cache.scale.stride(2),
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, TOKEN_GROUP=cache.token_group, CHANNEL_GROUP=cache.channel_group,
        NUM_CHANNEL_GROUPS=triton.next_power_of_2(head_dim // cache.channel_group),
        GROUPS_PER_PROGRAM=groups_per_program, SCALE_EPS=torch.finfo(x.dtype).eps)

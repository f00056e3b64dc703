"""`k4-capped`'s capped choice as one Triton launch: per (sequence, KV head), SWA's older picks taken newest first,
each admitting the best remaining token no older than itself.

The PyTorch form (`capped_choice_reference`) is a loop over the older picks of a few eager ops each, so on a GPU it
costs about six kernel launches per pick and layer (64 picks at 80% of 640 tokens: ~400 launches a layer). The kernel
runs the same loop inside one program per (sequence, KV head): per pick, a blocked scan for the largest key at or
after the bound, then that key is struck out. Keys are distinct (the copy's attention in fixed point times n, plus
the tie break to the older token), so the choice is the reference's exactly.

Keys: [batch, kv_heads, n] int64, -1 where a token is not a candidate (the recent window); bounds: [batch, m] int64,
SWA's older picks newest first, -1 once a sequence's run out. One candidate always remains at or after a bound
(fewer picks are made than SWA has at or after it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def capped_choice_reference(keys: Tensor, bounds: Tensor) -> Tensor:
    """Chosen older tokens [batch, kv_heads, n] bool: for each bound in turn, the largest key at or after it not
    chosen yet."""
    positions = torch.arange(keys.shape[-1], device=keys.device)
    chosen = torch.zeros_like(keys, dtype=torch.bool)
    for bound in bounds.T:  # [batch]
        allowed = (positions >= bound[:, None, None]) & ~chosen
        best = torch.where(allowed, keys, -1).argmax(dim=-1, keepdim=True)
        chosen.scatter_(-1, best, chosen.gather(-1, best) | (bound >= 0)[:, None, None])
    return chosen


@triton.jit
def _capped_choice_kernel(keys_ptr, bounds_ptr, chosen_ptr, n, picks, kv_heads, keys_stride, bounds_stride,
                          BLOCK: tl.constexpr):
    """Program (sequence x KV head): `picks` bounds, each a scan of the row's keys in blocks."""
    row = tl.program_id(0).to(tl.int64)
    sequence = row // kv_heads
    keys = keys_ptr + row * keys_stride
    for j in range(0, picks):
        bound = tl.load(bounds_ptr + sequence * bounds_stride + j)
        if bound >= 0:
            best_key = tl.full((), -1, tl.int64)
            best_at = tl.full((), 0, tl.int64)
            for start in range(0, n, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                block = tl.load(keys + cols, mask=(cols < n) & (cols >= bound), other=-1)
                block_best = tl.max(block, axis=0)
                block_at = start + tl.argmax(block, axis=0)
                better = block_best > best_key
                best_at = tl.where(better, block_at, best_at)
                best_key = tl.where(better, block_best, best_key)
            tl.store(keys + best_at, -2)  # struck out: never the best again
            tl.store(chosen_ptr + row * n + best_at, 1)
            tl.debug_barrier()  # the next scan reads the struck-out key


def capped_choice_triton(keys: Tensor, bounds: Tensor, block: int = 128) -> Tensor:
    """`capped_choice_reference` in one launch (keys are consumed: pass a copy you no longer need)."""
    batch, kv_heads, n = keys.shape
    keys = keys.contiguous()
    bounds = bounds.to(torch.int64).contiguous()
    chosen = torch.zeros(batch, kv_heads, n, dtype=torch.int8, device=keys.device)
    if n and bounds.shape[1]:
        _capped_choice_kernel[(batch * kv_heads,)](keys, bounds, chosen, n, bounds.shape[1], kv_heads, keys.stride(1),
                                                   bounds.stride(0), BLOCK=block)
    return chosen.bool()

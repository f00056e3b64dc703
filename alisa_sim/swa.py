"""Sparse Window Attention's window arithmetic, shared by the simulator and the executor's kernels."""

from __future__ import annotations

import math


def swa_window(num_tokens: int, kv_sparsity: float) -> int:
    """k for a step with `num_tokens` cached tokens: the recent-window size and the number of older tokens kept,
    max(1, round(n * r / 2)) with r = 1 - kv_sparsity and halves rounded up (Python's round goes to even)."""
    keep_ratio = 1.0 - kv_sparsity
    # The epsilon keeps e.g. 15 * (1 - 0.8) / 2 = 1.4999999999999998 rounding up, as 1.5 does.
    return max(1, math.floor(num_tokens * keep_ratio / 2 + 0.5 + 1e-9))

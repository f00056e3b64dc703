"""Sparse Window Attention's window arithmetic, shared by the simulator and the executor's kernels."""

from __future__ import annotations

import math


def swa_window(num_tokens: int, kv_sparsity: float) -> int:
    """k for a step with `num_tokens` cached tokens: the recent-window size and the number of older tokens kept,
    max(1, round(n * r / 2)) with r = 1 - kv_sparsity and halves rounded up (Python's round goes to even)."""
    keep_ratio = 1.0 - kv_sparsity
    # The epsilon keeps e.g. 15 * (1 - 0.8) / 2 = 1.4999999999999998 rounding up, as 1.5 does.
    return max(1, math.floor(num_tokens * keep_ratio / 2 + 0.5 + 1e-9))


# How SWA's budget treats the current token (workload option `swa_current` of the alisa policy, the accuracy
# methods' `current`): "inside" counts it among the k recent tokens of the 2k budget (the paper's literal
# |I| = 2k with I_l = [n - k, n - 1]); "extra" attends it on top of k recent and k older tokens (2k + 1).
SWA_CURRENT_OPTIONS = ("inside", "extra")
# ALISA's SWA and the accuracy methods attend "extra" unless told otherwise (docs/accuracy.md says why); H2O and
# StreamingLLM keep the literal 2k.
SWA_CURRENT_DEFAULT = "extra"
# Who picks the older tokens ALISA attends (workload option `selector`): SWA's sums, one set per layer chosen a step
# ahead, or `k4-capped`, per KV head from the step's own query over a 4-bit key copy, held to SWA's ages.
SELECTORS = ("swa", "k4-capped")


def kv_budget(num_tokens: int, kv_sparsity: float, current: str = "inside") -> int:
    """Tokens attended (or kept) at a step with `num_tokens` cached: SWA's k recent plus k older, min(n, 2k), or
    min(n, 2k + 1) when the current token is attended on top (`current="extra"`). The one budget of SWA, H2O,
    StreamingLLM and the accuracy evaluator's methods."""
    if current not in SWA_CURRENT_OPTIONS:
        raise ValueError(f"current must be one of {SWA_CURRENT_OPTIONS}, not {current!r}")
    return min(num_tokens, 2 * swa_window(num_tokens, kv_sparsity) + (current == "extra"))


def swa_recent(num_tokens: int, kv_sparsity: float, current: str = "inside") -> int:
    """How many of the newest tokens SWA attends as its local window (the current one included): k, or k + 1 with
    `current="extra"`; the other `kv_budget - swa_recent` tokens are older ones picked by attention."""
    return min(num_tokens, swa_window(num_tokens, kv_sparsity) + (current == "extra"))


def eviction_kept(num_tokens: int, kv_sparsity: float, prompt_len: int) -> int:
    """Tokens an evicting cache (H2O, StreamingLLM) holds at a step with `num_tokens` cached: the budget, except one
    short on a decode step where the budget grows by two, since evicted tokens do not come back and a step adds one.
    (Below full density the budget never grows by two on two steps in a row, so the cache is full again the step
    after.)"""
    budget = kv_budget(num_tokens, kv_sparsity)
    if num_tokens > prompt_len and budget - kv_budget(num_tokens - 1, kv_sparsity) == 2:
        return budget - 1
    return budget

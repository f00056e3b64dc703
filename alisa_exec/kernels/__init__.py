"""Triton kernels for Sparse Window Attention, each beside the plain PyTorch reference it is tested against.

- `sparse_attention`: decode attention over an index list of cached tokens, fused with the head-summed attention
  probabilities (flash-decoding splits, GQA, INT8 K/V); the explicit-gather mode; the reference.
- `selection`: the local attention sum over the last k steps and the recent + top-k selection.
- `capped_choice`: `k4-capped`'s greedy under SWA's age caps, one program per (sequence, KV head).
- `int8_kv`: asymmetric min-max INT8 quantization fused into the store of new K/V, and dequantization.

Off the GPU, set TRITON_INTERPRET=1 before triton is first imported and the kernels run on the CPU.
"""

from alisa_exec.kernels.int8_kv import QuantizedKV, dequantize_rows, quantize_reference, store_quantized
from alisa_exec.kernels.selection import LocalAttentionSum, prefill_window_rows, select_reference, swa_window
from alisa_exec.kernels.sparse_attention import (dense_decode_attention, gather_decode_attention, gather_kv,
                                                 sparse_decode_attention)

__all__ = ["LocalAttentionSum", "QuantizedKV", "dense_decode_attention", "dequantize_rows", "gather_decode_attention",
           "gather_kv", "prefill_window_rows", "quantize_reference", "select_reference", "sparse_decode_attention",
           "store_quantized", "swa_window"]

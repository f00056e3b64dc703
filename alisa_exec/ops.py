"""Every op the executor issues, by name: GEMM projections, norms, activations, rotary embeddings, the attention paths,
embeddings and the LM head. (INT8 quantize / dequantize are `TokenRows`' store and decode, selection is the kernels'
`LocalAttentionSum`, tier copies are `Tiers.copy`.) The policies' layer loop calls these and nothing else, so what
the profiler times at the executor's shapes is what a run executes.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from alisa_exec.kernels import dense_decode_attention, gather_decode_attention, sparse_decode_attention
from alisa_exec.kernels.int8_kv import QuantizedKV
from alisa_exec.model import Attention, FeedForward, Transformer, gemm

KVView = Tensor | QuantizedKV


def project(linear: nn.Linear, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """A GEMM projection: x @ W^T + b (the layer's own weights, or staged ones of the same shape)."""
    if weight is None:  # packed for MKL's GEMM on the CPU when `Transformer.pack_weights` packed it
        return gemm(x, linear.weight, linear.bias, linear, "packed_weight")
    return F.linear(x, weight, bias)


def norm(module: nn.Module, x: Tensor) -> Tensor:
    """LayerNorm (OPT) or RMSNorm (LLaMA)."""
    return module(x)


def activate(feed_forward: FeedForward, up: Tensor) -> Tensor:
    """The MLP's nonlinearity (ReLU, or SwiGLU's gate)."""
    return feed_forward.activate(up)


def split_heads(attention: Attention, qkv: Tensor, rope) -> tuple[Tensor, Tensor, Tensor]:
    """q, k, v per head from the fused projection, rotary embeddings applied (LLaMA)."""
    return attention.split_heads(qkv, rope)


def project_kv(attention: Attention, h: Tensor, rope) -> tuple[Tensor, Tensor]:
    """Only the K and V projections of normed layer inputs (recomputing deleted tokens' KV), rotary applied."""
    return attention.project_kv(h, rope)


def embed(model: Transformer, tokens: Tensor, positions: Tensor) -> Tensor:
    return model.embed(tokens, positions)


def rope(model: Transformer, positions: Tensor):
    return model.rope(positions)


def lm_head(model: Transformer, x: Tensor) -> Tensor:
    """fp32 logits of the last position (final norm and the LM head GEMM)."""
    return model.logits(x[:, -1:])


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """A prompt pass over its own tokens: q [b, s, heads, d], k and v [b, s, kv_heads, d] -> [b, s, heads x d]."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                       enable_gqa=k.shape[2] != q.shape[2])
    return y.transpose(1, 2).flatten(2)


def masked_attention(q: Tensor, keys: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Dense attention of q [b, s, heads, d] over a whole cache [b, kv_heads, L, d] under an additive mask [s, L]
    (the dense and zero policies' static buffers) -> [b, s, heads x d]."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,  # broadcast over b, heads
                                       enable_gqa=keys.shape[1] != q.shape[2])
    return y.transpose(1, 2).flatten(2)


def rows_attention(q: Tensor, keys: Tensor, values: Tensor) -> Tensor:
    """Decode attention of q [b, 1, heads, d] over every row of packed K/V [b, kv_heads, T, d] -> [b, 1, heads x d]
    (the offloading policies' staged caches)."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, enable_gqa=keys.shape[1] != q.shape[2])
    return y.transpose(1, 2).flatten(2)


def packed_attention(q: Tensor, keys: Tensor, values: Tensor, lengths: Tensor | None = None,
                     per_head: bool = False) -> tuple[Tensor, Tensor]:
    """Decode attention of q [b, heads, d] over packed K/V [b, kv_heads, T, d], with the head-summed probabilities
    (the explicit-gather path, vLLM's block tables, H2O's slots)."""
    return dense_decode_attention(q, keys, values, lengths, per_head=per_head)


def sparse_attention(q: Tensor, keys: KVView, values: KVView, indices: Tensor, staged: tuple[KVView, KVView] | None,
                     triton: bool) -> tuple[Tensor, Tensor]:
    """The fused path: decode attention over an index list into the cache in place (and a staging buffer), with the
    head-summed probabilities, in one pass: the Triton kernel, or its PyTorch form (same results) off the GPU."""
    if triton:
        return sparse_decode_attention(q, keys, values, indices, staged=staged)
    return gather_decode_attention(q, keys, values, indices, staged=staged)


def argmax(logits: Tensor) -> Tensor:
    """Greedy next tokens [batch, 1] of logits [batch, 1, vocab]."""
    return logits.argmax(dim=-1)


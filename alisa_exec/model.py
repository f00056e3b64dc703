"""The executor's decoder: one gpt-fast-style transformer for OPT and LLaMA (GQA included) with static KV buffers.

Built from a `ModelSpec`. OPT: learned positions (offset by 2), LayerNorm, biases, ReLU MLP. LLaMA: rotary position
embeddings (the Hugging Face half-rotation layout), RMSNorm, SwiGLU MLP, grouped-query attention. Q, K and V share one
fused projection, as do the SwiGLU gate and up projections (the GEMMs `ModelSpec.layer_gemms` counts).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from alisa_sim.errors import SpecError
from alisa_sim.model_spec import ModelSpec

OPT_POSITION_OFFSET = 2  # OPT's learned position table keeps two unused rows in front
FAMILIES = ("opt", "llama")
SEQ_ALIGN = 16  # KV buffers and masks span a multiple of this (SDPA's memory-efficient kernel pads masks otherwise)


def aligned_seq_len(max_seq_len: int) -> int:
    """Positions the static buffers hold for sequences of up to `max_seq_len` tokens."""
    return -(-max_seq_len // SEQ_ALIGN) * SEQ_ALIGN


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, then scaled in the model's dtype (as LLaMA does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.type_as(x)


def make_norm(spec: ModelSpec) -> nn.Module:
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps) if spec.family == "opt" else RMSNorm(spec.hidden_size,
                                                                                                    spec.norm_eps)


def rope_tables(spec: ModelSpec, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of every position's rotation angles, [max_seq_len, head_dim], each frequency twice (half layout)."""
    dim = spec.dim_per_head
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [batch, seq, heads, head_dim] by the angles of its positions ([seq, head_dim] tables)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Static K and V buffers of one layer, [batch, kv_heads, max_seq_len, head_dim]; rows are written by position."""

    def __init__(self, batch_size: int, max_seq_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        shape = (batch_size, kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.dim_per_head
        self.q_dim, self.kv_dim = spec.q_dim, spec.kv_dim
        self.wqkv = nn.Linear(spec.hidden_size, spec.q_dim + 2 * spec.kv_dim, bias=spec.has_biases)
        self.wo = nn.Linear(spec.q_dim, spec.hidden_size, bias=spec.has_biases)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, input_pos: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = self.wqkv(x).split([self.q_dim, self.kv_dim, self.kv_dim], dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = self.kv_cache.update(input_pos, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.num_kv_heads != self.num_heads)
        return self.wo(y.transpose(1, 2).reshape(batch, seq, self.q_dim))


class FeedForward(nn.Module):
    """SwiGLU (gate and up fused in `w_up`) for LLaMA, fc1-ReLU-fc2 for OPT."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.gated = spec.gated_mlp
        self.w_up = nn.Linear(spec.hidden_size, (2 if self.gated else 1) * spec.ffn_dim, bias=spec.has_biases)
        self.w_down = nn.Linear(spec.ffn_dim, spec.hidden_size, bias=spec.has_biases)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            gate, up = self.w_up(x).chunk(2, dim=-1)
            return self.w_down(F.silu(gate) * up)
        return self.w_down(F.relu(self.w_up(x)))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attention(norm(x)), then h + mlp(norm(h))."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.attention_norm = make_norm(spec)
        self.attention = Attention(spec)
        self.ffn_norm = make_norm(spec)
        self.feed_forward = FeedForward(spec)

    def forward(self, x: Tensor, input_pos: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), input_pos, mask, rope)
        return h + self.feed_forward(self.ffn_norm(h))


def check_family(spec: ModelSpec) -> None:
    if spec.family not in FAMILIES:
        raise SpecError(f"model {spec.name}: family {spec.family!r} is not in the executor "
                        f"(it runs {', '.join(FAMILIES)})")


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        check_family(spec)
        self.spec = spec
        self.tok_embeddings = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.pos_embeddings = (nn.Embedding(spec.max_position_embeddings + OPT_POSITION_OFFSET, spec.hidden_size)
                               if spec.family == "opt" else None)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.norm = make_norm(spec)
        self.output = None if spec.tie_word_embeddings else nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.max_seq_len = 0

    def setup_caches(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate every layer's KV buffers, the causal mask and the rotary tables for sequences of up to
        `max_seq_len` tokens (rounded up to `aligned_seq_len`)."""
        weight = self.tok_embeddings.weight
        dtype, device = weight.dtype, weight.device
        self.max_seq_len = max_seq_len = aligned_seq_len(max_seq_len)
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, max_seq_len, self.spec.num_kv_heads, self.spec.dim_per_head,
                                               dtype, device)
        # Additive, in the model's dtype, so attention uses it as is (a boolean mask is converted on every call).
        allowed = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device))
        mask = torch.zeros(max_seq_len, max_seq_len, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        self.register_buffer("causal_mask", mask, persistent=False)
        if self.spec.family == "llama":
            cos, sin = rope_tables(self.spec, max_seq_len, dtype, device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor, all_logits: bool = False) -> Tensor:
        """fp32 logits of the last position of each sequence ([batch, 1, vocab]), or of every position.

        `tokens` [batch, seq] sit at positions `input_pos` [seq]; their K and V are written to the cache there and
        each attends to every cached position up to its own.
        """
        mask = self.causal_mask[None, None, input_pos]
        x = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(input_pos + OPT_POSITION_OFFSET)
        rope = (self.rope_cos[input_pos], self.rope_sin[input_pos]) if self.spec.family == "llama" else None
        for layer in self.layers:
            x = layer(x, input_pos, mask, rope)
        if not all_logits:
            x = x[:, -1:]
        x = self.norm(x)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight
        return F.linear(x, weight).float()

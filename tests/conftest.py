"""Test-wide setup: Triton kernels run under the interpreter when there is no CUDA device (the variable must be set
before triton is first imported, whichever test imports the kernels first), and the GPU check's CPU dry run, run once
per session for its own tests and for the quick CPU profile it measures."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import torch
except ImportError:  # the simulator's tests run without torch
    torch = None

if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def gpu_check_dry_run(tmp_path_factory):
    """`benchmarks/gpu_check.py --dry-run`: (the finished process, its output folder). On one torch thread
    (OMP_NUM_THREADS=1), so that its profile stage measures the quick CPU profile as benchmarks/cpu_validation.py
    measures and runs (its THREADS says why: on a shared machine two threads time competing work as stalls); the
    executor tests take that profile (`quick_cpu_profile`) rather than measure the same one again."""
    folder = tmp_path_factory.mktemp("gpu-check")
    out = folder / "out"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(out), "--work",
                           str(folder / "work")], cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    print(done.stdout[-4000:], done.stderr[-4000:])
    return done, out

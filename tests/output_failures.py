"""Real output failures for the CLI tests: a read-only folder (also where the tests run as root) and a full disk."""

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_module(module: str, args: list[str], read_only: bool = False, small_files: bool = False):
    """`python -m module args` from the repository root. `read_only`: without the powers root has to write anywhere
    (so a folder's permissions hold); `small_files`: with a 4 KB file-size limit, so a bigger write fails with EFBIG
    as it would with ENOSPC on a full filesystem."""
    command = [sys.executable, "-m", module, *args]
    if read_only and os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: a read-only folder cannot be made")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    return subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)},
                          preexec_fn=_small_files_only if small_files else None)


def _small_files_only():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

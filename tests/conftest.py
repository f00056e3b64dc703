"""Test-wide setup: Triton kernels run under the interpreter when there is no CUDA device (the variable must be set
before triton is first imported, whichever test imports the kernels first), a cache of converted GGUF files of the
session's own (never the user's), and the GPU check's CPU dry run, run once per session (started in the background
as the session starts, shared by xdist's workers) for its own tests and for the quick CPU profile it measures."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

try:
    import torch
except ImportError:  # the simulator's tests run without torch
    torch = None

if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A session started as a shell's background job ignores SIGINT, and the processes the tests start would inherit
# that: the interrupt tests' Ctrl-C would then be lost. Tests run as under a terminal.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
DRY_RUN_ENV = "ALISA_TEST_DRY_RUN_DIR"  # the folder of the session's dry run, for the xdist workers
DRY_RUN_TIMEOUT_S = 900
DRY_RUN_FIXTURES = ("gpu_check_dry_run", "quick_cpu_profile")
CACHE_ENV = "ALISA_CACHE_DIR"  # alisa_exec.weights' cache of converted GGUF files
_dry_run_key = pytest.StashKey[tuple]()
_cache_key = pytest.StashKey[tuple]()


def _start_dry_run(folder: Path) -> subprocess.Popen:
    """`benchmarks/gpu_check.py --dry-run` in the background, its output in `folder` (stdout, stderr, and its exit
    code in `rc` once it is done). On one torch thread (OMP_NUM_THREADS=1), so that its profile stage measures the
    quick CPU profile as benchmarks/cpu_validation.py measures and runs (its THREADS says why: on a shared machine two
    threads time competing work as stalls)."""
    folder.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(arg) for arg in [
        sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--out", str(folder / "out"), "--work",
        str(folder / "work")])
    return subprocess.Popen(["bash", "-c", f"{command} >{shlex.quote(str(folder / 'stdout'))} "
                                    f"2>{shlex.quote(str(folder / 'stderr'))}; echo $? >{shlex.quote(str(folder / 'rc'))}"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)


def _uses_the_dry_run(config) -> bool:
    """Whether the paths this session was asked to test hold a test module that takes the dry run's fixtures."""
    targets = [Path(arg.split("::")[0]).resolve() for arg in config.args] or [REPO / "tests"]
    for module in (REPO / "tests").rglob("test_*.py"):
        if any(module == target or target in module.parents for target in targets):
            if any(name in module.read_text() for name in DRY_RUN_FIXTURES):
                return True
    return False


def pytest_configure(config):
    """Point the GGUF cache at a folder of this session's, shared by xdist's workers (they inherit the variable), so
    that a session converts the SmolLM2 file for real once and its later loads read the conversion. Start the GPU
    check's dry run (about 110 s, one core) as a parallel session starts, so that it runs beside the other tests
    rather than before the first one that needs it; xdist's workers inherit its folder."""
    if not hasattr(config, "workerinput"):
        config.stash[_cache_key] = (os.environ.get(CACHE_ENV), tempfile.mkdtemp(prefix="alisa-test-cache-"))
        os.environ[CACHE_ENV] = config.stash[_cache_key][1]
    parallel = getattr(config.option, "numprocesses", None)  # xdist's -n (this project's addopts: -n 2)
    if parallel and not hasattr(config, "workerinput"):
        # One torch thread per worker (and per process a test starts): the workers already fill the cores, and
        # idle OpenMP threads spinning beside the other worker cost about a fifth of the session's CPU time.
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not parallel or hasattr(config, "workerinput") or DRY_RUN_ENV in os.environ or not _uses_the_dry_run(config):
        return  # a serial session runs it when a test first needs it
    folder = Path(tempfile.mkdtemp(prefix="alisa-gpu-check-"))
    os.environ[DRY_RUN_ENV] = str(folder)
    config.stash[_dry_run_key] = (folder, _start_dry_run(folder))


def pytest_unconfigure(config):
    """Remove the session's GGUF cache; stop the dry run if no test waited for it to end (a deselected run), and
    remove its folder."""
    cache = config.stash.get(_cache_key, None)
    if cache is not None:
        before, folder = cache
        shutil.rmtree(folder, ignore_errors=True)
        if before is None:
            os.environ.pop(CACHE_ENV, None)
        else:
            os.environ[CACHE_ENV] = before
    started = config.stash.get(_dry_run_key, None)
    if started is None:
        return
    folder, process = started
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    os.environ.pop(DRY_RUN_ENV, None)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def gpu_check_dry_run(tmp_path_factory):
    """(the finished dry run, its output folder): the one the session started (`pytest_configure`), else one run
    now. The executor tests take its profile (`quick_cpu_profile`) rather than measure the same one again."""
    if DRY_RUN_ENV in os.environ:  # started beside the other tests: its exit code is written when it ends
        folder = Path(os.environ[DRY_RUN_ENV])
        deadline = time.monotonic() + DRY_RUN_TIMEOUT_S
        while not (folder / "rc").is_file() or not (folder / "rc").read_text().strip():
            assert time.monotonic() < deadline, f"the GPU check's dry run did not finish in {DRY_RUN_TIMEOUT_S} s"
            time.sleep(0.5)
    else:
        folder = tmp_path_factory.mktemp("gpu-check")
        process = _start_dry_run(folder)
        try:
            process.wait(timeout=DRY_RUN_TIMEOUT_S)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    done = subprocess.CompletedProcess("benchmarks/gpu_check.py --dry-run", int((folder / "rc").read_text()),
                                       (folder / "stdout").read_text(), (folder / "stderr").read_text())
    print(done.stdout[-4000:], done.stderr[-4000:])
    return done, folder / "out"

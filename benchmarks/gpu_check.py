"""One prepared GPU check: every GPU claim of the project measured in one call, each stage in its own subprocess.

The GPU machine is lent rarely and briefly and may have no package index, so the check brings what it needs and
never stops at the first broken stage:

    python benchmarks/gpu_check.py --make-wheels .whl     # here, with network: the wheels the GPU image lacks
    python3 benchmarks/gpu_check.py --wheels .whl --out OUT [--budget-s 420] [--stages a,b]   # on the GPU machine
    python benchmarks/gpu_check.py --dry-run --out OUT    # the same stages on the CPU at tiny sizes (a CI test)

`--wheels DIR` installs DIR/*.whl with `pip --no-index --no-deps --target` into the work folder, which every stage
then has on its PYTHONPATH before the repository root. The stages (`STAGES`, one place for each command line) run in
order, each in its own process group under its own deadline: stage i may run until its cumulative share of
`--budget-s` (time a stage leaves unused passes on to the next ones), and a stage with under MIN_STAGE_S left is
skipped. A stage that fails, times out or whose script is missing is logged with its output (the traceback, when
Python raised) and the next stage goes on. OUT gets at most 8 files, rewritten after every stage so that a run cut
short still returns what it measured: summary.md (card, date, versions, a table of the stages and each stage's own
tables), figures.json (every figure the stages wrote, parsed), check.log (every stage's command and output) and the
measured quick profile. Without --out: reports/gpu/<card>-<date>/.

This file uses the standard library alone: it runs under the GPU image's python before the wheels are installed.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Why each wheel is carried: the project needs it (pyproject's dependencies and the exec and dev extras, through
# their own requirements) and the GPU image lacks it. tests/test_gpu_check.py recomputes this list from pyproject.toml
# and GPU_IMAGE_PACKAGES. --make-wheels downloads the versions installed on the machine it runs on (the tested ones).
WHEELS = {
    "simpy": "alisa_sim's engine",
    "pydantic": "alisa_sim's specs",
    "pydantic-core": "pydantic",
    "annotated-types": "pydantic",
    "typing-inspection": "pydantic",
    "typing-extensions": "pydantic needs >= 4.14.1, and the version in the GPU image is not on record",
    "plotly": "alisa_sim's reports",
    "gguf": "alisa_exec's GGUF weights",
}
# In the image, but carried for the version (a carried wheel comes before the image's copy on the PYTHONPATH).
CARRIED_FOR_VERSION = frozenset({"typing-extensions"})
# Project requirements the check goes without on the GPU machine.
NOT_CARRIED = {"kaleido": "PNG export only; reports keep their HTML without it",
               "ruff": "the linter; CI runs it, no stage does"}
# The GPU image's Python packages, as /work/.library/device/KINDS.md lists them (read on a machine running it on
# 2026-11-17; its python3 is 3.12).
GPU_IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
""".split())
# The GPU machine's interpreter and platform, for the wheels and for evaluating requirement markers.
GPU_PYTHON = "3.12"
GPU_MARKERS = {"python_version": GPU_PYTHON, "python_full_version": "3.12.3", "sys_platform": "linux",
               "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
               "extra": ""}
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                   "manylinux1_x86_64")
# The device tool carries at most 64 MiB with the working tree (about 7 MB): the wheels get 40.
WHEELS_MAX_BYTES = 40 * 2**20

GPU_BUDGET_S = 420.0
# A cap, not a target: the dry run takes 1 to 4 minutes on a shared 2-core machine, and its stages' shares of this
# must not cut a slow CPU run short.
DRY_RUN_BUDGET_S = 900.0
MAX_OUT_FILES = 8  # the device tool returns at most 8 files
MIN_STAGE_S = 5.0
LOG_CAP_BYTES = 2**20  # of each stage's output in check.log: its first 64 KiB and its end
OUR_FILES = ("summary.md", "figures.json", "check.log")


@dataclass(frozen=True)
class Stage:
    """One step of the check. Commands are argument lists with placeholders: {python} (this interpreter), {work}
    (the folder stages write to and read from), {card} (the card's slug), {budget} (whole seconds a stage's own
    budget option may use: 80% of its time limit); an argument with '*' is expanded like a shell glob."""

    name: str
    share: float  # of --budget-s
    gpu: tuple[str, ...]
    dry: tuple[str, ...] | None = None  # the --dry-run command; None: the same as on the GPU
    needs: tuple[str, ...] = ()  # files earlier stages must have written, else the stage is skipped
    figures: tuple[str, ...] = ()  # globs of .json / .yaml / JUnit .xml files parsed into figures.json
    tables: tuple[str, ...] = ()  # globs of .md / .txt files appended to summary.md
    keep: tuple[str, ...] = ()  # globs of files copied to the output folder as they are


TINY_MODEL = json.dumps(dict(name="opt-tiny", family="opt", hidden_size=64, num_layers=2, num_heads=2, num_kv_heads=2,
                             ffn_dim=128, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=True,
                             norm_eps=1e-5))
PROFILE = "{work}/{card}-quick.yaml"
# Serial, without the project's addopts (xdist's -n 2): the GPU tests time kernels, and the GPU machine may lack xdist.
PYTEST = ("{python}", "-m", "pytest", "-o", "addopts=", "-q", "-rfE", "-p", "no:cacheprovider")
INSTALL = Stage("install", 0.04, ("{python}", "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                  "--no-cache-dir", "--upgrade", "--target", "{work}/site", "{wheels}/*.whl"))
STAGES = (
    Stage("environment", 0.03, ("{python}", "benchmarks/gpu_check.py", "--environment", "{work}/environment.json",
                                "--require-cuda"),
          dry=("{python}", "benchmarks/gpu_check.py", "--environment", "{work}/environment.json"),
          figures=("environment.json",)),
    Stage("gpu_tests", 0.12, (*PYTEST, "-m", "gpu", "--junitxml", "{work}/gpu_tests.xml"), figures=("gpu_tests.xml",)),
    # The dry run only collects: the CI suite runs these tests on the CPU anyway, under the Triton interpreter.
    Stage("kernel_tests", 0.08, (*PYTEST, "tests/kernels", "--junitxml", "{work}/kernel_tests.xml"),
          dry=(*PYTEST, "tests/kernels", "--collect-only"),
          figures=("kernel_tests.xml",)),
    Stage("kernels", 0.11, ("{python}", "benchmarks/attention_kernels.py", "--out", "{work}/kernels.json"),
          dry=("{python}", "benchmarks/attention_kernels.py", "--smoke", "--out", "{work}/kernels.json"),
          figures=("kernels.json",), tables=("kernels.txt",)),
    Stage("k4_capped", 0.04, ("{python}", "benchmarks/k4_capped.py", "--out", "{work}/k4_capped.json"),
          dry=("{python}", "benchmarks/k4_capped.py", "--smoke", "--out", "{work}/k4_capped.json"),
          figures=("k4_capped.json",), tables=("k4_capped.txt",)),
    Stage("exec_dense", 0.17, ("{python}", "benchmarks/exec_dense.py", "--out", "{work}/exec_dense"),
          dry=("{python}", "benchmarks/exec_dense.py", "--device", "cpu", "--model", TINY_MODEL, "--batches", "1,2",
               "--prompt-len", "16", "--gen-len", "4", "--out", "{work}/exec_dense"),
          figures=("exec_dense/*.json",), tables=("exec_dense/*.md",)),
    Stage("profile", 0.07, ("{python}", "-m", "alisa_exec.cli", "profile", "--device", "cuda", "--quick",
                            "--out", PROFILE),
          dry=("{python}", "-m", "alisa_exec.cli", "profile", "--device", "cpu", "--quick", "--out", PROFILE),
          figures=("{card}-quick.yaml",), keep=("{card}-quick.yaml",)),
    # Relies on cpu_validation.py's --device, --profile (use this profile, measure none) and --points (workloads per
    # policy), besides its --repeats, --out (summary.json, README.md) and --work.
    Stage("validation", 0.10, ("{python}", "benchmarks/cpu_validation.py", "--device", "cuda", "--profile", PROFILE,
                               "--points", "1", "--repeats", "1", "--out", "{work}/validation",
                               "--work", "{work}/validation-runs"),
          dry=("{python}", "benchmarks/cpu_validation.py", "--device", "cpu", "--profile", PROFILE, "--points", "1",
               "--variants", "dense,alisa-0.5-phase-2", "--repeats", "1", "--out", "{work}/validation",
               "--work", "{work}/validation-runs"),
          needs=(PROFILE,), figures=("validation/summary.json",), tables=("validation/README.md",)),
    Stage("exec_policies", 0.24, ("{python}", "benchmarks/exec_policies.py", "--batches", "64",
                                  "--policies", "alisa,flexgen,accelerate", "--budget-s", "{budget}",
                                  "--max-run-s", "60", "--out", "{work}/exec_policies"),
          # The dry run predicts on the profile stage's quick profile (--smoke would measure one more).
          dry=("{python}", "benchmarks/exec_policies.py", "--smoke", "--batches", "2", "--hardware", PROFILE,
               "--policies", "alisa,flexgen,accelerate", "--gen-len", "8", "--budget-s", "{budget}",
               "--out", "{work}/exec_policies"),
          figures=("exec_policies/*.json",), tables=("exec_policies/*.md",)),
)


@dataclass
class Outcome:
    """What one stage did."""

    name: str
    status: str  # ok, failed, timeout, skipped, missing (its script), error (of the check itself)
    seconds: float
    limit_s: float
    command: list[str]
    returncode: int | None = None
    note: str = ""


class CheckError(Exception):
    """Bad input to the check: one message, exit code 2."""


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def gpu_card() -> str | None:
    """The first GPU's name by nvidia-smi (no torch import here), or None without one."""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = done.stdout.strip().splitlines()
    return names[0].strip() if done.returncode == 0 and names else None


def fill(text: str, values: dict[str, str]) -> str:
    """`text` with each {name} placeholder replaced (other braces, as in JSON arguments, stay)."""
    return re.sub(r"\{(\w+)\}", lambda match: values[match.group(1)], text)


def stage_command(stage: Stage, dry_run: bool, values: dict[str, str]) -> list[str]:
    """The stage's argument list with its placeholders filled and its globs expanded."""
    command = []
    for arg in (stage.dry if dry_run and stage.dry is not None else stage.gpu):
        arg = fill(arg, values)
        matches = sorted(glob.glob(arg)) if "*" in arg else []
        command += matches or [arg]
    return command


def missing_script(command: list[str]) -> str | None:
    """The first repository script the command names that is not there."""
    for arg in command[1:]:
        if arg.endswith(".py") and not (REPO / arg).is_file():
            return arg
    return None


def cap(text: str) -> str:
    """A stage's output for check.log: whole up to LOG_CAP_BYTES, else its first 64 KiB and its end."""
    if len(text) <= LOG_CAP_BYTES:
        return text
    head = 64 * 2**10
    return f"{text[:head]}\n[... {len(text) - LOG_CAP_BYTES} characters cut ...]\n{text[-(LOG_CAP_BYTES - head):]}"


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def placeholders(work: Path, card: str, wheels: Path | None) -> dict[str, str]:
    """The values of the stages' placeholders but {budget}, which each stage gets from its time limit."""
    return {"python": sys.executable, "work": str(work), "card": slug(card),
            "wheels": str(wheels.resolve()) if wheels else ""}


def default_sigint() -> None:
    """In a stage's process before its command starts: SIGINT's default action, which an exec keeps, so that Python
    raises KeyboardInterrupt at the stage's deadline even where the check runs with SIGINT ignored (a shell's
    background job ignores it, and its children inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_stage(command: list[str], limit_s: float, env: dict, log_path: Path) -> tuple[str, int | None, str]:
    """Run one command in its own process group, interrupted at `limit_s` (killed 10 s later); what it leaves
    running is killed: (status, exit code, output)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=default_sigint)
        try:
            returncode = process.wait(timeout=limit_s)
            status = "ok" if returncode == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGINT)  # Python then prints where it was (KeyboardInterrupt's traceback)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            returncode, status = None, "timeout"
        try:
            os.killpg(process.pid, signal.SIGKILL)  # the group: the command, if still there, and its children
        except ProcessLookupError:
            pass
        process.wait()
    return status, returncode, log_path.read_text(errors="replace")


def run_check(stages: list[Stage], *, dry_run: bool, budget_s: float, work: Path, values: dict[str, str],
              on_stage=lambda outcome, outcomes, logs: None, min_stage_s: float = MIN_STAGE_S
              ) -> tuple[list[Outcome], dict[str, str]]:
    """Every stage in order under its deadline; after each, `on_stage(outcome, outcomes so far, logs so far)`."""
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(work / "site"), str(REPO),
                                                        os.environ.get("PYTHONPATH")])))
    if dry_run:  # on the CPU even where there is a GPU
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    started = time.monotonic()
    total_share = sum(stage.share for stage in stages)
    outcomes: list[Outcome] = []
    logs: dict[str, str] = {}
    share_so_far = 0.0
    for stage in stages:
        share_so_far += stage.share
        stage_start = time.monotonic()
        limit = started + budget_s * share_so_far / total_share - stage_start
        command: list[str] = []
        stage_values = values | {"budget": str(max(1, int(0.8 * limit)))}
        try:
            command = stage_command(stage, dry_run, stage_values)
            absent = [fill(path, values) for path in stage.needs if not Path(fill(path, values)).exists()]
            script = missing_script(command)
            if limit < min_stage_s:
                outcome = Outcome(stage.name, "skipped", 0.0, limit, command,
                                  note=f"{limit:.0f} s left of its share, under {min_stage_s:.0f} s")
            elif script:
                outcome = Outcome(stage.name, "missing", 0.0, limit, command, note=f"no {script} in this checkout")
            elif absent:
                outcome = Outcome(stage.name, "skipped", 0.0, limit, command,
                                  note=f"needs {', '.join(absent)} from an earlier stage")
            else:
                status, code, output = run_stage(command, limit, env, work / f"{stage.name}.log")
                logs[stage.name] = output
                note = {"ok": "", "failed": last_line(output),
                        "timeout": f"interrupted at its limit of {limit:.0f} s"}[status]
                outcome = Outcome(stage.name, status, time.monotonic() - stage_start, limit, command, code, note)
        except Exception:  # the check's own failure on this stage: logged, and the next stage goes on
            logs[stage.name] = logs.get(stage.name, "") + traceback.format_exc()
            outcome = Outcome(stage.name, "error", time.monotonic() - stage_start, limit, command,
                              note=last_line(logs[stage.name]))
        outcomes.append(outcome)
        print(f"[{time.monotonic() - started:5.0f} s] {outcome.name}: {outcome.status}"
              + (f" ({outcome.note})" if outcome.note else ""), flush=True)
        on_stage(outcome, outcomes, logs)
    return outcomes, logs


def junit_counts(path: Path) -> dict:
    """Test counts and the failing tests' ids from a pytest JUnit XML file (written by our own subprocess)."""
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors",
                                                                               "skipped")}
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def read_figures(path: Path):
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".xml":
        return junit_counts(path)
    import yaml

    return yaml.safe_load(path.read_text())


def stage_files(patterns: tuple[str, ...], work: Path, values: dict[str, str]) -> list[Path]:
    return [Path(p) for pattern in patterns for p in sorted(glob.glob(str(work / fill(pattern, values))))]


def collect(stages: list[Stage], outcomes: list[Outcome], work: Path, values: dict[str, str]
            ) -> tuple[dict, dict[str, list[Path]], list[Path]]:
    """Per stage run so far: its figures parsed (a file that does not parse says why), its tables, the files kept."""
    figures, tables, keep = {}, {}, []
    for stage, outcome in zip(stages, outcomes):
        if outcome.status in ("skipped", "missing"):
            continue
        parsed = {}
        for path in stage_files(stage.figures, work, values):
            try:
                parsed[str(path.relative_to(work))] = read_figures(path)
            except Exception as exc:  # a half-written file of a killed stage
                parsed[str(path.relative_to(work))] = {"unreadable": f"{type(exc).__name__}: {exc}"}
        figures[stage.name] = parsed
        tables[stage.name] = stage_files(stage.tables, work, values)
        keep += stage_files(stage.keep, work, values)
    return figures, tables, keep


def environment_line(env: dict | None) -> str:
    if not env:
        return "environment: not recorded (see the environment stage)"
    card = env.get("card") or "no CUDA device"
    if env.get("memory_bytes"):
        card += (f" ({env['memory_bytes'] / 2**30:.0f} GiB, {env['multiprocessors']} SMs, "
                 f"sm_{env['capability'].replace('.', '')}, driver {env.get('driver') or '?'})")
    return (f"{card}; Python {env['python']}; torch {env['torch']} (CUDA {env['cuda']}); triton {env['triton']}; "
            f"{env['platform']}")


def summary_markdown(meta: dict, environment: dict | None, outcomes: list[Outcome], figures: dict,
                     tables: dict[str, list[Path]]) -> str:
    kind = "dry run on the CPU" if meta["dry_run"] else "GPU check"
    lines = [f"# {kind}: {meta['card']}, {meta['date']}", "",
             environment_line(environment) + ".", "",
             f"`{meta['command']}` at commit {meta['commit'] or 'unknown'}: {meta['elapsed_s']:.0f} s of a "
             f"{meta['budget_s']:.0f} s budget.", "",
             "| stage | status | s | limit s | note |", "|---|---|---|---|---|"]
    for outcome in outcomes:
        note = outcome.note
        for counts in figures.get(outcome.name, {}).values():
            if isinstance(counts, dict) and "failures" in counts:
                note = (f"{counts['tests']} tests: {counts['failures'] + counts['errors']} failed, "
                        f"{counts['skipped']} skipped" + (f"; {note}" if note else ""))
        lines.append(f"| {outcome.name} | {outcome.status} | {outcome.seconds:.0f} | {outcome.limit_s:.0f} | "
                     f"{note.replace('|', '/')} |")
    problems = (environment or {}).get("requirement_problems")
    if problems:
        lines += ["", "Requirements not met: " + "; ".join(problems) + "."]
    for name, paths in tables.items():
        for path in paths:
            text = path.read_text(errors="replace").rstrip()
            lines += ["", f"## {name}: {path.name}", ""]
            lines += ["```text", text, "```"] if path.suffix == ".txt" else [text]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, meta: dict, stages: list[Stage], outcomes: list[Outcome], logs: dict[str, str],
                  work: Path, values: dict[str, str]) -> str:
    """Rewrite the output folder from what the stages have done so far; returns the summary."""
    figures, tables, keep = collect(stages, outcomes, work, values)
    environment = figures.get("environment", {}).get("environment.json")
    environment = environment if isinstance(environment, dict) and "unreadable" not in environment else None
    meta = meta | {"elapsed_s": sum(outcome.seconds for outcome in outcomes)}
    summary = summary_markdown(meta, environment, outcomes, figures, tables)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary)
    (out / "figures.json").write_text(json.dumps({"check": meta, "stages": [asdict(o) for o in outcomes],
                                                  "figures": figures}, indent=1, default=str) + "\n")
    log = []
    for outcome in outcomes:
        log += [f"===== {outcome.name}: {' '.join(outcome.command)}", cap(logs.get(outcome.name, "")).rstrip(),
                f"===== {outcome.name}: {outcome.status}, exit {outcome.returncode}, {outcome.seconds:.1f} s of "
                f"{outcome.limit_s:.0f} s" + (f"; {outcome.note}" if outcome.note else ""), ""]
    (out / "check.log").write_text("\n".join(log))
    for path in keep[:MAX_OUT_FILES - len(OUR_FILES)]:
        shutil.copyfile(path, out / path.name)
    return summary


def git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def select_stages(names: str | None, with_install: bool) -> list[Stage]:
    stages = ([INSTALL] if with_install else []) + list(STAGES)
    if names is None:
        return stages
    wanted = names.split(",")
    unknown = [name for name in wanted if name not in {stage.name for stage in stages}]
    if unknown:
        raise CheckError(f"--stages: no stage {', '.join(unknown)}; the stages are "
                         + ", ".join(stage.name for stage in stages))
    return [stage for stage in stages if stage.name in wanted]


def check(args: argparse.Namespace) -> int:
    if args.budget_s <= 0:
        raise CheckError(f"--budget-s must be positive, got {args.budget_s}")
    if args.wheels is not None and not sorted(args.wheels.glob("*.whl")):
        raise CheckError(f"--wheels {args.wheels}: no .whl files there (make them with --make-wheels {args.wheels})")
    card = "cpu" if args.dry_run else gpu_card()
    if card is None:
        raise CheckError("no NVIDIA GPU here (nvidia-smi lists none): run the check on the GPU machine, or with "
                         "--dry-run on the CPU")
    stages = select_stages(args.stages, args.wheels is not None)
    date = datetime.date.today().isoformat()
    out = args.out or REPO / "reports" / "gpu" / f"{slug(card)}-{date}"
    for folder, what in ((out, "--out"), (args.work, "--work")):
        if folder is not None and folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise CheckError(f"{what} {folder}: not an empty folder; give an empty or a new one")
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    values = placeholders(work, card, args.wheels)
    meta = {"card": card, "date": date, "dry_run": args.dry_run, "budget_s": args.budget_s,
            "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]), "commit": git_commit(),
            "work": str(work)}
    print(f"{'dry run' if args.dry_run else 'GPU check'} on {card}: {len(stages)} stages in {args.budget_s:.0f} s, "
          f"work folder {work}, results in {out}", flush=True)
    summary = ""

    def save(_, outcomes, logs):
        nonlocal summary
        summary = write_outputs(out, meta, stages, outcomes, logs, work, values)

    outcomes, _ = run_check(stages, dry_run=args.dry_run, budget_s=args.budget_s, work=work, values=values,
                            on_stage=save)
    print(summary)
    return 0 if all(outcome.status == "ok" for outcome in outcomes) else 1


def project_requirements() -> list[str]:
    """pyproject.toml's dependencies and its exec and dev extras, less NOT_CARRIED."""
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + extras["exec"] + extras["dev"]
    return [r for r in requirements if canonical(Requirement(r).name) not in NOT_CARRIED]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def walk_requirements(roots: list[str]) -> list[tuple[object, str | None]]:
    """Every requirement reachable from `roots` on the GPU machine's Python (markers evaluated for GPU_MARKERS), each
    with the version installed where this runs (None: not installed). Packages of the GPU image are not followed:
    the image brings what they need."""
    from packaging.requirements import Requirement

    seen, found, todo = set(), [], [Requirement(r) for r in roots]
    while todo:
        requirement = todo.pop(0)
        if requirement.marker is not None and not requirement.marker.evaluate(GPU_MARKERS):
            continue
        name = canonical(requirement.name)
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = None
        found.append((requirement, version))
        if name in seen or name in GPU_IMAGE_PACKAGES or version is None:
            continue
        seen.add(name)
        todo += [Requirement(r) for r in importlib.metadata.requires(name) or []]
    return found


def environment(path: Path, require_cuda: bool) -> int:
    """Write this machine's card, driver and versions, and the project's unmet requirements, as JSON to `path`."""
    import torch
    import triton

    info = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__, "cuda_available": torch.cuda.is_available(),
            "card": None, "driver": None}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {"card": props.name, "capability": f"{props.major}.{props.minor}", "memory_bytes": props.total_memory,
                 "multiprocessors": props.multi_processor_count}
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        info["driver"] = done.stdout.strip().splitlines()[0] if done.returncode == 0 else None
    walked = walk_requirements(project_requirements() + list(WHEELS))
    info["packages"] = {canonical(r.name): version for r, version in walked}
    info["requirement_problems"] = sorted({f"{r} ({version or 'not installed'})" for r, version in walked
                                           if version is None or not r.specifier.contains(version, prereleases=True)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1) + "\n")
    print(environment_line(info))
    for problem in info["requirement_problems"]:
        print(f"requirement not met: {problem}")
    if require_cuda and not info["cuda_available"]:
        print("torch sees no CUDA device", file=sys.stderr)
        return 1
    return 0


def pip_platform_args() -> list[str]:
    return ["--only-binary=:all:", "--python-version", GPU_PYTHON, "--implementation", "cp",
            *(arg for platform_tag in WHEEL_PLATFORMS for arg in ("--platform", platform_tag))]


def make_wheels(folder: Path) -> int:
    """Download WHEELS at the versions installed here for the GPU machine's Python, check that pip accepts the set
    there and that it fits the carry limit."""
    pins = []
    for name in WHEELS:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise CheckError(f"{name} is not installed here, so its tested version is unknown: pip install "
                             "-e '.[exec,dev]' first") from None
    folder.mkdir(parents=True, exist_ok=True)
    print(f"downloading {', '.join(pins)} for CPython {GPU_PYTHON} manylinux x86_64 into {folder}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", *pip_platform_args(), "-d",
                    str(folder), *pins], check=True)
    wanted = {canonical(pin.split("==")[0]): pin.split("==")[1] for pin in pins}
    for wheel in sorted(folder.glob("*.whl")):  # one version of each, or the install stops
        name, version = wheel.name.split("-")[:2]
        if canonical(name) in wanted and version != wanted[canonical(name)]:
            print(f"removing {wheel.name}: another version than {wanted[canonical(name)]}")
            wheel.unlink()
    wheels = sorted(folder.glob("*.whl"))
    with tempfile.TemporaryDirectory() as target:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--no-index", "--no-deps",
                        "--ignore-installed", *pip_platform_args(), "--target", target, *map(str, wheels)], check=True)
    total = sum(wheel.stat().st_size for wheel in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:7.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.2f} MiB in {len(wheels)} wheels (limit {WHEELS_MAX_BYTES / 2**20:.0f} MiB); pip accepts "
          f"them for CPython {GPU_PYTHON}. Carry {folder} with the working tree and run there:\n"
          f"    python3 benchmarks/gpu_check.py --wheels {folder} --out $OUT")
    if total > WHEELS_MAX_BYTES:
        raise CheckError(f"the wheels take {total / 2**20:.1f} MiB, over the {WHEELS_MAX_BYTES / 2**20:.0f} MiB "
                         "they may take of the device tool's 64 MiB carry limit")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--make-wheels", type=Path, metavar="DIR",
                      help="download the wheels the GPU image lacks into DIR (here, with network) and stop")
    mode.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at tiny sizes")
    mode.add_argument("--environment", type=Path, metavar="JSON",
                      help="write this machine's card, driver, versions and unmet requirements as JSON (a stage)")
    parser.add_argument("--require-cuda", action="store_true", help="with --environment: fail without CUDA")
    parser.add_argument("--wheels", type=Path, metavar="DIR", help="install DIR/*.whl for the stages first")
    parser.add_argument("--out", type=Path, help=f"output folder, at most {MAX_OUT_FILES} files "
                        "(default reports/gpu/<card>-<date>)")
    parser.add_argument("--work", type=Path, help="folder the stages write to (default: a new temporary folder)")
    parser.add_argument("--budget-s", type=float, help=f"wall time the stages share (default {GPU_BUDGET_S:.0f}; "
                        f"{DRY_RUN_BUDGET_S:.0f} with --dry-run)")
    parser.add_argument("--stages", help="comma-separated stage names to run (default: all)")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = DRY_RUN_BUDGET_S if args.dry_run else GPU_BUDGET_S
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.make_wheels:
            return make_wheels(args.make_wheels)
        if args.environment:
            return environment(args.environment, args.require_cuda)
        return check(args)
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

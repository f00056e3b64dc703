"""What-if sweeps (`alisa-sim sweep`): a grid of workloads simulated in parallel, streamed into one CSV table.

A sweep file names base workload fields and the axes of a grid (models x hardware x batches x policies x
sparsities); `groups` are sub-grids whose axes replace the top-level ones, the sweep being their union (the ALISA
paper's Fig. 9 pairs some models with one machine and others with another). The sparsity axis sets `kv_sparsity` of
the policies that have it (and of policies this build does not know yet); the others run once.

Every point is one simulation, run in its own worker process: a local process pool or Ray tasks. Rows are appended
to the CSV as points finish; a point whose simulation raised or whose worker died is a `failed` row with the
reason, an out-of-memory run an `oom` row. A rerun skips the points already `ok` or `oom` and retries the failed
ones. When the sweep ends the table is rewritten in grid order, so two runs of one sweep give identical files
whatever the backend and the order points finished in.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, get_args

from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from alisa_sim.errors import SpecError, check_size, load_yaml_file, validate
from alisa_sim.limits import MAX_SWEEP_POINTS
from alisa_sim.results import check_out_folder, write_texts_atomic
from alisa_sim.workload import POLICY_NAMES, BatchSize, KvSparsity, PolicyConfig

COLUMNS = ("point", "status", "model", "hardware", "batch_size", "prompt_len", "gen_len", "policy", "kv_sparsity",
           "policy_params", "throughput_tok_s", "prefill_s", "decode_s", "total_s", "decode_step_mean_s",
           "decode_step_p90_s", "peak_gpu_bytes", "peak_cpu_bytes", "h2d_bytes", "d2h_bytes", "error")
DONE = ("ok", "oom")
SPARSITY_FIELD = "kv_sparsity"
BACKENDS = ("local", "ray")
MAX_BASE_VALUES = 10_000  # a workload holds ~30; every point copies (and hashes) the base


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Grid(_Strict):
    """Axes of a grid; each a list of values (a policy: a name or a mapping of its knobs)."""

    models: list[str | dict] | None = Field(default=None, min_length=1)
    hardware: list[str] | None = Field(default=None, min_length=1)
    batches: list[BatchSize] | None = Field(default=None, min_length=1)
    policies: list[str | dict] | None = Field(default=None, min_length=1)
    sparsities: list[KvSparsity] | None = Field(default=None, min_length=1)


class SweepSpec(Grid):
    name: str | None = None
    base: dict = Field(default_factory=dict, description="workload fields of every point (prompt_len, gen_len, ...)")
    groups: list[Grid] = Field(default_factory=list)


@dataclass(frozen=True)
class Point:
    """One workload of the grid; `id` is a hash of the workload, stable across runs and machines."""

    id: str
    workload: dict


def _policy_fields(name: str) -> set[str] | None:
    """The knobs of a registered policy; None for a name this build does not know."""
    for config in get_args(get_args(PolicyConfig)[0]):
        if get_args(config.model_fields["name"].annotation) == (name,):
            return set(config.model_fields)
    return None


def point_id(workload: dict) -> str:
    return hashlib.sha1(json.dumps(workload, sort_keys=True).encode()).hexdigest()[:12]


def expand(spec: SweepSpec, source: str = "sweep") -> list[Point]:
    """The points of the sweep in grid order (groups in order; axes nested models, hardware, batches, policies,
    sparsities), each once."""
    check_size(spec.base, f"{source}: base", MAX_BASE_VALUES)
    points: dict[str, Point] = {}
    grids = []
    for group in spec.groups or [Grid()]:
        axes = {name: getattr(group, name) or getattr(spec, name) for name in Grid.model_fields}
        for name, field in (("models", "model"), ("hardware", "hardware"), ("batches", "batch_size"),
                            ("policies", "policy")):
            if axes[name] is None:
                if field not in spec.base:
                    raise SpecError(f"{source}: no '{name}' axis and no base.{field}")
                axes[name] = [spec.base[field]]
        grids.append(axes)
    size = sum(math.prod(len(values) for values in axes.values() if values) for axes in grids)
    if size > MAX_SWEEP_POINTS:
        raise SpecError(f"{source}: {size:,} points is past the limit of {MAX_SWEEP_POINTS:,} per sweep")
    for axes in grids:
        for model, hardware, batch, policy in itertools.product(axes["models"], axes["hardware"], axes["batches"],
                                                                axes["policies"]):
            policy = {"name": policy} if isinstance(policy, str) else dict(policy)
            if not isinstance(policy.get("name"), str):
                raise SpecError(f"{source}: a policy needs a name, got {policy}")
            fields = _policy_fields(policy["name"])
            sparse = axes["sparsities"] and (fields is None or SPARSITY_FIELD in fields)
            for sparsity in (axes["sparsities"] if sparse else [None]):
                knobs = policy if sparsity is None else {**policy, SPARSITY_FIELD: sparsity}
                workload = {**spec.base, "model": model, "hardware": hardware, "batch_size": batch, "policy": knobs}
                key = point_id(workload)
                points.setdefault(key, Point(key, workload))
    return list(points.values())


def load_sweep(path: str | Path) -> tuple[SweepSpec, list[Point]]:
    spec = validate(SweepSpec, load_yaml_file(path, "sweep"), str(path))
    points = expand(spec, str(path))
    return spec, points


def unknown_policies(points: list[Point]) -> list[str]:
    """Policy names of the points that this build does not register (their points will be failed rows)."""
    return sorted({p.workload["policy"]["name"] for p in points} - set(POLICY_NAMES))


# ---- one point -------------------------------------------------------------------------------------------------------

def _row(point: Point, status: str, metrics: dict | None = None, error: str = "") -> dict:
    wl, m = point.workload, metrics or {}
    model = wl["model"] if isinstance(wl["model"], str) else wl["model"].get("name", "custom")
    policy = dict(wl["policy"])
    name, sparsity = policy.pop("name"), policy.pop(SPARSITY_FIELD, "")
    step = m.get("decode_step_s", {})
    return {"point": point.id, "status": status, "model": model, "hardware": wl["hardware"],
            "batch_size": wl["batch_size"], "prompt_len": wl.get("prompt_len", ""), "gen_len": wl.get("gen_len", ""),
            "policy": name, "kv_sparsity": sparsity, "policy_params": json.dumps(policy, sort_keys=True) if policy
            else "", "throughput_tok_s": m.get("throughput_tok_s", ""), "prefill_s": m.get("prefill_s", ""),
            "decode_s": m.get("decode_s", ""), "total_s": m.get("total_s", ""),
            "decode_step_mean_s": step.get("mean", ""), "decode_step_p90_s": step.get("p90", ""),
            "peak_gpu_bytes": m.get("peak_gpu_bytes", ""), "peak_cpu_bytes": m.get("peak_cpu_bytes", ""),
            "h2d_bytes": m.get("h2d_bytes", ""), "d2h_bytes": m.get("d2h_bytes", ""),
            "error": " ".join(error.split())}


def failed_row(point: Point, error: str) -> dict:
    return _row(point, "failed", error=error)


def run_point(point: Point, base_dir: str) -> dict:
    """Simulate one point in this process; the table row (failed with the reason when anything raised)."""
    from alisa_sim.results import build_result
    from alisa_sim.simulator import simulate
    from alisa_sim.workload import resolve_workload

    try:
        wl = resolve_workload(point.workload, source=f"point {point.id}", base=Path(base_dir))
        result = build_result(simulate(wl))
    except Exception as exc:  # a crashed point is a row, not a lost sweep
        message = str(exc) if isinstance(exc, SpecError) else f"{type(exc).__name__}: {exc}"
        return failed_row(point, message)
    metrics = result["metrics"]
    if metrics.get("oom"):
        return _row(point, "oom", {key: metrics[key] for key in ("peak_gpu_bytes", "peak_cpu_bytes")},
                    metrics.get("error", ""))
    return _row(point, "ok", metrics)


# ---- backends --------------------------------------------------------------------------------------------------------

def _run_local(points: list[Point], base_dir: str, workers: int, run: Callable) -> Iterator[dict]:
    """A pool of `workers` processes with one point in flight per worker. When a worker dies the pool breaks; the
    points that were in flight are rerun one by one in a fresh one-worker pool, so only the one that kills its
    worker is recorded as failed."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["alisa_sim.sweep"])
    queue = list(reversed(points))
    while queue:
        suspects: list[Point] = []
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            running: dict[cf.Future, Point] = {}
            while queue or running:
                while queue and len(running) < workers:
                    point = queue.pop()
                    running[pool.submit(run, point, base_dir)] = point
                finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                broken = False
                for future in finished:
                    point = running.pop(future)
                    try:
                        yield future.result()
                    except cf.process.BrokenProcessPool:
                        suspects.append(point)
                        broken = True
                if broken:
                    suspects += list(running.values())
                    break
        for point in suspects:
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=context) as alone:
                try:
                    yield alone.submit(run, point, base_dir).result()
                except cf.process.BrokenProcessPool:
                    yield failed_row(point, "the worker process died while simulating this point")


def _run_ray(points: list[Point], base_dir: str, workers: int, run: Callable, address: str | None) -> Iterator[dict]:
    """One Ray task per point (no retries: a failure is a row). Joins the cluster at `address`, or starts a local
    one bound to 127.0.0.1 with `workers` CPUs when none is running."""
    try:
        import ray
    except ImportError:
        raise SpecError("--backend ray needs Ray: pip install 'alisa[ray]'") from None
    started = not ray.is_initialized()
    if started:
        if address:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1")
    try:
        task = ray.remote(num_cpus=1, max_retries=0)(run)
        pending = {task.remote(point, base_dir): point for point in points}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                point = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayError as exc:
                    yield failed_row(point, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    finally:
        if started:
            ray.shutdown()


# ---- the table -------------------------------------------------------------------------------------------------------

def read_table(path: Path) -> dict[str, dict]:
    """Rows of an existing table by point (a partial last line, from a killed run, is skipped)."""
    if not path.exists():
        return {}
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                return {}
            if tuple(header) != COLUMNS:
                raise SpecError(f"{path}: not a sweep table of this version (columns differ); write to another --out")
            return {values[0]: dict(zip(COLUMNS, values)) for values in reader if len(values) == len(COLUMNS)}
    except (UnicodeDecodeError, csv.Error) as exc:
        raise SpecError(f"{path}: not a sweep table ({exc}); write to another --out") from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the sweep table: {exc.strerror or exc}") from None


def _write_sorted(path: Path, rows: list[dict]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_texts_atomic(path.parent, {path.name: text.getvalue()})


def check_table_path(out: Path) -> None:
    """Refuse, before any simulation, a table path that is a folder or whose folder cannot be written."""
    if out.is_dir():
        raise SpecError(f"--out {out} is a folder: give the CSV file to write, e.g. {out / 'sweep.csv'}")
    check_out_folder(out.parent)


@dataclass
class SweepOutcome:
    path: Path
    points: int
    skipped: int  # already done in the table
    counts: dict[str, int]  # status -> rows written this run
    wall_s: float
    failures: list[dict]


def run_sweep(points: list[Point], out: Path, base_dir: str = ".", backend: str = "local", workers: int = 2,
              ray_address: str | None = None, progress: bool = True, run: Callable = run_point) -> SweepOutcome:
    """Simulate the points not yet done in `out`, appending each row as it finishes; then rewrite `out` in grid
    order (rows of points outside this sweep kept after them)."""
    if backend not in BACKENDS:
        raise SpecError(f"unknown backend {backend!r} (known: {', '.join(BACKENDS)})")
    if workers < 1:
        raise SpecError(f"--workers must be at least 1, got {workers}")
    check_table_path(out)
    rows = read_table(out)
    todo = [p for p in points if rows.get(p.id, {}).get("status") not in DONE]
    counts = dict.fromkeys(DONE + ("failed",), 0)
    started = time.perf_counter()
    fresh = not out.exists() or out.stat().st_size == 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _append_rows(out, fresh, todo, rows, counts, base_dir, backend, workers, run, ray_address, progress)
        ids = [p.id for p in points]
        mine = set(ids)
        _write_sorted(out, [rows[i] for i in ids if i in rows] + [r for i, r in rows.items() if i not in mine])
    except OSError as exc:
        kept = out.exists() and bool(read_table(out))
        if fresh and not kept:
            out.unlink(missing_ok=True)  # no complete row made it: leave no empty table behind
        raise SpecError(f"cannot write {out}: {exc.strerror or exc}; "
                        + ("its complete rows are kept, rerun to resume" if kept else "nothing was written")) from None
    failures = [rows[p.id] for p in todo if rows[p.id]["status"] == "failed"]
    return SweepOutcome(out, len(points), len(points) - len(todo), counts, time.perf_counter() - started, failures)


def _append_rows(out: Path, fresh: bool, todo: list[Point], rows: dict[str, dict], counts: dict[str, int],
                 base_dir: str, backend: str, workers: int, run: Callable, ray_address: str | None,
                 progress: bool) -> None:
    """Simulate `todo`, appending each row to `out` (and to `rows`, counted in `counts`) as it finishes."""
    with out.open("a", newline="") as handle:
        if not fresh and not out.read_text().endswith("\n"):
            handle.write("\n")  # after a killed run's partial line
        writer = csv.DictWriter(handle, COLUMNS)
        if fresh:
            writer.writeheader()
        bar = Progress(TextColumn("[bold]sweep[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=Console(stderr=True),
                       disable=not progress)
        with bar:
            task = bar.add_task(f"{backend}", total=len(todo))
            results = (_run_local(todo, base_dir, workers, run) if backend == "local"
                       else _run_ray(todo, base_dir, workers, run, ray_address))
            for row in results:
                writer.writerow(row)
                handle.flush()
                rows[row["point"]] = row
                counts[row["status"]] += 1
                bar.update(task, advance=1, description=f"{backend}: {counts['ok']} ok, {counts['oom']} oom, "
                                                         f"{counts['failed']} failed")


def default_workers() -> int:
    return os.cpu_count() or 1

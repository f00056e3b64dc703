"""Fit a hardware profile's free parameters to measured runs (`alisa-sim calibrate`), and write the fitted copy.

The free parameters (`--params`):

- `host`: seconds added to every GEMM and attention table row, so to every such call: host work a device pays in
  series with its kernels (on a CPU device the eager framework's per-op cost runs on the same cores);
- `launch_overhead`: a multiplier on `gpu.launch_overhead_s`, the per-kernel floor of small ops (a GPU's host
  issues kernels ahead of the device, so there the floor and the device time overlap);
- `gemm`, `attention`, `copy`: multipliers on every GEMM, attention (decode `s` and `gather20_s`, prefill) and
  host<->device copy row's time;
- `elementwise`: a multiplier on memory-bound kernel time (`gpu.hbm_GBps` divided by it).

Before fitting, the GEMM table is resampled on the runs' model shapes: rows are added for their (k, n) at the times
the cost model already gives them, so predictions do not change and a per-call `host` term is added once per call
instead of being scaled by another shape's FLOPs. The fit minimizes, over the measured runs, the squared log ratio
of predicted to measured prefill time and mean decode step time, plus a weak pull of each log multiplier towards 0
(the prior that the measured tables are right), by Nelder-Mead in log space within bounds. A parameter that changes
no prediction of the runs even at the ends of its range (copies in runs without transfers) is not identifiable from
them: it is left alone and the provenance says so. The fitted profile is the base profile with those rows and
overheads changed, `source.kind: fitted`, and the fit (runs, values, errors) in its provenance; check it on runs that
were not used to fit it (`--holdout`). An ALISA run at kv_sparsity > 0 is simulated with its own selection replayed
(`selection_trace`, the measured result itself): which tokens the model attended is not the machine's to fit.

A fit never makes things worse silently: a profile whose error on its own fit runs (the mean absolute error over
every fitted time) is above the base profile's is refused, and a parameter that ends at the edge of its range is
reported as such (the runs ask for more than the range allows: a missing op, not a factor to fit).
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import minimize

from alisa_sim.cost_model import CostModel
from alisa_sim.errors import SpecError, validate
from alisa_sim.hardware import GemmRow, HardwareProfile, Source
from alisa_sim.results import build_result, write_texts_atomic
from alisa_sim.selection_trace import replaying_selection
from alisa_sim.simulator import simulate
from alisa_sim.validate import LoadedResult, describe, percent_error
from alisa_sim.workload import ResolvedWorkload, resolve_workload

PARAMETERS = ("launch_overhead", "host", "gemm", "attention", "elementwise", "copy")
# Largest multiplier each way; the launch overhead of a profile is a guess (5 us) or a tiny-op timing, so it may move
# further than tables measured kernel by kernel.
BOUNDS = {"launch_overhead": 1000.0, "gemm": 20.0, "attention": 20.0, "elementwise": 20.0, "copy": 20.0}
HOST_RANGE_S = (1e-9, 1e-2)  # the host seconds per call searched over (log scale)
HOST_START_S = 1e-5
PRIOR_WEIGHT = 0.05  # residual per unit log multiplier: a 2x change costs as much as a 3.5% misprediction
AT_BOUND_LOG = 0.01  # a fitted value within 1% of an end of its range is at that bound
FIT_METRICS = ("prefill_s", "decode_step_mean_s")
_COPY_FIELDS = ("h2d_pinned_s", "d2h_pinned_s", "h2d_pageable_s", "d2h_pageable_s")


def model_gemm_families(models) -> list[tuple[int, int]]:
    """The (k, n) of every GEMM the models' layers and LM heads run."""
    return sorted({(g.k, g.n) for spec in models for g in spec.layer_gemms(1) + [spec.lm_head_gemm(1)]})


def resampled_gemm_rows(profile: HardwareProfile, families: list[tuple[int, int]]) -> list[GemmRow]:
    """The GEMM table with rows added for the (k, n) families it lacks, over its own m values, at the times the cost
    model gives them (so predictions are unchanged, and a per-call term added to every row is added exactly once to
    every call of these shapes instead of being scaled by another family's FLOPs)."""
    cost = CostModel(profile)
    have = {(row.k, row.n) for row in profile.gpu.gemm_fp16}
    ms = sorted({row.m for row in profile.gpu.gemm_fp16})
    added = [GemmRow(m=m, k=k, n=n, s=cost.gemm_s(m, k, n)) for k, n in families if (k, n) not in have for m in ms]
    return list(profile.gpu.gemm_fp16) + added


def _op_parameter(op: str) -> str:
    """The fit parameter that scales a named op's time: projections the GEMMs, attention paths the attention, copies
    the link, every other op (elementwise, selection, host gathers) the memory-bound kernels."""
    if op in ("project", "project_packed"):
        return "gemm"
    if op.endswith("_attention"):
        return "attention"
    return "copy" if op.startswith("copy_") else "elementwise"


def adjusted_profile(profile: HardwareProfile, values: dict[str, float]) -> HardwareProfile:
    """The profile with its tables and overheads scaled by the multipliers in `values` (missing ones stay 1) and
    `values["host"]` seconds (default 0) added to every GEMM and attention row."""
    f = {name: values.get(name, 1.0) for name in PARAMETERS if name != "host"}
    host = values.get("host", 0.0)
    gpu = profile.gpu
    gpu = gpu.model_copy(update={
        "launch_overhead_s": gpu.launch_overhead_s * f["launch_overhead"],
        "hbm_GBps": gpu.hbm_GBps / f["elementwise"],
        "gemm_fp16": [row.model_copy(update={"s": row.s * f["gemm"] + host}) for row in gpu.gemm_fp16],
        "decode_attention_fp16": [row.model_copy(update={
            "s": row.s * f["attention"] + host,
            "gather20_s": None if row.gather20_s is None else row.gather20_s * f["attention"] + host})
            for row in gpu.decode_attention_fp16],
        "prefill_attention_fp16": [row.model_copy(update={"s": row.s * f["attention"] + host})
                                   for row in gpu.prefill_attention_fp16],
        # The named-op rows the cost model prices ops from, scaled as the tables they stand for.
        "ops": [row.model_copy(update={"s": row.s * f[_op_parameter(row.op)] + (host if _op_parameter(row.op) in
                                                                                 ("gemm", "attention") else 0.0),
                                       "host_s": row.host_s * f["launch_overhead"]}) for row in gpu.ops],
    })
    link = profile.link.model_copy(update={"copies": [
        row.model_copy(update={name: getattr(row, name) * f["copy"] for name in _COPY_FIELDS})
        for row in profile.link.copies]})
    return profile.model_copy(update={"gpu": gpu, "link": link})


def _to_value(name: str, x: float) -> float:
    return HOST_START_S * math.exp(x) if name == "host" else math.exp(x)


def _bounds(name: str) -> tuple[float, float]:
    if name == "host":
        return tuple(math.log(v / HOST_START_S) for v in HOST_RANGE_S)
    return -math.log(BOUNDS[name]), math.log(BOUNDS[name])


def run_metrics(result: dict) -> dict[str, float] | None:
    """The fitted metrics of a Result; None when it ran out of memory."""
    m = result["metrics"]
    if m.get("oom"):
        return None
    values = {"prefill_s": m["prefill_s"]}
    if m["decode_step_s"]["mean"] > 0:
        values["decode_step_mean_s"] = m["decode_step_s"]["mean"]
    return values


@dataclass
class Run:
    """A measured run and its workload, resolved against the profile being fitted."""

    measured: LoadedResult
    workload: ResolvedWorkload
    targets: dict[str, float]

    @property
    def name(self) -> str:
        return describe(self.measured.data["workload"])

    def predict(self, profile: HardwareProfile) -> dict[str, float]:
        wl = ResolvedWorkload(self.workload.workload, self.workload.model, profile)
        predicted = run_metrics(build_result(simulate(wl)))
        if predicted is None:
            raise SpecError(f"{self.measured.path}: the simulator runs out of memory on this measured run with "
                            f"profile {profile.name}")
        return predicted

    def errors_pct(self, profile: HardwareProfile) -> dict[str, float]:
        predicted = self.predict(profile)
        return {name: percent_error(predicted[name], value) for name, value in self.targets.items()}


def prepare_runs(measured: list[LoadedResult], hardware: str) -> list[Run]:
    """Measured runs (source exec, not out of memory) with their workloads resolved on the base profile."""
    runs = []
    for result in measured:
        if result.source != "exec":
            raise SpecError(f"{result.path}: calibration fits measured results (source exec), this one is "
                            f"{result.source!r}")
        targets = run_metrics(result.data)
        if targets is None:
            raise SpecError(f"{result.path}: a run that ran out of memory has no times to fit")
        # the run's own selection is replayed: the fit is of the machine's times, not of what the model attended
        wl = resolve_workload(replaying_selection(result.data["workload"], Path(result.path).resolve()),
                              source=result.path, hardware=hardware)
        runs.append(Run(result, wl, targets))
    return runs


@dataclass
class Calibration:
    base: HardwareProfile  # the profile fitted, its GEMM table resampled on the runs' shapes
    values: dict[str, float]  # fitted multipliers, and "host" in seconds
    inert: list[str]  # parameters the runs cannot identify (left alone)
    fit_runs: list[Run]
    fit_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # run name -> metric -> error, after
    base_errors: dict[str, dict[str, float]] = field(default_factory=dict)  # the same with the base profile
    evaluations: int = 0
    at_bound: dict[str, str] = field(default_factory=dict)  # fitted parameter -> "lower" | "upper" end of its range

    @property
    def profile(self) -> HardwareProfile:
        return adjusted_profile(self.base, self.values)


def _residuals(runs: list[Run], profile: HardwareProfile) -> list[float]:
    out = []
    for run in runs:
        predicted = run.predict(profile)
        out += [math.log(predicted[name] / value) for name, value in run.targets.items()]
    return out


def _inert(runs: list[Run], base: HardwareProfile, name: str) -> bool:
    """True when the parameter at either end of its range changes no prediction of the runs."""
    reference = [run.predict(base) for run in runs]
    for x in _bounds(name):
        profile = adjusted_profile(base, {name: _to_value(name, x)})
        for run, ref in zip(runs, reference):
            predicted = run.predict(profile)
            if any(not math.isclose(predicted[key], value, rel_tol=1e-9) for key, value in ref.items()):
                return False
    return True


def calibrate(runs: list[Run], base: HardwareProfile, parameters: tuple[str, ...] = PARAMETERS,
              shapes_of: list[Run] = (), max_evaluations: int = 400) -> Calibration:
    """Fit `parameters` to the runs (see the module docstring). The GEMM table is first resampled on the shapes of
    the runs' models and of `shapes_of` (the held-out runs: their shapes, not their times)."""
    if not runs:
        raise SpecError("calibration needs at least one measured run")
    families = model_gemm_families([run.workload.model for run in list(runs) + list(shapes_of)])
    base = base.model_copy(update={"gpu": base.gpu.model_copy(update={
        "gemm_fp16": resampled_gemm_rows(base, families)})})
    inert = [name for name in parameters if _inert(runs, base, name)]
    free = [name for name in parameters if name not in inert]
    calibration = Calibration(base, {}, inert, runs)

    def values(x) -> dict[str, float]:
        return {name: _to_value(name, v) for name, v in zip(free, x)}

    if free:
        priors = np.array([0.0 if name == "host" else PRIOR_WEIGHT for name in free])

        def objective(x):
            calibration.evaluations += 1
            data = _residuals(runs, adjusted_profile(base, values(x)))
            return float(np.sum(np.square(data)) + np.sum(np.square(priors * x)))

        # The launch floor starts well above a tiny-op timing: it shows in predictions only where it binds, so from
        # below the simplex would see no slope in it.
        x0 = np.array([math.log(4.0) if name == "launch_overhead" else 0.0 for name in free])
        simplex = np.vstack([x0] + [x0 + math.log(3.0) * np.eye(len(free))[i] for i in range(len(free))])
        best = minimize(objective, x0, method="Nelder-Mead", bounds=[_bounds(name) for name in free],
                        options={"initial_simplex": simplex, "maxfev": max_evaluations, "xatol": 1e-3,
                                 "fatol": 1e-6})
        calibration.values = values(best.x)
        for name, x in zip(free, best.x):
            low, high = _bounds(name)
            if x <= low + AT_BOUND_LOG or x >= high - AT_BOUND_LOG:
                calibration.at_bound[name] = "lower" if x <= low + AT_BOUND_LOG else "upper"
    calibration.fit_errors = {run.name: run.errors_pct(calibration.profile) for run in runs}
    calibration.base_errors = {run.name: run.errors_pct(base) for run in runs}
    return calibration


def mape(errors: dict[str, dict[str, float]], metric: str) -> float | None:
    values = [abs(e[metric]) for e in errors.values() if metric in e]
    return sum(values) / len(values) if values else None


def overall_mape(errors: dict[str, dict[str, float]]) -> float | None:
    """Mean absolute error in percent over every fitted time of every run."""
    values = [abs(e) for run in errors.values() for e in run.values()]
    return sum(values) / len(values) if values else None


def describe_values(values: dict[str, float], at_bound: dict[str, str] | None = None) -> str:
    at_bound = at_bound or {}
    return ", ".join((f"host +{v * 1e6:.3g} us per GEMM/attention call" if name == "host" else f"{name} x{v:.3g}")
                     + (f" (at its {at_bound[name]} bound)" if name in at_bound else "")
                     for name, v in values.items()) or "none"


def refuse_if_worse(calibration: Calibration) -> None:
    """SpecError when the fitted profile predicts its own fit runs worse than the base profile does."""
    before, after = overall_mape(calibration.base_errors), overall_mape(calibration.fit_errors)
    if before is not None and after > before:
        count = sum(len(run) for run in calibration.fit_errors.values())
        raise SpecError(f"calibration made its own fit runs worse: error over their {count} fitted times "
                        f"{before:.1f}% with the base profile, {after:.1f}% fitted "
                        f"({describe_values(calibration.values, calibration.at_bound)}); no profile written. "
                        "Fit fewer parameters (--params) or check the measured runs.")


def check_disjoint(fit: list[LoadedResult], holdout: list[LoadedResult]) -> None:
    """Held-out runs must not be fit runs (the same file, or the same measurement by content)."""
    paths = {Path(r.path).resolve() for r in fit}
    contents = {json.dumps(r.data["metrics"], sort_keys=True) for r in fit}
    for result in holdout:
        if Path(result.path).resolve() in paths or json.dumps(result.data["metrics"], sort_keys=True) in contents:
            raise SpecError(f"{result.path} is both a fit run and a held-out run: hold out runs that were not fitted")


def fitted_profile_data(calibration: Calibration, name: str, holdout_errors: dict | None) -> dict:
    """The fitted profile as a YAML mapping: the base profile's, with the scaled tables and the fit's provenance."""
    base, m = calibration.base, calibration.values
    profile = calibration.profile
    data = profile.model_dump(mode="json")
    fit_text = describe_values(m, calibration.at_bound)
    if "launch_overhead" in m:
        fit_text += f" (launch_overhead_s {base.gpu.launch_overhead_s:.3g} -> {profile.gpu.launch_overhead_s:.3g})"
    runs = "; ".join(f"{run.name} ({run.measured.path})" for run in calibration.fit_runs)
    summary = ", ".join(f"{metric} MAPE {mape(calibration.base_errors, metric):.1f}% -> "
                        f"{mape(calibration.fit_errors, metric):.1f}%" for metric in FIT_METRICS
                        if mape(calibration.fit_errors, metric) is not None)
    notes = [f"fitted by alisa-sim calibrate on {len(calibration.fit_runs)} measured runs: {runs}",
             f"fitted: {fit_text}; fit-set errors: {summary}",
             "GEMM table resampled first: rows added for the (k, n) of the runs' models at the base profile's "
             "interpolated times, so a per-call host term is added once per call"]
    if calibration.at_bound:
        notes.append("at the end of their range (the runs ask for more; a missing op, not a factor): "
                     + ", ".join(f"{name} ({end} bound)" for name, end in calibration.at_bound.items()))
    if calibration.inert:
        notes.append(f"not identifiable from these runs (no effect on their predictions), left alone: "
                     f"{', '.join(calibration.inert)}")
    if holdout_errors:
        held = ", ".join(f"{metric} MAPE {mape(holdout_errors, metric):.1f}%" for metric in FIT_METRICS
                         if mape(holdout_errors, metric) is not None)
        notes.append(f"held-out runs: {held} over " + "; ".join(holdout_errors))
    data["name"] = name
    data["description"] = f"{base.description} -- fitted to measured runs by alisa-sim calibrate"
    data["provenance"] = {**data["provenance"], "date": datetime.date.today().isoformat(),
                          "method": f"alisa-sim calibrate from profile {base.name}: {base.provenance.method}",
                          "notes": list(base.provenance.notes) + notes}
    gpu_fitted = {"launch_overhead", "host", "gemm", "attention", "elementwise"} & set(m)
    if gpu_fitted:
        data["gpu"]["source"] = Source(kind="fitted", note=(
            f"{base.gpu.source.note} -- then fitted ({', '.join(sorted(gpu_fitted))}; see provenance)")).model_dump()
    if "copy" in m:
        data["link"]["source"] = Source(kind="fitted", note=(
            f"{base.link.source.note} -- then fitted (copy times x{m['copy']:.3g}; see provenance)")).model_dump()
    validate(HardwareProfile, data, f"fitted profile {name}")
    return data


def write_profile_yaml(data: dict, path: Path, header: str = "Fitted by `alisa-sim calibrate` from measured runs; "
                       "see provenance. Re-fit rather than edit.") -> Path:
    """Write a profile YAML whole or not at all, a `# header` line first and table rows one per line (the fitted
    profiles here, the measured ones of `alisa-exec profile`)."""
    text = f"# {header}\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    write_texts_atomic(path.parent, {path.name: text})
    return path

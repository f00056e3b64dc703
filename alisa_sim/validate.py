"""Predicted versus measured: pair simulator Results with executor Results of the same workload and policy and
measure the error of each metric (`alisa-sim validate`).

Results are told apart by their `source` ("sim" predicted, "exec" measured), so the order of the files does not
matter. Two Results pair when their echoed workloads agree on everything but `hardware` (a prediction made with a
fitted copy of the measured machine's profile still pairs with the measurement). Errors are in percent:
100 x (predicted - measured) / measured; MAPE is the mean of their absolute values over the pairs, `worst` the
largest absolute one.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from alisa_sim.errors import SpecError
from alisa_sim.units import result_on_cpu_device

# Metric name -> (label, how to read it from a Result's metrics).
METRICS: dict[str, tuple[str, Callable[[dict], float]]] = {
    "prefill_s": ("prefill", lambda m: m["prefill_s"]),
    "decode_step_mean_s": ("mean decode step", lambda m: m["decode_step_s"]["mean"]),
    "total_s": ("total", lambda m: m["total_s"]),
    "throughput_tok_s": ("throughput", lambda m: m["throughput_tok_s"]),
    "peak_gpu_bytes": ("peak GPU memory", lambda m: m["peak_gpu_bytes"]),
}


@dataclass(frozen=True)
class LoadedResult:
    path: str
    data: dict

    @property
    def source(self) -> str:
        return self.data["source"]

    @property
    def oom(self) -> bool:
        return bool(self.data["metrics"].get("oom"))


def result_files(paths: list[str | Path]) -> list[Path]:
    """The Result JSON files named: files as given, folders searched for result.json (recursively, sorted)."""
    files: list[Path] = []
    for ref in paths:
        path = Path(ref)
        if path.is_dir():
            found = sorted(path.rglob("result.json"))
            if not found:
                raise SpecError(f"{path}: no result.json in this folder")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise SpecError(f"result file not found: {path}")
    return files


def load_result(path: Path) -> LoadedResult:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("source") not in ("sim", "exec") \
            or not isinstance(data.get("workload"), dict) or not isinstance(data.get("metrics"), dict):
        raise SpecError(f"{path}: not a Result JSON (needs 'source' sim|exec, a 'workload' and 'metrics' mapping)")
    return LoadedResult(str(path), data)


def load_results(paths: list[str | Path]) -> list[LoadedResult]:
    return [load_result(path) for path in result_files(paths)]


def pair_key(result: LoadedResult) -> str:
    """What a prediction and a measurement must share: the workload, policy included, less the hardware and the
    selection trace a prediction replays (the measurement's own, typically)."""
    workload = {key: value for key, value in result.data["workload"].items() if key != "hardware"}
    if isinstance(workload.get("policy"), dict):
        workload["policy"] = {key: value for key, value in workload["policy"].items() if key != "selection_trace"}
    return json.dumps(workload, sort_keys=True)


def describe(workload: dict) -> str:
    """A short name of a workload: model, batch, prompt and generated lengths, policy."""
    model = workload["model"]
    name = model.get("name", "model") if isinstance(model, dict) else Path(str(model)).stem
    return (f"{name} b={workload['batch_size']} s={workload['prompt_len']} n={workload['gen_len']} "
            f"{workload['policy']['name']}")


def pair_results(results: list[LoadedResult]) -> tuple[list[tuple[LoadedResult, LoadedResult]], list[LoadedResult]]:
    """(predicted, measured) pairs, one per measured run (repeated measurements share a prediction), and the Results
    nothing paired with."""
    predicted: dict[str, LoadedResult] = {}
    for result in results:
        if result.source == "sim":
            other = predicted.setdefault(pair_key(result), result)
            if other is not result:
                raise SpecError(f"two predictions of the same workload and policy: {other.path} and {result.path} "
                                "(validate one hardware profile at a time)")
    pairs, unpaired, used = [], [], set()
    for result in results:
        if result.source != "exec":
            continue
        key = pair_key(result)
        if key in predicted:
            pairs.append((predicted[key], result))
            used.add(key)
        else:
            unpaired.append(result)
    unpaired += [result for key, result in predicted.items() if key not in used]
    return pairs, unpaired


def percent_error(predicted: float, measured: float) -> float:
    return 100.0 * (predicted - measured) / measured


def compare(predicted: LoadedResult, measured: LoadedResult) -> dict:
    """One pair: each metric's predicted and measured value and error (None where a side lacks it, measured 0, or
    either run was out of memory)."""
    metrics = {}
    for name, (_, read) in METRICS.items():
        values = []
        for result in (predicted, measured):
            try:
                values.append(None if result.oom else float(read(result.data["metrics"])))
            except (KeyError, TypeError):
                values.append(None)
        pred, meas = values
        error = percent_error(pred, meas) if pred is not None and meas else None
        metrics[name] = {"predicted": pred, "measured": meas, "error_pct": error}
    return {"label": measured.data.get("label") or predicted.data.get("label"),
            "breakdown_s": compare_breakdown(predicted, measured),
            "workload": describe(measured.data["workload"]), "policy": measured.data["workload"]["policy"]["name"],
            "predicted": predicted.path, "measured": measured.path,
            "hardware": {"predicted": predicted.data.get("hardware"), "measured": measured.data.get("hardware")},
            "device": measured.data.get("device"), "cpu_device": result_on_cpu_device(measured.data),
            "oom": {"predicted": predicted.oom, "measured": measured.oom}, "metrics": metrics}


# The executor times spans of one kind each (a projection span holds its norm, rotary and activation), the
# simulator splits an op's time by the kinds of its parts: those two kinds compare only summed.
COMPARED_KINDS = {"gemm": "gemm+elementwise", "elementwise": "gemm+elementwise"}


def compare_breakdown(predicted: LoadedResult, measured: LoadedResult) -> dict:
    """Where a pair's run time goes: seconds by op kind (`breakdown_s`: busy time by kind, and idle, the compute
    track waiting for copies or the host; `COMPARED_KINDS` summed), predicted and measured, for the kinds either
    side spent time on; none where a side was out of memory or has no breakdown."""
    if predicted.oom or measured.oom:
        return {}
    sides = [defaultdict(float), defaultdict(float)]
    for side, result in zip(sides, (predicted, measured)):
        for kind, seconds in (result.data.get("breakdown_s") or {}).items():
            side[COMPARED_KINDS.get(kind, kind)] += seconds
    if not all(sides):
        return {}
    kinds = [kind for kind in dict.fromkeys([*sides[1], *sides[0]]) if sides[0].get(kind) or sides[1].get(kind)]
    return {kind: {"predicted": sides[0][kind], "measured": sides[1][kind],
                   "error_pct": percent_error(sides[0][kind], sides[1][kind]) if sides[1][kind] else None}
            for kind in kinds}


def summarize_breakdown(pairs: list[dict]) -> dict:
    """Per op kind over the pairs: predicted and measured seconds summed, their ratio, and the MAPE of the pairs
    that measured time there (which kind of op the profile misprices, and which way)."""
    kinds = dict.fromkeys(kind for pair in pairs for kind in pair["breakdown_s"])
    summary = {}
    for kind in kinds:
        rows = [pair["breakdown_s"][kind] for pair in pairs if kind in pair["breakdown_s"]]
        predicted, measured = sum(r["predicted"] for r in rows), sum(r["measured"] for r in rows)
        errors = [abs(r["error_pct"]) for r in rows if r["error_pct"] is not None]
        summary[kind] = {"predicted_s": predicted, "measured_s": measured,
                         "ratio": predicted / measured if measured else None,
                         "mape": sum(errors) / len(errors) if errors else None, "pairs": len(rows)}
    return summary


def pair_name(pair: dict) -> str:
    """A pair as rows and points name it: its run label (when the Results have one) and the workload."""
    return f"{pair['label']}: {pair['workload']}" if pair.get("label") else pair["workload"]


def summarize(pairs: list[dict]) -> dict:
    """Per metric: MAPE and the worst absolute error (percent) over the pairs that have it, and which pair that is."""
    summary = {}
    for name in METRICS:
        errors = [(abs(p["metrics"][name]["error_pct"]), i) for i, p in enumerate(pairs)
                  if p["metrics"][name]["error_pct"] is not None]
        if errors:
            worst, index = max(errors)
            summary[name] = {"mape": sum(e for e, _ in errors) / len(errors), "worst": worst,
                             "worst_pair": pair_name(pairs[index]), "pairs": len(errors)}
        else:
            summary[name] = {"mape": None, "worst": None, "worst_pair": None, "pairs": 0}
    return summary


def validate(results: list[LoadedResult]) -> tuple[dict, list[tuple[LoadedResult, LoadedResult]], list[LoadedResult]]:
    """The validation document {"pairs": [...], "summary": {metric: {"mape", "worst", ...}}, "breakdown": {kind:
    {"predicted_s", "measured_s", "ratio", "mape", ...}}}, the pairs and the Results left unpaired. No pair at all
    is an input error."""
    pairs, unpaired = pair_results(results)
    if not pairs:
        sources = {r.source for r in results}
        hint = ("give both predicted (alisa-sim run) and measured (alisa-exec run) results" if len(sources) < 2 else
                "no prediction has the same workload and policy as a measurement")
        raise SpecError(f"nothing to validate: {hint}")
    compared = [compare(pred, meas) for pred, meas in pairs]
    document = {"pairs": compared, "summary": summarize(compared), "breakdown": summarize_breakdown(compared),
                "unpaired": [r.path for r in unpaired],
                "oom_mismatches": sum(p["oom"]["predicted"] != p["oom"]["measured"] for p in compared),
                "errors": "percent: 100 x (predicted - measured) / measured"}
    return document, pairs, unpaired

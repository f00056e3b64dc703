"""Builds hw_profiles/*.yaml: measured profiles from microbenchmark JSONs, derived ones for the paper's and FlexGen's GPUs."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from scipy.optimize import least_squares

from alisa_sim.cost_model import causal_attention_flops, decode_kv_bytes, derived_op_rows
from alisa_sim.errors import validate
from alisa_sim.hardware import HardwareProfile

MEASUREMENTS_DIR = Path(__file__).resolve().parent.parent / "hw_profiles" / "measurements"  # copies of shared/measurements
H200_MEASUREMENTS = "h200-microbench-2026-11-26.json"
H100_MEASUREMENTS = "h100-microbench-2026-11-26.json"

GiB = 2**30
GB = 10**9

# Not in the measurement files: the host time to issue one kernel from eager PyTorch is typically ~5 us.
LAUNCH_OVERHEAD_S = 5e-6
LAUNCH_OVERHEAD_NOTE = ("launch_overhead_s = 5e-6 is not measured: a typical eager-PyTorch host cost per kernel launch; "
                        "calibrate with alisa-exec profile")
# Derived values are estimates: 4 significant digits keep them readable and stable across numpy/scipy versions.
DERIVED_DIGITS = 4


@dataclass(frozen=True)
class GpuDatasheet:
    name: str
    memory_bytes: int
    peak_fp16_tflops: float  # dense fp16 tensor-core peak (no structured sparsity)
    memory_GBps: float  # DRAM bandwidth


@dataclass(frozen=True)
class HostEstimate:
    """A host CPU we have not measured: figures estimated from its spec sheet."""

    name: str
    cores: int
    memory_bytes: int
    memcpy_GBps: float  # single stream, read + write
    copy_GBps: float  # multi-threaded, read + write
    gemm_tflops: dict[str, float]


# ---- derivation constants (datasheets and the papers' settings) -----------------------------------------------------
# H100 SXM5 80 GB: 989.4 TFLOPS dense fp16 tensor, 3.35 TB/s HBM3. Only used to calibrate the roofline efficiencies
# against the measured H100 rows (the measured machine's 2619 MHz memory clock is the SXM5 part).
H100_SXM = GpuDatasheet("NVIDIA H100 80GB HBM3 (SXM5)", 80 * GiB, 989.4, 3350.0)
# V100 SXM2 32 GB: 125 TFLOPS fp16 tensor, 900 GB/s HBM2 (the ALISA paper's smaller GPU).
V100_SXM2 = GpuDatasheet("NVIDIA V100 SXM2 32GB", 32 * GiB, 125.0, 900.0)
# T4 16 GB: 65 TFLOPS fp16 tensor, 320 GB/s GDDR6 (FlexGen's published GCP setting).
T4 = GpuDatasheet("NVIDIA T4 16GB", 16 * GiB, 65.0, 320.0)
# The ALISA paper's CPU-GPU link and host memory (both its H100 and V100 settings).
PAPER_LINK_GBps = 20.0
PAPER_HOST_MEMORY_BYTES = 128 * GB
# FlexGen's hardware constants for its T4 machine, as its authors fitted them: FlexGen's cost_model.py,
# `CostModelConfig`, "default value aligned on google cloud T4". FlexGen's units (flexgen/utils.py): GB = 1 << 30 bytes,
# T = 1e12. In FlexGen's cost model the two attention "FLOPS" divide byte counts: bmm_flops_g and cpu_flops divide
# 4 * bls * L * h1, which is both the decode attention FLOPs and the fp16 K + V bytes read (1 FLOP per fp16 KV byte).
FLEXGEN_GB = 1 << 30
FLEXGEN_T = 1e12
FLEXGEN_T4 = {
    "ctog_bdw": 12.89 * FLEXGEN_GB,  # CPU -> GPU
    "gtoc_bdw_cache": 0.97 * FLEXGEN_GB,  # GPU -> CPU of KV-cache slices (strided stores into the CPU cache)
    "gtoc_bdw_hidden": 4.82 * FLEXGEN_GB,  # GPU -> CPU contiguous (activations)
    "mm_flops_p": 21.24 * FLEXGEN_T,  # GEMM in the prefill
    "mm_flops_g": 4.3 * FLEXGEN_T,  # GEMM in decode (m = GPU batch size)
    "bmm_flops_p": 9.97 * FLEXGEN_T,  # prefill attention, FLOPs counted over the full L x L matrix (4 b L^2 h1)
    "bmm_flops_g": 0.079 * FLEXGEN_T,  # decode attention on the GPU: 79e9 fp16 KV bytes per second
    "cpu_flops": 0.0123 * FLEXGEN_T,  # decode attention on the CPU (fp32 math on the fp16 cache): 12.3e9 fp16 KV B/s
}
FLEXGEN_T4_SOURCE = "FlexGen's cost_model.py, CostModelConfig, \"default value aligned on google cloud T4\""
# Ours, not FlexGen's: the GEMM rate is mm_flops_g up to this many rows (decode GEMMs have m = GPU batch size),
# mm_flops_p from the second bound on (prefill GEMMs have m = batch x prompt tokens), a power law in between.
T4_DECODE_GEMM_MAX_M = 256
T4_PREFILL_GEMM_MIN_M = 2048
# FlexGen's host, a GCP n1-highmem-32 (32 vCPUs = 16 Skylake cores at ~2.0 GHz, 208 GB). Estimates, not measurements:
# fp32 GEMM ~60% of the 2.0 TFLOPS AVX-512 peak; no native bf16 on Skylake, so bf16 runs slower than fp32;
# memory figures a little under the measured 16-core H100 host's (22 GB/s memcpy, 59 GB/s copy) for older DDR4.
N1_HIGHMEM_32 = HostEstimate("GCP n1-highmem-32 (32 vCPUs, Intel Skylake; estimated)", 32, 208 * GB,
                             memcpy_GBps=16.0, copy_GBps=40.0, gemm_tflops={"float32": 1.2, "bfloat16": 0.5})
# The measured hosts (16 cores, 128 GiB each; from the measurements README, not in the JSON files).
MEASURED_HOST_CORES = 16
MEASURED_HOST_MEMORY_BYTES = 128 * GiB


class _Row(dict):
    """A table row, written as one flow-style YAML line."""


class _ProfileDumper(yaml.SafeDumper):
    pass


_ProfileDumper.add_representer(
    _Row, lambda dumper, row: dumper.represent_mapping("tag:yaml.org,2002:map", row, flow_style=True))


def _significant(value: float, digits: int = DERIVED_DIGITS) -> float:
    return float(f"{value:.{digits - 1}e}")


# ---- measured profiles ----------------------------------------------------------------------------------------------

def _bidirectional_factor(pcie: dict) -> float:
    """Per-direction bandwidth with both directions busy, as a share of one-way pinned bandwidth at that size."""
    size = pcie["bidir_bytes_each_way"]
    row = next((r for r in pcie["rows"] if r["bytes"] == size), None)
    if row is None:
        raise ValueError(f"no one-way PCIe row of {size} bytes to compare the bidirectional run with")
    one_way_s = (row["h2d_pinned_s"] + row["d2h_pinned_s"]) / 2
    return min(1.0, one_way_s / pcie["bidir_s"])


def from_microbench(json_path: str | Path, *, cpu_cores: int = MEASURED_HOST_CORES,
                    cpu_memory_bytes: int = MEASURED_HOST_MEMORY_BYTES) -> dict:
    """A measured profile from one microbenchmark JSON (see /work/shared/measurements/README.md)."""
    json_path = Path(json_path)
    bench = json.loads(json_path.read_text())
    measured = {"kind": "measured"}
    gpu_name = bench["gpu"]["name"]
    decode_rows = [r for r in bench["attention_fp16"] if r["kind"] == "decode"]
    prefill_rows = [r for r in bench["attention_fp16"] if r["kind"] == "prefill"]
    profile = {
        "name": json_path.name.split("-microbench")[0],
        "description": f"measured: {bench['machine']}",
        "provenance": {
            "machine": bench["machine"],
            "date": bench["date"],
            "method": bench["how"],
            "measurements_file": json_path.name,
            "software": dict(bench["software"]),
            "notes": [LAUNCH_OVERHEAD_NOTE,
                      f"CPU cores ({cpu_cores}) and memory ({cpu_memory_bytes} bytes) from the measurements README"],
        },
        "gpu": {
            "source": {**measured, "note": (f"{gpu_name}: memory_bytes as the benchmark reports it, hbm_GBps from a "
                                            "2 GiB device-to-device copy (read + write), GEMM torch.matmul, attention "
                                            f"torch SDPA; {LAUNCH_OVERHEAD_NOTE}")},
            "name": gpu_name,
            "memory_bytes": bench["gpu"]["memory_bytes"],
            "hbm_GBps": bench["hbm_copy"]["GBps_rw"],
            "peak_fp16_tflops": bench["gemm_fp16"]["peak_tflops"],
            "launch_overhead_s": LAUNCH_OVERHEAD_S,
            "gemm_fp16": [_Row(m=r["m"], k=r["k"], n=r["n"], s=r["s"]) for r in bench["gemm_fp16"]["rows"]],
            "decode_attention_fp16": [_Row(b=r["b"], L=r["L"], H=r["H"], D=r["D"], s=r["s"],
                                           gather20_s=r["gather20_s"]) for r in decode_rows],
            "prefill_attention_fp16": [_Row(b=r["b"], L=r["L"], H=r["H"], D=r["D"], s=r["s"]) for r in prefill_rows],
        },
        "link": {
            "source": {**measured, "note": ("pinned and pageable H2D/D2H by transfer size; bidirectional_factor = "
                                            "one-way pinned time / time with both directions at once "
                                            f"({bench['pcie']['bidir_bytes_each_way']} bytes each way)")},
            "name": "PCIe gen5 x16",
            "copies": [_Row(r) for r in bench["pcie"]["rows"]],
            "bidirectional_factor": _bidirectional_factor(bench["pcie"]),
        },
        "cpu": {
            "source": {**measured, "note": ("torch on 16 threads: memcpy single stream, copy multi-threaded (both "
                                            "read + write), GEMM rate by dtype, fp32 decode attention")},
            "name": f"host of the {gpu_name} machine ({cpu_cores} cores, VM)",
            "cores": cpu_cores,
            "memory_bytes": cpu_memory_bytes,
            "memcpy_GBps": bench["cpu"]["memcpy_GBps_rw"],
            "copy_GBps": bench["cpu"]["torch_copy_GBps_rw"],
            "gemm_tflops": {g["dtype"].removeprefix("torch."): g["tflops"] for g in bench["cpu"]["gemm"]},
            "decode_attention": [_Row(b=r["b"], L=r["L"], H=r["H"], D=r["D"], dtype=r["dtype"], s=r["s"])
                                 for r in bench["cpu"]["decode_attention"]],
        },
    }
    return _validated(profile, str(json_path))


# ---- roofline calibration -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Roofline:
    """time = max(flops / (peak * compute_efficiency), bytes / (bandwidth * memory_efficiency)) + latency_s."""

    compute_efficiency: float
    memory_efficiency: float
    latency_s: float

    def time_s(self, flops: np.ndarray, nbytes: np.ndarray, gpu: GpuDatasheet) -> np.ndarray:
        compute_s = flops / (gpu.peak_fp16_tflops * 1e12 * self.compute_efficiency)
        memory_s = nbytes / (gpu.memory_GBps * 1e9 * self.memory_efficiency)
        return np.maximum(compute_s, memory_s) + self.latency_s


def fit_roofline(flops: np.ndarray, nbytes: np.ndarray, times: np.ndarray, gpu: GpuDatasheet, *,
                 compute_efficiency: float | None = None, memory_efficiency: float | None = None) -> Roofline:
    """Least-squares fit of the roofline in log time; an efficiency given is held fixed (one the rows cannot
    identify because that resource never binds). Rounded so derived tables do not depend on solver noise."""
    free = [name for name, value in (("compute_efficiency", compute_efficiency),
                                     ("memory_efficiency", memory_efficiency)) if value is None]

    def roofline(params: np.ndarray) -> Roofline:
        values = {"compute_efficiency": compute_efficiency, "memory_efficiency": memory_efficiency,
                  **dict(zip(free, params[:-1]))}
        return Roofline(latency_s=params[-1] * 1e-6, **values)  # latency solved in microseconds for conditioning

    fit = least_squares(lambda p: np.log(roofline(p).time_s(flops, nbytes, gpu)) - np.log(times),
                        x0=[0.7] * len(free) + [10.0], bounds=([0.01] * len(free) + [0.0], [1.0] * len(free) + [1e3]))
    rounded = np.round(fit.x, 3)
    return roofline(rounded)


def _gemm_work(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    m, k, n = (np.array([r[key] for r in rows], dtype=float) for key in "mkn")
    return 2 * m * k * n, 2 * (m * k + k * n + m * n)


def _decode_work(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """FLOPs (QK and PV) and the fp16 K and V bytes read for one query over L cached tokens."""
    b, L, H, D = (np.array([r[key] for r in rows], dtype=float) for key in "bLHD")
    return 4 * b * H * L * D, decode_kv_bytes(b, L, H, D, 2)


def _prefill_work(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Causal FLOPs and the fp16 Q, K, V and output bytes."""
    b, L, H, D = (np.array([r[key] for r in rows], dtype=float) for key in "bLHD")
    return causal_attention_flops(b, L, H, D), 8 * b * L * H * D


@dataclass(frozen=True)
class Calibration:
    """Roofline parameters fitted on the measured H100, per kernel family, and the HBM copy efficiency."""

    gemm: Roofline
    decode_attention: Roofline
    prefill_attention: Roofline
    hbm_copy_efficiency: float

    def describe(self) -> str:
        def one(name: str, fit: Roofline, fitted: tuple[str, ...]) -> str:
            parts = [f"{key}={getattr(fit, key):.3f}" + ("" if key in fitted else " (held)")
                     for key in ("compute_efficiency", "memory_efficiency")]
            return f"{name}: {', '.join(parts)}, latency_s={fit.latency_s:.3g}"

        return ("roofline fitted on the measured H100 rows against the H100 SXM5 datasheet (989.4 TFLOPS, 3350 GB/s), "
                "least squares in log time; " + "; ".join([
                    one("GEMM", self.gemm, ("compute_efficiency", "memory_efficiency")),
                    one("decode attention", self.decode_attention, ("memory_efficiency",)),
                    one("prefill attention", self.prefill_attention, ("compute_efficiency",)),
                    f"HBM copy efficiency={self.hbm_copy_efficiency:.3f}"]))


def calibrate_on_h100(h100: dict) -> Calibration:
    return fit_calibration(h100, H100_SXM)


def fit_calibration(measured: dict, datasheet: GpuDatasheet) -> Calibration:
    """Fit the roofline efficiencies on a measured profile's rows against its GPU's datasheet. Decode attention
    (1 flop/byte) never reaches the compute roof and prefill never the memory roof, so each keeps the other family's
    fitted value for that roof."""
    gpu = measured["gpu"]
    gemm_rows, decode_rows, prefill_rows = gpu["gemm_fp16"], gpu["decode_attention_fp16"], gpu["prefill_attention_fp16"]
    gemm = fit_roofline(*_gemm_work(gemm_rows), np.array([r["s"] for r in gemm_rows]), datasheet)
    decode = fit_roofline(*_decode_work(decode_rows), np.array([r["s"] for r in decode_rows]), datasheet,
                          compute_efficiency=gemm.compute_efficiency)
    prefill = fit_roofline(*_prefill_work(prefill_rows), np.array([r["s"] for r in prefill_rows]), datasheet,
                           memory_efficiency=decode.memory_efficiency)
    return Calibration(gemm, decode, prefill, round(gpu["hbm_GBps"] / datasheet.memory_GBps, 3))


# ---- derived sections -----------------------------------------------------------------------------------------------

def derived_link(measured_link: dict, pinned_GBps: float, name: str, note: str) -> dict:
    """Copy rows at the measured sizes as latency + bytes / bandwidth. The latency per direction is the measured
    small-transfer floor (the smallest pinned time); pageable times keep the measured pageable/pinned ratio per size."""
    rows = measured_link["copies"]
    latency_s = {d: min(r[f"{d}_pinned_s"] for r in rows) for d in ("h2d", "d2h")}
    copies = []
    for row in rows:
        pinned_s = {d: latency_s[d] + row["bytes"] / (pinned_GBps * 1e9) for d in ("h2d", "d2h")}
        pageable_s = {d: pinned_s[d] * row[f"{d}_pageable_s"] / row[f"{d}_pinned_s"] for d in ("h2d", "d2h")}
        copies.append(_Row(bytes=row["bytes"], **{f"{d}_pinned_s": _significant(s) for d, s in pinned_s.items()},
                           **{f"{d}_pageable_s": _significant(s) for d, s in pageable_s.items()}))
    return {
        "source": {"kind": "derived", "note": (
            f"{note}; rows = latency + bytes / {pinned_GBps:g} GB/s at the measured sizes, latency = the measured "
            f"H100 smallest pinned transfer time (h2d {latency_s['h2d']:.3g} s, d2h {latency_s['d2h']:.3g} s); "
            "pageable = derived pinned x the measured H100 pageable/pinned ratio at that size; bidirectional_factor "
            "as measured on the H100")},
        "name": name,
        "copies": copies,
        "bidirectional_factor": measured_link["bidirectional_factor"],
    }


def _derived_tables(gpu: GpuDatasheet, calibration: Calibration, shapes: dict, gather_ratio_source: dict,
                    gemm_s, decode_s, prefill_s) -> dict:
    """A derived GPU section's fields beside its source note: the datasheet figures and the tables of times over
    `shapes`, gather20_s keeping gather_ratio_source's measured ratio of gathered to full decode attention."""
    gather_ratio = {(r["b"], r["L"]): r["gather20_s"] / r["s"] for r in gather_ratio_source["decode_attention_fp16"]}
    return {
        "name": gpu.name,
        "memory_bytes": gpu.memory_bytes,
        "hbm_GBps": _significant(gpu.memory_GBps * calibration.hbm_copy_efficiency),
        "peak_fp16_tflops": gpu.peak_fp16_tflops,
        "launch_overhead_s": LAUNCH_OVERHEAD_S,
        "gemm_fp16": [_Row(m=r["m"], k=r["k"], n=r["n"], s=_significant(s))
                      for r, s in zip(shapes["gemm_fp16"], gemm_s)],
        "decode_attention_fp16": [
            _Row(b=r["b"], L=r["L"], H=r["H"], D=r["D"], s=_significant(s),
                 gather20_s=_significant(s * gather_ratio[r["b"], r["L"]]))
            for r, s in zip(shapes["decode_attention_fp16"], decode_s)],
        "prefill_attention_fp16": [_Row(b=r["b"], L=r["L"], H=r["H"], D=r["D"], s=_significant(s))
                                   for r, s in zip(shapes["prefill_attention_fp16"], prefill_s)],
    }


def derived_gpu(gpu: GpuDatasheet, calibration: Calibration, shapes: dict, gather_ratio_source: dict) -> dict:
    """GPU tables from the datasheet by the calibrated roofline, over the shapes of another profile's measurements.
    gather20_s keeps the measured H100 ratio of gathered to full decode attention at the same (b, L)."""
    gemm_rows = shapes["gemm_fp16"]
    decode_rows = shapes["decode_attention_fp16"]
    prefill_rows = shapes["prefill_attention_fp16"]
    gemm_s = calibration.gemm.time_s(*_gemm_work(gemm_rows), gpu)
    decode_s = calibration.decode_attention.time_s(*_decode_work(decode_rows), gpu)
    prefill_s = calibration.prefill_attention.time_s(*_prefill_work(prefill_rows), gpu)
    return {
        "source": {"kind": "derived", "note": (
            f"{gpu.name} datasheet ({gpu.peak_fp16_tflops:g} TFLOPS fp16 tensor, {gpu.memory_GBps:g} GB/s); tables "
            "over the H200 measurement shapes by the roofline max(flops / (peak x eff_c), bytes / (bw x eff_m)) + "
            "latency with the efficiencies fitted on the measured H100 (see provenance); hbm_GBps = datasheet "
            f"bandwidth x the measured H100 HBM copy efficiency; gather20_s = derived s x the measured H100 "
            f"gather20_s / s at the same (b, L); {LAUNCH_OVERHEAD_NOTE}")},
        **_derived_tables(gpu, calibration, shapes, gather_ratio_source, gemm_s, decode_s, prefill_s),
    }


def measured_host_with_memory(measured_cpu: dict, memory_bytes: int, why: str) -> dict:
    """A measured host's CPU figures with another memory capacity."""
    return {**measured_cpu, "memory_bytes": memory_bytes,
            "source": {"kind": "derived", "note": (f"CPU figures measured on the H100 machine's host; memory "
                                                   f"{memory_bytes} bytes ({why})")}}


def estimated_host(host: HostEstimate, measured_cpu: dict) -> dict:
    """CPU section from spec-sheet estimates; decode attention rows are the measured host's scaled by copy bandwidth."""
    scale = measured_cpu["copy_GBps"] / host.copy_GBps
    gemm = ", ".join(f"{dtype} {tflops:g}" for dtype, tflops in host.gemm_tflops.items())
    return {
        "source": {"kind": "derived", "note": (
            f"{host.name}: estimates from the spec sheet, not measured (memcpy {host.memcpy_GBps:g} GB/s, copy "
            f"{host.copy_GBps:g} GB/s, GEMM TFLOPS {gemm}); decode attention = the measured H100 host's "
            f"rows x its copy bandwidth / the estimated copy bandwidth ({scale:.3f})")},
        "name": host.name,
        "cores": host.cores,
        "memory_bytes": host.memory_bytes,
        "memcpy_GBps": host.memcpy_GBps,
        "copy_GBps": host.copy_GBps,
        "gemm_tflops": dict(host.gemm_tflops),
        "decode_attention": [_Row({**r, "s": _significant(r["s"] * scale)}) for r in measured_cpu["decode_attention"]],
    }


def _derived_provenance(h100: dict, explanation: list[str]) -> dict:
    return {
        "machine": "derived (not a measured machine)",
        "date": h100["provenance"]["date"],
        "method": "derived from the measured H100 profile and datasheets by alisa_sim.profile_builder",
        "measurements_file": h100["provenance"]["measurements_file"],
        "software": dict(h100["provenance"]["software"]),
        "notes": explanation,
    }


def paper_h100(h100: dict) -> dict:
    """The ALISA paper's machine: the measured H100 GPU behind the paper's 20 GB/s link, 128 GB host memory."""
    profile = {
        "name": "paper-h100-80g",
        "description": "the ALISA paper's H100 80 GB setting: measured H100 GPU, 20 GB/s CPU-GPU link, 128 GB DRAM",
        "provenance": _derived_provenance(h100, [
            "derived: GPU section = the measured H100 (source measured); link = the paper's 20 GB/s CPU-GPU link "
            "(derived from the measured H100 link's latency and pageable/pinned ratios); CPU = the measured H100 "
            "host's figures with the paper's 128 GB memory (derived)",
            LAUNCH_OVERHEAD_NOTE]),
        "gpu": {**h100["gpu"], "source": {"kind": "measured", "note": (
            f"the H100 of {h100['provenance']['measurements_file']}, unchanged: {h100['gpu']['source']['note']}")}},
        "link": derived_link(h100["link"], PAPER_LINK_GBps, "CPU-GPU link, 20 GB/s (ALISA paper)",
                             "the ALISA paper's 20 GB/s CPU-GPU link"),
        "cpu": measured_host_with_memory(h100["cpu"], PAPER_HOST_MEMORY_BYTES, "the ALISA paper's 128 GB DRAM"),
    }
    return _validated(profile, profile["name"])


def paper_v100(h100: dict, h200: dict, calibration: Calibration) -> dict:
    """The ALISA paper's V100 32 GB setting, from the datasheet by the H100-calibrated roofline."""
    profile = {
        "name": "paper-v100-32g",
        "description": "the ALISA paper's V100 SXM2 32 GB setting: datasheet roofline, 20 GB/s link, 128 GB DRAM",
        "provenance": _derived_provenance(h100, [
            "derived: no V100 was measured; GPU tables from the V100 SXM2 32 GB datasheet by a roofline calibrated "
            "on the measured H100, over the shapes of " + h200["provenance"]["measurements_file"],
            calibration.describe(),
            "link = the paper's 20 GB/s; CPU = the measured H100 host's figures with the paper's 128 GB memory",
            LAUNCH_OVERHEAD_NOTE]),
        "gpu": derived_gpu(V100_SXM2, calibration, h200["gpu"], h100["gpu"]),
        "link": derived_link(h100["link"], PAPER_LINK_GBps, "CPU-GPU link, 20 GB/s (ALISA paper)",
                             "the ALISA paper's 20 GB/s CPU-GPU link"),
        "cpu": measured_host_with_memory(h100["cpu"], PAPER_HOST_MEMORY_BYTES, "the ALISA paper's 128 GB DRAM"),
    }
    return _validated(profile, profile["name"])


def flexgen_gemm_flops_per_s(m: np.ndarray) -> np.ndarray:
    """The T4 GEMM rate over m: FlexGen's mm_flops_g up to T4_DECODE_GEMM_MAX_M rows, its mm_flops_p from
    T4_PREFILL_GEMM_MIN_M rows on, a power law in m between them (our interpolation; FlexGen has the two rates only)."""
    low, high = FLEXGEN_T4["mm_flops_g"], FLEXGEN_T4["mm_flops_p"]
    share = np.clip(np.log(np.asarray(m, dtype=float) / T4_DECODE_GEMM_MAX_M)
                    / np.log(T4_PREFILL_GEMM_MIN_M / T4_DECODE_GEMM_MAX_M), 0.0, 1.0)
    return low * (high / low) ** share


def _gb(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e9:.4g} GB/s"


def fitted_t4_gpu(calibration: Calibration, shapes: dict, gather_ratio_source: dict) -> dict:
    """T4 tables at FlexGen's fitted rates over another profile's measurement shapes, bounded by the T4 datasheet's
    memory roof with the H100-calibrated memory efficiencies and latencies."""
    gemm_rows = shapes["gemm_fp16"]
    decode_rows = shapes["decode_attention_fp16"]
    prefill_rows = shapes["prefill_attention_fp16"]
    gemm_memory_Bps = T4.memory_GBps * 1e9 * calibration.gemm.memory_efficiency
    attention_memory_Bps = T4.memory_GBps * 1e9 * calibration.prefill_attention.memory_efficiency

    flops, nbytes = _gemm_work(gemm_rows)
    m = np.array([r["m"] for r in gemm_rows], dtype=float)
    gemm_s = np.maximum(flops / flexgen_gemm_flops_per_s(m), nbytes / gemm_memory_Bps) + calibration.gemm.latency_s

    _, kv_bytes = _decode_work(decode_rows)
    decode_s = np.maximum(kv_bytes / FLEXGEN_T4["bmm_flops_g"],
                          calibration.decode_attention.time_s(*_decode_work(decode_rows), T4))

    causal_flops, qkvo_bytes = _prefill_work(prefill_rows)
    prefill_s = np.maximum(2 * causal_flops / FLEXGEN_T4["bmm_flops_p"],
                           qkvo_bytes / attention_memory_Bps) + calibration.prefill_attention.latency_s

    return {
        "source": {"kind": "fitted", "note": (
            f"{T4.name}; fitted: the compute rates FlexGen's authors fitted on this machine ({FLEXGEN_T4_SOURCE}): "
            "GEMM at mm_flops_g = 4.3 T FLOP/s for m <= "
            f"{T4_DECODE_GEMM_MAX_M} and mm_flops_p = 21.24 T FLOP/s for m >= {T4_PREFILL_GEMM_MIN_M}, a power law in "
            "m between them (our interpolation, not FlexGen's); prefill attention at bmm_flops_p = 9.97 T FLOP/s in "
            "FlexGen's FLOP count over the full L x L matrix (4 b L^2 H D, twice alisa_sim's causal count, so "
            f"{FLEXGEN_T4['bmm_flops_p'] / 2e12:.4g} T causal FLOP/s); decode attention at bmm_flops_g = 0.079 T "
            "FLOP/s, which FlexGen divides into the fp16 K + V bytes (79 GB/s of KV). Derived, not fitted: "
            f"memory_bytes = the datasheet's 16 GiB; memory roofs from the datasheet's {T4.memory_GBps:g} GB/s GDDR6 x "
            f"the H100-calibrated memory efficiencies (GEMM {calibration.gemm.memory_efficiency:.3f}, attention "
            f"{calibration.prefill_attention.memory_efficiency:.3f}); rows = max(FLOPs / fitted rate, bytes / memory "
            f"roof) + the H100-calibrated kernel latency (GEMM {calibration.gemm.latency_s:.3g} s, prefill attention "
            f"{calibration.prefill_attention.latency_s:.3g} s); decode attention = max(KV bytes / 79 GB/s, the "
            "H100-calibrated datasheet roofline); hbm_GBps = datasheet bandwidth x the measured H100 HBM copy "
            f"efficiency; peak_fp16_tflops = the datasheet's {T4.peak_fp16_tflops:g}; gather20_s = s x the measured "
            f"H100 gather20_s / s at the same (b, L); {LAUNCH_OVERHEAD_NOTE}")},
        **_derived_tables(T4, calibration, shapes, gather_ratio_source, gemm_s, decode_s, prefill_s),
    }


def fitted_t4_link(measured_link: dict) -> dict:
    """PCIe 3.0 x16 copies at FlexGen's fitted T4 bandwidths at the measured sizes, over the measured latency floor."""
    rows = measured_link["copies"]
    latency_s = {d: min(r[f"{d}_pinned_s"] for r in rows) for d in ("h2d", "d2h")}
    h2d_Bps, d2h_Bps, d2h_cache_Bps = (FLEXGEN_T4[key] for key in ("ctog_bdw", "gtoc_bdw_hidden", "gtoc_bdw_cache"))
    copies = []
    for row in rows:
        h2d_pinned_s = latency_s["h2d"] + row["bytes"] / h2d_Bps
        copies.append(_Row(
            bytes=row["bytes"],
            h2d_pinned_s=_significant(h2d_pinned_s),
            d2h_pinned_s=_significant(latency_s["d2h"] + row["bytes"] / d2h_Bps),
            h2d_pageable_s=_significant(h2d_pinned_s * row["h2d_pageable_s"] / row["h2d_pinned_s"]),
            d2h_pageable_s=_significant(latency_s["d2h"] + row["bytes"] / d2h_cache_Bps)))
    return {
        "source": {"kind": "fitted", "note": (
            f"fitted: FlexGen's T4 link bandwidths ({FLEXGEN_T4_SOURCE}; GB = 2^30 bytes as in FlexGen's utils.py): "
            f"pinned H2D at ctog_bdw = 12.89 GB ({_gb(h2d_Bps)}), pinned D2H at gtoc_bdw_hidden = 4.82 GB "
            f"({_gb(d2h_Bps)}), pageable D2H at gtoc_bdw_cache = 0.97 GB ({_gb(d2h_cache_Bps)}): FlexGen's KV stores "
            "are strided slice copies into the CPU cache and run at this speed, and the simulator's FlexGen policy "
            "issues its KV stores as pageable D2H. Derived, not fitted: rows = latency + bytes / bandwidth at the "
            f"measured H100 sizes, latency = the measured H100 smallest pinned transfer time (h2d "
            f"{latency_s['h2d']:.3g} s, d2h {latency_s['d2h']:.3g} s); pageable H2D = pinned H2D x the measured H100 "
            "pageable/pinned ratio at that size (PCIe gen5's ratio; probably overstates the penalty on a slower "
            "link); bidirectional_factor as measured on the H100")},
        "name": "PCIe 3.0 x16",
        "copies": copies,
        "bidirectional_factor": measured_link["bidirectional_factor"],
    }


def fitted_t4_host(host: HostEstimate, measured_cpu: dict) -> dict:
    """The estimated host with its decode attention rows at FlexGen's fitted cpu_flops."""
    cpu = estimated_host(host, measured_cpu)
    # FlexGen's cpu_flops divides fp16 KV bytes; alisa_sim's CPU attention rows and queries count fp32 bytes.
    fp32_Bps = 2 * FLEXGEN_T4["cpu_flops"]
    rows = []
    for row in cpu["decode_attention"]:
        if row["dtype"] != "float32":
            raise ValueError(f"CPU decode attention row {dict(row)} is not float32")
        rows.append(_Row({**row, "s": _significant(decode_kv_bytes(row["b"], row["L"], row["H"], row["D"], 4)
                                                   / fp32_Bps)}))
    gemm = ", ".join(f"{dtype} {tflops:g}" for dtype, tflops in host.gemm_tflops.items())
    cpu["decode_attention"] = rows
    cpu["source"] = {"kind": "fitted", "note": (
        f"fitted: decode attention at FlexGen's cpu_flops = 0.0123 T ({FLEXGEN_T4_SOURCE}), which FlexGen divides "
        f"into the fp16 K + V bytes (FlexGen computes CPU attention in fp32 over its fp16 cache): {_gb(fp32_Bps / 2)} "
        f"of fp16 KV = {_gb(fp32_Bps)} counted as fp32 bytes, as alisa_sim queries CPU attention; rows at the "
        "measured H100 host's shapes; FlexGen's small-batch correction (cpu_flops_real with c1, c2, c3: slower below "
        "GPU batch 64 or hidden size 4096) is not applied. Derived, not fitted: "
        f"{host.name}: estimates from the spec sheet, not measured (memcpy {host.memcpy_GBps:g} GB/s, copy "
        f"{host.copy_GBps:g} GB/s, GEMM TFLOPS {gemm})")}
    return cpu


def flexgen_t4(h100: dict, h200: dict, calibration: Calibration) -> dict:
    """FlexGen's published setting: one T4 16 GB on PCIe 3.0 x16 in a GCP n1-highmem-32 (208 GB DRAM), at the rates
    FlexGen's authors fitted on that machine."""
    profile = {
        "name": "t4-16g",
        "description": ("FlexGen's setting: NVIDIA T4 16 GB, PCIe 3.0 x16, GCP n1-highmem-32 host with 208 GB DRAM; "
                        "rates fitted by FlexGen's authors"),
        "provenance": {
            **_derived_provenance(h100, [
                f"fitted: no T4 was measured here; GEMM, attention and link rates are the hardware constants "
                f"FlexGen's authors fitted on this machine ({FLEXGEN_T4_SOURCE}; GB = 2^30 bytes, T = 1e12, as in "
                "FlexGen's flexgen/utils.py): ctog_bdw = 12.89 GB, gtoc_bdw_cache = 0.97 GB, gtoc_bdw_hidden = 4.82 "
                "GB, mm_flops_p = 21.24 T, mm_flops_g = 4.3 T, bmm_flops_p = 9.97 T, bmm_flops_g = 0.079 T, "
                "cpu_flops = 0.0123 T (FlexGen fitted them by gradient descent on end-to-end run times, so they "
                "fold in per-layer overheads); tables over the shapes of " + h200["provenance"]["measurements_file"],
                "derived, not fitted: GPU memory (datasheet 16 GiB), memory roofs (datasheet 320 GB/s x the "
                "H100-calibrated efficiencies), kernel latencies and the link latency floor and pageable H2D ratio "
                "(measured H100), the host's memory, memcpy, copy and GEMM figures (n1-highmem-32 estimates)",
                calibration.describe(),
                LAUNCH_OVERHEAD_NOTE]),
            "machine": "FlexGen's GCP T4 machine, not measured here (rates fitted by FlexGen's authors)",
            "method": ("hardware constants fitted by FlexGen's authors (FlexGen cost_model.py CostModelConfig), "
                       "tabulated with the T4 datasheet and the measured H100 profile by alisa_sim.profile_builder"),
        },
        "gpu": fitted_t4_gpu(calibration, h200["gpu"], h100["gpu"]),
        "link": fitted_t4_link(h100["link"]),
        "cpu": fitted_t4_host(N1_HIGHMEM_32, h100["cpu"]),
    }
    return _validated(profile, profile["name"])


def _validated(profile: dict, source: str) -> dict:
    """The profile validated, with a named-op row (gpu.ops) for every executor op it does not time, derived from its
    own tables (alisa_sim.cost_model.derived_op_rows) and marked "derived" (rows derived before, e.g. in a section
    copied from another profile, are derived again from this one's tables)."""
    profile["gpu"]["ops"] = [row for row in profile["gpu"].get("ops", []) if row["source"] == "measured"]
    derived = derived_op_rows(validate(HardwareProfile, profile, source))
    rows = [_Row({**row, "host_s": _significant(row["host_s"])}) for row in derived]
    profile["gpu"]["ops"] += rows
    validate(HardwareProfile, profile, source)
    return profile

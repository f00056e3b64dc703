"""Profiles of GPUs nobody here measured, from their datasheets (`alisa-sim hardware derive`).

A datasheet spec (hw_profiles/datasheets/*.yaml) gives a card's memory, DRAM bandwidth, dense fp16 TFLOP/s, SM count,
PCIe generation and lanes, and its host's cores, memory and (optionally) copy bandwidth. The derived profile keeps
the measured cards' achieved-vs-peak curves and moves them onto the new card's peaks:

- every GPU table row (GEMM by shape, decode and prefill attention by batch and length) of a measured card is split
  into a kernel latency (the roofline fit of its family, alisa_sim.profile_builder.fit_calibration) and the work
  part; the work part's share of the card's own datasheet roofline, max(flops / peak, bytes / bandwidth), is the
  achieved fraction at that shape, and the new card's row is latency + its roofline time / that fraction
  (transferred_times); the 20%-gathered decode attention scales with the SM count instead (gathered_times);
- copies by size keep the measured latency floor; the rest scales with the PCIe peak (pinned), pageable copies
  take the slower of the measured host staging (scaled by host bandwidth) and the derived pinned copy;
- the host's copy, memcpy and CPU attention scale with its copy bandwidth, its GEMM rate with its cores.

The measured cards are those with a datasheet naming their `measured_profile`; curves come from the cards of the
same architecture, else the nearest (geometric mean over several), or those a spec's `curves_from` names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from alisa_sim.errors import SpecError, load_yaml_file, validate
from alisa_sim.hardware import PROFILE_DIR, load_hardware_profile
from alisa_sim.profile_builder import (LAUNCH_OVERHEAD_NOTE, LAUNCH_OVERHEAD_S, GpuDatasheet, _decode_work, _gemm_work,
                                       _prefill_work, _ProfileDumper, _Row, _significant, _validated, fit_calibration)

DATASHEET_DIR = PROFILE_DIR / "datasheets"
ARCHITECTURES = ("volta", "turing", "ampere", "ada", "hopper", "blackwell")  # in order of generation
GiB = 2**30
# Usable bytes per second per lane and direction after line coding: 8b/10b (gen 1-2), 128b/130b (gen 3-5),
# FLIT with 242/256 payload (gen 6).
PCIE_LANE_GBps = {1: 0.25, 2: 0.5, 3: 8 * 128 / 130 / 8, 4: 16 * 128 / 130 / 8, 5: 32 * 128 / 130 / 8,
                  6: 64 * 242 / 256 / 8}
COPY_COLUMNS = ("h2d_pinned_s", "d2h_pinned_s", "h2d_pageable_s", "d2h_pageable_s")  # the CopyRow field order
GPU_TABLES = {"gemm_fp16": _gemm_work, "decode_attention_fp16": _decode_work, "prefill_attention_fp16": _prefill_work}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GpuSheet(_Strict):
    name: str
    architecture: Literal[ARCHITECTURES]
    memory_GiB: PositiveFloat
    memory_GBps: PositiveFloat = Field(description="DRAM bandwidth, datasheet")
    fp16_tflops: PositiveFloat = Field(description="dense fp16/bf16 tensor-core peak with fp32 accumulate, "
                                                   "no structured sparsity")
    sm_count: PositiveInt
    source: str = Field(description="where these figures come from (cited in the profile)")


class LinkSheet(_Strict):
    pcie_gen: Literal[tuple(PCIE_LANE_GBps)]
    lanes: Literal[1, 2, 4, 8, 16]
    source: str

    @property
    def GBps(self) -> float:
        """Peak bytes per second / 1e9, one direction."""
        return PCIE_LANE_GBps[self.pcie_gen] * self.lanes


class HostSheet(_Strict):
    name: str
    cores: PositiveInt
    memory_GiB: PositiveFloat
    memory_GBps: PositiveFloat | None = Field(default=None, description="multi-threaded copy bandwidth, read + "
                                              "write; default: the reference host's measured figure")
    source: str


class DatasheetSpec(_Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")
    description: str
    measured_profile: str | None = Field(default=None, description="this card was measured as that profile: its "
                                         "curves are read against this datasheet")
    curves_from: list[str] | None = Field(default=None, min_length=1, description="measured profiles whose curves "
                                          "to use (default: same or nearest architecture)")
    gpu: GpuSheet
    link: LinkSheet
    host: HostSheet

    def roofline_sheet(self) -> GpuDatasheet:
        return GpuDatasheet(self.gpu.name, int(self.gpu.memory_GiB * GiB), self.gpu.fp16_tflops, self.gpu.memory_GBps)


def load_datasheet(path: str | Path) -> DatasheetSpec:
    return validate(DatasheetSpec, load_yaml_file(path, "datasheet spec"), str(path))


def measured_datasheets(folder: Path = DATASHEET_DIR) -> dict[str, DatasheetSpec]:
    """The datasheets of the measured cards, by their profile's name."""
    sheets = [load_datasheet(path) for path in sorted(folder.glob("*.yaml"))]
    return {sheet.measured_profile: sheet for sheet in sheets if sheet.measured_profile}


def curve_sources(spec: DatasheetSpec, measured: dict[str, DatasheetSpec]) -> list[str]:
    """The measured profiles whose curves this card gets: `curves_from`, else all of the nearest architecture."""
    if spec.curves_from:
        unknown = [name for name in spec.curves_from if name not in measured]
        if unknown:
            raise SpecError(f"{spec.name}: curves_from {', '.join(unknown)}: not a measured profile with a datasheet "
                            f"(known: {', '.join(sorted(measured))})")
        return list(spec.curves_from)
    if not measured:
        raise SpecError("no measured profile has a datasheet (hw_profiles/datasheets/*.yaml with measured_profile)")
    generation = ARCHITECTURES.index(spec.gpu.architecture)
    distance = {name: abs(ARCHITECTURES.index(sheet.gpu.architecture) - generation) for name, sheet in measured.items()}
    nearest = min(distance.values())
    return sorted(name for name, d in distance.items() if d == nearest)


# ---- transfer -------------------------------------------------------------------------------------------------------

def _roofline_s(flops: np.ndarray, nbytes: np.ndarray, sheet: GpuDatasheet) -> np.ndarray:
    return np.maximum(flops / (sheet.peak_fp16_tflops * 1e12), nbytes / (sheet.memory_GBps * 1e9))


def transferred_times(rows: list[dict], work, latency_s: float, source: GpuDatasheet,
                      target: GpuDatasheet) -> np.ndarray:
    """Row times on `target`. A measured row is the source's kernel latency plus work that reached a fraction of the
    source's datasheet roofline; on the target the same fraction of its roofline: latency + (measured - latency) x
    target roofline / source roofline. A row already faster than latency + roofline (the fitted latency is too high
    for it) counts as reaching the roofline and only its roofline part changes. Identity when target = source; never
    faster than the target's roofline."""
    flops, nbytes = work(rows)
    measured = np.array([row["s"] for row in rows])
    source_ideal, target_ideal = _roofline_s(flops, nbytes, source), _roofline_s(flops, nbytes, target)
    achieved = np.minimum(1.0, source_ideal / np.maximum(measured - latency_s, 1e-12))
    return np.maximum(measured + (target_ideal - source_ideal) / achieved, target_ideal)


def gathered_times(profile: dict, sheet: DatasheetSpec, target: DatasheetSpec) -> np.ndarray:
    """gather20_s rows on the target: the decode family's latency + the measured rest x the SM-count ratio. Gathering
    the selected tokens is bound by the SMs' issue rate, not by DRAM: the measured H100 and H200 (same SMs and
    clocks, 1.43x apart in bandwidth) take the same time for it."""
    rows = profile["gpu"]["decode_attention_fp16"]
    latency_s = fit_calibration(profile, sheet.roofline_sheet()).decode_attention.latency_s
    measured = np.array([row["gather20_s"] for row in rows])
    scaled = latency_s + (measured - latency_s) * sheet.gpu.sm_count / target.gpu.sm_count
    return np.where(measured > latency_s, scaled, measured)


def _geomean(arrays: list[np.ndarray]) -> np.ndarray:
    return np.exp(np.mean(np.log(np.array(arrays)), axis=0))


def _same_shapes(tables: list[list[dict]], keys: tuple[str, ...], what: str) -> list[dict]:
    shapes = [[tuple(row[key] for key in keys) for row in table] for table in tables]
    if any(s != shapes[0] for s in shapes[1:]):
        raise SpecError(f"the curve sources' {what} rows are not at the same shapes: use one source (curves_from)")
    return tables[0]


def derived_gpu_section(spec: DatasheetSpec, refs: list[tuple[dict, DatasheetSpec]]) -> dict:
    target = spec.roofline_sheet()
    tables = {}
    for table, work in GPU_TABLES.items():
        keys = ("m", "k", "n") if table == "gemm_fp16" else ("b", "L", "H", "D")
        rows = _same_shapes([profile["gpu"][table] for profile, _ in refs], keys, table)
        times = []
        for profile, sheet in refs:
            calibration = fit_calibration(profile, sheet.roofline_sheet())
            family = {"gemm_fp16": calibration.gemm, "decode_attention_fp16": calibration.decode_attention,
                      "prefill_attention_fp16": calibration.prefill_attention}[table]
            times.append(transferred_times(profile["gpu"][table], work, family.latency_s, sheet.roofline_sheet(),
                                           target))
        tables[table] = (rows, _geomean(times))
    gather_s = _geomean([gathered_times(profile, sheet, spec) for profile, sheet in refs])
    hbm_efficiency = float(_geomean([np.array([profile["gpu"]["hbm_GBps"] / sheet.gpu.memory_GBps])
                                     for profile, sheet in refs])[0])
    # The driver keeps part of the memory: a measured card reports a little less than its datasheet capacity.
    usable = float(_geomean([np.array([profile["gpu"]["memory_bytes"] / (sheet.gpu.memory_GiB * GiB)])
                             for profile, sheet in refs])[0])
    gemm_rows, gemm_s = tables["gemm_fp16"]
    decode_rows, decode_s = tables["decode_attention_fp16"]
    prefill_rows, prefill_s = tables["prefill_attention_fp16"]
    names = ", ".join(sheet.measured_profile for _, sheet in refs)
    return {
        "source": {"kind": "derived", "note": (
            f"{spec.gpu.source}. Derived, not measured: tables over the shapes of the measured {names}, each row = "
            f"that card's fitted kernel latency + (its measured time - that latency) x this card's roofline max(flops "
            f"/ {spec.gpu.fp16_tflops:g} TFLOP/s, bytes / {spec.gpu.memory_GBps:g} GB/s) / the measured card's "
            f"datasheet roofline, i.e. the same achieved share of the roofline at that shape (geometric mean over the "
            f"cards); hbm_GBps = datasheet bandwidth x the measured "
            f"HBM copy efficiency ({hbm_efficiency:.3f}); memory_bytes = the datasheet's {spec.gpu.memory_GiB:g} "
            f"GiB x the share of their datasheet capacity the measured cards report ({usable:.4f}); gather20_s = the "
            f"decode latency + the measured rest x the SM-count ratio (x {refs[0][1].gpu.sm_count} / "
            f"{spec.gpu.sm_count} SMs; the gathered attention runs at the SMs' rate, not DRAM's: the same on the "
            f"measured H100 and H200); {LAUNCH_OVERHEAD_NOTE}")},
        "name": spec.gpu.name,
        "memory_bytes": int(spec.gpu.memory_GiB * GiB * round(usable, 4)),
        "hbm_GBps": _significant(spec.gpu.memory_GBps * hbm_efficiency),
        "peak_fp16_tflops": spec.gpu.fp16_tflops,
        "launch_overhead_s": LAUNCH_OVERHEAD_S,
        "gemm_fp16": [_Row(m=r["m"], k=r["k"], n=r["n"], s=_significant(s)) for r, s in zip(gemm_rows, gemm_s)],
        "decode_attention_fp16": [_Row(b=r["b"], L=r["L"], H=r["H"], D=r["D"], s=_significant(s),
                                       gather20_s=_significant(g))
                                  for r, s, g in zip(decode_rows, decode_s, gather_s)],
        "prefill_attention_fp16": [_Row(b=r["b"], L=r["L"], H=r["H"], D=r["D"], s=_significant(s))
                                   for r, s in zip(prefill_rows, prefill_s)],
    }


def _host_GBps(spec: DatasheetSpec, ref_cpu: dict) -> float:
    return spec.host.memory_GBps or ref_cpu["copy_GBps"]


def derived_link_section(spec: DatasheetSpec, refs: list[tuple[dict, DatasheetSpec]]) -> dict:
    rows = _same_shapes([profile["link"]["copies"] for profile, _ in refs], ("bytes",), "link.copies")
    columns = {}
    for direction in ("h2d", "d2h"):
        pinned, pageable = [], []
        for profile, sheet in refs:
            copies = profile["link"]["copies"]
            measured = np.array([row[f"{direction}_pinned_s"] for row in copies])
            floor_s = measured.min()
            derived = floor_s + (measured - floor_s) * sheet.link.GBps / spec.link.GBps
            staging = np.array([row[f"{direction}_pageable_s"] for row in copies]) \
                * profile["cpu"]["copy_GBps"] / _host_GBps(spec, profile["cpu"])
            pinned.append(derived)
            pageable.append(np.maximum(staging, derived))
        columns[f"{direction}_pinned_s"], columns[f"{direction}_pageable_s"] = _geomean(pinned), _geomean(pageable)
    sources = ", ".join(f"{sheet.measured_profile} (PCIe gen{sheet.link.pcie_gen} x{sheet.link.lanes})"
                        for _, sheet in refs)
    factor = float(_geomean([np.array([profile["link"]["bidirectional_factor"]]) for profile, _ in refs])[0])
    return {
        "source": {"kind": "derived", "note": (
            f"{spec.link.source}. Derived, not measured: copies at the sizes measured on {sources}: pinned = the "
            f"measured latency floor (smallest pinned time) + the rest x the measured link's peak / this link's peak "
            f"({spec.link.GBps:.2f} GB/s per direction, PCIe gen{spec.link.pcie_gen} x{spec.link.lanes} after line "
            "coding); pageable = the slower of the measured pageable time x the measured host's copy bandwidth / this "
            "host's (host staging) and the derived pinned time; bidirectional_factor as measured")},
        "name": f"PCIe gen{spec.link.pcie_gen} x{spec.link.lanes}",
        "copies": [_Row(bytes=row["bytes"], **{key: _significant(columns[key][i]) for key in COPY_COLUMNS})
                   for i, row in enumerate(rows)],
        "bidirectional_factor": _significant(factor),
    }


def derived_cpu_section(spec: DatasheetSpec, ref: dict, ref_name: str) -> dict:
    cpu = ref["cpu"]
    copy_GBps = _host_GBps(spec, cpu)
    bandwidth = copy_GBps / cpu["copy_GBps"]
    cores = spec.host.cores / cpu["cores"]
    given = "as the spec gives it" if spec.host.memory_GBps else f"the measured {ref_name} host's (not published)"
    return {
        "source": {"kind": "derived", "note": (
            f"{spec.host.source}. Derived, not measured: copy bandwidth {copy_GBps:.4g} GB/s {given}; memcpy and the "
            f"CPU decode attention rows = the measured {ref_name} host's x the copy bandwidth ratio ({bandwidth:.3f}); "
            f"GEMM rates = the measured {ref_name} host's x the core ratio ({spec.host.cores} / {cpu['cores']})")},
        "name": spec.host.name,
        "cores": spec.host.cores,
        "memory_bytes": int(spec.host.memory_GiB * GiB),
        "memcpy_GBps": _significant(cpu["memcpy_GBps"] * bandwidth),
        "copy_GBps": _significant(copy_GBps),
        "gemm_tflops": {dtype: _significant(tflops * cores) for dtype, tflops in cpu["gemm_tflops"].items()},
        "decode_attention": [_Row({**row, "s": _significant(row["s"] / bandwidth)}) for row in cpu["decode_attention"]],
    }


def derive_profile(spec: DatasheetSpec, measured_profiles: dict[str, dict],
                   measured: dict[str, DatasheetSpec], name: str | None = None) -> dict:
    """The full profile of the card in `spec` from the measured profiles (name -> profile mapping) and their
    datasheets; `name` overrides the spec's."""
    sources = curve_sources(spec, measured)
    missing = [source for source in sources if source not in measured_profiles]
    if missing:
        raise SpecError(f"{spec.name}: measured profile(s) {', '.join(missing)} not found in hw_profiles/")
    refs = [(measured_profiles[source], measured[source]) for source in sources]
    host_ref, host_sheet = refs[0]
    same = {measured[source].gpu.architecture for source in sources} == {spec.gpu.architecture}
    why = ("named by curves_from" if spec.curves_from else
           f"the measured cards of the {'same' if same else 'nearest'} architecture"
           + ("" if same else f" ({measured[sources[0]].gpu.architecture}; no {spec.gpu.architecture} card was "
                               "measured)"))
    peaks = "; ".join(f"{source}: {measured[source].gpu.fp16_tflops:g} TFLOP/s, "
                      f"{measured[source].gpu.memory_GBps:g} GB/s" for source in sources)
    first = host_ref["provenance"]
    profile = {
        "name": name or spec.name,
        "description": f"{spec.description} (derived from the datasheet with the curves of {', '.join(sources)})",
        "provenance": {
            "machine": "derived from a datasheet (not a measured machine)",
            "date": first["date"],
            "method": ("datasheet figures with the achieved-vs-peak curves of measured cards, by "
                       "alisa_sim.hardware_derive (alisa-sim hardware derive)"),
            "measurements_file": first.get("measurements_file"),
            "software": dict(first.get("software", {})),
            "notes": [
                f"derived: curves of {', '.join(sources)} ({why}), read against their datasheets ({peaks})",
                f"datasheet: {spec.gpu.source}",
                f"datasheet: {spec.link.source}",
                f"host: {spec.host.source}",
                f"spec: {spec.gpu.name}, {spec.gpu.architecture}, {spec.gpu.memory_GiB:g} GiB, "
                f"{spec.gpu.memory_GBps:g} GB/s, {spec.gpu.fp16_tflops:g} TFLOP/s dense fp16, {spec.gpu.sm_count} SMs, "
                f"PCIe gen{spec.link.pcie_gen} x{spec.link.lanes}; host {spec.host.cores} cores, "
                f"{spec.host.memory_GiB:g} GiB",
                LAUNCH_OVERHEAD_NOTE,
            ],
        },
        "gpu": derived_gpu_section(spec, refs),
        "link": derived_link_section(spec, refs),
        "cpu": derived_cpu_section(spec, host_ref, host_sheet.measured_profile),
    }
    return _validated(profile, profile["name"])


def shipped_profiles(measured_profiles: dict[str, dict], folder: Path = DATASHEET_DIR) -> list[dict]:
    """The profile of every datasheet in `folder` that is not itself a measured card's, in file order."""
    measured = measured_datasheets(folder)
    specs = [load_datasheet(path) for path in sorted(folder.glob("*.yaml"))]
    return [derive_profile(spec, measured_profiles, measured) for spec in specs if not spec.measured_profile]


def installed_measured_profiles(measured: dict[str, DatasheetSpec]) -> dict[str, dict]:
    """The measured profiles in hw_profiles/ as plain mappings, by name."""
    return {name: load_hardware_profile(name).model_dump(mode="json") for name in measured
            if (PROFILE_DIR / f"{name}.yaml").is_file()}


def derive_from_file(path: str | Path, curves_from: list[str] | None = None, name: str | None = None) -> dict:
    """`alisa-sim hardware derive`: the profile of a datasheet spec file, with the installed measured profiles."""
    spec = load_datasheet(path)
    if curves_from:
        spec = spec.model_copy(update={"curves_from": curves_from})
    measured = measured_datasheets()
    return derive_profile(spec, installed_measured_profiles(measured), measured, name)


def profile_yaml(profile: dict, how: str) -> str:
    header = f"# Derived from a datasheet by {how} (sources in provenance); rederive rather than edit.\n"
    return header + yaml.dump(profile, Dumper=_ProfileDumper, sort_keys=False, width=120, allow_unicode=True)

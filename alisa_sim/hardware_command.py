"""`alisa-sim hardware list | show NAME | derive SPEC.yaml`: the shipped hardware profiles, one in detail, and new
ones from a GPU's datasheet."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from alisa_sim.errors import SpecError
from alisa_sim.hardware import PROFILE_DIR, HardwareProfile, load_hardware_profile

GiB = 2**30


def headline(profile: HardwareProfile) -> dict:
    """A profile's figures in one flat mapping: capacities in GiB, bandwidths in GB/s, the best rates its tables
    reach."""
    gpu, link, cpu = profile.gpu, profile.link, profile.cpu
    largest = link.copies[-1]
    decode = max(gpu.decode_attention_fp16, key=lambda r: r.b * r.L)
    return {
        "name": profile.name,
        "kind": gpu.source.kind,
        "gpu": gpu.name,
        "gpu_memory_GiB": gpu.memory_bytes / GiB,
        "hbm_copy_GBps": gpu.hbm_GBps,
        "peak_fp16_tflops": gpu.peak_fp16_tflops,
        "best_gemm_tflops": max(2 * r.m * r.k * r.n / r.s for r in gpu.gemm_fp16) / 1e12,
        "decode_attention_kv_GBps": 4 * decode.b * decode.L * decode.H * decode.D / decode.s / 1e9,
        "link": link.name,
        "h2d_pinned_GBps": largest.bytes / largest.h2d_pinned_s / 1e9,
        "d2h_pinned_GBps": largest.bytes / largest.d2h_pinned_s / 1e9,
        "cpu": cpu.name,
        "cpu_cores": cpu.cores,
        "cpu_memory_GiB": cpu.memory_bytes / GiB,
        "cpu_copy_GBps": cpu.copy_GBps,
    }


def profile_names() -> list[str]:
    return sorted(path.stem for path in PROFILE_DIR.glob("*.yaml"))


def cmd_list(args: argparse.Namespace, console: Console) -> int:
    rows = [headline(load_hardware_profile(name)) for name in profile_names()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table("name", "kind", "GPU", "GPU memory", "HBM copy", "best GEMM", "link H2D", "host", "host memory",
                  title=f"hardware profiles in {PROFILE_DIR} (alisa-sim hardware show NAME for one)")
    for row in rows:
        table.add_row(row["name"], row["kind"], row["gpu"], f"{row['gpu_memory_GiB']:.1f} GiB",
                      f"{row['hbm_copy_GBps']:.0f} GB/s", f"{row['best_gemm_tflops']:.0f} TFLOP/s",
                      f"{row['link']}, {row['h2d_pinned_GBps']:.1f} GB/s", f"{row['cpu_cores']} cores",
                      f"{row['cpu_memory_GiB']:.0f} GiB")
    console.print(table)
    return 0


def cmd_show(args: argparse.Namespace, console: Console) -> int:
    profile = load_hardware_profile(args.name)
    if args.json:
        print(json.dumps(profile.model_dump(mode="json"), indent=1))
        return 0
    figures = headline(profile)
    console.print(f"[bold]{profile.name}[/]: {profile.description}")
    prov = profile.provenance
    console.print(f"machine: {prov.machine}; date {prov.date}; method: {prov.method}")
    if prov.software:
        console.print("software: " + ", ".join(f"{key} {value}" for key, value in prov.software.items()))
    table = Table("figure", "value", title="headline figures (GiB = 2^30 bytes, GB/s = 10^9 bytes per second)")
    for label, value in [
        ("GPU", f"{figures['gpu']} ({profile.gpu.source.kind})"),
        ("GPU memory", f"{figures['gpu_memory_GiB']:.2f} GiB"),
        ("HBM copy (read + write)", f"{figures['hbm_copy_GBps']:.0f} GB/s"),
        ("peak fp16 (datasheet or best measured)", f"{figures['peak_fp16_tflops']:.1f} TFLOP/s"),
        ("best GEMM row", f"{figures['best_gemm_tflops']:.1f} TFLOP/s"),
        ("decode attention, largest row", f"{figures['decode_attention_kv_GBps']:.0f} GB/s of KV"),
        ("kernel launch overhead", f"{profile.gpu.launch_overhead_s * 1e6:.1f} us"),
        ("link", f"{figures['link']} ({profile.link.source.kind})"),
        ("H2D / D2H pinned, largest copy", f"{figures['h2d_pinned_GBps']:.1f} / {figures['d2h_pinned_GBps']:.1f} GB/s"),
        ("host", f"{figures['cpu']} ({profile.cpu.source.kind})"),
        ("host cores / memory", f"{figures['cpu_cores']} / {figures['cpu_memory_GiB']:.1f} GiB"),
        ("host copy (read + write)", f"{figures['cpu_copy_GBps']:.1f} GB/s"),
        ("tables", f"{len(profile.gpu.gemm_fp16)} GEMM, {len(profile.gpu.decode_attention_fp16)} decode attention, "
                   f"{len(profile.gpu.prefill_attention_fp16)} prefill attention, {len(profile.link.copies)} copy, "
                   f"{len(profile.cpu.decode_attention)} CPU attention rows"),
    ]:
        table.add_row(label, value)
    console.print(table)
    for section in ("gpu", "link", "cpu"):
        source = getattr(profile, section).source
        console.print(f"[bold]{section}[/] ({source.kind}): {source.note}")
    for note in prov.notes:
        console.print(f"- {note}")
    return 0


def cmd_derive(args: argparse.Namespace, console: Console) -> int:
    from alisa_sim.hardware_derive import derive_from_file, profile_yaml

    curves = [name.strip() for name in args.curves_from.split(",") if name.strip()] if args.curves_from else None
    profile = derive_from_file(args.spec, curves, args.name)
    out = Path(args.out) if args.out else PROFILE_DIR / f"{profile['name']}.yaml"
    if out.suffix not in (".yaml", ".yml"):
        raise SpecError(f"--out {out}: a profile is a YAML file, e.g. hw_profiles/NAME.yaml")
    if out.exists() and not args.force:
        raise SpecError(f"{out} exists: give --force to replace it, or --out elsewhere")
    command = f"alisa-sim hardware derive {args.spec}" + (f" --curves-from {args.curves_from}" if curves else "")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(profile_yaml(profile, f"`{command}`"))
    tmp.replace(out)
    console.print(f"wrote {out} ({profile['description']}); use it with --hardware "
                  f"{out if args.out else profile['name']}")
    return 0


def add_hardware_parser(sub: argparse._SubParsersAction) -> None:
    hardware = sub.add_parser("hardware", help="list the hardware profiles, show one, or derive one from a datasheet")
    commands = hardware.add_subparsers(dest="hardware_command", required=True)
    listing = commands.add_parser("list", help="every profile in hw_profiles/ with its headline figures")
    listing.add_argument("--json", action="store_true", help="print the figures as JSON")
    listing.set_defaults(handler=cmd_list)
    show = commands.add_parser("show", help="one profile: figures, where each section's numbers come from")
    show.add_argument("name", help="profile name (in hw_profiles/) or YAML path")
    show.add_argument("--json", action="store_true", help="print the whole profile as JSON")
    show.set_defaults(handler=cmd_show)
    derive = commands.add_parser("derive", help="a full profile from a datasheet spec YAML (see "
                                                "hw_profiles/datasheets/ and docs/hardware.md)")
    derive.add_argument("spec", help="datasheet spec YAML")
    derive.add_argument("--curves-from", help="comma-separated measured profiles whose curves to use (default: the "
                                              "same or nearest architecture's)")
    derive.add_argument("--name", help="profile name (default: the spec's)")
    derive.add_argument("--out", help="profile YAML to write (default hw_profiles/<name>.yaml)")
    derive.add_argument("--force", action="store_true", help="replace an existing file")
    derive.set_defaults(handler=cmd_derive)

"""The device a run executes on: choosing it, its default dtype and name, and the memory free on it."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from alisa_sim.errors import SpecError

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda: no CUDA GPU is available to torch on this machine (use --device cpu)")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads, {platform.machine()})"


def _meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise SpecError(f"/proc/meminfo has no {field}")


def host_available_bytes() -> int:
    """Host memory available to this run (Linux's MemAvailable)."""
    return _meminfo_bytes("MemAvailable")


def device_free_bytes(device: torch.device) -> int:
    """Memory free for this run on the device: CUDA's free memory, or the host's available memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return host_available_bytes()

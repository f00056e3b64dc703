"""The one convention for printed and plotted sizes: memory held (capacities, peaks, KV) in GiB = 2^30 bytes, bytes
moved (PCIe traffic) in GB = 10^9 bytes, always with the unit; a CPU device's memory is "device" memory."""

from __future__ import annotations

GiB = 2**30
GB = 10**9


def gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f} GiB"


def gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB"


def result_on_cpu_device(result: dict) -> bool:
    """Whether a Result ran (or was predicted) with the CPU as the device, from its run metadata."""
    return (result.get("run") or {}).get("device") == "cpu"


def memory_names(cpu_device: bool) -> tuple[str, str]:
    """What the two memories are called: GPU and CPU, or on a CPU device the device's and the host's (one RAM)."""
    return ("device", "host") if cpu_device else ("GPU", "CPU")


def phase_step(step: int | None, decode_steps: int) -> str:
    """A phase's first decode step as printed: "never" when the run ends before it."""
    return "never" if step is None or step > decode_steps else str(step)

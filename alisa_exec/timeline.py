"""The measured timeline of an executor run: step boundaries on the device clock, and ops on their own tracks.

Tracks are the machine's resources as the simulator names them: GPU compute, the H2D and D2H copy streams, and the
host CPU. On the GPU a span is a pair of CUDA events recorded on the stream the op was issued to (no host wait);
host work (CPU attention, gathers from the pinned pool) is timed on the host clock, aligned with the device clock at
the start of the run. On the CPU device everything runs synchronously, so spans are host-clock intervals.

Only the steps in `detailed` record op spans (events cost a few microseconds of host time each); step boundaries
are recorded for every step.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from alisa_exec.generate import DeviceClock
from alisa_exec.ledger import marked

@dataclass
class Span:
    track: str  # a resource as the simulator names it: "gpu", "h2d", "d2h" or "cpu"
    name: str
    kind: str  # a breakdown kind (alisa_sim.ops.KINDS)
    step: int
    layer: int
    start_s: float
    end_s: float


class Timeline:
    """Step marks and op spans of one run; `resolve()` turns them into seconds since the run started."""

    def __init__(self, device: torch.device, detailed: set[int]):
        self.cuda = device.type == "cuda"
        self.detailed = detailed
        self.step = 0
        self.layer = -1
        self.clock = DeviceClock(device)  # step boundaries
        self._spans: list[tuple] = []
        self._origin_host = 0.0

    def start(self) -> None:
        """The origin of the run's clock (the start of step 0)."""
        if self.cuda:
            torch.cuda.synchronize()
        self.clock.mark()
        if self.cuda:
            torch.cuda.synchronize()
        self._origin_host = time.perf_counter()
        marked("start")

    def end_step(self) -> None:
        """Mark the end of the current step on the compute stream (when its tokens are sampled)."""
        self.clock.mark()
        marked("end")
        self.step += 1

    @property
    def recording(self) -> bool:
        return self.step in self.detailed

    def span(self, track: str, name: str, kind: str, stream=None):
        """Time what the block issues: on `stream` (a CUDA stream; the current one when None), or on the host for the
        CPU track and on the CPU device."""
        if not self.recording:
            return nullcontext()
        return self._span(track, name, kind, stream)

    @contextmanager
    def _span(self, track: str, name: str, kind: str, stream):
        on_device = self.cuda and track != "cpu"
        if on_device:
            start = torch.cuda.Event(enable_timing=True)
            start.record(stream)
        else:
            start = time.perf_counter()
        yield
        if on_device:
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
        else:
            end = time.perf_counter()
        self._spans.append((track, name, kind, self.step, self.layer, start, end))

    def resolve(self) -> tuple[list[float], list[Span]]:
        """Step boundaries (seconds since the start; one more than the steps) and every recorded span."""
        marks = self.clock.seconds()

        def seconds(marker) -> float:
            if self.cuda and isinstance(marker, float):  # a CPU-track span, timed on the host
                return marker - self._origin_host
            return self.clock.since_start(marker)
        spans = [Span(track, name, kind, step, layer, seconds(start), seconds(end))
                 for track, name, kind, step, layer, start, end in self._spans]
        return marks, spans

"""The engine: times one step's per-layer op DAG on the machine's resources: the host that issues the ops, and the
device streams (GPU compute, H2D and D2H copy engines, CPU compute) that run them.

The host issues every op in program order (the head, the layers, the tail), spending each op's `host_s`. On a CUDA
device each stream runs its ops in issue order behind the host: an op starts once it is issued, every op it depends
on has finished and its stream is free, so prefetch overlap and launch-bound stretches both fall out of the
resources rather than out of a formula. On a CPU device host and device are one resource: every op takes its host
and device time one after the other (`host_is_device`). With `overlap=False` all device work runs on one serial
stream, which adds the terms (the paper's Eq. 4 accounting).

Since every op depends only on ops issued before it and each resource runs in issue order, one pass over the ops in
program order is the whole discrete-event simulation (the list schedule SimPy processes per resource would produce;
tests/test_engine.py checks the two against each other).

Layers are identical, so a step is a max-plus linear recurrence over layers driven by the host's issue times, which
grow by the layer's host time H per layer. The engine simulates the first few layers; once the completion times of
consecutive layers differ by one common shift P >= H for as many layers as the DAG reaches back, every later layer
provably repeats that shift (P > H means the host no longer binds: had it bound an op, that op's shift would be at
most H), and the rest is extrapolated exactly. If no period appears, more layers are simulated, up to all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from alisa_sim.ops import KINDS, LayerTemplate, Op

SERIAL = "serial"
HOST = "host"
_FIRST_UNROLL = 4
_REL_TOL = 1e-9


@dataclass(frozen=True)
class TimedOp:
    """An op placed in time, relative to the start of its step; layer -1 is the head, num_layers the tail."""

    resource: str
    name: str
    layer: int
    start: float
    end: float


class _Program:
    """A template's structure compiled for the list schedule: per op its lane (the resource it queues on), its label
    (the resource it is reported on) and its dependencies as indices into the layer's ops."""

    def __init__(self, template: LayerTemplate, lane_of: Callable[[Op], str], label_of: Callable[[Op], str],
                 compute_lane: str):
        layer_ops = template.ops
        index = {op.name: i for i, op in enumerate(layer_ops)}
        self.lane_names: list[str] = []
        self.names = [[op.name for op in ops] for ops in (template.head, layer_ops, template.tail)]
        self.labels = [[label_of(op) for op in ops] for ops in (template.head, layer_ops, template.tail)]
        self.lanes = [[self._lane(lane_of(op)) for op in ops] for ops in (template.head, layer_ops, template.tail)]
        deps = [[(index[src], lag) for src, lag in template.dependencies(op.name)] for op in layer_ops]
        # Per op, the indices of the ops of its own layer it waits on, and (index, lag) of those of earlier layers.
        self.same_layer_deps = [tuple(j for j, lag in op_deps if lag == 0) for op_deps in deps]
        self.earlier_deps = [tuple((j, lag) for j, lag in op_deps if lag > 0) for op_deps in deps]
        self.reach = max(1, template.max_lag)
        self.compute_lane = self._lane(compute_lane)  # the stream that samples the step's token

    def _lane(self, name: str) -> int:
        if name not in self.lane_names:
            self.lane_names.append(name)
        return self.lane_names.index(name)


@dataclass
class StepTiming:
    duration_s: float  # step start until the step's token is sampled
    carry_s: dict[str, float]  # per copy stream: how long it stays busy after the step ends
    busy_s: dict[str, float]  # device seconds per resource, and the host's issue seconds under "host"
    parts_s: dict[str, float]
    h2d_bytes: int
    d2h_bytes: int
    num_layers: int
    simulated_layers: int
    period_s: float  # per-layer shift of the collapsed layers (0 when every layer was simulated)
    _spans: Callable[[], Iterator[TimedOp]] = field(repr=False, compare=False, default=lambda: iter(()))

    def events(self) -> Iterator[TimedOp]:
        """Every op of the step in issue order, the collapsed layers reconstructed by shifting the last simulated
        layer."""
        return self._spans()


def _issue_in_order(lanes: list[int], device: list[float], host: list[float], clock: float,
                    free: list[float]) -> tuple[float, list[tuple[float, float]]]:
    """Ops with no dependencies but their lanes (the head, the tail), issued in order from host time `clock`: each
    starts once issued and its lane is free (`free` is updated). The host clock after them, and each op's span."""
    spans = []
    for lane, d, h in zip(lanes, device, host):
        clock += h
        start = max(clock, free[lane])
        free[lane] = start + d
        spans.append((start, start + d))
    return clock, spans


def _totals(sections: tuple[list[Op], list[Op], list[Op]], labels: list[list[str]],
            num_layers: int) -> tuple[dict[str, float], dict[str, float], int, int]:
    """Busy seconds per label (and the host's under "host"), seconds by kind, and H2D and D2H bytes of a step."""
    busy: dict[str, float] = {HOST: 0.0}
    host_busy = 0.0
    parts = dict.fromkeys(KINDS, 0.0)
    h2d = d2h = 0
    for ops, section_labels, count in zip(sections, labels, (1, num_layers, 1)):
        for op, label in zip(ops, section_labels):
            busy[label] = busy.get(label, 0.0) + count * op.duration_s
            host_busy += count * op.host_s
            for kind, seconds in op.parts:
                parts[kind] += count * seconds
            if op.nbytes:
                if op.resource == "h2d":
                    h2d += count * op.nbytes
                elif op.resource == "d2h":
                    d2h += count * op.nbytes
    busy[HOST] = host_busy
    return busy, parts, round(h2d), round(d2h)  # whole bytes per step (a layer's may be fractional)


class _Sweep:
    """The list schedule of a step's head and first layers, grown layer by layer (`run_to`): exact for those layers,
    because an op only ever waits on ops issued before it; growing it continues where it stopped."""

    def __init__(self, program: _Program, device: list, host: list, carry: dict[str, float]):
        self.free = [carry.get(name, 0.0) for name in program.lane_names]
        self.clock, self.head_spans = _issue_in_order(program.lanes[0], device[0], host[0], 0.0, self.free)
        self.layer_ops = list(zip(range(len(device[1])), program.lanes[1], program.same_layer_deps,
                                  program.earlier_deps, device[1], host[1]))
        self.starts: list[list[float]] = []
        self.ends: list[list[float]] = []

    def run_to(self, layers: int) -> None:
        clock, free, starts, ends, count = self.clock, self.free, self.starts, self.ends, len(self.layer_ops)
        for layer in range(len(ends), layers):
            row_start = [0.0] * count
            row_end = [0.0] * count
            for i, lane, same_layer, earlier, duration, host_s in self.layer_ops:
                clock += host_s
                t = free[lane] if free[lane] > clock else clock
                for j in same_layer:
                    if row_end[j] > t:
                        t = row_end[j]
                for j, lag in earlier:
                    if layer >= lag and ends[layer - lag][j] > t:
                        t = ends[layer - lag][j]
                row_start[i] = t
                free[lane] = row_end[i] = t + duration
            starts.append(row_start)
            ends.append(row_end)
        self.clock = clock


class StepSimulator:
    """Times steps one after another, carrying copy-stream backlogs from each step into the next."""

    def __init__(self, overlap: bool = True, host_is_device: bool = False):
        self.overlap = overlap
        self.host_is_device = host_is_device
        self.carry_s: dict[str, float] = {}  # the copy backlog the next step starts with
        self._programs: dict[tuple, _Program] = {}

    def _lane(self, op: Op) -> str:
        return op.resource if self.overlap and not self.host_is_device else SERIAL

    def _label(self, op: Op) -> str:
        return op.resource if self.overlap else SERIAL

    def program(self, template: LayerTemplate) -> _Program:
        """The compiled structure of a template, shared by every template of the same structure."""
        key = template.structure()
        program = self._programs.get(key)
        if program is None:
            compute = "gpu" if self.overlap and not self.host_is_device else SERIAL
            program = self._programs[key] = _Program(template, self._lane, self._label, compute)
        return program

    def run_step(self, template: LayerTemplate, num_layers: int) -> StepTiming:
        """Time the step after the previous one (its copy backlog delays this step's copies)."""
        timing = self.time_step(template, num_layers, self.carry_s)
        self.carry_s = timing.carry_s
        return timing

    def time_step(self, template: LayerTemplate, num_layers: int, carry: dict[str, float],
                  totals: tuple | None = None) -> StepTiming:
        """Time a step that starts with the copy streams busy for `carry` seconds; no state changes. `totals` are
        the template's `totals(template, num_layers)` where the caller has them already."""
        program = self.program(template)
        sections = (template.head, template.ops, template.tail)
        if self.host_is_device:  # one resource: each op's host time and device time in a row
            device = [[op.host_s + op.duration_s for op in ops] for ops in sections]
            host = [[0.0] * len(ops) for ops in sections]
        else:
            device = [[op.duration_s for op in ops] for ops in sections]
            host = [[op.host_s for op in ops] for ops in sections]
        layer_host_s = sum(host[1])
        unrolled = min(num_layers, max(_FIRST_UNROLL, 2 * program.reach + 2))
        sweep = _Sweep(program, device, host, carry)
        while True:
            sweep.run_to(unrolled)
            period = self._period(program, sweep.ends, layer_host_s) if unrolled < num_layers else 0.0
            if period is not None:
                break
            unrolled = min(num_layers, 2 * unrolled)
        return self._finish(sections, program, device, host, num_layers, unrolled, period, sweep,
                            totals or _totals(sections, program.labels, num_layers))

    def totals(self, template: LayerTemplate, num_layers: int) -> tuple[dict[str, float], dict[str, float], int, int]:
        """What a step of `template` keeps busy whatever its schedule: device seconds per reported resource and the
        host's issue seconds ("host"), device seconds by kind, and H2D and D2H bytes (StepTiming's busy_s, parts_s,
        h2d_bytes and d2h_bytes, computed alike)."""
        return _totals((template.head, template.ops, template.tail), self.program(template).labels, num_layers)

    @staticmethod
    def _period(program: _Program, ends: list[list[float]], layer_host_s: float) -> float | None:
        """The common per-layer shift if the last layers repeat exactly (long enough to be provably periodic), and
        no shorter than the host's time per layer (else the host is still falling behind and will bind)."""
        reach = program.reach
        layers = len(ends)
        if layers - 1 - reach < reach or not ends[0]:
            return None
        last = ends[-1]
        period = last[0] - ends[-2][0]
        tolerance = _REL_TOL * max(abs(value) for value in last)
        if period < layer_host_s - tolerance:
            return None
        for layer in range(layers - reach, layers):
            for now, before in zip(ends[layer], ends[layer - 1]):
                if abs(now - before - period) > tolerance:
                    return None
        return period

    def _finish(self, sections: tuple[list[Op], list[Op], list[Op]], program: _Program, device: list, host: list,
                num_layers: int, unrolled: int, period: float, sweep: _Sweep, totals: tuple) -> StepTiming:
        free, head_spans, starts, ends = sweep.free, sweep.head_spans, sweep.starts, sweep.ends
        shift = (num_layers - unrolled) * period
        lane_end = list(free)
        if shift:
            for lane, end in zip(program.lanes[1], ends[-1]):  # each lane's last op is in the last layer
                lane_end[lane] = max(lane_end[lane], end + shift)
        issued = sum(host[0]) + num_layers * sum(host[1])  # the host has issued every layer
        _, tail_spans = _issue_in_order(program.lanes[2], device[2], host[2], issued, lane_end)
        duration = lane_end[program.compute_lane]
        carry = {name: end - duration for name, end in zip(program.lane_names, lane_end) if end > duration}

        busy, parts, h2d, d2h = totals
        collapsed_period = period if unrolled < num_layers else 0.0

        def spans() -> Iterator[TimedOp]:
            for name, label, (start, end) in zip(program.names[0], program.labels[0], head_spans):
                yield TimedOp(label, name, -1, start, end)
            for layer in range(num_layers):
                row = min(layer, unrolled - 1)
                offset = (layer - row) * collapsed_period
                for name, label, start, end in zip(program.names[1], program.labels[1], starts[row], ends[row]):
                    yield TimedOp(label, name, layer, start + offset, end + offset)
            for name, label, (start, end) in zip(program.names[2], program.labels[2], tail_spans):
                yield TimedOp(label, name, num_layers, start, end)

        return StepTiming(duration, carry, busy, parts, h2d, d2h, num_layers, unrolled, collapsed_period, spans)


def _gb(nbytes: float) -> str:
    """GB with two decimals, or three significant digits below 10 MB (tiny models)."""
    return f"{nbytes / 1e9:.2f}" if nbytes >= 1e7 else f"{nbytes / 1e9:.3g}"


class OutOfMemory(Exception):
    """A placement needs more memory than a device has; reported as an `oom` Result, not raised to the user."""


class MemoryPool:
    """A device's memory, held by purpose (weights, kv, ...), with peak tracking. Nothing ever waits for memory (a
    placement that does not fit is an OutOfMemory result), so a level suffices where a SimPy container would only
    add events. `reserve` sets what the run holds throughout (a policy's static buffers), `hold` what a step holds
    beside it; a purpose in both counts both (the executor's window ring: the step's live rows and the ring's slack),
    and a held purpose `within` a reserved one is inside it (counted once, as the reservation)."""

    def __init__(self, device: str, capacity_bytes: int, within: dict[str, str] | None = None):
        self.device = device
        self.capacity_bytes = capacity_bytes
        self.within = within or {}
        self.reserved: dict[str, float] = {}
        self.held: dict[str, float] = {}
        self.level_bytes = 0.0
        self.peak_bytes = 0
        self.peak_usage: dict[str, float] = {}  # bytes by purpose when the peak was reached

    def usage(self) -> dict[str, float]:
        """Bytes by purpose, reserved and held together."""
        usage = dict(self.reserved)
        for purpose, nbytes in self.held.items():
            if purpose in self.within:
                outer = self.within[purpose]
                usage[outer] = max(usage.get(outer, 0.0), nbytes)
            else:
                usage[purpose] = usage.get(purpose, 0.0) + nbytes
        return usage

    def reserve(self, usage: dict[str, float], when: str) -> None:
        """Hold `usage` for the whole run (it replaces an earlier reservation); OutOfMemory if it would overflow."""
        self._set(usage, self.held, when)

    def hold(self, usage: dict[str, float], when: str) -> None:
        """Set the bytes held for each purpose in `usage` (others unchanged); OutOfMemory if it would overflow."""
        current = self.held
        for purpose, nbytes in usage.items():
            if current.get(purpose) != nbytes:
                break
        else:
            return  # nothing changes (most steps hold the CPU's or the GPU's KV as it was)
        self._set(self.reserved, {**current, **usage}, when)

    def _set(self, reserved: dict[str, float], held: dict[str, float], when: str) -> None:
        previous = self.reserved, self.held
        self.reserved, self.held = reserved, held
        total = sum(self.usage().values()) if self.within else sum(reserved.values()) + sum(held.values())
        if total > self.capacity_bytes:
            detail = ", ".join(f"{purpose} {_gb(nbytes)}" for purpose, nbytes in self.usage().items() if nbytes)
            self.reserved, self.held = previous
            raise OutOfMemory(f"out of {self.device} memory {when}: needs {_gb(total)} GB ({detail}) "
                              f"but the {self.device} has {_gb(self.capacity_bytes)} GB")
        self.level_bytes = total
        if total > self.peak_bytes or not self.peak_usage:
            self.peak_bytes = int(total)
            self.peak_usage = self.usage()

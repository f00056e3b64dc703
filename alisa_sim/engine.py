"""The SimPy engine: runs one step's per-layer op DAG on the machine's streams (GPU, H2D, D2H, CPU) and times it.

Each resource is a SimPy process that executes its ops in issue order, an op starting once the resource is
free and every op it depends on has finished: CUDA-stream semantics, so prefetch overlap falls out of the
resources rather than out of a formula. With `overlap=False` every op runs on one serial resource, which
adds the terms (the paper's Eq. 4 accounting).

Layers are identical, so a step is a max-plus linear recurrence over layers. The engine simulates the first
few layers; once the completion times of consecutive layers differ by one common shift for as many layers as
the DAG reaches back, every later layer provably repeats that shift, and the rest is extrapolated exactly.
If no period appears, more layers are simulated, up to all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import simpy

from alisa_sim.ops import KINDS, LayerTemplate, Op

SERIAL = "serial"
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


@dataclass
class StepTiming:
    duration_s: float  # step start until the step's token is sampled
    carry_s: dict[str, float]  # per copy stream: how long it stays busy after the step ends
    busy_s: dict[str, float]
    parts_s: dict[str, float]
    h2d_bytes: int
    d2h_bytes: int
    num_layers: int
    simulated_layers: int
    period_s: float  # per-layer shift of the collapsed layers (0 when every layer was simulated)
    timed_ops: list[TimedOp] = field(repr=False)

    def events(self) -> Iterator[TimedOp]:
        """Every op of the step, the collapsed layers reconstructed by shifting the last simulated layer."""
        yield from self.timed_ops
        last = self.simulated_layers - 1
        period_ops = [t for t in self.timed_ops if t.layer == last]
        for layer in range(self.simulated_layers, self.num_layers):
            shift = (layer - last) * self.period_s
            for t in period_ops:
                yield TimedOp(t.resource, t.name, layer, t.start + shift, t.end + shift)


class StepSimulator:
    """Times steps one after another, carrying copy-stream backlogs from each step into the next."""

    def __init__(self, overlap: bool = True):
        self.overlap = overlap
        self._carry: dict[str, float] = {}

    def _resource(self, op: Op) -> str:
        return op.resource if self.overlap else SERIAL

    def run_step(self, template: LayerTemplate, num_layers: int) -> StepTiming:
        unrolled = min(num_layers, max(_FIRST_UNROLL, 2 * max(1, template.max_lag) + 2))
        while True:
            ends, timed = self._simulate(template, unrolled)
            period = self._period(template, ends, unrolled) if unrolled < num_layers else 0.0
            if period is not None:
                break
            unrolled = min(num_layers, 2 * unrolled)
        return self._finish(template, num_layers, unrolled, period, ends, timed)

    def _simulate(self, template: LayerTemplate, layers: int) -> tuple[dict, list[TimedOp]]:
        """Run the first `layers` layers (plus the head) in a fresh SimPy environment; exact for those layers,
        because an op only ever waits on ops of its own or earlier layers."""
        env = simpy.Environment()
        done: dict[tuple[int, str], simpy.Event] = {}
        ends: dict[tuple[int, str], float] = {}
        timed: list[TimedOp] = []
        queues: dict[str, list[tuple[int, Op]]] = {}
        for op in template.head:
            queues.setdefault(self._resource(op), []).append((-1, op))
        names = list(template.graph.nodes)
        for layer in range(layers):
            for name in names:
                op = template.graph.nodes[name]["op"]
                queues.setdefault(self._resource(op), []).append((layer, op))
        for queue in queues.values():
            for layer, op in queue:
                done[(layer, op.name)] = env.event()
        deps = {name: template.dependencies(name) for name in names}

        def stream(resource: str, queue: list[tuple[int, Op]]):
            ready = self._carry.get(resource, 0.0)
            if ready > 0:
                yield env.timeout(ready)
            for layer, op in queue:
                for src, lag in deps.get(op.name, ()) if layer >= 0 else ():
                    if layer - lag >= 0 and not (event := done[(layer - lag, src)]).processed:
                        yield event
                start = env.now
                yield env.timeout(op.duration_s)
                ends[(layer, op.name)] = env.now
                timed.append(TimedOp(resource, op.name, layer, start, env.now))
                done[(layer, op.name)].succeed()

        for resource, queue in queues.items():
            env.process(stream(resource, queue))
        env.run()
        return ends, timed

    @staticmethod
    def _period(template: LayerTemplate, ends: dict, layers: int) -> float | None:
        """The common per-layer shift if the last layers repeat exactly (long enough to be provably periodic)."""
        reach = max(1, template.max_lag)
        if layers - 1 - reach < reach:
            return None
        names = list(template.graph.nodes)
        period = ends[(layers - 1, names[0])] - ends[(layers - 2, names[0])]
        tolerance = _REL_TOL * max(1.0, ends[(layers - 1, names[0])])
        for layer in range(layers - reach, layers):
            for name in names:
                if abs(ends[(layer, name)] - ends[(layer - 1, name)] - period) > tolerance:
                    return None
        return period

    def _finish(self, template: LayerTemplate, num_layers: int, unrolled: int, period: float,
                ends: dict, timed: list[TimedOp]) -> StepTiming:
        shift = (num_layers - unrolled) * period
        stream_end: dict[str, float] = {}
        for t in timed:
            end = t.end + (shift if t.layer == unrolled - 1 else 0.0)
            stream_end[t.resource] = max(stream_end.get(t.resource, 0.0), end)
        gpu = "gpu" if self.overlap else SERIAL
        clock = stream_end.get(gpu, 0.0)
        for op in template.tail:  # after the last layer's GPU work: final norm, LM head, sampling
            timed.append(TimedOp(self._resource(op), op.name, num_layers, clock, clock + op.duration_s))
            clock += op.duration_s
        duration = max(clock, stream_end.get(gpu, 0.0))
        self._carry = {res: end - duration for res, end in stream_end.items() if end > duration}

        busy: dict[str, float] = {}
        parts = dict.fromkeys(KINDS, 0.0)
        h2d = d2h = 0
        for op, count in [(op, num_layers) for op in template.ops] + [(op, 1) for op in template.head + template.tail]:
            busy[self._resource(op)] = busy.get(self._resource(op), 0.0) + count * op.duration_s
            for kind, seconds in op.parts:
                parts[kind] += count * seconds
            if op.resource == "h2d":
                h2d += count * op.nbytes
            elif op.resource == "d2h":
                d2h += count * op.nbytes
        return StepTiming(duration, dict(self._carry), busy, parts, h2d, d2h, num_layers, unrolled,
                          period if unrolled < num_layers else 0.0, timed)


def _gb(nbytes: float) -> str:
    """GB with two decimals, or three significant digits below 10 MB (tiny models)."""
    return f"{nbytes / 1e9:.2f}" if nbytes >= 1e7 else f"{nbytes / 1e9:.3g}"


class OutOfMemory(Exception):
    """A placement needs more memory than a device has; reported as an `oom` Result, not raised to the user."""


class MemoryPool:
    """A device's memory as a SimPy container, held by purpose (weights, kv, ...), with peak tracking."""

    def __init__(self, env: simpy.Environment, device: str, capacity_bytes: int):
        self.device = device
        self.container = simpy.Container(env, capacity=capacity_bytes, init=0)
        self.held: dict[str, float] = {}
        self.peak_bytes = 0

    @property
    def capacity_bytes(self) -> int:
        return int(self.container.capacity)

    def hold(self, usage: dict[str, float], when: str) -> None:
        """Set the bytes held for each purpose in `usage` (others unchanged); OutOfMemory if it would overflow."""
        held = {**self.held, **usage}
        total = sum(held.values())
        if total > self.container.capacity:
            detail = ", ".join(f"{purpose} {_gb(nbytes)}" for purpose, nbytes in held.items() if nbytes)
            raise OutOfMemory(f"out of {self.device} memory {when}: needs {_gb(total)} GB ({detail}) "
                              f"but the {self.device} has {_gb(self.container.capacity)} GB")
        delta = total - self.container.level
        if delta > 0:
            self.container.put(delta)
        elif delta < 0:
            self.container.get(-delta)
        self.held = held
        self.peak_bytes = max(self.peak_bytes, int(total))

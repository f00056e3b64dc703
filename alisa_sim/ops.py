"""Entities of a simulated step: timed operations on a machine resource, and the per-layer op DAG a policy emits."""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

RESOURCES = ("gpu", "h2d", "d2h", "cpu")
# Breakdown categories of the Result JSON (time an op spends, by what it does).
KINDS = ("gemm", "attention", "elementwise", "selection", "h2d", "d2h", "recompute", "cpu")


@dataclass(frozen=True)
class Op:
    """One operation: it occupies `resource` for `duration_s`; `parts` splits that time by kind for the breakdown."""

    name: str
    resource: str
    parts: tuple[tuple[str, float], ...]
    nbytes: int = 0  # bytes moved over PCIe (h2d / d2h ops)
    duration_s: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "duration_s", sum(seconds for _, seconds in self.parts))


def make_op(name: str, resource: str, parts: dict[str, float], kernels: int = 1, launch_overhead_s: float = 0.0,
            nbytes: int = 0) -> Op:
    """An op whose time is its device work, or the host's time to launch its kernels when that is longer.

    The host issues kernels ahead of the GPU, so in steady state an op takes max(device time, launches);
    the launch-bound excess is attributed to the op's kinds in proportion.
    """
    if resource not in RESOURCES:
        raise ValueError(f"unknown resource {resource!r}")
    unknown = set(parts) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown op kinds {sorted(unknown)}")
    device_s = sum(parts.values())
    floor_s = kernels * launch_overhead_s
    if device_s < floor_s:
        scale = floor_s / device_s if device_s > 0 else 0.0
        parts = {kind: seconds * scale for kind, seconds in parts.items()} if device_s > 0 else {next(iter(parts)): floor_s}
    return Op(name, resource, tuple(parts.items()), nbytes)


@dataclass
class LayerTemplate:
    """The ops of one transformer layer in one step, identical for every layer, plus ops before and after the layers.

    Edges carry a `lag`: 0 for a dependency inside the layer, 1 on the previous layer's op, 2 on the one before
    (double buffering: a prefetch may reuse a buffer only once the op two layers back has consumed it).
    Each resource runs its ops in issue order: layer by layer, within a layer in the order they were added
    (a CUDA stream's semantics).
    """

    graph: nx.DiGraph = field(default_factory=nx.DiGraph)
    head: list[Op] = field(default_factory=list)  # on the GPU before layer 0 (embedding)
    tail: list[Op] = field(default_factory=list)  # on the GPU after the last layer (final norm, LM head, sampling)

    def add(self, op: Op, after: tuple[str, ...] = (), after_previous: tuple[tuple[str, int], ...] = ()) -> None:
        """Add `op` depending on ops of this layer (`after`) and on (name, lag) ops of earlier layers."""
        if op.name in self.graph:
            raise ValueError(f"duplicate op {op.name!r}")
        self.graph.add_node(op.name, op=op)
        for name in after:
            self._edge(name, op.name, 0)
        for name, lag in after_previous:
            self.link(name, op.name, lag)

    def link(self, src: str, dst: str, lag: int) -> None:
        """`dst` waits for `src` of `lag` layers back (for ops added in the other order)."""
        if lag < 1:
            raise ValueError("a link between layers needs a lag of at least 1")
        self._edge(src, dst, lag)

    def _edge(self, src: str, dst: str, lag: int) -> None:
        if src not in self.graph or dst not in self.graph:
            raise ValueError(f"{dst!r} depends on unknown op {src!r}")
        self.graph.add_edge(src, dst, lag=lag)

    @property
    def ops(self) -> list[Op]:
        return [self.graph.nodes[name]["op"] for name in self.graph.nodes]

    @property
    def max_lag(self) -> int:
        return max((lag for _, _, lag in self.graph.edges(data="lag")), default=0)

    def dependencies(self, name: str) -> list[tuple[str, int]]:
        return [(src, lag) for src, _, lag in self.graph.in_edges(name, data="lag")]

"""Entities of a simulated step: timed operations on a machine resource, and the per-layer op DAG a policy emits."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

RESOURCES = ("gpu", "h2d", "d2h", "cpu")
# Breakdown categories of the Result JSON (time an op spends, by what it does).
KINDS = ("gemm", "attention", "elementwise", "selection", "h2d", "d2h", "recompute", "cpu")


@dataclass(frozen=True)
class Op:
    """One operation: the host spends `host_s` issuing it, then it occupies `resource` for `duration_s` of device time;
    `parts` splits the device time by kind for the breakdown."""

    name: str
    resource: str
    parts: tuple[tuple[str, float], ...]
    nbytes: float = 0  # bytes moved over PCIe (h2d / d2h ops); fractional where a layer averages a step's rows
    host_s: float = 0.0  # host time to issue the op (its kernel launches, a copy's call), filled by the cost model
    # The executor's named ops (alisa_sim.hardware.NAMED_OPS) the op was priced from: (name, sorted shape items).
    calls: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    duration_s: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "duration_s", sum(seconds for _, seconds in self.parts))


_KINDS = frozenset(KINDS)


def make_op(name: str, resource: str, parts: dict[str, float], host_s: float = 0.0, nbytes: float = 0,
            calls: tuple = ()) -> Op:
    """An op of `parts` device seconds by kind on `resource`, issued by the host in `host_s` (the engine puts the two
    on separate resources: on a GPU the device runs behind the host, on a CPU device they add)."""
    if resource not in RESOURCES:
        raise ValueError(f"unknown resource {resource!r}")
    if not _KINDS.issuperset(parts):
        raise ValueError(f"unknown op kinds {sorted(set(parts) - _KINDS)}")
    if host_s < 0 or any(seconds < 0 for seconds in parts.values()):
        raise ValueError(f"op {name!r} has a negative time")
    return Op(name, resource, tuple(parts.items()), nbytes, host_s, calls)


@dataclass
class LayerTemplate:
    """The ops of one transformer layer in one step, identical for every layer, plus ops before and after the layers.

    Edges carry a `lag`: 0 for a dependency inside the layer, 1 on the previous layer's op, 2 on the one before
    (double buffering: a prefetch may reuse a buffer only once the op two layers back has consumed it).
    The host issues the ops in program order (the head, then layer by layer in the order they were added, then the
    tail) and each resource runs its ops in that order (a CUDA stream's semantics). An op only ever depends on ops
    issued before it.
    """

    head: list[Op] = field(default_factory=list)  # on the GPU before layer 0 (embedding)
    tail: list[Op] = field(default_factory=list)  # on the GPU after the last layer (final norm, LM head, sampling)
    _ops: dict[str, Op] = field(default_factory=dict, repr=False)  # by name, in the order added
    _lags: dict[tuple[str, str], int] = field(default_factory=dict, repr=False)  # (src, dst) -> lag
    # structure() as last computed, with the head and tail it saw (the layer's ops and edges reset it)
    _structure: tuple | None = field(default=None, repr=False, compare=False)

    def add(self, op: Op, after: tuple[str, ...] = (), after_previous: tuple[tuple[str, int], ...] = ()) -> None:
        """Add `op` depending on ops of this layer (`after`) and on (name, lag) ops of earlier layers."""
        if op.name in self._ops:
            raise ValueError(f"duplicate op {op.name!r}")
        self._ops[op.name] = op
        self._structure = None
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
        if src not in self._ops or dst not in self._ops:
            raise ValueError(f"{dst!r} depends on unknown op {src!r}")
        # A pair linked twice keeps the shorter lag: waiting on this layer's op implies waiting on an earlier one's.
        self._lags[src, dst] = min(lag, self._lags.get((src, dst), lag))
        self._structure = None

    @property
    def ops(self) -> list[Op]:
        return list(self._ops.values())

    def with_ops(self, ops: list[Op]) -> LayerTemplate:
        """A template with this one's edges and a copy of its head and tail around `ops`, which replace the layer's
        ops one for one (the same names and resources, in order): a DAG wired once, its ops priced per step."""
        if [(op.name, op.resource) for op in ops] != [(op.name, op.resource) for op in self._ops.values()]:
            raise ValueError("with_ops takes the template's ops, by name and resource, in their order")
        # The same names, resources, edges, head and tail: the same structure (kept, as structure() checks).
        return LayerTemplate(list(self.head), list(self.tail), {op.name: op for op in ops}, dict(self._lags),
                             self._structure)

    @property
    def graph(self):
        """The layer's DAG as a networkx DiGraph (nodes carry `op`, edges `lag`), for inspecting and drawing it; the
        engine and the planners read `ops` and `edges` directly (so a run never imports networkx)."""
        import networkx as nx

        graph = nx.DiGraph()
        graph.add_nodes_from((name, {"op": op}) for name, op in self._ops.items())
        graph.add_edges_from((src, dst, {"lag": lag}) for (src, dst), lag in self._lags.items())
        return graph

    @property
    def edges(self) -> list[tuple[str, str, int]]:
        """(src, dst, lag) of every dependency, in the order they were added."""
        return [(src, dst, lag) for (src, dst), lag in self._lags.items()]

    @property
    def max_lag(self) -> int:
        return max(self._lags.values(), default=0)

    def dependencies(self, name: str) -> list[tuple[str, int]]:
        return [(src, lag) for (src, dst), lag in self._lags.items() if dst == name]

    def calls(self, num_layers: int) -> Counter:
        """The executor's named ops one step of this template issues, by (name, shape items): the head's and the
        tail's once, every layer's `num_layers` times."""
        count: Counter = Counter()
        for op in self.head + self.tail:
            count.update(op.calls)
        for op in self._ops.values():
            for call in op.calls:
                count[call] += num_layers
        return count

    def structure(self) -> tuple:
        """What the engine's schedule depends on besides times: ops and their resources in issue order, and the
        edges. Two templates with the same structure differ only in their ops' times and bytes (asked for every
        time a step is timed, so it is kept until the ops change)."""
        ends = (tuple(self.head), tuple(self.tail))
        if self._structure is None or self._structure[0] != ends:
            ops = [*self.head, *self._ops.values(), *self.tail]
            self._structure = ends, (len(self.head), len(self.tail), tuple([(op.name, op.resource) for op in ops]),
                                     tuple(self._lags.items()))
        return self._structure[1]

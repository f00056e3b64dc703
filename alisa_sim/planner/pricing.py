"""How the planners price a candidate without simulating its whole run: the engine's time of a few sampled steps, and
a lower bound on a step's engine time read off its op DAG alone, so that a candidate the bound rules out is never
simulated.

The bound holds for the engine's semantics (engine.py): every op on a resource runs after the ones issued before it
on that resource, an op starts only once its dependencies have ended, and the tail (final norm, LM head) runs after
the GPU's last op. So a fresh step (no copy backlog carried in) lasts at least
- the GPU's busy time plus the tail, and
- for each other resource and each of its ops X in the last layer: the time that resource is busy up to X (all of
  its earlier ops run before X) plus the longest chain of ops that depend on X inside that layer and end on the GPU,
  plus the tail.
Every term also waits for the host to issue the step's first op. A backlog carried in only delays a step (the engine
is monotone in start times), so the bound holds there too. Without overlap every op runs on one serial resource and
the bound is the first op's issue plus the sum of all op times, exact unless the host falls behind the device.
"""

from __future__ import annotations

import numpy as np

from alisa_sim.ops import LayerTemplate
from alisa_sim.policies.base import Policy

# A bound compared with an exact time is taken this much lower, so that rounding in the two sums never prunes a
# candidate whose exact time ties the best one.
BOUND_SLACK = 1e-9


def sampled_steps(first: int, last: int, count: int) -> tuple[list[int], float]:
    """At most `count` decode steps spread evenly over first..last (both ends included), and how many steps of the
    range each stands for."""
    span = last - first + 1
    if span <= 0:  # no decode step (gen_len 1: the prefill makes the only token)
        return [], 0.0
    samples = sorted({int(x) for x in np.linspace(first, last, min(span, count)).round()})
    return samples, span / len(samples)


def step_time_s(policy: Policy, template: LayerTemplate) -> float:
    """The engine's time of one of `policy`'s steps run fresh (no copy backlog from an earlier step)."""
    return policy.stepper().run_step(template, policy.model.num_layers).duration_s


def step_lower_bound_s(template: LayerTemplate, num_layers: int, overlap: bool) -> float:
    """A lower bound on `step_time_s` of the template, from its op times and dependencies (see the module)."""
    ops = {op.name: op for op in template.ops}  # in issue order
    # Nothing runs before the host has issued the first op.
    tail_s = sum(op.duration_s for op in template.tail) + (template.head[0].host_s if template.head else 0.0)
    if not overlap:
        return sum(op.duration_s for op in template.head) + num_layers * sum(op.duration_s for op in ops.values()) \
            + tail_s
    busy: dict[str, float] = {}
    for op in template.head:
        busy[op.resource] = busy.get(op.resource, 0.0) + op.duration_s
    for op in ops.values():
        busy[op.resource] = busy.get(op.resource, 0.0) + num_layers * op.duration_s
    bound = busy.get("gpu", 0.0)
    # to_gpu[name]: the longest chain of ops after `name` in its layer that ends on the GPU (0 for a GPU op with none
    # after it); None when nothing on the GPU depends on it within the layer.
    successors: dict[str, list[str]] = {name: [] for name in ops}
    for src, dst, lag in template.edges:
        if lag == 0:
            successors[src].append(dst)
    to_gpu: dict[str, float | None] = {}
    # An op depends only on ops issued before it (LayerTemplate), so the issue order, reversed, visits every op after
    # the ops that depend on it.
    for name in reversed(ops):
        chains = [ops[after].duration_s + to_gpu[after] for after in successors[name] if to_gpu[after] is not None]
        if ops[name].resource == "gpu":
            chains.append(0.0)
        to_gpu[name] = max(chains, default=None)
    issued_after: dict[str, float] = {}  # per resource: time of its ops issued after the one at hand in the layer
    for name in reversed(ops):
        resource = ops[name].resource
        if resource != "gpu" and to_gpu[name] is not None:
            bound = max(bound, busy[resource] - issued_after.get(resource, 0.0) + to_gpu[name])
        issued_after[resource] = issued_after.get(resource, 0.0) + ops[name].duration_s
    return bound + tail_s


def at_least(bound_s: float, than_s: float) -> bool:
    """Whether a lower bound proves a time no shorter than `than_s`, rounding aside."""
    return bound_s * (1 - BOUND_SLACK) >= than_s


def beyond(bound_s: float, than_s: float) -> bool:
    """Whether a lower bound proves a time strictly longer than `than_s`, rounding aside."""
    return bound_s * (1 - BOUND_SLACK) > than_s

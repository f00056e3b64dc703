"""The policy interface: a policy decides where weights and KV live and what moves each step; the engine times it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator

from alisa_sim.cost_model import CostModel
from alisa_sim.engine import StepSimulator
from alisa_sim.model_spec import aligned_seq_len
from alisa_sim.ops import LayerTemplate, Op, make_op
from alisa_sim.workload import ResolvedWorkload

# MemoryUse and StepPlan are built for every step of a run (100,000 in a long one): slotted and, since a frozen
# dataclass's __init__ costs five times as much, not frozen; nothing changes them once built.
@dataclass(slots=True)
class MemoryUse:
    """Bytes a policy holds on each device, with a by-purpose breakdown for error messages and reports."""

    gpu: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def gpu_bytes(self) -> int:
        return int(sum(self.gpu.values()))

    @property
    def cpu_bytes(self) -> int:
        return int(sum(self.cpu.values()))


@dataclass(slots=True)
class StepPlan:
    """One step a policy wants run: the op DAG of a layer, the KV held meanwhile, and what the step achieves.

    `phase` is the KV phase (1: all KV on the GPU, 2: part or all of it on the CPU, 3: part of it deleted and
    recomputed); `counters` are per-step event counts a policy reports (preemptions, recomputed tokens, ...),
    summed into the Result's metrics.
    """

    template: LayerTemplate
    phase: int
    kv: MemoryUse
    kind: str  # "prefill" | "decode"
    label: str
    tokens: int  # token rows the step computes: prompt tokens in a prefill, one per sequence in a decode step
    sequences: int  # sequences in the step, each sampling one token
    counters: dict[str, float] = field(default_factory=dict)


class Policy(ABC):
    """Base of every KV/weight placement policy. Subclasses set `name` and implement the hooks below."""

    name: str
    # A step's purpose held inside a reserved one (vLLM's swapped-out blocks in its swap space): counted once.
    held_within: dict[str, str] = {}

    def __init__(self, workload: ResolvedWorkload, cost: CostModel):
        self.wl = workload
        self.model = workload.model
        self.cost = cost
        self.batch = workload.workload.batch_size
        self.prompt_len = workload.workload.prompt_len
        # Ops already priced, by everything they are priced from: a run builds thousands of step DAGs whose ops,
        # but for attention and KV copies, repeat from step to step (a view made by copy.copy shares it).
        # Apart per in-step context (`in_step_key`): one op prices differently after a heavier phase's ops.
        self._priced_ops: dict[tuple, Op | tuple | dict] = {}
        self._priced_by_context: dict[str, dict[tuple, Op | tuple | dict]] = {}
        self._in_step_context: str | None = None
        self._kv_bytes_per_token = self.model.kv_bytes_per_token()  # asked for every step of a long run

    # ---- what a policy decides -----------------------------------------------------------------
    @abstractmethod
    def static_memory(self) -> MemoryUse:
        """Everything held for the whole run: weights, activation and staging buffers."""

    @abstractmethod
    def kv_memory(self, context: int) -> MemoryUse:
        """KV cache bytes per device when every sequence holds `context` tokens."""

    @abstractmethod
    def prefill_template(self) -> LayerTemplate:
        """The prompt pass over all sequences."""

    @abstractmethod
    def decode_template(self, step: int) -> LayerTemplate:
        """Decode step `step` (1-based): one new token per sequence attending over prompt_len + step tokens."""

    def phase(self, step: int) -> int:
        """The KV phase of a step (0 is the prefill)."""
        return 1

    def steps(self) -> Iterator[StepPlan]:
        """The run, step by step: the prefill of the whole batch, then gen_len - 1 decode steps."""
        yield StepPlan(self.prefill_template(), self.phase(0), self.kv_memory(self.prompt_len), "prefill", "prefill",
                       self.batch * self.prompt_len, self.batch, self.token_rows(0))
        for step in range(1, self.wl.decode_steps + 1):
            yield StepPlan(self.decode_template(step), self.phase(step), self.kv_memory(self.context(step)),
                           "decode", f"decode {step}", self.batch, self.batch, self.token_rows(step))

    def decode_variant(self, step: int) -> object:
        """What sets which ops decode step `step` runs beyond its context length: its phase, and whatever else a
        policy switches from step to step (the simulator collapses only runs of steps of one variant)."""
        return self.phase(step)

    def token_rows(self, step: int) -> dict[str, float]:
        """Token rows (one token of one layer of one sequence) the step moves, recomputes or evicts, by counter
        (`fetched_tokens`, `offloaded_tokens`, `recomputed_tokens`, `evicted_tokens`), as the executor counts them
        where its copies happen; none for a policy that keeps its KV where it is."""
        return {}

    def placement(self) -> dict[str, float]:
        """Share of weights and KV kept on the GPU (the rest is on the CPU)."""
        return {"weights_gpu": 1.0, "kv_gpu": 1.0}

    def plan(self) -> dict:
        """The Plan JSON the executor runs: the workload (which a runner loads back), the policy, its resolved
        parameters and placement."""
        return {"workload": self.wl.workload.model_dump(mode="json"), "policy": self.name,
                "params": self.wl.policy.model_dump(exclude={"name"}), "placement": self.placement()}

    # ---- op builders shared by policies -----------------------------------------------------------
    def context(self, step: int) -> int:
        return self.prompt_len + step

    @property
    def positions(self) -> int:
        """Positions whose K/V the run computes (the last generated token's never is): what the executor's
        preallocated KV buffers are sized for."""
        return self.prompt_len + self.wl.workload.gen_len - 1

    def kv_slack(self, allocated: MemoryUse) -> MemoryUse:
        """What preallocated KV pools (`allocated`, by device and purpose) hold beyond the live KV of each device's
        fullest step (`kv_memory`): reserved for the whole run beside each step's live KV, so that the simulated
        peak is the executor's allocation, purpose by purpose."""
        steps = [self.kv_memory(self.context(step)) for step in range(self.wl.decode_steps + 1)]
        gpu = max(steps, key=lambda use: use.gpu_bytes).gpu
        cpu = max(steps, key=lambda use: use.cpu_bytes).cpu
        return MemoryUse(gpu={purpose: nbytes - gpu.get(purpose, 0.0) for purpose, nbytes in allocated.gpu.items()},
                         cpu={purpose: nbytes - cpu.get(purpose, 0.0) for purpose, nbytes in allocated.cpu.items()})

    def _priced(self, *calls: tuple[str, dict[str, int]]) -> tuple[float, float]:
        """Device and host seconds of a sequence of the executor's named ops, each from its profile row."""
        context = self.in_step_key()
        return (sum(self.cost.op_s(op, context, **shape) for op, shape in calls),
                sum(self.cost.op_host_s(op) for op, _ in calls))

    def _gpu_op(self, name: str, parts: dict[str, tuple[tuple[str, dict[str, int]], ...]],
                extra_host_s: float = 0.0) -> Op:
        """A GPU op whose parts (by kind) are sequences of named executor ops, device and host time from their rows
        (and `extra_host_s` of the executor's own host time around them)."""
        key = tuple((kind, *((op, *shape.items()) for op, shape in calls)) for kind, calls in parts.items())
        if (op := self._priced_ops.get((name, key, extra_host_s))) is None:
            if (priced := self._priced_ops.get(key)) is None:  # the same work under another name (FlexGen's batches)
                priced = self._priced_ops[key] = {kind: self._priced(*calls) for kind, calls in parts.items()}
            op = self._priced_ops[name, key, extra_host_s] = make_op(
                name, "gpu", {kind: device for kind, (device, _) in priced.items()},
                host_s=extra_host_s + sum(host for _, host in priced.values()),
                calls=tuple((op, tuple(sorted(shape.items()))) for calls in parts.values() for op, shape in calls))
        return op

    def host_of(self, *ops: str) -> float:
        """The host's time issuing these named executor ops (from their profile rows)."""
        return sum(self.cost.op_host_s(op) for op in ops)

    def _rows(self, rows: int, width: int | None = None) -> dict[str, int]:
        return {"rows": rows, "width": width or self.model.hidden_size, "e": self.model.dtype_bytes}

    def _norm(self, rows: int) -> dict[str, int]:
        return {**self._rows(rows), "rms": int(self.model.rms_norm)}

    @property
    def packs_weights(self) -> bool:
        """Whether the executor keeps the projections' weights packed for MKL's GEMM at the decode batch (the dense
        policy on a CPU device in float32); a GEMM of exactly that many rows then runs packed."""
        return False

    def _project(self, gemm) -> tuple[str, dict[str, int]]:
        packed = self.packs_weights and gemm.m == self.batch
        return "project_packed" if packed else "project", {"m": gemm.m, "k": gemm.k, "n": gemm.n,
                                                           "e": self.model.dtype_bytes}

    def host_key(self, phase: int) -> str:
        """Which measured host overhead (`gpu.host_overheads`) prices this policy's steps in `phase`: the executor
        policy's own (its hooks run their own Python around the named ops)."""
        return self.name

    def in_step_key(self) -> str:
        """Whose in-step factors (`gpu.in_step`) price the named ops built now: the executor policy's steps they run
        in, in the phase `set_pricing_phase` last named (the first), as `host_key` names them."""
        return self._in_step_context or self.host_key(1)

    def set_pricing_phase(self, phase: int) -> None:
        """Price the ops built from now on as ops of `phase`'s steps (their own in-step factors and cache)."""
        context = self.host_key(phase)
        if context != self.in_step_key():
            self._priced_by_context.setdefault(self.in_step_key(), self._priced_ops)
            self._priced_ops = self._priced_by_context.setdefault(context, {})
            self._in_step_context = context

    def host_overhead_s(self, kind: str, phase: int = 1) -> tuple[float, float]:
        """The executor's own host seconds per step (for this policy's batch) and per layer (and row group) of a
        `kind` step in `phase`, beyond its named ops, as the profile measured them; none where it did not."""
        row = self.wl.hardware.gpu.host_overhead(self.host_key(phase), kind)
        return (row.step_s + self.batch * row.sequence_s, row.layer_s) if row else (0.0, 0.0)

    def pre_attention_op(self, rows: int, kind: str, name: str = "qkv_proj", phase: int = 1) -> Op:
        """Input norm, the fused QKV projection and the head split with rotary embeddings over `rows` token rows
        (the executor's `qkv_proj` span) in a `kind` step, with the layer loop's own host time."""
        key = ("pre_attention", rows, name, self.batch, kind, phase)  # the batch too, for views of another batch
        if (op := self._priced_ops.get(key)) is None:
            op = self._priced_ops[key] = self._pre_attention_op(rows, name, self.host_overhead_s(kind, phase)[1])
        return op

    def _pre_attention_op(self, rows: int, name: str, layer_host_s: float) -> Op:
        m = self.model
        qkv = m.layer_gemms(rows)[0]
        return self._gpu_op(name, {"gemm": (self._project(qkv),),
                                   "elementwise": (("norm", self._norm(rows)),
                                                   ("split_heads", self._rows(rows, m.q_dim + 2 * m.kv_dim)))},
                            extra_host_s=layer_host_s)

    def post_attention_op(self, rows: int, name: str = "out_proj_mlp") -> Op:
        """Output projection, residuals, post-attention norm, the MLP's projections and activation over `rows` token
        rows (the executor's `out_proj_mlp` span)."""
        key = ("post_attention", rows, name, self.batch)  # the batch too, for views of another batch (vLLM's)
        if (op := self._priced_ops.get(key)) is None:
            op = self._priced_ops[key] = self._post_attention_op(rows, name)
        return op

    def _post_attention_op(self, rows: int, name: str) -> Op:
        m = self.model
        return self._gpu_op(name, {
            "gemm": tuple(self._project(g) for g in m.layer_gemms(rows)[1:]),
            "elementwise": (("residual", self._rows(rows)), ("norm", self._norm(rows)),
                            ("activate", {**self._rows(rows, m.ffn_dim), "gated": int(m.gated_mlp)}),
                            ("residual", self._rows(rows)))})

    def decode_attention_op(self, context: int, batch: int | None = None, kv_heads: int | None = None,
                            name: str = "attention", path: str = "rows_attention") -> Op:
        """Decode attention of `batch` sequences (default: all) over `kv_heads` KV heads (default: all) on the GPU,
        along the executor's attention `path` (a named op)."""
        return self._gpu_op(name, {"attention": ((path, self._cache_shape(context, kv_heads, batch)),)})

    def _cache_shape(self, context: float, kv_heads: int | None = None, batch: int | None = None) -> dict[str, int]:
        """The shape of a decode attention op of `batch` sequences (default: all) over `context` cached tokens of
        `kv_heads` KV heads (default: all), attended by their query groups."""
        m = self.model
        kv = m.num_kv_heads if kv_heads is None else kv_heads
        return {"b": batch or self.batch, "T": max(1, round(context)), "h": kv * (m.num_heads // m.num_kv_heads),
                "kv": kv, "d": m.dim_per_head, "e": m.dtype_bytes}

    def _kv_store(self, tokens: int) -> tuple[str, dict[str, int]]:
        m = self.model
        return "kv_store", {"b": self.batch, "T": tokens, "width": 2 * m.kv_dim, "e": m.dtype_bytes}

    def static_kv_slack(self) -> MemoryUse:
        """The static KV buffers' positions past the run's last (dense, zero: sized `aligned_seq_len`)."""
        return self.kv_slack(MemoryUse(gpu={"kv": self.kv_bytes(aligned_seq_len(self.positions))}))

    def static_prefill_attention_op(self) -> Op:
        """The prompt's causal attention, then its K/V written into static cache buffers (dense, zero)."""
        return self.prefill_attention_op(stores=(self._kv_store(self.prompt_len),))

    def static_decode_attention_op(self) -> Op:
        """The new token's K/V written into static cache buffers, then attention over the whole buffer, which
        holds every position of the run, later ones masked (dense, zero: one step's ops at every position)."""
        buffer = aligned_seq_len(self.positions)
        return self._gpu_op("attention", {"attention": (self._kv_store(1), ("masked_attention",
                                                                            self._cache_shape(buffer)))})

    def prefill_attention_op(self, batch: int | None = None, name: str = "attention",
                             stores: tuple[tuple[str, dict[str, int]], ...] = ()) -> Op:
        """The prompt's causal attention, then `stores`: the named ops writing its K/V where the policy keeps them."""
        m = self.model
        shape = {"b": batch or self.batch, "L": self.prompt_len, "h": m.num_heads, "d": m.dim_per_head}
        parts = {"attention": (("causal_attention", shape),)}
        return self._gpu_op(name, {**parts, "elementwise": stores} if stores else parts)

    def copy_op(self, name: str, direction: str, nbytes: float, pinned: bool = True, pieces: tuple[float, ...] = (),
                payload: bool = True) -> Op:
        """`Tiers.copy` of nbytes (or of each of `pieces`, copied one after another: the parts of stored rows):
        device time from the link table, host time from the named copy row; `payload: False` for index lists,
        which the traffic counts apart."""
        pieces = pieces or (nbytes,)
        key = ("copy", name, direction, pieces, pinned, payload)
        if (op := self._priced_ops.get(key)) is None:
            row = f"copy_{direction}_{'pinned' if pinned else 'pageable'}"
            op = self._priced_ops[key] = make_op(
                name, direction, {direction: sum(self.cost.copy_s(piece, direction, pinned) for piece in pieces)},
                host_s=len(pieces) * self.cost.op_host_s(row), nbytes=sum(pieces) if payload else 0,
                calls=tuple((row, (("bytes", int(piece)),)) for piece in pieces))
        return op

    @property
    def overlap(self) -> bool:
        """Whether transfers may overlap compute (the workload's `overlap`; a policy may also turn it off)."""
        return self.wl.workload.overlap

    def stepper(self) -> StepSimulator:
        """A fresh engine for this policy's steps: overlap as the workload says, host and device one resource on a
        CPU device."""
        return StepSimulator(overlap=self.overlap, host_is_device=self.wl.hardware.device_kind == "cpu")

    def head_and_tail(self, template: LayerTemplate, rows: int, kind: str, phase: int = 1) -> LayerTemplate:
        """Embedding lookup before the layers, with the step driver's own host time; final norm, LM head (last
        position only) and sampling after."""
        key = ("head_and_tail", rows, self.batch, kind, phase)
        if (ops := self._priced_ops.get(key)) is None:
            lm = self.model.lm_head_gemm(self.batch)
            ops = self._priced_ops[key] = (
                self._gpu_op("embedding", {"elementwise": (("embed", self._rows(rows)),)},
                             extra_host_s=self.host_overhead_s(kind, phase)[0]),
                self._gpu_op("lm_head", {"gemm": (self._project(lm),), "elementwise": (
                    ("norm", self._norm(self.batch)), ("argmax", {"rows": self.batch, "width": lm.n}))}))
        template.head.append(ops[0])
        template.tail.append(ops[1])
        return template

    def add_compute_chain(self, template: LayerTemplate, rows: int, attention: Op, kind: str,
                          qkv_after: tuple[str, ...] = (), attention_after: tuple[str, ...] = (),
                          phase: int = 1, before_attention: tuple[Op, ...] = (),
                          after_attention: tuple[Op, ...] = ()) -> LayerTemplate:
        """Add a layer's GPU compute (QKV projection, attention, output + MLP) of a `kind` step after the caller's
        transfers, which the QKV projection and the attention wait on as named; the policy's own GPU ops run in
        turn between the projection and the attention (`before_attention`) and after the attention."""
        template.add(self.pre_attention_op(rows, kind, phase=phase), after=qkv_after)
        previous = "qkv_proj"
        for op in before_attention:
            template.add(op, after=(previous,))
            previous = op.name
        template.add(attention, after=(previous,) + attention_after)
        previous = "attention"
        for op in after_attention:
            template.add(op, after=(previous,))
            previous = op.name
        template.add(self.post_attention_op(rows), after=(previous,))
        template.link("out_proj_mlp", "qkv_proj", lag=1)
        return self.head_and_tail(template, rows, kind, phase)

    # ---- memory shared by policies --------------------------------------------------------------------
    def activation_buffers(self, batch: int | None = None) -> dict[str, float]:
        """Working buffers on the GPU: the widest layer activation of a prefill over `batch` sequences (default: all,
        at once) and their logits."""
        batch = batch or self.batch
        return {"activations": self.model.activation_bytes(batch * self.prompt_len),
                "logits": self.model.logits_bytes(batch)}

    def kv_bytes(self, context: int) -> float:
        return self.batch * context * self._kv_bytes_per_token

"""`vllm`: vLLM (V0 engine, PagedAttention) serving the workload as one offline batch.

The KV cache is a pool of `block_size`-token blocks preallocated on the GPU from what `gpu_memory_utilization` of
the GPU leaves after the weights and the activations of vLLM's profiling run (a forward over
`max_num_batched_tokens` tokens in `max_num_seqs` sequences); a pinned CPU swap space of `swap_space` GiB is
allocated beside it. All `batch_size` requests arrive at once and vLLM V0's scheduler runs iterations:

- a prefill iteration whenever waiting requests can be admitted: first come first served, while the free blocks
  stay above the 1% watermark, within `max_num_seqs` running sequences and `max_num_batched_tokens` tokens, and
  only while no sequence is swapped out;
- otherwise a decode iteration of every running sequence, in admission order. A sequence is scheduled only while
  a block is free (vLLM's can_append_slots counts one touched block per sequence, even when the new token fits in
  its last block) and takes a new block when its token starts one. Otherwise the latest-admitted running sequence
  is preempted whole: by recompute (its blocks are freed, it returns to the front of the waiting queue and its
  next prefill covers its prompt and the tokens it generated) or by swap (its blocks are copied to the CPU swap
  space). Swapped sequences come back, first swapped out first, in decode iterations that preempted nothing.

Each iteration is a StepPlan: prefill iterations are timed as their sequences' tokens through the layers with
causal attention over each sequence's own length; decode iterations with attention over every sequence's own
context, timed by the total KV bytes read; swaps are per-block copies on the copy engines, serialized with the
layers' compute as vLLM issues them on the compute stream before the forward. The pool is held whole for the run
(vLLM preallocates it), so the GPU peak shows it; the blocks in use are a per-step counter.
"""

from __future__ import annotations

import copy
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterator

from alisa_sim.engine import OutOfMemory
from alisa_sim.errors import SpecError
from alisa_sim.ops import LayerTemplate, Op, make_op
from alisa_sim.policies.base import MemoryUse, Policy, StepPlan

GiB = 1 << 30
# vLLM's BlockSpaceManager watermark: admitting a sequence must leave 1% of the GPU blocks free.
WATERMARK = 0.01
# vLLM V0's _DEFAULT_MAX_NUM_BATCHED_TOKENS: without chunked prefill the default is max(2048, max_model_len).
DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
# Per-step counters, summed into the Result's metrics. running_seqs sums to the tokens generated; used_blocks to
# block-iterations (divide by the number of steps for the mean).
COUNTERS = ("running_seqs", "used_blocks", "preemptions", "recomputed_tokens", "swapped_out_blocks",
            "swapped_in_blocks", "swap_space_exhausted")


@dataclass
class Sequence:
    """One request. `tokens` counts prompt and generated tokens; the KV of `cached` of them is in the cache (the
    last sampled token's KV is computed by the sequence's next iteration)."""

    index: int
    tokens: int
    generated: int = 0
    cached: int = 0
    dropped: int = 0  # KV tokens freed by a recompute preemption, computed again by the next prefill


@dataclass
class Iteration:
    """One engine step the scheduler chose: its sequences and the blocks it swaps."""

    kind: str  # "prefill" | "decode"
    lengths: list[int]  # prefill: tokens computed per sequence; decode: tokens attended per sequence
    swap_in_blocks: int = 0
    swap_out_blocks: int = 0
    counters: dict[str, int] = field(default_factory=dict)
    swapped_blocks: int = 0  # held in the CPU swap space after the iteration


class VllmScheduler:
    """vLLM V0's scheduler (`_schedule_default`, no chunked prefill) and block manager for identical requests that
    all arrive at once; `iterations()` plays the run to its end, when every sequence has generated `gen_len`."""

    def __init__(self, num_requests: int, prompt_len: int, gen_len: int, block_size: int, gpu_blocks: int,
                 cpu_blocks: int, max_num_seqs: int, max_num_batched_tokens: int, preemption_mode: str):
        self.gen_len = gen_len
        self.block_size = block_size
        self.gpu_blocks = gpu_blocks
        self.free_blocks = gpu_blocks
        self.cpu_blocks = cpu_blocks
        self.free_cpu_blocks = cpu_blocks
        self.watermark_blocks = int(WATERMARK * gpu_blocks)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.swap = preemption_mode == "swap"
        self.waiting: deque[Sequence] = deque(Sequence(i, prompt_len) for i in range(num_requests))
        self.running: deque[Sequence] = deque()
        self.swapped: deque[Sequence] = deque()
        self.finished: list[Sequence] = []
        self._counters: dict[str, int] = {}

    def blocks(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def iterations(self) -> Iterator[Iteration]:
        while self.waiting or self.running or self.swapped:
            yield self.step()

    def step(self) -> Iteration:
        self._counters = dict.fromkeys(COUNTERS, 0)
        prefills = [] if self.swapped else self._schedule_prefills()
        if prefills:
            self.running.extend(prefills)
            batch, iteration = prefills, Iteration("prefill", [seq.tokens for seq in prefills])
        else:
            decodes, preempted, swapped_out = self._schedule_running()
            swapped_in = [] if preempted or swapped_out else self._schedule_swapped(len(decodes))
            self.waiting.extendleft(preempted)
            self.swapped.extend(swapped_out)
            self.running = deque(decodes + swapped_in)
            batch = decodes + swapped_in
            iteration = Iteration("decode", [seq.tokens for seq in batch],
                                  swap_in_blocks=self._counters["swapped_in_blocks"],
                                  swap_out_blocks=self._counters["swapped_out_blocks"])
        if not batch:
            raise RuntimeError("vllm scheduler: an iteration with no sequence to run")
        self._counters["running_seqs"] = len(batch)
        self._counters["used_blocks"] = self.gpu_blocks - self.free_blocks
        for seq in batch:  # the iteration computes the KV of every token it was given and samples one more
            seq.cached = seq.tokens
            seq.tokens += 1
            seq.generated += 1
        for seq in [seq for seq in batch if seq.generated == self.gen_len]:
            self.running.remove(seq)
            self.free_blocks += self.blocks(seq.cached)
            self.finished.append(seq)
        iteration.counters = self._counters
        iteration.swapped_blocks = self.cpu_blocks - self.free_cpu_blocks
        return iteration

    def _schedule_prefills(self) -> list[Sequence]:
        """Admit waiting sequences in order until one does not fit (blocks above the watermark, the token budget,
        the sequence budget); each gets the blocks of its whole prompt (plus generated tokens, when recomputed)."""
        admitted: list[Sequence] = []
        tokens = 0
        while self.waiting:
            seq = self.waiting[0]
            need = self.blocks(seq.tokens)
            if self.free_blocks - need < self.watermark_blocks:
                break
            if (tokens + seq.tokens > self.max_num_batched_tokens
                    or len(self.running) + len(admitted) + 1 > self.max_num_seqs):
                break
            self.waiting.popleft()
            self.free_blocks -= need
            tokens += seq.tokens
            self._counters["recomputed_tokens"] += seq.dropped
            seq.dropped = 0
            admitted.append(seq)
        return admitted

    def _schedule_running(self) -> tuple[list[Sequence], list[Sequence], list[Sequence]]:
        """Schedule every running sequence for a decode, preempting the latest-admitted ones while no block is free."""
        decodes: list[Sequence] = []
        preempted: list[Sequence] = []
        swapped_out: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while self.free_blocks < 1:
                victim = self.running.pop() if self.running else seq
                (swapped_out if self._preempt(victim) else preempted).append(victim)
                if victim is seq:
                    break
            else:
                if seq.cached % self.block_size == 0:  # the new token starts a block
                    self.free_blocks -= 1
                decodes.append(seq)
        return decodes, preempted, swapped_out

    def _preempt(self, seq: Sequence) -> bool:
        """Free a running sequence's GPU blocks; True if it was swapped out, False if it will be recomputed. Swap
        falls back to recompute when the swap space is full (vLLM V0 aborts the run there instead)."""
        held = self.blocks(seq.cached)
        self.free_blocks += held
        self._counters["preemptions"] += 1
        if self.swap and held <= self.free_cpu_blocks:
            self.free_cpu_blocks -= held
            self._counters["swapped_out_blocks"] += held
            return True
        if self.swap:
            self._counters["swap_space_exhausted"] += 1
        seq.dropped, seq.cached = seq.cached, 0
        return False

    def _schedule_swapped(self, decodes: int) -> list[Sequence]:
        """Swap sequences back in order while their blocks, and the one their next token may touch, fit above the
        watermark within the budgets (beside `decodes` scheduled sequences); they decode in this same iteration."""
        swapped_in: list[Sequence] = []
        while self.swapped:
            seq = self.swapped[0]
            need = self.blocks(seq.cached + 1)
            if self.free_blocks - need < self.watermark_blocks:
                break
            scheduled = decodes + len(swapped_in) + 1
            if scheduled > self.max_num_seqs or scheduled > self.max_num_batched_tokens:
                break
            self.swapped.popleft()
            held = self.blocks(seq.cached)
            self.free_cpu_blocks += held
            self.free_blocks -= need
            self._counters["swapped_in_blocks"] += held
            swapped_in.append(seq)
        return swapped_in


class VllmPolicy(Policy):
    name = "vllm"
    held_within = {"kv_swapped": "kv_swap_space"}  # swapped-out blocks live in the preallocated swap space

    def __init__(self, workload, cost):
        super().__init__(workload, cost)
        cfg = self.wl.policy
        s, n = self.prompt_len, self.wl.workload.gen_len
        self.block_size = cfg.block_size
        self.max_model_len = cfg.max_model_len or max(self.model.max_position_embeddings, s + n)
        if self.max_model_len < s + n:
            raise SpecError(f"policy.max_model_len = {self.max_model_len} is shorter than "
                            f"prompt_len + gen_len = {s + n}")
        self.max_num_batched_tokens = (cfg.max_num_batched_tokens
                                       or max(DEFAULT_MAX_NUM_BATCHED_TOKENS, self.max_model_len))
        if self.max_num_batched_tokens < self.max_model_len:
            raise SpecError(f"policy.max_num_batched_tokens = {self.max_num_batched_tokens} is smaller than "
                            f"max_model_len = {self.max_model_len} (vLLM requires it without chunked prefill)")
        self.block_bytes = self.block_size * self.model.kv_bytes_per_token()
        self.cpu_blocks = int(cfg.swap_space * GiB // self.block_bytes)
        budget = cfg.gpu_memory_utilization * self.wl.gpu_capacity_bytes - self.static_memory().gpu_bytes
        self.gpu_blocks = max(0, int(budget // self.block_bytes))
        self._wired_decode: dict[tuple, LayerTemplate] = {}  # decode DAGs by sequences and swaps (_decode_template)

    # ---- memory -------------------------------------------------------------------------------------------
    def _profile_activations(self) -> dict[str, float]:
        """What vLLM's profiling run peaks at beyond the weights: one forward over max_num_batched_tokens tokens
        and the logits of max_num_seqs sequences."""
        return {"activations": self.model.activation_bytes(self.max_num_batched_tokens),
                "logits": self.model.logits_bytes(self.wl.policy.max_num_seqs)}

    def static_memory(self) -> MemoryUse:
        """Weights and the profiling run's peak on the GPU; the swap space's whole blocks on the CPU, preallocated
        (the swapped-out blocks a step reports are held inside it: `held_within`)."""
        return MemoryUse(gpu={"weights": self.model.weight_bytes, **self._profile_activations()},
                         cpu={"kv_swap_space": self.cpu_blocks * self.block_bytes})

    def kv_memory(self, context: int) -> MemoryUse:
        """The whole preallocated pool, whatever the context."""
        return MemoryUse(gpu={"kv": self.gpu_blocks * self.block_bytes})

    def placement(self) -> dict[str, float]:
        return {"weights_gpu": 1.0, "kv_gpu": 1.0}

    def plan(self) -> dict:
        plan = super().plan()
        plan["params"].update(max_model_len=self.max_model_len, max_num_batched_tokens=self.max_num_batched_tokens)
        plan["kv_pool"] = {"block_size": self.block_size, "block_bytes": self.block_bytes,
                           "gpu_blocks": self.gpu_blocks, "gpu_bytes": self.gpu_blocks * self.block_bytes,
                           "watermark_blocks": int(WATERMARK * self.gpu_blocks),
                           "cpu_swap_blocks": self.cpu_blocks, "cpu_swap_bytes": self.cpu_blocks * self.block_bytes,
                           "blocks_per_sequence": -(-(self.wl.max_context() - 1) // self.block_size)}
        return plan

    # ---- the run -----------------------------------------------------------------------------------------
    def scheduler(self) -> VllmScheduler:
        cfg = self.wl.policy
        return VllmScheduler(self.batch, self.prompt_len, self.wl.workload.gen_len, self.block_size, self.gpu_blocks,
                             self.cpu_blocks, cfg.max_num_seqs, self.max_num_batched_tokens, cfg.preemption_mode)

    def steps(self) -> Iterator[StepPlan]:
        longest = self.wl.max_context() - 1  # the last generated token's KV is never computed
        usable = self.gpu_blocks - int(WATERMARK * self.gpu_blocks)
        if self.gpu_blocks * self.block_size < self.max_model_len or usable * self.block_size < longest:
            cfg = self.wl.policy
            raise OutOfMemory(
                f"out of GPU memory for vLLM's KV pool: {cfg.gpu_memory_utilization:g} of the GPU's "
                f"{self.wl.gpu_capacity_bytes / 1e9:.2f} GB after {self.static_memory().gpu_bytes / 1e9:.2f} GB of "
                f"weights and activations leaves {self.gpu_blocks} blocks "
                f"({self.gpu_blocks * self.block_size} tokens), "
                f"fewer than max_model_len = {self.max_model_len} tokens or one whole sequence above the watermark")
        pool = self.kv_memory(self.prompt_len)
        for index, it in enumerate(self.scheduler().iterations()):
            # the swap space holds the blocks of the sequences swapped out, as the executor counts them
            kv = MemoryUse(gpu=pool.gpu, cpu={"kv_swapped": it.swapped_blocks * self.block_bytes})
            if it.kind == "prefill":
                template = self._prefill_template(it.lengths)
            else:
                template = self._decode_template(it.lengths, it.swap_in_blocks, it.swap_out_blocks)
            rows = sum(it.lengths) if it.kind == "prefill" else len(it.lengths)
            yield StepPlan(template, 1, kv, it.kind, f"{it.kind} {index}", rows, len(it.lengths), it.counters)

    # ---- iteration templates -------------------------------------------------------------------------------
    def _as_batch(self, sequences: int, length: float) -> VllmPolicy:
        """This policy seen as a uniform batch of `sequences` sequences of `length` tokens, for the base class's op
        builders, which size attention, LM head and logits from `batch` and `prompt_len`."""
        view = copy.copy(self)
        view.batch, view.prompt_len = sequences, length
        return view

    def prefill_attention_op(self, batch: int | None = None, name: str = "attention", stores=()) -> Op:
        """The prompt's causal attention, then its K/V rows written at their blocks' slots (`ops.block_store`: rows
        of the kv_store shape)."""
        return super().prefill_attention_op(batch, name, (("block_store", self._kv_store(self.prompt_len)[1]),))

    def _prefill_template(self, lengths: list[int]) -> LayerTemplate:
        """Prompt passes of sequences of different lengths, as the executor runs them: one pass per distinct length
        over the sequences of that length (each pass's ops in a layer after the previous pass's)."""
        groups = sorted(Counter(lengths).items())
        if len(groups) == 1:
            (length, count), = groups
            view = self._as_batch(count, length)
            return view.add_compute_chain(LayerTemplate(), count * length, view.prefill_attention_op(), "prefill")
        template, previous = LayerTemplate(), ()
        for g, (length, count) in enumerate(groups):
            view, rows = self._as_batch(count, length), count * length
            names = (f"qkv_proj_g{g}", f"attention_g{g}", f"out_proj_mlp_g{g}")
            template.add(view.pre_attention_op(rows, "prefill", names[0]), after=previous)
            template.add(view.prefill_attention_op(name=names[1]), after=names[:1])
            template.add(view.post_attention_op(rows, names[2]), after=names[1:2])
            template.link(names[2], names[0], lag=1)
            previous = names[2:]
            view.head_and_tail(template, rows, "prefill")
        return template

    def _decode_template(self, contexts: list[int], swap_in_blocks: int = 0, swap_out_blocks: int = 0) -> LayerTemplate:
        """One token per sequence; attention over each sequence's own context, timed by the total KV bytes read
        (the batch at the mean context). Swaps come before each layer's compute, serialized with it."""
        sequences = len(contexts)
        view = self._as_batch(sequences, self.prompt_len)
        swaps = [self._swap_op(name, direction, blocks) for name, direction, blocks in
                 (("kv_swap_in", "h2d", swap_in_blocks), ("kv_swap_out", "d2h", swap_out_blocks)) if blocks]
        # Each sequence's new K/V row written at its slot, then attention over its slots of the pool in place (the
        # fused path, `paged_attention`), the index lists padded to the longest context.
        attention = view._gpu_op("attention", {"elementwise": (("block_store", view._kv_store(1)[1]),),
                                               "attention": (("paged_attention", view._cache_shape(max(contexts))),)})
        # The DAG depends only on the number of sequences and the swaps: wired once, each iteration's template puts
        # its own ops into it.
        key = sequences, tuple(op.name for op in swaps)
        if (wired := self._wired_decode.get(key)) is None:
            wired = self._wired_decode[key] = LayerTemplate()
            previous: tuple[str, ...] = ()
            for op in swaps:
                wired.add(op, after=previous)
                previous = (op.name,)
            view.add_compute_chain(wired, sequences, attention, "decode", qkv_after=previous)
            if swaps:
                wired.link("out_proj_mlp", swaps[0].name, lag=1)
        return wired.with_ops([*swaps, view.pre_attention_op(sequences, "decode"), attention, view.post_attention_op(sequences)])

    def _swap_op(self, name: str, direction: str, blocks: int) -> Op:
        """One layer's share of vLLM's swap_blocks as the executor runs it: a copy per block (a token's K and V are
        one row of the pinned CPU cache), each paying the profile's transfer time at that size."""
        piece = self.block_size * self.model.kv_bytes_per_token_per_layer()
        copies = blocks
        op = f"copy_{direction}_pinned"
        return make_op(name, direction, {direction: copies * self.cost.copy_s(piece, direction)},
                       host_s=copies * self.host_of(op), nbytes=int(copies * piece),
                       calls=((op, (("bytes", int(piece)),)),) * copies)

    def prefill_template(self) -> LayerTemplate:
        """The whole batch's prompts in one iteration."""
        return self._prefill_template([self.prompt_len] * self.batch)

    def decode_template(self, step: int) -> LayerTemplate:
        """Decode step `step` of the whole batch, nothing swapped."""
        return self._decode_template([self.context(step)] * self.batch)

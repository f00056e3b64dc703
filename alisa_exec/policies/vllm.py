"""`vllm` in the executor: a GPU pool of KV blocks, vLLM V0's schedule, preemption by recompute or swap.

The schedule is the simulator's: `VllmPolicy.scheduler()` (vLLM V0's FCFS scheduler and block manager on this
offline batch) decides every iteration; the executor steps the same scheduler object and reads, from the sequences'
state before and after each iteration, which sequences ran, which were preempted (recompute: their blocks freed,
their next prefill covers prompt and generated tokens) and which were swapped out or in (their blocks copied to or
from the CPU swap space, a layer's block at a time). The pool, the swap space and the block size are the policy's
(`gpu_blocks`, `cpu_blocks`, `block_size`); a block holds `block_size` tokens' K and V of one layer.

A prefill iteration runs its sequences grouped by length, causal attention over each sequence's own tokens; a
decode iteration runs every scheduled sequence at its own position, each attending its own blocks (gathered through
its block table, padded to the longest, masked by length).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dataclasses import dataclass, field

from alisa_exec import ops
from alisa_exec.kv_cache import CPU, GPU, TokenRows, Tiers
from alisa_exec.model import Transformer
from alisa_exec.policies.base import ExecPolicy, Run, StepInfo, ceil_div, kv_rows
from alisa_sim.policies.vllm import Sequence, VllmScheduler


@dataclass
class VllmRun(Run):
    """The scheduler being stepped, every sequence's tokens, block tables and free lists, and the iteration under
    way (what it scheduled, and the sequences' state before it)."""

    scheduler: VllmScheduler | None = None
    sequences: list[Sequence] = field(default_factory=list)
    tokens: dict[int, list[int]] = field(default_factory=dict)
    tables: dict[int, list[int]] = field(default_factory=dict)
    cpu_tables: dict[int, list[int]] = field(default_factory=dict)
    free: list[int] = field(default_factory=list)
    cpu_free: list[int] = field(default_factory=list)
    iteration: tuple | None = None
    decodes: int = 0
    slots: Tensor | None = None  # the pool slots of the iteration's tokens
    lengths: Tensor | None = None  # tokens attended per sequence in a decode iteration


class VllmExec(ExecPolicy):
    name = "vllm"

    def __init__(self, wl, sim, dtype):
        super().__init__(wl, sim, dtype)
        self.block_size, self.gpu_blocks, self.cpu_blocks = sim.block_size, sim.gpu_blocks, sim.cpu_blocks

    def allocate(self, tiers: Tiers) -> None:
        layers = range(self.spec.num_layers)
        self.pool = [TokenRows(tiers, GPU, "kv", self.gpu_blocks * self.block_size, 1, self.kv_width, self.dtype)
                     for _ in layers]
        self.swap_space = [TokenRows(tiers, CPU, "kv_swap_space", self.cpu_blocks * self.block_size, 1,
                                     self.kv_width, self.dtype) for _ in layers]

    # ---- the iterations, as the scheduler chooses them -------------------------------------------------------------
    def new_run(self, model: Transformer, prompt: Tensor) -> VllmRun:
        scheduler = self.sim.scheduler()
        sequences = list(scheduler.waiting)
        return VllmRun(model, super().new_run(model, prompt).out, scheduler=scheduler, sequences=sequences,
                       tokens={seq.index: prompt[seq.index].tolist() for seq in sequences},
                       tables={seq.index: [] for seq in sequences}, free=list(range(self.gpu_blocks)),
                       cpu_free=list(range(self.cpu_blocks)))

    def next_step(self, step: int, decode_steps: int | None) -> StepInfo | None:
        """The scheduler's next iteration (run to its end, or until `decode_steps` decode iterations ran)."""
        run = self.run
        scheduler = run.scheduler
        if not (scheduler.waiting or scheduler.running or scheduler.swapped):
            return None
        if decode_steps is not None and run.decodes >= decode_steps:
            return None
        before = {seq.index: (seq.generated, seq.cached, seq.tokens) for seq in run.sequences}
        swapped_before = {seq.index for seq in scheduler.swapped}
        finished_before = len(scheduler.finished)
        iteration = scheduler.step()
        batch = [seq.index for seq in run.sequences if seq.generated > before[seq.index][0]]
        run.iteration = (iteration, batch, [before[i][2] for i in batch], before, swapped_before, finished_before)
        rows = sum(before[i][2] for i in batch) if iteration.kind == "prefill" else len(batch)
        run.decodes += iteration.kind == "decode"
        return StepInfo(iteration.kind, f"{iteration.kind} {step}", 1, rows, len(batch))

    def step(self, step: int, prompt: Tensor) -> None:
        run = self.run
        iteration, batch, lengths, before, swapped_before, finished_before = run.iteration
        scheduler = run.scheduler
        swapped_after = {seq.index for seq in scheduler.swapped}
        for seq in run.sequences:  # preempted by recompute this iteration: its KV is dropped
            if seq.cached == 0 and before[seq.index][1] > 0 and seq.index not in swapped_after:
                self.release(seq.index)
        for i in sorted(swapped_after - swapped_before):
            self.swap_out(i)
        for i in sorted(swapped_before - swapped_after):
            self.swap_in(i)
        if iteration.kind == "prefill":
            self.prefill(batch, lengths, prompt.device)
        else:
            self.decode(batch, lengths, prompt.device)
        for seq in scheduler.finished[finished_before:]:
            self.release(seq.index)
        run.counters = dict(iteration.counters)

    def kv_bytes(self, step: int) -> tuple[int, int]:
        """The pool is held whole (vLLM preallocates it); the swap space holds the swapped-out blocks."""
        block_bytes = self.pool[0].row_bytes * self.block_size * self.spec.num_layers
        swapped_blocks = sum(len(table) for table in self.run.cpu_tables.values())
        return self.gpu_blocks * block_bytes, swapped_blocks * block_bytes

    def tokens(self, run: VllmRun) -> Tensor:
        generated = [run.tokens[seq.index][self.prompt_len:] for seq in run.sequences]
        return torch.tensor([tokens + [0] * (self.gen_len - len(tokens)) for tokens in generated])

    # ---- blocks ------------------------------------------------------------------------------------------------------
    def release(self, seq: int) -> None:
        self.run.free.extend(self.run.tables[seq])
        self.run.tables[seq] = []

    def reserve(self, seq: int, tokens: int) -> None:
        """Blocks for the first `tokens` positions of a sequence."""
        table = self.run.tables[seq]
        while len(table) < ceil_div(tokens, self.block_size):
            if not self.run.free:
                raise RuntimeError("vllm: the scheduler admitted more blocks than the pool holds")
            table.append(self.run.free.pop())

    def slots(self, seq: int, positions: Tensor) -> Tensor:
        table = torch.tensor(self.run.tables[seq], device=positions.device)
        return table[positions // self.block_size] * self.block_size + positions % self.block_size

    def copy_blocks(self, src_pool: list[TokenRows], src: list[int], dst_pool: list[TokenRows], dst: list[int],
                    direction: str) -> None:
        """One copy per block and layer, as vLLM's swap_blocks (K and V of a token are one row here)."""
        bs = self.block_size
        for layer in range(self.spec.num_layers):
            for a, b in zip(src, dst):
                self.tiers.copy(dst_pool[layer].data[b * bs:(b + 1) * bs], src_pool[layer].data[a * bs:(a + 1) * bs],
                                direction, f"kv_swap_{'out' if direction == 'd2h' else 'in'}")
        self.tiers.host_wait(self.tiers.event(direction))  # the blocks are free (or usable) once copied

    def swap_out(self, seq: int) -> None:
        table = self.run.tables[seq]
        self.run.cpu_tables[seq] = [self.run.cpu_free.pop() for _ in table]
        self.copy_blocks(self.pool, table, self.swap_space, self.run.cpu_tables[seq], "d2h")
        self.release(seq)

    def swap_in(self, seq: int) -> None:
        cpu_table = self.run.cpu_tables.pop(seq)
        self.run.tables[seq] = [self.run.free.pop() for _ in cpu_table]
        self.copy_blocks(self.swap_space, cpu_table, self.pool, self.run.tables[seq], "h2d")
        self.tiers.wait("compute", self.tiers.event("h2d"))
        self.run.cpu_free.extend(cpu_table)

    # ---- iterations --------------------------------------------------------------------------------------------------
    def prefill(self, batch: list[int], lengths: list[int], device: torch.device) -> None:
        """Prompt passes (with the generated tokens of recomputed sequences), grouped by length."""
        run = self.run
        for length in sorted(set(lengths)):
            group = [seq for seq, n in zip(batch, lengths) if n == length]
            for seq in group:
                self.reserve(seq, length)
            tokens = torch.tensor([run.tokens[seq][:length] for seq in group], device=device)
            positions = torch.arange(length, device=device)
            run.slots = torch.stack([self.slots(seq, positions) for seq in group])  # [group, length]
            for seq, token in zip(group, self.forward(tokens, positions)[:, 0].tolist()):
                run.tokens[seq].append(token)

    def prefill_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        y = self.causal_attention(q, k, v)
        ops.block_store(self.pool[index].data[:, 0], self.run.slots, kv_rows(k, v))
        return y

    def decode(self, batch: list[int], lengths: list[int], device: torch.device) -> None:
        """One token per sequence at its own position, attending its own blocks."""
        run = self.run
        for seq, n in zip(batch, lengths):
            self.reserve(seq, n)
        tokens = torch.tensor([[run.tokens[seq][-1]] for seq in batch], device=device)
        positions = torch.tensor([[n - 1] for n in lengths], device=device)  # [batch, 1]
        span = torch.arange(max(lengths), device=device)
        run.slots = torch.stack([self.slots(seq, span.clamp(max=n - 1)) for seq, n in zip(batch, lengths)])
        run.lengths = torch.tensor(lengths, device=device)
        for seq, token in zip(batch, self.forward(tokens, positions)[:, 0].tolist()):
            run.tokens[seq].append(token)

    def decode_attend(self, index: int, group: int, x_in: Tensor, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        slots, lengths = self.run.slots, self.run.lengths
        pool = self.pool[index]
        with self.span("attention", "attention"):
            ops.block_store(pool.data[:, 0], slots.gather(1, (lengths - 1)[:, None]), kv_rows(k, v))
            # Every sequence reads the one shared pool in place at its own slots, as PagedAttention does.
            keys, values = (view.expand(len(lengths), -1, -1, -1) for view in pool.kv_views(self.spec.num_kv_heads))
            out, _ = ops.paged_attention(q[:, 0], keys, values, slots, lengths, self.tiers.triton)
        return out.reshape(len(lengths), 1, -1)

"""The executor's tiered KV cache: token rows in a GPU pool and in a pinned CPU pool, and the copies between them.

`Tiers` is the machine as a run sees it: two memory tiers, the compute stream and two copy streams. On CUDA the "gpu"
tier is the GPU and the "cpu" tier pinned host memory; copies run on an H2D and a D2H side stream (on the compute
stream when the workload turns `overlap` off), ordered by events, so the host waits only where it must read what a
copy wrote. On the CPU device (CI) the "gpu" tier is a second pool in host memory, copies are synchronous and streams
and events are no-ops: the same residency logic runs, and is tested, without a GPU.

Every allocation goes through `Tiers.empty`, which records its bytes by tier and purpose. A dry run allocates on the
meta device, so a run's memory is known, and checked against the budget, before anything is allocated. Every copy
goes through `Tiers.copy`, which counts its bytes where it happens (payload, or index lists beside it), and token
rows moved, recomputed or evicted are tallied where that happens (`Tiers.tally`): a step's row in the Result is
the difference of these counts across the step.

`TokenRows` holds rows of tokens in one tier, [slots, batch, width] (slot-major, so a range of positions of every
sequence is one contiguous block, copied in one transfer): a token's K and V of one layer (width 2 x kv_dim) or its
layer input (width hidden_size), in the model's dtype or as INT8 (asymmetric min-max per group of channels, the
kernels' format, `alisa_exec.kernels.int8_kv`), quantized by the INT8 store kernel (its PyTorch form off the GPU) and
dequantized when read, or inside the fused attention kernel, which reads the rows in place (`kv_views`).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch import Tensor

from alisa_exec.kernels.int8_kv import QuantizedKV, dequantize_rows, quantize_reference, store_quantized
from alisa_exec.ledger import issued
from alisa_exec.timeline import Timeline
from alisa_sim.policies.alisa import INT8_GROUP, int8_group  # noqa: F401 (the one copy; users import it here)

GPU, CPU = "gpu", "cpu"
# Token rows (one token of one layer of one sequence) a step moved or dropped, counted where it happens.
ROW_COUNTERS = ("fetched_tokens", "offloaded_tokens", "recomputed_tokens", "evicted_tokens")
DIRECTIONS = ("h2d", "d2h")


class Tiers:
    """The GPU and CPU tiers of one run, their streams, the bytes held and moved and the token rows tallied.

    `triton`: run the Triton kernels (the default on CUDA); else their PyTorch forms, which give the same results.
    """

    def __init__(self, device: torch.device, overlap: bool = True, dry: bool = False,
                 timeline: Timeline | None = None, triton: bool | None = None):
        self.device = device
        self.cuda = device.type == "cuda" and not dry
        self.dry = dry
        self.triton = device.type == "cuda" if triton is None else triton
        self.held: dict[str, dict[str, int]] = {GPU: {}, CPU: {}}
        self.moved = dict.fromkeys(DIRECTIONS, 0)  # payload bytes: KV, layer inputs, weights, activations
        self.index_moved = dict.fromkeys(DIRECTIONS, 0)  # index lists that travel beside the payload
        self.tallies = dict.fromkeys(ROW_COUNTERS, 0)
        self.timeline = timeline
        self._pinned: set[int] = set()  # storages of the pools the plan allocated pinned
        if self.cuda:
            self.compute = torch.cuda.current_stream(device)
            self.h2d = torch.cuda.Stream(device) if overlap else self.compute
            self.d2h = torch.cuda.Stream(device) if overlap else self.compute
        else:
            self.compute = self.h2d = self.d2h = None

    # ---- memory ----------------------------------------------------------------------------------------------------
    def empty(self, tier: str, purpose: str, shape: tuple[int, ...], dtype: torch.dtype,
              pinned: bool = True) -> Tensor:
        """A zeroed tensor in `tier`, its bytes counted under `purpose` (pinned: page-locked host memory on CUDA)."""
        self.count(tier, purpose, math.prod(shape) * dtype.itemsize)
        if self.dry:
            return torch.empty(shape, dtype=dtype, device="meta")
        if tier == GPU:
            return torch.zeros(shape, dtype=dtype, device=self.device)
        tensor = torch.zeros(shape, dtype=dtype, pin_memory=self.cuda and pinned)
        if pinned:  # as the plan has it, also on a CPU device where nothing can be page-locked
            self._pinned.add(tensor.untyped_storage().data_ptr())
        return tensor

    def pinned(self, host: Tensor) -> Tensor:
        """A transient host tensor in page-locked memory on CUDA (a copy; as it is on a CPU device, where its copies
        say `pinned=True`)."""
        return host.pin_memory() if self.cuda else host

    def _pinned_copy(self, dst: Tensor, src: Tensor, direction: str) -> bool:
        """Whether a copy's host side is pinned memory (as the plan allocated its pools)."""
        host = src if direction == "h2d" else dst
        return host.is_pinned() or (host.device.type == "cpu" and host.untyped_storage().data_ptr() in self._pinned)

    def count(self, tier: str, purpose: str, nbytes: int) -> None:
        self.held[tier][purpose] = self.held[tier].get(purpose, 0) + int(nbytes)

    @property
    def gpu_device(self) -> torch.device:
        return torch.device("meta") if self.dry else self.device

    def bytes(self, tier: str) -> int:
        return sum(self.held[tier].values())

    def tally(self, counter: str, rows: int) -> None:
        """Count token rows fetched, offloaded, recomputed or evicted (ROW_COUNTERS) where that happens."""
        self.tallies[counter] += int(rows)

    # ---- streams and events ----------------------------------------------------------------------------------------
    def stream(self, direction: str):
        return {"compute": self.compute, "h2d": self.h2d, "d2h": self.d2h}[direction]

    def on(self, direction: str):
        """Issue the block's work on the stream of `direction` ("compute", "h2d" or "d2h")."""
        return torch.cuda.stream(self.stream(direction)) if self.cuda else nullcontext()

    def event(self, direction: str = "compute"):
        """An event at the current end of a stream's work (None off CUDA)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.stream(direction))
        return event

    def wait(self, direction: str, *events) -> None:
        """Make a stream wait for events (without the host waiting)."""
        if self.cuda:
            for event in events:
                if event is not None:
                    self.stream(direction).wait_event(event)

    @staticmethod
    def host_wait(*events) -> None:
        """The host waits until the events have happened (it is about to read or reuse what they guard)."""
        for event in events:
            if event is not None:
                event.synchronize()

    def copy(self, dst: Tensor, src: Tensor, direction: str, name: str, after=(), payload: bool = True,
             pinned: bool | None = None) -> object:
        """Copy `src` into `dst` on the H2D or D2H stream, after `after` events (a D2H copy also waits for the work
        issued so far on the compute stream, which produced its source); counts the bytes (as payload, or as an
        index list beside it) and returns an event at the copy's end. `pinned`: the host side is a transient buffer
        from `pinned()` (default: whether it is one of the plan's pinned pools)."""
        events = tuple(after) + ((self.event(),) if direction == "d2h" else ())
        pinned = self._pinned_copy(dst, src, direction) if pinned is None else pinned
        memory = "pinned" if pinned else "pageable"
        issued(f"copy_{direction}_{memory}", bytes=src.numel() * src.element_size())
        with self.on(direction):
            self.wait(direction, *events)
            span = self.timeline.span(direction, name, direction, self.stream(direction)) if self.timeline else None
            with span or nullcontext():
                dst.copy_(src, non_blocking=self.cuda)
            if self.cuda and src.is_cuda:
                src.record_stream(self.stream(direction))  # a temporary source outlives its Python owner until then
        (self.moved if payload else self.index_moved)[direction] += src.numel() * src.element_size()
        return self.event(direction)

    def copy_rows(self, dst: tuple[Tensor, ...], src: tuple[Tensor, ...], direction: str, name: str,
                  counter: str | None = None, tokens: int = 0, after=()) -> object:
        """Copy the parts of stored token rows (values, or INT8 levels, scales and zero points) and tally `tokens`
        token rows under `counter`; returns the event at the last part's end."""
        event = None
        for dst_part, src_part in zip(dst, src):
            event = self.copy(dst_part, src_part, direction, name, after)
        if counter:
            self.tally(counter, tokens)
        return event


def _slot_positions(index, slots: int, device: torch.device) -> Tensor:
    """Slot numbers [n] of an int, a slice or a tensor of slots."""
    if isinstance(index, slice):
        return torch.arange(*index.indices(slots), device=device)
    if isinstance(index, int):
        return torch.full((1,), index, dtype=torch.int64, device=device)
    return index.to(device=device, dtype=torch.int64)


class TokenRows:
    """Rows of tokens in one tier, [slots, batch, width], in `dtype` or INT8 (uint8 levels with a scale and a zero
    point per group of `group` channels, stored in `dtype`)."""

    def __init__(self, tiers: Tiers, tier: str, purpose: str, slots: int, batch: int, width: int,
                 dtype: torch.dtype, int8: bool = False, group: int = INT8_GROUP, pinned: bool = True):
        self.dtype, self.int8, self.width = dtype, int8, width
        self.triton = tiers.triton
        self.group = int8_group(width, group)
        shape = (slots, batch, width)
        self.data = tiers.empty(tier, purpose, shape, torch.uint8 if int8 else dtype, pinned)
        if int8:
            params = (slots, batch, width // self.group)
            self.scale = tiers.empty(tier, purpose, params, dtype, pinned)
            self.zero = tiers.empty(tier, purpose, params, dtype, pinned)

    @property
    def parts(self) -> tuple[Tensor, ...]:
        return (self.data, self.scale, self.zero) if self.int8 else (self.data,)

    @property
    def row_bytes(self) -> int:
        """Bytes of one token row (values and quantization parameters)."""
        return sum(part[0, 0].numel() * part.element_size() for part in self.parts)

    def _as_quantized(self, parts: tuple[Tensor, ...]) -> QuantizedKV:
        """Stored parts [n, batch, width] in the INT8 kernels' layout: `width / group` heads of `group` channels."""
        data, scale, zero = parts
        heads = self.width // self.group

        def layout(t: Tensor, inner: int) -> Tensor:
            return t.view(*t.shape[:2], heads, inner).permute(1, 2, 0, 3)
        return QuantizedKV(layout(data, self.group), layout(scale, 1), layout(zero, 1), 1, self.group)

    def encode(self, values: Tensor) -> tuple[Tensor, ...]:
        """Rows [n, batch, width] as stored (new tensors)."""
        values = values.to(self.dtype)
        if not self.int8:
            return (values,)
        n, batch, _ = values.shape
        issued("kv_quantize", rows=n * batch, width=self.width, e=values.element_size())
        if self.triton:
            parts = (torch.empty(values.shape, dtype=torch.uint8, device=values.device),
                     *(torch.empty(n, batch, self.width // self.group, dtype=self.dtype, device=values.device)
                       for _ in range(2)))
            self.quantize_into(parts, torch.arange(n, device=values.device), values)
            return parts
        data, scale, zero = quantize_reference(values.reshape(1, 1, -1, self.width), 1, self.group)
        groups = self.width // self.group
        return data.view(values.shape), scale.view(n, batch, groups), zero.view(n, batch, groups)

    def quantize_into(self, parts: tuple[Tensor, ...], slots: Tensor, values: Tensor) -> None:
        """The INT8 store kernel: quantize rows [n, batch, width] into stored parts at `slots` [n]."""
        heads = self.width // self.group
        store_quantized(self._as_quantized(parts), slots,
                        values.view(*values.shape[:2], heads, self.group).permute(1, 2, 0, 3))

    def store(self, index, values: Tensor) -> None:
        """Store values [n, batch, width] at slots `index` (a slice, an int or a tensor of n slots)."""
        if not values.shape[0]:
            return
        n, batch, width = values.shape
        if not self.int8:
            issued("kv_store", b=batch, T=n, width=width, e=values.element_size())
        elif self.triton:
            issued("kv_quantize", rows=n * batch, width=width, e=self.scale.element_size())
        if self.int8 and self.triton:
            self.quantize_into(self.parts, _slot_positions(index, self.data.shape[0], values.device),
                               values.to(self.dtype))
            return
        for part, encoded in zip(self.parts, self.encode(values)):
            part[index] = encoded

    def decode(self, parts: tuple[Tensor, ...]) -> Tensor:
        """Stored rows [..., width] back as values in the model's dtype."""
        if not self.int8:
            return parts[0]
        data, scale, zero = parts
        shape = data.shape
        issued("kv_dequantize", rows=data.numel() // self.width, width=self.width, e=scale.element_size())
        flat = QuantizedKV(data.reshape(1, 1, -1, self.width), scale.reshape(1, 1, -1, scale.shape[-1]),
                           zero.reshape(1, 1, -1, zero.shape[-1]), 1, self.group)
        rows = torch.arange(flat.data.shape[2], device=data.device)
        return dequantize_rows(flat, rows).view(shape)

    def read(self, index) -> Tensor:
        return self.decode(tuple(part[index] for part in self.parts))

    def gather(self, slots: Tensor) -> Tensor:
        """Values at per-sequence slots [batch, T]: sequence b reads its own rows, [batch, T, width]."""
        if self.int8:
            view = QuantizedKV(*(part.permute(1, 0, 2).unsqueeze(1) for part in self.parts), 1, self.group)
            return dequantize_rows(view, slots[:, None, :]).squeeze(1)
        by_sequence = self.data.permute(1, 0, 2)
        return by_sequence.gather(1, slots.long()[..., None].expand(-1, -1, self.width))

    def flat_rows(self, index: Tensor, out: tuple[Tensor, ...]) -> None:
        """Gather stored rows at flat indices slot * batch + sequence into `out` ([N, ...] per part)."""
        for part, dst in zip(self.parts, out):
            issued("host_gather", bytes=index.numel() * part.shape[-1] * part.element_size())
            torch.index_select(part.view(-1, part.shape[-1]), 0, index, out=dst)

    def head_rows(self, index: Tensor, heads: Tensor, kv_heads: int, out: tuple[Tensor, ...]) -> None:
        """Gather one KV head's K and V of stored K/V rows at flat indices slot * batch + sequence (KV head
        `heads[i]` of row i) into `out` ([N, ...] per part: a staging buffer of K/V rows of one head)."""
        issued("head_gather", rows=index.numel(), row_bytes=self.row_bytes // kv_heads)
        halves = torch.arange(2, device=index.device)
        # part viewed as [slots x batch x 2 x kv_heads, inner]: (row, half, head) is one contiguous run
        flat = ((index[:, None] * 2 + halves) * kv_heads + heads[:, None]).flatten()
        for part, dst in zip(self.parts, out):
            inner = part.shape[-1] // (2 * kv_heads)
            torch.index_select(part.view(-1, inner), 0, flat, out=dst.view(-1, inner))

    def staging(self, tiers: Tiers, tier: str, purpose: str, rows: int, pinned: bool = True) -> TokenRows:
        """A buffer for `rows` rows of this format, shared by every sequence (its batch is one)."""
        return TokenRows(tiers, tier, purpose, rows, 1, self.width, self.dtype, self.int8, self.group, pinned)

    def head_staging(self, tiers: Tiers, tier: str, purpose: str, rows: int, kv_heads: int) -> TokenRows:
        """A buffer for `rows` rows of one KV head's K and V each (`head_rows`), shared by every sequence."""
        return TokenRows(tiers, tier, purpose, rows, 1, self.width // kv_heads, self.dtype, self.int8, self.group)

    def first(self, count: int) -> tuple[Tensor, ...]:
        """The parts of the first `count` rows of a staging buffer, [count, ...] each."""
        return tuple(part[:count, 0] for part in self.parts)

    def head_views(self, kv_heads: int) -> tuple[Tensor | QuantizedKV, Tensor | QuantizedKV]:
        """A `head_staging` buffer as the attention kernels read staged rows, [1, kv_heads, rows, head_dim] (no
        copy): every KV head sees every row, and a row is named only in the index list of the head it holds."""
        def every_head(view: Tensor | QuantizedKV):
            if isinstance(view, QuantizedKV):
                return QuantizedKV(*(every_head(t) for t in (view.data, view.scale, view.zero)), view.token_group,
                                   view.channel_group)
            return view.expand(-1, kv_heads, -1, -1)
        return tuple(every_head(view) for view in self.kv_views(1))

    def kv_views(self, kv_heads: int) -> tuple[Tensor | QuantizedKV, Tensor | QuantizedKV]:
        """K and V of K/V rows in place, [batch, kv_heads, slots, head_dim] each (no copy), as the attention
        kernels read a cache: values, or `QuantizedKV` levels with their scales and zero points."""
        slots, batch, width = self.data.shape
        head_dim = width // (2 * kv_heads)

        def halves(t: Tensor, inner: int) -> tuple[Tensor, Tensor]:
            kv = t.view(slots, batch, 2, kv_heads, inner)
            return kv[:, :, 0].permute(1, 2, 0, 3), kv[:, :, 1].permute(1, 2, 0, 3)
        if not self.int8:
            return halves(self.data, head_dim)
        if head_dim % self.group:
            raise ValueError(f"INT8 groups of {self.group} channels straddle heads of {head_dim}")
        (k, v), (k_scale, v_scale), (k_zero, v_zero) = (halves(self.data, head_dim),
                                                         *(halves(p, head_dim // self.group)
                                                           for p in (self.scale, self.zero)))
        return (QuantizedKV(k, k_scale, k_zero, 1, self.group), QuantizedKV(v, v_scale, v_zero, 1, self.group))

"""Batched prefill and greedy decode over the decoder's static KV buffers, each step timed on the device's own clock.

On the GPU the decode step (forward, argmax, advance the position) is captured once as a CUDA graph and replayed, so
the host's per-kernel launch cost does not bound small batches. On the CPU the same step runs eagerly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from alisa_exec.model import Transformer

CUDA_GRAPH_WARMUP_STEPS = 3


class DeviceClock:
    """Timestamps on the device timeline: CUDA events on the GPU, the host clock on the (synchronous) CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks.append(event)
        else:
            self._marks.append(time.perf_counter())

    def since_start(self, marker) -> float:
        """Seconds from the first mark to `marker` (a mark this clock made)."""
        if self.cuda:
            return self._marks[0].elapsed_time(marker) / 1e3
        return marker - self._marks[0]

    def seconds(self) -> list[float]:
        """Every mark's time since the first one (waits for the device)."""
        if self.cuda:
            torch.cuda.synchronize()
        return [self.since_start(marker) for marker in self._marks]


@dataclass
class Generation:
    """Generated tokens [batch, gen_len] (on the host) and the device time at the start of the prefill, at its end,
    and at the end of every decode step (seconds since the prefill started)."""

    tokens: Tensor
    marks_s: list[float]

    @property
    def prefill_s(self) -> float:
        return self.marks_s[1] - self.marks_s[0]

    @property
    def decode_step_s(self) -> list[float]:
        return [b - a for a, b in zip(self.marks_s[1:], self.marks_s[2:])]


@torch.no_grad()
def capture_graph(step: Callable[[], None], before_each: Callable[[], object] = lambda: None) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `step` (which must read and write only static device buffers), recorded after warm-up runs
    on a side stream (each after `before_each`), so that libraries initialise outside the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(CUDA_GRAPH_WARMUP_STEPS):
            before_each()
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


class Generator:
    """Greedy generation for a fixed batch size and maximum sequence length (the static KV buffers' size)."""

    def __init__(self, model: Transformer, batch_size: int, max_seq_len: int, cuda_graph: bool | None = None):
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        model.setup_caches(batch_size, max_seq_len)
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self._token = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self._pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graph: torch.cuda.CUDAGraph | None = None

    def _eager_decode_step(self) -> None:
        logits = self.model(self._token, self._pos)
        self._token.copy_(logits[:, -1].argmax(dim=-1, keepdim=True))
        self._pos += 1

    @torch.no_grad()
    def prefill(self, prompt: Tensor) -> None:
        """Run the prompts [batch, prompt_len] (from position 0) and pick each sequence's first new token."""
        logits = self.model(prompt, torch.arange(prompt.shape[1], device=self.device))
        self._token.copy_(logits[:, -1].argmax(dim=-1, keepdim=True))
        self._pos.fill_(prompt.shape[1])

    @torch.no_grad()
    def decode_step(self, eager: bool = False) -> None:
        """Feed the last token at the current position and pick the next one (`eager`: not by graph replay)."""
        if self._graph is not None and not eager:
            self._graph.replay()
        else:
            self._eager_decode_step()

    def seek(self, position: int) -> None:
        """Make the next decode step run at `position` (for timing a step at a chosen context length)."""
        self._pos.fill_(position)

    def capture(self) -> None:
        """Record the decode step as a CUDA graph. The warm-up steps write K and V at position 0, which the next
        prefill overwrites."""
        self._graph = capture_graph(self._eager_decode_step, before_each=self._pos.zero_)

    def generate(self, prompt: Tensor, gen_len: int) -> Generation:
        """`gen_len` tokens per sequence: the prefill's, then gen_len - 1 decode steps."""
        prompt_len = prompt.shape[1]
        if prompt.shape[0] != self.batch_size or prompt_len + gen_len - 1 > self.max_seq_len:
            raise ValueError(f"prompts {tuple(prompt.shape)} + {gen_len} tokens do not fit the buffers "
                             f"({self.batch_size} x {self.max_seq_len})")
        if self.cuda_graph and self._graph is None and gen_len > 1:
            self.capture()
        out = torch.empty(self.batch_size, gen_len, dtype=torch.long, device=self.device)
        clock = DeviceClock(self.device)
        clock.mark()
        self.prefill(prompt)
        out[:, :1].copy_(self._token)
        clock.mark()
        for i in range(1, gen_len):
            self.decode_step()
            out[:, i:i + 1].copy_(self._token)
            clock.mark()
        return Generation(out.cpu(), clock.seconds())

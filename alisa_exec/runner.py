"""`alisa-exec run`: execute a workload on this machine and build the measured Result JSON and a Chrome trace.

`dense` runs here: check that weights, KV buffers and activations fit (before allocating anything), load the model,
warm up (one short generation, which also captures the CUDA graph), then the timed generation of the whole workload
with every step timed on the device clock. Afterwards one prefill and one decode step at the middle context run
eagerly under torch.profiler to split device time by kind for `breakdown_s`.

Every other executable policy runs its plan through the tiered KV cache (`alisa_exec.executor`).
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from alisa_exec.generate import Generation, Generator
from alisa_exec.model import aligned_seq_len, check_family
from alisa_exec.profiler import cpu_name
from alisa_exec.weights import DUMMY, load_model, weights_format
from alisa_sim.cost_model import CostModel
from alisa_sim.errors import SpecError
from alisa_sim.model_spec import ModelSpec
from alisa_sim.ops import KINDS
from alisa_sim.policies import make_policy
from alisa_sim.results import step_stats
from alisa_sim.workload import ResolvedWorkload

GB = 1e9
EXECUTABLE_POLICIES = ("dense", "alisa", "flexgen", "accelerate", "vllm", "h2o", "streamingllm")
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
TOKEN_BYTES = 8  # int64 token ids
# Substrings of kernel / op names by kind, checked in this order (attention kernels can contain "cutlass" or "gemm").
_KIND_MARKERS = (
    ("h2d", ("memcpy htod",)),
    ("d2h", ("memcpy dtoh",)),
    ("attention", ("attention", "fmha", "flash", "sdpa", "softmax")),
    ("gemm", ("gemm", "gemv", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "cutlass", "cublas",
              "xmma", "splitk")),
)


@dataclass(frozen=True)
class ExecOptions:
    device: torch.device
    dtype: torch.dtype
    weights: str = DUMMY
    seed: int = 0


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SpecError("--device cuda: no CUDA GPU is available to torch on this machine (use --device cpu)")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads, {platform.machine()})"


def _meminfo_bytes(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise SpecError(f"/proc/meminfo has no {field}")


def device_free_bytes(device: torch.device) -> int:
    """Memory free for this run on the device: CUDA's free memory, or the host's available memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _meminfo_bytes("MemAvailable")


def memory_needed(spec: ModelSpec, batch: int, prompt_len: int, max_seq_len: int, dtype: torch.dtype) -> dict[str, int]:
    """Bytes the run holds on the device: weights, the static KV buffers, the prefill's widest activations, logits."""
    sized = spec.model_copy(update={"dtype_bytes": dtype.itemsize})
    kv_bytes = batch * aligned_seq_len(max_seq_len) * sized.kv_bytes_per_token()
    return {"weights": sized.weight_bytes, "kv_cache": int(kv_bytes),
            "activations": sized.activation_bytes(batch * prompt_len), "logits": sized.logits_bytes(batch)}


def check_fits(wl: ResolvedWorkload, needed: dict[str, int], device: torch.device) -> None:
    """A clear error when the run cannot fit the device or the workload's GPU capacity (memory.gpu_gb, else the
    hardware profile's), before anything is allocated."""
    free = device_free_bytes(device)
    cap = wl.gpu_capacity_bytes
    capped_by = ("memory.gpu_gb" if wl.workload.memory.gpu_gb is not None
                 else f"hardware profile '{wl.hardware.name}' GPU memory")
    limit, why = (free, f"free on {device.type}") if free <= cap else (cap, capped_by)
    total = sum(needed.values())
    if total > limit:
        parts = " + ".join(f"{name} {nbytes / GB:.2f}" for name, nbytes in needed.items())
        raise SpecError(f"{wl.model.name} with batch {wl.workload.batch_size} does not fit: it needs "
                        f"{total / GB:.2f} GB "
                        f"({parts}) but {limit / GB:.2f} GB are available ({why}). The dense policy keeps weights and "
                        "the whole KV cache on the device: lower batch_size, prompt_len or gen_len")


def op_kind(name: str) -> str:
    """The breakdown kind of a profiled kernel or op by its name; what is not a copy, attention or GEMM is
    elementwise (norms, rotary, activations, residuals, embedding, KV writes, argmax)."""
    lowered = name.lower()
    for kind, markers in _KIND_MARKERS:
        if any(marker in lowered for marker in markers):
            return kind
    return "elementwise"


@contextmanager
def _native_stderr_silenced():
    """Drop what native code writes to stderr (the profiler library logs every start and stop there)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def kernel_seconds_by_kind(fn, device: torch.device) -> dict[str, float]:
    """Device time of `fn` by kind: CUDA kernels on the GPU, the self time of aten ops on the CPU."""
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with _native_stderr_silenced(), profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    seconds = dict.fromkeys(KINDS, 0.0)
    for event in prof.key_averages():
        if cuda and event.device_type == DeviceType.CUDA:
            seconds[op_kind(event.key)] += event.self_device_time_total / 1e6
        elif not cuda and event.key.startswith("aten::"):
            seconds[op_kind(event.key)] += event.self_cpu_time_total / 1e6
    return seconds


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakMemory:
    """Peak device bytes this run added: torch's allocator peak on the GPU, the growth of the process's peak resident
    memory on the CPU (its high-water mark is reset first where Linux allows)."""

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.base = _rss_bytes("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.base
        return max(0, _rss_bytes("VmHWM") - self.base)


def run_workload(wl: ResolvedWorkload, options: ExecOptions, log=lambda _: None, on_step=None) -> tuple[dict, dict]:
    """Execute the workload; returns (Result JSON, Chrome trace). `on_step(record)` is called after each step of a
    tiered policy's run."""
    if wl.policy.name not in EXECUTABLE_POLICIES:
        raise SpecError(f"policy {wl.policy.name!r} is not in the executor yet: it runs "
                        f"{', '.join(EXECUTABLE_POLICIES)}; simulate the others with `alisa-sim run`")
    check_family(wl.model)
    weights_format(options.weights)
    if wl.policy.name != "dense":
        return run_plan(wl, options, log, on_step)
    w, spec, device = wl.workload, wl.model, options.device
    max_seq_len = w.prompt_len + w.gen_len - 1
    check_fits(wl, memory_needed(spec, w.batch_size, w.prompt_len, max_seq_len, options.dtype), device)

    peak = PeakMemory(device)
    t0 = time.perf_counter()
    log(f"loading {spec.name} ({options.weights}) on {device}")
    model = load_model(spec, options.weights, options.dtype, device, options.seed)
    generator = Generator(model, w.batch_size, max_seq_len)
    prompt = torch.randint(0, spec.vocab_size, (w.batch_size, w.prompt_len),
                           generator=torch.Generator().manual_seed(options.seed)).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    load_s = time.perf_counter() - t0
    log("warming up" + (" and capturing the decode step as a CUDA graph" if generator.cuda_graph else ""))
    t0 = time.perf_counter()
    generator.generate(prompt, min(2, w.gen_len))
    warmup_s = time.perf_counter() - t0
    log(f"generating {w.gen_len} tokens for {w.batch_size} sequences")
    generation = generator.generate(prompt, w.gen_len)
    peak_bytes = peak.peak()

    log("profiling one prefill and one decode step for the time breakdown")
    prefill_kinds = kernel_seconds_by_kind(lambda: generator.prefill(prompt), device)
    middle = w.prompt_len + (wl.decode_steps + 1) // 2

    def middle_step():
        generator.seek(middle - 1)
        generator.decode_step(eager=True)

    step_kinds = kernel_seconds_by_kind(middle_step, device) if wl.decode_steps else dict.fromkeys(KINDS, 0.0)
    breakdown = {kind: prefill_kinds[kind] + wl.decode_steps * step_kinds[kind] for kind in KINDS}

    result = build_result(wl, options, generation, breakdown, peak_bytes, {"load_s": load_s, "warmup_s": warmup_s})
    return result, build_trace(result, generation)


def run_plan(wl: ResolvedWorkload, options: ExecOptions, log=lambda _: None, on_step=None) -> tuple[dict, dict]:
    """A tiered policy: its plan (checked against the memory budget first), run and measured."""
    from alisa_exec import executor

    plan = executor.plan_run(wl, options.device, options.dtype)
    measured = executor.execute(plan, options.device, options.dtype, options.weights, options.seed, log, on_step)
    result = executor.build_result(plan, measured, device_name(options.device), options.dtype, options.weights)
    return result, executor.build_trace(result, measured)


def build_result(wl: ResolvedWorkload, options: ExecOptions, generation: Generation, breakdown: dict[str, float],
                 peak_gpu_bytes: int, setup_s: dict[str, float]) -> dict:
    w, device = wl.workload, options.device
    kv_per_token = wl.model.kv_bytes_per_token(options.dtype.itemsize)
    decode = generation.decode_step_s
    prefill_s, decode_s = generation.prefill_s, float(sum(decode))
    total_s = prefill_s + decode_s
    on_gpu = device.type == "cuda"
    h2d = w.batch_size * w.prompt_len * TOKEN_BYTES if on_gpu else 0
    d2h = w.batch_size * w.gen_len * TOKEN_BYTES if on_gpu else 0
    steps = [{"step": step, "phase": 1, "time_s": seconds,
              "gpu_kv_bytes": int(w.batch_size * (w.prompt_len + step) * kv_per_token), "cpu_kv_bytes": 0,
              "h2d_bytes": h2d if step == 0 else 0, "d2h_bytes": d2h if step == len(decode) else 0}
             for step, seconds in enumerate([prefill_s] + decode)]
    phases = ([{"phase": 1, "first_step": 1, "last_step": len(decode), "time_s": decode_s,
                "gpu_kv_bytes_end": steps[-1]["gpu_kv_bytes"], "cpu_kv_bytes_end": 0}] if decode else [])
    breakdown_s = {**breakdown, "idle": max(0.0, total_s - sum(breakdown.values()))}
    return {
        "source": "exec",
        "workload": w.model_dump(mode="json"),
        "model": wl.model.name,
        "hardware": wl.hardware.name,
        "plan": make_policy(wl, CostModel(wl.hardware)).plan(),
        "device": device_name(device),
        "dtype": str(options.dtype).removeprefix("torch."),
        "weights": options.weights,
        "metrics": {
            "prefill_s": prefill_s,
            "decode_s": decode_s,
            "total_s": total_s,
            "throughput_tok_s": w.batch_size * w.gen_len / total_s,
            "prefill_throughput_tok_s": w.batch_size * w.prompt_len / prefill_s,
            "decode_throughput_tok_s": w.batch_size * len(decode) / decode_s if decode else 0.0,
            "decode_step_s": step_stats(decode),
            "peak_gpu_bytes": peak_gpu_bytes,
            "peak_cpu_bytes": 0,
            "h2d_bytes": h2d,
            "d2h_bytes": d2h,
            "oom": False,
        },
        "phases": phases,
        "breakdown_s": breakdown_s,
        "steps": steps,
        "setup_s": setup_s,
        "notes": [
            "times from the device clock (CUDA events on the GPU, the host clock on the CPU); decode steps replay a "
            "CUDA graph on the GPU",
            "breakdown_s: device time by kind of one eagerly profiled prefill plus (decode steps x one profiled "
            "decode step at the middle context); idle = total_s - their sum",
            "peak_gpu_bytes: torch's allocator peak on the GPU; on the CPU device, the growth of peak resident memory",
            "peak_cpu_bytes: the dense policy keeps no host-side pools",
        ],
    }


def build_trace(result: dict, generation: Generation) -> dict:
    """Chrome trace-event JSON: the prefill and every decode step on a "steps" track, and the KV bytes held."""
    pid = 1
    events: list[dict] = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": f"alisa-exec "
                                                                                            f"({result['device']})"}},
                          {"ph": "M", "pid": pid, "tid": 0, "name": "thread_name", "args": {"name": "steps"}}]
    for record, start_s in zip(result["steps"], generation.marks_s):
        label = "prefill" if record["step"] == 0 else f"decode {record['step']}"
        events.append({"ph": "X", "pid": pid, "tid": 0, "name": label, "ts": start_s * 1e6,
                       "dur": record["time_s"] * 1e6, "args": {"phase": record["phase"]}})
        events.append({"ph": "C", "pid": pid, "name": "KV bytes", "ts": start_s * 1e6,
                       "args": {"gpu": record["gpu_kv_bytes"], "cpu": record["cpu_kv_bytes"]}})
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"workload": result["workload"]}}

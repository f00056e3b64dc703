"""HardwareProfile: the raw measurements of one GPU + PCIe + CPU machine, with provenance, as kept in hw_profiles/*.yaml."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from alisa_sim.errors import SpecError, load_yaml_file, validate
from alisa_sim.limits import MAX_MEMORY_BYTES, MAX_OP_S, MAX_RATE, MAX_TABLE_DIM, MIN_OP_S, MIN_RATE

PROFILE_DIR = Path(__file__).resolve().parent.parent / "hw_profiles"


class _Strict(BaseModel):
    # strict: a count is an integer, not "12" or true; every number is finite.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


# What physics allows a measurement to be: finite, positive and within MIN..MAX (alisa_sim/limits.py).
Seconds = Annotated[float, Field(ge=MIN_OP_S, le=MAX_OP_S)]
Rate = Annotated[float, Field(ge=MIN_RATE, le=MAX_RATE)]
Dim = Annotated[int, Field(gt=0, le=MAX_TABLE_DIM)]
MemoryBytes = Annotated[int, Field(gt=0, le=MAX_MEMORY_BYTES)]


class Source(_Strict):
    """Where a section's numbers come from: measured on the named machine, or derived (datasheet, fit, substitution)."""

    kind: Literal["measured", "derived", "fitted"]
    note: str


class Provenance(_Strict):
    machine: str
    date: str
    method: str
    measurements_file: str | None = None
    software: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)


class GemmRow(_Strict):
    m: Dim
    k: Dim
    n: Dim
    s: Seconds


class DecodeAttentionRow(_Strict):
    """One query per sequence over L cached tokens; `gather20_s` is the same with 20% of the tokens gathered first."""

    b: Dim
    L: Dim
    H: Dim
    D: Dim
    s: Seconds
    gather20_s: Seconds | None = None


class PrefillAttentionRow(_Strict):
    """Causal attention over an L-token prompt."""

    b: Dim
    L: Dim
    H: Dim
    D: Dim
    s: Seconds


class CopyRow(_Strict):
    """One host<->device transfer of `bytes`, pinned and pageable host memory."""

    bytes: MemoryBytes
    h2d_pinned_s: Seconds
    d2h_pinned_s: Seconds
    h2d_pageable_s: Seconds
    d2h_pageable_s: Seconds


# The executor's named ops a profile may time (alisa_exec.ops functions and the cache's, kernels' and tiers' own calls,
# under the names the executor's trace and the profiler use): the shape keys each row gives, and the work the cost
# model interpolates a row's time over (bytes moved; FLOPs for the prompt pass's attention). `e` is bytes per element.
def _kv(b, T, h, kv, d, e):
    return 2 * b * T * kv * d * e  # the cache's bytes; `h` (query heads) tells GQA's families apart, as compute differs


NAMED_OPS: dict[str, tuple[tuple[str, ...], object]] = {
    "project": (("m", "k", "n", "e"), lambda m, k, n, e: (m * k + k * n + m * n) * e),
    # The same GEMM over weights kept packed for MKL (the dense CPU executor's projections at its decode batch).
    "project_packed": (("m", "k", "n", "e"), lambda m, k, n, e: (m * k + k * n + m * n) * e),
    "norm": (("rows", "width", "rms", "e"), lambda rows, width, rms, e: 2 * rows * width * e),
    "activate": (("rows", "width", "gated", "e"), lambda rows, width, gated, e: (3 if gated else 2) * rows * width * e),
    "split_heads": (("rows", "width", "e"), lambda rows, width, e: 2 * rows * width * e),
    "residual": (("rows", "width", "e"), lambda rows, width, e: 3 * rows * width * e),
    "embed": (("rows", "width", "e"), lambda rows, width, e: 2 * rows * width * e),
    "argmax": (("rows", "width"), lambda rows, width: 4 * rows * width),
    "causal_attention": (("b", "L", "h", "d"), lambda b, L, h, d: 2 * b * h * d * L**2),
    # The prompt's last R causal attention rows over its L tokens, explicit and in fp32, summed over each KV head's
    # query group (what H2O's and ALISA's prefill seed their selection with): Q K^T FLOPs.
    "window_rows": (("b", "R", "L", "h", "kv", "d"), lambda b, R, L, h, kv, d: 2 * b * h * R * L * d),
    "masked_attention": (("b", "T", "h", "kv", "d", "e"), _kv),
    "rows_attention": (("b", "T", "h", "kv", "d", "e"), _kv),
    "packed_attention": (("b", "T", "h", "kv", "d", "e"), _kv),
    "sparse_attention": (("b", "T", "h", "kv", "d", "e"), _kv),
    # The same call with some of the index list's rows in a staging buffer (fetched or recomputed this step): off
    # the GPU its PyTorch form gathers every entry from both and picks, about twice the plain call.
    "staged_sparse_attention": (("b", "T", "h", "kv", "d", "e"), _kv),
    # vLLM's: each sequence's T slots of the shared block pool read in place.
    "paged_attention": (("b", "T", "h", "kv", "d", "e"), _kv),
    "cpu_attention": (("b", "T", "h", "kv", "d", "e"), _kv),
    # New tokens' K and V (`width` values a token) written into a cache at their positions (T per sequence): read
    # + write.
    "kv_store": (("b", "T", "width", "e"), lambda b, T, width, e: 2 * b * T * width * e),
    # vLLM's paged cache: new tokens' K/V rows (`width` values) written at their slots of the shared pool, T per
    # sequence (a prompt pass's, or a decode step's one): read + write.
    "block_store": (("b", "T", "width", "e"), lambda b, T, width, e: 2 * b * T * width * e),
    "kv_quantize": (("rows", "width", "e"), lambda rows, width, e: rows * width * (e + 1)),
    "kv_dequantize": (("rows", "width", "e"), lambda rows, width, e: rows * width * (e + 1)),
    # H2O's and StreamingLLM's slots (`scored`: H2O's rule and its fp32 scores). The prompt's K/V and positions of
    # the tokens kept written into the slots (H2O: its attention rows summed, sorted, their sums kept).
    "keep_prompt": (("b", "kv", "L", "d", "e", "scored"),
                    lambda b, kv, L, d, e, scored: b * kv * L * (2 * d * e + 8 + 8 * scored)),
    # The slot to evict: positions (and scores) of the T slots in use read, one minimum found.
    "evict_victim": (("b", "kv", "T", "scored"), lambda b, kv, T, scored: b * kv * T * (8 + 4 * scored)),
    # A decode step's new K/V row and position (and zero score) written at one slot each: read + write.
    "slot_store": (("b", "kv", "d", "e", "scored"),
                   lambda b, kv, d, e, scored: 2 * b * kv * (2 * d * e + 8 + 4 * scored)),
    # H2O's scores of the T kept tokens plus this step's probabilities: read both, write one.
    "score_update": (("b", "kv", "T"), lambda b, kv, T: 12 * b * kv * T),
    # k4-capped: new keys (`rows` tokens x sequences) as 4-bit levels with a scale and a minimum per KV head: read
    # + write.
    "key_copy_store": (("rows", "kv", "d", "e"), lambda rows, kv, d, e: rows * kv * (d * e + d // 2 + 2 * e)),
    # The decode query over the copy of L keys: the copy read and decoded, the scores and probabilities (fp32) of
    # the h query heads written.
    "key_copy_attention": (("b", "L", "h", "kv", "d", "e"),
                           lambda b, L, h, kv, d, e: b * L * (kv * (d // 2 + 2 * e + d * e) + 8 * h)),
    # The capped choice over L tokens of each (sequence, KV head): one masked argmax over the int64 keys per older
    # pick (m of them).
    "capped_pick": (("b", "kv", "L", "m"), lambda b, kv, L, m: b * kv * L * (8 + 10 * max(1, m))),
    "local_sum": (("b", "T"), lambda b, T: 8 * b * T),
    "topk": (("b", "L"), lambda b, L: 8 * b * L),
    "copy_h2d_pinned": (("bytes",), lambda bytes: bytes),
    "copy_h2d_pageable": (("bytes",), lambda bytes: bytes),
    "copy_d2h_pinned": (("bytes",), lambda bytes: bytes),
    "copy_d2h_pageable": (("bytes",), lambda bytes: bytes),
    "host_gather": (("bytes",), lambda bytes: bytes),
    # k4-capped's host gather of `rows` picks' one-KV-head rows (K and V of one head, `row_bytes` in all parts) from
    # the pinned pool: the flat indices built, then the rows read and written.
    "head_gather": (("rows", "row_bytes"), lambda rows, row_bytes: 2 * rows * row_bytes),
    # ALISA's host-side split of a step's selection (T positions per sequence) into the rows to fetch and to
    # recompute, with their index list: the positions read (int32) and up to three int64 entries per row written.
    "stage_indices": (("b", "T"), lambda b, T: 28 * b * T),
}


def op_work(op: str, shape: dict[str, int]) -> float:
    """The work (bytes, or FLOPs) of one named op at a shape; an unknown op or wrong shape keys is a ValueError."""
    if op not in NAMED_OPS:
        raise ValueError(f"unknown op {op!r} (the executor's named ops: {', '.join(NAMED_OPS)})")
    keys, work = NAMED_OPS[op]
    if set(shape) != set(keys):
        raise ValueError(f"op {op!r} takes shape keys {list(keys)}, got {sorted(shape)}")
    return float(work(**shape))


class OpRow(_Strict):
    """One named executor op timed at one shape: device time `s` (on a CPU device, all of it) and `host_s`, the
    host's time issuing its eager calls; `source` says whether it was measured or derived from other rows."""

    op: str
    shape: dict[str, Annotated[int, Field(ge=0, le=MAX_MEMORY_BYTES)]]
    s: Seconds
    host_s: Annotated[float, Field(ge=0, le=MAX_OP_S)]
    source: Literal["measured", "derived"]

    @model_validator(mode="after")
    def _known_op(self) -> "OpRow":
        if self.op in NAMED_OPS and "h" in NAMED_OPS[self.op][0] and "h" not in self.shape:
            raise ValueError(f"op {self.op!r} has no query-head count 'h' in its shape: a profile measured before "
                             "attention rows told GQA's query heads apart; measure it again (alisa-exec profile)")
        op_work(self.op, self.shape)
        return self


class HostOverheadRow(_Strict):
    """The executor's own host time beyond its named ops for one policy (`policy`: the simulator policy's
    `host_key`, e.g. "dense", "flexgen-cpu-attention", "alisa-phase-2") and step kind: `step_s` per step (the step
    driver), `sequence_s` per sequence a step (per-sequence bookkeeping: vLLM's block tables) and `layer_s` per layer
    and row group (the layer loop and the policy's hooks)."""

    policy: str
    kind: Literal["prefill", "decode"]
    step_s: Annotated[float, Field(ge=0, le=MAX_OP_S)]
    sequence_s: Annotated[float, Field(ge=0, le=MAX_OP_S)] = 0.0
    layer_s: Annotated[float, Field(ge=0, le=MAX_OP_S)]


class InStepRow(_Strict):
    """How much longer (> 1) or shorter a named op takes inside the executor's real steps than its rows say, under one
    policy or all, for one family of its shapes (`family`: every shape key but its length and batch, as the cost
    model groups rows): the factor over the op's work (`work` ascending, log-log interpolated, the end values
    beyond), from `calls` calls timed from each one's issue to the next op's (so with the Python between them) on a
    CPU device."""

    op: str
    family: dict[str, Annotated[int, Field(ge=0, le=MAX_MEMORY_BYTES)]]
    policy: str | None = Field(default=None, description=(
        "the simulator policy's `host_key` of the steps the calls ran in (the policy, and ALISA's phase: an op runs "
        "slower after a heavier policy's ops); none: every policy's calls pooled"))
    work: list[Annotated[float, Field(gt=0)]] = Field(min_length=1)
    factor: list[Annotated[float, Field(gt=0, le=1e3)]] = Field(min_length=1)
    calls: Annotated[int, Field(ge=1)]

    @model_validator(mode="after")
    def _curve(self) -> "InStepRow":
        if self.op not in NAMED_OPS:
            raise ValueError(f"unknown op {self.op!r} (the executor's named ops: {', '.join(NAMED_OPS)})")
        if len(self.work) != len(self.factor) or any(a >= b for a, b in zip(self.work, self.work[1:])):
            raise ValueError(f"in_step {self.op}: work must ascend and pair with factor one to one")
        return self


class GpuSection(_Strict):
    source: Source
    name: str
    memory_bytes: MemoryBytes
    hbm_GBps: Rate = Field(description="device-to-device copy bandwidth, bytes read + written per second / 1e9")
    peak_fp16_tflops: Rate
    dtype: Literal["float16", "bfloat16", "float32"] | None = Field(default=None, description=(
        "the dtype its GEMM and attention tables were measured in (the *_fp16 names are historical); absent in "
        "older profiles: float32 on a CPU device, else float16"))
    launch_overhead_s: Seconds = Field(description="host time to issue one kernel (eager PyTorch)")
    host_overheads: list[HostOverheadRow] = Field(default_factory=list, description=(
        "the executor's host time beyond its named ops, per policy and step kind (measured by alisa-exec profile; "
        "none where not measured)"))
    gemm_fp16: list[GemmRow] = Field(min_length=2)
    decode_attention_fp16: list[DecodeAttentionRow] = Field(min_length=2)
    prefill_attention_fp16: list[PrefillAttentionRow] = Field(min_length=2)
    ops: list[OpRow] = Field(default_factory=list, description="the executor's named ops, row by row (NAMED_OPS)")
    in_step: list[InStepRow] = Field(default_factory=list, description=(
        "named ops timed inside the executor's real steps against their rows, per op family (measured by alisa-exec "
        "profile on a CPU device at its --models' layers; none elsewhere)"))

    def host_overhead(self, policy: str, kind: str) -> HostOverheadRow | None:
        """The measured host overhead of `policy`'s `kind` steps, else dense's (the base every policy's layer loop
        shares), else None."""
        rows = {(row.policy, row.kind): row for row in self.host_overheads}
        return rows.get((policy, kind)) or rows.get(("dense", kind))


class LinkSection(_Strict):
    source: Source
    name: str
    copies: list[CopyRow] = Field(min_length=2)
    bidirectional_factor: float = Field(
        gt=0, le=1.0,
        description="per-direction bandwidth when H2D and D2H run at once, as a share of one-way bandwidth")

    @model_validator(mode="after")
    def _sorted(self) -> "LinkSection":
        sizes = [row.bytes for row in self.copies]
        if sizes != sorted(set(sizes)):
            raise ValueError("link.copies must be sorted by strictly increasing bytes")
        return self


class CpuDecodeAttentionRow(_Strict):
    b: Dim
    L: Dim
    H: Dim
    D: Dim
    dtype: Literal["float32", "float16", "bfloat16"]
    s: Seconds


class CpuSection(_Strict):
    source: Source
    name: str
    cores: Dim
    memory_bytes: MemoryBytes
    memcpy_GBps: Rate = Field(description="single-stream memcpy, bytes read + written per second / 1e9")
    copy_GBps: Rate = Field(description="multi-threaded tensor copy, bytes read + written per second / 1e9")
    gemm_tflops: dict[Literal["float32", "float16", "bfloat16"], Rate] = Field(
        description="dense GEMM rate by dtype (float32, bfloat16)")
    decode_attention: list[CpuDecodeAttentionRow] = Field(min_length=1)


class HardwareProfile(_Strict):
    name: str
    description: str
    # What executes the ops: a CUDA GPU behind the host that issues them, or the CPU itself (host and device are one
    # resource, as in profiles from `alisa-exec profile --device cpu`).
    device_kind: Literal["cuda", "cpu"] = "cuda"
    provenance: Provenance
    gpu: GpuSection
    link: LinkSection
    cpu: CpuSection

    @property
    def value_bytes(self) -> int:
        """Bytes per value of the dtype the device's tables were measured in: what a model spec that does not say
        its own `dtype_bytes` is planned with on this profile."""
        dtype = self.gpu.dtype or ("float32" if self.device_kind == "cpu" else "float16")
        return 4 if dtype == "float32" else 2


def load_hardware_profile(ref: str | Path) -> HardwareProfile:
    """A profile by name (a file in hw_profiles/) or by path to a YAML file."""
    path = Path(ref)
    if not path.suffix:
        path = PROFILE_DIR / f"{ref}.yaml"
        if not path.is_file():
            known = ", ".join(sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")))
            # `cpu` names this machine's own profile, which is measured, never shipped
            measure = (f"; measure it first: alisa-exec profile --device cpu --quick --out {path}" if ref == "cpu"
                       else "")
            raise SpecError(f"unknown hardware profile {str(ref)!r} (known: {known}; or give a path to a YAML "
                            f"file){measure}")
    stat = path.stat() if path.is_file() else None  # a missing file gets load_yaml_file's message
    return _load_profile_file(str(path), stat and stat.st_mtime_ns, stat and stat.st_size)


@lru_cache(maxsize=32)
def _load_profile_file(path: str, mtime_ns: int | None, size: int | None) -> HardwareProfile:
    """A profile file parsed and validated once per version of the file (a sweep loads the same few profiles for
    every point; the YAML parse is most of a short simulation's time). Profiles are frozen, so sharing is safe."""
    return validate(HardwareProfile, load_yaml_file(path, "hardware profile"), path)

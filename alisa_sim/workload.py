"""Workload: what to run (model, machine, batch, lengths, KV policy, memory caps), loaded from YAML and validated."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, model_validator

from alisa_sim.errors import SpecError, load_json_file, load_yaml_file, validate
from alisa_sim.hardware import HardwareProfile, load_hardware_profile
from alisa_sim.limits import MAX_BATCH_SIZE, MAX_SEQ_LEN
from alisa_sim.model_spec import PRESETS, ModelSpec, load_model_spec
from alisa_sim.overrides import apply_overrides, describe_overrides
from alisa_sim.swa import SELECTORS, SWA_CURRENT_DEFAULT, SWA_CURRENT_OPTIONS

GB = 1e9


class _Strict(BaseModel):
    # strict: "12" is not a count and true is not 1; numbers are finite.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


BatchSize = Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE)]
Tokens = Annotated[int, Field(gt=0, le=MAX_SEQ_LEN)]
Step = Annotated[int, Field(ge=0, le=MAX_SEQ_LEN)]


class DensePolicyConfig(_Strict):
    """Weights and the whole KV cache on the GPU."""

    name: Literal["dense"]


class AcceleratePolicyConfig(_Strict):
    """HF Accelerate-style: weights on the GPU, the whole KV cache on the CPU, streamed back layer by layer every step."""

    name: Literal["accelerate"]
    pinned: bool = True


class ZeroPolicyConfig(_Strict):
    """DeepSpeed ZeRO-Inference: weights in CPU memory streamed layer by layer, KV cache on the GPU."""

    name: Literal["zero"]
    pinned: bool = True


class FlexGenPolicyConfig(_Strict):
    """FlexGen, with its own CLI knobs. Any of percent / gpu_batch_size / num_gpu_batches / cpu_attention left out
    is chosen by FlexGen's LP policy search."""

    name: Literal["flexgen"]
    percent: list[float] | None = Field(
        default=None, min_length=6, max_length=6,
        description="[wg, wc, cg, cc, hg, hc]: GPU and CPU shares (%) of weights, KV cache, activations")
    gpu_batch_size: BatchSize | None = None
    num_gpu_batches: BatchSize | None = None
    cpu_attention: bool | None = Field(default=None, description="FlexGen's --cpu-cache-compute: attention over "
                                                                 "CPU-resident KV runs on the CPU")
    overlap: bool = Field(default=True, description="FlexGen's --overlap: transfers overlap compute")
    pin_weight: bool = Field(default=True, description="FlexGen's --pin-weight: CPU weights in pinned memory")

    @model_validator(mode="after")
    def _check_percent(self) -> "FlexGenPolicyConfig":
        if self.percent is None:
            return self
        for what, (gpu, cpu) in zip(("weights", "KV cache", "activations"), zip(self.percent[::2], self.percent[1::2])):
            if not (0 <= gpu <= 100 and 0 <= cpu <= 100):
                raise ValueError(f"{what} shares must lie in 0..100, got {gpu} and {cpu}")
            if abs(gpu + cpu - 100) > 1e-6:
                raise ValueError(f"{what}: GPU {gpu}% + CPU {cpu}% must make 100% (no profile has a disk tier)")
        return self


class VllmPolicyConfig(_Strict):
    """vLLM (V0 engine, PagedAttention) on an offline batch, with its own knobs under their CLI names: a GPU pool of
    KV blocks, FCFS admission, whole sequences preempted by recompute or swap when the blocks run out."""

    name: Literal["vllm"]
    block_size: Tokens = Field(default=16, description="tokens per KV block")
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="share of the GPU memory vLLM may use; "
                                          "the KV pool is what it leaves after weights and activations")
    max_num_seqs: BatchSize = Field(default=256, description="running sequences at most")
    max_model_len: Tokens | None = Field(default=None, description="default: the model's max positions, or "
                                         "prompt_len + gen_len when longer")
    max_num_batched_tokens: Annotated[int, Field(gt=0, le=MAX_BATCH_SIZE * MAX_SEQ_LEN)] | None = Field(
        default=None, description="tokens per prefill iteration; default max(2048, max_model_len) as in vLLM V0")
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    swap_space: float = Field(default=4, ge=0, le=2**20, description="CPU swap space in GiB (vLLM's --swap-space)")


KvSparsity = Annotated[float, Field(ge=0, lt=1, description="share of the cached tokens a step does not attend to")]


class AlisaPolicyConfig(_Strict):
    """ALISA: Sparse Window Attention, three-phase token-level KV scheduling with recompute, INT8 KV.

    p1, p2, alpha and beta left out are chosen by the planner (`alisa-sim plan`); see docs/alisa-model.md for
    what each option means and its default."""

    name: Literal["alisa"]
    kv_sparsity: KvSparsity = 0.8
    int8: bool = True
    recompute: bool = True
    dynamic_scheduling: bool = Field(default=True, description="false: a FlexGen-style static split of every "
                                                               "token's KV along heads (the paper's ablation)")
    storage: Literal["all", "sparse_only"] = "all"
    selection: Literal["per_layer", "per_head"] = "per_layer"
    recompute_source: Literal["layer_input", "full_forward"] = "layer_input"
    attention_kernel: Literal["gather", "fused"] = Field(
        default="fused", description="gather: pack the selected tokens, then dense attention (the paper's "
                                      "implementation); fused: attention reads them in place (the executor's Triton "
                                      "kernel)")
    p1: Step | None = Field(default=None, description="first decode step of Phase II (KV partly on the CPU)")
    p2: Step | None = Field(default=None, description="first decode step of Phase III (recompute)")
    alpha: float | None = Field(default=None, ge=0, le=1, description="least share of the KV kept on the CPU in "
                                                                      "Phases II and III")
    beta: float | None = Field(default=None, ge=0, le=1, description="share of the CPU KV deleted (oldest first) "
                                                                     "and recomputed in Phase III")
    selection_stats: str | None = Field(default=None, description="selection_stats JSON (default: the shipped one)")
    selection_trace: str | None = Field(default=None, description="a measured run's result.json (alisa-exec) whose "
                                        "per-step fetched and recomputed token rows replace the selection_stats "
                                        "expectation (validation; replayed only under the plan it was measured with)")
    swa_current: Literal[SWA_CURRENT_OPTIONS] = Field(
        default=SWA_CURRENT_DEFAULT, description="extra: SWA attends the current token on top of k recent and k older "
        "tokens (2k + 1); inside: the current token is one of the k recent ones (2k, the paper's literal budget)")
    swa_self_weight: bool = Field(default=False, description="whether a step's attention row credits its own token "
                                                             "in the local sums (with extra it changes no selection)")
    selector: Literal[SELECTORS] = Field(
        default="swa", description="swa: SWA's set, one per layer, chosen a step ahead (the paper); k4-capped: per KV "
        "head from the step's own query over a 4-bit copy of the keys, held to SWA's ages (docs/accuracy.md)")

    @model_validator(mode="after")
    def _check_phases(self) -> "AlisaPolicyConfig":
        if self.p1 is not None and self.p2 is not None and self.p2 < self.p1:
            raise ValueError(f"p2 ({self.p2}) must not come before p1 ({self.p1})")
        if self.selector == "k4-capped":
            needs = {"kv_sparsity > 0": self.kv_sparsity > 0, "recompute: false": not self.recompute,
                     "dynamic_scheduling: true": self.dynamic_scheduling, "storage: all": self.storage == "all",
                     "selection: per_layer": self.selection == "per_layer", "attention_kernel: fused":
                     self.attention_kernel == "fused"}
            missing = [what for what, held in needs.items() if not held]
            if missing:
                raise ValueError(f"selector k4-capped needs {', '.join(missing)} (its SWA alongside is one set per "
                                 "layer; per-KV-head recompute and the gather path are not built)")
        return self


class H2OPolicyConfig(_Strict):
    """H2O: per-head heavy hitters (attention summed over all history) plus recent tokens, the rest evicted for
    good; half of the kept budget each."""

    name: Literal["h2o"]
    kv_sparsity: KvSparsity = 0.8


class StreamingLLMPolicyConfig(_Strict):
    """StreamingLLM: `sinks` first tokens plus a recent window, the rest evicted for good."""

    name: Literal["streamingllm"]
    kv_sparsity: KvSparsity = 0.8
    sinks: Tokens = 4


PolicyConfig = Annotated[
    Union[DensePolicyConfig, AcceleratePolicyConfig, ZeroPolicyConfig, FlexGenPolicyConfig, VllmPolicyConfig,
          AlisaPolicyConfig, H2OPolicyConfig, StreamingLLMPolicyConfig],
    Field(discriminator="name"),
]
POLICY_NAMES = ("dense", "accelerate", "zero", "flexgen", "vllm", "alisa", "h2o", "streamingllm")


class MemoryCaps(_Strict):
    """Caps below the profile's capacities: a 141 GB GPU can be told to behave like a 16 GB one."""

    gpu_gb: PositiveFloat | None = None
    cpu_gb: PositiveFloat | None = None


class Workload(_Strict):
    model: str | dict
    hardware: str
    batch_size: BatchSize
    prompt_len: Tokens
    gen_len: Tokens = Field(description="generated tokens per sequence, the first one produced by the prefill")
    policy: PolicyConfig
    memory: MemoryCaps = MemoryCaps()
    overlap: bool = Field(default=True, description="false: every op runs back to back (the paper's Eq. 4 accounting)")

    @model_validator(mode="after")
    def _check_lengths(self) -> "Workload":
        if self.prompt_len + self.gen_len > MAX_SEQ_LEN:
            raise ValueError(f"prompt_len + gen_len = {self.prompt_len + self.gen_len:,} is past the limit of "
                             f"{MAX_SEQ_LEN:,} tokens per sequence")
        return self

    @model_validator(mode="after")
    def _check_flexgen_blocks(self) -> "Workload":
        policy = self.policy
        if policy.name != "flexgen":
            return self
        if policy.gpu_batch_size and policy.num_gpu_batches:
            if policy.gpu_batch_size * policy.num_gpu_batches != self.batch_size:
                raise ValueError(f"flexgen: gpu_batch_size {policy.gpu_batch_size} x num_gpu_batches "
                                 f"{policy.num_gpu_batches} must equal batch_size {self.batch_size}")
        for knob in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(policy, knob)
            if value and self.batch_size % value:
                raise ValueError(f"flexgen: {knob} {value} does not divide batch_size {self.batch_size} (FlexGen runs "
                                 "num_gpu_batches blocks of gpu_batch_size sequences)")
        return self


class ResolvedWorkload:
    """A validated workload with its model spec and hardware profile loaded, and the effective memory capacities."""

    def __init__(self, workload: Workload, model: ModelSpec, hardware: HardwareProfile):
        self.workload = workload
        self.model = model
        self.hardware = hardware
        caps = workload.memory
        self.gpu_capacity_bytes = _capped(hardware.gpu.memory_bytes, caps.gpu_gb, "memory.gpu_gb", hardware.name)
        self.cpu_capacity_bytes = _capped(hardware.cpu.memory_bytes, caps.cpu_gb, "memory.cpu_gb", hardware.name)

    @property
    def policy(self):
        return self.workload.policy

    @property
    def decode_steps(self) -> int:
        return self.workload.gen_len - 1

    def max_context(self) -> int:
        return self.workload.prompt_len + self.workload.gen_len


def _capped(capacity: int, cap_gb: float | None, field: str, profile: str) -> int:
    if cap_gb is None:
        return capacity
    if cap_gb * GB > capacity:
        raise SpecError(f"{field} = {cap_gb:g} GB exceeds the {capacity / GB:.1f} GB of hardware profile '{profile}'")
    if int(cap_gb * GB) < 1:
        raise SpecError(f"{field} = {cap_gb:g} GB is less than one byte")
    return int(cap_gb * GB)


def _resolve_ref(ref: str, base: Path | None) -> str:
    """Paths in a workload file are relative to that file; preset and profile names pass through."""
    if base is None or ref in PRESETS or not (("/" in ref) or ref.endswith((".json", ".yaml", ".yml"))):
        return ref
    path = Path(ref)
    return str(path if path.is_absolute() else (base / path))


def _file_refs_resolved(data: dict, base: Path | None) -> dict:
    """The mapping with the paths it names (model, hardware, ALISA's selection files) made relative to `base`, the
    workload file's folder; anything not a string is left to validation."""
    data = dict(data)
    for key in ("model", "hardware"):
        if isinstance(data.get(key), str):
            data[key] = _resolve_ref(data[key], base)
    if isinstance(data.get("policy"), dict):
        data["policy"] = {key: _resolve_ref(value, base) if key in ("selection_stats", "selection_trace")
                          and isinstance(value, str) else value for key, value in data["policy"].items()}
    return data


def resolve_workload(data: dict, source: str = "workload", base: Path | None = None,
                     hardware: str | None = None, policy: str | None = None,
                     overrides: list[str] | tuple[str, ...] = ()) -> ResolvedWorkload:
    """Validate a workload mapping, apply command-line overrides (--hardware, --policy, then each --set KEY=VALUE)
    and load what it names."""
    data = _file_refs_resolved(data, base)  # before the overrides: a path given on the command line is the cwd's
    if hardware is not None:
        data["hardware"] = hardware
    if policy is not None:
        data["policy"] = {"name": policy}
    data = apply_overrides(data, overrides)
    source += describe_overrides(overrides)
    workload = validate(Workload, data, source)
    model = load_model_spec(workload.model)
    profile = load_hardware_profile(workload.hardware)
    if "dtype_bytes" not in model.model_fields_set:  # the values the profile's device was measured in
        model = model.model_copy(update={"dtype_bytes": profile.value_bytes})
    resolved = ResolvedWorkload(workload, model, profile)
    if model.family == "opt" and resolved.max_context() > model.max_position_embeddings:
        raise SpecError(f"{source}: prompt_len + gen_len = {resolved.max_context()} exceeds {model.name}'s "
                        f"{model.max_position_embeddings} learned positions")
    total = resolved.gpu_capacity_bytes + resolved.cpu_capacity_bytes
    if model.weight_bytes > total:
        raise SpecError(f"{source}: {model.name} weights ({model.weight_bytes / GB:.1f} GB) do not fit even in GPU + CPU "
                        f"memory together ({total / GB:.1f} GB on '{profile.name}')")
    return resolved


def load_workload(path: str | Path, hardware: str | None = None, policy: str | None = None,
                  overrides: list[str] | tuple[str, ...] = ()) -> ResolvedWorkload:
    """Load and validate a workload YAML file, or the workload inside a Plan or Result JSON file (what
    `alisa-sim plan --json` and both runners write); `hardware` and `policy` override the file's choices."""
    path = Path(path)
    if path.suffix == ".json":
        data = load_json_file(path, "plan")
        if not isinstance(data, dict) or not isinstance(data.get("workload"), dict):
            raise SpecError(f"{path}: a plan or result JSON must hold a 'workload' mapping")
        data = data["workload"]
    else:
        data = load_yaml_file(path, "workload")
    return resolve_workload(data, str(path), path.parent, hardware, policy, overrides)

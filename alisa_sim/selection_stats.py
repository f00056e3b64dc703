"""selection_stats: where SWA's globally selected tokens lie by age, a property of the model's attention that the
simulator's ALISA policy needs to know how many picks live on the CPU. `alisa-exec eval --stats` measures it.

File format (JSON, "format": "alisa-selection-stats/1"):
    age_edges:   increasing bin edges over the normalised age of a token, 0 (newest) to 1 (the first token);
                 the age of the token at position i when n tokens are cached is (n - 1 - i) / n.
    by_sparsity: {"<kv_sparsity>": [fraction of global picks per age bin, summing to 1], ...}
    plus provenance: model, text, context, measured_by, date, notes.
Global picks are never among the k most recent tokens (those are the local window), so their mass lies at ages
above k/n = r/2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from alisa_sim.errors import load_json_file, validate

DEFAULT_STATS = Path(__file__).resolve().parent / "data" / "selection_stats_default.json"  # measured on SmolLM2-135M
# The assumption before any measurement: global picks spread evenly over every age outside the local window.
UNIFORM_STATS = DEFAULT_STATS.with_name("selection_stats_uniform.json")
# `k4-capped`'s picks (docs/accuracy.md, reports/accuracy/k4-capped/): the default of the alisa policy's selector
K4_CAPPED_STATS = DEFAULT_STATS.with_name("selection_stats_k4-capped.json")
FORMAT = "alisa-selection-stats/1"


class SelectionStats(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: str = Field(pattern=f"^{FORMAT}$")
    model: str
    text: str
    context: int = Field(gt=0)
    measured_by: str
    date: str
    notes: list[str] = Field(default_factory=list)
    age_edges: list[float] = Field(min_length=2)
    by_sparsity: dict[str, list[float]] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "SelectionStats":
        edges = np.asarray(self.age_edges)
        if edges[0] != 0 or edges[-1] != 1 or np.any(np.diff(edges) <= 0):
            raise ValueError("age_edges must increase from 0 to 1")
        for sparsity, mass in self.by_sparsity.items():
            if not 0 <= float(sparsity) < 1:
                raise ValueError(f"by_sparsity key {sparsity!r} is not a KV sparsity in [0, 1)")
            if len(mass) != len(edges) - 1 or min(mass) < 0 or abs(sum(mass) - 1) > 1e-6:
                raise ValueError(f"by_sparsity[{sparsity}] needs {len(edges) - 1} non-negative fractions summing to 1")
        return self

    def _mass(self, kv_sparsity: float) -> np.ndarray:
        """The measured distribution at the nearest measured sparsity."""
        nearest = min(self.by_sparsity, key=lambda key: abs(float(key) - kv_sparsity))
        return np.asarray(self.by_sparsity[nearest])

    def share_older_than(self, age: float, kv_sparsity: float) -> float:
        """Fraction of global picks whose normalised age exceeds `age` (uniform within a bin)."""
        edges = np.asarray(self.age_edges)
        cumulative = np.concatenate([[0.0], np.cumsum(self._mass(kv_sparsity))])
        return float(1.0 - np.interp(min(max(age, 0.0), 1.0), edges, cumulative))


def load_selection_stats(path: str | Path | None = None) -> SelectionStats:
    """A selection_stats file, or the shipped default."""
    path = Path(path) if path else DEFAULT_STATS
    return validate(SelectionStats, load_json_file(path, "selection_stats"), str(path))

"""FlexGen's policy search: for each block shape, an LP over the placement shares minimizing FlexGen's estimate of
the run time under peak-memory constraints (Sheng et al., ICML 2023, Sec. 4.3), solved with scipy.

The LP is FlexGen's own analytical estimate, not the simulation: per layer, prefill and decode take the longest
of their H2D, D2H and compute terms (transfers assumed perfectly overlapped), each linear in the shares, with
the rates read off this machine's profile at the sizes the policy moves. The simulator then times the chosen
policy as a DAG, so the two may differ (see docs/baselines.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from alisa_sim.cost_model import CostModel
from alisa_sim.errors import SpecError
from alisa_sim.policies.flexgen import FlexGenPolicy, FlexGenSetting, flexgen_static_memory
from alisa_sim.workload import ResolvedWorkload

# Variables: CPU shares of weights, KV, activations (GPU shares are 1 minus these), then per-layer Tpre and Tgen.
_WC, _CC, _HC, _TPRE, _TGEN = range(5)


@dataclass(frozen=True)
class LpSolution:
    setting: FlexGenSetting
    lp_time_s: float  # FlexGen's estimate of the whole run

    def lp_throughput(self, tokens: int) -> float:
        return tokens / self.lp_time_s


def _affine_memory(wl: ResolvedWorkload, cost: CostModel, gbs: int, ngb: int, cpu_attention: bool):
    """GPU and CPU bytes at the longest context as constant + coefficients on (wc, cc, hc)."""
    probe = FlexGenPolicy(wl, cost, FlexGenSetting((100, 0, 100, 0, 100, 0), gbs, ngb, cpu_attention))
    kv_total = probe.kv_bytes(wl.max_context())

    def at(wc: float, cc: float, hc: float) -> np.ndarray:
        static = flexgen_static_memory(probe, wc, cc, hc, cpu_attention)
        return np.array([static.gpu_bytes + (1 - cc) * kv_total, static.cpu_bytes + cc * kv_total])

    base = at(0, 0, 0)
    coefficients = np.stack([at(*unit) - base for unit in np.eye(3)], axis=1)  # rows: gpu, cpu
    return base, coefficients


def solve_lp(wl: ResolvedWorkload, cost: CostModel, gbs: int, ngb: int, cpu_attention: bool,
             percent: tuple | None = None) -> LpSolution | None:
    """The best placement for one block shape (or the estimate of a fixed `percent`); None when nothing fits."""
    m = wl.model
    s, n, bls = wl.workload.prompt_len, wl.workload.gen_len, gbs * ngb
    layer_w = m.layer_weight_bytes
    kv_token = m.kv_bytes_per_token_per_layer()
    hidden_token = m.hidden_size * m.dtype_bytes
    mean_context = s + n / 2

    def bandwidth(direction: str, nbytes: float) -> float:
        return nbytes / cost.copy_s(max(nbytes, 1.0), direction)

    h2d_bw = bandwidth("h2d", layer_w)
    d2h_bw = bandwidth("d2h", gbs * s * kv_token)
    gemm_pre = ngb * sum(cost.gemm_s(g.m, g.k, g.n) for g in m.layer_gemms(gbs * s))
    gemm_gen = ngb * sum(cost.gemm_s(g.m, g.k, g.n) for g in m.layer_gemms(gbs))
    att_pre = ngb * cost.prefill_attention_s(gbs, s, m.num_heads, m.dim_per_head)
    ctx = math.ceil(mean_context)
    att_gen_gpu = ngb * cost.decode_attention_s(gbs, ctx, m.num_heads, m.num_kv_heads, m.dim_per_head)
    att_gen_cpu = ngb * cost.cpu_decode_attention_s(gbs, ctx, m.num_heads, m.num_kv_heads, m.dim_per_head, 4)

    # Each row: coefficients on (wc, cc, hc), the constant, and which T it bounds: T >= a . x + c.
    rows = [
        ((layer_w / h2d_bw, 0, 2 * s * bls * hidden_token / h2d_bw), 0.0, _TPRE),
        ((0, s * bls * kv_token / d2h_bw, s * bls * hidden_token / d2h_bw), 0.0, _TPRE),
        ((0, 0, 0), gemm_pre + att_pre, _TPRE),
        ((layer_w / h2d_bw, 0 if cpu_attention else mean_context * bls * kv_token / h2d_bw,
          bls * hidden_token / h2d_bw), 0.0, _TGEN),
        ((0, bls * kv_token / d2h_bw, bls * hidden_token / d2h_bw), 0.0, _TGEN),
        # Compute: GEMMs, GPU attention over the GPU share (all of it without CPU attention), CPU attention.
        ((0, att_gen_cpu - att_gen_gpu if cpu_attention else 0, 0), gemm_gen + att_gen_gpu, _TGEN),
    ]
    a_ub, b_ub = [], []
    for coefficients, constant, bound in rows:
        row = np.zeros(5)
        row[:3] = coefficients
        row[bound] = -1
        a_ub.append(row)
        b_ub.append(-constant)
    base, memory = _affine_memory(wl, cost, gbs, ngb, cpu_attention)
    capacity = np.array([wl.gpu_capacity_bytes, wl.cpu_capacity_bytes])
    for device in range(2):
        a_ub.append(np.concatenate([memory[device], [0, 0]]))
        b_ub.append(capacity[device] - base[device])
    bounds = [(0, 1)] * 3 + [(0, None)] * 2
    if percent is not None:
        bounds[:3] = [(p / 100, p / 100) for p in percent[1::2]]
    objective = np.zeros(5)
    objective[_TPRE], objective[_TGEN] = m.num_layers, (n - 1) * m.num_layers
    from scipy.optimize import linprog  # half a second to import, and only FlexGen's LP needs it

    solved = linprog(objective, A_ub=np.array(a_ub), b_ub=np.array(b_ub), bounds=bounds, method="highs")
    if not solved.success:
        return None
    wc, cc, hc = _round_cpu_shares(solved.x[:3], percent)
    chosen = percent or (100 - wc, wc, 100 - cc, cc, 100 - hc, hc)
    return LpSolution(FlexGenSetting(tuple(float(p) for p in chosen), gbs, ngb, cpu_attention), float(solved.fun))


def _round_cpu_shares(shares: np.ndarray, fixed) -> tuple[int, int, int]:
    """Whole percents as FlexGen's CLI takes them, rounding CPU shares up so the GPU never gets more than fits."""
    if fixed is not None:
        return tuple(fixed[1::2])
    return tuple(int(min(100, math.ceil(share * 100 - 1e-6))) for share in shares)


def block_shapes(batch_size: int) -> list[tuple[int, int]]:
    """(gpu_batch_size, num_gpu_batches) pairs whose product is the batch."""
    return [(gbs, batch_size // gbs) for gbs in range(1, batch_size + 1) if batch_size % gbs == 0]


def search(wl: ResolvedWorkload, cost: CostModel) -> list[LpSolution]:
    """Every feasible candidate the workload leaves open, best LP estimate first."""
    cfg = wl.policy
    shapes = block_shapes(wl.workload.batch_size)
    if cfg.gpu_batch_size:
        shapes = [(cfg.gpu_batch_size, wl.workload.batch_size // cfg.gpu_batch_size)]
    elif cfg.num_gpu_batches:
        shapes = [(wl.workload.batch_size // cfg.num_gpu_batches, cfg.num_gpu_batches)]
    attention_modes = [cfg.cpu_attention] if cfg.cpu_attention is not None else [False, True]
    solutions = [solution for gbs, ngb in shapes for cpu_attention in attention_modes
                 if (solution := solve_lp(wl, cost, gbs, ngb, cpu_attention, cfg.percent)) is not None]
    return sorted(solutions, key=lambda solution: solution.lp_time_s)


def complete_setting(wl: ResolvedWorkload, cost: CostModel) -> FlexGenSetting:
    """The workload's FlexGen setting, with what it leaves out chosen by the LP search."""
    cfg = wl.policy
    if cfg.percent is not None and (cfg.gpu_batch_size or cfg.num_gpu_batches or wl.workload.batch_size == 1):
        gbs = cfg.gpu_batch_size or wl.workload.batch_size // cfg.num_gpu_batches
        return FlexGenSetting(tuple(cfg.percent), gbs, wl.workload.batch_size // gbs, bool(cfg.cpu_attention))
    solutions = search(wl, cost)
    if not solutions:
        raise SpecError(f"flexgen: no placement of {wl.model.name} at batch {wl.workload.batch_size} fits "
                        f"{wl.gpu_capacity_bytes / 1e9:.1f} GB GPU + {wl.cpu_capacity_bytes / 1e9:.1f} GB CPU "
                        f"memory by FlexGen's LP")
    return solutions[0].setting

"""A plain-PyTorch reference of Sparse Window Attention decoding, step by step, over the whole attention history.

As the house plan defines SWA: at a decode step with n cached tokens (the new one included), k = swa_window(n, s);
the step attends to the most recent tokens (k + 1 with `current="extra"`, the default; k with "inside") and to the
k older ones with the largest attention weight summed over heads over the last k rows of attention history (ties
to the older token), where a row does not count its own query's token unless `self_weight`; while n is below that
budget it attends to all n. The history is every query's row of head-summed attention probabilities: the prompt's
causal rows, then one row per decode step (zero where the step did not attend). Sums are taken in the kernels' fixed-point units, so a sum is
exact and ties are real ties. One token set per layer and sequence. With `int8`, every K/V row is stored through the
kernels' INT8 round trip (per token, groups of `int8_group(head_dim)` channels); the prompt's attention reads its K/V
as computed, decode steps read them from the cache. With `deleted` (the plan's deleted token count per step, Phase
III), a step reads the K/V of its deleted tokens as recomputed from their stored layer inputs (themselves stored
through the INT8 round trip with `int8`): norm, K/V projection and rotary embedding, stored like any other row.

No tiers, no ring, no incremental sums: every K/V stays in one dense buffer and each step recomputes its selection
from the stored rows.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from alisa_exec.kernels.int8_kv import quantize_reference
from alisa_exec.kernels.selection import to_fixed_point
from alisa_exec.kv_cache import int8_group
from alisa_exec.model import Transformer
from alisa_sim.swa import kv_budget, swa_recent, swa_window


def _round_trip(rows: torch.Tensor, group: int) -> torch.Tensor:
    """Rows [..., width] through INT8 per token, groups of `group` channels."""
    width = rows.shape[-1]
    data, scale, zero = quantize_reference(rows.reshape(1, 1, -1, width), 1, group)
    values = (data.float().view(-1, width // group, group) * scale.float().view(-1, width // group, 1)
              + zero.float().view(-1, width // group, 1))
    return values.to(rows.dtype).view(rows.shape)


def _stored(k: torch.Tensor, v: torch.Tensor, int8: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [batch, seq, kv_heads, d] as the cache gives them back."""
    if not int8:
        return k, v
    batch, seq, heads, d = k.shape
    row = torch.cat((k.reshape(batch, seq, -1), v.reshape(batch, seq, -1)), dim=-1)
    k2, v2 = _round_trip(row, int8_group(d)).split(heads * d, dim=-1)
    return k2.view(batch, seq, heads, d), v2.view(batch, seq, heads, d)


def _attend(q, keys, values, allowed):
    """q [b, H, m, d]; keys, values [b, Hkv, P, d]; allowed [b, m, P] -> outputs [b, m, H*d], head-summed probs."""
    batch, heads, rows, d = q.shape
    group = heads // keys.shape[1]
    scores = (q.float() @ keys.float().repeat_interleave(group, 1).transpose(-1, -2)) / math.sqrt(d)
    probs = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    out = (probs @ values.float().repeat_interleave(group, 1)).to(q.dtype)
    return out.transpose(1, 2).reshape(batch, rows, -1), probs.sum(dim=1)


def select(history: list[torch.Tensor], n: int, sparsity: float, current: str = "extra",
           self_weight: bool = False) -> torch.Tensor:
    """Which of the n positions a step attends, [batch, P] bool, from the history rows ([batch, P] each; row i is
    the query at position i)."""
    batch, total = history[0].shape
    k, recent = swa_window(n, sparsity), swa_recent(n, sparsity, current)
    take = kv_budget(n, sparsity, current) - recent
    chosen = torch.zeros(batch, total, dtype=torch.bool)
    chosen[:, n - recent:n] = True
    older = n - recent
    first = max(0, len(history) - k)
    sums = torch.zeros(batch, total, dtype=torch.int64)
    for query, row in enumerate(history[first:], start=first):
        weights = to_fixed_point(row)
        if not self_weight:
            weights[:, query] = 0
        sums += weights
    top = torch.sort(sums[:, :older], dim=1, descending=True, stable=True).indices[:, :take]
    chosen.scatter_(1, top, True)
    return chosen


@torch.no_grad()
def swa_generate(model: Transformer, prompt: torch.Tensor, gen_len: int, sparsity: float, int8: bool = False,
                 deleted: list[int] | None = None, current: str = "extra",
                 self_weight: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy tokens [batch, gen_len] and each step's logits [batch, vocab] (the prefill's first); `deleted[step]`:
    the oldest tokens whose K/V a decode step recomputes from their layer inputs."""
    batch, s = prompt.shape
    spec = model.spec
    total = s + gen_len - 1
    model.setup_tables(total)
    kv_shape = (batch, spec.num_kv_heads, total, spec.dim_per_head)
    keys = [torch.zeros(kv_shape, dtype=model.tok_embeddings.weight.dtype) for _ in model.layers]
    values = [torch.zeros_like(t) for t in keys]
    layer_inputs = [torch.zeros(batch, total, spec.hidden_size, dtype=keys[0].dtype) for _ in model.layers]
    history: list[list[torch.Tensor]] = [[] for _ in model.layers]
    tokens, logits_log = [], []
    token, positions = prompt, torch.arange(s)
    for step in range(gen_len):
        n = s + step
        x = model.embed(token, positions)
        rope = model.rope(positions)
        for index, layer in enumerate(model.layers):
            q, k, v = layer.attention.split_heads(layer.attention.wqkv(layer.attention_norm(x)), rope)
            stored_k, stored_v = _stored(k, v, int8)
            keys[index][:, :, positions] = stored_k.transpose(1, 2)
            values[index][:, :, positions] = stored_v.transpose(1, 2)
            layer_inputs[index][:, positions] = _round_trip(x, int8_group(spec.hidden_size)) if int8 else x
            read_keys, read_values = keys[index], values[index]
            recomputed = deleted[step] if deleted and step else 0
            if recomputed:
                h = layer.attention_norm(layer_inputs[index][:, :recomputed])
                k_re, v_re = _stored(*layer.attention.project_kv(h, model.rope(torch.arange(recomputed))), int8)
                read_keys, read_values = read_keys.clone(), read_values.clone()
                read_keys[:, :, :recomputed] = k_re.transpose(1, 2)
                read_values[:, :, :recomputed] = v_re.transpose(1, 2)
            if step == 0:  # the prompt: causal and dense, over its own K/V as computed (the cache stores them)
                allowed = torch.ones(s, s, dtype=torch.bool).tril()[None].expand(batch, s, s)
                y, probs = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed)
                probs = F.pad(probs, (0, total - s))
            else:
                allowed = select(history[index], n, sparsity, current, self_weight)[:, None]
                y, probs = _attend(q.transpose(1, 2), read_keys, read_values, allowed)
            history[index].extend(probs.unbind(dim=1))
            h = x + layer.attention.wo(y)
            x = h + layer.feed_forward(layer.ffn_norm(h))
        logits = model.logits(x[:, -1:])[:, 0]
        logits_log.append(logits)
        token = logits.argmax(dim=-1, keepdim=True)
        tokens.append(token)
        positions = torch.tensor([n])
    return torch.cat(tokens, dim=1), logits_log


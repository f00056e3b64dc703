"""The CPU decode step's lean forms against their plain references: rotary by one roll, packed GEMM on N-d inputs,
ALISA's split of its selection into the rows to fetch and to recompute."""

import pytest
import torch
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from alisa_exec import ops
from alisa_exec.model import apply_rope, gemm, mkl_packable, pack_weight, rope_tables
from alisa_sim.model_spec import load_model_spec
from tiny_models import TINY_SPEC


def hf_tables(spec, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the positions as Hugging Face's LLaMA lays them out (each frequency twice, unsigned)."""
    dim = spec.dim_per_head
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    angles = torch.outer(positions.float(), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x cos + rotate_half(x) sin with Hugging Face's rotate_half (-x2, x1) and unsigned tables, the multiply-add
    fused as the executor fuses it."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.addcmul(x * cos.unsqueeze(-2), torch.cat((-x2, x1), dim=-1), sin.unsqueeze(-2))


@pytest.mark.parametrize("batch,seq,heads", [(1, 1, 1), (3, 1, 5), (2, 17, 4)])
def test_rotary_by_one_roll_is_bit_equal_to_rotate_half(batch, seq, heads):
    spec = load_model_spec(TINY_SPEC)
    generator = torch.Generator().manual_seed(batch * 100 + seq)
    x = torch.randn(batch, seq, heads, spec.dim_per_head, generator=generator)
    cos, signed_sin = rope_tables(spec, 64, torch.float32, torch.device("cpu"))
    shared = torch.randint(0, 64, (seq,), generator=generator)
    per_sequence = torch.randint(0, 64, (batch, seq), generator=generator)  # every sequence at its own positions
    for positions in (shared, per_sequence):
        want_cos, want_sin = hf_tables(spec, positions.flatten())
        want_cos, want_sin = want_cos.view(*positions.shape, -1), want_sin.view(*positions.shape, -1)
        assert torch.equal(cos[positions], want_cos)
        got = apply_rope(x, cos[positions], signed_sin[positions])
        assert torch.equal(got, rotate_half_reference(x, want_cos, want_sin))
        # Hugging Face's own function ([batch, heads, seq, d]; its products rounded apart, so to rounding)
        tables = [t.expand(batch, seq, -1) for t in (want_cos, want_sin)]
        want, _ = apply_rotary_pos_emb(x.transpose(1, 2), x.transpose(1, 2), *tables)
        torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not mkl_packable(torch.device("cpu"), torch.float32), reason="this torch has no MKL")
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_gemm_on_any_leading_dims_equals_linear(rows, bias):
    generator = torch.Generator().manual_seed(rows)
    linear = torch.nn.Linear(37, 29, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(29, 37, generator=generator))
    pack_weight(linear, "packed_weight", linear.weight, rows)
    inputs = [torch.randn(rows, 1, 37, generator=generator),  # a decode step's rows
              torch.randn(1, rows, 37, generator=generator),
              torch.randn(rows, 37, generator=generator),
              torch.randn(1, rows, 37, generator=generator).transpose(0, 1)]  # not contiguous
    with torch.no_grad():
        for x in inputs:
            got = gemm(x, linear.weight, linear.bias, linear, "packed_weight")
            assert got.shape == (*x.shape[:-1], 29)
            torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias), rtol=1e-5, atol=1e-5)
        other = torch.randn(rows + 1, 1, 37, generator=generator)  # not the packed row count: F.linear as is
        assert torch.equal(gemm(other, linear.weight, linear.bias, linear, "packed_weight"),
                           F.linear(other, linear.weight, linear.bias))


@pytest.mark.parametrize("batch,T,deleted_end,fetch_end", [(1, 1, 0, 1), (3, 7, 2, 5), (2, 9, 0, 0), (4, 5, 40, 40),
                                                           (2, 16, 3, 3)])
def test_stage_indices_splits_the_selection_as_a_row_by_row_scan(batch, T, deleted_end, fetch_end):
    """Every (sequence, slot, position) live on the CPU in [deleted_end, fetch_end), then every deleted one below
    deleted_end, each group in row-major order; nothing else of `out` is written (empty groups included)."""
    torch.manual_seed(T)
    selected = torch.stack([torch.randperm(40)[:T].sort().values for _ in range(batch)]).to(torch.int32)
    out = torch.full((3 * batch * T + 1,), -7, dtype=torch.int64)
    live, deleted = ops.stage_indices(selected, deleted_end, fetch_end, out)
    expected = {"live": [], "deleted": []}
    for seq in range(batch):
        for slot in range(T):
            position = int(selected[seq, slot])
            if deleted_end <= position < fetch_end:
                expected["live"].append((seq, slot, position))
            elif position < deleted_end:
                expected["deleted"].append((seq, slot, position))
    for name, entries in (("live", live), ("deleted", deleted)):
        assert list(zip(*(part.tolist() for part in entries))) == expected[name]
    rows = expected["live"] + expected["deleted"]
    assert out[:3 * len(rows)].view(3, -1).T.tolist() == [list(row) for row in rows]
    assert (out[3 * len(rows):] == -7).all()

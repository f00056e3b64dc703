"""The fused sparse decode attention kernel against the gather-then-attend reference in fp32."""

import pytest
import torch
from torch.nn import functional as F

from alisa_exec.kernels import (QuantizedKV, dense_decode_attention, gather_decode_attention,
                                sparse_decode_attention, store_quantized)

HEADS_PER_KV = (1, 4, 8)


def random_case(generator, device, batch, kv_heads, group, max_seq_len, num_tokens, head_dim=32,
                dtype=torch.float16, per_head=False):
    """q, K, V and a sorted index list of `num_tokens` distinct positions per sequence (or per KV head)."""
    q = torch.randn(batch, kv_heads * group, head_dim, generator=generator).to(device, dtype)
    k = torch.randn(batch, kv_heads, max_seq_len, head_dim, generator=generator).to(device, dtype)
    v = torch.randn(batch, kv_heads, max_seq_len, head_dim, generator=generator).to(device, dtype)
    lists = batch * (kv_heads if per_head else 1)
    indices = torch.stack([torch.randperm(max_seq_len, generator=generator)[:num_tokens].sort().values
                           for _ in range(lists)])
    indices = indices.view(batch, kv_heads, num_tokens) if per_head else indices
    return q, k, v, indices.to(device)


def reference(q, k, v, indices, lengths=None):
    """Gather then attend, in fp32."""
    k = k if isinstance(k, QuantizedKV) else k.float()
    v = v if isinstance(v, QuantizedKV) else v.float()
    return gather_decode_attention(q.float(), k, v, indices, lengths)


def assert_matches(result, expected, heads):
    out, probs = result
    ref_out, ref_probs = expected
    torch.testing.assert_close(out.float(), ref_out, atol=2e-3, rtol=2e-3)
    # probabilities summed over `heads` heads: fp32 math on fp16 scores
    torch.testing.assert_close(probs, ref_probs, atol=1e-3 * heads, rtol=1e-3)


@pytest.mark.parametrize("group", HEADS_PER_KV)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_matches_reference(device, generator, group, num_splits):
    """GQA ratios, several splits, an index list longer than one block and not a multiple of it."""
    q, k, v, indices = random_case(generator, device, batch=2, kv_heads=2, group=group, max_seq_len=200,
                                   num_tokens=150)
    result = sparse_decode_attention(q, k, v, indices, num_splits=num_splits)
    assert_matches(result, reference(q, k, v, indices), heads=2 * group)


@pytest.mark.parametrize("group", [1, 4])
def test_valid_lengths_per_sequence(device, generator, group):
    """Entries past a sequence's length are ignored (even out of range), their probabilities are 0; a length of 0
    gives output 0 and probabilities 0."""
    q, k, v, indices = random_case(generator, device, batch=4, kv_heads=2, group=group, max_seq_len=90,
                                   num_tokens=70)
    lengths = torch.tensor([70, 1, 0, 33], device=device)
    indices[3, 33:] = 10_000  # garbage past the length must not be read
    out, probs = sparse_decode_attention(q, k, v, indices, lengths, num_splits=2)
    assert_matches((out, probs), reference(q, k, v, indices, lengths), heads=2 * group)
    assert torch.all(out[2] == 0) and torch.all(probs[2] == 0)
    assert torch.all(probs[1, 1:] == 0) and torch.all(probs[3, 33:] == 0)


@pytest.mark.parametrize("group", [1, 4])
def test_one_pool_shared_by_every_sequence(device, generator, group):
    """vLLM's paged cache: one pool of token rows read by every sequence at its own slots (the pool's view expanded
    over the batch, stride 0), the index lists padded past each length with the last slot: equal to attending each
    sequence's own rows, gathered into a cache of its own."""
    _, pool, pool_v, _ = random_case(generator, device, batch=1, kv_heads=2, group=group, max_seq_len=150,
                                     num_tokens=1)
    q = torch.randn(3, 2 * group, 32, generator=generator).to(device, torch.float16)
    slots = torch.randperm(150, generator=generator)[:3 * 40].view(3, 40).to(device)
    lengths = torch.tensor([40, 1, 23], device=device)
    slots[1, 1:], slots[2, 23:] = slots[1, 0], slots[2, 22]  # padding, as the executor pads
    shared_k, shared_v = pool.expand(3, -1, -1, -1), pool_v.expand(3, -1, -1, -1)
    result = sparse_decode_attention(q, shared_k, shared_v, slots, lengths, num_splits=2)
    own_k, own_v = (t[0].index_select(1, slots.flatten()).view(2, 3, 40, 32).transpose(0, 1) for t in (pool, pool_v))
    own = torch.arange(40, device=device).expand(3, 40)
    assert_matches(result, reference(q, own_k, own_v, own, lengths), heads=2 * group)
    assert_matches(gather_decode_attention(q.float(), shared_k.float(), shared_v.float(), slots, lengths),
                   reference(q, own_k, own_v, own, lengths), heads=2 * group)


@pytest.mark.parametrize("group", HEADS_PER_KV)
def test_one_selected_token_is_that_tokens_value(device, generator, group):
    """b = 1, T = 1: softmax over one token is 1, so the output is its V row and every head contributes 1."""
    q, k, v, indices = random_case(generator, device, batch=1, kv_heads=2, group=group, max_seq_len=8, num_tokens=1)
    out, probs = sparse_decode_attention(q, k, v, indices)
    position = int(indices[0, 0])
    expected = v[0, :, position].repeat_interleave(group, dim=0)
    torch.testing.assert_close(out[0], expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(probs, torch.full((1, 1), 2.0 * group, device=device))


@pytest.mark.parametrize("group", HEADS_PER_KV)
@pytest.mark.parametrize("length", [1, 5, 77])
def test_full_selection_equals_dense_attention(device, generator, group, length):
    """r = 1 selects every cached token: the output is dense SDPA over the cache prefix, and the head-summed
    probabilities are dense attention's."""
    q, k, v, _ = random_case(generator, device, batch=2, kv_heads=2, group=group, max_seq_len=96, num_tokens=1)
    indices = torch.arange(length, device=device).expand(2, length)
    out, probs = sparse_decode_attention(q, k, v, indices, num_splits=2)
    dense = F.scaled_dot_product_attention(q.float()[:, :, None], k[:, :, :length].float(),
                                           v[:, :, :length].float(), enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(out.float(), dense, atol=2e-3, rtol=2e-3)
    scores = torch.einsum("bhd,bhtd->bht", q.float(), k[:, :, :length].float().repeat_interleave(group, dim=1))
    dense_probs = torch.softmax(scores / 32 ** 0.5, dim=-1).sum(dim=1)
    torch.testing.assert_close(probs, dense_probs, atol=1e-3 * 2 * group, rtol=1e-3)


@pytest.mark.parametrize("group", [1, 4])
def test_per_head_index_lists(device, generator, group):
    """The per-head ablation: each KV head has its own list; probabilities are summed over its query group."""
    q, k, v, indices = random_case(generator, device, batch=2, kv_heads=2, group=group, max_seq_len=120,
                                   num_tokens=70, per_head=True)
    lengths = torch.tensor([70, 41], device=device)
    out, probs = sparse_decode_attention(q, k, v, indices, lengths, num_splits=2)
    assert probs.shape == (2, 2, 70)
    assert_matches((out, probs), reference(q, k, v, indices, lengths), heads=group)


@pytest.mark.parametrize("head_dim", [8, 24])
def test_bf16_and_head_dims_padded_in_the_kernel(device, generator, head_dim):
    """bf16; head dims below tl.dot's 16 and not a power of two."""
    q, k, v, indices = random_case(generator, device, batch=2, kv_heads=2, group=4, max_seq_len=80, num_tokens=50,
                                   head_dim=head_dim, dtype=torch.bfloat16)
    out, probs = sparse_decode_attention(q, k, v, indices)
    ref_out, ref_probs = reference(q, k, v, indices)
    torch.testing.assert_close(out.float(), ref_out, atol=1e-2, rtol=1e-2)  # bf16 rounds q.k at 3 digits
    torch.testing.assert_close(probs, ref_probs, atol=1e-2, rtol=1e-2)


# Each quantization layout once, the GQA ratios 1 and 8 alternating: the kernel's dequantization and its query-group
# loop are apart, so the layouts' cross product with the ratios only repeats them (under the interpreter, ~2 s each).
@pytest.mark.parametrize("token_group, channel_group, head_dim, group",
                         [(1, 16, 32, 8), (1, 32, 32, 1), (4, 1, 32, 8), (1, 8, 24, 1)])
def test_int8_cache(device, generator, group, token_group, channel_group, head_dim):
    """INT8 K/V dequantized in the kernel, per-token groups of channels or channel-wise over token groups."""
    q, k, v, indices = random_case(generator, device, batch=2, kv_heads=2, group=group, max_seq_len=96,
                                   num_tokens=70, head_dim=head_dim)
    caches = []
    for values in (k, v):
        cache = QuantizedKV.empty(2, 2, 96, head_dim, values.dtype, device, channel_group=channel_group,
                                  token_group=token_group)
        store_quantized(cache, torch.arange(96, device=device), values)
        caches.append(cache)
    lengths = torch.tensor([70, 45], device=device)
    result = sparse_decode_attention(q, *caches, indices, lengths, num_splits=2)
    assert_matches(result, reference(q, *caches, indices, lengths), heads=2 * group)


def test_explicit_gather_mode_matches_reference(device, generator):
    """The gather-then-attend path in fp16 (the Fig. 11 breakdown's baseline) agrees with itself in fp32."""
    q, k, v, indices = random_case(generator, device, batch=2, kv_heads=2, group=4, max_seq_len=64, num_tokens=40)
    lengths = torch.tensor([40, 0], device=device)
    out, probs = gather_decode_attention(q, k, v, indices, lengths)
    assert out.dtype == q.dtype
    assert_matches((out, probs), reference(q, k, v, indices, lengths), heads=8)
    assert torch.all(out[1] == 0) and torch.all(probs[1] == 0)


def test_dense_decode_attention_is_softmax_attention(generator):
    """The reference's attention core against a direct formula, one head, no masking."""
    q = torch.randn(1, 1, 8, generator=generator)
    k, v = torch.randn(2, 1, 1, 5, 8, generator=generator)
    weights = torch.softmax((k[0, 0] @ q[0, 0]) / 8 ** 0.5, dim=0)
    out, probs = dense_decode_attention(q, k, v)
    torch.testing.assert_close(out[0, 0], weights @ v[0, 0])
    torch.testing.assert_close(probs[0], weights)


def tiered_case(generator, device, dtype, int8, batch=2, kv_heads=2, group=2, head_dim=16, window=24, staged=40,
                num_tokens=30):
    """The executor's tiered cache (`TokenRows`): a window ring of slot-major K/V rows and a staging buffer of rows
    shared by the batch, and an index list mixing ring slots (e >= 0) and staged rows (e < 0)."""
    from alisa_exec.kv_cache import GPU, TokenRows, Tiers

    tiers = Tiers(device, triton=device.type == "cuda")
    width = 2 * kv_heads * head_dim
    ring = TokenRows(tiers, GPU, "kv", window, batch, width, dtype, int8, group=8)
    ring.store(slice(0, window), torch.randn(window, batch, width, generator=generator).to(device))
    stage = ring.staging(tiers, GPU, "kv_staging", staged)
    stage.store(slice(0, staged), torch.randn(staged, 1, width, generator=generator).to(device))
    ring_slots = torch.stack([torch.randperm(window, generator=generator)[:num_tokens // 2] for _ in range(batch)])
    stage_rows = torch.randperm(staged, generator=generator)[:batch * (num_tokens - num_tokens // 2)]
    indices = torch.cat((ring_slots, -1 - stage_rows.view(batch, -1)), dim=1)
    indices = indices[:, torch.randperm(num_tokens, generator=generator)].to(device)
    q = torch.randn(batch, kv_heads * group, head_dim, generator=generator).to(device, dtype)
    return q, ring, stage, indices, kv_heads


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("int8", [False, True], ids=["values", "int8"])
def test_tiered_cache_ring_and_staged_rows_in_one_pass(device, generator, dtype, int8):
    """The kernel reads the window ring and the staging buffer in place, over one index list, GQA, fp16 or fp32,
    INT8 dequantized in the kernel: it matches the PyTorch form the CPU device runs (gather from both, attend), and
    that form matches attention over the rows read back one by one."""
    q, ring, stage, indices, kv_heads = tiered_case(generator, device, dtype, int8)
    lengths = torch.tensor([30, 17], device=device)
    views = dict(staged=stage.kv_views(kv_heads))
    fused = sparse_decode_attention(q, *ring.kv_views(kv_heads), indices, lengths, num_splits=2, **views)
    plain = gather_decode_attention(q, *ring.kv_views(kv_heads), indices, lengths, **views)
    tolerance = 2e-3 if dtype == torch.float16 else 1e-5
    torch.testing.assert_close(fused[0], plain[0], atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(fused[1], plain[1], atol=tolerance * q.shape[1], rtol=tolerance)
    for b in range(2):  # the plain form against the rows as `TokenRows` decodes them
        rows = torch.stack([ring.read(int(e))[b] if e >= 0 else stage.read(int(-e - 1))[0]
                            for e in indices[b, :int(lengths[b])]])
        keys, values = rows.view(len(rows), 2, kv_heads, -1).unbind(1)
        out, probs = dense_decode_attention(q[b:b + 1], keys.transpose(0, 1)[None], values.transpose(0, 1)[None])
        # in the dtype's tolerance above (torch's fp16 default, atol 1e-5, is a few ulps of an output near zero)
        torch.testing.assert_close(plain[0][b:b + 1], out, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(plain[1][b, :len(rows)], probs[0], atol=tolerance * q.shape[1], rtol=tolerance)

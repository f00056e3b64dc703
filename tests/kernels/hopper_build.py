"""Compile every kernel variant for Hopper (sm_90, through ptxas) without a GPU; run by test_hopper_build.py.

Arguments get the specialization Triton's launcher gives real tensors and strides: pointers and strides that are
multiples of 16 are marked so. Checks that the K/V gathers of the split kernel become 16-byte asynchronous copies
(the loads are pipelined and vectorized) and that nothing spills to local memory.
"""

import os

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402  (after TRITON_INTERPRET is cleared)
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from alisa_exec.kernels import int8_kv, selection, sparse_attention  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
# Strides and lengths that are multiples of 16 in the benchmark's shapes (32 heads x 128, L a multiple of 64).
ALIGNED = {"q_stride_b", "q_stride_h", "kv_stride_b", "kv_stride_h", "kv_stride_s", "param_stride_b", "param_stride_h",
           "split_len", "slice_len", "out_stride_b", "out_stride_h", "x_stride_b", "x_stride_h", "x_stride_s",
           "data_stride_b", "data_stride_h", "data_stride_s", "scores_stride_b", "ring_stride_b", "ring_stride_row",
           "stage_stride_h", "stage_stride_s"}


def build(kernel, pointers: dict[str, str], constexprs: dict, **options):
    """Compile `kernel` with these pointer element types (others fp32) and constexprs; ints are i32."""
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointers.get(name, "fp32")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32" if name == "sm_scale_log2" else "i32"
            if name in ALIGNED:
                attrs[(i,)] = [["tt.divisibility", 16]]
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=HOPPER, options=options)
    assert ".local" not in compiled.asm["ptx"], f"{kernel.__name__} {constexprs} spills to local memory"
    return compiled


def main():
    for quantized in (False, True):
        kv = "u8" if quantized else "fp16"
        pointers = dict(q_ptr="fp16", k_ptr=kv, v_ptr=kv, k_scale_ptr="fp16", k_zero_ptr="fp16", v_scale_ptr="fp16",
                        v_zero_ptr="fp16", sk_ptr=kv, sv_ptr=kv, sk_scale_ptr="fp16", sk_zero_ptr="fp16",
                        sv_scale_ptr="fp16", sv_zero_ptr="fp16", indices_ptr="i32", lengths_ptr="i32")
        # The executor's tiered read (window ring and staging buffer) at GQA groups of 8, the plain cache otherwise.
        for group, dtype, staged in ((1, tl.float16, False), (4, tl.bfloat16, False), (8, tl.float16, True)):
            compiled = build(sparse_attention._split_kernel, pointers, dict(
                KV_HEADS=32 // group, GROUP=group, GROUP_PAD=16, HEAD_DIM=128, HEAD_DIM_PAD=128,
                BLOCK=sparse_attention.BLOCK_T, QUANTIZED=quantized, TOKEN_GROUP=1, CHANNEL_GROUP=64,
                DOT_DTYPE=dtype, STAGED=staged, INPUT_PRECISION="tf32"), num_warps=4, num_stages=3)
            assert "cp.async.cg.shared.global" in compiled.asm["ptx"], "K/V rows are not copied 16 bytes at a time"
    build(sparse_attention._split_kernel, dict(k_ptr="u8", v_ptr="u8", indices_ptr="i32", lengths_ptr="i32"), dict(
        KV_HEADS=2, GROUP=3, GROUP_PAD=16, HEAD_DIM=24, HEAD_DIM_PAD=32, BLOCK=sparse_attention.BLOCK_T,
        QUANTIZED=True, TOKEN_GROUP=4, CHANNEL_GROUP=1, DOT_DTYPE=tl.float16, STAGED=False, INPUT_PRECISION="tf32"),
          num_warps=4, num_stages=3)
    build(sparse_attention._split_kernel, dict(q_ptr="fp32", k_ptr="fp32", v_ptr="fp32", indices_ptr="i32",
                                              lengths_ptr="i32"), dict(
        KV_HEADS=8, GROUP=4, GROUP_PAD=16, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK=sparse_attention.BLOCK_T,
        QUANTIZED=False, TOKEN_GROUP=1, CHANNEL_GROUP=1, DOT_DTYPE=tl.float32, STAGED=True, INPUT_PRECISION="ieee"),
          num_warps=4, num_stages=3)
    for splits_pad, heads_per_row in ((1, 1), (4, 8), (16, 32)):
        build(sparse_attention._merge_kernel, dict(out_ptr="fp16", lengths_ptr="i32"), dict(
            NUM_HEADS=32, HEAD_DIM=128, HEAD_DIM_PAD=128, SPLITS_PAD=splits_pad, HEADS_PER_ROW=heads_per_row,
            HEADS_PER_ROW_PAD=heads_per_row, BLOCK=sparse_attention.BLOCK_T), num_warps=4)
    for token_group, channel_group in ((1, 64), (1, 128), (4, 1)):
        build(int8_kv._quantize_store_kernel,
              dict(x_ptr="fp16", positions_ptr="i64", data_ptr="u8", scale_ptr="fp16", zero_ptr="fp16"),
              dict(KV_HEADS=32, HEAD_DIM=128, TOKEN_GROUP=token_group, CHANNEL_GROUP=channel_group,
                   NUM_CHANNEL_GROUPS=128 // channel_group, GROUPS_PER_PROGRAM=max(1, 16 // token_group),
                   SCALE_EPS=2.0 ** -10))
    build(selection._update_window_kernel, dict(scores_ptr="i64", positions_ptr="i32"),
          dict(BLOCK=selection.LocalAttentionSum.BLOCK))


if __name__ == "__main__":
    main()

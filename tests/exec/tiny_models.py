"""Tiny random model configurations for the executor tests, and greedy decoding by a Hugging Face model."""


import transformers

VOCAB = 97
MAX_POSITIONS = 64

TINY_CONFIGS = {
    "opt": lambda: transformers.OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS, word_embed_proj_dim=64),
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
        vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5),
    # Grouped-query attention with a head_dim that is not hidden_size / num_heads, tied embeddings, another theta.
    "llama-gqa": lambda: transformers.LlamaConfig(
        hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
        intermediate_size=80, vocab_size=VOCAB, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
        rope_theta=5000.0),
}

# A tiny LLaMA-family spec for runs with dummy weights.
TINY_SPEC = dict(name="tiny-llama", family="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 ffn_dim=64, vocab_size=50, max_position_embeddings=64, tie_word_embeddings=False, norm_eps=1e-5)


def hf_greedy(model, prompts, gen_len: int):
    """`gen_len` greedy tokens per prompt from a Hugging Face causal LM, with no end-of-sequence stop
    (`generate` stops at EOS, or with min_new_tokens masks EOS out, so it is not plain greedy decoding)."""
    import torch

    with torch.no_grad():
        out = model(prompts, use_cache=True)
        tokens = [out.logits[:, -1:].argmax(-1)]
        for _ in range(gen_len - 1):
            out = model(tokens[-1], past_key_values=out.past_key_values, use_cache=True)
            tokens.append(out.logits[:, -1:].argmax(-1))
    return torch.cat(tokens, dim=1)

"""Input limits: bounds no real deployment reaches, so that valid-looking input can never ask for unbounded work.

Every limit is refused on load with one message naming the field and the bound (exit code 2); the README's
"Input limits" section lists them. They sit far past today's largest models and machines (Llama 3.1 405B: 126 layers,
hidden 16,384, 128k context; a 2 TB host), so no real workload meets them.
"""

from __future__ import annotations

# Input files (workloads, profiles, sweeps, plans, model config.json).
MAX_FILE_BYTES = 16 * 2**20  # a profile is ~10 KB
MAX_NESTING = 64  # mappings and lists inside each other
MAX_VALUES = 1_000_000  # values after YAML aliases are expanded (a profile holds ~1,100)

# Workload shape.
MAX_BATCH_SIZE = 65_536
MAX_SEQ_LEN = 2**20  # prompt_len + gen_len, tokens per sequence
MAX_SWEEP_POINTS = 100_000

# Model shape (presets, config.json or an inline mapping).
MAX_LAYERS = 1_024
MAX_HIDDEN = 131_072  # hidden_size, ffn_dim and num_heads * head_dim
MAX_FFN = 1_048_576
MAX_HEADS = 1_024
MAX_HEAD_DIM = 4_096
MAX_VOCAB = 4_194_304
MAX_POSITIONS = 2**27

# Hardware profiles: physics, not taste. Times of one op or copy, rates and capacities.
MIN_OP_S = 1e-9  # no kernel or copy finishes in under a nanosecond
MAX_OP_S = 3_600.0  # nor is a measurement of one op an hour long
MIN_RATE = 1e-6  # GB/s or TFLOP/s
MAX_RATE = 1e6
MAX_MEMORY_BYTES = 2**50  # 1 PiB of GPU or CPU memory
MAX_TABLE_DIM = 2**30  # m, k, n, batch, length, heads and bytes of a measured row

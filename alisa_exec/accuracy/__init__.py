"""Accuracy of KV-sparsity methods on a real model: perplexity with each method applied as during decoding, the
attention statistics the ALISA paper reports, and the measured selection statistics the simulator reads."""

"""alisa-exec: the real executor (a PyTorch decoder, weight loaders, fast generation, a hardware profiler)."""

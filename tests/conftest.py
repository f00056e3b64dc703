"""Test-wide setup: Triton kernels run under the interpreter when there is no CUDA device. The variable must be set
before triton is first imported, whichever test imports the kernels first."""

import os

try:
    import torch
except ImportError:  # the simulator's tests run without torch
    torch = None

if torch is not None and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

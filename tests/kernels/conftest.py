"""Kernel tests run on the GPU when there is one, else on the CPU under the Triton interpreter (tiny shapes).

TRITON_INTERPRET must be set before the kernels are defined, i.e. before alisa_exec.kernels is first imported.
"""

import os

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def generator() -> torch.Generator:
    """Fresh random inputs for every test, reproducible from the printed seed."""
    seed = torch.seed() % 2**31
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)

"""Kernel tests run on the GPU when there is one, else on the CPU under the Triton interpreter (tiny shapes; the
root conftest sets TRITON_INTERPRET before anything imports triton)."""

import pytest

torch = pytest.importorskip("torch")
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

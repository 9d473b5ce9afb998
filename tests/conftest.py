from pathlib import Path

import pytest
import torch

from flowbook.cpu import keep_freed_memory

keep_freed_memory()  # this worker and the notebook kernels it starts reuse freed buffers (see flowbook.cpu)

ROOT = Path(__file__).resolve().parent.parent


def perturb_(module: torch.nn.Module, scale: float = 0.2, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from its (zero) initialisation, so that a layer is no identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


@pytest.fixture(scope="session")
def mnist():
    """(train, val, test) from PATH_DATASETS; skipped where the data is not on disk."""
    from flowbook import config
    from flowbook.data import load_mnist

    if not (config.data_path() / "MNIST" / "raw").exists():
        pytest.skip(f"MNIST not under {config.data_path()}; set PATH_DATASETS")
    return load_mnist(download=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


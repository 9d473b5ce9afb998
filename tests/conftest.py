import math
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


def dequantized_logits_by_hand(imgs: torch.Tensor, u: torch.Tensor, alpha: float, margin: float,
                               quants: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Chapter 2's dequantization written out, for tests of a model's bpd: int imgs [B, C, H, W] and noise u in
    [0, 1) -> (logits y [B, C, H, W], ldj [B]) in float64, ldj summing per pixel log(1 - 2 margin) (the noise's
    squeeze), -log(quants), log(1 - alpha) and the logit's -log r - log(1 - r)."""
    u = margin + (1 - 2 * margin) * u.double()
    r = (1 - alpha) * (imgs.double() + u) / quants + alpha / 2
    y = torch.log(r) - torch.log1p(-r)
    per_pixel = math.log(1 - 2 * margin) - math.log(quants) + math.log(1 - alpha) - torch.log(r) - torch.log1p(-r)
    return y, per_pixel.flatten(1).sum(1)


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


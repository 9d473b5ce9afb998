"""What a likelihood does not tell you: out-of-distribution inputs and typicality.

    variants = ood_variants(test_images)            # {name: int images [N, 1, 28, 28]}
    norms = latent_norms(model, test_images)        # [N]: ||z|| of each image's latent
    score = typicality_score(model, images, reference)  # [N]: |bpd - typical bpd| on the reference set

Flows trained on MNIST give some inputs that look nothing like digits a higher likelihood than the digits
themselves (Nalisnick et al., 2019): coupling flows learn local pixel statistics, and smooth backgrounds are
cheap (Kirichenko et al., 2020). A typicality test asks whether an input's bpd is near the typical value of
the training distribution, rather than whether it is high.
"""
from __future__ import annotations

import torch

from flowbook.evaluate import bpd_per_image
from flowbook.models import ImageFlow


def ood_variants(images: torch.Tensor, seed: int = 0) -> dict:
    """{name: int32 images [N, 1, 28, 28] in 0..255} made from `images` (real digits, [N, 1, 28, 28]):
    the digits themselves, all black, constant grey, uniform noise, inverted, shifted by 5 pixels, flipped
    left-right and upside down."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "digits": images,
        "all black": torch.zeros_like(images),
        "constant grey": torch.full_like(images, 128),
        "uniform noise": torch.randint(0, 256, images.shape, generator=gen, dtype=images.dtype),
        "inverted": 255 - images,
        "shifted": torch.roll(images, shifts=5, dims=3),
        "flipped left-right": torch.flip(images, dims=[3]),
        "upside down": torch.flip(images, dims=[2]),
    }


@torch.no_grad()
def latent_norms(model: ImageFlow, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """[N]: the Euclidean norm of each image's final latent z = f(x + u) (one dequantization sample)."""
    device = next(model.parameters()).device
    return torch.cat([model.encode(b.to(device))[0].flatten(1).norm(dim=1).cpu() for b in images.split(batch_size)])


def typicality_score(model: ImageFlow, images: torch.Tensor, reference: torch.Tensor,
                     importance_samples: int = 1) -> torch.Tensor:
    """[N]: |bpd(x) - mean bpd of the reference images| (e.g. held-out digits): large for inputs whose
    likelihood is atypical in either direction, too low or suspiciously high."""
    typical = bpd_per_image(model, reference, importance_samples).mean()
    return (bpd_per_image(model, images, importance_samples) - typical).abs()


def separation_auc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """The probability that an out-of-distribution input scores higher than an in-distribution one (the
    area under the ROC curve; 0.5 is chance, 1 a perfect separation), ties counted half."""
    diff = out_scores.view(-1, 1) - in_scores.view(1, -1)
    return ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()

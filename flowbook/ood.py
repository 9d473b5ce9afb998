"""What a likelihood does not tell you: out-of-distribution inputs and typicality.

    variants = ood_variants(test_images)            # {name: int images [N, 1, 28, 28]}
    norms = latent_norms(model, test_images)        # [N]: ||z|| of each image's final latent
    terms = bpd_terms(model, test_images)           # [N] each: whole-latent norm, prior and volume terms, bpd
    score = typicality_score(model, images, reference)  # [N]: |bpd - typical bpd| on the reference set

Flows can give inputs that look nothing like their training data a higher likelihood than the data itself
(Nalisnick et al., 2019a); coupling flows learn to predict pixels from their neighbours (Kirichenko et al.,
2020), so their likelihood follows the grey levels and neighbourhoods of the training images. On MNIST that
makes an all-black image far more likely than any digit, because black is what most training pixels are,
while a smooth constant grey image costs more than 8 bpd (chapter 6 measures both). A typicality test asks
whether an input's bpd is near the typical value of the training distribution, rather than whether it is high.
"""
from __future__ import annotations

import math

import torch

from flowbook.evaluate import bpd_per_image
from flowbook.models import ImageFlow
from flowbook.prior import gaussian_log_prob


def ood_variants(images: torch.Tensor, seed: int = 0) -> dict:
    """{name: int32 images [N, 1, 28, 28] in 0..255} made from `images` (real digits, [N, 1, 28, 28]):
    the digits themselves, all black, constant grey, uniform noise, inverted, shifted by 5 pixels, flipped
    left-right and upside down."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "digits": images,
        "all black": torch.zeros_like(images),
        "constant grey": torch.full_like(images, 128),
        "uniform noise": torch.randint(0, 256, images.shape, generator=gen, dtype=images.dtype).to(images.device),
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


@torch.no_grad()
def bpd_terms(model: ImageFlow, images: torch.Tensor, batch_size: int = 256) -> dict:
    """The one-sample bpd of each image split into its two terms, and the norm of its whole latent.

    log p(x) >= log N(z) + log|det J_f(x + u)| - log q(u | x), z = f(x + u) the whole latent (the final latent
    and every half a split layer factored out). Returns {name: [N]}:
        "norm":   ||z|| of the whole latent (D = C * H * W numbers, as many as the image has pixels);
        "prior":  -log N(z) / (D log 2), the prior's share of the bpd (about 2.05 on the shell ||z||^2 = D);
        "volume": -(log|det J_f| - log q(u | x)) / (D log 2), the volume term's share (the discretisation's
                  log 256 included): negative where f expands volume around x + u;
        "bpd":    prior + volume, the one-sample bpd.
    """
    device = next(model.parameters()).device
    out = {"norm": [], "prior": [], "volume": [], "bpd": []}
    for b in images.split(batch_size):
        z, ldj, splits = model.encode(b.to(device), return_splits=True)
        whole = torch.cat([z.flatten(1), *[s.flatten(1) for s in splits]], dim=1)
        log_prior = gaussian_log_prob(whole)
        volume = ldj - sum((gaussian_log_prob(s) for s in splits), torch.zeros_like(ldj))  # split priors out
        scale = -1 / (math.log(2) * b[0].numel())
        out["norm"].append(whole.norm(dim=1).cpu())
        out["prior"].append((scale * log_prior).cpu())
        out["volume"].append((scale * volume).cpu())
        out["bpd"].append((scale * (log_prior + volume)).cpu())
    return {k: torch.cat(v).float() for k, v in out.items()}


def typicality_score(model: ImageFlow, images: torch.Tensor, reference: torch.Tensor,
                     importance_samples: int = 1) -> torch.Tensor:
    """[N]: |bpd(x) - mean bpd of the reference images| (e.g. held-out digits): large for inputs whose
    likelihood is atypical in either direction, too low or suspiciously high."""
    typical = bpd_per_image(model, reference, importance_samples).mean()
    return (bpd_per_image(model, images, importance_samples) - typical).abs()


def separation_auc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """The probability that an out-of-distribution input scores higher than an in-distribution one (the
    area under the ROC curve; 0.5 is chance, 1 a perfect separation), ties counted half. Non-finite scores
    are refused: a NaN compares as neither higher nor equal and would silently lower the area."""
    for name, scores in (("in_scores", in_scores), ("out_scores", out_scores)):
        if not torch.isfinite(scores).all():
            raise ValueError(f"{name} holds {int((~torch.isfinite(scores)).sum())} NaN or infinite values: no AUC of "
                             "them is meaningful (find out why the model gave them first)")
    diff = out_scores.view(-1, 1) - in_scores.view(1, -1)
    return ((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean()).item()

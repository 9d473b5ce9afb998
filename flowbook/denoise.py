"""Tweedie denoising of the samples of a flow trained on Gaussian-noised images (TarFlow: Zhai et al., 2024).

A model trained on y = y_clean + sigma eps (`flowbook.layers.NoiseAugmentation`, pixels in [-1, 1]) learns the
density p of the noisy images, and its samples are noisy. Tweedie's formula gives the mean of the clean image
given a noisy one from the score of the noisy density alone:

    E[y_clean | y] = y + sigma^2 grad_y log p(y),

and a flow knows log p(y) exactly, so the score is one backward pass of autograd through the flow.

Shapes: y [B, C, H, W] is the output of the model's first layer (for "tarflow_noise", the pixels in [-1, 1]
units); log-densities are [B], in nats, in y's units.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from flowbook.layers.checks import check_latent, check_temperature
from flowbook.prior import gaussian_log_prob


def log_density(model, y: torch.Tensor) -> torch.Tensor:
    """log p(y) [B] in nats, the model's density of y [B, C, H, W], the first layer's output: the prior's
    log N(z) plus the log-determinants of every layer after the first (split layers add their half's log N).
    No dequantization term: a density in y's units (for "tarflow_noise", [-1, 1] pixel units), as Tweedie's
    formula needs. Keeps the graph to y, so that autograd can take its gradient."""
    check_latent(y, "y")
    z, ldj = y, torch.zeros(y.shape[0], device=y.device, dtype=y.dtype)
    for flow in model.flows[1:]:
        z, ldj = flow(z, ldj, reverse=False)
    return gaussian_log_prob(z) + ldj


def _gradient(fn, y: torch.Tensor) -> torch.Tensor:
    """grad_y of fn(y) [B] for y [B, ...], image by image (fn's row b must depend on y[b] alone), detached."""
    with torch.enable_grad():
        v = y.detach().requires_grad_(True)
        out = fn(v)
        if not isinstance(out, torch.Tensor) or out.shape != (y.shape[0],):
            got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"the log-density must return one value per image, shape [{y.shape[0]}], got {got}")
        (grad,) = torch.autograd.grad(out.sum(), v)
    return grad


def score(model, y: torch.Tensor) -> torch.Tensor:
    """grad_y log p(y) [B, C, H, W]: the score of the model's density (`log_density`) at y [B, C, H, W], by
    autograd, without a graph; y and the weights' gradients are left as they were."""
    return _gradient(functools.partial(log_density, model), y)


def _check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma, the standard deviation of the noise in y's units, must be a finite number >= 0 "
                         f"(0: no denoising), got {sigma!r}")
    return float(sigma)


def tweedie_denoise(log_density, y: torch.Tensor, sigma: float) -> torch.Tensor:
    """One step of Tweedie's formula: y + sigma^2 grad_y log_density(y) [B, ...], the mean of x given
    y = x + sigma eps, eps ~ N(0, I), where `log_density` (a callable [B, ...] -> [B]) is the density of the
    noisy y (not of x). Returns a new tensor without a graph; y is unchanged. sigma = 0 returns a copy of y."""
    sigma = _check_sigma(sigma)
    if sigma == 0:
        return y.detach().clone()
    return (y.detach() + sigma ** 2 * _gradient(log_density, y)).detach()


def sample_denoised(model, num: int, temperature: float = 1.0, sigma: float | None = None,
                    seed: int | None = None) -> torch.Tensor:
    """Draw `num` images [num, C, H, W], int32 in 0..255: z ~ N(0, temperature^2 I) of `model.latent_shape(num)`,
    the layers after the first in reverse to y (a noisy image in y's units), one Tweedie step with `sigma`
    (default `model.noise_sigma`, the noise it was trained with; 0: no step, see `sample_noisy`), then the
    first layer's reverse to pixels (the bin each value falls in).

    seed: draws the latent from `torch.manual_seed(seed)` without moving the caller's random state, so that
    the same seed gives the same images, and `sample_noisy` with it the same images before denoising."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    check_temperature(temperature)
    if sigma is None:
        sigma = getattr(model, "noise_sigma", None)
        if sigma is None:
            raise ValueError("this model was not trained on Gaussian-noised images (its noise_sigma is None): pass "
                             "sigma explicitly, or sigma=0 to sample without denoising")
    sigma = _check_sigma(sigma)
    param = next(model.parameters())
    shape = model.latent_shape(num)  # before the seed: its probe of the flow draws noise of its own
    forked = torch.random.fork_rng(devices=[param.device] if param.is_cuda else []) if seed is not None \
        else contextlib.nullcontext()
    with forked, torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        z = torch.randn(shape, device=param.device, dtype=param.dtype) * temperature
        y = model.decode(z, temperature=temperature, stop=1)
    y = tweedie_denoise(functools.partial(log_density, model), y, sigma)
    with torch.no_grad():
        images, _ = model.flows[0](y, torch.zeros(num, device=y.device, dtype=y.dtype), reverse=True)
    return images


def sample_noisy(model, num: int, temperature: float = 1.0, seed: int | None = None) -> torch.Tensor:
    """`sample_denoised` without the Tweedie step (sigma = 0): the model's samples as they come, noise and all;
    with the same seed, the same images as `sample_denoised` before it denoises them."""
    return sample_denoised(model, num, temperature=temperature, sigma=0, seed=seed)

"""Dequantization: from integer pixels to a continuous density, as flow layers.

`Dequantization` and `VariationalDequantization` map integer images x in 0..quants-1 to continuous y in R, through
    x  --(add noise u in [0, 1))-->  x + u  --(/quants: w in [0, 1], squeeze by alpha)-->  r in (0, 1)  --(logit)-->  y
and back by the sigmoid and a floor. Every term they add to `ldj` is listed in the docstrings; chapter 2
derives them one by one, with the same letters (alpha: the logit margin; margin: the noise margin m).

Exactness. Quantizing the dequantized image returns the original pixels for every noise value in [0, 1),
in float32. Two details make it so (the reference implementation misses one pixel of MNIST):
  * the noise is squeezed into [margin, 1 - margin] (a uniform density of height 1 / (1 - 2 margin), which
    `ldj` accounts for), so that no value sits on the border between two integers, and
  * the pixel-level arithmetic (logit, sigmoid, floor) is done in float64 and only y is stored in the
    working dtype. The rounding of y then moves x + u by less than 1e-5, far inside the margin.

`NoiseAugmentation` (TarFlow's input layer) maps the pixels linearly to [-1, 1], without a logit, and adds
Gaussian noise in training (a density of noisy images, not a bound on MNIST's likelihood) or uniform noise
inside the pixel's bin in evaluation (the same bound as `Dequantization`).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowbook import noise as noise_source
from flowbook.layers.checks import check_images


def logit_transform(u: torch.Tensor, alpha: float):
    """y = logit((1 - alpha) u + alpha / 2) for u in [0, 1], elementwise; alpha is the logit margin.

    u: [B, ...] -> y: [B, ...] and log_det: [B], the log-determinant of du -> dy:
        sum over elements of  log(1 - alpha) - log r - log(1 - r),  r = (1 - alpha) u + alpha / 2.
    """
    r = u * (1 - alpha) + 0.5 * alpha
    y = torch.log(r) - torch.log1p(-r)
    per_dim = math.log(1 - alpha) - torch.log(r) - torch.log1p(-r)
    return y, per_dim.flatten(1).sum(dim=1)


def sigmoid_transform(y: torch.Tensor):
    """u = sigmoid(y), elementwise.

    y: [B, ...] -> u: [B, ...] and log_det: [B], the log-determinant of dy -> du:
        sum over elements of  log sigmoid(y) + log sigmoid(-y) = -softplus(-y) - softplus(y).
    """
    per_dim = -F.softplus(-y) - F.softplus(y)
    return torch.sigmoid(y), per_dim.flatten(1).sum(dim=1)


class Dequantization(nn.Module):
    """Uniform dequantization and the logit transform.

    Args:
        alpha: the logit margin, a squeeze of [0, 1] to [alpha/2, 1 - alpha/2], so that the logit stays finite.
        quants: number of integer values (256 for 8-bit images).
        margin: the noise margin m: u is squeezed to [m, 1 - m] so that quantizing is exact in float32.

    forward(z, ldj, reverse=False, noise=None):
        z: int images [B, C, H, W] in 0..quants-1 -> y: [B, C, H, W] in ldj's dtype.
        noise: optional [B, C, H, W] in [0, 1) (default: `flowbook.noise.rand`, which is torch.rand by default).
        ldj [B] gains, summed over the D = C*H*W pixels,
            D log(1 - 2 margin)        u' = margin + (1 - 2 margin) u
          - D log(quants)              w = (x + u') / quants, in [0, 1]
          + D log(1 - alpha) - sum(log r + log(1 - r))   y = logit(r), r = (1 - alpha) w + alpha / 2
    forward(y, ldj, reverse=True):
        y: [B, C, H, W] float -> int32 images floor(quants * w), clamped to 0..quants-1.
        ldj [B] loses the quants, alpha and logit terms (the inverse of y -> x + u').
    """

    def __init__(self, alpha: float = 1e-5, quants: int = 256, margin: float = 1e-4):
        super().__init__()
        if not 0 <= margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {margin}")
        self.alpha = alpha
        self.quants = quants
        self.margin = margin

    def forward(self, z, ldj, reverse=False, noise=None):
        if reverse:
            return self._to_images(z, ldj)
        check_images(z, self.quants)
        u, ldj = self.dequant_noise(z, ldj, noise)
        return self._to_logits(z, u, ldj)

    def dequant_noise(self, x, ldj, noise=None):
        """Noise u [B, C, H, W] in [0, 1) (float64) for images x; uniform, so ldj is unchanged."""
        if noise is None:
            return noise_source.rand(x.shape, device=x.device, dtype=torch.float64), ldj
        return _check_noise(noise, x).to(torch.float64), ldj

    def _to_logits(self, x, u, ldj):
        num_dims = x[0].numel()
        u = _squeeze_noise(u, self.margin)
        w = (x.to(torch.float64) + u) / self.quants
        y, log_det = logit_transform(w, self.alpha)
        log_det = log_det + num_dims * (math.log(1 - 2 * self.margin) - math.log(self.quants))
        return y.to(ldj.dtype), ldj + log_det.to(ldj.dtype)

    def _to_images(self, y, ldj):
        _check_finite(y)
        r, log_det = sigmoid_transform(y.to(torch.float64))
        w = (r - 0.5 * self.alpha) / (1 - self.alpha)
        num_dims = y[0].numel()
        log_det = log_det + num_dims * (math.log(self.quants) - math.log(1 - self.alpha))
        x = torch.floor(w * self.quants).clamp(0, self.quants - 1).to(torch.int32)
        return _mark_non_finite(x, y), ldj + log_det.to(ldj.dtype)


class VariationalDequantization(Dequantization):
    """Dequantization with a learned noise distribution q(u | x) (Ho et al., 2019, Flow++).

    The noise starts uniform, goes to R by a logit, through `var_flows` (coupling layers conditioned on
    the image, rescaled to [-1, 1]) and back to (0, 1) by a sigmoid:
        u0 ~ U[0, 1)  --logit_transform-->  e  --var_flows(orig_img=x)-->  e'  --sigmoid-->  u
    Then as in `Dequantization`. On top of its terms, ldj [B] gains the log-determinant of u0 -> u:
        D log(1 - alpha) - sum(log r0 + log(1 - r0))   (logit of the uniform noise, r0 = (1 - alpha) u0 + alpha / 2)
      + the var_flows' log-determinants
      - sum(softplus(e') + softplus(-e'))             (sigmoid)
    that is, ldj gains -log q(u | x), the term the bound needs: log q(u | x) = -(log-det of u0 -> u).
    With `noise` given, u0 = noise, which makes the layer a deterministic function of the noise.
    """

    def __init__(self, var_flows, alpha: float = 1e-5, quants: int = 256, margin: float = 1e-4):
        super().__init__(alpha=alpha, quants=quants, margin=margin)
        self.flows = nn.ModuleList(var_flows)

    def dequant_noise(self, x, ldj, noise=None):
        cond = x.to(ldj.dtype) / (self.quants - 1) * 2 - 1
        if noise is None:
            u0 = noise_source.rand(x.shape, device=x.device, dtype=ldj.dtype)
        else:
            u0 = _check_noise(noise, x).to(ldj.dtype)
        e, log_det = logit_transform(u0, self.alpha)
        ldj = ldj + log_det
        for flow in self.flows:
            e, ldj = flow(e, ldj, reverse=False, orig_img=cond)
        u, log_det = sigmoid_transform(e.to(torch.float64))
        return u, ldj + log_det.to(ldj.dtype)


NOISE_KINDS = ("gaussian", "uniform")


class NoiseAugmentation(nn.Module):
    """Pixels to [-1, 1] plus noise: Gaussian noise augmentation in training (TarFlow: Zhai et al., 2024),
    uniform dequantization in evaluation. No logit: the flow sees y in about [-1, 1].

    Args:
        sigma: standard deviation of the Gaussian noise in y's units (y in [-1, 1], a bin 2 / quants wide), > 0.
        quants: number of integer values (256 for 8-bit images).
        margin: the uniform noise is squeezed to [margin, 1 - margin], as in `Dequantization`, so that
            quantizing gives every pixel back in float32.

    Which noise a forward pass draws (`current_noise`): the attribute `noise_kind` when set ("gaussian" or
    "uniform"), else the mode: "gaussian" in training (`model.train()`), "uniform" in evaluation
    (`model.eval()`). Set `noise_kind` (or use `with layer.using("gaussian"):`) to compute on purpose the
    likelihood of noisy images with a model in evaluation mode. `gives_bound` says whether the current
    noise makes the model's log-likelihood a bound on the discrete log P(x) (uniform noise only).

    forward(z, ldj, reverse=False, noise=None):
        z: int images x [B, C, H, W] in 0..quants-1 -> y = 2 (x + u) / quants - 1: [B, C, H, W] in ldj's
        dtype (computed in float64), with, per pixel,
            uniform:   u = margin + (1 - 2 margin) u0, u0 ~ U[0, 1)   (y inside x's bin)
            gaussian:  u = 1/2 + (quants / 2) sigma eps, eps ~ N(0, 1),
                       that is y = y_clean + sigma eps, y_clean = (2 x + 1) / quants - 1 the bin's centre.
        noise: optional [B, C, H, W] float, u0 in [0, 1) (uniform) or eps (gaussian); default drawn by
            `flowbook.noise.rand` / `flowbook.noise.randn` (seeded per image in evaluation).
        ldj [B] gains, summed over the D = C*H*W pixels,
            D log(1 - 2 margin)     uniform only: the density 1 / (1 - 2 margin) of the squeezed noise
          + D log(2 / quants)       y = 2 (x + u) / quants - 1, dy / d(x + u) = 2 / quants
        so the model's log-likelihood is a log-density of x + u in pixel units, as for `Dequantization`,
        and bpd carries the log 256 term: a uniform density on [-1, 1]^D, p(y) = 2^-D, scores
        -log2(2^-D (2 / 256)^D) / D = 8 bits per dimension (plus -log2(1 - 2 margin) = 3e-4 for the margin).
        With uniform noise, E_u[log p(x + u)] + D log(1 - 2 margin) <= log P(x) (Jensen): a bound on the
        discrete likelihood. With Gaussian noise it is log p of a noisy image, the density of another,
        continuous data set: the noise leaves the bin (|sigma eps| > 1 / quants), so it bounds nothing of MNIST.
    forward(y, ldj, reverse=True):
        y: [B, C, H, W] float -> int32 images floor((y + 1) quants / 2), clamped to 0..quants-1: the bin y
        lies in, the exact inverse of the uniform forward (the Gaussian forward's y falls outside x's bin
        unless its noise is small: denoise it first, `flowbook.denoise`). ldj [B] loses D log(2 / quants).
    """

    def __init__(self, sigma: float, quants: int = 256, margin: float = 1e-4):
        super().__init__()
        if (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma)
                or sigma <= 0):
            raise ValueError(f"sigma, the standard deviation of the noise in [-1, 1] pixel units, must be a finite "
                             f"number > 0, got {sigma!r}; for uniform dequantization alone use Dequantization")
        if isinstance(quants, bool) or not isinstance(quants, int) or quants < 2:
            raise ValueError(f"quants must be an integer >= 2, got {quants!r}")
        if not 0 <= margin < 0.5:
            raise ValueError(f"margin must be in [0, 0.5), got {margin}")
        self.sigma = float(sigma)
        self.quants = quants
        self.margin = margin
        self.noise_kind = None  # None: "gaussian" in training, "uniform" in evaluation

    @property
    def current_noise(self) -> str:
        """The noise the next forward pass draws: `noise_kind` where set, else by the mode."""
        if self.noise_kind is None:
            return "gaussian" if self.training else "uniform"
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind must be one of {NOISE_KINDS} or None (by the mode), got {self.noise_kind!r}")
        return self.noise_kind

    @property
    def gives_bound(self) -> bool:
        """Whether the current noise makes log-likelihoods bounds on log P(x) (uniform noise)."""
        return self.current_noise == "uniform"

    @contextlib.contextmanager
    def using(self, kind: str | None):
        """Within this block, forward passes draw `kind` noise ("gaussian", "uniform"; None: by the mode)."""
        if kind is not None and kind not in NOISE_KINDS:
            raise ValueError(f"the noise must be one of {NOISE_KINDS} or None (by the mode), got {kind!r}")
        before, self.noise_kind = self.noise_kind, kind
        try:
            yield self
        finally:
            self.noise_kind = before

    def forward(self, z, ldj, reverse=False, noise=None):
        if reverse:
            return self._to_images(z, ldj)
        check_images(z, self.quants)
        num_dims = z[0].numel()
        log_det = num_dims * math.log(2 / self.quants)
        uniform = self.current_noise == "uniform"
        if noise is None:  # drawn here: no check (a check of a GPU tensor's values makes the CPU wait for it)
            draw = noise_source.rand if uniform else noise_source.randn
            noise = draw(z.shape, device=z.device, dtype=torch.float64)
        else:  # a caller's noise: its shape, range and finiteness checked
            noise = _check_noise(noise, z, uniform=uniform).to(torch.float64)
        if uniform:
            u = _squeeze_noise(noise, self.margin)
            log_det += num_dims * math.log(1 - 2 * self.margin)
        else:
            u = 0.5 + (self.quants / 2 * self.sigma) * noise
        y = 2 * (z.to(torch.float64) + u) / self.quants - 1
        return y.to(ldj.dtype), ldj + log_det

    def _to_images(self, y, ldj):
        _check_finite(y)
        x = torch.floor((y.to(torch.float64) + 1) * (self.quants / 2)).clamp(0, self.quants - 1).to(torch.int32)
        return _mark_non_finite(x, y), ldj - y[0].numel() * math.log(2 / self.quants)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}, quants={self.quants}, margin={self.margin}"


def _squeeze_noise(u, margin: float):
    """u in [0, 1) -> margin + (1 - 2 margin) u, in [margin, 1 - margin): no value on a bin's border. Its
    density is 1 / (1 - 2 margin): the caller adds D log(1 - 2 margin) to ldj."""
    return margin + (1 - 2 * margin) * u


def _check_finite(y):
    """A ValueError where the reverse pass reached the pixels with NaN or infinite values."""
    if not torch.compiler.is_compiling() and not torch.isfinite(y).all():
        raise ValueError("the flow's reverse pass produced NaN or infinite values, which are no pixels: "
                         "the latent was too large for the trained model (lower the temperature)")


def _mark_non_finite(x, y):
    """x [B, ...] int32 pixels with -1 wherever y was NaN or infinite: casting a NaN to an integer gives
    INT_MIN on some CPUs and 0 on GPUs, and the clamp turns infinities into 0 or 255, so a compiled sampler,
    which skips `_check_finite`, could otherwise return them as ordinary pixels (its caller checks for -1)."""
    return torch.where(torch.isfinite(y), x, torch.full_like(x, -1))


def _check_noise(noise, x, uniform: bool = True):
    """`noise` unchanged where it is a finite float tensor of x's shape, in [0, 1) where `uniform` (else
    standard normal noise); a ValueError otherwise (the values are not checked while compiling)."""
    what = "in [0, 1)" if uniform else "of standard normal noise"
    if not isinstance(noise, torch.Tensor) or noise.shape != x.shape or not noise.is_floating_point():
        got = (f"{str(noise.dtype).replace('torch.', '')} {list(noise.shape)}" if isinstance(noise, torch.Tensor)
               else type(noise).__name__)
        raise ValueError(f"expected noise as a float tensor of shape {list(x.shape)} {what}, got {got}")
    if not torch.compiler.is_compiling():
        if not torch.isfinite(noise).all():
            raise ValueError(f"expected noise {what}, got NaN or infinite values")
        if uniform and not ((noise >= 0) & (noise < 1)).all():
            raise ValueError(f"expected noise in [0, 1), got values in [{noise.min().item():g}, {noise.max().item():g}]")
    return noise

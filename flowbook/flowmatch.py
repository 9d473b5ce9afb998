"""Flow matching (Lipman et al. 2023; rectified flow, Liu et al. 2023): a continuous normalizing flow whose
velocity is trained by regression, without solving the ODE during training (chapter 7).

Method, network and solver are kept apart: `LinearPath` is the probability path and its loss, the
network is any v(x, t) (`flowbook.unet.VelocityUNet` for MNIST), and `flowbook.ode.integrate` (torchdiffeq)
solves the ODE.

`FlowMatchingModel` presents the interface of `flowbook.models.ImageFlow` (encode, log_likelihood,
bits_per_dim, sample, latent_shape; forward = the training loss), in the same units:
    x (int 0..255) --Dequantization (uniform noise, logit; chapter 2)--> y --(/ data_scale)--> x1
    x1 at t = 1 --ODE dx/dt = v(x, t), run backwards--> z = x(0) at t = 0, a N(0, I) latent.
So f (data -> latent) runs the ODE from t = 1 to t = 0, and sampling runs it from t = 0 to t = 1. ldj sums
    the dequantization's terms (chapter 2), -D log(data_scale), and -int_0^1 div v(x(t), t) dt.
What costs differently from a coupling flow: a likelihood solves an ODE with an adaptive solver and
estimates the divergence (Hutchinson: an unbiased estimate, so bits_per_dim is an estimate too, with solver
error of the order of the tolerances); a sample solves it once more, without the divergence.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from flowbook import noise as noise_source
from flowbook.layers import Dequantization
from flowbook.layers.checks import check_images, check_latent, check_precision, check_temperature
from flowbook.ode import integrate
from flowbook.prior import gaussian_log_prob
from flowbook.unet import VelocityUNet


class LinearPath:
    """The linear (optimal-transport, rectified) probability path from noise x0 ~ N(0, I) at t = 0 to data
    x1 at t = 1:
        x_t = (1 - t) x0 + t x1,      conditional velocity u_t(x_t | x0, x1) = x1 - x0.
    Regressing v(x_t, t) on u_t with t ~ U[0, 1] has the gradient of regressing it on the marginal
    velocity E[x1 - x0 | x_t] (the conditional flow-matching theorem; chapter 7 derives it)."""

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor):
        """x0, x1: [B, ...], t: [B] -> (x_t, u_t), both [B, ...]."""
        t = t.view(-1, *[1] * (x1.dim() - 1)).to(x1.dtype)
        return (1 - t) * x0 + t * x1, x1 - x0

    def loss(self, velocity, x1: torch.Tensor, t: torch.Tensor | None = None,
             x0: torch.Tensor | None = None) -> torch.Tensor:
        """The conditional flow-matching loss: the mean over the batch and dimensions of |v(x_t, t) - u_t|^2,
        with t ~ U[0, 1] and x0 ~ N(0, I) drawn here unless given. x1: [B, ...] data -> a scalar."""
        t = noise_source.rand((x1.shape[0],), device=x1.device) if t is None else t
        x0 = noise_source.randn(x1.shape, device=x1.device, dtype=x1.dtype) if x0 is None else x0
        xt, ut = self.interpolate(x0, x1, t)
        return (velocity(xt, t).float() - ut.float()).pow(2).mean()


class FlowMatchingModel(nn.Module):
    """A flow-matching model on integer images, with the interface of `ImageFlow` (see the module docstring).

    Args:
        net: the velocity network v(x, t) (default: `VelocityUNet` for `img_shape`).
        img_shape: (C, H, W) of the images.
        data_scale: the dequantized logits are divided by it, so that data and noise have similar scales.
    Solver settings (attributes, each overridable per call): `method` ("dopri5"), `rtol`, `atol` (1e-5) for
    likelihoods, `sample_rtol`, `sample_atol` (1e-4) for samples, `probe` ("rademacher") for Hutchinson's
    estimate.
    """

    loss_name = "cfm"  # what forward returns: the flow-matching loss, not bits per dimension
    exact_likelihood = False  # the divergence is an estimate: no importance sampling over it
    method, rtol, atol, probe = "dopri5", 1e-5, 1e-5, "rademacher"  # the likelihood's solver (per model or call)
    sample_rtol = sample_atol = 1e-4  # sampling: quantized to 8 bits at the end, so a looser solve is as good

    def __init__(self, net: nn.Module | None = None, img_shape: tuple = (1, 28, 28), data_scale: float = 4.0):
        super().__init__()
        self.img_shape = tuple(img_shape)
        self.dequant = Dequantization()
        self.net = net if net is not None else VelocityUNet(c_in=img_shape[0])
        self.path = LinearPath()
        self.data_scale = float(data_scale)
        self.last_nfe = None  # velocity evaluations of the last encode or sample

    @property
    def _param(self):
        return next(self.parameters())

    def _solver(self, **overrides) -> dict:
        solver = {"method": self.method, "rtol": self.rtol, "atol": self.atol}
        solver.update({k: v for k, v in overrides.items() if v is not None})
        return solver

    def to_data_space(self, imgs: torch.Tensor):
        """int imgs [B, C, H, W] -> (x1 [B, C, H, W], ldj [B]): dequantized logits / data_scale, and
        the log-determinant of both steps (chapter 2's dequantization terms, then -D log data_scale)."""
        check_images(imgs, img_shape=self.img_shape)
        dtype = self._param.dtype
        y, ldj = self.dequant(imgs, torch.zeros(imgs.shape[0], device=imgs.device, dtype=dtype))
        return y / self.data_scale, ldj - imgs[0].numel() * math.log(self.data_scale)

    def forward(self, imgs):
        """The training loss: the conditional flow-matching loss of a batch (one t, x0 and
        dequantization sample per image)."""
        x1, _ = self.to_data_space(imgs)
        return self.path.loss(self.net, x1)

    def encode(self, imgs, return_splits: bool = False, method: str | None = None, rtol: float | None = None,
               atol: float | None = None, steps: int | None = None, divergence: str = "hutchinson"):
        """imgs: int [B, C, H, W] -> (z [B, C, H, W], ldj [B] in nats): the latent at t = 0 and the sum of
        the dequantization terms and the ODE's log-determinant, -int_0^1 div v dt (Hutchinson's estimate
        with one probe per image unless divergence="exact"). Solves an ODE: see `method`, `rtol`, `atol`.
        With `return_splits`, (z, ldj, []) as `ImageFlow.encode`: an ODE splits nothing off."""
        check_precision(self._param.dtype)
        x1, ldj = self.to_data_space(imgs)
        (z, a), self.last_nfe = integrate(self.net, x1, 1.0, 0.0, divergence=divergence, probe=self.probe,
                                          steps=steps, return_nfe=True, **self._solver(method=method, rtol=rtol,
                                                                                       atol=atol))
        return (z, ldj + a, []) if return_splits else (z, ldj + a)

    def log_likelihood(self, imgs, **solver):
        """[B]: log N(z) + ldj in nats, for one dequantization sample and one Hutchinson probe: an unbiased
        estimate of the Jensen bound of chapter 2 (up to the solver's error)."""
        z, ldj = self.encode(imgs, **solver)
        return gaussian_log_prob(z) + ldj

    def bits_per_dim(self, imgs, importance_samples: int = 1, **solver):
        """[B]: -log2 p(x) / D with the log(256) term, as `ImageFlow.bits_per_dim`, from one dequantization
        sample. importance_samples must be 1: a log-mean-exp over Hutchinson estimates is biased upward."""
        if importance_samples != 1 or not isinstance(importance_samples, int) or isinstance(importance_samples, bool):
            raise ValueError("a flow-matching model's log-likelihood is an estimate (Hutchinson's trace): "
                             "importance sampling over such estimates is biased, so importance_samples must be 1, "
                             f"got {importance_samples!r}")
        return -self.log_likelihood(imgs, **solver) / (math.log(2) * imgs[0].numel())

    @torch.no_grad()
    def sample(self, img_shape, z_init=None, temperature: float = 1.0, z_splits=None, method: str | None = None,
               rtol: float | None = None, atol: float | None = None, steps: int | None = None):
        """Draw images: z ~ N(0, temperature^2 I) of shape `img_shape` ([B, C, H, W]) or z = z_init,
        solved from t = 0 to t = 1 (adaptive `method`, or `steps` Euler steps), then quantized.
        Returns int32 images [B, C, H, W] in 0..255. `z_splits` must be empty (`encode` splits nothing off)."""
        if z_splits:
            raise ValueError(f"a flow-matching model splits nothing off, got {len(z_splits)} split tensors")
        return self.decode(self._latent(img_shape, z_init, temperature), method=method, rtol=rtol, atol=atol,
                           steps=steps)

    @torch.no_grad()
    def decode(self, z, method: str | None = None, rtol: float | None = None, atol: float | None = None,
               steps: int | None = None):
        """z [B, C, H, W] -> int32 images [B, C, H, W]: the ODE from t = 0 to 1 (adaptive at `sample_rtol`,
        `sample_atol` unless given, or `steps` Euler steps), then the dequantization's inverse (sigmoid, floor)."""
        z = self._check_z(z, "z")
        solver = self._solver(method=method, rtol=rtol or self.sample_rtol, atol=atol or self.sample_atol)
        x1, self.last_nfe = integrate(self.net, z, 0.0, 1.0, steps=steps, return_nfe=True, **solver)
        ldj = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        return self.dequant(x1 * self.data_scale, ldj, reverse=True)[0]

    def _latent(self, img_shape, z_init, temperature):
        check_precision(self._param.dtype)
        check_temperature(temperature)
        param = self._param
        if z_init is not None:
            return self._check_z(z_init, "z_init")
        if (not isinstance(img_shape, (tuple, list, torch.Size)) or len(img_shape) != 4
                or tuple(img_shape[1:]) != self.img_shape or not isinstance(img_shape[0], int) or img_shape[0] < 1):
            raise ValueError(f"expected the latent shape [B, {', '.join(map(str, self.img_shape))}], got "
                             f"{img_shape!r}; pass model.latent_shape(B)")
        return torch.randn(tuple(img_shape), device=param.device, dtype=param.dtype) * temperature

    def _check_z(self, z, name):
        """z as a latent of this model ([B, C, H, W] of its image shape, finite), on its device and in its dtype."""
        check_precision(self._param.dtype)
        check_latent(z, name)
        if tuple(z.shape[1:]) != self.img_shape:
            raise ValueError(f"expected {name} of shape [B, {', '.join(map(str, self.img_shape))}], got "
                             f"{list(z.shape)}; pass model.latent_shape(B)")
        if not torch.isfinite(z).all():
            raise ValueError(f"{name} holds NaN or infinite values: a latent must be finite")
        return z.to(device=self._param.device, dtype=self._param.dtype)

    def latent_shape(self, batch_size: int = 1):
        """The shape of z for `batch_size` images: the images' own shape (an ODE keeps the dimensions)."""
        return (batch_size, *self.img_shape)


def create_flowmatch_model() -> FlowMatchingModel:
    """The MNIST flow-matching model: uniform dequantization, logits / 4, and a `VelocityUNet`."""
    return FlowMatchingModel()

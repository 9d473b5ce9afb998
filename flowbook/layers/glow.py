"""Glow's layers (Kingma and Dhariwal, 2018): activation normalisation and the invertible 1x1 convolution.

Both follow the contract of every flowbook layer, `layer(z, ldj, reverse=False) -> (z, ldj)` with
z: [B, C, H, W] and ldj: [B]; both act on each pixel's channel vector alike, so their log-determinant is
H * W times that of the per-pixel map.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ActNorm(nn.Module):
    """Per-channel affine map z' = (z + b) * exp(log_s), with data-dependent initialisation.

    The first forward call in training (train mode, gradients on: a real batch, not a shape probe such
    as `ImageFlow.latent_shape` or an evaluation) sets b = -mean and log_s = -log(std) per channel, so
    that the first batch comes out with zero mean and unit variance per channel; after that, b and log_s
    are trained like any weight. Whether that has happened is the buffer `initialized`, saved in the state dict, so a model
    reloaded from a checkpoint is never initialised again by its next batch.

    forward:  z' = (z + b) * exp(log_s),  ldj += H * W * sum(log_s)
    reverse:  z = z' * exp(-log_s) - b,    ldj -= H * W * sum(log_s)
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))
        self.eps = eps
        self._known_initialized = False  # a Python copy of the buffer once it is True (see is_initialized)

    @torch.no_grad()
    def initialize(self, z: torch.Tensor) -> None:
        """Set b and log_s from the batch z [B, C, H, W]: zero mean, unit variance per channel. Under
        torch.distributed (DDP), from the statistics of every process's batch together, as one process would
        compute them from the whole global batch (otherwise each process would start from its own weights)."""
        flat = z.detach().transpose(0, 1).reshape(z.shape[1], -1).double()
        stats = torch.stack([torch.full_like(flat[:, 0], flat.shape[1]), flat.sum(1), flat.pow(2).sum(1)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        count, total, squares = stats
        if count[0] < 2:
            raise ValueError("ActNorm initialises from the first training batch's statistics and needs at least two "
                             f"values per channel, got {int(count[0])}: train with a larger batch")
        mean = total / count
        std = ((squares - count * mean ** 2).clamp_min(0) / (count - 1)).sqrt()  # unbiased, as torch.std
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all()):
            raise ValueError("ActNorm's first training batch holds non-finite values: its statistics would be NaN")
        self.loc.copy_(-mean.view_as(self.loc))
        self.log_scale.copy_(-torch.log(std + self.eps).view_as(self.log_scale))
        self.initialized.fill_(True)
        self._known_initialized = True

    def is_initialized(self) -> bool:
        """Whether the data-dependent initialisation has happened. Once the buffer says so, a Python flag
        remembers it, so that a compiled forward reads a constant instead of a tensor (reading a tensor's
        value breaks the compiled graph at every call). Loading a state dict reads the buffer anew."""
        if not self._known_initialized:
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._known_initialized = False

    def forward(self, z, ldj, reverse=False):
        if not reverse and self.training and torch.is_grad_enabled() and not self.is_initialized():
            self.initialize(z)
        log_det = z.shape[2] * z.shape[3] * self.log_scale.sum()
        if not reverse:
            return (z + self.loc) * torch.exp(self.log_scale), ldj + log_det
        return z * torch.exp(-self.log_scale) - self.loc, ldj - log_det


def _random_rotation(channels: int, generator: torch.Generator | None = None) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(channels, channels, generator=generator))
    return q


class InvConv1x1(nn.Module):
    """Invertible 1x1 convolution: each pixel's channel vector is multiplied by a learned C x C matrix W,
    initialised as a random rotation (log|det W| = 0).

    forward:  z' = W z per pixel,       ldj += H * W_img * log|det W|
    reverse:  z = W^-1 z' per pixel,    ldj -= H * W_img * log|det W|

    With `lu=True`, W = P L (U + diag(sign(d) exp(log|d|))) with P a fixed permutation, L unit lower and U
    strictly upper triangular, and the diagonal d stored as `sign_s` and `log_s`: log|det W| = sum(log|d|),
    computed in O(C) instead of O(C^3).
    """

    def __init__(self, channels: int, lu: bool = True, generator: torch.Generator | None = None):
        super().__init__()
        self.lu = lu
        w = _random_rotation(channels, generator)
        if not lu:
            self.weight = nn.Parameter(w)
            return
        p, lower, upper = torch.linalg.lu(w)
        s = torch.diagonal(upper)
        self.register_buffer("perm", p)
        self.register_buffer("sign_s", torch.sign(s))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.register_buffer("eye", torch.eye(channels))
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(torch.abs(s)))

    def weight_and_logdet(self):
        """(W [C, C], log|det W|) in the parameters' dtype."""
        if not self.lu:
            return self.weight, torch.linalg.slogdet(self.weight)[1]
        lower = self.lower * self.lower_mask + self.eye
        upper = self.upper * self.lower_mask.T + torch.diag(self.sign_s * torch.exp(self.log_s))
        return self.perm @ lower @ upper, self.log_s.sum()

    def forward(self, z, ldj, reverse=False):
        # In the weights' precision even under autocast: a bfloat16 W is another matrix than the one whose
        # log-determinant is added (a bias of thousandths of a bit per pixel), and the layer is a C x C matrix
        # per pixel, cheap in float32.
        with torch.autocast(z.device.type, enabled=False):
            w, log_det = self.weight_and_logdet()
            log_det = z.shape[2] * z.shape[3] * log_det
            z = z.to(w.dtype)
            if not reverse:
                return F.conv2d(z, w.view(*w.shape, 1, 1)), ldj + log_det
            w_inv = torch.linalg.inv(w)
            return F.conv2d(z, w_inv.view(*w.shape, 1, 1)), ldj - log_det


class GlowStep(nn.Module):
    """One step of Glow: ActNorm, an invertible 1x1 convolution (LU), and an affine coupling layer that
    transforms half of the channels (the 1x1 convolution decides which mixture of channels that is).

    z: [B, C, H, W] with C even. ldj gains the three layers' log-determinants going forward and loses
    them in reverse, where the layers run in the opposite order.
    """

    def __init__(self, c_in: int, c_hidden: int):
        super().__init__()
        from flowbook.layers.coupling import CouplingLayer, create_channel_mask
        from flowbook.nets import GatedConvNet

        if c_in < 2 or c_in % 2:
            raise ValueError(f"a Glow step needs an even number of channels, at least 2; got {c_in}")
        self.flows = nn.ModuleList([
            ActNorm(c_in), InvConv1x1(c_in, lu=True),
            CouplingLayer(GatedConvNet(c_in=c_in, c_hidden=c_hidden), create_channel_mask(c_in), c_in=c_in)])

    def forward(self, z, ldj, reverse=False):
        for flow in (reversed(self.flows) if reverse else self.flows):
            z, ldj = flow(z, ldj, reverse=reverse)
        return z, ldj

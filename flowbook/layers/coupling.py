"""Affine coupling layers (Dinh et al., 2017, RealNVP) and the masks that split their input."""
from __future__ import annotations

import torch
import torch.nn as nn


class CouplingLayer(nn.Module):
    """Affine coupling: the masked half of z conditions a shift t and a log-scale s of the other half.

    Args:
        network: maps [B, C (+ C_cond), H, W] to [B, 2C, H, W], split into (s, t).
        mask: the binary mask b of the chapters, [1, C or 1, H, W]: 1 where z is kept (and fed to the
            network), 0 where it is transformed.
        c_in: number of channels C of z (one learnable scale bound c, `scaling_factor`, per channel).

    forward(z, ldj, reverse=False, orig_img=None):
        z: [B, C, H, W], ldj: [B]; orig_img: optional conditioning [B, C_cond, H, W], concatenated to the
        network's input (variational dequantization uses it).
        s = tanh(s_raw / exp(c)) * exp(c) bounds the log-scale by exp(c), c = `scaling_factor` (one per channel).
        forward: z' = (z + t) * exp(s), ldj += sum(s)
        reverse: z = z' * exp(-s) - t,   ldj -= sum(s)
        The kept half has s = t = 0, so its part of the Jacobian is the identity.
    """

    def __init__(self, network: nn.Module, mask: torch.Tensor, c_in: int):
        super().__init__()
        self.network = network
        self.scaling_factor = nn.Parameter(torch.zeros(c_in))
        self.register_buffer("mask", mask)

    def forward(self, z, ldj, reverse=False, orig_img=None):
        z_in = z * self.mask
        if orig_img is not None:
            z_in = torch.cat([z_in, orig_img], dim=1)
        # In z's dtype: under bfloat16 autocast the network runs in bfloat16, but the scale, the shift and
        # the sum of log-scales added to ldj stay in float32 (a bfloat16 sum over 784 pixels is off by
        # hundredths of a bit per dimension).
        s, t = self.network(z_in).to(z.dtype).chunk(2, dim=1)
        s = soft_clamp(s, self.scaling_factor.exp().view(1, -1, 1, 1))
        transformed = 1 - self.mask
        s, t = s * transformed, t * transformed
        if not reverse:
            z = (z + t) * torch.exp(s)
            ldj = ldj + s.sum(dim=[1, 2, 3])
        else:
            z = z * torch.exp(-s) - t
            ldj = ldj - s.sum(dim=[1, 2, 3])
        return z, ldj


def soft_clamp(s: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """bound * tanh(s / bound): s itself near zero, smoothly limited to (-bound, bound) (chapter 3's c tanh(s / c),
    with bound = exp(c) for a learned c). Every flowbook layer with a learned log-scale bounds it this way."""
    return torch.tanh(s / bound) * bound


def create_checkerboard_mask(h: int, w: int, invert: bool = False) -> torch.Tensor:
    """[1, 1, h, w] float mask, 1 where (row + col) is odd (0 at the top-left corner); `invert` swaps."""
    rows = torch.arange(h).view(h, 1)
    cols = torch.arange(w).view(1, w)
    mask = ((rows + cols) % 2).to(torch.float32).view(1, 1, h, w)
    return 1 - mask if invert else mask


def create_channel_mask(c_in: int, invert: bool = False) -> torch.Tensor:
    """[1, c_in, 1, 1] float mask, 1 on the first c_in // 2 channels, 0 on the rest; `invert` swaps."""
    mask = (torch.arange(c_in) < c_in // 2).to(torch.float32).view(1, c_in, 1, 1)
    return 1 - mask if invert else mask

"""The two layers of a multi-scale flow: squeeze (space to channels) and split (factor out half)."""
from __future__ import annotations

import torch
import torch.nn as nn

from flowbook.prior import gaussian_log_prob


class SqueezeFlow(nn.Module):
    """Move each 2x2 block of pixels into 4 channels: [B, C, H, W] <-> [B, 4C, H/2, W/2].

    A permutation of the entries, so ldj is returned unchanged in both directions. Channel 4c + 2i + j of
    the output holds pixel (2y + i, 2x + j) of input channel c.
    """

    def forward(self, z, ldj, reverse=False):
        B, C, H, W = z.shape
        if not reverse:
            if H % 2 or W % 2:
                raise ValueError(f"SqueezeFlow needs an even height and width, got [B, C, H, W] = {list(z.shape)}")
            z = z.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)
            return z.reshape(B, 4 * C, H // 2, W // 2), ldj
        if C % 4:
            raise ValueError(f"reverse SqueezeFlow needs channels divisible by 4, got {list(z.shape)}")
        z = z.reshape(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3)
        return z.reshape(B, C // 4, 2 * H, 2 * W), ldj


class SplitFlow(nn.Module):
    """Factor out the second half of the channels and score it under the standard normal prior.

    forward: z [B, C, H, W] -> [B, C/2, H, W];  ldj += log N(z_split), z_split = z[:, C/2:].
    reverse: z [B, C/2, H, W] -> [B, C, H, W], appending z_split (given, else drawn from N(0, temperature^2));
             ldj -= log N(z_split), so that a forward pass followed by this reverse with the same z_split
             restores ldj exactly.
    """

    def forward(self, z, ldj, reverse=False, z_split=None, temperature=1.0):
        if not reverse:
            if z.shape[1] % 2:
                raise ValueError(f"SplitFlow halves the channels and needs an even number, got {z.shape[1]}")
            z, z_split = z.chunk(2, dim=1)
            return z, ldj + gaussian_log_prob(z_split)
        if z_split is None:
            z_split = torch.randn_like(z) * temperature
        elif z_split.shape != z.shape:
            raise ValueError(f"z_split must have the shape of z, {list(z.shape)}, got {list(z_split.shape)}")
        return torch.cat([z, z_split], dim=1), ldj - gaussian_log_prob(z_split)

"""The gated convolutional ResNet that predicts the coupling layers' scale and shift (after Flow++)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ConcatELU(nn.Module):
    """[B, C, H, W] -> [B, 2C, H, W]: ELU(x) and ELU(-x) side by side, a gradient for every sign of x."""

    def forward(self, x):
        return torch.cat([F.elu(x), F.elu(-x)], dim=1)


class LayerNormChannels(nn.Module):
    """Layer norm over the channels of each pixel: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, c_in: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_in)

    def forward(self, x):
        return self.layer_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GatedConv(nn.Module):
    """Residual block x + a * sigmoid(g), with (a, g) from conv3x3 -> ConcatELU -> conv1x1; [B, C, H, W]."""

    def __init__(self, c_in: int, c_hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_hidden, kernel_size=3, padding=1),
            ConcatELU(),
            nn.Conv2d(2 * c_hidden, 2 * c_in, kernel_size=1),
        )

    def forward(self, x):
        val, gate = self.net(x).chunk(2, dim=1)
        return x + val * torch.sigmoid(gate)


class GatedConvNet(nn.Module):
    """[B, c_in, H, W] -> [B, c_out, H, W]: conv3x3, num_layers x (GatedConv, LayerNormChannels),
    ConcatELU, conv3x3. c_out=-1 means 2 * c_in (a scale and a shift per channel).

    The last convolution starts at zero, so a fresh coupling layer is the identity.
    """

    def __init__(self, c_in: int, c_hidden: int = 32, c_out: int = -1, num_layers: int = 3):
        super().__init__()
        c_out = c_out if c_out > 0 else 2 * c_in
        layers = [nn.Conv2d(c_in, c_hidden, kernel_size=3, padding=1)]
        for _ in range(num_layers):
            layers += [GatedConv(c_hidden, c_hidden), LayerNormChannels(c_hidden)]
        layers += [ConcatELU(), nn.Conv2d(2 * c_hidden, c_out, kernel_size=3, padding=1)]
        self.nn = nn.Sequential(*layers)
        nn.init.zeros_(self.nn[-1].weight)
        nn.init.zeros_(self.nn[-1].bias)

    def forward(self, x):
        return self.nn(x)

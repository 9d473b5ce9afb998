"""The gated convolutional ResNet that predicts the coupling layers' scale and shift (after Flow++)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# Two forms of the same function. ConcatELU and LayerNormChannels run PyTorch's own kernels eagerly and
# the plain arithmetic below inside torch.compile, where inductor fuses it with the neighbouring steps.
# On a CPU this made the compiled training step 1.3x faster (the multi-scale flow, bfloat16, batch 128,
# 2 cores: from 120 to 158 images/s in one measurement), because inductor's vectorised expm1 (inside F.elu) is
# several times slower than its exp, and the permutes around nn.LayerNorm gave its fused kernels a layout
# whose innermost dimension is the image width (7 at the smallest scale) instead of the channels.
# tests/test_nets.py checks each form against the other, values and gradients.


def elu_by_exp(x):
    """ELU(x) = x for x > 0, exp(x) - 1 otherwise, as F.elu computes it but with exp instead of expm1
    (differences below 1e-7 in float32). exp sees min(x, 0), finite for large x, so that the gradient
    through the branch `where` does not take is 0, not 0 * inf = NaN; at x = 0 the slope is 1."""
    positive = x > 0
    return torch.where(positive, x, torch.exp(torch.where(positive, 0.0, x)) - 1)


def layer_norm_channels(x, weight, bias, eps: float):
    """Layer norm over dim 1 of [B, C, H, W], with weight and bias [C], computed in float32 and returned
    in x's dtype: as nn.LayerNorm over the channels of each pixel (under bfloat16 autocast too)."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bfloat16 -> float32; float64 stays
    mean = xf.mean(dim=1, keepdim=True)
    centred = xf - mean
    y = centred * torch.rsqrt(centred.pow(2).mean(dim=1, keepdim=True) + eps)
    return (y * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)).to(x.dtype)


class ConcatELU(nn.Module):
    """[B, C, H, W] -> [B, 2C, H, W]: ELU(x) and ELU(-x) side by side, a gradient for every sign of x."""

    def forward(self, x):
        elu = elu_by_exp if torch.compiler.is_compiling() else F.elu
        return torch.cat([elu(x), elu(-x)], dim=1)


class LayerNormChannels(nn.Module):
    """Layer norm over the channels of each pixel: [B, C, H, W] -> [B, C, H, W]."""

    def __init__(self, c_in: int):
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_in)

    def forward(self, x):
        ln = self.layer_norm
        if torch.compiler.is_compiling():
            return layer_norm_channels(x, ln.weight, ln.bias, ln.eps)
        return ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


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

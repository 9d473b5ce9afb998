"""A small time-conditioned U-Net: the velocity network v(x, t) of the flow-matching model (chapter 7).

    net = VelocityUNet()                 # for [B, 1, 28, 28]
    v = net(x, t)                        # x: [B, 1, 28, 28], t: [B] in [0, 1] -> v: [B, 1, 28, 28]

Three resolutions (28, 14, 7), residual blocks with group norm and SiLU, the time added to every block
through a sinusoidal embedding, skip connections from the way down to the way up, and one self-attention
layer at 7x7 (49 positions: cheap, and it lets every position see the whole digit). The last convolution
starts at zero, so an untrained network predicts v = 0.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] times in [0, 1] -> [B, dim] sinusoids of 1000 t at dim / 2 frequencies, geometrically spaced from 1
    down to 10,000^(-(dim/2 - 1)/(dim/2)) (about 1/8,700 for dim 128). Computed in float64 for float64 times
    (a float64 solve needs v smooth in t to float64 precision), else in float32."""
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
    half = dim // 2
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, device=t.device, dtype=dtype) / half)
    angles = 1000 * t.to(dtype)[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _ResBlock(nn.Module):
    """x + conv(SiLU(norm(conv(SiLU(norm(x))) + time))), with a 1x1 convolution on x where channels change."""

    def __init__(self, c_in: int, c_out: int, c_emb: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(c_emb, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(8, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x))) + self.emb(emb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _Attention(nn.Module):
    """Self-attention over the H*W positions of [B, C, H, W], residual, with torch's own attention kernel."""

    def __init__(self, c: int, heads: int = 4):
        super().__init__()
        self.norm, self.heads = nn.GroupNorm(8, c), heads
        self.qkv, self.out = nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, H*W, C / heads]
        return x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))


class VelocityUNet(nn.Module):
    """v(x, t): [B, C, 28, 28] and [B] times -> [B, C, 28, 28].

    Args:
        c_in: image channels; channels: the width at 28x28, 14x14 and 7x7; c_emb: the time embedding's size.
    """

    def __init__(self, c_in: int = 1, channels: tuple = (32, 64, 96), c_emb: int = 128):
        super().__init__()
        c1, c2, c3 = channels
        self.c_emb = c_emb
        self.time = nn.Sequential(nn.Linear(c_emb, c_emb), nn.SiLU(), nn.Linear(c_emb, c_emb))
        self.conv_in = nn.Conv2d(c_in, c1, 3, padding=1)
        self.down1 = _ResBlock(c1, c1, c_emb)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)   # 28 -> 14
        self.down2 = _ResBlock(c2, c2, c_emb)
        self.pool2 = nn.Conv2d(c2, c3, 3, stride=2, padding=1)   # 14 -> 7
        self.mid1, self.attn, self.mid2 = _ResBlock(c3, c3, c_emb), _Attention(c3), _ResBlock(c3, c3, c_emb)
        self.up2 = _ResBlock(c3 + c2, c2, c_emb)                 # after 7 -> 14, with the 14x14 skip
        self.up1 = _ResBlock(c2 + c1, c1, c_emb)                 # after 14 -> 28, with the 28x28 skip
        self.norm_out = nn.GroupNorm(8, c1)
        self.conv_out = nn.Conv2d(c1, c_in, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x, t):
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time(time_embedding(t, self.c_emb).to(x.dtype))
        h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.pool1(h1), emb)
        h = self.mid2(self.attn(self.mid1(self.pool2(h2), emb)), emb)
        h = self.up2(torch.cat([F.interpolate(h, size=h2.shape[-2:], mode="nearest"), h2], dim=1), emb)
        h = self.up1(torch.cat([F.interpolate(h, size=h1.shape[-2:], mode="nearest"), h1], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))

"""Transformer flows (TarFlow: Zhai et al., 2024, "Normalizing Flows are Capable Generative Models").

An image is cut into patches, the patches are a sequence of T tokens, and one `TarFlowBlock` is an
autoregressive affine flow over that sequence: token i is shifted and scaled by parameters that a causal
transformer computes from the tokens before it,

    z_i = (x_i + t_i(x_<i)) * exp(s_i(x_<i)),        i = 0 .. T-1,

with chapter 3's names: t the shift, s the log-scale (the TarFlow paper writes z_i = (x_i - mu_i) exp(-alpha_i):
mu = -t, alpha = -s).

Going forward (data -> latent) every token's parameters come from the data alone, so one parallel pass of
the transformer gives all of them, and the log-density. Going back (sampling), x_i needs t_i and s_i,
which need x_0 .. x_{i-1}: T sequential steps.

The Jacobian dz/dx is block lower triangular in token order (token i depends on tokens < i) with diagonal
blocks diag(exp(s_i)), so log|det dz/dx| = sum over tokens and token dimensions of s.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowbook.layers.checks import _describe, check_latent
from flowbook.layers.coupling import soft_clamp


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Cut images into p x p patches: x [B, C, H, W] -> tokens [B, T, p*p*C], T = (H/p) * (W/p).

    The patches are numbered row by row (patch (r, c) is token r * W/p + c); a token lists its values by
    channel, then row, then column inside the patch. `unpatchify` is the exact inverse.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        got = _describe(x) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"patchify expects images [B, C, H, W], got {got}")
    B, C, H, W = x.shape
    if isinstance(p, bool) or not isinstance(p, int) or p < 1 or H % p or W % p:
        raise ValueError(f"the patch size must be a positive integer that divides the height and width, "
                         f"got patch size {p!r} for [B, C, H, W] = {list(x.shape)}; choose a divisor of {H} and {W}")
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens: torch.Tensor, p: int, shape) -> torch.Tensor:
    """The inverse of `patchify`: tokens [B, T, p*p*C] -> images [B, C, H, W], shape = (C, H, W)."""
    C, H, W = shape
    if (tokens.dim() != 3 or H % p or W % p
            or tuple(tokens.shape[1:]) != ((H // p) * (W // p), C * p * p)):
        raise ValueError(f"expected tokens [B, {(H // p) * (W // p)}, {C * p * p}] for patch size {p} and images "
                         f"[B, {C}, {H}, {W}], got {list(tokens.shape)}")
    B = tokens.shape[0]
    x = tokens.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, C, H, W)


def causal_mask(T: int, device=None) -> torch.Tensor:
    """[T, T] boolean attention mask, True where query i may attend to key j: j <= i."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


class _Attention(nn.Module):
    """Multi-head self-attention through torch's `scaled_dot_product_attention`."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def _heads(self, h):
        B, T, _ = h.shape
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return q, k, v  # each [B, heads, T, width / heads]

    def _merge(self, a):
        return self.out(a.transpose(1, 2).flatten(2))

    def forward(self, h, mask):
        q, k, v = self._heads(h)
        return self._merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def step(self, h, cache: list):
        """One new position h [B, 1, width] attending to itself and the positions in `cache`, a list that
        holds (keys, values) of the earlier ones (empty at the first) and gains this position's."""
        q, k, v = self._heads(h)
        if cache:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        cache[:] = [k, v]
        return self._merge(F.scaled_dot_product_attention(q, k, v))


class _TransformerLayer(nn.Module):
    """Pre-norm transformer layer: h + attention(LN(h)), then h + MLP(LN(h))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, h, mask):
        h = h + self.attn(self.norm1(h), mask)
        return h + self.mlp(self.norm2(h))

    def step(self, h, cache: list):
        h = h + self.attn.step(self.norm1(h), cache)
        return h + self.mlp(self.norm2(h))


class TarFlowBlock(nn.Module):
    """One autoregressive affine flow over the patches of an image, its parameters from a causal transformer.

    Args:
        img_shape: (C, H, W) of the input z; H and W divisible by `patch_size`.
        patch_size: p; the block sees T = (H/p)(W/p) tokens of D = p*p*C values.
        width: the transformer's width d; depth: its number of layers; heads: attention heads (divide d).
        flip: reverse the token order (stack blocks with flip alternating, so that every token is
            conditioned on every other one somewhere in the stack).

    The network: the tokens are projected to width d and shifted right by one position behind a learned
    start token, a learned positional embedding is added, `depth` pre-norm causal transformer layers run
    (attention mask `causal_mask`), and a final LayerNorm and linear map give (t, s_raw) [B, T, D] each.
    Position i sees the start token and tokens 0 .. i-1 only; token 0's parameters come from the start
    token alone. The output map starts at zero, so a new block is the identity.
    s = soft_clamp(s_raw, exp(c)) bounds the log-scale by exp(c), c = `scaling_factor` (one per token
    dimension, learned, starting at 0: a bound of 1), the convention of `CouplingLayer`.

    forward(z, ldj, reverse=False, kv_cache=None):
        z: [B, C, H, W], ldj: [B]; returns (z', ldj') of the same shapes and dtype.
        forward (data -> latent, one parallel pass):
            z'_i = (z_i + t_i) * exp(s_i),      ldj += sum over i and D of s_i
        reverse (latent -> data, T sequential steps, i = 0 .. T-1):
            z_i = z'_i * exp(-s_i) - t_i,      ldj += -sum of s_i
        (t_i, s_i computed from the data-side tokens z_<i, so reverse inverts forward exactly and
        undoes its ldj.) With `kv_cache` (None: the block's attribute `kv_cache`, True unless set) the
        reverse pass keeps each layer's keys and values and runs the transformer on one new position per step,
        O(T) work per step; without, it reruns the transformer on the whole sequence at every step, O(T^2).
        Both compute the same numbers up to rounding.

    Precision: in float64, reverse(forward(z)) returns z to about 1e-13. In float32 the rounding of early
    tokens moves the parameters of later ones, so with trained weights the round trip image -> latent ->
    image can land on the neighbouring integer for a rare mid-grey pixel, where dequantization's margin in
    logit space is smallest (measured: 0 to 1 pixel in 200,704 for a model trained 2 epochs); use float64
    where every pixel must come back.
    """

    def __init__(self, img_shape, patch_size: int = 4, width: int = 128, depth: int = 2, heads: int | None = None,
                 flip: bool = False):
        super().__init__()
        C, H, W = img_shape
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1 or H % patch_size \
                or W % patch_size:
            raise ValueError(f"the patch size must be a positive integer that divides the height and width, got "
                             f"patch size {patch_size!r} for images [B, {C}, {H}, {W}]; choose a divisor of {H} and {W}")
        for name, value in (("width", width), ("depth", depth), ("heads", heads)):
            if (value is not None or name != "heads") and (isinstance(value, bool) or not isinstance(value, int)
                                                           or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        heads = heads or max(1, width // 64)
        if width % heads:
            raise ValueError(f"the width must be divisible by the number of heads, got width {width} and {heads} heads")
        self.img_shape, self.patch_size, self.flip = (C, H, W), patch_size, flip
        self.num_tokens, self.token_dim = (H // patch_size) * (W // patch_size), C * patch_size ** 2
        self.proj_in = nn.Linear(self.token_dim, width)
        self.start = nn.Parameter(0.02 * torch.randn(1, 1, width))
        self.pos = nn.Parameter(0.02 * torch.randn(1, self.num_tokens, width))
        self.layers = nn.ModuleList([_TransformerLayer(width, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, 2 * self.token_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.scaling_factor = nn.Parameter(torch.zeros(self.token_dim))
        self.register_buffer("mask", causal_mask(self.num_tokens), persistent=False)
        self.kv_cache = True  # how reverse runs where its call does not say (a model's sample calls it plainly)

    def _params(self, h, dtype):
        """(t, s) [B, n, D] in `dtype` from the transformer's output h [B, n, width]: under bfloat16
        autocast the network runs in bfloat16, but the scale, the shift and the ldj stay in z's dtype."""
        t, s = self.proj_out(self.norm(h)).to(dtype).chunk(2, dim=-1)
        return t, soft_clamp(s, self.scaling_factor.exp())

    def _inputs(self, x):
        """The transformer's input for tokens x [B, T, D]: start token, then x_0 .. x_{T-2}, plus positions."""
        h = self.proj_in(x[:, :-1])
        return torch.cat([self.start.expand(x.shape[0], 1, -1).to(h.dtype), h], dim=1) + self.pos

    def shift_and_log_scale(self, x: torch.Tensor):
        """(t, s), each [B, T, D], for tokens x [B, T, D] in the block's order: row i from x_<i only."""
        h = self._inputs(x)
        for layer in self.layers:
            h = layer(h, self.mask)
        return self._params(h, x.dtype)

    def _tokens(self, z):
        if z.dim() != 4 or tuple(z.shape[1:]) != self.img_shape:
            raise ValueError(f"this TarFlow block expects z of shape [B, {', '.join(map(str, self.img_shape))}], "
                             f"got {list(z.shape)}")
        x = patchify(z, self.patch_size)
        return x.flip(1) if self.flip else x

    def _image(self, x):
        return unpatchify(x.flip(1) if self.flip else x, self.patch_size, self.img_shape)

    def forward(self, z, ldj, reverse=False, kv_cache=None):
        check_latent(z)
        x = self._tokens(z)
        if not reverse:
            t, s = self.shift_and_log_scale(x)
            return self._image((x + t) * torch.exp(s)), ldj + s.flatten(1).sum(dim=1)
        cached = self.kv_cache if kv_cache is None else kv_cache
        x, s_sum = self._reverse_cached(x) if cached else self._reverse_plain(x)
        return self._image(x), ldj - s_sum

    def _reverse_plain(self, z):
        """Tokens x from latent tokens z [B, T, D], one token per step, rerunning the whole transformer."""
        x = torch.zeros_like(z)
        s_sum = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        for i in range(self.num_tokens):
            t, s = (p[:, i] for p in self.shift_and_log_scale(x))  # row i reads x_<i, already final
            x = x.clone()
            x[:, i] = z[:, i] * torch.exp(-s) - t
            s_sum = s_sum + s.sum(dim=1)
        return x, s_sum

    def _reverse_cached(self, z):
        """As `_reverse_plain`, running each layer on the one new position with the earlier keys and values."""
        caches = [[] for _ in self.layers]
        xs, s_sum = [], torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        for i in range(self.num_tokens):
            if i == 0:
                h = self.start.expand(z.shape[0], 1, -1)
            else:
                h = self.proj_in(xs[-1].unsqueeze(1))
            h = h + self.pos[:, i:i + 1]
            for layer, cache in zip(self.layers, caches):
                h = layer.step(h, cache)
            t, s = (p[:, 0] for p in self._params(h, z.dtype))
            xs.append(z[:, i] * torch.exp(-s) - t)
            s_sum = s_sum + s.sum(dim=1)
        return torch.stack(xs, dim=1), s_sum

"""Checkers for the chapters' exercises: `check_<name>(your_function_or_class)`.

Each runs the same kind of tests as flowbook's own (invertibility, log-determinant against autograd,
shapes, dtypes, edge cases) on your code, prints a short verdict that says what is wrong, and returns
True when everything passes. A stub that still raises NotImplementedError is not caught: you see it.
"""
from __future__ import annotations

import math

import torch
from torch.autograd.functional import jacobian

from flowbook.layers import SqueezeFlow, create_checkerboard_mask
from flowbook.models import interpolate_latents

__all__ = ["check_change_of_variables", "check_bits_per_dim", "check_logit_transform",
           "check_importance_weighted_bpd", "check_checkerboard_mask", "check_additive_coupling",
           "check_squeeze", "check_interpolate", "check_temperature_latent"]


class _Fail(Exception):
    pass


def _expect(cond, message):
    if not cond:
        raise _Fail(message)


def _close(a, b, what, atol=1e-6):
    _expect(isinstance(a, torch.Tensor), f"{what}: expected a torch.Tensor, got {type(a).__name__}")
    _expect(a.shape == b.shape, f"{what}: expected shape {list(b.shape)}, got {list(a.shape)}")
    err = (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    _expect(err <= atol, f"{what}: off by up to {err:.3g} (tolerance {atol:g})")


def _run(name, checks) -> bool:
    for i, (label, check) in enumerate(checks, 1):
        try:
            check()
        except NotImplementedError:
            raise
        except _Fail as fail:
            print(f"✗ {name}: check {i}/{len(checks)} ({label}) failed: {fail}")
            return False
        except Exception as err:  # the student's code crashed: say where and how
            print(f"✗ {name}: check {i}/{len(checks)} ({label}) raised {type(err).__name__}: {err}")
            return False
    print(f"✓ {name}: all {len(checks)} checks passed")
    return True


def _logdet(fn, x):
    jac = jacobian(lambda v: fn(v.unsqueeze(0)).flatten(), x)
    return torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))[1]


# Chapter 1 ----------------------------------------------------------------------------------------------

def check_change_of_variables(log_prob_affine) -> bool:
    """log_prob_affine(x, scale, shift) -> log p(x) for x = scale * z + shift, z ~ N(0, 1), elementwise."""
    x = torch.linspace(-4, 4, 17, dtype=torch.float64)

    def matches(scale, shift):
        def check():
            expected = torch.distributions.Normal(shift, abs(scale)).log_prob(x)
            _close(log_prob_affine(x, scale, shift), expected, f"log p(x) with scale={scale}, shift={shift}")
        return check

    def integrates_to_one():
        grid = torch.linspace(-30, 30, 60001, dtype=torch.float64)
        mass = torch.trapezoid(log_prob_affine(grid, 3.0, 1.0).exp(), grid).item()
        _expect(abs(mass - 1) < 1e-4, f"the density integrates to {mass:.4f}, not 1: is the volume term -log|scale| there?")

    return _run("check_change_of_variables", [
        ("identity", matches(1.0, 0.0)), ("shift", matches(1.0, 2.0)), ("scale", matches(2.5, 0.0)),
        ("density integrates to one", integrates_to_one), ("negative scale", matches(-0.5, 1.0)),
    ])


def check_bits_per_dim(bits_per_dim) -> bool:
    """bits_per_dim(log_likelihood [B] in nats, num_dims) -> [B]."""
    def uniform_is_8_bits():
        ll = torch.full((3,), -784 * math.log(256.0))
        _close(bits_per_dim(ll, 784), torch.full((3,), 8.0), "a uniform model of 8-bit pixels", atol=1e-4)

    def general():
        ll = torch.tensor([-1000.0, -500.0])
        _close(bits_per_dim(ll, 100), ll / (-100 * math.log(2)), "bpd = -log p / (D log 2)", atol=1e-4)

    return _run("check_bits_per_dim", [("8 bits for a uniform model", uniform_is_8_bits), ("nats to bits", general)])


# Chapter 2 ----------------------------------------------------------------------------------------------

def check_logit_transform(logit_transform) -> bool:
    """logit_transform(u [B, ...] in [0, 1], alpha) -> (y, ldj [B]), y = logit((1 - alpha) u + alpha / 2)."""
    torch.manual_seed(0)
    u = torch.rand(3, 1, 3, 3, dtype=torch.float64) * 0.98 + 0.01

    def values():
        y, _ = logit_transform(u, 0.05)
        p = 0.95 * u + 0.025
        _close(y, torch.log(p) - torch.log1p(-p), "y", atol=1e-9)

    def ldj_shape():
        _, ldj = logit_transform(u, 0.05)
        _expect(isinstance(ldj, torch.Tensor) and ldj.shape == (3,),
                f"ldj must have shape [B] = [3], got {getattr(ldj, 'shape', type(ldj).__name__)}")

    def ldj_autograd():
        _, ldj = logit_transform(u, 0.05)
        expected = torch.stack([_logdet(lambda v: logit_transform(v, 0.05)[0], ub) for ub in u])
        _close(ldj, expected, "ldj against log|det J| from autograd (check the signs and the alpha term)", 1e-8)

    def edges():
        y, ldj = logit_transform(torch.tensor([[0.0, 1.0]]), 1e-5)
        _expect(torch.isfinite(y).all() and torch.isfinite(ldj).all(), "u = 0 and u = 1 must give finite values")

    return _run("check_logit_transform", [("values", values), ("ldj shape", ldj_shape),
                                          ("ldj = log|det J|", ldj_autograd), ("u at 0 and 1", edges)])


def check_importance_weighted_bpd(iw_bpd) -> bool:
    """iw_bpd(log_likelihoods [K, B] in nats, num_dims) -> [B] bpd of log((1/K) sum_k exp(ll_k))."""
    torch.manual_seed(0)
    lls = torch.randn(8, 5, dtype=torch.float64) * 30 - 2000

    def formula():
        expected = -(torch.logsumexp(lls, 0) - math.log(8)) / (784 * math.log(2))
        _close(iw_bpd(lls, 784), expected, "bpd of the K-sample bound (average the likelihoods, not the logs)", 1e-9)

    def one_sample():
        _close(iw_bpd(lls[:1], 784), -lls[0] / (784 * math.log(2)), "with K = 1 it is the plain bpd", 1e-9)

    def stable():
        out = iw_bpd(torch.full((4, 2), -1e5, dtype=torch.float64), 784)
        _expect(torch.isfinite(out).all(), "log-likelihoods of -1e5 nats give inf/nan: use torch.logsumexp")

    def tighter():
        _expect(bool((iw_bpd(lls, 784) <= iw_bpd(lls[:1], 784).max() + 1e-9).all()) and
                bool((iw_bpd(lls, 784) <= -lls.mean(0) / (784 * math.log(2)) + 1e-9).all()),
                "the K-sample bpd must never exceed the bpd of the mean log-likelihood (Jensen)")

    return _run("check_importance_weighted_bpd", [("formula", formula), ("K = 1", one_sample),
                                                  ("numerical stability", stable), ("tighter than Jensen", tighter)])


# Chapter 3 ----------------------------------------------------------------------------------------------

def check_checkerboard_mask(checkerboard_mask) -> bool:
    """checkerboard_mask(h, w, invert=False) -> float [1, 1, h, w], 0 at the top-left, alternating."""
    def cases(h, w, invert):
        def check():
            m = checkerboard_mask(h, w, invert=invert)
            _expect(isinstance(m, torch.Tensor) and m.dtype == torch.float32,
                    f"expected a float32 tensor, got {getattr(m, 'dtype', type(m).__name__)}")
            _close(m, create_checkerboard_mask(h, w, invert), f"mask for h={h}, w={w}, invert={invert}", 0)
        return check

    return _run("check_checkerboard_mask", [("4x4", cases(4, 4, False)), ("inverted", cases(4, 4, True)),
                                            ("3x5, odd sizes", cases(3, 5, False)), ("28x28", cases(28, 28, True))])


def check_additive_coupling(AdditiveCoupling) -> bool:
    """AdditiveCoupling(network, mask)(z, ldj, reverse=False) -> (z, ldj): z' = z + t on the unmasked half."""
    from flowbook.nets import GatedConvNet

    torch.manual_seed(0)
    net = GatedConvNet(1, c_hidden=8, c_out=1, num_layers=1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    mask = create_checkerboard_mask(4, 4)
    layer = AdditiveCoupling(net, mask).double()
    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    zero = torch.zeros(3, dtype=torch.float64)

    def inverse():
        y, ldj = layer(z, zero)
        back, ldj_back = layer(y, ldj, reverse=True)
        _close(back, z, "reverse(forward(z))", 1e-10)
        _close(ldj_back, zero, "ldj after forward and reverse", 1e-10)

    def masked_half():
        y, _ = layer(z, zero)
        kept = mask.bool().expand_as(z)
        _expect(torch.equal(y[kept], z[kept]), "the masked half (mask == 1) must pass unchanged: multiply t by 1 - mask")
        _expect(not torch.allclose(y, z), "the other half did not change: add the network's t to it")

    def volume_preserving():
        _, ldj = layer(z, zero + 1.5)
        expected = torch.stack([_logdet(lambda v: layer(v, zero[:1])[0], zb) for zb in z])
        _close(ldj - 1.5, expected, "ldj against autograd (an additive coupling has log|det J| = 0)", 1e-8)

    def uses_only_kept_half():
        y1, _ = layer(z, zero)
        z2 = z + (1 - mask) * torch.randn_like(z)
        y2, _ = layer(z2, zero)
        _close((y2 - y1) * (1 - mask), (z2 - z) * (1 - mask), "t must depend on the masked input z * mask only", 1e-10)

    return _run("check_additive_coupling", [("inverse", inverse), ("masked half unchanged", masked_half),
                                            ("log-determinant", volume_preserving),
                                            ("network sees z * mask", uses_only_kept_half)])


# Chapter 4 ----------------------------------------------------------------------------------------------

def check_squeeze(squeeze) -> bool:
    """squeeze(z, reverse=False): [B, C, H, W] -> [B, 4C, H/2, W/2] as SqueezeFlow, and back with reverse."""
    ref = SqueezeFlow()

    def example():
        img = torch.arange(1, 17).view(1, 1, 4, 4)
        out = squeeze(img)
        _expect(out.shape == (1, 4, 2, 2), f"the 4x4 example should give shape [1, 4, 2, 2], got {list(out.shape)}")
        _expect(torch.equal(out, ref(img, None)[0]),
                f"channels of the 4x4 example: expected {ref(img, None)[0][0, :, 0, 0].tolist()} at the top-left, "
                f"got {out[0, :, 0, 0].tolist()} (each 2x2 block must become the 4 channels, row by row)")

    def multichannel():
        z = torch.randn(2, 3, 6, 8)
        _close(squeeze(z), ref(z, None)[0], "squeeze of [2, 3, 6, 8] (channel c must own channels 4c..4c+3)", 0)

    def inverse():
        z = torch.randn(2, 3, 6, 8)
        _close(squeeze(squeeze(z), reverse=True), z, "squeeze(squeeze(z), reverse=True)", 0)

    return _run("check_squeeze", [("4x4 example", example), ("several channels", multichannel),
                                  ("reverse", inverse)])


# Chapter 5 ----------------------------------------------------------------------------------------------

def check_interpolate(interpolate) -> bool:
    """interpolate(z_a, z_b, num_steps) -> [num_steps, ...]: z_a, evenly spaced points, z_b."""
    torch.manual_seed(0)
    za, zb = torch.randn(1, 8, 7, 7), torch.randn(1, 8, 7, 7)

    def ends():
        out = interpolate(za, zb, 5)
        _expect(out.shape == (5, 8, 7, 7), f"expected shape [5, 8, 7, 7], got {list(out.shape)}")
        _close(out[0], za[0], "the first step must be z_a", 1e-6)
        _close(out[-1], zb[0], "the last step must be z_b", 1e-6)

    def evenly_spaced():
        out = interpolate(za, zb, 5)
        steps = out[1:] - out[:-1]
        _close(steps, (zb - za).expand(4, -1, -1, -1) / 4, "the steps between neighbours must be equal", 1e-5)

    def matches_flowbook():
        _close(interpolate(za, zb, 8), interpolate_latents(za, zb, 8), "8 steps, against flowbook's version", 1e-5)

    return _run("check_interpolate", [("end points", ends), ("even spacing", evenly_spaced),
                                      ("as flowbook.models.interpolate_latents", matches_flowbook)])


def check_temperature_latent(temperature_latent) -> bool:
    """temperature_latent(shape, temperature) -> z ~ N(0, temperature^2 I), float32, of `shape`."""
    def stats(temperature):
        def check():
            z = temperature_latent((64, 8, 7, 7), temperature)
            _expect(isinstance(z, torch.Tensor) and z.shape == (64, 8, 7, 7) and z.dtype == torch.float32,
                    f"expected float32 [64, 8, 7, 7], got {getattr(z, 'dtype', '?')} {list(getattr(z, 'shape', []))}")
            _expect(abs(z.mean().item()) < 0.05 * max(temperature, 0.1), f"mean {z.mean().item():.3f} should be 0")
            _expect(abs(z.std().item() - temperature) < 0.03 * max(temperature, 0.1) + 1e-6,
                    f"standard deviation {z.std().item():.3f} should equal the temperature {temperature}")
        return check

    return _run("check_temperature_latent", [("T = 1", stats(1.0)), ("T = 0.5", stats(0.5)), ("T = 0", stats(0.0))])

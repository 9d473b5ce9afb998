"""Chapter 5 checkers: interpolation, temperature, and sampling through the layers by hand."""
from __future__ import annotations

import math

import torch

from flowbook import models
from flowbook.exercises._harness import close, diagnose, expect, is_close, perturbed, reference, run_checks
from flowbook.layers import (CouplingLayer, Dequantization, GatedConvNet, SplitFlow, SqueezeFlow,
                             create_channel_mask, create_checkerboard_mask)
from flowbook.models import MNIST_SHAPE, ImageFlow


def _slerp(za, zb, num_steps):
    a, b = za.flatten().double(), zb.flatten().double()
    omega = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))
    lam = torch.linspace(0, 1, num_steps, dtype=torch.float64).view(-1, 1, 1, 1)
    return ((torch.sin((1 - lam) * omega) * za.double() + torch.sin(lam * omega) * zb.double()) / torch.sin(omega))


def check_interpolate(interpolate) -> None:
    """interpolate(z_a, z_b, num_steps, spherical=False) -> [num_steps, ...] from z_a to z_b, both ends
    included: evenly spaced points on the line, or with spherical=True on the great circle (slerp):
    z = (sin((1 - l) W) z_a + sin(l W) z_b) / sin(W), W the angle between the flattened z_a and z_b.

    Catches:
    - the wrong shape
    - going from z_b to z_a
    - the ends left out, or z_b never reached
    - uneven steps
    - spherical=True ignored (the line's midpoint is shorter than the ends)
    - the angle from the dot product without dividing by the norms
    - the angle over each pixel or channel instead of the whole flattened latent
    """
    torch.manual_seed(0)
    za, zb = torch.randn(1, 8, 7, 7), torch.randn(1, 8, 7, 7)
    zb_far = zb * 1.5  # a longer end: the norm along the great circle changes evenly too

    def ends():
        out = interpolate(za, zb, 5)
        expect(isinstance(out, torch.Tensor) and out.shape == (5, 8, 7, 7),
               f"expected shape [5, 8, 7, 7], got {list(getattr(out, 'shape', []))}")
        expect(not torch.allclose(out[0], zb[0], atol=1e-6), "the first step is z_b: you go backwards, start at z_a")
        close(out[0], za[0], "the first step must be z_a", 1e-6)
        close(out[-1], zb[0], "the last step must be z_b (linspace(0, 1, num_steps) includes both ends)", 1e-6)

    def evenly_spaced():
        out = interpolate(za, zb, 5)
        close(out[1:] - out[:-1], (zb - za).expand(4, -1, -1, -1) / 4, "the steps between neighbours must be equal", 1e-5)

    def matches_flowbook():
        got = interpolate(za, zb, 8)
        with reference():
            expected = models.interpolate_latents(za, zb, 8)
        close(got, expected, "8 steps, against flowbook's version", 1e-5)

    def spherical():
        out = interpolate(za, zb, 9, spherical=True)
        expect(isinstance(out, torch.Tensor) and out.shape == (9, 8, 7, 7),
               f"spherical=True: expected shape [9, 8, 7, 7], got {list(getattr(out, 'shape', []))}")
        expect(bool(torch.isfinite(out).all()), "spherical=True gives NaN or inf: the angle's cosine is z_a . z_b / "
               "(|z_a| |z_b|); divide the dot product by both norms, so that arccos gets a value in [-1, 1] "
               "(a clamped dot product gives W = 0 and sin W = 0)")
        close(out[0], za[0], "spherical=True: the first step must be z_a", 1e-5)
        close(out[-1], zb[0], "spherical=True: the last step must be z_b", 1e-5)
        with reference():
            line = models.interpolate_latents(za, zb, 9)
        expect(not is_close(out, line, 1e-5), f"spherical=True gives the straight line: its midpoint has norm "
               f"{line[4].norm():.1f}, the ends {za.norm():.1f} and {zb.norm():.1f}. Follow the great circle instead")
        a, b = za.flatten(), zb.flatten()
        raw = torch.arccos((a @ b).clamp(-1, 1))
        flat_l = torch.linspace(0, 1, 9).view(-1, 1, 1, 1)
        per_pixel = torch.arccos((za * zb / (za.norm(dim=1, keepdim=True) * zb.norm(dim=1, keepdim=True))).sum(
            1, keepdim=True).clamp(-1, 1))
        diagnose(out.double(), _slerp(za, zb, 9), {
            "the angle: cos W = z_a . z_b / (|z_a| |z_b|), divide the dot product by both norms":
                lambda: ((torch.sin((1 - flat_l) * raw) * za + torch.sin(flat_l * raw) * zb) / torch.sin(raw)).double(),
            "the angle is between the whole flattened latents, one W for all of z, not one per pixel":
                lambda: ((torch.sin((1 - flat_l) * per_pixel) * za + torch.sin(flat_l * per_pixel) * zb)
                         / torch.sin(per_pixel)).double(),
        }, 1e-4)
        close(out.double(), _slerp(za, zb, 9), "spherical=True: slerp, (sin((1 - l) W) z_a + sin(l W) z_b) / sin W",
              1e-4)

    def spherical_norms():
        out = interpolate(za, zb_far, 5, spherical=True).double()
        norms = out.flatten(1).norm(dim=1)
        close(norms, _slerp(za, zb_far, 5).flatten(1).norm(dim=1), "spherical=True with |z_b| = 1.5 |z_a|: the "
              "norms along the path", 1e-3)

    return run_checks("check_interpolate", [("end points", ends), ("even spacing", evenly_spaced),
                                            ("as flowbook.models.interpolate_latents", matches_flowbook),
                                            ("spherical=True", spherical), ("spherical, ends of unequal norm",
                                                                            spherical_norms)],
                      blocks=[models.interpolate_latents])


def _truncated_std(r: float) -> float:
    """The standard deviation of a standard normal truncated to [-r, r]."""
    phi = math.exp(-r * r / 2) / math.sqrt(2 * math.pi)
    mass = math.erf(r / math.sqrt(2))
    return math.sqrt(1 - 2 * r * phi / mass)


def check_temperature_latent(temperature_latent) -> None:
    """temperature_latent(shape, temperature, truncation=None) -> float32 z of `shape`: z = T * e with e ~ N(0, I),
    and with truncation=r every entry of e outside [-r, r] drawn again until it is inside (the truncated normal).

    Catches:
    - the wrong dtype or shape
    - shifting instead of scaling
    - scaling by temperature^2
    - truncation ignored
    - entries clamped to [-r, r] instead of drawn again (mass piles up at the bounds)
    - the bound applied after scaling by the temperature (|z| <= r instead of |z| <= r T)
    """
    def stats(temperature):
        def check():
            z = temperature_latent((64, 8, 7, 7), temperature)
            expect(isinstance(z, torch.Tensor) and z.shape == (64, 8, 7, 7) and z.dtype == torch.float32,
                   f"expected float32 [64, 8, 7, 7], got {getattr(z, 'dtype', '?')} {list(getattr(z, 'shape', []))}")
            mean, std = z.mean().item(), z.std().item()
            expect(abs(mean) < 0.05 * max(temperature, 0.1), f"the mean is {mean:.3f}; it should be 0: scale, do not shift")
            if temperature not in (0.0, 1.0):
                expect(abs(std - temperature ** 2) > 0.01, f"the standard deviation is {std:.3f} = temperature^2: "
                       "the temperature scales the standard deviation, multiply by temperature")
            expect(abs(std - temperature) < 0.03 * max(temperature, 0.1) + 1e-6,
                   f"the standard deviation is {std:.3f}; it should equal the temperature {temperature}")
        return check

    def truncated(temperature, r):
        def check():
            torch.manual_seed(0)
            z = temperature_latent((64, 8, 7, 7), temperature, truncation=r)
            expect(isinstance(z, torch.Tensor) and z.shape == (64, 8, 7, 7) and z.dtype == torch.float32,
                   f"expected float32 [64, 8, 7, 7], got {getattr(z, 'dtype', '?')} {list(getattr(z, 'shape', []))}")
            bound = r * temperature
            largest = z.abs().max().item()
            expect(largest > r * 1.0001 or temperature >= 1 or largest <= bound * 1.0001,
                   f"entries reach {largest:.2f}: the bound is r in units of the prior's standard deviation, before "
                   f"the temperature: |z| <= r T = {bound:.2f}. Truncate e, then multiply by T")
            expect(largest <= bound * 1.0001, f"entries reach {largest:.2f}, beyond r T = {bound:.2f}: with "
                   "truncation=r, draw again every entry of e outside [-r, r]")
            at_bound = (z.abs() >= bound * 0.9999).float().mean().item()
            expect(at_bound < 0.01, f"{at_bound:.1%} of the entries sit exactly at +-r T: clamping piles the tails "
                   "onto the bounds; draw those entries again instead")
            std, want = z.std().item(), temperature * _truncated_std(r)
            expect(abs(std - want) < 0.03 * want, f"the standard deviation is {std:.3f}; a normal truncated to "
                   f"[-{r}, {r}] and scaled by {temperature} has {want:.3f}")
        return check

    def no_truncation_by_default():
        z = temperature_latent((64, 8, 7, 7), 1.0)
        expect(z.abs().max().item() > 3.0, "without truncation, some of 25,088 standard normal entries exceed 3: "
               "truncate only when truncation is given")

    return run_checks("check_temperature_latent", [("no truncation by default", no_truncation_by_default),
                                                   ("T = 1", stats(1.0)), ("T = 0.5", stats(0.5)),
                                                   ("T = 0", stats(0.0)),
                                                   ("T = 1, truncation 1.5", truncated(1.0, 1.5)),
                                                   ("T = 0.7, truncation 1", truncated(0.7, 1.0))])


def small_multiscale_flow() -> ImageFlow:
    """A small multi-scale flow with random weights (latent [B, 8, 7, 7]) to test sampling code on."""
    torch.manual_seed(0)
    flows = [Dequantization(), CouplingLayer(GatedConvNet(1, c_hidden=8, num_layers=1),
                                             create_checkerboard_mask(28, 28), 1),
             SqueezeFlow(), CouplingLayer(GatedConvNet(4, c_hidden=8, num_layers=1), create_channel_mask(4), 4),
             SplitFlow(), SqueezeFlow(),
             CouplingLayer(GatedConvNet(8, c_hidden=8, num_layers=1), create_channel_mask(8, invert=True), 8)]
    return perturbed(ImageFlow(flows, img_shape=MNIST_SHAPE), scale=0.05).eval()


def _sample(model, n, t_latent, t_split):
    """What model.sample computes, with the latent and the split halves drawn at their own temperatures."""
    z = torch.randn(model.latent_shape(n)) * t_latent
    ldj = torch.zeros(n)
    for flow in reversed(model.flows):
        z, ldj = flow(z, ldj, reverse=True, temperature=t_split) if isinstance(flow, SplitFlow) else \
            flow(z, ldj, reverse=True)
    return z


def check_sample_images(sample_images) -> None:
    """sample_images(model, num_images, temperature) -> int images [num_images, 1, 28, 28], drawn as
    model.sample draws them: z = torch.randn(model.latent_shape(num_images)) * temperature, then every layer
    in reverse order, the split layers drawing their half at the same temperature.

    Catches:
    - images that are not integers in 0..255 of shape [n, 1, 28, 28] (layers not all reversed)
    - the latent scaled by temperature^2
    - split layers drawing at temperature 1
    - random numbers drawn in another order than model.sample's
    """
    model = small_multiscale_flow()

    def images():
        torch.manual_seed(0)
        x = sample_images(model, 4, 0.7)
        expect(isinstance(x, torch.Tensor) and x.shape == (4, 1, 28, 28),
               f"expected images [4, 1, 28, 28], got {list(getattr(x, 'shape', [])) or type(x).__name__}: run "
               "every layer, in reversed(model.flows) order")
        expect(not x.is_floating_point() and int(x.min()) >= 0 and int(x.max()) <= 255,
               "expected integer pixels in 0..255: the first layer's reverse (dequantization) returns them")

    def same_as_flowbook():
        torch.manual_seed(0)
        got = sample_images(model, 4, 0.7)
        with reference(), torch.no_grad():
            torch.manual_seed(0)
            expected = model.sample(model.latent_shape(4), temperature=0.7)
        with torch.no_grad():
            diagnose(got.float(), expected.float(), {
                "the temperature scales the standard deviation: z = torch.randn(shape) * T, not * T**2":
                    lambda: (torch.manual_seed(0), _sample(model, 4, 0.49, 0.49))[1].float(),
                "the split layer must draw its half at the temperature too: "
                "flow(z, ldj, reverse=True, temperature=temperature)":
                    lambda: (torch.manual_seed(0), _sample(model, 4, 0.7, 1.0))[1].float(),
            }, 0)
        expect(torch.equal(got, expected), "with torch.manual_seed(0), your images differ from model.sample's: draw "
               "z = torch.randn(model.latent_shape(n)) * temperature first, then reverse each layer in turn")

    return run_checks("check_sample_images", [("images", images), ("as model.sample", same_as_flowbook)],
                      blocks=[(ImageFlow, "sample")])

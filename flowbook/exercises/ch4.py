"""Chapter 4 checkers: squeeze, split with its prior term, and assembling the multi-scale flow."""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from flowbook import models
from flowbook.exercises._harness import close, diagnose, expect, perturbed, reference, run_checks
from flowbook.layers import (CouplingLayer, SplitFlow, SqueezeFlow, VariationalDequantization)
from flowbook.models import ImageFlow, num_parameters
from flowbook import prior


def _ref_squeeze(z, reverse=False):
    with reference():
        return SqueezeFlow()(z, None, reverse=reverse)[0]


def check_squeeze(squeeze) -> None:
    """squeeze(z, reverse=False): [B, C, H, W] -> [B, 4C, H/2, W/2] as SqueezeFlow, and back with reverse.

    Catches:
    - rows and columns swapped inside each 2x2 block
    - channels grouped by block position instead of by input channel
    - a reshape without the permute
    - a reverse that does not undo it
    - pixel_unshuffle used (switched off)
    """
    def example():
        img = torch.arange(1, 17).view(1, 1, 4, 4)
        out = squeeze(img)
        expect(isinstance(out, torch.Tensor) and out.shape == (1, 4, 2, 2),
               f"the 4x4 example should give shape [1, 4, 2, 2], got {list(getattr(out, 'shape', []))}")
        expected = _ref_squeeze(img)
        diagnose(out, expected, {
            "within each 2x2 block the row and column are swapped: channel 2i + j holds pixel (2y + i, 2x + j)":
                expected[:, [0, 2, 1, 3]],
        }, 0)
        expect(torch.equal(out, expected),
               f"channels of the 4x4 example: expected {expected[0, :, 0, 0].tolist()} at the top-left, got "
               f"{out[0, :, 0, 0].tolist()} (each 2x2 block must become the 4 channels, row by row)")

    def multichannel():
        z = torch.randn(2, 3, 6, 8)
        got, expected = squeeze(z), _ref_squeeze(z)
        B, C, H, W = z.shape
        by_position = z.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(B, 4 * C, H // 2, W // 2)
        diagnose(got, expected, {"with several channels, channel c must own channels 4c..4c+3; yours are grouped by position "
                       "in the block (permute the channel axis before the two block axes)": by_position}, 0)
        close(got, expected, "squeeze of [2, 3, 6, 8]", 0)

    def inverse():
        z = torch.randn(2, 3, 6, 8)
        close(squeeze(_ref_squeeze(z), reverse=True), z, "squeeze(SqueezeFlow's output, reverse=True)", 0)
        close(squeeze(squeeze(z), reverse=True), z, "squeeze(squeeze(z), reverse=True)", 0)

    return run_checks("check_squeeze", [("4x4 example", example), ("several channels", multichannel),
                                        ("reverse", inverse)],
                      blocks=[(SqueezeFlow, "forward"), (torch, "pixel_unshuffle"), (torch, "pixel_shuffle"),
                              (F, "pixel_unshuffle"), (F, "pixel_shuffle"),
                              (torch.nn.PixelUnshuffle, "forward"), (torch.nn.PixelShuffle, "forward")])


def check_split(Split) -> None:
    """Split()(z, ldj, reverse=False, z_split=None, temperature=1.0) -> (z, ldj), as flowbook's SplitFlow.

    Catches:
    - the wrong half kept
    - no prior term
    - the prior term with the wrong sign
    - the kept half scored
    - log N without its -0.5 log(2 pi) constant
    - a reverse that does not restore z or ldj
    - z_split drawn with standard deviation temperature^2
    """
    torch.manual_seed(0)
    z = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    ldj0 = torch.full((3,), 2.0, dtype=torch.float64)
    layer = Split()
    keep, out = z[:, :2], z[:, 2:]

    def log_prob(v):
        with reference():
            return prior.gaussian_log_prob(v)

    def forward_shape():
        y, ldj = layer(z, ldj0)
        expect(isinstance(y, torch.Tensor) and y.shape == (3, 2, 2, 2),
               f"forward keeps half of the channels: [3, 4, 2, 2] -> [3, 2, 2, 2], got {list(getattr(y, 'shape', []))}")
        expect(isinstance(ldj, torch.Tensor) and ldj.shape == (3,), "ldj must stay of shape [B]")

    def forward_half():
        y, _ = layer(z, ldj0)
        diagnose(y, keep, {"you kept the second half: keep z[:, :C/2] and factor out z[:, C/2:]": out}, 0)
        close(y, keep, "the kept half z[:, :C/2]", 0)

    def prior_term():
        _, ldj = layer(z, ldj0)
        diagnose(ldj, ldj0 + log_prob(out), {
            "ldj is unchanged: the factored-out half leaves the flow here, so add its prior log N(z_split; 0, I)": ldj0,
            "the sign: add log N(z_split), a log-density (negative)": lambda: ldj0 - log_prob(out),
            "you scored the kept half: the prior term is log N of the factored-out half z[:, C/2:]":
                lambda: ldj0 + log_prob(keep),
            "log N(z) has a constant -0.5 log(2 pi) per dimension too": (ldj0 - 0.5 * (out ** 2).flatten(1).sum(1)),
        }, 1e-9)
        close(ldj, ldj0 + log_prob(out), "ldj + log N(z_split)", 1e-9)

    def round_trip():
        y, ldj = layer(z, ldj0)
        back, ldj_back = layer(y, ldj, reverse=True, z_split=out)
        expect(isinstance(back, torch.Tensor) and back.shape == z.shape,
               f"reverse appends z_split: [3, 2, 2, 2] -> [3, 4, 2, 2], got {list(getattr(back, 'shape', []))}")
        close(back, z, "reverse(forward(z)) with the same z_split (z_split goes after the kept half)", 0)
        close(ldj_back, ldj0, "ldj after forward and reverse: reverse subtracts log N(z_split)", 1e-9)

    def draws_at_temperature():
        torch.manual_seed(1)
        small = torch.zeros(64, 4, 8, 8, dtype=torch.float64)
        back, ldj = layer(small, torch.zeros(64, dtype=torch.float64), reverse=True, temperature=0.5)
        drawn = back[:, 4:]
        expect(back.shape == (64, 8, 8, 8), f"reverse without z_split draws it: expected [64, 8, 8, 8], got {list(back.shape)}")
        std = drawn.std().item()
        expect(abs(std - 0.25) > 0.02, "z_split has standard deviation temperature^2: draw torch.randn * temperature")
        expect(abs(std - 0.5) < 0.02, f"z_split drawn without z_split given must be N(0, temperature^2): std {std:.3f}, "
               "expected 0.5 at temperature 0.5")
        close(ldj, -log_prob(drawn), "ldj when z_split is drawn: subtract log N of the drawn half", 1e-9)

    return run_checks("check_split", [
        ("forward shape", forward_shape), ("the kept half", forward_half), ("the prior term", prior_term),
        ("reverse with z_split", round_trip), ("reverse draws z_split", draws_at_temperature),
    ], blocks=[(SplitFlow, "forward"), prior.gaussian_log_prob])


def _describe(layer) -> str:
    if isinstance(layer, CouplingLayer):
        return (f"CouplingLayer on {layer.mask.shape[1] if layer.mask.shape[1] > 1 else 'a checkerboard of'} "
                f"{'channels' if layer.mask.shape[1] > 1 else '1 channel'}, {num_parameters(layer):,} parameters")
    if isinstance(layer, VariationalDequantization):
        return f"VariationalDequantization with {len(layer.flows)} couplings, {num_parameters(layer):,} parameters"
    return type(layer).__name__


def _round_trip(model, x, noise):
    """Encode x (fixed dequantization noise), keep each split's half, and decode with them."""
    z, ldj, halves = x, torch.zeros(len(x)), []
    for i, flow in enumerate(model.flows):
        if isinstance(flow, SplitFlow):
            halves.append(z[:, z.shape[1] // 2:])
        z, ldj = flow(z, ldj, noise=noise) if i == 0 else flow(z, ldj)
    for flow in reversed(model.flows):
        z, ldj = flow(z, ldj, reverse=True, z_split=halves.pop()) if isinstance(flow, SplitFlow) else \
            flow(z, ldj, reverse=True)
    return z


def check_multiscale_flow(build_multiscale_flow) -> None:
    """build_multiscale_flow() -> ImageFlow: the reference's multi-scale flow, made from flowbook's layers.

    Catches:
    - not an ImageFlow with img_shape (1, 28, 28)
    - a layer of the wrong kind or in the wrong place
    - masks that do not alternate
    - a wrong hidden width (per-layer parameter counts)
    - the wrong number of layers
    - a latent of the wrong shape
    - no exact encode/decode round trip
    """
    with reference():
        ref = models.create_multiscale_flow()
    result = {}

    def builds():
        torch.manual_seed(0)
        result["model"] = model = build_multiscale_flow()
        expect(isinstance(model, ImageFlow), f"return an ImageFlow(layers, img_shape=(1, 28, 28)), got "
               f"{type(model).__name__}")
        expect(model.img_shape == (1, 28, 28), "give the ImageFlow img_shape=(1, 28, 28)")

    def layers():
        mine, want = list(result["model"].flows), list(ref.flows)
        for i, (a, b) in enumerate(zip(mine, want)):
            expect(type(a) is type(b), f"layer {i} is a {type(a).__name__}; expected {_describe(b)}")
            if isinstance(b, CouplingLayer):
                expect(a.mask.shape == b.mask.shape and torch.equal(a.mask, b.mask),
                       f"layer {i}'s mask: expected a {'channel' if b.mask.shape[1] > 1 else 'checkerboard'} mask "
                       f"of shape {list(b.mask.shape)}{', inverted' if b.mask.flatten()[0] == 0 else ''} "
                       "(consecutive couplings alternate)")
            expect(num_parameters(a) == num_parameters(b),
                   f"layer {i} has {num_parameters(a):,} parameters; expected {_describe(b)} (check c_hidden)")
        expect(len(mine) == len(want), f"{len(mine)} layers; the multi-scale flow has {len(want)}: "
               + ", ".join(type(f).__name__ for f in want))

    def count():
        n = num_parameters(result["model"])
        expect(n == num_parameters(ref), f"{n:,} parameters, expected {num_parameters(ref):,}")

    def latent():
        shape = result["model"].latent_shape(2)
        expect(tuple(shape) == (2, 8, 7, 7), f"latent of 2 images: expected [2, 8, 7, 7], got {list(shape)}")

    def round_trip():
        model = perturbed(copy.deepcopy(result["model"]), scale=0.02)
        torch.manual_seed(0)
        x = torch.randint(0, 256, (2, 1, 28, 28))
        noise = torch.rand(x.shape, dtype=torch.float64)
        with torch.no_grad():
            back = _round_trip(model, x, noise)
        expect(torch.equal(back, x), "encoding and decoding with the same latents (split halves included) must "
               "return the images exactly")

    return run_checks("check_multiscale_flow", [
        ("builds an ImageFlow", builds), ("the layers", layers), (f"{num_parameters(ref):,} parameters", count),
        ("latent shape", latent), ("exact round trip", round_trip),
    ], blocks=[models.create_multiscale_flow, models.create_flow, models.create_glow_flow, models.create_simple_flow,
               models._vardeq_layer, models._checkerboard_couplings, models._channel_couplings])

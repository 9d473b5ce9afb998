"""Chapter 4 checkers: squeeze, split with its prior term, and assembling the multi-scale flow."""
from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.nn.functional as F

from flowbook import models
from flowbook.exercises._harness import (building, built_here, close, diagnose, expect, perturbed, reference,
                                        run_checks)
from flowbook.layers import CouplingLayer, SplitFlow, SqueezeFlow, VariationalDequantization
from flowbook.nets import GatedConv
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
    - a reverse that puts the pixels back in the wrong places (axes permuted wrongly)
    - pixel_unshuffle or SqueezeFlow used (switched off, even when captured before the check)
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
        back = squeeze(_ref_squeeze(z), reverse=True)
        expect(isinstance(back, torch.Tensor) and back.shape == z.shape, f"reverse of [2, 12, 3, 4] must give "
               f"[2, 3, 6, 8], got {list(getattr(back, 'shape', [])) or type(back).__name__}")
        y = _ref_squeeze(z).reshape(2, 3, 2, 2, 3, 4)
        expect(not any(torch.equal(back, y.permute(0, 1, *order).reshape(2, 3, 6, 8))
                       for order in itertools.permutations((2, 3, 4, 5)) if order != (4, 2, 5, 3)),
               "your reverse puts the pixels back in the wrong places: reshape to [B, C/4, 2, 2, H, W] (channel "
               "4c + 2i + j is pixel (i, j) of each block of channel c), permute to [B, C/4, H, 2, W, 2] and "
               "reshape to [B, C/4, 2H, 2W]")
        close(back, z, "squeeze(SqueezeFlow's output, reverse=True)", 0)
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
    - log N averaged over the dimensions instead of summed
    - a reverse that does not restore z or ldj
    - a given z_split scaled by the temperature (only a drawn one is)
    - z_split drawn with standard deviation temperature^2
    - the drawn z_split scored under N(0, T^2 I) instead of the prior N(0, I)
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
            "you averaged log N over the dimensions: ldj is a sum over every dimension of the image, so sum it "
            "(flatten(1).sum(1))": ldj0 + (-0.5 * (out ** 2 + math.log(2 * math.pi))).flatten(1).mean(1),
        }, 1e-9)
        close(ldj, ldj0 + log_prob(out), "ldj + log N(z_split)", 1e-9)

    def round_trip():
        y, ldj = layer(z, ldj0)
        back, ldj_back = layer(y, ldj, reverse=True, z_split=out)
        expect(isinstance(back, torch.Tensor) and back.shape == z.shape,
               f"reverse appends z_split: [3, 2, 2, 2] -> [3, 4, 2, 2], got {list(getattr(back, 'shape', []))}")
        close(back, z, "reverse(forward(z)) with the same z_split (z_split goes after the kept half)", 0)
        close(ldj_back, ldj0, "ldj after forward and reverse: reverse subtracts log N(z_split)", 1e-9)

    def given_half_at_temperature():
        y, ldj = layer(z, ldj0)
        back, ldj_back = layer(y, ldj, reverse=True, z_split=out, temperature=0.5)
        diagnose(back, z, {"a given z_split is appended as it is: the temperature only scales a z_split that "
                           "reverse draws itself": torch.cat([keep, 0.5 * out], dim=1)}, 0)
        close(back, z, "reverse with a given z_split at temperature 0.5", 0)
        close(ldj_back, ldj0, "ldj after forward and a reverse at temperature 0.5 with the same z_split", 1e-9)

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
        diagnose(ldj, -log_prob(drawn), {
            "the drawn half is scored under the prior N(0, I), the density the forward pass scores it with, not "
            "under N(0, T^2 I): subtract log N(z_split; 0, I)":
                lambda: -log_prob(drawn / 0.5) + drawn[0].numel() * math.log(0.5)}, 1e-9)
        close(ldj, -log_prob(drawn), "ldj when z_split is drawn: subtract log N(z_split; 0, I) of the drawn half",
              1e-9)

    return run_checks("check_split", [
        ("forward shape", forward_shape), ("the kept half", forward_half), ("the prior term", prior_term),
        ("reverse with z_split", round_trip), ("a given z_split at temperature 0.5", given_half_at_temperature),
        ("reverse draws z_split", draws_at_temperature),
    ], blocks=[(SplitFlow, "forward"), prior.gaussian_log_prob])


def _describe(layer) -> str:
    if isinstance(layer, CouplingLayer):
        return (f"CouplingLayer on {layer.mask.shape[1] if layer.mask.shape[1] > 1 else 'a checkerboard of'} "
                f"{'channels' if layer.mask.shape[1] > 1 else '1 channel'}, {num_parameters(layer):,} parameters")
    if isinstance(layer, VariationalDequantization):
        return f"VariationalDequantization with {len(layer.flows)} couplings, {num_parameters(layer):,} parameters"
    return type(layer).__name__


def _mask_name(mask) -> str:
    kind = "channel" if mask.shape[1] > 1 else "checkerboard"
    inverted = bool(mask.flatten()[0] == (0 if kind == "channel" else 1))  # not inverted: 0 at the top-left
    return f"the {'inverted ' if inverted else ''}{kind} mask of shape {list(mask.shape)}"  # pixel, 1 on channel 0


def _network_sizes(layer) -> dict:
    """The sizes a coupling's GatedConvNet was built with, read from its convolutions."""
    convs = [m for m in layer.network.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        return {}
    return {"c_in": convs[0].in_channels, "c_hidden": convs[0].out_channels, "c_out": convs[-1].out_channels,
            "num_layers": sum(isinstance(m, GatedConv) for m in layer.network.modules()),
            "the coupling's c_in (its scaling factors)": layer.scaling_factor.numel()}


def _compare_coupling(a, b, where) -> None:
    expect(a.mask.shape == b.mask.shape,
           f"{where}'s mask: expected {_mask_name(b.mask)}, got shape {list(a.mask.shape)}")
    expect(torch.equal(a.mask, b.mask), f"{where} has {_mask_name(a.mask)}; expected {_mask_name(b.mask)}: consecutive "
           "couplings alternate, and each group of couplings starts again with the mask not inverted")
    mine, want = _network_sizes(a), _network_sizes(b)
    for name, value in want.items():
        expect(mine.get(name, value) == value, f"{where}: {name} = {mine.get(name)}, expected {value}")
    expect(num_parameters(a) == num_parameters(b),
           f"{where} has {num_parameters(a):,} parameters; expected {_describe(b)}")


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
    - a group of couplings that does not start with the mask not inverted
    - the variational dequantization's couplings with the same mask, or starting inverted
    - a network of the wrong size, named: c_in, c_hidden, c_out or num_layers
    - the coupling's c_in (the noise flow's couplings transform 1 channel: c_in=1)
    - a model built before the check and copied (its modules must be built by build_multiscale_flow)
    - the wrong number of layers
    - a latent of the wrong shape
    - no exact encode/decode round trip
    """
    with reference():
        ref = models.create_multiscale_flow()
    result = {}

    def builds():
        torch.manual_seed(0)
        with building() as stamp:
            result["model"] = model = build_multiscale_flow()
        expect(isinstance(model, ImageFlow), f"return an ImageFlow(layers, img_shape=(1, 28, 28)), got "
               f"{type(model).__name__}")
        expect(model.img_shape == (1, 28, 28), "give the ImageFlow img_shape=(1, 28, 28)")
        old = built_here(model, stamp)
        expect(not old, f"{len(old)} of the model's modules ({', '.join(old[:3])}...) were not built by "
               "build_multiscale_flow: build every layer inside it, not a copy of a model made before the check")

    def layers():
        mine, want = list(result["model"].flows), list(ref.flows)
        for i, (a, b) in enumerate(zip(mine, want)):
            expect(type(a) is type(b), f"layer {i} is a {type(a).__name__}; expected {_describe(b)}")
            if isinstance(b, CouplingLayer):
                _compare_coupling(a, b, f"layer {i}")
            if isinstance(b, VariationalDequantization):
                expect(len(a.flows) == len(b.flows), f"layer {i}, the variational dequantization, has "
                       f"{len(a.flows)} couplings; expected {len(b.flows)}")
                for j, (fa, fb) in enumerate(zip(a.flows, b.flows)):
                    expect(isinstance(fa, CouplingLayer), f"layer {i}'s noise flow {j} is a {type(fa).__name__}; "
                           "expected a CouplingLayer")
                    _compare_coupling(fa, fb, f"layer {i}'s noise coupling {j}")
            expect(num_parameters(a) == num_parameters(b),
                   f"layer {i} has {num_parameters(a):,} parameters; expected {_describe(b)}")
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

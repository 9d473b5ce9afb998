"""Chapter 3 checkers: masks, affine and additive coupling layers, and a training loop for a small flow."""
from __future__ import annotations

import time

import torch

from flowbook import pretrained, toy
from flowbook import train as flowbook_train
from flowbook.exercises._harness import close, diagnose, expect, layer_logdets, perturbed, reference, run_checks
from flowbook.layers import CouplingLayer, Dequantization, GatedConvNet, coupling
from flowbook.models import MNIST_SHAPE, ImageFlow

TRAIN_IMAGES, VAL_IMAGES = 4096, 512
TRAIN_STEPS, TRAIN_BATCH, TARGET_BPD = 150, 32, 2.0  # what check_train_flow asks of the small flow


def check_checkerboard_mask(checkerboard_mask) -> None:
    """checkerboard_mask(h, w, invert=False) -> float32 [1, 1, h, w], 0 at the top-left, alternating.

    Catches:
    - a mask that starts with 1 at the top-left
    - invert ignored
    - a dtype other than float32
    """
    def cases(h, w, invert):
        def check():
            m = checkerboard_mask(h, w, invert=invert)
            with reference():
                expected = coupling.create_checkerboard_mask(h, w, invert)
            expect(isinstance(m, torch.Tensor), f"expected a tensor, got {type(m).__name__}")
            expect(m.shape == expected.shape, f"expected shape [1, 1, {h}, {w}], got {list(m.shape)}")
            if not invert:
                diagnose(m.float(), expected, {"your mask starts with 1 at the top-left pixel; it must start with 0":
                                     1 - expected})
            else:
                diagnose(m.float(), expected, {"invert=True must swap 0 and 1; your mask ignores it": 1 - expected})
            close(m.float(), expected, f"mask for h={h}, w={w}, invert={invert}", 0)
            expect(m.dtype == torch.float32, f"the values are right, but the dtype is {m.dtype}: make it float32 "
                   "(masks multiply float tensors)")
        return check

    return run_checks("check_checkerboard_mask", [
        ("4x4", cases(4, 4, False)), ("inverted", cases(4, 4, True)), ("3x5, odd sizes", cases(3, 5, False)),
        ("28x28", cases(28, 28, True)),
    ], blocks=[coupling.create_checkerboard_mask])


def _layer_inputs(c=1, size=4, batch=3):
    torch.manual_seed(0)
    net = perturbed(GatedConvNet(c, c_hidden=8, num_layers=1), scale=0.5)
    mask = coupling.create_checkerboard_mask(size, size)
    z = torch.randn(batch, c, size, size, dtype=torch.float64)
    return net, mask, z, torch.zeros(batch, dtype=torch.float64)


def _affine_variants(net, mask, z, s_fac):
    """What a correct affine coupling and its plausible mistakes compute: {name: (z', ldj)}."""
    raw_s, t = net(z * mask).chunk(2, dim=1)
    keep = 1 - mask
    s = torch.tanh(raw_s / s_fac) * s_fac

    def out(s, t, order="shift first"):
        y = (z + t * keep) * torch.exp(s * keep) if order == "shift first" else z * torch.exp(s * keep) + t * keep
        return y, (s * keep).flatten(1).sum(1)
    return {"right": out(s, t), "no bound": out(raw_s, t), "tanh only": out(torch.tanh(raw_s), t),
            "scale first": out(s, t, "scale first"),
            "swapped": out(torch.tanh(t / s_fac) * s_fac, raw_s), "s everywhere": (out(s, t)[0], s.flatten(1).sum(1))}


def check_affine_coupling(AffineCoupling) -> None:
    """AffineCoupling(network, mask, c_in)(z, ldj, reverse=False) -> (z, ldj), as flowbook's CouplingLayer:
    s, t = network(z * mask).chunk(2, dim=1); s = tanh(s / exp(f)) * exp(f); z' = (z + t) * exp(s) on the
    half where mask == 0; ldj += sum(s) there.

    Catches:
    - no learnable scaling factor
    - s and t not masked (the kept half changes)
    - an unbounded log-scale (no tanh)
    - tanh(s) without the learnable factor
    - z * exp(s) + t instead of (z + t) * exp(s)
    - s and t swapped
    - ldj unchanged, with the wrong sign, or summed over every pixel
    - a reverse that does not invert
    """
    net, mask, z, zero = _layer_inputs()
    layer = AffineCoupling(net, mask, 1).double()
    factor = [p for n, p in layer.named_parameters() if "network" not in n]
    expect_factor = len(factor) == 1 and factor[0].numel() == 1
    with torch.no_grad():
        for p in factor:
            p.fill_(-0.5)  # a factor exp(-0.5): the tanh bound is active
    s_fac = torch.exp(torch.tensor(-0.5, dtype=torch.float64))
    with reference(), torch.no_grad():
        ref = _affine_variants(net.double(), mask, z, s_fac)

    def has_factor():
        expect(expect_factor, "the layer needs one learnable scaling factor per channel (a Parameter of shape "
               "[c_in] besides the network's), as in the stub's __init__")

    def kept_half():
        y, _ = layer(z, zero)
        kept = mask.bool().expand_as(z)
        expect(torch.equal(y[kept], z[kept]), "the kept half (mask == 1) changed: multiply s and t by (1 - mask)")

    def values():
        y, _ = layer(z, zero)
        diagnose(y, ref["right"][0], {
            "the log-scale is not bounded: s = tanh(s / exp(f)) * exp(f), f = the scaling factor": ref["no bound"][0],
            "tanh(s) alone ignores the learnable factor: s = tanh(s / exp(f)) * exp(f)": ref["tanh only"][0],
            "the order: flowbook (and the chapter's formula) shifts first, z' = (z + t) * exp(s)": ref["scale first"][0],
            "s and t are swapped: the network's first C output channels are s, the last C are t": ref["swapped"][0],
        }, 1e-9)
        close(y, ref["right"][0], "z' = (z + t) * exp(s) on the transformed half", 1e-9)

    def ldj():
        _, got = layer(z, zero + 1.5)
        got = got - 1.5
        diagnose(got, ref["right"][1], {
            "ldj is unchanged: add sum(s) over the transformed half": zero,
            "ldj has the wrong sign: the forward pass multiplies by exp(s), adding +sum(s)": -ref["right"][1],
            "ldj sums s over every pixel: only the transformed half (mask == 0) is scaled": ref["s everywhere"][1],
        }, 1e-9)
        close(got, ref["right"][1], "ldj (added to the ldj passed in)", 1e-9)

    def inverse():
        y, ldj_y = layer(z, zero)
        back, ldj_back = layer(y, ldj_y, reverse=True)
        close(back, z, "reverse(forward(z)): z = z' * exp(-s) - t", 1e-10)
        close(ldj_back, zero, "ldj after forward and reverse: reverse subtracts sum(s)", 1e-10)

    def autograd():
        _, got = layer(z, zero)
        close(got, layer_logdets(layer, z), "ldj against log|det J| from autograd", 1e-8)

    return run_checks("check_affine_coupling", [
        ("a learnable scaling factor", has_factor), ("kept half unchanged", kept_half), ("z'", values),
        ("ldj", ldj), ("inverse", inverse), ("ldj = log|det J|", autograd),
    ], blocks=[(CouplingLayer, "forward")])


def check_additive_coupling(AdditiveCoupling) -> None:
    """AdditiveCoupling(network, mask)(z, ldj, reverse=False) -> (z, ldj): z' = z + t on the unmasked half.

    Catches:
    - t not multiplied by 1 - mask (the kept half changes)
    - the network fed the whole z (not invertible)
    - a reverse that does not invert
    - a nonzero log-determinant
    """
    net, mask, z, zero = _layer_inputs()
    net = GatedConvNet(1, c_hidden=8, c_out=1, num_layers=1)
    perturbed(net, scale=0.3)
    layer = AdditiveCoupling(net, mask).double()

    def masked_half():
        y, _ = layer(z, zero)
        kept = mask.bool().expand_as(z)
        expect(torch.equal(y[kept], z[kept]), "the kept half (mask == 1) changed: multiply t by (1 - mask)")
        expect(not torch.allclose(y, z), "the other half did not change: add the network's t to it")

    def uses_only_kept_half():
        y1, _ = layer(z, zero)
        z2 = z + (1 - mask) * torch.randn_like(z)
        y2, _ = layer(z2, zero)
        close((y2 - y1) * (1 - mask), (z2 - z) * (1 - mask),
              "t changed with the half it shifts: the network must see z * mask only, or the layer cannot be "
              "inverted", 1e-10)

    def inverse():
        y, ldj = layer(z, zero)
        back, ldj_back = layer(y, ldj, reverse=True)
        close(back, z, "reverse(forward(z)): subtract the same t", 1e-10)
        close(ldj_back, zero, "ldj after forward and reverse", 1e-10)

    def volume_preserving():
        _, ldj = layer(z, zero + 1.5)
        close(ldj - 1.5, layer_logdets(layer, z),
              "ldj against autograd: a shift has log|det J| = 0, so ldj passes unchanged", 1e-8)

    return run_checks("check_additive_coupling", [
        ("kept half unchanged", masked_half), ("network sees z * mask", uses_only_kept_half),
        ("inverse", inverse), ("log-determinant", volume_preserving),
    ], blocks=[(CouplingLayer, "forward")])


def small_flow(coupling_cls, mask_fn, num_layers: int = 4) -> ImageFlow:
    """The small flow check_train_flow trains: uniform dequantization and `num_layers` affine couplings with
    alternating checkerboard masks (made by your classes), GatedConvNet(1, c_hidden=16, num_layers=1) each."""
    torch.manual_seed(0)
    layers = [coupling_cls(GatedConvNet(1, c_hidden=16, num_layers=1), mask_fn(28, 28, invert=i % 2 == 1), 1)
              for i in range(num_layers)]
    return ImageFlow([Dequantization(), *layers], img_shape=MNIST_SHAPE)


def check_train_flow(train_flow, AffineCoupling, checkerboard_mask) -> None:
    """train_flow(model, images [N, 1, 28, 28] int, num_steps, batch_size=64, lr=3e-3) -> list of the
    num_steps training losses (mean bpd per batch). Trained on a small flow built from your layers, it must
    reach TARGET_BPD on held-out images.

    Catches:
    - no list of per-step float losses returned
    - NaN losses
    - an optimizer that never steps
    - a loss that does not fall (no zero_grad, or backward after step)
    - held-out bpd above the target
    """
    from flowbook.data import load_mnist
    from flowbook.evaluate import mean_bpd

    train_set, val_set, _ = load_mnist()
    images, held_out = train_set.images[:TRAIN_IMAGES], val_set.images[:VAL_IMAGES]
    model = small_flow(AffineCoupling, checkerboard_mask)
    before = [p.detach().clone() for p in model.parameters()]
    result = {}

    def builds():
        x = images[:4]
        z, ldj = model.encode(x)
        back = model.sample(list(z.shape), z_init=z)
        expect(torch.equal(back, x), "your layers do not invert exactly: pass check_affine_coupling first")

    def trains():
        torch.manual_seed(0)
        start = time.perf_counter()
        result["losses"] = train_flow(model, images, TRAIN_STEPS, batch_size=TRAIN_BATCH)
        result["seconds"] = time.perf_counter() - start

    def returns_losses():
        losses = result["losses"]
        expect(isinstance(losses, (list, tuple)) and len(losses) == TRAIN_STEPS,
               f"return the list of the {TRAIN_STEPS} losses, one per step (float(loss) each)")
        expect(all(isinstance(v, float) for v in losses), "each loss must be a Python float: append loss.item()")
        expect(all(v == v and abs(v) != float("inf") for v in losses), "a loss is NaN or infinite: lower the "
               "learning rate, or clip the gradient norm")

    def parameters_moved():
        moved = any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))
        expect(moved, "no parameter changed: make the optimizer over model.parameters() and call optimizer.step()")

    def loss_fell():
        losses = result["losses"]
        first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        expect(last < first - 0.5, f"the loss fell only from {first:.2f} to {last:.2f} bpd: is optimizer.zero_grad() "
               "called every step (else gradients add up), and loss.backward() before optimizer.step()?")

    def reaches_target():
        model.eval()
        with reference():
            torch.manual_seed(0)
            bpd = mean_bpd(model, held_out, importance_samples=1, batch_size=256)
        expect(bpd <= TARGET_BPD, f"{bpd:.2f} bpd on {VAL_IMAGES} held-out images after {TRAIN_STEPS} steps; the "
               f"target is {TARGET_BPD}. Use Adam at lr=3e-3 with batches drawn at random, and loss = model(batch)")
        print(f"  {TRAIN_STEPS} steps in {result['seconds']:.0f} s; {bpd:.2f} bpd on {VAL_IMAGES} held-out images "
              f"(target {TARGET_BPD})")

    return run_checks("check_train_flow", [
        ("your layers make an invertible flow", builds), ("training", trains), ("the losses", returns_losses),
        ("the weights", parameters_moved), ("the loss falls", loss_fell), ("held-out bpd", reaches_target),
    ], blocks=[flowbook_train.train, (flowbook_train.FlowModule, "training_step"), toy.train_toy_flow,
               pretrained.train_quick])

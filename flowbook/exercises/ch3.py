"""Chapter 3 checkers: masks, affine and additive coupling layers, and a training loop for a small flow."""
from __future__ import annotations

import time

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from flowbook import pretrained, toy
from flowbook import train as flowbook_train
from flowbook.exercises._harness import close, diagnose, expect, layer_logdets, perturbed, reference, run_checks
from flowbook.layers import CouplingLayer, Dequantization, GatedConvNet, coupling
from flowbook.models import MNIST_SHAPE, ImageFlow

TRAIN_IMAGES, VAL_IMAGES = 4096, 512
TRAIN_STEPS, TRAIN_BATCH, TARGET_BPD = 100, 32, 1.90  # what check_train_flow asks of the small flow.
# Measured at 100 steps: correct loops reach 1.79 to 1.86 bpd (the chapter's at seeds 0, 1 and 2, an epoch-wise
# randperm loop 1.80); loops without clipping (1.96) or zero_grad (2.01) miss the target, one with the same batch
# every step reaches 1.86, which only the checker's watch of the batches catches.


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


def _layer_inputs(c=1, size=4, batch=3, width=None):
    torch.manual_seed(0)
    net = perturbed(GatedConvNet(c, c_hidden=8, num_layers=1), scale=0.5)
    width = width or size
    mask = coupling.create_checkerboard_mask(size, width)
    z = torch.randn(batch, c, size, width, dtype=torch.float64)
    return net, mask, z, torch.zeros(batch, dtype=torch.float64)


FACTORS = (-0.5, 0.3, -1.2)  # the learnable log-factors f per channel, distinct, so that the tanh bound is active


def _affine_variants(net, mask, z, f):
    """What a correct affine coupling and its plausible mistakes compute: {name: (z', ldj)}; f [C]."""
    raw_s, t = net(z * mask).chunk(2, dim=1)
    raw_s_all, t_all = net(z).chunk(2, dim=1)
    keep = 1 - mask
    fac = f.exp().view(1, -1, 1, 1)

    def bounded(s, fac=fac):
        return torch.tanh(s / fac) * fac

    def out(s, t, order="shift first"):
        y = (z + t * keep) * torch.exp(s * keep) if order == "shift first" else z * torch.exp(s * keep) + t * keep
        return y, (s * keep).flatten(1).sum(1)
    s = bounded(raw_s)
    variants = {"right": out(s, t), "no bound": out(raw_s, t), "tanh only": out(torch.tanh(raw_s), t),
                "tanh times factor": out(torch.tanh(raw_s) * fac, t),
                "one factor": out(bounded(raw_s, f.mean().exp()), t),
                "whole z to the network": out(bounded(raw_s_all), t_all),
                "scale first": out(s, t, "scale first"),
                "swapped": out(bounded(t), raw_s), "s everywhere": (out(s, t)[0], s.flatten(1).sum(1)),
                "summed over the batch": (out(s, t)[0], (s * keep).sum().expand(len(z)))}
    if z.shape[-1] == len(f):  # a factor of shape [C] without .view(1, -1, 1, 1) broadcasts along the width
        variants["factor along the width"] = out(bounded(raw_s, f.exp()), t)
    return variants


def check_affine_coupling(AffineCoupling) -> None:
    """AffineCoupling(network, mask, c_in)(z, ldj, reverse=False) -> (z, ldj), as flowbook's CouplingLayer:
    s, t = network(z * mask).chunk(2, dim=1); s = tanh(s / exp(f)) * exp(f) with one factor f per channel;
    z' = (z + t) * exp(s) on the half where mask == 0; ldj += sum(s) there, per image. Checked on three
    channels with distinct factors.

    Catches:
    - no learnable scaling factor per channel
    - s and t not masked (the kept half changes)
    - an unbounded log-scale (no tanh)
    - tanh(s) without the learnable factor
    - tanh(s) * exp(f) instead of tanh(s / exp(f)) * exp(f)
    - one factor shared by all channels (e.g. scaling_factor.mean())
    - the factor not reshaped to [1, C, 1, 1] (it broadcasts along the width)
    - the network fed z instead of z * mask
    - z * exp(s) + t instead of (z + t) * exp(s)
    - s and t swapped
    - ldj unchanged, or with the wrong sign
    - ldj summed over every pixel, or over the whole batch instead of per image
    - a reverse that does not invert
    - CouplingLayer.forward used (switched off, even when captured before the check)
    """
    c = len(FACTORS)
    net, mask, z, zero = _layer_inputs(c=c, size=4, width=c)  # width == C: a factor missing .view shows
    layer = AffineCoupling(net, mask, c).double()
    factor = [p for n, p in layer.named_parameters() if "network" not in n]
    expect_factor = len(factor) == 1 and factor[0].numel() == c
    f = torch.tensor(FACTORS, dtype=torch.float64)
    with torch.no_grad():
        if expect_factor:
            factor[0].copy_(f.view_as(factor[0]))
    with reference(), torch.no_grad():
        ref = _affine_variants(net.double(), mask, z, f)

    def has_factor():
        expect(expect_factor, f"the layer needs one learnable scaling factor per channel (a Parameter of shape "
               f"[c_in] = [{c}] besides the network's), as in the stub's __init__")

    def kept_half():
        y, _ = layer(z, zero)
        kept = mask.bool().expand_as(z)
        expect(torch.equal(y[kept], z[kept]), "the kept half (mask == 1) changed: multiply s and t by (1 - mask)")

    def values():
        y, _ = layer(z, zero)
        diagnose(y, ref["right"][0], {
            "the log-scale is not bounded: s = tanh(s / exp(f)) * exp(f), f = the scaling factor": ref["no bound"][0],
            "tanh(s) alone ignores the learnable factor: s = tanh(s / exp(f)) * exp(f)": ref["tanh only"][0],
            "tanh(s) * exp(f) bounds s by exp(f) but changes its slope at 0: divide inside, "
            "s = tanh(s / exp(f)) * exp(f)": ref["tanh times factor"][0],
            "all channels share one factor: each channel c has its own f_c, "
            "self.scaling_factor.exp().view(1, -1, 1, 1)": ref["one factor"][0],
            "the factor of shape [C] broadcasts along the width, not the channels: reshape it with "
            ".view(1, -1, 1, 1)": ref["factor along the width"][0],
            "the network must see z * mask, not z: the shift and scale may depend only on the kept half, or the "
            "layer cannot be inverted": ref["whole z to the network"][0],
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
            "ldj is one number for the whole batch: sum s per image, s.sum(dim=[1, 2, 3])":
                ref["summed over the batch"][1],
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
        ("a learnable scaling factor per channel", has_factor), ("kept half unchanged", kept_half), ("z'", values),
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


class _Watch:
    """Hooks on a model that record what a training loop does with it: the images of each batch, the
    gradient each backward pass computes, and the gradient each optimizer step uses."""

    def __init__(self, model):
        self.params = list(model.parameters())
        self.fresh = [None] * len(self.params)  # this step's gradients, from the backward hooks
        self.batches, self.steps = [], []  # image keys per batch; (fresh norm, scale, residual) per step
        self._key = None
        self._handles = [p.register_hook(lambda g, i=i: self._backward(i, g)) for i, p in enumerate(self.params)]
        self._handles.append(model.register_forward_pre_hook(self._forward))
        self._handles.append(register_optimizer_step_pre_hook(self._step))

    def _backward(self, i, grad):
        self.fresh[i] = grad.detach().clone() if self.fresh[i] is None else self.fresh[i] + grad.detach()

    def _forward(self, module, args):
        x = args[0]
        if self._key is None:
            self._key = torch.randn(x[0].numel(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        self.batches.append(x.flatten(1).double() @ self._key)

    def _step(self, optimizer, args, kwargs):
        ours = {id(p) for p in self.params}
        if not any(id(p) in ours for group in optimizer.param_groups for p in group["params"]):
            return
        fresh = torch.cat([(f if f is not None else torch.zeros_like(p)).flatten().double()
                           for f, p in zip(self.fresh, self.params)])
        used = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                          for p in self.params])
        norm = fresh.norm().item()
        scale = (used @ fresh).item() / max(norm ** 2, 1e-30)
        residual = (used - scale * fresh).norm().item() / max(used.norm().item(), 1e-30)
        self.steps.append((norm, scale, residual))
        self.fresh = [None] * len(self.params)

    def remove(self):
        for handle in self._handles:
            handle.remove()


def check_train_flow(train_flow, AffineCoupling, checkerboard_mask) -> None:
    """train_flow(model, images [N, 1, 28, 28] int, num_steps, batch_size=64, lr=3e-3) -> list of the
    num_steps training losses (mean bpd per batch). Trained on a small flow built from your layers, the loop
    is watched (each step's batch, the gradient of each backward pass, the gradient each optimizer step
    uses), and the flow must reach TARGET_BPD on held-out images.

    Catches:
    - no list of per-step float losses returned
    - NaN losses
    - an optimizer that never steps
    - batches that are not of batch_size images
    - the same batch every step (or batches that repeat a few images)
    - no optimizer.zero_grad(): gradients add up across steps
    - zero_grad between backward and step (the optimizer steps with a zero gradient)
    - no gradient clipping, or clipping at another norm than 1.0
    - a loss that does not fall
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
        watch = result["watch"] = _Watch(model)
        start = time.perf_counter()
        try:
            result["losses"] = train_flow(model, images, TRAIN_STEPS, batch_size=TRAIN_BATCH)
        finally:
            watch.remove()
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
        steps = len(result["watch"].steps)
        expect(steps == TRAIN_STEPS, f"the optimizer stepped {steps} times in {TRAIN_STEPS} steps: call "
               "optimizer.step() once per step")

    def batches():
        keys = result["watch"].batches
        expect(len(keys) >= TRAIN_STEPS, f"the model was called {len(keys)} times in {TRAIN_STEPS} steps: "
               "compute loss = model(batch) once per step")
        sizes = {len(k) for k in keys}
        expect(sizes == {TRAIN_BATCH}, f"batches of {sorted(sizes)} images; train_flow was asked for batch_size="
               f"{TRAIN_BATCH}")
        same = sum(torch.equal(a, b) for a, b in zip(keys, keys[1:]))
        expect(same < len(keys) // 10, f"{same} of {len(keys)} steps used the same batch as the step before: draw a "
               "new random batch each step, images[torch.randint(len(images), (batch_size,))]")
        drawn = torch.cat(keys)
        distinct = len(torch.unique(drawn))
        expect(distinct >= min(0.5 * len(drawn), 0.5 * len(images)), f"the {len(drawn):,} images drawn are only "
               f"{distinct:,} different ones: draw each batch at random from all {len(images):,} images")

    def gradients_fresh():
        steps = result["watch"].steps
        zeroed = [i for i, (norm, scale, _) in enumerate(steps) if norm > 0 and abs(scale) < 1e-6]
        expect(not zeroed, f"at step {zeroed[0] if zeroed else 0} the optimizer stepped with a zero gradient: call "
               "optimizer.zero_grad() before loss.backward(), not between backward and step")
        mixed = [i for i, (_, _, residual) in enumerate(steps) if residual > 1e-3]
        expect(not mixed, f"from step {mixed[0] if mixed else 0} on, the gradient the optimizer used is not this "
               "step's: gradients add up across steps. Call optimizer.zero_grad() every step")

    def clipped():
        steps = result["watch"].steps
        large = [(norm, scale) for norm, scale, _ in steps if norm > 1.05]
        unclipped = [norm for norm, scale in large if abs(scale - 1) < 1e-3]
        expect(not unclipped, f"gradient norms up to {max(unclipped, default=0):.1f} reached the optimizer "
               "unclipped: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0) between backward and step")
        wrong = [(norm, norm * scale) for norm, scale in large if abs(norm * scale - 1) > 1e-3]
        expect(not wrong, f"a gradient of norm {wrong[0][0] if wrong else 0:.2f} was scaled to norm "
               f"{wrong[0][1] if wrong else 0:.2f}; clip the total norm at 1.0")
        small = [scale for norm, scale, _ in steps if 0 < norm <= 0.95]
        expect(all(abs(scale - 1) < 1e-3 for scale in small), "gradients below norm 1 were scaled too: clip the "
               "norm at 1.0 (clip_grad_norm_ leaves smaller gradients unchanged), do not normalise")

    def loss_fell():
        losses = result["losses"]
        first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        expect(last < first - 0.5, f"the loss fell only from {first:.2f} to {last:.2f} bpd: is loss.backward() "
               "called before optimizer.step(), with the learning rate lr?")

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
        ("zero_grad every step", gradients_fresh), ("the optimizer steps", parameters_moved),
        ("a new random batch each step", batches), ("gradient norm clipped at 1.0", clipped),
        ("the loss falls", loss_fell), ("held-out bpd", reaches_target),
    ], blocks=[flowbook_train.train, (flowbook_train.FlowModule, "training_step"), toy.train_toy_flow,
               pretrained.train_quick])

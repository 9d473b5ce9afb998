# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 3: Coupling layers
#
# Chapter 2 turned integer images into continuous $y \in \mathbb{R}^{784}$. Now we need flow layers that
# are expressive, exactly invertible, and have a log-determinant that costs no more than the layer itself.
# Affine coupling layers (Dinh et al., 2017) are all three. We build them, the masks that split their input,
# the gated convolutional network inside, and train the single-scale flow of the reference tutorial, with
# and without variational dequantization. Chapter 4 adds the multi-scale architecture.
#
# **You will learn**
# - the affine coupling layer: forward, inverse, and why its log-determinant is a sum of log-scales;
# - checkerboard and channel masks, and why consecutive layers alternate them;
# - the bounded log-scale $\tanh(s / e^c)\,e^c$ with a learnable bound $c$;
# - the gated convolutional ResNet that predicts scale and shift, and why it starts as the identity;
# - how to build and train the single-scale flow, how the shipped models were trained, how far they are
#   from the reference tutorial's, and what their samples look like.

# %% [markdown]
# **Learning objectives.** After this chapter and its exercises you can
# - implement a checkerboard mask and an affine coupling layer, with its inverse and log-determinant (Exercise 1);
# - explain why a coupling layer's log-determinant is a sum of log-scales, and why the masks alternate (Exercise
#   4);
# - compare additive with affine coupling (Exercises 2 and 5);
# - write a flow's training loop (random batches, zero_grad, gradient clipping) and judge it by held-out bpd
#   (Exercise 3).

# %%
import inspect

import torch
from IPython.display import Markdown
from tabulate import tabulate
from torch.autograd.functional import jacobian

from flowbook import config, exercises, viz
from flowbook.data import load_mnist
from flowbook.evaluate import mean_bpd
from flowbook.layers import (CouplingLayer, GatedConvNet, create_channel_mask, create_checkerboard_mask)
from flowbook.models import create_simple_flow, num_parameters
from flowbook.pretrained import load_trained, shipped_results, train_quick, training_history
from flowbook.results import REFERENCE_TEST_BPD
from flowbook.train import RunSettings, training_recipe

settings = config.settings()
device = config.get_device()
train_set, val_set, test_set = load_mnist()
print(f"{settings.mode} mode on {device}")

# %% [markdown]
# ## Affine coupling
#
# Split the variables into two halves, $z = (z_1, z_2)$. The layer keeps $z_1$ and uses it to compute a
# log-scale $s(z_1)$ and a shift $t(z_1)$ for the other half:
#
# $$z_1' = z_1, \qquad z_2' = \big(z_2 + t(z_1)\big) \odot \exp\big(s(z_1)\big).$$
#
# **Inverse.** $z_1 = z_1'$ is known, so $s$ and $t$ can be recomputed from it, and
# $z_2 = z_2' \odot \exp(-s(z_1')) - t(z_1')$. The networks $s$ and $t$ are never inverted: they can be any
# functions at all.
#
# **Log-determinant.** The Jacobian is block triangular,
#
# $$\frac{\partial z'}{\partial z} = \begin{pmatrix} I & 0 \\ \frac{\partial z_2'}{\partial z_1} &
# \mathrm{diag}\big(\exp(s(z_1))\big) \end{pmatrix}
# \quad\Longrightarrow\quad \log\left|\det \frac{\partial z'}{\partial z}\right| = \sum_j s_j(z_1),$$
#
# so the layer adds $\sum_j s_j$ to `ldj` going forward and subtracts it in reverse. In code the split is a
# binary mask $b$ (1 where the input is kept): $z_1 = z \odot b$ feeds the network, and $s, t$ are multiplied
# by $1 - b$ so that the kept half gets $s = t = 0$, the identity. (RealNVP's paper scales first and then
# shifts, $z_2 \odot e^{s} + t$; chapter 1's notation section shows why that is the same family of maps with
# the same log-determinant.) The computation of one layer, as a graph:

# %%
viz.draw_coupling_layer();

# %% [markdown]
# flowbook's implementation:

# %% tags=["spoiler"]
print(inspect.getsource(CouplingLayer.forward))

# %% [markdown]
# ## Masks
#
# On a single-channel image we split the pixels with a **checkerboard**; after a squeeze (chapter 4) there
# are several channels and we can split them with a **channel mask**. Consecutive layers invert the mask, so
# every variable is transformed by every other layer and conditions the ones in between.

# %%
checkerboard = create_checkerboard_mask(h=8, w=8)
channel = create_channel_mask(c_in=4).expand(-1, -1, 8, 8)
viz.plot_masks({"checkerboard": checkerboard[0], "inverted checkerboard": create_checkerboard_mask(8, 8, True)[0],
                "channel mask": channel[0]});

# %%
assert torch.equal(checkerboard + create_checkerboard_mask(8, 8, invert=True), torch.ones(1, 1, 8, 8))
assert channel[0, :, 0, 0].tolist() == [1.0, 1.0, 0.0, 0.0]

# %% [markdown]
# ## Bounding the scale
#
# A raw network output used as a log-scale can be large early in training, and $\exp(s)$ then blows up. The
# layer passes it through a scaled tanh, $s = \tanh(s_{\text{raw}} / e^{c}) \cdot e^{c}$, with one learnable
# bound $c$ per channel (`scaling_factor` in the code, initialised to 0): close to the identity for small
# outputs, never beyond $\pm e^{c}$. Training can raise $c$ where larger scales help.

# %%
viz.plot_scaling_factors((0.5, 1.0, 2.0));

# %% [markdown]
# ## The network inside: a gated convolutional ResNet
#
# $s$ and $t$ come from one network with $2C$ output channels. flowbook uses the reference tutorial's
# design, after Flow++: a 3x3 convolution, a few residual blocks, and a final 3x3 convolution. Each block is
# `GatedConv` (convolution, ConcatELU, 1x1 convolution, and a sigmoid gate on the residual) followed by a
# layer norm over channels. ConcatELU, $[\mathrm{ELU}(x), \mathrm{ELU}(-x)]$, passes gradient for any sign
# of its input. The last convolution starts at zero, so a new coupling layer outputs $s = t = 0$: the whole
# flow starts as the identity, and training starts from the dequantized data itself.

# %%
print(inspect.getsource(GatedConvNet.__init__))

# %%
layer = CouplingLayer(GatedConvNet(c_in=1, c_hidden=32), create_checkerboard_mask(28, 28), c_in=1)
z = torch.randn(4, 1, 28, 28)
z_out, ldj = layer(z, torch.zeros(4))
assert torch.equal(z_out, z) and torch.equal(ldj, torch.zeros(4)), "a fresh coupling layer is the identity"
print("a freshly initialised coupling layer is the identity: ldj =", ldj.tolist())

# %% [markdown]
# That is why checking a coupling layer needs care: at initialisation it is trivially invertible with zero
# log-determinant. We perturb all weights, then check the inverse and the log-determinant against autograd
# in float64 on a small image:

# %%
torch.manual_seed(0)
small = CouplingLayer(GatedConvNet(c_in=1, c_hidden=8, num_layers=2), create_checkerboard_mask(4, 4), c_in=1)
small = small.double()
with torch.no_grad():
    for p in small.parameters():
        p.add_(0.2 * torch.randn_like(p))
z = torch.randn(1, 1, 4, 4, dtype=torch.float64)
zero = torch.zeros(1, dtype=torch.float64)
y, ldj = small(z, zero)
z_back, ldj_back = small(y, ldj, reverse=True)
J = jacobian(lambda v: small(v, zero)[0].flatten(), z).reshape(16, 16)
ldj_autograd = torch.linalg.slogdet(J).logabsdet
print(f"max |reverse(forward(z)) - z| = {(z_back - z).abs().max():.2e}; "
      f"ldj = {ldj.item():.9f}, autograd = {ldj_autograd.item():.9f}")
assert torch.allclose(z_back, z, atol=1e-12) and torch.allclose(ldj, ldj_autograd.reshape(1), atol=1e-9)
assert torch.allclose(ldj_back, zero, atol=1e-12) and not torch.allclose(y, z)

# %% [markdown]
# ## The single-scale flow
#
# The reference tutorial's first model: dequantization followed by 8 coupling layers with alternating
# checkerboard masks, each with a gated network of 32 hidden channels and 3 blocks. The variational version
# replaces uniform dequantization with `VariationalDequantization`, whose noise flow has 4 coupling layers
# (16 hidden channels) conditioned on the image: the network sees 2 channels (noise and image) and outputs
# 2 (a scale and a shift for the noise).

# %%
simple = create_simple_flow(use_vardeq=False)
vardeq = create_simple_flow(use_vardeq=True)
print([type(f).__name__ for f in simple.flows])
counts = {"simple": num_parameters(simple), "vardeq": num_parameters(vardeq)}
for name, n in counts.items():
    print(f"{name:8s} {n:>9,} parameters")
assert counts == {"simple": 335_128, "vardeq": 379_556}, "the reference's architectures"

# %% [markdown]
# ## Training
#
# Both flows are trained by maximum likelihood: the loss of a batch is its mean bits per dimension with one
# dequantization sample (the Jensen bound of chapter 2), minimised with Adam and gradient clipping at 1.0.
# `flowbook.train` runs this with PyTorch Lightning and keeps the best weights by validation bpd.
#
# First we train both models here, live, for a few steps: enough to watch the loss fall, far from a
# trained model.

# %%
curves = {}
for name in ("simple", "vardeq"):
    _, quick_source, curves[name] = train_quick(name, retrain=True, device=device)
print(f"trained live: {quick_source}")
viz.plot_training_curves(curves);

# %% [markdown]
# The rest of the chapter works with the trained models: the checkpoints shipped in `checkpoints/`, made by
# the same trainer (`python -m flowbook.train`), where they are present.

# %%
models, sources = {}, {}
for name in ("simple", "vardeq"):
    models[name], sources[name], _ = load_trained(name, device=device)
    print(f"{name}: {sources[name]}")

# %% [markdown]
# How were they trained? Not with the reference tutorial's recipe: on this project's CPU, 200 epochs were out
# of reach, so each model was trained in a few stages of an hour or less, each stage continuing the previous
# one's weights with a new learning-rate schedule. Each checkpoint records its own history, stage by stage:

# %%
for name in models:
    history = training_history(name)
    if not history:
        print(f"{name}: no shipped checkpoint, so no training history (this chapter uses {sources[name]})")
        continue
    print(f"{name}: {sum(row['epochs'] for row in history)} epochs in {len(history)} stages")
    print(tabulate([[r["stage"], r["start"], r["epochs"], r["batch_size"], f"{r['peak_lr']:g}",
                     f"{r['schedule']}, {r['warmup_steps']} warm-up steps", f"{r['minutes']:.0f}", r["hardware"]]
                    for r in history],
                   headers=["stage", "starts from", "epochs", "batch", "peak lr", "schedule", "minutes", "hardware"]))
    print()
reference_recipe = RunSettings(schedule="exponential", gamma=0.99, lr=1e-3, batch_size=128, epochs=200)
print("The reference tutorial's recipe, for comparison (not how the checkpoints above were trained), as "
      "`python -m flowbook.train --schedule exponential --lr 1e-3 --batch-size 128 --epochs 200` runs it:")
print(training_recipe(reference_recipe))

# %% [markdown]
# We evaluate both with the importance-weighted bound (chapter 2). In quick mode this runs on a slice of the
# test set, its first images, which a laptop evaluates in a minute or less; in full mode, on the whole test set:

# %%
eval_images = test_set.images[:settings.eval_images]
torch.manual_seed(0)
test_bpd = {name: mean_bpd(m, eval_images, settings.importance_samples)
            for name, m in config.progress_bar(models.items(), "evaluating", total=len(models))}
scope = "full test set" if len(eval_images) == len(test_set) else f"{len(eval_images):,}-image slice"
on_what = (f"on all {len(eval_images):,} test images" if len(eval_images) == len(test_set)
           else f"on a {scope} of the test set (its first images)")
for name, bpd in test_bpd.items():
    print(f"{name:8s} bpd {bpd:.3f} {on_what}, {settings.importance_samples} importance samples")
assert all(0 < b < 8 for b in test_bpd.values()), "every trained flow must beat the 8-bit uniform model"

# %% [markdown]
# A slice is fine for checking that a model works, but not for comparing it with the reference tutorial's
# results, which are on the full test set. For that we take the results each shipped checkpoint carries,
# computed by `python -m flowbook.evaluate` on the full test set (the table says on how many images, with how
# many importance samples):

# %%
results = {name: shipped_results(name) for name in models}
rows = [[name, f"{r['test_bpd']:.3f}", f"{r['eval_images']['test']:,}, {r['importance_samples']}",
         f"{REFERENCE_TEST_BPD[name]:.3f}",
         f"{r['test_bpd'] - REFERENCE_TEST_BPD[name]:+.3f}", f"{r['epochs']:g}", f"{test_bpd[name]:.3f}"]
        for name, r in results.items() if r is not None]
print(tabulate(rows, headers=["model", "test bpd (shipped)", "images, samples", "reference (200 epochs)", "difference",
                              "epochs", f"this run ({scope}, {settings.importance_samples} samples)"],
               disable_numparse=True))

# %%
if all(r is not None and r["eval_images"]["test"] == len(test_set) for r in results.values()):
    gap = {name: r["test_bpd"] - REFERENCE_TEST_BPD[name] for name, r in results.items()}
    slice_gap = {name: r["test_bpd"] - test_bpd[name] for name, r in results.items()}
    text = (f"On the full test set the shipped single-scale flow reaches {results['simple']['test_bpd']:.3f} bits "
            f"per dimension with uniform dequantization and {results['vardeq']['test_bpd']:.3f} with variational "
            f"dequantization, {gap['simple']:.3f} and {gap['vardeq']:.3f} above the reference tutorial's "
            f"{REFERENCE_TEST_BPD['simple']:.3f} and {REFERENCE_TEST_BPD['vardeq']:.3f} after 200 epochs, with "
            f"{results['simple']['epochs']:g} and {results['vardeq']['epochs']:g} epochs of training. "
            f"Variational dequantization gains {results['simple']['test_bpd'] - results['vardeq']['test_bpd']:.3f} "
            f"here, against {REFERENCE_TEST_BPD['simple'] - REFERENCE_TEST_BPD['vardeq']:.3f} in the reference.")
    if len(eval_images) < len(test_set):
        shipped_samples = min(r["importance_samples"] for r in results.values())
        fewer = (f", although it uses {settings.importance_samples} importance samples instead of {shipped_samples}, "
                 "a looser bound" if settings.importance_samples < shipped_samples else "")
        if min(slice_gap.values()) > 0:
            text += (f" The slice above gives lower numbers for the same weights, by {min(slice_gap.values()):.3f} to "
                     f"{max(slice_gap.values()):.3f}{fewer}: its first test images are easier than the average one, "
                     "so a slice compared with the reference would make the gap look smaller than it is.")
        else:
            text += (" The slice above differs from the full test set for the same weights, by "
                     f"{min(slice_gap.values()):+.3f} to {max(slice_gap.values()):+.3f} (full minus slice): a slice "
                     "is no stand-in for the full test set when comparing with the reference.")
else:
    text = ("Without a shipped checkpoint and its results JSON for both models, this run has no full-test-set "
            "numbers to compare with the reference tutorial's "
            f"({REFERENCE_TEST_BPD['simple']:.3f} and {REFERENCE_TEST_BPD['vardeq']:.3f} after 200 epochs).")
Markdown(text)

# %% [markdown]
# ## Samples
#
# Sampling draws $z \sim \mathcal N(0, I)$ of shape `[B, 1, 28, 28]` and runs every layer in reverse;
# dequantization's reverse returns integer images.

# %%
torch.manual_seed(44)
samples = models["vardeq"].sample([16, 1, 28, 28])
assert samples.dtype == torch.int32 and samples.shape == (16, 1, 28, 28)
assert 0 <= samples.min() and samples.max() <= 255
viz.show_imgs(samples, "Samples of the single-scale flow with variational dequantization");

# %%
ink_samples = (samples > 127).flatten(1).sum(dim=1)  # pixels brighter than mid-grey, per image
ink_digits = (test_set.images[:1000] > 127).flatten(1).sum(dim=1)
Markdown(f"These are samples of {sources['vardeq']}. Set them beside the MNIST digits of chapter 2 by counting the "
         f"pixels brighter than mid-grey: a median of {int(ink_samples.median())} per sample, against "
         f"{int(ink_digits.median())} per test digit (median of the first 1,000), and "
         f"{int((ink_samples < 10).sum())} of the {len(samples)} samples have fewer than 10.")

# %% [markdown]
# How far can one pixel influence another in this flow? Each coupling's network is a stack of convolutions;
# its receptive field grows by $k - 1$ pixels for every $k \times k$ convolution, and stacked couplings add up:

# %%
net = models["vardeq"].flows[1].network
rf = 1 + sum(c.kernel_size[0] - 1 for c in net.modules() if isinstance(c, torch.nn.Conv2d))
couplings = sum(isinstance(f, CouplingLayer) for f in models["vardeq"].flows)
reach = 1 + couplings * (rf - 1)
hidden = net.nn[0].out_channels
Markdown(f"Each network's receptive field is {rf}x{rf} pixels, and {couplings} stacked couplings reach {reach} "
         f"pixels across, more than the 28-pixel image: in principle every pixel can depend on every other. In "
         f"practice {couplings} layers of {hidden} hidden channels at full resolution must build the long-range "
         "shape of a digit from small steps. The reference tutorial found that its single-scale flows, after 200 "
         "epochs, had learned only local, small-scale correlations, not whole digits; chapter 4's multi-scale "
         "flow spends its layers where long-range structure is cheap to model, at lower resolution.")

# %% [markdown]
# ## Summary
#
# - An affine coupling layer keeps half of its input and shifts and scales the other half with functions of
#   the kept half; it inverts exactly and its log-determinant is the sum of the log-scales.
# - Checkerboard masks split single-channel images, channel masks split squeezed ones; consecutive layers
#   alternate the mask.
# - The log-scale is bounded by a tanh with a learnable per-channel bound $c$, for stable training.
# - A gated convolutional ResNet predicts scale and shift; its last layer starts at zero, so the flow starts
#   as the identity (and tests must perturb the weights).
# - The single-scale flow has 335,128 parameters (379,556 with variational dequantization) and is trained by
#   maximum likelihood with Adam. The shipped checkpoints had a few epochs in CPU stages of an hour or less,
#   not the reference's 200; each checkpoint records its stages.
# - Compare a model with published results only on the same data: the full test set. The first test images
#   are easier than average, so a slice of them makes a model look closer to the reference than it is.
#
# ## Exercises
#
# ### Exercise 1: the checkerboard mask and the affine coupling layer (implementation, 1 + 4 points, about 40 minutes)
#
# Write the heart of RealNVP yourself, in two steps, each with its own check. First
# `checkerboard_mask(h, w, invert=False)`, returning a float32 tensor `[1, 1, h, w]` with 0 at the top-left
# pixel and alternating 0 and 1 along rows and columns; `invert` swaps 0 and 1.

# %% tags=["student"]
def checkerboard_mask(h, w, invert=False):
    """[1, 1, h, w] float32 mask: 0 at (0, 0), alternating; invert swaps 0 and 1."""
    raise NotImplementedError("Exercise 1: implement checkerboard_mask")


# %% jupyter={"source_hidden": true} tags=["solution"]
def checkerboard_mask(h, w, invert=False):
    """[1, 1, h, w] float32 mask: 0 at (0, 0), alternating; invert swaps 0 and 1."""
    rows = torch.arange(h).view(h, 1)
    cols = torch.arange(w).view(1, w)
    mask = ((rows + cols) % 2).float().view(1, 1, h, w)
    return 1 - mask if invert else mask


# %%
exercises.check_checkerboard_mask(checkerboard_mask)

# %% [markdown]
# Then `AffineCoupling(network, mask, c_in)` with the flow contract `layer(z, ldj, reverse=False) -> (z, ldj)`,
# as derived at the top of this chapter. The network maps `z * mask` (`[B, C, H, W]`) to `[B, 2C, H, W]`: its
# first $C$ channels are the raw log-scale $s$, the last $C$ the shift $t$. Bound the log-scale with the
# learnable factor of each channel, $s \leftarrow \tanh(s / e^{c})\, e^{c}$ with one $c$ per channel, apply
# both only where `mask == 0`, and return $z' = (z + t) \odot e^{s}$ with `ldj + sum(s)` per image (and the inverse with
# `reverse=True`). The checker compares with `CouplingLayer` (switched off while your code runs, also through
# a reference to it taken earlier) on three channels with distinct factors, checks the inverse, and checks
# `ldj` against autograd.

# %% tags=["student"]
class AffineCoupling(torch.nn.Module):
    def __init__(self, network, mask, c_in):
        super().__init__()
        self.network = network
        self.scaling_factor = torch.nn.Parameter(torch.zeros(c_in))  # c, one per channel
        self.register_buffer("mask", mask)

    def forward(self, z, ldj, reverse=False):
        raise NotImplementedError("Exercise 1: implement AffineCoupling.forward")


# %% jupyter={"source_hidden": true} tags=["solution"]
class AffineCoupling(torch.nn.Module):
    def __init__(self, network, mask, c_in):
        super().__init__()
        self.network = network
        self.scaling_factor = torch.nn.Parameter(torch.zeros(c_in))  # c, one per channel
        self.register_buffer("mask", mask)

    def forward(self, z, ldj, reverse=False):
        s, t = self.network(z * self.mask).chunk(2, dim=1)
        e_c = self.scaling_factor.exp().view(1, -1, 1, 1)
        s = torch.tanh(s / e_c) * e_c * (1 - self.mask)  # bounded, and 0 on the kept half
        t = t * (1 - self.mask)
        if not reverse:
            return (z + t) * torch.exp(s), ldj + s.sum(dim=[1, 2, 3])
        return z * torch.exp(-s) - t, ldj - s.sum(dim=[1, 2, 3])


# %%
exercises.check_affine_coupling(AffineCoupling)

# %% [markdown]
# ### Exercise 2: an additive coupling layer (implementation, 3 points, about 20 minutes)
#
# NICE (Dinh et al., 2015), RealNVP's predecessor, used *additive* coupling: $z_2' = z_2 + t(z_1)$. Write
# `AdditiveCoupling(network, mask)`, an `nn.Module` with the flow contract `layer(z, ldj, reverse=False) ->
# (z, ldj)`, where `network` maps `z * mask` (`[B, C, H, W]`) to the shift `t` (`[B, C, H, W]`). What does it
# add to `ldj`?

# %% tags=["student"]
class AdditiveCoupling(torch.nn.Module):
    def __init__(self, network, mask):
        super().__init__()
        self.network = network
        self.register_buffer("mask", mask)

    def forward(self, z, ldj, reverse=False):
        raise NotImplementedError("Exercise 2: implement AdditiveCoupling.forward")


# %% jupyter={"source_hidden": true} tags=["solution"]
class AdditiveCoupling(torch.nn.Module):
    def __init__(self, network, mask):
        super().__init__()
        self.network = network
        self.register_buffer("mask", mask)

    def forward(self, z, ldj, reverse=False):
        t = self.network(z * self.mask) * (1 - self.mask)
        z = z + t if not reverse else z - t
        return z, ldj  # volume preserving: log|det J| = 0 in both directions


# %%
exercises.check_additive_coupling(AdditiveCoupling)

# %% [markdown]
# ### Exercise 3: train a flow made of your own layers (implementation, 4 points, about 30 minutes)
#
# Write the training loop yourself: `train_flow(model, images, num_steps, batch_size=64, lr=3e-3)` draws
# `num_steps` random batches from `images` (an int tensor `[N, 1, 28, 28]`), minimises `model(batch)` (the
# mean bpd, chapter 2's Jensen bound) with Adam, clipping the gradient norm at 1.0, and returns the list of
# the `num_steps` losses as floats. The checker builds a small flow from *your* `AffineCoupling` and
# `checkerboard_mask` (uniform dequantization and four couplings with 16 hidden channels), trains it with your
# loop on 4,096 training images, and asks for a held-out bpd of at most the target below. It also watches the
# loop while it runs: a new random batch of `batch_size` images each step, gradients that do not add up
# across steps (`optimizer.zero_grad()` every step), and the gradient norm clipped at 1.0 before each
# `optimizer.step()`. The check took 15 to 40 s in our measurements with one thread (the longer ones with other
# jobs on the CPU); allow a minute. flowbook's own trainers are switched off meanwhile.

# %%
from flowbook.exercises import ch3 as ch3_checks

Markdown(f"The checker trains for {ch3_checks.TRAIN_STEPS} steps of {ch3_checks.TRAIN_BATCH} images; the target is "
         f"{ch3_checks.TARGET_BPD} bpd on {ch3_checks.VAL_IMAGES} validation images.")

# %% tags=["student"]
def train_flow(model, images, num_steps, batch_size=64, lr=3e-3):
    """Train `model` on random batches of `images` [N, 1, 28, 28]; return the num_steps losses (floats)."""
    raise NotImplementedError("Exercise 3: implement train_flow")


# %% jupyter={"source_hidden": true} tags=["solution"]
def train_flow(model, images, num_steps, batch_size=64, lr=3e-3):
    """Train `model` on random batches of `images` [N, 1, 28, 28]; return the num_steps losses (floats)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for _ in range(num_steps):
        batch = images[torch.randint(len(images), (batch_size,))]
        loss = model(batch)  # mean bits per dimension, one dequantization sample
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


# %%
exercises.check_train_flow(train_flow, AffineCoupling, checkerboard_mask)

# %% [markdown]
# ### Exercise 4: why alternate the masks? (conceptual, 1 point, about 10 minutes)
#
# What would a flow of eight coupling layers that all use the *same* checkerboard mask be able to model?

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** The kept half would never change: every layer would keep the same pixels and transform the same
# others, so the composition is a single coupling layer in disguise (an affine map of the transformed half
# with parameters depending only on the kept half). The kept pixels would keep the prior's distribution,
# independent standard normals after the dequantization transform, so the model could not capture any
# structure among them. Alternating the mask lets every pixel be transformed, conditioned on its neighbours.

# %% [markdown]
# ### Exercise 5: additive versus affine (conceptual, 2 points, about 15 minutes)
#
# Think of a flow made only of additive couplings like yours of exercise 2 (after the dequantization layer).
# Can it change the density of the data? What does it lose compared with affine coupling?

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** Volume-preserving layers cannot concentrate or spread probability mass by themselves, but the
# flow still changes the density: $\log p(x) = \log \mathcal N(f(x)) + \text{ldj}_{\text{dequant}}$, and the
# map $f$ moves points to regions of higher or lower prior density. NICE added a final diagonal scaling layer
# for this reason. What additive layers lose is the ability to contract or expand locally, e.g. to shrink the
# many near-constant background pixels; affine couplings learn that with $s$, which is why RealNVP reaches
# better likelihoods with the same networks.

# %% [markdown]
# ## References
#
# - L. Dinh, D. Krueger, Y. Bengio. *NICE: Non-linear independent components estimation.* ICLR 2015 workshop.
# - L. Dinh, J. Sohl-Dickstein, S. Bengio. *Density estimation using Real NVP.* ICLR 2017.
# - J. Ho et al. *Flow++.* ICML 2019 (the gated convolutional network).
# - P. Lippe. *Normalizing Flows for Image Modeling*, UvA Deep Learning Tutorial 11 (CC BY-SA).

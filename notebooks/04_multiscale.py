# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 4: Multi-scale flows
#
# The single-scale flow of chapter 3 works on all 784 dimensions in every layer, at full resolution (each
# coupling transforms half of them, conditioned on the other half); in
# the reference tutorial, even after 200 epochs its samples show local strokes but no digits. The
# multi-scale architecture of RealNVP changes the shape of the latent as it goes: it trades resolution for
# channels (squeeze), and factors out half of the variables once they have been transformed enough (split).
# In the reference's results it has nearly three times the parameters, computes a likelihood faster, and
# reaches a lower bpd; chapter 5 measures all three models shipped here.
#
# **You will learn**
# - the squeeze operation, checked on the 4x4 example, and why its log-determinant is zero;
# - the split operation, and why scoring the split-off half early is the same as scoring it at the end;
# - the multi-scale architecture layer by layer, with the shape of the latent at each step;
# - the parameter counts of the three models, and how to train and sample the multi-scale flow.

# %% [markdown]
# **Learning objectives.** After this chapter and its exercises you can
# - implement squeeze, and check that its log-determinant is zero (Exercise 1);
# - implement the split layer with its prior term, and explain why scoring the split-off half early is exact
#   (Exercise 2);
# - assemble the multi-scale flow layer by layer, following the shape of the latent (Exercise 3);
# - reason about where a multi-scale flow spends its computation, and what an early split costs (Exercises 4 and
#   5).

# %%
import inspect
import math

import torch
from IPython.display import Markdown
from tabulate import tabulate

from flowbook import config, exercises, viz
from flowbook.data import load_mnist
from flowbook.evaluate import mean_bpd
from flowbook.layers import (CouplingLayer, GatedConvNet, SplitFlow, SqueezeFlow, VariationalDequantization,
                             create_channel_mask, create_checkerboard_mask)
from flowbook.models import MODEL_NAMES, ImageFlow, create_flow, create_multiscale_flow, num_parameters
from flowbook.pretrained import load_trained, shipped_results, train_quick
from flowbook.prior import gaussian_log_prob
from flowbook.results import REFERENCE_TEST_BPD

settings = config.settings()
device = config.get_device()
train_set, val_set, test_set = load_mnist()
print(f"{settings.mode} mode on {device}")

# %% [markdown]
# ## Squeeze
#
# Squeezing cuts the image into 2x2 blocks and stacks the four pixels of each block as channels:
# `[B, C, H, W]` becomes `[B, 4C, H/2, W/2]`. Output channel $4c + 2i + j$ at position $(y, x)$ holds input
# pixel $(2y + i, 2x + j)$ of channel $c$. It only reorders the variables, so its Jacobian is a permutation
# matrix with $|\det| = 1$: it adds nothing to `ldj`. The 4x4 example, before and after (channels shown last
# for readability):

# %%
img = torch.arange(1, 17).view(1, 1, 4, 4)
squeezed, _ = SqueezeFlow()(img, None)
restored, _ = SqueezeFlow()(squeezed, None, reverse=True)
print("before:\n", img[0, 0])
print("after squeeze, [H/2, W/2, 4C]:\n", squeezed[0].permute(1, 2, 0))
print("after reverse:\n", restored[0, 0])
assert squeezed[0, :, 0, 0].tolist() == [1, 2, 5, 6] and squeezed[0, :, 1, 1].tolist() == [11, 12, 15, 16]
assert torch.equal(restored, img)

# %% tags=["spoiler"]
print(inspect.getsource(SqueezeFlow.forward))

# %% [markdown]
# After a squeeze the image has 4 channels, so the coupling layers can use **channel masks**: two channels
# condition the other two, and each of them is a complete (sub-sampled) view of the image.
#
# ## Split
#
# Once some variables have been transformed by enough layers, we stop transforming them: the split layer
# cuts the channels in half, scores the second half $z_s$ under the prior right away, and passes only the
# first half $z_k$ on. Since the prior factorises,
#
# $$\log \mathcal N\big((z_k', z_s)\big) = \log \mathcal N(z_k') + \log \mathcal N(z_s),$$
#
# where $z_k'$ is what the later layers make of $z_k$: they never touch $z_s$, so its score does not depend on
# them. Scoring $z_s$ now gives the same likelihood as carrying it to the end, while the layers after the split
# only work on half the variables. In code the score is added to `ldj`, which from here on holds the running
# sum of log-determinants *and* of the split-off halves' prior terms: the final $\log \mathcal N(z) +$ `ldj` is
# still the whole log-likelihood. In reverse, the split layer draws a
# fresh $z_s \sim \mathcal N(0, I)$ (or takes a given one), appends it, and subtracts $\log\mathcal N(z_s)$:

# %% tags=["spoiler"]
print(inspect.getsource(SplitFlow.forward))

# %%
z = torch.randn(2, 4, 14, 14, dtype=torch.float64)
ldj0 = torch.zeros(2, dtype=torch.float64)
kept, ldj = SplitFlow()(z, ldj0)
z_back, ldj_back = SplitFlow()(kept, ldj, reverse=True, z_split=z[:, 2:])
print(f"kept {list(kept.shape)}; ldj after split {ldj.tolist()}; after reverse {ldj_back.tolist()}")
assert torch.allclose(ldj, gaussian_log_prob(z[:, 2:])) and torch.equal(z_back, z)
assert torch.equal(ldj_back, ldj0), "split adds in forward exactly what reverse subtracts"

# %% [markdown]
# ## The multi-scale architecture
#
# With only a few layers per scale, RealNVP's placement matters: split too early and the factored-out
# variables have barely been transformed. The reference's MNIST flow, which flowbook builds in
# `create_multiscale_flow`:
#
# 1. variational dequantization, then 2 checkerboard couplings at `[1, 28, 28]` (32 hidden channels);
# 2. squeeze to `[4, 14, 14]`, 2 channel couplings (48 hidden channels);
# 3. split off half: `[2, 14, 14]` goes to the prior; squeeze the rest to `[8, 7, 7]`;
# 4. 4 channel couplings at `[8, 7, 7]` (64 hidden channels).
#
# The hidden width grows as the resolution drops (the reference chose 32, 48 and 64 to keep the parameter
# count reasonable), and the later layers see the whole digit. Tracing a batch through the layers shows
# the shapes:

# %%
multiscale = create_multiscale_flow()
z, ldj = torch.zeros(2, 1, 28, 28, dtype=torch.int32), torch.zeros(2)
rows = []
with torch.no_grad():
    for i, layer in enumerate(multiscale.flows):
        z, ldj = layer(z, ldj)
        hidden = layer.network.nn[0].out_channels if hasattr(layer, "network") else ""
        rows.append([i, type(layer).__name__, list(z.shape[1:]), hidden, f"{num_parameters(layer):,}"])
print(tabulate(rows, headers=["#", "layer", "output [C, H, W]", "hidden channels", "parameters"]))
assert list(z.shape) == [2, 8, 7, 7]

# %% [markdown]
# The latent has $8 \cdot 7 \cdot 7 = 392$ dimensions; the other 392 were scored at the split. Here are the
# three models side by side, drawn by tracing an image through each and counted live:

# %%
viz.draw_architectures({name: create_flow(name) for name in MODEL_NAMES});

# %%
table = []
for name in MODEL_NAMES:
    m = create_flow(name)
    table.append([name, f"{num_parameters(m):,}", list(m.latent_shape(1)[1:]),
                  sum(type(f).__name__ == "CouplingLayer" for f in m.flows)])
print(tabulate(table, headers=["model", "parameters", "latent [C, H, W]", "coupling layers (main flow)"]))
params = {name: num_parameters(create_flow(name)) for name in MODEL_NAMES}
assert params == {"simple": 335_128, "vardeq": 379_556, "multiscale": 1_062_090}

# %%
main_couplings = [r for r in rows if r[1] == "CouplingLayer"]  # the layer table above: [#, layer, shape, ...]
low_res = sum(r[2][1] < 28 for r in main_couplings)
Markdown(f"The multi-scale flow has {params['multiscale'] / params['vardeq']:.1f} times the parameters of the "
         f"single-scale flow with variational dequantization, yet {low_res} of the {len(main_couplings)} coupling "
         "layers of its main flow run at 14x14 or 7x7 instead of 28x28 (its variational dequantization runs at "
         "28x28, as in the single-scale flow). A convolution's cost grows with the positions H*W times the square "
         "of the hidden width, so one coupling layer at 28x28 (32 hidden channels), 14x14 (48) and 7x7 (64) costs "
         f"about 1 : {14**2 * 48**2 / (28**2 * 32**2):.2f} : {7**2 * 64**2 / (28**2 * 32**2):.2f}: the scales do "
         "not cost the same, the lower ones are cheaper despite their width (chapter 5 times all three models).")

# %% [markdown]
# ## Training and samples
#
# Training is the same maximum-likelihood loop as in chapter 3. First a few steps live, to watch the loss
# fall; then the trained checkpoint, where it is shipped in `checkpoints/`, for the numbers and samples.

# %%
_, quick_source, curve = train_quick("multiscale", retrain=True, device=device)
print(f"trained live: {quick_source}")
viz.plot_training_curves({"multiscale": curve});

# %%
model, source, _ = load_trained("multiscale", device=device)
print(f"multiscale: {source}")

# %% [markdown]
# An evaluation with the importance-weighted bound: in quick mode on a slice of the test set, its first
# images, which a laptop evaluates in a minute or less; in full mode on the whole test set:

# %%
eval_images = test_set.images[:settings.eval_images]
torch.manual_seed(0)
bpd = mean_bpd(model, eval_images, settings.importance_samples, progress=settings.progress, batch_size=64)
on_what = (f"on all {len(eval_images):,} test images" if len(eval_images) == len(test_set)
           else f"on a {len(eval_images):,}-image slice of the test set (its first images)")
print(f"multiscale bpd {bpd:.3f} {on_what}, {settings.importance_samples} importance samples")
assert 0 < bpd < 8

# %% [markdown]
# The reference tutorial's results are on the full test set, so the comparison takes the results the shipped
# checkpoint carries (`python -m flowbook.evaluate`, all 10,000 test images, 8 importance samples):

# %%
results = shipped_results("multiscale")
reference = REFERENCE_TEST_BPD["multiscale"]
if results is not None:
    text = (f"On all {results['eval_images']['test']:,} test images the shipped multi-scale flow reaches "
            f"{results['test_bpd']:.3f} bits per dimension with {results['importance_samples']} importance samples, "
            f"{results['test_bpd'] - reference:.3f} above the reference tutorial's {reference:.3f} after 200 epochs, "
            f"with {results['epochs']:g} epochs of training.")
    if len(eval_images) < len(test_set):
        fewer = (f", even with {settings.importance_samples} importance samples instead of "
                 f"{results['importance_samples']}, a looser bound"
                 if settings.importance_samples < results["importance_samples"] else "")
        text += (f" The slice above gives {bpd:.3f} for the same weights{fewer}: the first test images are easier "
                 "than the average one, which is why a slice is no basis for comparing with the reference.")
else:
    text = (f"This run has no shipped checkpoint with its results JSON, so no full-test-set number to compare with "
            f"the reference tutorial's {reference:.3f}.")
Markdown(text)

# %% [markdown]
# To sample, we draw the final latent `[B, 8, 7, 7]`; the split layer draws the factored-out `[B, 2, 14, 14]`
# itself on the way back.

# %%
torch.manual_seed(44)
samples = model.sample([16, 8, 7, 7])
assert samples.dtype == torch.int32 and samples.shape == (16, 1, 28, 28)
viz.show_imgs(samples, "Samples of the multi-scale flow");

# %%
ink_samples = (samples > 127).flatten(1).sum(dim=1)  # pixels brighter than mid-grey, per image
ink_digits = (test_set.images[:1000] > 127).flatten(1).sum(dim=1)
Markdown(f"These are samples of {source}. As in chapter 3, count the pixels brighter than mid-grey: a median of "
         f"{int(ink_samples.median())} per sample, against {int(ink_digits.median())} for a test digit (median of the "
         f"first 1,000), and {int((ink_samples < 10).sum())} of the {len(samples)} samples have fewer than 10.")

# %% [markdown]
# ## Summary
#
# - Squeeze reshapes `[C, H, W]` to `[4C, H/2, W/2]`; a permutation, so it adds nothing to `ldj`.
# - Split scores half of the channels under the prior as soon as they are transformed enough; the
#   likelihood is unchanged because the prior factorises, and later layers work on half the variables.
# - The MNIST multi-scale flow: 2 couplings at 28x28, squeeze, 2 at 14x14, split, squeeze, 4 at 7x7, with wider
#   networks at lower resolution: 1,062,090 parameters and a `[8, 7, 7]` latent.
# - Sampling draws the final latent and lets each split layer draw its factored-out half.
#
# ## Exercises
#
# ### Exercise 1: squeeze (implementation, 3 points, about 20 minutes)
#
# Write `squeeze(z, reverse=False)`: `[B, C, H, W] -> [B, 4C, H/2, W/2]` with the channel order of
# `SqueezeFlow` (channel $4c + 2i + j$ holds pixel $(2y + i, 2x + j)$ of channel $c$), and the inverse with
# `reverse=True`. Hint: `reshape` and `permute`.

# %% tags=["student"]
def squeeze(z, reverse=False):
    """[B, C, H, W] -> [B, 4C, H/2, W/2]; reverse=True undoes it."""
    raise NotImplementedError("Exercise 1: implement squeeze")


# %% jupyter={"source_hidden": true} tags=["solution"]
def squeeze(z, reverse=False):
    """[B, C, H, W] -> [B, 4C, H/2, W/2]; reverse=True undoes it."""
    B, C, H, W = z.shape
    if not reverse:
        z = z.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4)
        return z.reshape(B, 4 * C, H // 2, W // 2)
    z = z.reshape(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(B, C // 4, 2 * H, 2 * W)


# %%
exercises.check_squeeze(squeeze)

# %% [markdown]
# ### Exercise 2: the split layer and its prior term (implementation, 3 points, about 20 minutes)
#
# Write `Split`, an `nn.Module` with the contract of `SplitFlow`:
# `forward(z, ldj, reverse=False, z_split=None, temperature=1.0)`. Forward keeps the first half of the
# channels and adds $\log \mathcal N(z_s; 0, I)$ of the second half $z_s$ to `ldj` (summed over every
# dimension of each image, with its constant); reverse appends `z_split` as it is given (the temperature does
# not touch a given `z_split`), or, when none is given, draws it from $\mathcal N(0, T^2 I)$, and subtracts
# $\log \mathcal N(z_{\text{split}}; 0, I)$, its log-density under the prior (the density the forward pass
# scores it with), at every temperature. The checker switches off `SplitFlow` and `gaussian_log_prob`.

# %% tags=["student"]
class Split(torch.nn.Module):
    def forward(self, z, ldj, reverse=False, z_split=None, temperature=1.0):
        raise NotImplementedError("Exercise 2: implement Split.forward")


# %% jupyter={"source_hidden": true} tags=["solution"]
class Split(torch.nn.Module):
    def forward(self, z, ldj, reverse=False, z_split=None, temperature=1.0):
        def log_normal(v):  # log N(v; 0, I) per image: [B, ...] -> [B]
            return (-0.5 * (v ** 2 + math.log(2 * math.pi))).flatten(1).sum(dim=1)

        if not reverse:
            z, z_split = z.chunk(2, dim=1)
            return z, ldj + log_normal(z_split)  # z_split leaves the flow: score it now
        if z_split is None:
            z_split = torch.randn_like(z) * temperature
        return torch.cat([z, z_split], dim=1), ldj - log_normal(z_split)


# %%
exercises.check_split(Split)

# %% [markdown]
# ### Exercise 3: assemble the multi-scale flow (implementation, 4 points, about 30 minutes)
#
# Write `build_multiscale_flow()`, returning the reference's multi-scale flow as an
# `ImageFlow(layers, img_shape=(1, 28, 28))` made from flowbook's layers (`VariationalDequantization`,
# `CouplingLayer`, `GatedConvNet`, the two masks, `SqueezeFlow`, `SplitFlow`), following the list and the layer table
# above: variational dequantization with 4 checkerboard couplings (`GatedConvNet(c_in=2, c_out=2,
# c_hidden=16)`), 2 checkerboard couplings (32 hidden channels), squeeze, 2 channel couplings (48), split,
# squeeze, 4 channel couplings (64). Within each of these four groups the masks alternate, and each group
# starts again with the mask not inverted (`invert=False` for the first coupling of the group,
# `invert=True` for the second, and so on). The noise flow's couplings transform the 1-channel noise, so they
# take `c_in=1`, while their network sees the noise and the image (`c_in=2`). The checker compares it layer by
# layer (the noise flow's couplings too: mask, network sizes, parameters), counts the parameters, checks the
# latent shape and encodes and decodes images exactly; `create_multiscale_flow` and its helpers are switched
# off, and every layer must be built by your function (a copy of a model made earlier does not count).

# %% tags=["student"]
def build_multiscale_flow():
    """The multi-scale flow as an ImageFlow, from flowbook's layers."""
    raise NotImplementedError("Exercise 3: implement build_multiscale_flow")


# %% jupyter={"source_hidden": true} tags=["solution"]
def build_multiscale_flow():
    """The multi-scale flow as an ImageFlow, from flowbook's layers."""
    def checkerboard(n, c_hidden, c_in=1, c_out=-1):
        return [CouplingLayer(GatedConvNet(c_in, c_hidden=c_hidden, c_out=c_out),
                              create_checkerboard_mask(28, 28, invert=i % 2 == 1), c_in=1) for i in range(n)]

    def channel(n, c_in, c_hidden):
        return [CouplingLayer(GatedConvNet(c_in, c_hidden=c_hidden), create_channel_mask(c_in, invert=i % 2 == 1),
                              c_in=c_in) for i in range(n)]

    dequant = VariationalDequantization(checkerboard(4, 16, c_in=2, c_out=2))  # sees noise and image
    layers = [dequant, *checkerboard(2, 32), SqueezeFlow(), *channel(2, 4, 48), SplitFlow(), SqueezeFlow(),
              *channel(4, 8, 64)]
    return ImageFlow(layers, img_shape=(1, 28, 28))


# %%
exercises.check_multiscale_flow(build_multiscale_flow)

# %% [markdown]
# ### Exercise 4: where does the computation go? (conceptual, 2 points, about 15 minutes)
#
# Count, for the multi-scale flow, how many of the 784 dimensions each group of coupling layers transforms,
# and explain why the 7x7 layers can afford 64 hidden channels.

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** The two 28x28 couplings transform 392 of the 784 values each (checkerboard halves); the two
# 14x14 couplings see all 784 values as `[4, 14, 14]` and transform 392 each; after the split, the four 7x7
# couplings see 392 values as `[8, 7, 7]` and transform 196 each. A 3x3 convolution's cost is proportional to
# $H \cdot W \cdot C_{\text{in}} \cdot C_{\text{out}}$: at 7x7 there are 16 times fewer positions than at 28x28,
# so doubling the hidden width (32 to 64) still costs about a quarter per layer.

# %% [markdown]
# ### Exercise 5: splitting early (conceptual, 2 points, about 15 minutes)
#
# Glow runs each scale as squeeze, then many flow steps, then split. Why does the reference flow not split
# right after its first squeeze, with no coupling layers between the squeeze and the split?

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** After two checkerboard couplings each variable has been transformed only once. A split at that
# point would send half of the variables to the prior nearly untransformed, i.e. it would model them as
# independent of everything that follows, which costs likelihood. With two more channel couplings first,
# every variable has been transformed at least twice, conditioned on its neighbours. Deep flows like Glow have
# many layers per scale, so they can split after every squeeze.

# %% [markdown]
# ## References
#
# - L. Dinh, J. Sohl-Dickstein, S. Bengio. *Density estimation using Real NVP.* ICLR 2017.
# - D. P. Kingma, P. Dhariwal. *Glow: Generative flow with invertible 1x1 convolutions.* NeurIPS 2018.
# - P. Lippe. *Normalizing Flows for Image Modeling*, UvA Deep Learning Tutorial 11 (CC BY-SA).

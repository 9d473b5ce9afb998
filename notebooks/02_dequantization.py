# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 2: Dequantization
#
# Chapter 1 gave us the change of variables for *continuous* densities. Images are not continuous: an MNIST
# pixel is one of the 256 integers $0, \dots, 255$. This chapter shows what goes wrong when a continuous flow
# meets integers, and the standard fix, dequantization, as a flow layer whose every log-determinant term we
# derive. Chapter 3 then builds the coupling layers that follow it.
#
# **You will learn**
# - why a continuous density on integer data collapses onto delta peaks;
# - uniform dequantization and the logit transform, with each term they add to `ldj`;
# - how flowbook makes dequantization exactly invertible in float32 (the reference tutorial's is not);
# - variational dequantization, a learned noise distribution;
# - the Jensen bound and the tighter importance-sampled bound on the likelihood of discrete images.

# %% [markdown]
# **Learning objectives.** After this chapter and its exercises you can
# - explain why a continuous density on integer pixels degenerates, and how uniform dequantization bounds the
#   discrete likelihood;
# - implement the logit transform and its log-determinant, term by term (Exercise 1);
# - compute the importance-weighted bound stably with logsumexp, and compare it with the Jensen bound (Exercise
#   2);
# - write the log-determinant of variational dequantization (Exercise 3), say what the noise margin costs
#   (Exercise 4), and why learned noise does not slow sampling (Exercise 5).

# %%
import inspect
import math

import numpy as np
import torch
from torch.autograd.functional import jacobian

from IPython.display import Markdown

from flowbook import config, exercises, viz
from flowbook.data import load_mnist
from flowbook.layers import (CouplingLayer, Dequantization, GatedConvNet, VariationalDequantization,
                             create_checkerboard_mask)
from flowbook.models import create_simple_flow
from flowbook.pretrained import load_trained

settings = config.settings()
device = config.get_device()
train_set, val_set, test_set = load_mnist()
print(f"{settings.mode} mode on {device}; MNIST: {len(train_set):,} training, {len(val_set):,} validation, "
      f"{len(test_set):,} test images of shape {list(train_set[0][0].shape)}, dtype {train_set[0][0].dtype}")

# %%
viz.show_imgs(train_set.images[:16], "MNIST training images: integers 0..255 per pixel");

# %% [markdown]
# ## Why integers break a continuous density
#
# A density $p(x)$ only has to integrate to one; it can be as large as it likes at single points. If the
# data lie on integers, a flow can concentrate its mass in ever narrower spikes around them and raise
# $\log p(x)$ without limit, learning nothing about how probable each integer value is. A 1-D picture: data
# on $\{0, 1, 2, 3\}$ with probabilities $\pi$, and a model that is a mixture of normals of width $\sigma$
# centred on the integers. On the integers themselves, the average log-likelihood grows like $-\log\sigma$
# as $\sigma \to 0$. On *dequantized* data $x + u$, $u \sim U[0, 1)$, it has a proper maximum:

# %%
probs = torch.tensor([0.1, 0.4, 0.3, 0.2], dtype=torch.float64)
values = torch.arange(4, dtype=torch.float64)
u = torch.rand(20000, dtype=torch.float64)
sigmas = torch.logspace(-3, 0.3, 40, dtype=torch.float64)


def mixture_log_prob(x, sigma):
    comp = torch.distributions.Normal(values, sigma).log_prob(x[:, None]) + probs.log()
    return torch.logsumexp(comp, dim=1)


on_integers = [(probs * mixture_log_prob(values, s)).sum().item() for s in sigmas]
dequantized = []
for s in sigmas:
    x = torch.multinomial(probs, len(u), replacement=True).double() + u
    dequantized.append(mixture_log_prob(x, s).mean().item())
fig = viz.plot_curves({"data on the integers": (sigmas, on_integers), "dequantized data x + u": (sigmas, dequantized)},
                      "width sigma of each peak", "mean log-likelihood (nats)",
                      "Integers reward infinitely narrow peaks; dequantized data does not", logx=True)
fig.axes[0].set_ylim(-6, max(on_integers) + 1);

# %%
best = sigmas[int(np.argmax(dequantized))].item()
print(f"on integers the log-likelihood keeps growing ({on_integers[0]:.1f} nats at sigma = {sigmas[0]:.0e}); "
      f"on dequantized data it peaks at sigma = {best:.2f}")
assert on_integers[0] > on_integers[-1] + 5 and np.argmax(dequantized) > 0

# %% [markdown]
# ## Uniform dequantization and the bound it optimises
#
# Dequantization adds noise $u \sim U[0, 1)^D$ to the integer image $x$ and models the continuous
# $v = x + u$ with a flow density $p(v)$. Each integer image owns the unit cube $x + [0, 1)^D$, and the
# probability the model gives to the discrete image is the mass of its cube:
#
# $$P(x) = \int_{[0,1)^D} p(x + u)\,du \;=\; \mathbb{E}_{u \sim U}\big[p(x + u)\big].$$
#
# We cannot compute this integral, but the log is concave, so Jensen's inequality gives a bound we can
# estimate with one sample of $u$ per image (Theis et al., 2016, derive it in this form):
#
# $$\log P(x) = \log \mathbb{E}_{u}\big[p(x + u)\big] \;\ge\; \mathbb{E}_{u}\big[\log p(x + u)\big].$$
#
# Why this objective cannot blow up the way the integer one did: the cubes have volume one and tile the
# space, so the masses $P(x)$ of all images sum to at most one, and
#
# $$\mathbb{E}_{u}\big[\log p(x + u)\big] \;\le\; \log P(x) \;\le\; 0 .$$
#
# A delta peak cannot help: however high it is, the cube's mass stays at most one, and the rest of the
# cube, where the peak leaves almost no density, drags the average log-density down. A model that is
# uniform within $[0, 256)^D$ has $p(v) = 256^{-D}$ and scores exactly 8 bits per dimension, as in chapter 1.
#
# ## The logit transform, term by term
#
# Flows work best on unbounded inputs that look roughly Gaussian, not on $[0, 256)$, for two reasons. First,
# the prior is $\mathcal N(0, I)$, and the coupling layers act on the whole real line, so a bounded input wastes
# their freedom (an argument, which this chapter does not measure). Second, at initialisation every coupling
# layer is the identity (chapter 3), so the latent is the input itself: a pixel of value 255 would be a
# standard normal value 255 standard deviations from the mean,
# with a log-density of about $-255^2/2 \approx -32{,}500$ nats per pixel. After the logit, the same untrained flow starts at tens of bits per dimension
# instead of thousands (measured below), and training brings it down to about one.
# flowbook's `Dequantization` layer therefore maps $x$ to $y \in \mathbb{R}^D$ in four elementwise steps and
# adds the log of each step's derivative to `ldj` (summed over the $D$ pixels):
#
# | step | map | term added to `ldj` per pixel |
# |---|---|---|
# | 1. noise margin | $u' = m + (1 - 2m)\,u$ | $\log(1 - 2m)$ |
# | 2. to the unit interval | $w = (x + u') / 256$ | $-\log 256$ |
# | 3. squeeze away from 0 and 1 | $r = (1 - \alpha)\,w + \alpha/2$ | $\log(1 - \alpha)$ |
# | 4. logit | $y = \log r - \log(1 - r)$ | $-\log r - \log(1 - r)$ |
#
# Step 4's derivative: $\frac{dy}{dr} = \frac1r + \frac1{1-r} = \frac{1}{r(1-r)}$, so
# $\log\frac{dy}{dr} = -\log r - \log(1-r)$. Step 2 is the term that turns a density over $[0, 1)^D$ into one
# over $[0, 256)^D$, where each integer's cube has volume one: the $\log 256$ that makes bpd honest.
# The logit margin $\alpha$, small (flowbook's value is printed below), keeps the logit finite at $w = 0$ and
# $w = 1$.
#
# Step 1 is flowbook's addition, the noise margin $m$. The way back (below) takes the floor of $256\,w$, and
# $y$ is stored in float32, whose rounding moves $w$ by a hair. Without the margin, a value can sit on either
# face of its cube, and the hair decides which cube it comes back in: $u = 0$ puts $x + u$ exactly on the
# lower face, and rounding down takes it into the cube of $x - 1$; a noise value very close to 1 puts it just
# under the upper face, and rounding up takes it into the cube of $x + 1$ (the reference tutorial's test
# fails on such a pixel: a 0 comes back as a 1). The margin keeps every value at least $m$ inside its cube,
# far more than the rounding moves it. It is a legitimate dequantization
# distribution: uniform on $[m, 1 - m]$, with density $1/(1 - 2m)$, hence the term. What does it change?
# The best achievable bound is the same with and without it (a model can put all of a cube's mass inside
# the shrunk cube). For a given model the bound moves by how $\log p$ varies inside each cube, in either
# direction; where $\log p$ is flat inside each cube it is lower by exactly $-\log_2(1 - 2m)$ bits per
# dimension (printed below, and exercise 4). Here is the code:

# %%
print(inspect.getsource(Dequantization._to_logits))
alpha, m = Dequantization().alpha, Dequantization().margin
print(f"logit margin alpha = {alpha:g}; noise margin m = {m:g}: where log p is flat in each cube, the bound is "
      f"lower by {-math.log2(1 - 2 * m):.5f} bits per dimension")

# %% [markdown]
# The second reason for the logit, measured: an untrained single-scale flow (every coupling layer the
# identity, so its latent is its input) scored on 64 test images, once on $x + u$ directly and once after the
# logit transform.

# %%
imgs = test_set.images[:64]
torch.manual_seed(0)
v = imgs.double() + torch.rand(imgs.shape, dtype=torch.float64)  # x + u, no logit: z = x + u
raw_bpd = ((0.5 * v**2 + 0.5 * math.log(2 * math.pi)).mean() / math.log(2)).item()
with torch.no_grad():
    logit_bpd = create_simple_flow().bits_per_dim(imgs).mean().item()
assert raw_bpd > 20 * logit_bpd
Markdown(f"Without the logit: {raw_bpd:,.0f} bits per dimension; with it: {logit_bpd:.2f}.")

# %% [markdown]
# The sum of the four terms must equal $\log|\det J|$ of the map from the noise $u$ to $y$ (the Jacobian is
# diagonal). Let us check it with autograd in float64 on a few pixels of a real image:

# %%
dequant = Dequantization()
x_small = test_set.images[:1, :, 10:13, 10:13]  # a 3x3 patch of the first test image
noise = torch.rand(x_small.shape, dtype=torch.float64)
y, ldj = dequant(x_small, torch.zeros(1, dtype=torch.float64), noise=noise)
J = jacobian(lambda n: dequant(x_small, torch.zeros(1, dtype=torch.float64), noise=n)[0].flatten(), noise)
ldj_autograd = torch.linalg.slogdet(J.reshape(9, 9)).logabsdet
print(f"ldj of the layer: {ldj.item():.9f}; log|det J| from autograd: {ldj_autograd.item():.9f}")
assert torch.allclose(ldj, ldj_autograd.reshape(1), atol=1e-9)

# %% [markdown]
# ## Exactly invertible, in float32
#
# The reverse direction applies the sigmoid, undoes the squeeze and takes the floor. Quantizing the
# dequantized image must give back the original pixels, for *every* image and *every* noise value, including
# the extremes $u = 0$ and the largest float32 below one. We check all 10,000 test images:

# %%
def count_wrong(layer, images, noise):
    y, ldj = layer(images, torch.zeros(len(images)), noise=noise)
    back, _ = layer(y, ldj, reverse=True)
    return int((back != images).sum())


test_images = test_set.images
noises = {"uniform random": torch.rand(test_images.shape), "u = 0": torch.zeros(test_images.shape),
          "u = 1 - 2^-24": torch.full(test_images.shape, 1 - 2 ** -24)}
wrong = {name: count_wrong(Dequantization(), test_images, n) for name, n in noises.items()}
wrong_without_margin = {name: count_wrong(Dequantization(margin=0.0), test_images, n) for name, n in noises.items()}
for name in noises:
    print(f"{name:15s}: {wrong[name]} wrong pixels with the margin, {wrong_without_margin[name]:,} without")
assert all(v == 0 for v in wrong.values()), "dequantization must invert exactly"
Markdown(f"With the margin, every one of the {test_images.numel():,} test pixels comes back, for each of the "
         f"{len(noises)} noises. Without it, {wrong_without_margin['u = 0']:,} pixels come back wrong for $u = 0$ "
         "(on the lower face of their cube, they round down into the integer below) and "
         f"{wrong_without_margin['u = 1 - 2^-24']:,} for the largest noise (just under the upper face, they round "
         f"up into the next integer); with random noise, {wrong_without_margin['uniform random']:,} of them, the "
         "few noise values that happen to fall that close to a face.")

# %% [markdown]
# ## The volumes of the dequantization, drawn
#
# Reading the layer backwards shows which part of the $y$ axis belongs to which integer. For 8 values and a
# uniform prior, each value owns a slice of equal *mass*; the slices in the middle are narrower because the
# logistic density is higher there:

# %%
viz.plot_dequantization(quants=8);

# %% [markdown]
# Real images are not uniform. With the non-uniform prior below (most mass on the values 1 to 3), the flow
# after dequantization has to model this staircase of hard-edged blocks, a shape no smooth, Gaussian-like
# flow models easily:

# %%
viz.plot_dequantization(quants=8, prior=[0.075, 0.2, 0.4, 0.2, 0.075, 0.025, 0.0125, 0.0125],
                        title="Dequantization of 8 values with a non-uniform prior");

# %% [markdown]
# ## Variational dequantization
#
# The uniform noise is an arbitrary choice. Any distribution $q(u \mid x)$ on $[0, 1)^D$ gives a valid
# bound, by importance sampling inside the integral and then Jensen:
#
# $$\log P(x) = \log \mathbb{E}_{u \sim q(\cdot \mid x)}\!\left[\frac{p(x + u)}{q(u \mid x)}\right]
# \;\ge\; \mathbb{E}_{u \sim q}\big[\log p(x + u) - \log q(u \mid x)\big].$$
#
# The bound is tight when $q(u \mid x) \propto p(x + u)$ inside the cube, so learning $q$ lets the noise
# round off the hard edges of the blocks (Ho et al., 2019). We make $q$ a flow itself, conditioned on the
# image: start from uniform $u_0$, map it to $\mathbb{R}$ with the logit transform, apply coupling layers that
# see the image (rescaled to $[-1, 1]$), and map back with a sigmoid. (A coupling layer, taught in chapter 3,
# is an invertible map that shifts and scales half of its input by amounts a neural network computes from
# the other half, plus here the image; its log-determinant is the sum of its log-scales. That is all this
# chapter needs of it.)
#
# $$u_0 \sim U[0,1)^D \xrightarrow{\text{logit}} \eta \xrightarrow{\text{couplings}(\cdot \mid x)} \eta'
# \xrightarrow{\text{sigmoid}} u.$$
#
# By the change of variables, $\log q(u \mid x) = \log 1 - \log|\det \partial u / \partial u_0|$, so the
# bound needs $-\log q(u \mid x) = \log|\det \partial u / \partial u_0|$: exactly the `ldj` this chain adds.
# Its terms, per pixel: the logit of $u_0$ ($\log(1-\alpha) - \log r_0 - \log(1 - r_0)$ with
# $r_0 = (1 - \alpha)\,u_0 + \alpha/2$, as above), the coupling layers' log-scales (chapter 3), and the
# sigmoid, whose derivative is $\mathrm{sigmoid}(\eta')\,(1 - \mathrm{sigmoid}(\eta'))$, giving
# $\log\mathrm{sigmoid}(\eta') + \log\mathrm{sigmoid}(-\eta') = -\mathrm{softplus}(-\eta') - \mathrm{softplus}(\eta')$.
# Then the four steps of the table above run on $u$. The code:

# %% tags=["spoiler"]
print(inspect.getsource(VariationalDequantization.dequant_noise))

# %% [markdown]
# As before, `ldj` must be $\log|\det|$ of the whole map from the uniform noise $u_0$ to $y$. A fresh
# coupling layer is the identity (its last convolution starts at zero), which would prove nothing, so we
# perturb the weights first:

# %%
torch.manual_seed(0)
var_flows = [CouplingLayer(GatedConvNet(c_in=2, c_out=2, c_hidden=8, num_layers=1),
                           create_checkerboard_mask(3, 3, invert=(i % 2 == 1)), c_in=1) for i in range(2)]
vardeq = VariationalDequantization(var_flows).double()
with torch.no_grad():
    for p in vardeq.parameters():
        p.add_(0.2 * torch.randn_like(p))
zero = torch.zeros(1, dtype=torch.float64)
_, ldj = vardeq(x_small, zero, noise=noise)
J = jacobian(lambda n: vardeq(x_small, zero, noise=n)[0].flatten(), noise)
ldj_autograd = torch.linalg.slogdet(J.reshape(9, 9)).logabsdet
print(f"ldj of variational dequantization: {ldj.item():.9f}; autograd: {ldj_autograd.item():.9f}")
assert torch.allclose(ldj, ldj_autograd.reshape(1), atol=1e-8)

# %% [markdown]
# ## A tighter bound with importance sampling
#
# One sample per image estimates the Jensen bound. With $K$ samples $u_1, \dots, u_K \sim q$ we can move the
# average inside the log (Burda et al., 2016):
#
# $$\log P(x) \;\ge\; \mathcal{L}_K = \mathbb{E}\left[\log \frac1K \sum_{k=1}^K \frac{p(x + u_k)}{q(u_k \mid x)}\right],
# \qquad \mathcal{L}_1 \le \mathcal{L}_2 \le \dots \le \log P(x).$$
#
# Why the bounds increase, for any $K < M$: write $\rho_k = p(x + u_k) / q(u_k \mid x)$ for the importance
# weights. The mean of $M$ weights is the average, over all subsets $I$ of $K$ of the $M$ samples, of the
# subsets' means: $\frac1M \sum_{j=1}^M \rho_j = \mathbb{E}_I\big[\frac1K \sum_{k \in I} \rho_k\big]$ (each
# sample lies in the same fraction $K/M$ of the subsets). The log is concave, so by Jensen
# $\log \frac1M \sum_j \rho_j \ge \mathbb{E}_I\big[\log \frac1K \sum_{k \in I} \rho_k\big]$, and taking the expectation
# over the samples (each subset's $K$ samples are $K$ independent draws) gives $\mathcal{L}_M \ge \mathcal{L}_K$.
# Numerically, the terms are
# log-likelihoods of hundreds of nats below zero, whose exponentials underflow, so we average in log space
# with `logsumexp`:
# $\log\frac1K\sum_k e^{\ell_k} = \mathrm{logsumexp}_k(\ell_k) - \log K$. `ImageFlow.bits_per_dim(imgs,
# importance_samples=K)` does exactly that; the evaluation of the shipped checkpoints uses $K = 8$ (their
# results JSONs record it), and the chapters use the mode's `importance_samples`, printed next to each number.
#
# Could we train with the tighter bound too? We can, at $K$ times the cost of every step, and it can pay:
# Hoogeboom et al. (2020) train flows with this importance-weighted objective (and with one built on the
# Rényi divergence) and report that both considerably improve on training with the plain Jensen bound
# when the dequantization noise is uniform. flowbook, like the reference tutorial, trains with one sample
# per step, to keep each step cheap on a CPU, and uses the tighter bound for evaluation.
#
# Let us watch the bound tighten on a variational-dequantization model (the trained checkpoint where one is
# shipped, else a quick-mode model):

# %%
Markdown(f"This run uses a slice of the test set, its first {settings.bound_images} images "
         f"({config.QUICK.bound_images} in quick mode, {config.FULL.bound_images} in full mode), and 16 "
         "dequantization samples per image.")

# %% tags=["spoiler-run"]
model, source, _ = load_trained("vardeq", device=device)
print(f"model: {source}")
imgs = test_set.images[:settings.bound_images].to(device)
torch.manual_seed(0)
with torch.no_grad():
    lls = torch.stack([model.log_likelihood(imgs).double().cpu()
                       for _ in config.progress_bar(range(16), "dequantization samples")])  # [16, B]
D = 28 * 28
bounds = {}
for K in (1, 2, 4, 8, 16):
    groups = lls.view(16 // K, K, -1)  # disjoint groups of K samples per image
    bound_K = torch.logsumexp(groups, dim=1) - math.log(K)
    bounds[K] = (-bound_K / (D * math.log(2))).mean().item()
for K, bpd in bounds.items():
    print(f"K = {K:2d}: {bpd:.4f} bits per dimension")

# %%
viz.plot_curves({"importance-sampled bound": (list(bounds), list(bounds.values()))},
                "importance samples K", "bits per dimension (lower is tighter)",
                "More samples, a tighter bound on -log2 P(x) / D", logx=True);

# %%
Markdown(f"The bound tightens from {bounds[1]:.4f} to {bounds[16]:.4f} bits per dimension between one and sixteen "
         "samples. Because our groups are nested halvings of the same 16 samples, the concavity argument holds "
         "sample by sample, and the values can only go down:")

# %%
values_K = list(bounds.values())
print(f"gain from 1 to 16 samples: {values_K[0] - values_K[-1]:.4f} bits per dimension")
assert all(a >= b - 1e-12 for a, b in zip(values_K, values_K[1:])), "the K-sample bounds must tighten"
assert all(math.isfinite(v) and v < 8 for v in values_K), "a trained model must beat 8 bits per dimension"
with torch.no_grad():
    torch.manual_seed(1)
    direct = model.bits_per_dim(imgs, importance_samples=4).mean().item()
print(f"ImageFlow.bits_per_dim with K = 4 on fresh samples: {direct:.4f}")

# %%
gains = [values_K[i] - values_K[i + 1] for i in range(len(values_K) - 1)]  # from K to 2K, for K = 1, 2, 4, 8
ratios = [b / a for a, b in zip(gains, gains[1:])]
Markdown("How far is $K = 16$ from the limit $K \\to \\infty$, the exact $-\\log_2 P(x) / D$? The gains from each "
         "doubling of $K$ are " + ", ".join(f"{g:.4f}" for g in gains) + " bits per dimension, each "
         + ", ".join(f"{r:.2f}" for r in ratios) + " times the one before. For large $K$ the gap to the limit "
         "shrinks like $1/K$: each doubling halves it, and the gap left at $K$ equals the gain from $K/2$ to $K$. "
         f"If that holds from $K = 8$ on, $K = 16$ is about {gains[-1]:.4f} bits per dimension above the limit"
         + ("." if ratios[-1] <= 0.6 else f". But the last ratio, {ratios[-1]:.2f}, is far above one half: the gains "
            "are not yet shrinking like that, so at $K = 16$ the bound has not reached the $1/K$ regime, the gap left "
            "is probably larger than this estimate, and these 16 samples cannot say by how much.")
         + " This is an extrapolation from these samples, not a bound: the limit itself cannot be computed.")

# %% [markdown]
# ## Summary
#
# - A continuous density on integer data can grow without bound by collapsing onto delta peaks; adding noise
#   $u \in [0, 1)^D$ (dequantization) turns likelihood maximisation into a bound on the discrete $\log P(x)$.
# - The dequantization layer maps $x + u$ through scaling and a logit to $\mathbb{R}^D$ and adds each step's log
#   derivative to `ldj`; the $-\log 256$ term is what makes bpd a real number of bits.
# - flowbook's dequantization inverts exactly in float32 for every noise value (a small noise margin and
#   float64 pixel arithmetic), checked on all 10,000 test images.
# - Variational dequantization learns $q(u \mid x)$ with a conditional flow; its `ldj` is
#   $-\log q(u \mid x)$, as the bound requires.
# - Importance sampling with $K$ samples gives bounds that tighten as $K$ grows; computed with `logsumexp`.
#
# ## Exercises
#
# ### Exercise 1: the logit transform and its log-determinant (implementation, 3 points, about 20 minutes)
#
# Write `logit_transform(u, alpha)` for `u` of shape `[B, ...]` in $[0, 1]$ (the argument plays the role of
# the pixel $w$ of the table of symbols; `u` is the package's name): return $y = \mathrm{logit}(r)$ with
# $r = (1-\alpha)u + \alpha/2$, and `ldj` of shape `[B]`, the log-determinant of $u \mapsto y$.

# %% tags=["student"]
def logit_transform(u, alpha):
    """u: [B, ...] in [0, 1] -> (y [B, ...], ldj [B])."""
    raise NotImplementedError("Exercise 1: implement logit_transform and its log-determinant")


# %% jupyter={"source_hidden": true} tags=["solution"]
def logit_transform(u, alpha):
    """u: [B, ...] in [0, 1] -> (y [B, ...], ldj [B])."""
    r = (1 - alpha) * u + alpha / 2
    y = torch.log(r) - torch.log1p(-r)
    per_pixel = math.log(1 - alpha) - torch.log(r) - torch.log1p(-r)  # log dr/du + log dy/dr
    return y, per_pixel.flatten(1).sum(dim=1)


# %%
exercises.check_logit_transform(logit_transform)

# %% [markdown]
# ### Exercise 2: the importance-weighted bits per dimension (implementation, 2 points, about 15 minutes)
#
# Write `importance_weighted_bpd(log_likelihoods, num_dims)`: `log_likelihoods` has shape `[K, B]` (nats,
# $K$ samples of $\log p(x + u_k) - \log q(u_k \mid x)$ for $B$ images); return the bpd `[B]` of the
# $K$-sample bound. It must stay finite for log-likelihoods around $-10^5$.

# %% tags=["student"]
def importance_weighted_bpd(log_likelihoods, num_dims):
    """[K, B] log-likelihood samples in nats -> [B] bits per dimension of the K-sample bound."""
    raise NotImplementedError("Exercise 2: implement importance_weighted_bpd")


# %% jupyter={"source_hidden": true} tags=["solution"]
def importance_weighted_bpd(log_likelihoods, num_dims):
    """[K, B] log-likelihood samples in nats -> [B] bits per dimension of the K-sample bound."""
    K = log_likelihoods.shape[0]
    bound = torch.logsumexp(log_likelihoods, dim=0) - math.log(K)
    return -bound / (num_dims * math.log(2))


# %%
exercises.check_importance_weighted_bpd(importance_weighted_bpd)

# %% [markdown]
# ### Exercise 3: the log-determinant of variational dequantization (implementation, 4 points, about 30 minutes)
#
# Write `vardeq_noise(var_flows, x, u0, alpha)`, the noise model of variational dequantization without
# flowbook's `VariationalDequantization`: from integer images `x` (`[B, C, H, W]`, 0..255) and uniform noise
# `u0` (same shape, float), compute $e = \mathrm{logit}$ of the squeezed $u_0$ (use your `logit_transform`),
# pass $e$ through each coupling layer of `var_flows` as `flow(e, ldj, orig_img=cond)` with the image
# rescaled to $[-1, 1]$ as `cond`, and end with a sigmoid. Return `u` (`[B, C, H, W]` in $(0, 1)$) and `ldj`
# (`[B]`), the log-determinant of the whole map $u_0 \mapsto u$: every term of the derivation above. The
# checker switches off flowbook's `dequant_noise`, `logit_transform` and `sigmoid_transform`.

# %% tags=["student"]
def vardeq_noise(var_flows, x, u0, alpha):
    """x: int [B, C, H, W], u0: [B, C, H, W] in (0, 1) -> (u [B, C, H, W] in (0, 1), ldj [B] of u0 -> u)."""
    raise NotImplementedError("Exercise 3: implement vardeq_noise")


# %% jupyter={"source_hidden": true} tags=["solution"]
def vardeq_noise(var_flows, x, u0, alpha):
    """x: int [B, C, H, W], u0: [B, C, H, W] in (0, 1) -> (u [B, C, H, W] in (0, 1), ldj [B] of u0 -> u)."""
    cond = x.to(u0.dtype) / 255 * 2 - 1  # the image, in [-1, 1], conditions every coupling
    e, ldj = logit_transform(u0, alpha)  # log(1 - alpha) - log p0 - log(1 - p0) per pixel
    for flow in var_flows:
        e, ldj = flow(e, ldj, orig_img=cond)  # + each coupling's sum of log-scales
    sigmoid_ldj = (torch.nn.functional.logsigmoid(e) + torch.nn.functional.logsigmoid(-e)).flatten(1).sum(1)
    return torch.sigmoid(e), ldj + sigmoid_ldj  # + log sigma(e) + log sigma(-e) per pixel


# %%
exercises.check_vardeq_noise(vardeq_noise)

# %% [markdown]
# ### Exercise 4: what does the margin cost? (conceptual, 3 points, about 30 minutes)
#
# flowbook squeezes the uniform noise into $[m, 1 - m]$. (a) Show that the result is still a lower bound on
# $\log P(x)$. (b) Show that the best bound any density $p$ can reach is $\log P(x)$ with and without the
# margin. (c) For a density that is constant inside each unit cube, by how many bits per dimension does the
# margin lower the bound? (d) Can the margin raise the bound of a given model?

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** (a) The noise is uniform on $[m, 1-m]^D$, a valid $q(u)$ inside the unit cube with density
# $q = (1-2m)^{-D}$, so $\mathbb{E}_q[\log p(x+u) - \log q(u)] \le \log \int q \, \frac{p(x+u)}{q} \,du \le \log P(x)$
# (Jensen, then the integral over the shrunk cube is at most the cube's mass). Its $-\log q$ term is
# $D\log(1-2m)$, exactly the `ldj` term of step 1.
# (b) Both bounds equal $\log P(x) - \mathrm{KL}(q \,\|\, p(\cdot \mid x))$ with $p(u \mid x) \propto p(x+u)$ on
# the cube, and the KL is zero when $p$ spreads the cube's mass evenly over where $q$ lives: over the whole
# cube without the margin, over the shrunk cube with it. So the best achievable bound is the same.
# (c) With $p$ constant in each cube, $\mathbb{E}_q[\log p(x+u)]$ is the same for both noise distributions, and
# only the $D\log(1-2m)$ term differs: the bound is lower by $-\log_2(1-2m) \approx 2m/\ln 2$ bits per
# dimension (printed in the chapter for flowbook's $m$).
# (d) Yes. The change is $\mathbb{E}_{q_m}[\log p] - \mathbb{E}_{U}[\log p] + D\log(1-2m)$; a density that is lower
# near the faces of the cubes than inside them gains more from leaving out the faces than the last term
# costs. So the margin's effect on a given model has either sign; "costs at most" would be wrong.

# %% [markdown]
# ### Exercise 5: sampling with variational dequantization (conceptual, 1 point, about 10 minutes)
#
# Variational dequantization makes the likelihood slower to compute (it runs extra coupling layers). Why
# does it not slow down sampling?

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** Sampling inverts the flow: from $y$ we only need the integer image, which is
# $\lfloor 256\,w \rfloor$ whatever noise $u$ produced $y$. The noise model $q(u \mid x)$ is never inverted,
# so its coupling layers do not run; the reverse of both dequantization layers is the same sigmoid and floor.

# %% [markdown]
# ## References
#
# - L. Theis, A. van den Oord, M. Bethge. *A note on the evaluation of generative models.* ICLR 2016.
# - J. Ho, X. Chen, A. Srinivas, Y. Duan, P. Abbeel. *Flow++: Improving flow-based generative models with
#   variational dequantization and architecture design.* ICML 2019.
# - Y. Burda, R. Grosse, R. Salakhutdinov. *Importance weighted autoencoders.* ICLR 2016.
# - E. Hoogeboom, T. Cohen, J. Tomczak. *Learning discrete distributions by dequantization.* 2020.
# - P. Lippe. *Normalizing Flows for Image Modeling*, UvA Deep Learning Tutorial 11 (CC BY-SA).

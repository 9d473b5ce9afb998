# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 1: The change of variables
#
# This is the first chapter of flowbook, a course on normalizing flows for image modeling (the README lists
# all the chapters). Here we build the one formula everything else rests on, the change of variables, and
# watch it work on a two-dimensional toy density. Chapter 2 then faces the first problem of images (pixels
# are integers), chapter 3 builds the coupling layers and chapter 4 the multi-scale architecture; the
# chapters after them analyse the trained models on MNIST and go beyond them. The symbols used in every
# chapter are collected in a table at the end of this one.
#
# **You will learn**
# - where flows sit next to VAEs and GANs, and what "exact likelihood" buys;
# - the change-of-variables formula in one and in many dimensions, and why it has a log-determinant;
# - why stacking invertible maps adds their log-determinants;
# - how to train a small flow by maximum likelihood, and read its density and samples;
# - what bits per dimension measure, and why 8-bit pixels cost 8 bits under a uniform model.

# %% [markdown]
# **Learning objectives.** After this chapter and its exercises you can
# - derive the density of an invertible map with the change of variables, volume term and its sign included
#   (Exercise 1);
# - explain why a flow keeps the dimension of its input, and what the log-determinant penalises (Exercises 3 and
#   4);
# - add up the log-determinants of stacked maps, and train a two-dimensional flow by maximum likelihood;
# - turn a log-likelihood in nats into bits per dimension, and read 8 bits per pixel as the uniform baseline
#   (Exercise 2).

# %%
import inspect
import math

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown
from torch.autograd.functional import jacobian

from flowbook import config, exercises, toy, viz
from flowbook.results import REFERENCE_TEST_BPD

settings = config.settings()
print(f"flowbook runs in {settings.mode} mode (set FLOWBOOK_MODE=quick or full to change it)")

# %% [markdown]
# ## Flows as generative models
#
# A generative model learns a distribution $p(x)$ from examples. The families you may have met differ in
# what they give you:
#
# | model | sampling | likelihood $p(x)$ | latent $z$ |
# |---|---|---|---|
# | VAE | decoder $p(x \mid z)$ | a lower bound (the ELBO) | smaller than $x$, inferred approximately |
# | GAN | generator $x = G(z)$ | none | any size, no way back from $x$ to $z$ |
# | energy-based model | slow (MCMC) | up to an unknown constant | none |
# | **normalizing flow** | $x = f^{-1}(z)$ | **exact** | same size as $x$, computed exactly, $z = f(x)$, for continuous $x$ (images are dequantized first, chapter 2) |
#
# A flow is an invertible function $f$ that maps data $x$ to a latent $z$ of the same dimension, where
# $z$ follows a simple prior, a standard normal. Because $f$ is invertible we can go both ways: encode any
# continuous point exactly, and sample by drawing $z$ and computing $x = f^{-1}(z)$. The price is that every
# layer must be invertible, with a log-determinant we can compute cheaply. The rest of this chapter explains
# why the log-determinant appears.
#
# **Why images?** This course models images, as most work on deep flows does, for three reasons. Images
# are high-dimensional and structured (a 28x28 digit has 784 correlated pixels), which makes density
# modeling hard and interesting. Convolutional networks are well studied and strong on images, and a flow
# can use them freely inside its layers (chapter 3). And pixels are discrete integers, which a density over
# continuous values must be taught to respect (chapter 2). One caution: flows keep the dimension of their
# input, so they are expensive in parameters and compute; the flows here are kept small enough to train on
# a CPU, and making them deeper is the simplest way to improve them.
#
# ## The change of variables in one dimension
#
# Let $z$ have density $p_z$, and let $x = g(z)$ with $g$ strictly monotone, so $z = f(x)$ with
# $f = g^{-1}$. Probability mass is conserved: the mass in a small interval $[x, x + dx]$ equals the mass in
# the interval it comes from, $[z, z + dz]$:
#
# $$p_x(x)\,|dx| = p_z(z)\,|dz| \quad\Longrightarrow\quad p_x(x) = p_z\big(f(x)\big)\,\left|\frac{df}{dx}\right|.$$
#
# The factor $|df/dx|$ is the **volume change**: where $g$ stretches space, the density must drop so that
# it still integrates to one. Take $z \sim U(0, 1)$ and two maps, a shift $x = z + 1$ and a scale
# $x = 2z + 1$. The shift moves the density; the scale spreads it over twice the length, so its height
# halves, $p_x(x) = p_z\big((x - 1)/2\big) \cdot \tfrac12$.

# %%
def uniform_density(z):
    return ((z >= 0) & (z < 1)).double()


xs = torch.linspace(-0.5, 3.5, 4001, dtype=torch.float64)
maps = {  # name: (f = g^-1, |df/dx|)
    "z ~ U(0, 1)": (lambda x: x, 1.0),
    "shift: x = z + 1": (lambda x: x - 1, 1.0),
    "scale: x = 2z + 1": (lambda x: (x - 1) / 2, 0.5),
}
densities = {name: uniform_density(f(xs)) * dfdx for name, (f, dfdx) in maps.items()}

fig, axes = plt.subplots(1, 3, figsize=(11, 2.8), sharey=True)
for ax, (name, p) in zip(axes, densities.items()):
    ax.fill_between(xs, p, alpha=0.5)
    ax.set_title(name)
    ax.set_xlabel("x")
axes[0].set_ylabel("density")
fig.suptitle("A scale changes the volume, so the height of the density must change too")
fig.tight_layout()

# %% [markdown]
# Each density still integrates to one, which is exactly what the factor $|df/dx|$ ensures:

# %%
masses = {name: torch.trapezoid(p, xs).item() for name, p in densities.items()}
for name, mass in masses.items():
    print(f"{name:20s} integrates to {mass:.4f}")
assert all(abs(m - 1) < 1e-2 for m in masses.values())

# %% [markdown]
# ## Many dimensions: the log-determinant
#
# In $D$ dimensions the small interval becomes a small box, and a differentiable invertible map turns it
# into a parallelepiped whose volume is scaled by $|\det J_f(x)|$, the absolute determinant of the Jacobian
# $J_f(x) = \partial f(x) / \partial x \in \mathbb{R}^{D \times D}$. So
#
# $$p_x(x) = p_z\big(f(x)\big)\,\big|\det J_f(x)\big|, \qquad
# \log p_x(x) = \log p_z\big(f(x)\big) + \log\big|\det J_f(x)\big|.$$
#
# We train on the log-likelihood, so the second form is what the code computes. In flowbook every layer
# returns its part of $\log|\det J|$ as `ldj` ("log-determinant of the Jacobian"). Let us check the formula
# on a linear map $f(x) = Ax + b$, whose Jacobian is $A$ everywhere:

# %%
torch.manual_seed(0)
A = torch.tensor([[2.0, 0.5], [-0.3, 0.8]], dtype=torch.float64)
b = torch.tensor([0.3, -1.0], dtype=torch.float64)
x = torch.randn(2, dtype=torch.float64)

J = jacobian(lambda v: A @ v + b, x)
ldj = torch.linalg.slogdet(J).logabsdet
print(f"log|det J| from autograd: {ldj.item():.6f},  log|det A|: {math.log(abs(torch.det(A).item())):.6f}")
assert torch.allclose(J, A)

# %% [markdown]
# A general $D \times D$ determinant costs $O(D^3)$, far too much for an image with $D = 784$ pixels in every
# layer of every training step. Flow layers are therefore designed so that their Jacobian is triangular:
# its determinant is the product of the diagonal, and $\log|\det J|$ a plain sum. Chapter 3's coupling layers
# are built exactly this way.
#
# ## Stacking invertible maps
#
# One invertible layer is rarely expressive enough, but a composition $f = f_L \circ \dots \circ f_1$ of
# $L$ invertible maps is invertible, and by the chain rule its Jacobian is the product of the layers'
# Jacobians, so the log-determinants add:
#
# $$\log\big|\det J_f(x)\big| = \sum_{k=1}^{L} \log\big|\det J_{f_k}(h_{k-1})\big|, \qquad h_0 = x,\; h_k = f_k(h_{k-1}).$$
#
# That is why every flowbook layer takes the running `ldj` and adds its own term:
# `z, ldj = layer(z, ldj)`. A quick check on two non-linear maps:

# %%
def f1(v):
    return torch.stack([v[0], v[1] * torch.exp(torch.tanh(v[0])) + v[0] ** 2])


def f2(v):
    return torch.stack([v[0] + torch.sin(v[1]), v[1]])


def logdet(f, v):
    return torch.linalg.slogdet(jacobian(f, v)).logabsdet


composed = logdet(lambda v: f2(f1(v)), x)
summed = logdet(f1, x) + logdet(f2, f1(x))
print(f"log|det| of the composition: {composed.item():.6f}; sum of the layers': {summed.item():.6f}")
assert torch.allclose(composed, summed)

# %% [markdown]
# ## A flow in two dimensions, trained in seconds
#
# Before images, a flow we can look at. `flowbook.toy` has an affine coupling layer for points in
# $\mathbb{R}^2$: it keeps one coordinate $x_1$, and uses it to shift and scale the other,
# $x_2' = (x_2 + t(x_1)) \cdot e^{s(x_1)}$, where $s$ and $t$ come from a small network and $s$ is bounded
# to $(-1, 1)$ by a tanh. The Jacobian is triangular with diagonal $(1, e^{s})$, so the layer adds $s$ to
# `ldj`. Here is the code that runs (`kept` is $x_1$, `other` is $x_2$):

# %% tags=["spoiler"]
print(inspect.getsource(toy.ToyCoupling.forward))

# %% [markdown]
# We stack eight of them, alternating which coordinate is kept, and fit the "two moons" density by
# maximising $\frac1N \sum_n \log p_x(x_n)$ with Adam. The density of the flow at any point is the change of
# variables from above: `log_prob(x) = log N(f(x)) + ldj`.

# %%
Markdown(f"In quick mode the flow trains for {config.QUICK.toy_steps} steps (seconds on a laptop), in full mode "
         f"for {config.FULL.toy_steps}; this run uses {settings.toy_steps}.")

# %%
data = toy.sample_toy("moons", 4000, seed=0)
flow, losses = toy.train_toy_flow(data, steps=settings.toy_steps)
print(f"negative log-likelihood: {losses[0]:.3f} nats at the start, {sum(losses[-20:]) / 20:.3f} at the end "
      f"({settings.toy_steps} steps)")
assert sum(losses[-20:]) / 20 < losses[0] - 0.5, "training should lower the negative log-likelihood"

# %%
viz.plot_curves({"training": (range(len(losses)), losses)}, "step", "negative log-likelihood (nats)",
                "Maximum likelihood training of the 2-D flow");

# %%
viz.plot_density_2d(flow.log_prob, data=data[:2000], samples=flow.sample(2000),
                    title="The flow's density and its samples, next to the data");

# %% [markdown]
# The density is a normal distribution bent into the shape of the moons: every sample is a draw from
# $\mathcal N(0, I)$ pushed through the inverse of the eight layers. Look for a thin band of density and samples
# between the two moons, where the data have none: a flow is a continuous bijection of the plane, so it can
# stretch the single Gaussian blob thin but never tear it into two pieces; longer training thins the band. The flow's log-determinant is exactly
# the autograd one, also after training:

# %%
flow64 = flow.double()
pts = data[:3].double()
_, ldj = flow64(pts)
expected = torch.stack([torch.linalg.slogdet(jacobian(lambda v: flow64(v[None])[0][0], p)).logabsdet for p in pts])
print("ldj of the flow:", [round(v, 6) for v in ldj.tolist()])
print("from autograd:  ", [round(v, 6) for v in expected.tolist()])
assert torch.allclose(ldj, expected, atol=1e-9)
flow = flow.float()

# %% [markdown]
# ## Bits per dimension
#
# For images we report the negative log-likelihood in **bits per dimension** (bpd): the number of bits an
# ideal entropy coder built on the model needs per pixel,
#
# $$\text{bpd}(x) = \frac{-\log_2 P(x)}{D} = \frac{-\ln P(x)}{D \ln 2},$$
#
# with $D = C \cdot H \cdot W$ ($784$ for MNIST). Dividing by $D$ makes datasets of different resolution
# comparable. A baseline every model must beat: a uniform distribution over 8-bit pixels gives each image
# the probability $256^{-D}$, hence
#
# $$\text{bpd} = \frac{-\log_2 256^{-D}}{D} = \log_2 256 = 8 \text{ bits}.$$
#
# Note that $P(x)$ here is the probability of a *discrete* image (a capital $P$, not a density $p$); chapter 2 shows how a density over
# continuous values turns into one, and where the $\log 256$ that makes the uniform model cost 8 bits
# enters the code.

# %% tags=["spoiler"]
D = 28 * 28
uniform_ll = -D * math.log(256)  # log-likelihood (nats) of any image under the uniform model
uniform_bpd = -uniform_ll / (D * math.log(2))
print(f"uniform model of 8-bit MNIST pixels: {uniform_bpd:.3f} bits per dimension")
assert abs(uniform_bpd - 8) < 1e-12

# %%
reference = REFERENCE_TEST_BPD  # the reference tutorial's three flows, 200 epochs, full MNIST test set
Markdown(f"Trained flows on MNIST need about one bit per pixel: the reference tutorial reports "
         f"{min(reference.values()):.3f} to {max(reference.values()):.3f} bits per dimension for its three flows, "
         f"{8 / max(reference.values()):.1f} to {8 / min(reference.values()):.1f} times fewer bits "
         "than the uniform model's 8; "
         "chapter 3 and the chapters after it compare the models shipped with flowbook.")

# %% [markdown]
# ## Notation
#
# Every chapter uses these symbols with these meanings.
#
# | symbol | meaning | first in |
# |---|---|---|
# | $x$ | a data point: an image of integer pixels (a point of $\mathbb{R}^2$ in this chapter's toy flow) | ch. 1 |
# | $z$ | the latent, $z = f(x)$; in code also the running value between layers, `z, ldj = layer(z, ldj)` | ch. 1 |
# | $f$ | **the flow**, always from data to latent: $z = f(x)$; sampling computes $x = f^{-1}(z)$ | ch. 1 |
# | $f_k$, $L$ | the $k$-th of the $L$ layers of a flow, $f = f_L \circ \dots \circ f_1$ | ch. 1 |
# | $g$ | $f^{-1}$, the direction from latent to data (only in the 1-D derivation) | ch. 1 |
# | $p$, $p_x$, $p_z$ | a probability **density** (of $x$, of $z$); $p$ means nothing else | ch. 1 |
# | $P(x)$ | the probability of a discrete image $x$ | ch. 1 |
# | $J_f$ | the Jacobian $\partial f(x) / \partial x$; `ldj` in code is the running sum of $\log\lvert\det J\rvert$ | ch. 1 |
# | $D$; $B, C, H, W$ | dimensions per image, $D = C \cdot H \cdot W$; batch, channels, height, width of a tensor | ch. 1 |
# | $i, j, k$ | indices (in chapter 4's squeeze a channel index is written $c$, the channel $4c + 2i + j$, at pixel position $(y, x)$) | ch. 1 |
# | $u$, $q(u \mid x)$ | dequantization noise in $[0, 1)^D$, and its distribution ($u_0$: uniform noise before a learned noise flow) | ch. 2 |
# | $v$ | a dequantized image, $v = x + u$ | ch. 2 |
# | $m$ | the noise margin: the noise is kept in $[m, 1 - m]$ | ch. 2 |
# | $\alpha$ | the logit margin: $[0, 1]$ is squeezed into $[\alpha/2, 1 - \alpha/2]$ before the logit | ch. 2 |
# | $w$, $r$, $y$ | a pixel in $[0, 1]$, the same pixel squeezed by $\alpha$, and its logit | ch. 2 |
# | $K$ | the number of importance samples (dequantization samples per image), $\rho_k$ their importance weights | ch. 2 |
# | $\sigma$ | a standard deviation (the sigmoid is written $\mathrm{sigmoid}$) | ch. 2 |
# | $s$, $t$ | the log-scale and the shift of a coupling layer (in chapter 8, $s_i$ and $t_i$ of token $i$ in an autoregressive layer) | ch. 1, 3, 8 |
# | $c$ | a coupling layer's learned scale bound, one per channel: $s \leftarrow \tanh(s / e^c)\, e^c$ | ch. 3 |
# | $b$ | the binary mask of a coupling layer: 1 where the input is kept (RealNVP's notation) | ch. 3 |
# | $\beta_i$, $\log s_i$ | ActNorm's shift and log-scale of channel $i$ (Glow writes $b$ and $s$) | ch. 6 |
# | $z_k$, $z_s$ | the half of the channels a split layer keeps, and the half it scores under the prior | ch. 4 |
# | $T$ | the sampling temperature: latents are drawn from $\mathcal N(0, T^2 I)$ | ch. 4 |
# | $t$; $v(x, t)$, $u_t$ | in chapter 7, time along an ODE ($t = 1$ data, $t = 0$ latent); the learned velocity field and a probability path's velocity (chapter 7 uses neither the coupling's shift $t$ nor the dequantized image $v$) | ch. 7 |
# | $a$, $\epsilon$ | in chapter 7, the accumulated divergence $a(t)$ ($a(0) = \log\lvert\det J_f\rvert$) and a probe of Hutchinson's estimator; in chapter 8, $\epsilon$ is the standard normal noise of noise augmentation | ch. 7, 8 |
# | $n$, $d$, $\ell$ | in chapter 8, the number of tokens (patches) of an image, the values per token, and a patch's side: $d = \ell^2 C$, $n d = D$ | ch. 8 |
# | $x'$, $\tilde x$ | in chapter 8, an image scaled to $[-1, 1]$ and the same image with Gaussian noise, $\tilde x = x' + \sigma \epsilon$ | ch. 8 |
#
# Two formulas are written differently in papers. flowbook's affine coupling shifts first and then scales,
# $z_2' = (z_2 + t) \odot e^{s}$, where RealNVP (Dinh et al., 2017) writes $x_2 \odot e^{s} + t$; flowbook's
# ActNorm (chapter 6, with per-channel parameters $\beta_i$ and $\log s_i$) computes $(z + \beta) \odot e^{\log s}$, where
# Glow (Kingma and Dhariwal, 2018) writes $s \odot x + b$. Each pair describes the same maps: a shift $t$
# before the scale is the shift $t \odot e^{s}$ after it. And the log-determinants agree, because a shift adds
# something that does not depend on the values being scaled (in a coupling layer, $t$ depends only on the
# kept half), so in both orders the Jacobian's diagonal holds only the scales, $e^{s_j}$ or $s_i$:
# $\log\lvert\det J\rvert = \sum_j s_j$ for the coupling layer and $H \cdot W \sum_i \log s_i$ for ActNorm.

# %% [markdown]
# ## Summary
#
# - A normalizing flow is an invertible map $f$ from data to a latent of the same size with a simple prior;
#   it gives exact likelihoods and exact encodings, and samples by inverting $f$.
# - The change of variables: $\log p_x(x) = \log p_z(f(x)) + \log|\det J_f(x)|$; the log-determinant is the
#   volume change that keeps the density normalised.
# - Stacked invertible layers add their log-determinants; every flowbook layer returns `(z, ldj)` with its
#   term added.
# - Flow layers are designed so that $\log|\det J|$ is cheap (triangular Jacobians); we saw a 2-D coupling
#   flow learn the two moons by maximum likelihood.
# - Bits per dimension, $-\log_2 P(x) / D$, is the unit of image likelihood; a uniform model of 8-bit pixels
#   costs exactly 8.
#
# ## Exercises
#
# Each implementation exercise has a checker in `flowbook.exercises`. It prints one line when your code
# passes, and otherwise stops with one message that says what is wrong (for the usual mistakes, which one
# you made). While it runs, the flowbook code that the exercise asks you to write is switched off, so calling
# it fails with "implement this yourself", also through a name you gave it earlier. What no checker can tell
# is out of bounds too: copying flowbook's source into your cell, or a library function that does the whole
# exercise for you. A stub not yet written stops its check with one line, `NotImplementedError`.
#
# ### Exercise 1: the density of an affine map (implementation, 2 points, about 10 minutes)
#
# Let $z \sim \mathcal N(0, 1)$ and $x = a z + b$ with $a \neq 0$. Use the change of variables to write
# `log_prob_affine(x, scale, shift)`, the log-density of $x$ (elementwise). Mind the sign of $a$.

# %% tags=["student"]
def log_prob_affine(x, scale, shift):
    """log p(x) for x = scale * z + shift, z ~ N(0, 1); x is a tensor, scale and shift are floats."""
    raise NotImplementedError("Exercise 1: implement log_prob_affine with the change of variables")


# %% jupyter={"source_hidden": true} tags=["solution"]
def log_prob_affine(x, scale, shift):
    """log p(x) for x = scale * z + shift, z ~ N(0, 1); x is a tensor, scale and shift are floats."""
    z = (x - shift) / scale  # f(x) = g^-1(x)
    log_pz = -0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)
    return log_pz - math.log(abs(scale))  # log|df/dx| = -log|scale|


# %%
exercises.check_change_of_variables(log_prob_affine)

# %% [markdown]
# ### Exercise 2: from nats to bits per dimension (implementation, 1 point, about 5 minutes)
#
# Write `bits_per_dim(log_likelihood, num_dims)` that turns log-likelihoods in nats (a tensor `[B]`) into
# bits per dimension.

# %% tags=["student"]
def bits_per_dim(log_likelihood, num_dims):
    """[B] log-likelihoods in nats -> [B] bits per dimension."""
    raise NotImplementedError("Exercise 2: implement bits_per_dim")


# %% jupyter={"source_hidden": true} tags=["solution"]
def bits_per_dim(log_likelihood, num_dims):
    """[B] log-likelihoods in nats -> [B] bits per dimension."""
    return -log_likelihood / (num_dims * math.log(2))


# %%
exercises.check_bits_per_dim(bits_per_dim)

# %% [markdown]
# ### Exercise 3: why the same dimension? (conceptual, 1 point, about 10 minutes)
#
# A VAE can encode a 784-pixel image into 20 numbers. Why can a normalizing flow not do that, and what does
# the multi-scale architecture of chapter 4 do instead?

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** The change of variables needs an invertible, differentiable $f$ with a square Jacobian:
# a map from 784 to 20 dimensions loses information (many images share a code), has no inverse and no
# determinant, so $p_x$ would no longer be defined by the formula. The multi-scale architecture keeps all
# 784 dimensions but "factors out" half of them at intermediate layers: those are scored by the prior right
# away and not transformed further, which saves computation while the total dimension stays 784.

# %% [markdown]
# ### Exercise 4: the volume term (conceptual, 2 points, about 15 minutes)
#
# In the first figure, the scale $x = 2z + 1$ halved the height of the density. What would happen to the
# likelihood of training data if a flow could shrink volume without paying the $\log|\det J|$ term?

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** Without the volume term the objective is $\sum_i \log \mathcal N(f(x_i); 0, I)$, and that is
# bounded above by $-\tfrac D2 \log 2\pi$ per point, reached at $f(x_i) = 0$. So maximum likelihood does not
# diverge: it collapses. The best "flow" contracts everything onto the prior's mode ($f \to 0$, e.g. $f(x) =
# \epsilon x$ with $\epsilon \to 0$), a degenerate solution that has learned nothing about the data and whose
# "density" no longer integrates to one. The log-determinant is exactly the penalty for that contraction
# ($D \log \epsilon \to -\infty$ for $f(x) = \epsilon x$), which is why it can never be dropped.

# %% [markdown]
# ## References
#
# - L. Dinh, J. Sohl-Dickstein, S. Bengio. *Density estimation using Real NVP.* ICLR 2017.
# - G. Papamakarios, E. Nalisnick, D. Rezende, S. Mohamed, B. Lakshminarayanan. *Normalizing Flows for
#   Probabilistic Modeling and Inference.* JMLR 2021.
# - D. P. Kingma, P. Dhariwal. *Glow: Generative flow with invertible 1x1 convolutions.* NeurIPS 2018.
# - P. Lippe. *Normalizing Flows for Image Modeling*, UvA Deep Learning Tutorial 11 (CC BY-SA), the
#   tutorial this collection starts from.

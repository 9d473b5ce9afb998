# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 7: Continuous time, from the instantaneous change of variables to flow matching
#
# Chapters 1 to 6 built the flow $f$ (data $x$ to latent $z$) from a stack of discrete layers, each with a
# log-determinant we could write down. This chapter lets the number of layers go to infinity. A flow then
# becomes an ordinary differential equation (ODE), $dx/dt = v(x, t)$, and its log-determinant becomes an
# integral of a trace: a *continuous normalizing flow* (Chen et al., 2018). Such a flow is still an
# invertible map with an exact likelihood, but a likelihood and a sample each cost an ODE solve. *Flow
# matching* (Lipman et al., 2023; Liu et al., 2023) trains the same kind of model without solving any ODE; it
# and the closely related diffusion training are how most image generators are trained today. At the end of
# the chapter a flow-matching model of MNIST is set beside the other shipped models in one table, its
# likelihood in the same units as theirs.
#
# **Convention.** As in every chapter, $f$ maps data to latent. Here the data sit at time $t = 1$ and the
# latent at $t = 0$: $f$ solves the ODE backwards, from $t = 1$ to $t = 0$, and sampling solves it forwards.
# In this chapter $t$ is time (not a coupling layer's shift) and $v(x, t)$ is the learned velocity field
# (not chapter 2's dequantized image); chapter 1's table of symbols lists both.
#
# **You will learn**
# - how a residual step $z + h\,v(z)$ turns into an ODE, and its log-determinant into $\int \operatorname{tr}
#   (\partial v / \partial x)\, dt$, derived and checked numerically;
# - a continuous flow trained by maximum likelihood, and what the ODE solver costs as it trains;
# - Hutchinson's trace estimator: unbiased, one vector-Jacobian product, and its variance;
# - flow matching: probability paths, and why regressing on a *conditional* velocity trains the right field;
# - a flow-matching model of MNIST: its samples against the number of solver steps, its bits per dimension
#   through the ODE, and what a likelihood and a sample cost next to a coupling flow.
#
# Every number and picture below is computed by the cells of this notebook, from the trained checkpoints in
# `checkpoints/` where they exist, else from quick-mode models (the cells say which); the test bpd of the
# shipped models, each a run of minutes to hours, is read from their results files in `checkpoints/`.

# %% [markdown]
# **Learning objectives.** After this chapter and its exercises you can
# - state the instantaneous change of variables, and check it numerically;
# - implement Hutchinson's trace estimator, and see its spread shrink with the number of probes (Exercise 1);
# - implement the conditional flow-matching loss, and explain why it needs no simulation (Exercises 2 and 4);
# - sample with an Euler solver, and say what the solver tolerance does to a reported bpd (Exercises 3 and 5).

# %%
import inspect
import math
import time

import torch
from IPython.display import Markdown
from tabulate import tabulate
from torch.autograd.functional import jacobian

from flowbook import config, exercises, toy_cnf, viz
from flowbook.classifier import THRESHOLD, load_classifier, probabilities, recognisability
from flowbook.data import load_mnist
from flowbook.gallery import sample_grid
from flowbook.flowmatch import FlowMatchingModel, LinearPath
from flowbook.models import num_parameters
from flowbook.ode import divergence_exact, divergence_hutchinson, draw_probe, integrate
from flowbook.checkpoints import read_checkpoint
from flowbook.pretrained import checkpoint_file, load_trained, training_history
from flowbook.results import load_results
from flowbook.toy import sample_toy, train_toy_flow

settings = config.settings()
device = config.get_device()
train_set, val_set, test_set = load_mnist()
print(f"mode: {settings.mode}")

# %% [markdown]
# ## 1. From steps to an ODE
#
# Take a residual layer, $z_{k+1} = z_k + h\, v(z_k)$, with a small step $h$ and any smooth network $v$. Its
# Jacobian is $I + h J$ with $J = \partial v / \partial z$. With the eigenvalues $\lambda_i$ of $J$,
#
# $$\log\left|\det(I + hJ)\right| = \sum_i \log|1 + h\lambda_i| = h \sum_i \lambda_i + O(h^2)
#   = h \operatorname{tr} J + O(h^2).$$
#
# (A complex $\lambda_i$ gives $h \operatorname{Re} \lambda_i + O(h^2)$; complex eigenvalues of a real matrix
# come in conjugate pairs, so the sum is still real and equal to $h \operatorname{tr} J$.)
#
# Stack $N = 1/h$ such layers, the $k$-th at time $t_k = k h$ with its own network $v(\cdot, t_k)$. The chain
# rule of chapter 1 adds their log-determinants:
#
# $$\sum_{k=0}^{N-1} \log\left|\det\left(I + h\, \frac{\partial v}{\partial z}(z_k, t_k)\right)\right|
#   = \sum_k h \operatorname{tr} \frac{\partial v}{\partial z}(z_k, t_k) + N \cdot O(h^2)
#   \;\xrightarrow{h \to 0}\; \int_0^1 \operatorname{tr} \frac{\partial v}{\partial z}(z(t), t)\, dt,$$
#
# since $N \cdot O(h^2) = O(h)$, and the steps become the ODE $dz/dt = v(z, t)$. The trace of the Jacobian is
# the divergence, $\operatorname{div} v = \sum_i \partial v_i / \partial z_i$. These steps run from $t = 0$ to
# $t = 1$, the direction of sampling ($f^{-1}$ in this chapter's convention): the integral is $\log|\det|$ of
# the map $z(0) \mapsto z(1)$, and $f$, which runs back from $t = 1$ to $t = 0$, has the same integral with the
# opposite sign (section 2). The same holds for the map $z(0) \mapsto z(t)$ up to any time $t$. Let $p_t$ be the
# density of $z(t)$ when $z(0)$ is drawn from $p_0$; chapter 1's change of variables for that map gives
# $\log p_t(z(t)) = \log p_0(z(0)) - \int_0^t \operatorname{div} v(z(s), s)\, ds$, and differentiating in $t$
# gives the **instantaneous change of variables** (Chen et al., 2018):
#
# $$\frac{d}{dt} \log p_t(z(t)) = -\operatorname{div} v(z(t), t).$$
#
# A check on a small field: a two-dimensional velocity network with random weights. We take $N$ Euler steps
# $z_{k+1} = z_k + h\, v(z_k, t_k)$, add up the log-determinants of the steps from autograd Jacobians, and
# compare with `flowbook.ode.integrate`, which solves the ODE together with $a(t)$, $da/dt =
# \operatorname{div} v$, by an adaptive solver at a tight tolerance.

# %%
torch.manual_seed(0)
field = toy_cnf.ToyVelocity(hidden=16).double()
z0 = torch.randn(5, 2, dtype=torch.float64)
_, exact = integrate(field, z0, 0.0, 1.0, divergence="exact", rtol=1e-10, atol=1e-10)


def euler_logdet(n):
    """Sum of log|det(I + h dv/dz)| over n Euler steps from t = 0 to 1, for each point of z0."""
    z, total, h = z0.clone(), torch.zeros(len(z0), dtype=torch.float64), 1.0 / n
    for k in range(n):
        t = torch.full((1,), k * h, dtype=torch.float64)
        step = lambda x: x + h * field(x.unsqueeze(0), t).squeeze(0)  # noqa: E731
        total += torch.stack([torch.linalg.slogdet(jacobian(step, zb))[1] for zb in z])
        z = integrate(field, z, k * h, (k + 1) * h, method="euler", steps=1).detach()  # the same step, by torchdiffeq
    return total


steps = [2, 4, 8, 16, 32, 64, 128]
errors = [(euler_logdet(n) - exact).abs().max().item() for n in steps]
print(tabulate([[n, f"{e:.2e}"] for n, e in zip(steps, errors)], ["Euler steps N", "max |sum of log-dets - integral|"]))
reference = "first order, c/N (drawn 2x higher)"
viz.plot_curves({"|discrete - continuous log-determinant|": (steps, errors),
                 reference: (steps, [2 * errors[0] * steps[0] / n for n in steps])}, "number of steps N", "error",
                logx=True, logy=True, dashed=(reference,),
                title="The steps' log-determinants converge to the integral of the divergence");

# %%
order = math.log2(errors[-2] / errors[-1])
print(f"each doubling of N divides the error by about {errors[-2] / errors[-1]:.2f} (order {order:.2f})")
assert 0.8 < order < 1.2

# %% [markdown]
# The error halves with each doubling of $N$: first order (on the figure's log-log axes a first-order error is
# a line of slope $-1$, parallel to the dashed reference, drawn twice as high so that the two can be told
# apart). Three parts of it are each $O(h)$ over the $N$ steps, and the figure shows their sum: the derivation's
# $O(h^2)$ per step, $N$ times; the sum $\sum_k h \operatorname{tr} J(t_k)$, which takes each step's trace at
# its start, in place of the integral; and the Euler path's drift from the ODE's solution, so that the steps'
# log-determinants are taken at slightly different points. So a continuous flow is the limit of chapter 1's stacks of
# layers, and its log-determinant needs no determinant at all, only the divergence along the path.
#
# ## 2. A continuous normalizing flow on the two moons
#
# From here on the state of the ODE is written $x(t)$, with the data at $x(1) = x$ and the latent at $x(0) = z$
# (section 4 writes $x_t$); $z$ keeps its meaning from every chapter, the latent. For the flow $f$ from data at
# $t = 1$ to latent at $t = 0$, integrate the instantaneous change of variables from $0$ to $1$ along the
# solution through $x(1) = x$:
#
# $$\log p(x) = \log \mathcal{N}(x(0); 0, I) - \int_0^1 \operatorname{div} v(x(t), t)\, dt.$$
#
# `integrate(v, x, 1.0, 0.0, divergence=...)` solves the ODE backwards from $t = 1$, together with $a(t)$,
# $da/dt = \operatorname{div} v$ as in section 1 but now started at $a(1) = 0$. It returns $z = x(0)$ and
# $a(0) = \int_1^0 \operatorname{div} v\,dt = -\int_0^1 \operatorname{div} v\, dt$, which is
# $\log|\det J_f(x)|$, the term every flowbook layer adds to `ldj`. In two dimensions the divergence is
# exact: two backward passes. Maximum likelihood then trains $v$ by backpropagating through every step of the
# adaptive solver (`flowbook.toy_cnf.train_max_likelihood`):

# %%
print(inspect.getsource(toy_cnf.log_prob))

# %%
data = sample_toy("moons", 4000, seed=0)
held_out = sample_toy("moons", 2000, seed=1)
coupling, _ = train_toy_flow(data, steps=settings.toy_steps)
cnf, cnf_record = toy_cnf.train_max_likelihood(data, steps=settings.cnf_steps, progress=settings.progress)
print(f"coupling flow (chapter 1): {settings.toy_steps} steps; continuous flow: {settings.cnf_steps} steps, "
      f"{sum(cnf_record['seconds']):.0f} s")

# %%
viz.plot_curves({"velocity evaluations of the forward solve": (range(1, len(cnf_record["nfe"]) + 1),
                                                                 cnf_record["nfe"])},
                "training step", "evaluations",
                title="Maximum likelihood: the forward solve's work at each training step");
first, last = cnf_record["nfe"][:10], cnf_record["nfe"][-10:]
print(f"forward solve: {sum(first) / 10:.0f} evaluations of v on average over the first 10 steps, "
      f"{sum(last) / 10:.0f} over the last 10; a step took {1000 * sum(cnf_record['seconds'][-10:]) / 10:.0f} ms "
      "at the end, backward included")
assert sum(last) > sum(first), "the solver's work did not grow during this run"

# %% [markdown]
# Each training step solves the ODE with an adaptive solver, which takes as many steps as its error control
# demands for the field at hand. The small random field at the start is easy to follow; as training moves the
# density away from the Gaussian, the solver takes more evaluations on average (the printed averages of the
# first and last ten steps; from one step to the next the count goes up and down), and the backward pass has
# to go back through every one of them. This growth is what made continuous flows expensive to train (Finlay
# et al., 2020, regularise the field to keep it in check). The densities side by side, with their average
# log-likelihood on 2,000 held-out points in the titles (the left panel shows 2,000 of the training points):

# %%
with torch.no_grad():
    ll_coupling = coupling.log_prob(held_out).mean().item()
ll_cnf = toy_cnf.log_prob(cnf, held_out).mean().item()
viz.plot_densities_2d({f"coupling flow: {ll_coupling:.2f} nats": coupling.log_prob,
                       f"continuous, max. likelihood: {ll_cnf:.2f} nats": lambda x: toy_cnf.log_prob(cnf, x)},
                      data=data[:2000], title="Held-out log-likelihood in the titles (higher is better)");

# %%
snapshots = (f". This is quick mode (full mode trains {config.FULL.cnf_steps} and {config.FULL.toy_steps} steps): "
             "both are snapshots on their way, not finished models, trained unequally, so their densities and "
             "log-likelihoods say how far each got in that time, not how good either kind of flow can be.")
Markdown(f"The continuous flow trained {settings.cnf_steps} steps ({sum(cnf_record['seconds']):.0f} s), the coupling "
         f"flow {settings.toy_steps}" + (snapshots if settings.quick else "."))

# %% [markdown]
# ## 3. Hutchinson's trace estimator
#
# The exact divergence costs one backward pass per dimension: 784 for an MNIST image, at every evaluation
# of $v$. FFJORD (Grathwohl et al., 2019) replaces it with an unbiased estimate. For any random vector
# $\epsilon$ with $\mathbb{E}[\epsilon\epsilon^\top] = I$,
#
# $$\mathbb{E}\left[\epsilon^\top J \epsilon\right] = \mathbb{E}\left[\operatorname{tr}(J\epsilon\epsilon^\top)
#   \right] = \operatorname{tr}\left(J\, \mathbb{E}[\epsilon\epsilon^\top]\right) = \operatorname{tr} J,$$
#
# and $\epsilon^\top J$ is one vector-Jacobian product, what a single backward pass computes. Standard normal
# probes and Rademacher probes (each entry $\pm 1$) both qualify. Their variances differ. Only the symmetric
# part $S = (J + J^\top)/2$ counts, since $\epsilon^\top J \epsilon = \epsilon^\top J^\top \epsilon$; split the
# estimate into its diagonal and off-diagonal terms,
#
# $$\epsilon^\top S \epsilon = \sum_i S_{ii}\, \epsilon_i^2 + \sum_{i \ne j} S_{ij}\, \epsilon_i \epsilon_j .$$
#
# The two sums are uncorrelated (each product $\epsilon_i^2 \epsilon_j \epsilon_k$ with $j \ne k$ has mean 0),
# and the second, $2 \sum_{i<j} S_{ij} \epsilon_i \epsilon_j$, has variance
# $4 \sum_{i<j} S_{ij}^2 = 2 \sum_{i \ne j} S_{ij}^2$ for either probe (its terms are uncorrelated, each
# $\epsilon_i \epsilon_j$ of variance 1). For a Rademacher probe $\epsilon_i^2 = 1$, so the first sum is the
# constant $\operatorname{tr} S$; for a Gaussian probe $\epsilon_i^2$ has variance 2 and the first sum adds
# $2 \sum_i S_{ii}^2$. So a Gaussian probe has variance $2\|S\|_F^2$ and a Rademacher probe $2(\|S\|_F^2 -
# \sum_i S_{ii}^2)$, never more. We measure both on the MNIST velocity network of section 5 at one image halfway
# along its path, where the exact trace is a loop of 784 backward passes (the network is loaded here ahead of
# section 5, which describes it; here it is just some field $v(x, t)$ with 784 inputs):

# %%
flowmatch, fm_source, _ = load_trained("flowmatch", device=device)
print(f"flow-matching model: {fm_source}")
x1, _ = flowmatch.to_data_space(test_set.images[:1].to(device))
xt = (0.5 * x1 + 0.5 * torch.randn_like(x1)).requires_grad_(True)
half = torch.full((1,), 0.5, device=device)
jac = jacobian(lambda x: flowmatch.net(x.view(1, 1, 28, 28), half).flatten(), xt.flatten()).detach()
trace = jac.trace().item()
sym = (jac + jac.T) / 2
frobenius, diagonal = sym.pow(2).sum().item(), sym.diag().pow(2).sum().item()
predicted = {"gaussian": 2 * frobenius, "rademacher": 2 * (frobenius - diagonal)}  # one-probe variances
probes = 500
estimates = {}
for kind in ("rademacher", "gaussian"):
    x = xt.detach().repeat(probes, 1, 1, 1).requires_grad_(True)
    estimates[kind] = divergence_hutchinson(flowmatch.net(x, half.expand(probes)), x, draw_probe(x, kind)).detach()
rows = [[k, f"{e.mean().item():.2f} ± {e.std().item() / math.sqrt(probes):.2f}", f"{e.std().item():.1f}",
         f"{math.sqrt(predicted[k]):.1f}"] for k, e in estimates.items()]
print(f"exact trace (784 backward passes): {trace:.2f}")
print(tabulate(rows, ["probe", f"mean of {probes} estimates ± s.e.", "std of one estimate", "predicted std"],
               disable_numparse=True))  # keeps 71.0

# %%
for kind, e in estimates.items():
    assert abs(e.mean().item() - trace) < 4 * e.std().item() / math.sqrt(probes), kind
    assert abs(e.std().item() / math.sqrt(predicted[kind]) - 1) < 0.25, kind
viz.plot_histogram({k: e.cpu() for k, e in estimates.items()}, bins=60, xlabel="estimate of tr J",
                   title=f"One-probe estimates of a trace of {trace:.1f} (exact: dashed)").axes[0].axvline(
    trace, color="k", ls="--");

# %%
gaps = {k: abs(e.mean().item() - trace) / (e.std().item() / math.sqrt(probes)) for k, e in estimates.items()}
share = 1 - predicted["rademacher"] / predicted["gaussian"]
Markdown(f"The means lie {gaps['rademacher']:.1f} (Rademacher) and {gaps['gaussian']:.1f} (Gaussian) standard "
         f"errors from the exact trace, as an unbiased estimate's mean should (the assertions above allow 4), and "
         f"the measured spreads match the formulas. The diagonal of $J$ carries the share $1 - "
         f"\\sigma^2_{{\\text{{Rademacher}}}} / \\sigma^2_{{\\text{{Gaussian}}}}$ of the variance, the part that "
         f"Rademacher probes remove: {100 * share:.1f}% at this point.")

# %% [markdown]
# Along an ODE solve, `flowbook.ode.integrate` draws one probe per image and uses it at every evaluation of $v$,
# so $a(0) = \int_1^0 \epsilon^\top J \epsilon\, dt$ along the path, whose expectation over $\epsilon$ is
# $\int_1^0 \operatorname{div} v\, dt$ (up to the solver's own error, which also acts on $a$). A log-likelihood
# computed with it is an unbiased estimate $\ell + n$ of the exact one, $\ell$, with zero-mean noise $n$ from
# the probe (the probe does not change the Jacobians along the path, so the expectation over $\epsilon$ passes
# through the integral; only the adaptive solver's step sizes, within its tolerance, depend on it). An
# importance-weighted bound (chapter 2) takes $\log \frac{1}{K}\sum_k e^{\hat\ell_k}$ over $K$
# dequantization samples, each with its own exact log-likelihood $\ell_k$; with noisy estimates,
# $\hat\ell_k = \ell_k + n_k$, the average of $e^{\hat\ell_k}$ tends, as $K$ grows, to
# $\mathbb{E}_u\big[e^{\ell_k}\, \mathbb{E}[e^{n_k} \mid u_k]\big] \ge \mathbb{E}_u[e^{\ell_k}] = P(x)$,
# because for every dequantization noise $u_k$, $\mathbb{E}[e^{n_k} \mid u_k] \ge e^{\mathbb{E}[n_k \mid u_k]} = 1$
# (Jensen's inequality, for the convex $\exp$; the probe's noise has mean 0 at every point). Its log tends to
# a value above $\log P(x)$, the true log-likelihood: no bound at all. So a flow-matching model's
# `bits_per_dim` refuses `importance_samples > 1`.
#
# ## 4. Flow matching
#
# Maximum likelihood solved an ODE at every training step. Flow matching never does. Choose a **probability
# path** $p_t$ from the prior $p_0 = \mathcal{N}(0, I)$ to the data $p_1$; any velocity field $u_t$ that
# carries $p_0$ along it to $p_1$ (the continuity equation $\partial_t p_t + \operatorname{div}(p_t u_t) =
# 0$) is a flow of the data, and we can regress $v_\theta$ on it:
#
# $$\mathcal{L}_{FM}(\theta) = \mathbb{E}_{t \sim U[0,1],\, x \sim p_t} \|v_\theta(x, t) - u_t(x)\|^2.$$
#
# We know neither $p_t$ nor $u_t$ in closed form, but we can build them from pairs. Draw $x_0 \sim
# \mathcal{N}(0, I)$ and a data point $x_1$, and join them by a straight line, the **linear path** (the
# optimal-transport path of Lipman et al. with $\sigma_{\min} = 0$, and the rectified flow of Liu et al.):
#
# $$x_t = (1 - t)\, x_0 + t\, x_1, \qquad \frac{d x_t}{dt} = x_1 - x_0 .$$
#
# The marginal velocity at a point is the average of the straight lines' velocities through it,
# $u_t(x) = \mathbb{E}[x_1 - x_0 \mid x_t = x]$, and it generates the path $p_t$ of the $x_t$. To see why, take
# any smooth test function $\varphi$ and follow its average along the lines:
#
# $$\frac{d}{dt}\, \mathbb{E}[\varphi(x_t)] = \mathbb{E}\left[\nabla\varphi(x_t)^\top (x_1 - x_0)\right]
#   = \mathbb{E}\left[\nabla\varphi(x_t)^\top\, \mathbb{E}[x_1 - x_0 \mid x_t]\right]
#   = \mathbb{E}\left[\nabla\varphi(x_t)^\top u_t(x_t)\right],$$
#
# the second step by the tower property. Points moved by the field $u_t$ change the average of $\varphi$ in
# exactly this way, so the ODE $dx/dt = u_t(x)$ started from $p_0$ has the distribution $p_t$ at every $t$ (this
# is the continuity equation above, integrated against $\varphi$: $p_t$ and the distribution of the ODE's
# solution both satisfy it from $p_0$, and for a smooth field it has only one solution). The
# **conditional flow-matching loss** regresses on the lines' own velocities instead:
#
# $$\mathcal{L}_{CFM}(\theta) = \mathbb{E}_{t,\, x_0,\, x_1} \|v_\theta(x_t, t) - (x_1 - x_0)\|^2 .$$
#
# Expand both squares. The $\|v_\theta\|^2$ terms are equal, since $x_t$ has the same distribution in both.
# The cross terms are equal by the tower property:
# $\mathbb{E}_{x_0, x_1}[v_\theta(x_t, t)^\top (x_1 - x_0)] = \mathbb{E}_{x_t}[v_\theta(x_t, t)^\top
# \mathbb{E}[x_1 - x_0 \mid x_t]] = \mathbb{E}_{x_t}[v_\theta(x_t, t)^\top u_t(x_t)]$. The remaining terms,
# $\|x_1 - x_0\|^2$ and $\|u_t\|^2$, do not depend on $\theta$. So $\mathcal{L}_{CFM} = \mathcal{L}_{FM} +
# \text{const}$: the same gradient, the same minimiser $v_\theta = u_t$, and no ODE in sight. The loss is
# a few lines (`flowbook.flowmatch.LinearPath`):

# %% tags=["spoiler"]
print(inspect.getsource(LinearPath.interpolate) + inspect.getsource(LinearPath.loss))

# %% [markdown]
# On the two moons, with the same network as the maximum-likelihood flow of section 2; the density of the
# result comes from the same ODE and exact divergence:

# %%
fm2d, fm_record = toy_cnf.train_flow_matching(data, steps=3 * settings.toy_steps, progress=settings.progress)
ll_fm = toy_cnf.log_prob(fm2d, held_out).mean().item()
ml_ms = 1000 * sum(cnf_record["seconds"]) / len(cnf_record["seconds"])
fm_ms = 1000 * sum(fm_record["seconds"]) / len(fm_record["seconds"])
print(tabulate([["coupling flow (chapter 1)", settings.toy_steps, "-", f"{ll_coupling:.3f}"],
                ["continuous, maximum likelihood", settings.cnf_steps, f"{ml_ms:.1f}", f"{ll_cnf:.3f}"],
                ["continuous, flow matching", len(fm_record["seconds"]), f"{fm_ms:.1f}", f"{ll_fm:.3f}"]],
               ["model", "training steps", "ms per step", "held-out log-likelihood (nats)"]))
viz.plot_densities_2d({f"max. likelihood: {ll_cnf:.2f} nats": lambda x: toy_cnf.log_prob(cnf, x),
                       f"flow matching: {ll_fm:.2f} nats": lambda x: toy_cnf.log_prob(fm2d, x)},
                      data=data[:2000], title="One network, two ways to train it");

# %%
print(f"a flow-matching step costs {ml_ms / fm_ms:.0f}x less than a maximum-likelihood step here")
better = "higher" if ll_fm > ll_cnf else "lower"
Markdown(f"A flow-matching step costs **{ml_ms / fm_ms:.0f} times** less than a maximum-likelihood step on this "
         f"machine, so it took {len(fm_record['seconds']):,} steps in about the time of "
         f"{round(sum(fm_record['seconds']) / ml_ms * 1000):,} maximum-likelihood ones. Its held-out "
         f"log-likelihood, after those {len(fm_record['seconds']):,} steps against the maximum-likelihood flow's "
         f"{settings.cnf_steps}, is {better} ({ll_fm:.3f} against {ll_cnf:.3f} nats): flow matching never looks at the "
         "likelihood, yet a field that carries the noise onto the data has one, and this one is computed "
         "through the ODE like any other continuous flow's.")

# %% [markdown]
# ## 5. Flow matching on MNIST
#
# The image model (`flowbook.flowmatch.FlowMatchingModel`) wraps the same ODE in chapter 2's dequantization,
# so that its bits per dimension mean what they mean for every other flow in this collection. For an image
# $x$ with integer pixels and uniform noise $u \sim U[0, 1)^D$ (chapter 2's symbol, not the velocity $u_t$ of
# section 4), the flow $f$ runs
#
# $$x \;\xrightarrow{\text{dequantize, logit (chapter 2)}}\; y \;\xrightarrow{\;/\,4\;}\; x_1
#   \;\xrightarrow{\text{ODE from } t=1 \text{ to } t=0}\; z,$$
#
# so the ODE's state at $t = 1$ is $x_1$, the scaled logits, not the integer image $x$ (section 2's $x(1)$ was
# the data itself). `encode` adds to `ldj`, per image with $D = 784$ pixels:
# - chapter 2's dequantization terms: $D\log(1 - 2m) - D \log 256 + D\log(1-\alpha) - \sum_i \log r_i(1-r_i)$
#   (the noise margin $m$, the $\log 256$ of the discrete pixels, the logit margin $\alpha$ and the logit of
#   each squeezed pixel $r_i$);
# - $-D \log 4$ for the fixed scaling (dividing by 4 brings the logits, which span about $\pm 12$, to the
#   scale of the noise);
# - $a(0) = -\int_0^1 \operatorname{div} v(x(t), t)\, dt$ from the ODE, with Hutchinson's estimate.
#
# The velocity network is a small U-Net (`flowbook.unet.VelocityUNet`): three resolutions, residual blocks
# with the time added to each, self-attention at 7x7. It was trained with the conditional flow-matching loss
# by `python -m flowbook.train --model flowmatch` (the runbook `docs/training.md` has the command):

# %%
shipped = checkpoint_file("flowmatch")
if shipped is not None:
    rows = [[s["stage"], s["hardware"], s["batch_size"], f"{s['peak_lr']:g}", s["epochs"], f"{s['images_seen']:,}",
             f"{s['minutes']:.0f}"] for s in training_history("flowmatch")]
    print(tabulate(rows, ["stage", "hardware", "batch", "peak lr", "epochs", "images", "minutes"]))
    meta = read_checkpoint(shipped)["meta"]
    print(f"best validation flow-matching loss: {meta['best_val_cfm']:.4f} (a stage's epochs and images count up to "
          "its best validation epoch, whose weights it passed on)")
print(f"{num_parameters(flowmatch):,} parameters; {fm_source}")

# %% [markdown]
# ### Samples, and what the solver's steps buy
#
# A sample solves the ODE from $z \sim \mathcal{N}(0, I)$ at $t = 0$ to $t = 1$ and quantizes. How good are
# the samples, and how many solver steps do they need? We let a digit classifier judge: a small CNN trained
# by flowbook (`python -m flowbook.classifier`) on the training images and shipped as
# `checkpoints/classifier.pt`. A sample counts as **recognisable** when the classifier gives its most likely
# digit a probability of at least 0.9; the real test digits set the standard.

# %%
clf = load_classifier()
real = recognisability(clf, test_set.images[:settings.judged_samples])
print(f"classifier: {100 * clf.meta['test_accuracy']:.2f}% of the 10,000 test digits classified correctly; "
      f"{100 * real:.0f}% of the first {settings.judged_samples} test digits recognisable")
torch.manual_seed(1)
z = torch.randn(settings.judged_samples, 1, 28, 28, device=device)
start = time.perf_counter()
adaptive = flowmatch.decode(z)
adaptive_s, adaptive_nfe = time.perf_counter() - start, flowmatch.last_nfe
adaptive_score = recognisability(clf, adaptive)
viz.show_imgs(adaptive[:32], title=f"Samples at temperature 1.0, adaptive solver ({adaptive_nfe} evaluations of v): "
              f"{100 * adaptive_score:.0f}% of {settings.judged_samples} recognisable");

# %% [markdown]
# The same starting noise, solved with $N$ Euler steps, $x \leftarrow x + \frac{1}{N} v(x, t)$:

# %%
euler_steps = [1, 2, 4, 8, 16, 32]
euler = {n: flowmatch.decode(z, steps=n) for n in euler_steps}
scores = [recognisability(clf, euler[n]) for n in euler_steps]
print(tabulate([[str(n), s] for n, s in zip(euler_steps, scores)]
               + [[f"adaptive ({adaptive_nfe} evaluations)", adaptive_score], ["real test digits", real]],
               ["Euler steps", f"share recognisable (of {settings.judged_samples})"], floatfmt=".2f"))
viz.plot_curves({"Euler": (euler_steps, scores),
                 f"adaptive solver ({adaptive_nfe} evaluations)": (euler_steps, [adaptive_score] * len(euler_steps)),
                 "real test digits": (euler_steps, [real] * len(euler_steps))},
                "Euler steps N (evaluations of v)", f"share recognisable (p >= {THRESHOLD})", logx=True,
                dashed=(f"adaptive solver ({adaptive_nfe} evaluations)", "real test digits"),
                title="Sample quality against solver steps (dashed: one value each, not a function of N)");

# %%
viz.show_imgs(torch.cat([euler[n][:8] for n in euler_steps] + [adaptive[:8]]), row_size=8,
              row_labels=[f"{n} Euler step{'s' if n > 1 else ''}" for n in euler_steps] + ["adaptive"],
              title="The same 8 starting points, one row per solver");
one = euler[1].float()
x1_mean = flowmatch.to_data_space(train_set.images[:2000].to(device))[0].mean(0, keepdim=True)
mean_image = flowmatch.dequant(x1_mean * flowmatch.data_scale, torch.zeros(1, device=device), reverse=True)[0].float()
spread_one = (one - one.mean(0)).abs().mean()
spread_adaptive = (adaptive.float() - adaptive.float().mean(0)).abs().mean()
print(f"one Euler step: the samples lie {spread_one:.1f} grey levels from their own mean image on average, and "
      f"{(one - mean_image).abs().mean():.1f} from the mean of the training images' logits, decoded to pixels; "
      "adaptive samples lie "
      f"{spread_adaptive:.1f} from theirs")

# %% [markdown]
# Why one step should collapse the samples: at $t = 0$, $x_t = x_0$ says nothing about which $x_1$ the line
# leads to ($x_0$ and $x_1$ are drawn independently), so the marginal velocity there is
# $u_0(z) = \mathbb{E}[x_1] - z$, and a single step of length 1
# lands at $\mathbb{E}[x_1]$, the mean of the training images' scaled logits, whatever $z$ was. A trained model should
# show it in the first row:

# %%
collapsed = spread_one < spread_adaptive / 2
Markdown(f"For the model named above the one-step samples lie {spread_one:.1f} grey levels from their mean image on "
         f"average, against {spread_adaptive:.1f} for the adaptive solver's: "
         + ("they collapse towards one image, as the derivation says. " if collapsed else
            "they do not collapse, so this model has not learned the marginal velocity at $t = 0$ yet. ")
         + "More steps let the trajectories bend towards individual digits.")

# %%
Markdown(f"With the model named above, the share of recognisable samples is {scores[0]:.2f} after one Euler step, "
         f"{scores[euler_steps.index(8)]:.2f} after 8 and {scores[-1]:.2f} after {euler_steps[-1]}; the adaptive "
         "solver "
         f"({adaptive_nfe} evaluations) reaches {adaptive_score:.2f}, against {real:.2f} for real test digits.")

# %% [markdown]
# ### Bits per dimension through the ODE
#
# The likelihood of a test image: dequantize, scale, solve the ODE from $t=1$ to $t=0$ with one Hutchinson
# probe, add the prior. The likelihood's solve is tighter than the sampling solve above (the tolerances are
# printed below): a sample is rounded to 8 bits at the end, while a likelihood's error goes straight into the
# bpd (Exercise 5 asks in which direction, and how to check). The $\pm$ is the standard error of the mean over
# the images, each with its own noise and probe: it holds both the images' own spread in bpd and the noise of
# the estimate. In quick mode this cell runs on a few test images, which say little about the whole test set
# (the next section compares the shipped model's full-test-set number, and the multi-scale flow on the same
# few images); in full mode it runs on all 10,000, hours on a CPU.

# %%
ode_images = test_set.images[:settings.ode_images]
where = ("all 10,000 test images" if settings.ode_images is None
         else f"a slice of the first {len(ode_images)} test images (quick mode)")
bpd, batch_s = [], []
with torch.no_grad():
    for b in config.progress_bar(ode_images.split(16), "bpd through the ODE"):
        start = time.perf_counter()
        bpd.append(flowmatch.bits_per_dim(b.to(device)).cpu())
        batch_s.append(time.perf_counter() - start)
bpd, ode_s = torch.cat(bpd), sum(batch_s)
stderr = bpd.std().item() / math.sqrt(len(bpd))
print(f"bpd on {where}: {bpd.mean():.3f} ± {stderr:.3f} (standard error over images and probes), "
      f"{flowmatch.last_nfe} evaluations in the last batch's solve, {1000 * ode_s / len(bpd):.0f} ms per image")
print(f"solver {flowmatch.method}: likelihood rtol = atol = {flowmatch.rtol:g}; sampling rtol = atol = "
      f"{flowmatch.sample_rtol:g}")

# %% [markdown]
# ### In the results table
#
# Every shipped model, each on the full test set from its results JSON, which `python -m flowbook.evaluate
# --checkpoint checkpoints/<model>.pt` writes: the flows with 8 importance samples, the flow-matching model
# with one dequantization sample and one Hutchinson probe per image (an unbiased estimate of the looser
# one-sample bound; it comes from an offline evaluation, a run of hours on a CPU). The shipped models
# include
# chapter 8's three transformer flows: `tarflow`; `tarflow_vardeq`, the same transformer blocks behind a
# learned dequantization; and `tarflow_noise`, the same blocks with the pixels scaled linearly to $[-1, 1]$
# instead of the logit, trained on images with Gaussian noise added, whose bpd is a valid bound on MNIST's but
# a poor one, because the model spreads density outside the pixels' bins (chapter 8 explains why). The last column is computed here: the share of each model's samples at temperature 1.0 that the
# classifier recognises (for `tarflow_noise`, after a denoising step that chapter 8 derives).

# %%
results = load_results()
rows = []
for name, r in results.items():
    if name == "flowmatch":
        score = adaptive_score  # its samples above, at temperature 1.0
    else:  # at temperature 1.0; a model trained on noisy images after its Tweedie step (chapter 8)
        model, _, _ = load_trained(name, device=device, progress=False)
        score = recognisability(clf, sample_grid(model, settings.judged_samples, temperature=1.0, seed=2))
    rows.append([name, f"{r['test_bpd']:.3f}", f"{r['eval_images']['test']:,}", f"{r['parameters']:,}",
                 f"{int(r['images_seen']):,}", f"{score:.2f}"])
if "flowmatch" not in results:
    seen = read_checkpoint(shipped)["meta"]["total"]["images_seen"] if shipped is not None else None
    rows.append(["flowmatch", "not evaluated yet", "-", f"{num_parameters(flowmatch):,}",
                 "-" if seen is None else f"{int(seen):,}", f"{adaptive_score:.2f}"])
rows.append(["real test digits", "-", "-", "-", "-", f"{real:.2f}"])
print(tabulate(rows, ["model", "test bpd", "test images", "parameters", "training images",
                      f"recognisable (of {settings.judged_samples})"], disable_numparse=True))  # keeps 0.60

# %% [markdown]
# The test bpd column is not quite one measurement: the flows' bound combines 8 importance samples per image
# (a tighter bound, chapter 2), the flow-matching model's takes one. The validation bpd of the multi-scale flow
# and of the flow-matching model, in their results JSONs, takes one sample each (on all 10,000 validation
# images and on the first 512 respectively); and on the test images of the bpd cell above (a few, in quick
# mode), both models are computed here with one sample:

# %%
ms = results["multiscale"]
assert ms["val_importance_samples"] == 1, "the sentence below says one sample"
multiscale, _, _ = load_trained("multiscale", device=device)
torch.manual_seed(0)
with torch.no_grad():  # one dequantization sample per image, as the flow-matching model's
    ms_here = torch.cat([multiscale.bits_per_dim(b.to(device)).cpu() for b in ode_images.split(256)])
if "flowmatch" in results:
    fm = results["flowmatch"]
    gap = fm["test_bpd"] - ms["test_bpd"]
    solve = fm["likelihood"]
    assert solve["rtol"] == solve["atol"], "the sentence below names one tolerance"
    tol = f"{solve['rtol']:g}".replace("e-0", "e-")  # 1e-5, not 1e-05
    comparison = (f"On all {fm['eval_images']['test']:,} test images the flow-matching model has "
                  f"{fm['test_bpd']:.3f} ± {fm['test_bpd_stderr']:.3f} bpd ({solve['method']}, rtol = atol = "
                  f"{tol}, one {solve['probe'].capitalize()} probe per image), {abs(gap):.3f} "
                  f"{'above' if gap > 0 else 'below'} the multi-scale flow's {ms['test_bpd']:.3f}. With one sample on "
                  f"both sides, on validation images: {fm['val_bpd']:.3f} (the first {fm['eval_images']['val']:,}) "
                  f"against {ms['val_bpd']:.3f} (all {ms['eval_images']['val']:,}).")
else:
    comparison = ("The flow-matching model's results JSON is not there yet (its evaluation is a run of hours on a "
                  f"CPU): the bpd cell above, on {where}, is this chapter's measurement of its bpd, against the multi-scale "
                  f"flow's {ms['test_bpd']:.3f} on the full test set (8 samples) and {ms['val_bpd']:.3f} on the "
                  "validation set (one sample).")
diff = bpd - ms_here  # paired by image
comparison += (f" On the {len(ode_images):,} test images of the bpd cell above, one sample each: "
               f"{bpd.mean():.3f} for the flow-matching model against {ms_here.mean():.3f} for the multi-scale flow, "
               f"a difference of {diff.mean():.3f} ± {diff.std().item() / math.sqrt(len(diff)):.3f} (standard error, "
               "paired by image).")
Markdown(comparison)

# %% [markdown]
# What a likelihood (of the first batch of the bpd computation above) and a sample of 16 images cost, the
# multi-scale flow against the flow-matching model:

# %%
n_ll = len(ode_images.split(16)[0])  # the flow-matching likelihood: the first batch of the bpd cell
batch = test_set.images[:n_ll].to(device)
with torch.no_grad():
    start = time.perf_counter()
    multiscale.log_likelihood(batch)
    ms_ll = time.perf_counter() - start
    start = time.perf_counter()
    multiscale.sample(multiscale.latent_shape(16))
    ms_sample = time.perf_counter() - start
    start = time.perf_counter()
    flowmatch.sample(flowmatch.latent_shape(16))
    fm_sample = time.perf_counter() - start
print(tabulate([["multiscale", f"{1000 * ms_ll:.0f}", f"{1000 * ms_sample:.0f}"],
                ["flowmatch", f"{1000 * batch_s[0]:.0f}",
                 f"{1000 * fm_sample:.0f} ({flowmatch.last_nfe} evaluations)"]],
               ["model", f"likelihood of {n_ll} images (ms)", "16 samples (ms)"]))
print(f"on {torch.get_num_threads()} CPU threads" if device.type == "cpu" else f"on {torch.cuda.get_device_name()}")
print(f"the flow-matching model took {batch_s[0] / ms_ll:.0f}x the multi-scale flow's time for a likelihood and "
      f"{fm_sample / ms_sample:.0f}x for 16 samples (the multi-scale likelihood with one dequantization sample, "
      "as the flow-matching one; the table's bpd takes 8)")

# %% [markdown]
# A coupling flow computes a likelihood in one pass through its layers; the flow-matching model solves an ODE,
# with the number of network evaluations that the bpd cell printed for its last batch, each followed by a
# backward pass for the divergence (the evaluations in the table above are the sampling solve's, at its
# looser tolerance). That is why a flow-matching model's bpd on the whole test set comes from an offline
# evaluation.
#
# ## 6. Where this leads
#
# - **Diffusion models** are continuous flows too. Song et al. (2021) showed that every diffusion process has
#   a *probability-flow ODE* with the same marginals, whose velocity is built from the learned score; its
#   likelihood is computed exactly as in section 5. Flow matching with a Gaussian path and diffusion training
#   are two parametrisations of nearly the same regression.
# - **Why flow-matching papers rarely report likelihoods**: each costs an ODE solve with a divergence, the
#   result is an estimate (a probe and a tolerance), and it depends on dequantization choices; sample
#   metrics are cheaper and what image generation is judged on. The likelihood is there, though, as section
#   5 computed.
# - **Chapter 8** goes back to discrete layers with a single-pass likelihood, and builds a transformer flow.
#
# ## Summary
#
# - A residual step has log-determinant $h \operatorname{tr} J + O(h^2)$; in the limit, the steps from $t = 0$
#   to $1$ have log-determinant $\int_0^1 \operatorname{div} v\, dt$ along the path (measured: first-order
#   convergence), and $f$, from data at $t = 1$ to latent at $t = 0$, has $-\int_0^1 \operatorname{div} v\, dt$.
# - Maximum likelihood trains a continuous flow through an ODE solver, whose cost grew as the flow learned
#   (measured on the two moons).
# - Hutchinson's estimator gives an unbiased divergence from one vector-Jacobian product; Rademacher probes
#   have less variance than Gaussian ones. A log-likelihood computed with it is an unbiased estimate of the
#   exact one, so its average over images and dequantization noise estimates the one-sample bound; but
#   importance sampling (a log-mean-exp) over such estimates would overstate the likelihood.
# - Flow matching regresses $v_\theta$ on the straight lines' velocities $x_1 - x_0$, which has the gradient
#   of regressing on the true marginal field: no ODE during training.
# - The flow-matching model of MNIST has a likelihood in the same units as every flow here, at the price of
#   an ODE solve per likelihood and per sample.
#
# ## Exercises
#
# ### Exercise 1: Hutchinson's estimator (implementation, 3 points, about 20 minutes)
#
# Write `hutchinson_divergence(velocity, x, t, num_probes)`: an estimate of $\operatorname{div} v(x, t)$ for
# each of the $B$ points of `x` ([B, ...]), averaged over `num_probes` Rademacher probes (entries $\pm 1$,
# drawn with `torch.randint`), each used through one vector-Jacobian product (`torch.autograd.grad` with
# `grad_outputs`). Return a tensor [B] without a graph. The checker switches off flowbook's estimators and
# `torch.autograd.functional.jacobian`, compares your mean with the exact divergence over many probes, and
# checks that your spread shrinks as $1/\sqrt{\text{num\_probes}}$.

# %% tags=["student"]
def hutchinson_divergence(velocity, x, t, num_probes=1):
    """velocity(x [B, ...], t [B]) -> [B, ...]; x [B, ...], t [B] -> [B] estimates of div v, averaged over probes."""
    raise NotImplementedError("Exercise 1: implement hutchinson_divergence")


# %% jupyter={"source_hidden": true} tags=["solution"]
def hutchinson_divergence(velocity, x, t, num_probes=1):
    """velocity(x [B, ...], t [B]) -> [B, ...]; x [B, ...], t [B] -> [B] estimates of div v, averaged over probes."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        v = velocity(x, t)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for _ in range(num_probes):
            eps = torch.randint(0, 2, x.shape, device=x.device).to(x.dtype) * 2 - 1
            vjp = torch.autograd.grad(v, x, eps, retain_graph=True)[0]  # eps^T dv/dx
            total = total + (vjp * eps).flatten(1).sum(dim=1)
    return (total / num_probes).detach()


# %%
exercises.check_hutchinson_divergence(hutchinson_divergence)

# %% [markdown]
# ### Exercise 2: the conditional flow-matching loss (implementation, 3 points, about 20 minutes)
#
# Write `cfm_loss(velocity, x1)` for data `x1` [B, ...]: draw $t \sim U[0, 1]$ (one per example) and
# $x_0 \sim \mathcal{N}(0, I)$, form $x_t$ on the linear path from $x_0$ at $t=0$ to $x_1$ at $t=1$, and
# return the mean over the batch and all dimensions of $\|v(x_t, t) - u_t\|^2$ with the path's velocity
# $u_t$, calling `velocity` once, on the whole batch. `x1` may be points [B, D] or images [B, C, H, W]: $t$
# [B] has to broadcast over all of x1's dimensions. The checker switches off `flowbook.flowmatch.LinearPath`, feeds your function data clustered near 6
# in every coordinate (far from the noise $x_0$, near 0, so that the two cannot be mistaken for each other),
# and reconstructs from what your loss passed to `velocity` whether $t$, $x_0$, the path and the
# target are right.

# %% tags=["student"]
def cfm_loss(velocity, x1):
    """velocity(x [B, ...], t [B]) -> [B, ...]; x1 [B, ...] data -> a scalar tensor."""
    raise NotImplementedError("Exercise 2: implement cfm_loss")


# %% jupyter={"source_hidden": true} tags=["solution"]
def cfm_loss(velocity, x1):
    """velocity(x [B, ...], t [B]) -> [B, ...]; x1 [B, ...] data -> a scalar tensor."""
    t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype)
    x0 = torch.randn_like(x1)
    tb = t.view(-1, *[1] * (x1.dim() - 1))
    xt = (1 - tb) * x0 + tb * x1
    return (velocity(xt, t) - (x1 - x0)).pow(2).mean()


# %%
exercises.check_cfm_loss(cfm_loss)

# %% [markdown]
# ### Exercise 3: an Euler sampler (implementation, 2 points, about 15 minutes)
#
# Write `euler_sample(velocity, z, steps)`: solve $dx/dt = v(x, t)$ from $x(0) = z$ at $t = 0$ to $t = 1$ with
# `steps` equal Euler steps, evaluating $v$ at the start of each step (pass the time as a tensor [B] in z's
# dtype), and return $x(1)$ without changing `z` in place. The checker switches
# off `flowbook.ode.integrate` and torchdiffeq, and compares with a reference solution on a field whose
# velocity depends on $t$ (so the times you pass matter).

# %% tags=["student"]
def euler_sample(velocity, z, steps):
    """velocity(x [B, ...], t [B]) -> [B, ...]; z [B, ...] at t = 0 -> x [B, ...] at t = 1."""
    raise NotImplementedError("Exercise 3: implement euler_sample")


# %% jupyter={"source_hidden": true} tags=["solution"]
def euler_sample(velocity, z, steps):
    """velocity(x [B, ...], t [B]) -> [B, ...]; z [B, ...] at t = 0 -> x [B, ...] at t = 1."""
    x, h = z, 1.0 / steps
    for k in range(steps):
        t = torch.full((x.shape[0],), k * h, dtype=x.dtype, device=x.device)
        x = x + h * velocity(x, t)
    return x


# %%
exercises.check_euler_sample(euler_sample)

# %% [markdown]
# ### Exercise 4: why is flow matching simulation-free? (conceptual, 1 point, about 10 minutes)
#
# Maximum likelihood (section 2) solves the ODE at every training step; flow matching (section 4) never
# does. Say exactly which quantity each loss needs that forces, or avoids, the solve, and what flow matching
# gives up in exchange (hint: what does its loss say about the likelihood of the trained model?).

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** The likelihood of $x$ needs $z = x(0)$ and $\int_0^1 \operatorname{div} v\,dt$ along the solution
# through $x$: both exist only after solving the ODE, so every maximum-likelihood step solves it (and
# backpropagates through it). The flow-matching loss needs $v_\theta$ only at points $x_t$ drawn directly from
# the path, $x_t = (1-t)x_0 + t x_1$, with a target $x_1 - x_0$ known in closed form: no trajectory of
# $v_\theta$ is ever followed. In exchange the loss says nothing directly about the likelihood: a small
# regression error can still move the ODE's end points (errors add up along the trajectory), and the
# likelihood is never optimised; it has to be computed afterwards, through the ODE, as in section 5.

# %% [markdown]
# ### Exercise 5: what does the solver tolerance do to a reported bpd? (conceptual, 2 points, about 15 minutes)
#
# A paper reports 1.05 bpd for a flow-matching model, computed with `rtol = atol = 1e-3`. Which parts of the
# computation does a loose tolerance change, in which direction can the number move, and how would you show
# that your own number is not an artefact of the solver? (Consider the end point $z = x(0)$, the integral of the
# divergence, and what happens when you make the tolerance 10 times tighter. Hint: an adaptive solver keeps the error of each
# of its steps near `rtol` times the size of the state plus `atol`; the errors of many steps add up, and
# nothing fixes their sign.)

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** The tolerance controls the local error of both the path and the accumulated divergence, so
# both $\log \mathcal{N}(x(0))$ and $\int \operatorname{div} v\,dt$ carry solver error; neither has a sign
# that is guaranteed, so the bpd can move up or down, and a loose tolerance can make a model look better than
# it is. The reported number is then a property of model *and* solver. To show that yours is not an
# artefact: recompute it at tolerances 10 times tighter, and 100 times, on the same images and probes (same seeds)
# until the change is far below the estimator's standard error; report the tolerance, the number of
# function evaluations, and the standard error next to the bpd (section 5's bpd cell prints all three).

# %% [markdown]
# ## References
#
# - R. T. Q. Chen, Y. Rubanova, J. Bettencourt, D. Duvenaud. *Neural ordinary differential equations.*
#   NeurIPS 2018.
# - W. Grathwohl, R. T. Q. Chen, J. Bettencourt, I. Sutskever, D. Duvenaud. *FFJORD: Free-form continuous
#   dynamics for scalable reversible generative models.* ICLR 2019.
# - M. F. Hutchinson. *A stochastic estimator of the trace of the influence matrix for Laplacian smoothing
#   splines.* Communications in Statistics, 1989.
# - Y. Lipman, R. T. Q. Chen, H. Ben-Hamu, M. Nickel, M. Le. *Flow matching for generative modeling.* ICLR 2023.
# - X. Liu, C. Gong, Q. Liu. *Flow straight and fast: learning to generate and transfer data with rectified
#   flow.* ICLR 2023.
# - Y. Song, J. Sohl-Dickstein, D. P. Kingma, A. Kumar, S. Ermon, B. Poole. *Score-based generative modeling
#   through stochastic differential equations.* ICLR 2021.
# - A. Tong, N. Malkin, G. Huguet, Y. Zhang, J. Rector-Brooks, K. Fatras, G. Wolf, Y. Bengio. *Improving and
#   generalizing flow-based generative models with minibatch optimal transport.* TMLR 2024 (torchcfm).
# - C. Finlay, J.-H. Jacobsen, L. Nurbekyan, A. Oberman. *How to train your neural ODE: the world of Jacobian
#   and kinetic regularization.* ICML 2020.
# - R. T. Q. Chen. *torchdiffeq*, the ODE solvers used here.

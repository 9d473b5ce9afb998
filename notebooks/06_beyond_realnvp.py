# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 6: Beyond RealNVP: Glow's layers, and what a likelihood does not tell you
#
# The reference tutorial stops at RealNVP. This chapter goes two steps further. First, Glow (Kingma and
# Dhariwal, 2018) replaced RealNVP's fixed alternation of masks with two learned layers, activation
# normalisation and an invertible 1x1 convolution; we build them, check them like every other layer, and
# compare a Glow-style flow, trained with the same recipe, with the multi-scale flow. Second, a flow gives exact
# likelihoods, and it is tempting to use them to tell digits from anything else. We test that on inputs made
# from MNIST itself and find where it fails, and why a test for *typical* likelihoods works better.
#
# **You will learn**
# - ActNorm: a per-channel affine layer with a data-dependent initialisation, and its log-determinant;
# - the invertible 1x1 convolution, its log-determinant $H W \log|\det W|$, and the LU trick that makes it
#   cheap;
# - how a Glow-style flow compares with the multi-scale RealNVP flow at the same size;
# - which out-of-distribution inputs a flow trained on MNIST finds *more* likely than digits, and why;
# - typicality: where real digits' latents lie, what the most likely latent decodes to, and a test that
#   separates better.
#
# Every number and picture below is computed by the cells of this notebook, from the trained checkpoints in
# `checkpoints/` where they exist, else from quick-mode models (the first cell says which).

# %%
import json
import math

import torch
from IPython.display import Markdown
from tabulate import tabulate
from torch.autograd.functional import jacobian

from flowbook import config, exercises, ood, viz
from flowbook.data import load_mnist
from flowbook.evaluate import bpd_per_image, inference_time
from flowbook.layers import ActNorm, GlowStep, InvConv1x1
from flowbook.models import ALL_MODELS, create_flow, num_parameters
from flowbook.pretrained import checkpoint_file, load_trained

settings = config.settings()
device = config.get_device()
train_set, val_set, test_set = load_mnist()
models, sources = {}, {}
for name in ("multiscale", "glow"):
    models[name], sources[name], _ = load_trained(name, device=device)
    print(f"{name:10s} {sources[name]}")

# %% [markdown]
# ## ActNorm: a normalisation that is a flow layer
#
# Batch normalisation is not a fixed function of one input: its output depends on the rest of the batch, so
# it has no per-example inverse and log-determinant. Glow's **activation normalisation** is a plain
# per-channel affine map with learned parameters $b_c$ and $\log s_c$:
#
# $$z'_{c,h,w} = (z_{c,h,w} + b_c)\, e^{\log s_c}.$$
#
# Its Jacobian is diagonal; the entry for channel $c$ is $e^{\log s_c}$ and appears once for each of the
# $H \cdot W$ pixels, so
#
# $$\log|\det J| = H \cdot W \sum_c \log s_c,$$
#
# the one term ActNorm adds to `ldj` (and subtracts in reverse, $z = z' e^{-\log s} - b$). What makes it a
# normalisation is the **data-dependent initialisation**: on the first training batch, $b_c$ is set to minus
# the channel's mean and $\log s_c$ to minus the log of its standard deviation (both over batch, height and
# width), so that the first batch leaves the layer with zero mean and unit variance per channel. After that
# they are trained like any other weight.

# %%
torch.manual_seed(0)
batch = torch.randn(32, 4, 7, 7) * torch.tensor([0.5, 1.0, 2.0, 4.0]).view(1, 4, 1, 1) + 3.0
actnorm = ActNorm(4).train()
out, ldj = actnorm(batch, torch.zeros(32))
per_channel = out.detach().transpose(0, 1).reshape(4, -1)
rows = [[c, f"{batch[:, c].mean():.3f}", f"{batch[:, c].std():.3f}", f"{per_channel[c].mean():.1e}",
         f"{per_channel[c].std():.4f}"] for c in range(4)]
print(tabulate(rows, headers=["channel", "mean in", "std in", "mean out", "std out"]))
assert per_channel.mean(1).abs().max() < 1e-5 and (per_channel.std(1) - 1).abs().max() < 1e-4
assert torch.allclose(ldj, torch.full((32,), 7 * 7 * actnorm.log_scale.sum().item()))

# %% [markdown]
# The initialisation must happen exactly once. flowbook keeps a buffer `initialized` in the layer's state,
# so a model saved after training and loaded again is not re-initialised by the next batch it sees (a bug
# that other libraries have had: a reloaded model that silently forgets its trained ActNorm parameters). A
# second, very different batch leaves the parameters alone, and so does a reloaded copy:

# %%
loc_before = actnorm.loc.detach().clone()
actnorm(batch * 10 + 5, torch.zeros(32))
reloaded = ActNorm(4).train()
reloaded.load_state_dict(actnorm.state_dict())
reloaded(batch * 10 + 5, torch.zeros(32))
print("initialized buffer saved in the state dict:", "initialized" in actnorm.state_dict())
assert torch.equal(actnorm.loc, loc_before) and torch.equal(reloaded.loc, loc_before)
print("a second batch and a reloaded copy keep the parameters of the first initialisation")

# %% [markdown]
# ## The invertible 1x1 convolution
#
# RealNVP's channel couplings always keep the same channels and transform the others, alternating between
# two fixed halves. Glow lets the flow *learn* how to mix the channels before each coupling: a $1 \times 1$
# convolution with a $C \times C$ matrix $W$, applied to the channel vector of every pixel, $z'_{:,h,w} = W
# z_{:,h,w}$. The Jacobian is block diagonal with $H \cdot W$ copies of $W$, so
#
# $$\log|\det J| = H \cdot W \cdot \log|\det W|.$$
#
# A determinant costs $O(C^3)$. Glow parametrises $W$ by its LU decomposition instead,
#
# $$W = P\, L\, \big(U + \mathrm{diag}(\mathrm{sign}(s)\, e^{\log|s|})\big),$$
#
# with a fixed permutation $P$, a unit lower triangular $L$ and a strictly upper triangular $U$. The
# determinant of a triangular matrix is the product of its diagonal, $\det P = \pm 1$ and $\det L = 1$, so
# $\log|\det W| = \sum_i \log|s_i|$, in $O(C)$. $W$ starts as a random rotation ($\log|\det W| = 0$). We
# check both versions on perturbed weights: the inverse, and the log-determinant against autograd in float64.

# %%
def layer_checks(layer, z):
    """(max |reverse(forward(z)) - z|, |ldj - log|det J| from autograd|) for one float64 example z [1, C, H, W]."""
    zero = torch.zeros(1, dtype=torch.float64)
    y, ldj = layer(z, zero)
    back, _ = layer(y, ldj, reverse=True)
    jac = jacobian(lambda v: layer(v, zero)[0].flatten(), z).reshape(z.numel(), z.numel())
    return (back - z).abs().max().item(), (ldj - torch.linalg.slogdet(jac)[1]).abs().item()


torch.manual_seed(0)
z = torch.randn(1, 4, 3, 3, dtype=torch.float64)
checks = {}
for name, layer in {"ActNorm": ActNorm(4), "1x1 conv (plain)": InvConv1x1(4, lu=False),
                    "1x1 conv (LU)": InvConv1x1(4, lu=True), "Glow step": GlowStep(4, c_hidden=8)}.items():
    layer = layer.double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    checks[name] = layer_checks(layer, z)
print(tabulate([[n, f"{a:.1e}", f"{b:.1e}"] for n, (a, b) in checks.items()],
               headers=["layer", "inverse error", "ldj error vs autograd"]))
assert all(a < 1e-10 and b < 1e-8 for a, b in checks.values())

# %% [markdown]
# The LU parametrisation's $\sum_i \log|s_i|$ is the log-determinant of its $W$, which `slogdet` computes the
# expensive way:

# %%
lu = InvConv1x1(16, lu=True, generator=torch.Generator().manual_seed(1)).double()
with torch.no_grad():
    for p in (lu.lower, lu.upper, lu.log_s):
        p.add_(0.2 * torch.randn_like(p))
    w, logdet_lu = lu.weight_and_logdet()
    logdet_plain = torch.linalg.slogdet(w)[1]
print(f"16 channels: sum(log|s|) = {logdet_lu:.12f}, slogdet(W) = {logdet_plain:.12f}")
assert torch.allclose(logdet_lu, logdet_plain, atol=1e-10)

# %% [markdown]
# ## A Glow-style flow for MNIST
#
# A **Glow step** is ActNorm, an invertible 1x1 convolution (LU) and an affine coupling that transforms half
# of the channels, the half the learned convolution has mixed into place. `create_flow("glow")` keeps the
# multi-scale flow's skeleton (variational dequantization, two checkerboard couplings at full resolution,
# squeeze, split, squeeze) and replaces each channel coupling by a Glow step. Channel couplings cannot run on
# one channel, so the two full-resolution layers stay checkerboard couplings. The two models side by side:

# %%
fresh = {name: create_flow(name) for name in ("multiscale", "glow")}
viz.draw_architectures(fresh);

# %%
extra = num_parameters(fresh["glow"]) - num_parameters(fresh["multiscale"])
Markdown(f"The Glow-style flow has {num_parameters(fresh['glow']):,} parameters, {extra:,} more than the multi-scale "
         f"flow's {num_parameters(fresh['multiscale']):,}: the ActNorm parameters and the 1x1 convolutions' "
         "matrices. Both have the latent shape printed above each graph.")

# %% [markdown]
# ## Did the Glow layers help?
#
# All four models were trained by `python -m flowbook.train` with the same recipe (the commands and budgets
# are in `docs/training.md`). The table reads each shipped model's results JSON, written by
# `python -m flowbook.evaluate`: test bpd with importance sampling on the test images it lists, the epochs
# and images the model was trained on, and the time for the likelihood of 64 images measured here.

# %%
def shipped_results(name):
    """The results JSON next to a shipped checkpoint, or None."""
    path = checkpoint_file(name)
    return json.loads(path.with_suffix(".json").read_text()) if path and path.with_suffix(".json").exists() else None


table, results = [], {}
probe = test_set.images[:64]
for name in ALL_MODELS:
    model, source, _ = (models[name], sources[name], None) if name in models else load_trained(name, device=device)
    res = results[name] = shipped_results(name)
    ms = 1000 * inference_time(model, probe.to(device), repeats=3)
    if res is None:
        table.append([name, "no results JSON", "", "", "", f"{num_parameters(model):,}", f"{ms:.0f}"])
        continue
    test_images = (res.get("eval_images") or {}).get("test", len(test_set))
    table.append([name, f"{res['test_bpd']:.3f}", f"{test_images:,}", res["importance_samples"],
                  f"{res['epochs']} / {res['images_seen']:,}", f"{num_parameters(model):,}", f"{ms:.0f}"])
print(tabulate(table, headers=["model", "test bpd", "test images", "K", "epochs / images seen", "parameters",
                               "likelihood of 64 (ms)"]))

# %%
def verdict(results):
    glow, ms = results.get("glow"), results.get("multiscale")
    if glow is None or ms is None:
        return ("Without results for both the Glow-style and the multi-scale flow, this notebook cannot compare them: "
                "train and evaluate both (`docs/training.md`).")
    diff = ms["test_bpd"] - glow["test_bpd"]
    better = "lower (better)" if diff > 0 else "higher (worse)"
    same_budget = glow["images_seen"] == ms["images_seen"]
    budget = ("the same number of training images" if same_budget else
              f"{glow['images_seen']:,} training images against the multi-scale flow's {ms['images_seen']:,}")
    if not same_budget:
        judged = (("The two are about level. " if abs(diff) <= 0.005 else "")
                  + "The budgets differ, so this comparison mixes the layers with the training time; "
                  "`docs/training.md` compares the two runs after the same number of images. ")
    else:
        judged = ("At this budget the Glow layers helped. " if diff > 0.005 else
                  "At this budget the Glow layers made no clear difference. " if abs(diff) <= 0.005 else
                  "At this budget the Glow layers did not help. ")
    return (f"The Glow-style flow's test bpd, {glow['test_bpd']:.3f}, is {abs(diff):.3f} {better} than the multi-scale "
            f"flow's {ms['test_bpd']:.3f}, after {budget}. " + judged
            + "Budgets this short say little about the architectures at convergence: Glow's advantage in the paper "
            "came from much deeper flows (32 steps per scale) trained far longer.")


Markdown(verdict(results))

# %% [markdown]
# Samples of both at temperature 0.7, from the same seed:

# %%
for name in ("multiscale", "glow"):
    torch.manual_seed(0)
    viz.show_imgs(models[name].sample(models[name].latent_shape(16), temperature=0.7),
                  f"{name}: samples at temperature 0.7 ({sources[name].split(' (')[0]})")

# %% [markdown]
# ## What the likelihood does not tell you
#
# A flow gives every input an exact (bound on its) likelihood. So, one might hope, an input that looks nothing
# like a digit gets a low likelihood, and we could flag it. Nalisnick et al. (2019) found the opposite for
# flows trained on natural images: a flow trained on CIFAR-10 gives the digits of SVHN a *higher* likelihood
# than CIFAR's own test images. We can test the same on MNIST with inputs made from MNIST itself:

# %%
n_ood = settings.eval_images or 2000
variants = ood.ood_variants(test_set.images[:n_ood])
viz.show_imgs(torch.cat([v[:1] for v in variants.values()]),
              "One example of each input: " + ", ".join(variants), row_size=len(variants));

# %% [markdown]
# We score each under the trained multi-scale flow (bpd with one dequantization sample; lower bpd means a
# higher likelihood):

# %%
flow = models["multiscale"]
torch.manual_seed(0)
bpd = {name: bpd_per_image(flow, imgs, importance_samples=1, progress=settings.progress, desc=name)
       for name, imgs in variants.items()}
digits_median = bpd["digits"].median().item()
rows = [[name, f"{b.mean():.2f}", f"{b.median():.2f}", f"{(b < digits_median).float().mean():.0%}"]
        for name, b in bpd.items()]
print(tabulate(rows, headers=["input", "mean bpd", "median bpd", "below the digits' median"]))
assert all(torch.isfinite(b).all() for b in bpd.values()), "no NaN is dropped: every input has a finite bpd"

# %%
likelier = [n for n, b in bpd.items() if n != "digits" and b.median() < digits_median]
viz.plot_histogram({n: b.clamp(max=8) for n, b in bpd.items() if n in ("digits", *likelier, "inverted", "shifted")},
                   bins=80, xlabel="bits per dimension (clipped at 8)",
                   title="bpd under the multi-scale flow: real digits against inputs made from them");

# %%
def ood_sentence(bpd, likelier):
    med = {n: b.median().item() for n, b in bpd.items()}
    if not likelier:
        return (f"Under this model no variant has a lower median bpd than the digits' {med['digits']:.2f}; the "
                "model on screen is not the trained one, or it separates these inputs by likelihood alone.")
    names = " and ".join(f"{n} ({med[n]:.2f})" for n in likelier)
    return (f"Under the multi-scale flow on screen, the {names} inputs get a *lower* median bpd, i.e. a higher "
            f"likelihood, than the real test digits ({med['digits']:.2f}), while noise ({med['uniform noise']:.2f}) "
            f"and inverted digits ({med['inverted']:.2f}) are far less likely.")


Markdown(ood_sentence(bpd, likelier))

# %% [markdown]
# **Why.** A coupling flow's likelihood is dominated by local pixel statistics, not by what the image shows
# (Kirichenko et al., 2020, show that coupling layers learn to predict each pixel from its neighbours). On
# MNIST, most of the 784 pixels of a digit are black background, and the flow has learned that a black pixel
# next to black pixels is nearly certain: its dequantized value is squeezed into a tiny interval, which costs
# almost nothing. An image that is *all* background is the extreme case: every pixel is cheap. A smooth or
# constant image contains no strokes, the expensive part of a digit. So "high likelihood" means "locally
# smooth like MNIST's background", not "a digit". Inverted digits fail the other way: a white background is
# the costliest thing this model knows.
#
# ## Typicality
#
# The same effect shows inside the model. In $D$ dimensions a standard normal sample has
# $\|z\|^2 \sim \chi^2_D$, so $\|z\| \approx \sqrt{D}$ with a spread of about $1/\sqrt 2$: almost all the
# mass lies in a thin shell, far from the mode $z = 0$, which has the highest density but is itself
# *atypical*. Where do the latents of test digits lie?

# %%
n_latent = min(len(test_set), settings.eval_images or 2000)
torch.manual_seed(0)
norms_digits = ood.latent_norms(flow, test_set.images[:n_latent])
latent_dims = math.prod(flow.latent_shape(1)[1:])
norms_prior = torch.randn(n_latent, latent_dims).norm(dim=1)
viz.plot_histogram({"test digits f(x)": norms_digits, "prior samples z ~ N(0, I)": norms_prior}, bins=60,
                   xlabel=f"norm of the final latent (D = {latent_dims}; the mode has norm 0)",
                   title="Latent norms under the multi-scale flow");

# %%
Markdown(f"The final latent has $D = {latent_dims}$ dimensions ($\\sqrt D = {math.sqrt(latent_dims):.1f}$). Prior "
         f"samples have norms {norms_prior.mean():.1f} ± {norms_prior.std():.1f}; the test digits' latents have "
         f"{norms_digits.mean():.1f} ± {norms_digits.std():.1f}. The mode, at norm 0, is "
         f"{norms_digits.min():.1f} or more away from every test digit's latent shown here.")

# %% [markdown]
# What image is the mode? Sampling at temperature $T$ scales every latent, the split-off halves included,
# by $T$; at $T = 0$ the flow decodes the mode itself:

# %%
temperatures = (0.0, 0.3, 0.5, 0.7, 1.0)
rows = []
for t in temperatures:
    torch.manual_seed(1)
    rows.append(flow.sample(flow.latent_shape(8), temperature=t))
grid = torch.cat(rows)
viz.show_imgs(grid, "Multi-scale flow, one row per temperature: " + ", ".join(map(str, temperatures)), row_size=8);

# %%
mode_img = rows[0][:1]  # every sample at T = 0 is this one image
torch.manual_seed(0)
mode_bpd = bpd_per_image(flow, mode_img, importance_samples=1).item()
black_bpd = bpd["all black"].median().item()
lit = [(r.float() > 64).float().mean().item() for r in rows]
digits_lit = (test_set.images[:1000].float() > 64).float().mean().item()
Markdown(f"At $T = 0$ all eight samples are one image, the decoding of the mode $z = 0$: "
         + ("a blank or nearly blank image" if lit[0] < 0.02 else "a digit-like image, not a blank one")
         + f", with {lit[0]:.1%} of its pixels above 64 (test digits: {digits_lit:.1%}). Its bpd is {mode_bpd:.2f}; the "
         f"all-black image's is {black_bpd:.2f}. "
         + ("So the most likely latent does not decode to the most likely image. " if mode_bpd > black_bpd else "")
         + "From $T = 0$ to $1$ the share of pixels above 64 goes "
         + ", ".join(f"{v:.1%}" for v in lit) + ".")

# %% [markdown]
# Why is the decoded mode not the most likely image? The density of an image is
# $\log p(x) = \log \mathcal N(f(x)) + \log|\det J_f(x)|$: the prior term is largest at $f(x) = 0$, but the
# volume term can be far larger elsewhere. Where the numbers above show the all-black image scoring better
# than the decoded mode, that is the volume term at work: every pixel of a black image is predictable from its
# neighbours, and the flow has learned to contract such regions, although their latents are no mode. Density
# in the latent and density in the image are different things, and neither says which images are *typical*.
#
# **A typicality test.** Instead of asking whether an input's bpd is *low*, ask whether it is *typical*:
# score an input by how far its bpd is from the mean bpd of held-out digits, $|\mathrm{bpd}(x) -
# \overline{\mathrm{bpd}}_{\text{val}}|$ (a one-sample version of the test of Nalisnick et al., 2019b). We
# compare both scores by the AUC: the probability that an out-of-distribution input scores higher than a
# test digit (1 separates perfectly, 0.5 is chance, below 0.5 ranks them the wrong way).

# %%
torch.manual_seed(1)
typical = bpd_per_image(flow, val_set.images[:n_ood], importance_samples=1).mean()
auc_rows, aucs = [], {}
for name, b in bpd.items():
    if name == "digits":
        continue
    aucs[name] = (ood.separation_auc(bpd["digits"], b),
                  ood.separation_auc((bpd["digits"] - typical).abs(), (b - typical).abs()))
    auc_rows.append([name, f"{aucs[name][0]:.3f}", f"{aucs[name][1]:.3f}"])
print(f"typical bpd of {n_ood} validation digits: {typical:.3f}")
print(tabulate(auc_rows, headers=["input", "AUC: high bpd", "AUC: |bpd - typical|"]))

# %%
missed = [n for n, (a, _) in aucs.items() if a < 0.5]
caught = [n for n in missed if aucs[n][1] > 0.9]
hard = [n for n, (a, t) in aucs.items() if max(a, t) < 0.75]
Markdown(
    (f"Ranked by likelihood alone, {', '.join(missed)} {'is' if len(missed) == 1 else 'are'} ranked as *more* "
     "digit-like than the digits (AUC below 0.5). " if missed else "Likelihood alone ranks every variant as less "
     "likely than the digits here. ")
    + (f"The typicality score catches {', '.join(caught)} (AUC above 0.9). " if caught else "")
    + (f"Neither score separates {', '.join(hard)} well (AUC below 0.75 for both): shifted or flipped digits have "
       "the local statistics of digits, and a likelihood cannot tell them apart. " if hard else "")
    + "A typicality test is not a cure: it flags inputs whose likelihood is unusual, and an input with a typical "
      "likelihood passes whatever it shows.")

# %% [markdown]
# ## Summary
#
# - ActNorm is a per-channel affine flow layer, $\log|\det J| = H W \sum_c \log s_c$, initialised from the
#   first batch to zero mean and unit variance; the initialisation is part of the saved state, so it happens
#   once.
# - The invertible 1x1 convolution learns how to mix channels before each coupling; its log-determinant is
#   $H W \log|\det W|$, and the LU parametrisation makes it $H W \sum_i \log|s_i|$.
# - A Glow-style flow built from these steps was trained with the same recipe as the multi-scale flow; the
#   table above compares them, each after the training budget its results JSON records.
# - A flow trained on MNIST finds some inputs that are no digits more likely than digits: its likelihood
#   measures local smoothness. Latents of real digits lie in the prior's typical shell, far from its mode, and
#   the decoded mode is not the most likely image: the volume term decides.
# - A typicality test (is the bpd near the usual value?) separates some of these cases that the likelihood
#   ranks the wrong way, and cannot separate inputs whose local statistics are those of digits.
#
# ## Exercises
#
# ### Exercise 1: the LU-parametrised 1x1 convolution and its inverse (implementation, about 40 minutes)
#
# Write `lu_weight_and_logdet(perm, lower, upper, sign_s, log_s, inverse=False)` returning $W$ and
# $\log|\det W|$ as `InvConv1x1(lu=True)` builds them from its parameters (the formula above; the
# checker perturbs the parameters, so `lower` and `upper` carry junk where the factors must be zero or one).
# The log-determinant must cost $O(C)$: the checker switches off `InvConv1x1.weight_and_logdet` and torch's
# determinant and decomposition functions (`slogdet`, `det`, `svdvals`, `lu_factor`, `eigvals`, ..., also
# through a reference taken before the check). With `inverse=True`, return $W^{-1}$ and $\log|\det W^{-1}|$
# instead, built from the same factors: work out $W^{-1}$ in terms of $P$, $L$ and $U$, and invert the two
# triangular factors with `torch.linalg.solve_triangular` (the general `inv`, `solve` and `pinv` are switched
# off; flowbook's own reverse pass calls `torch.linalg.inv(W)`, which factorises $W$ all over again).

# %% tags=["student"]
def lu_weight_and_logdet(perm, lower, upper, sign_s, log_s, inverse=False):
    """[C, C] tensors perm, lower, upper and [C] sign_s, log_s -> (W [C, C], log|det W| as a 0-dim tensor);
    with inverse=True, (W^-1, log|det W^-1|)."""
    raise NotImplementedError("Exercise 1: implement lu_weight_and_logdet")


# %% jupyter={"source_hidden": true} tags=["solution"]
def lu_weight_and_logdet(perm, lower, upper, sign_s, log_s, inverse=False):
    """[C, C] tensors perm, lower, upper and [C] sign_s, log_s -> (W [C, C], log|det W| as a 0-dim tensor);
    with inverse=True, (W^-1, log|det W^-1|)."""
    eye = torch.eye(len(log_s), dtype=log_s.dtype, device=log_s.device)
    unit_lower = torch.tril(lower, -1) + eye
    upper = torch.triu(upper, 1) + torch.diag(sign_s * torch.exp(log_s))
    if not inverse:
        return perm @ unit_lower @ upper, log_s.sum()  # det P = +-1, det L = 1, det U = prod(sign_s * exp(log_s))
    lower_inv = torch.linalg.solve_triangular(unit_lower, eye, upper=False, unitriangular=True)
    upper_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
    return upper_inv @ lower_inv @ perm.T, -log_s.sum()  # (P L U)^-1 = U^-1 L^-1 P^-1, and P^-1 = P^T


# %%
exercises.check_lu_weight(lu_weight_and_logdet)

# %% [markdown]
# ### Exercise 2: ActNorm and its initialisation (implementation, about 25 minutes)
#
# Write `ActNormLayer.forward(z, ldj, reverse=False)`: on the first forward call in training mode (when
# `self.training` is true and the buffer `self.initialized` is false), set `loc` and `log_scale` from the
# batch so that it comes out with zero mean and unit standard deviation per channel (over batch, height and
# width; the standard deviation is `torch.std`'s default, the unbiased one), and mark the layer initialised
# in the buffer; then apply $z' = (z + b)\, e^{\log s}$ with $b$ = `loc` and $\log s$ = `log_scale`, and add
# $H W \sum_c \log s_c$ to `ldj` (the inverse with `reverse=True`). Set the values *in place*: an optimizer
# made before the first batch holds the Parameter objects of `__init__`. The checker also reloads your
# layer from its state dict and runs it in evaluation mode; it switches off flowbook's `ActNorm`.

# %% tags=["student"]
class ActNormLayer(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = torch.nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, z, ldj, reverse=False):
        raise NotImplementedError("Exercise 2: implement ActNormLayer.forward")


# %% jupyter={"source_hidden": true} tags=["solution"]
class ActNormLayer(torch.nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.loc = torch.nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = torch.nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    def forward(self, z, ldj, reverse=False):
        if not reverse and self.training and not bool(self.initialized):
            with torch.no_grad():
                per_channel = z.transpose(0, 1).flatten(1)  # [C, B * H * W]
                self.loc.copy_(-per_channel.mean(1).view_as(self.loc))
                self.log_scale.copy_(-per_channel.std(1).log().view_as(self.log_scale))
                self.initialized.fill_(True)
        log_det = z.shape[2] * z.shape[3] * self.log_scale.sum()  # H * W * sum_c log s_c
        if not reverse:
            return (z + self.loc) * torch.exp(self.log_scale), ldj + log_det
        return z * torch.exp(-self.log_scale) - self.loc, ldj - log_det


# %%
exercises.check_actnorm(ActNormLayer)

# %% [markdown]
# ### Exercise 3: the ROC curve and its area (implementation, about 30 minutes)
#
# The AUC above was defined as a probability over pairs. Its name says something else: the Area Under the
# ROC Curve of the detector "flag an input as out-of-distribution when its score is at least $\tau$". Write
# `separation_auc(in_scores, out_scores)` (tensors `[N]` and `[M]`, a Python float out) the way the name says:
# for every threshold $\tau$ among the scores, from the largest down, the true-positive rate (the share of
# out-of-distribution scores $\ge \tau$) and the false-positive rate (the share of in-distribution scores
# $\ge \tau$); the curve starts at $(0, 0)$ (a threshold above every score) and ends at $(1, 1)$; integrate
# it with the trapezoid rule (`torch.trapezoid`). Then show that this area equals the probability that an
# out-of-distribution input scores higher than an in-distribution one, with ties counted half, and say which
# part of the curve a tie between an in- and an out-of-distribution score becomes. The checker compares your
# value with that probability (within $10^{-6}$) and switches off `flowbook.ood.separation_auc`.

# %% tags=["student"]
def separation_auc(in_scores, out_scores):
    """in_scores [N], out_scores [M] -> the area under the ROC curve, a float."""
    raise NotImplementedError("Exercise 3: implement separation_auc")


# %% jupyter={"source_hidden": true} tags=["solution"]
def separation_auc(in_scores, out_scores):
    """in_scores [N], out_scores [M] -> the area under the ROC curve, a float."""
    thresholds = torch.cat([in_scores, out_scores]).unique().flip(0).view(-1, 1)  # every score, largest first
    tpr = (out_scores.view(1, -1) >= thresholds).double().mean(1)  # share of out-of-distribution flagged
    fpr = (in_scores.view(1, -1) >= thresholds).double().mean(1)  # share of in-distribution flagged
    zero = torch.zeros(1, dtype=torch.float64)
    # a tie moves both rates at one threshold: a diagonal segment, which the trapezoid counts half
    return torch.trapezoid(torch.cat([zero, tpr]), torch.cat([zero, fpr])).item()


# %%
exercises.check_separation_auc(separation_auc)

# %% [markdown]
# ### Exercise 4: a fixed permutation versus a learned 1x1 convolution (conceptual, about 15 minutes)
#
# RealNVP alternates two fixed channel masks; Glow puts a learned 1x1 convolution before every coupling.
# Show that reversing the channel order is a 1x1 convolution, give its $\log|\det W|$, and explain what a
# learned $W$ can do that a fixed permutation cannot.

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** Reversing $C$ channels multiplies each pixel's channel vector by the anti-diagonal permutation
# matrix, a $1 \times 1$ convolution whose $W$ is a permutation: $|\det W| = 1$, so it adds $H W \cdot 0 = 0$
# to `ldj`. A permutation only decides *which* channels the next coupling keeps. A learned $W$ can rotate and
# scale the channel space, so the coupling keeps *linear combinations* of channels chosen by training (any
# invertible mixing, including every permutation), and it can change volume ($\log|\det W| \ne 0$), which
# a permutation never does.

# %% [markdown]
# ### Exercise 5: the mode of a one-dimensional flow (conceptual, about 20 minutes)
#
# The chapter found that the decoded mode of the prior is not the most likely image. Work the same question
# out by hand for the simplest flow there is: $x = g(z) = e^{z}$ with $z \sim \mathcal N(0, 1)$, so that
# $f(x) = \log x$ on $x > 0$. (a) Write $\log p_x(x)$ with the change of variables and find the most likely
# $x$. (b) Where does the most likely latent, $z = 0$, go, and what is the probability that $x$ is smaller than
# it? (c) Which term of $\log p_x$ moves the mode away from $g(0)$, and what would a flow need to do to that
# term to make $g(0)$ the most likely $x$ again? (d) Now take $D$ independent copies, $x_d = e^{z_d}$: how
# far (in Euclidean distance) is the most likely $x$ from $g(0)$, and how does that grow with $D$?

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** (a) $\log p_x(x) = \log \mathcal N(\log x) + \log|d f/dx| = -\tfrac12 (\log x)^2 - \log x -
# \tfrac12 \log 2\pi$. Its derivative, $-(\log x + 1)/x$, vanishes at $\log x = -1$: the most likely $x$ is
# $e^{-1} \approx 0.37$. (b) $g(0) = e^0 = 1$, and $P(x < 1) = P(z < 0) = 1/2$: the decoded mode is the
# *median* of $x$, not its mode. (c) The volume term $\log|df/dx| = -\log x$: it rewards small $x$, where the
# flow stretches the latent line the most (a small interval of $x$ holds a long interval of $z$). Only a map
# whose log-derivative has zero slope at $g(0)$ would keep the mode in place, e.g. an affine map, whose volume
# term is constant. (d) The density factorises, so the most likely $x$ has every coordinate at $e^{-1}$, while
# $g(0) = (1, \dots, 1)$: they are $(1 - e^{-1})\sqrt D \approx 0.63 \sqrt D$ apart, growing like $\sqrt D$.
# In image dimensions the most likely image and the decoded mode can be far apart even when the volume term
# moves each pixel only a little.

# %% [markdown]
# ## References
#
# - D. P. Kingma, P. Dhariwal. *Glow: Generative flow with invertible 1x1 convolutions.* NeurIPS 2018.
# - E. Nalisnick, A. Matsukawa, Y. W. Teh, D. Gorur, B. Lakshminarayanan. *Do deep generative models know what
#   they don't know?* ICLR 2019.
# - E. Nalisnick, A. Matsukawa, Y. W. Teh, B. Lakshminarayanan. *Detecting out-of-distribution inputs to deep
#   generative models using typicality.* 2019 (2019b above).
# - P. Kirichenko, P. Izmailov, A. G. Wilson. *Why normalizing flows fail to detect out-of-distribution data.*
#   NeurIPS 2020.
# - L. Dinh, J. Sohl-Dickstein, S. Bengio. *Density estimation using Real NVP.* ICLR 2017.
# - P. Lippe. *Normalizing Flows for Image Modeling*, UvA Deep Learning Tutorial 11 (CC BY-SA), the
#   tutorial this collection starts from and extends here.

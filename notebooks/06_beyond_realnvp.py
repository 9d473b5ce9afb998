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
# Dhariwal, 2018) replaced two of RealNVP's layers: batch normalisation by activation normalisation (ActNorm),
# and the fixed permutation of the channels between couplings by a learned, invertible 1x1 convolution. We
# build both, check them like every other layer, and compare a Glow-style flow with the multi-scale flow, each
# trained with the recipe and budget its checkpoint records, and after the same number of training images.
# Second, a flow gives exact likelihoods, and it is tempting to use them to tell digits from anything else. We
# test that on inputs made from MNIST itself, find where it fails and why, and try a test for *typical*
# likelihoods instead.
#
# **You will learn**
# - ActNorm: a per-channel affine layer with a data-dependent initialisation, and its log-determinant;
# - the invertible 1x1 convolution, its log-determinant $H W \log|\det W|$, and the LU trick that makes it
#   cheap;
# - how a Glow-style flow compares with the multi-scale RealNVP flow at the same size and the same number of
#   training images;
# - which out-of-distribution inputs a flow trained on MNIST finds *more* likely than digits, and why;
# - typicality: where the latents of digits and of the other inputs lie, how the prior term and the volume
#   term make up a bpd, what the most likely latent decodes to, and a test for typical likelihoods.
#
# Every number and picture below is computed by the cells of this notebook, from the trained checkpoints in
# `checkpoints/` where they exist, else from quick-mode models (the first cell says which).

# %% [markdown]
# **Learning objectives.** After this chapter and its exercises you can
# - implement the LU-parametrised invertible 1x1 convolution, with its inverse and log-determinant (Exercise 1);
# - implement ActNorm with its data-dependent initialisation (Exercise 2);
# - compute an ROC curve and its area to judge likelihood-based out-of-distribution detection (Exercise 3);
# - explain what a learned 1x1 convolution can do that a fixed permutation cannot (Exercise 4), and why the
#   most likely latent does not decode to the most likely image (Exercise 5).

# %%
import math

import torch
from IPython.display import Markdown
from tabulate import tabulate
from torch.autograd.functional import jacobian

from flowbook import config, exercises, ood, viz
from flowbook.data import load_mnist
from flowbook.evaluate import bpd_per_image
from flowbook.layers import ActNorm, GlowStep, InvConv1x1
from flowbook.models import create_flow, num_parameters
from flowbook.pretrained import load_trained, shipped_results
from flowbook.results import validation_curves

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
# RealNVP already had a normalisation layer: batch normalisation, used as a flow layer with its Jacobian
# (Dinh et al., 2017, section 3.7). With its statistics held fixed (the batch's in training, running averages
# at test time) it is an affine map of each dimension, and its log-determinant is the sum of the log scales.
# In training, though, each example is normalised with the statistics of its batch, and their noise grows as
# the batch on each device shrinks; Glow, whose large images left room for small batches per device only,
# replaced it (Kingma and Dhariwal, 2018, section 3.1) with **activation normalisation**, a per-channel affine
# map with learned parameters $\beta_i$ and $\log s_i$ that does not look at the batch after its first one:
#
# $$z'_{i,j,k} = (z_{i,j,k} + \beta_i)\, e^{\log s_i}$$
#
# for channel $i$ at row $j$ and column $k$.
#
# Its Jacobian is diagonal; the entry for channel $i$ is $e^{\log s_i}$ and appears once for each of the
# $H \cdot W$ pixels, so
#
# $$\log|\det J| = H \cdot W \sum_i \log s_i,$$
#
# the one term ActNorm adds to `ldj` (and subtracts in reverse, $z_{i,j,k} = z'_{i,j,k}\, e^{-\log s_i} -
# \beta_i$). What makes it a normalisation is the **data-dependent initialisation**: on the first training
# batch, $\beta_i$ is set to minus the channel's mean and $\log s_i$ to minus the log of its standard deviation
# (both over batch, height and width), so that the first batch leaves the layer with zero mean and unit variance
# per channel. After that they are trained like any other weight.

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
# so a model saved after training and loaded again is not re-initialised by the next batch it sees (an
# implementation that keeps this flag outside the saved state would overwrite the trained ActNorm parameters
# of a reloaded model with the statistics of the first batch it is shown). A second, very different batch
# leaves the parameters alone, and so does a reloaded copy:

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
# $$W = P\, L\, \big(U + \mathrm{diag}(\mathrm{sign}(d)\, e^{\log|d|})\big),$$
#
# with a fixed permutation $P$, a unit lower triangular $L$, a strictly upper triangular $U$ and a diagonal
# $d$ (not ActNorm's scale $s$; the code stores $\mathrm{sign}(d)$ and $\log|d|$ as `sign_s` and `log_s`). The
# determinant of a triangular matrix is the product of its diagonal, $\det P = \pm 1$ and $\det L = 1$, so
# $\log|\det W| = \sum_i \log|d_i|$, in $O(C)$. $W$ starts as a random rotation ($\log|\det W| = 0$). We
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
# The LU parametrisation's $\sum_i \log|d_i|$ is the log-determinant of its $W$, which `slogdet` computes the
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
glow_layers = [m for m in fresh["glow"].modules() if isinstance(m, (ActNorm, InvConv1x1))]
n_actnorm = sum(num_parameters(m) for m in glow_layers if isinstance(m, ActNorm))
n_conv = sum(num_parameters(m) for m in glow_layers if isinstance(m, InvConv1x1))
n_conv_free = sum(m.log_s.numel() ** 2 for m in glow_layers if isinstance(m, InvConv1x1))  # C^2 per convolution
assert extra == n_actnorm + n_conv, "the Glow steps' couplings must have as many parameters as the channel couplings"
Markdown(f"The Glow-style flow has {num_parameters(fresh['glow']):,} parameters, {extra:,} more than the multi-scale "
         f"flow's {num_parameters(fresh['multiscale']):,}; its couplings have as many as the multi-scale flow's. "
         f"The extra ones are {n_actnorm:,} ActNorm parameters ($2C$ per step) and {n_conv:,} in the LU 1x1 "
         f"convolutions: each stores `lower` and `upper` as full $C \\times C$ matrices and `log_s` ($2C^2 + C$), "
         f"but uses only their strict triangles and the diagonal, $C^2$ numbers per convolution ({n_conv_free:,} in "
         f"all, as many as the plain $W$); the other {n_conv - n_conv_free:,} are masked out and get no gradient. Both "
         "flows have the latent shape printed above each graph.")

# %% [markdown]
# ## Did the Glow layers help?
#
# The four flows were trained by `python -m flowbook.train` (Adam, a linear warm-up, then half a cosine down to
# zero at the end of each stage), but each with its own stages, peak learning rates, budgets and numbers of
# training images (`docs/training.md` has the commands). Each shipped checkpoint's results JSON, written by
# `python -m flowbook.evaluate`, records its test bpd (importance sampling on the test images it lists) and its
# history, one row per training stage:

# %%
FOUR_FLOWS = ("simple", "vardeq", "multiscale", "glow")
results = {name: shipped_results(name) for name in FOUR_FLOWS}  # chapters 7 and 8 show the others
table, history = [], []
for name, res in results.items():
    if res is None:
        table.append([name, "no results JSON", "", "", "", ""])
        continue
    table.append([name, f"{res['test_bpd']:.3f}", f"{res['eval_images']['test']:,}", res["importance_samples"],
                  f"{res['epochs']} / {res['images_seen']:,}", f"{res['parameters']:,}"])
    for i, stage in enumerate(res["training"]["history"], 1):
        st = stage["settings"]
        history.append([name, i, "from the previous stage" if stage["init"] else "from scratch", st["batch_size"],
                        f"{st['lr']:g}", st["warmup_steps"], f"{st['max_minutes']:g}", stage["epochs"],
                        f"{stage['images_seen']:,}", f"{stage['wall_s'] / 60:.0f}", stage["hardware"]])
print(tabulate(table, headers=["model", "test bpd", "test images", "K", "epochs / images seen", "parameters"],
               disable_numparse=True))
print("\nTraining history of each shipped checkpoint (from its results JSON):")
print(tabulate(history, headers=["model", "stage", "start", "batch", "peak lr", "warm-up steps", "budget (min)",
                                 "epochs", "images", "wall (min)", "hardware"], disable_numparse=True))
print("\nThe reference tutorial's recipe (not used for these checkpoints): 200 epochs, batch 128, Adam at 1e-3 "
      "decayed by 0.99 per epoch, on a GPU.")

# %% [markdown]
# The test bpd above mixes the architecture with the training budget. The fair question is which flow is
# better after the *same* number of training images. The runs' logs hold the one-sample validation bpd on the
# 10,000 validation images after every epoch (copied into `docs/validation_curves.csv`; the multi-scale flow's
# first epoch was not recorded):

# %%
curves = {m: pts for m, pts in validation_curves().items() if m in ("multiscale", "glow")}  # (images, bpd, stage)
fig = viz.plot_curves({f"{m} (stages: {max(c[2] for c in pts)})": ([c[0] for c in pts], [c[1] for c in pts])
                       for m, pts in curves.items()},
                      "training images seen", "validation bpd (1 sample)",
                      "Validation bpd against training images (each stage restarts its schedule)")

# %%
def verdict(curves, results):
    ms, glow = dict((i, v) for i, v, _ in curves["multiscale"]), dict((i, v) for i, v, _ in curves["glow"])
    both = sorted(set(ms) & set(glow))
    at = "; ".join(f"after {i:,} images, {glow[i]:.3f} against {ms[i]:.3f}" for i in both)
    ahead = all(glow[i] < ms[i] for i in both)
    final = max(glow)
    caught_up = min((i for i in ms if ms[i] <= glow[final]), default=None)
    return ((f"At equal training images the Glow-style flow's validation bpd was "
             f"{'lower' if ahead else 'not always lower'}"
             f" at every point both runs have ({at}). ")
            + (f"The multi-scale flow first reached the Glow-style flow's final {glow[final]:.3f} after "
               f"{caught_up:,} images, {caught_up / final:.1f} times as many. " if caught_up else "")
            + "This is one run of each, with different schedules: the multi-scale flow's first stage ended its cosine "
            f"at {results['multiscale']['training']['history'][0]['images_seen']:,} images, and each later stage "
            "restarted from its peak learning rate, while the Glow run's single cosine "
            f"ended at {results['glow']['images_seen']:,}. "
            + ("So, at equal budgets in these runs, the Glow layers helped. " if ahead else "So these runs do not "
               "show the Glow layers helping at equal budgets. ")
            + (f"With {results['multiscale']['images_seen'] / results['glow']['images_seen']:.1f} times as many "
               f"images, the multi-scale flow's test bpd ({results['multiscale']['test_bpd']:.3f}) ended below the "
               f"Glow run's ({results['glow']['test_bpd']:.3f}), which has had one stage only. "
               if results['multiscale']['test_bpd'] < results['glow']['test_bpd'] else "")
            + "In the Glow paper, the 1x1 convolution beat both a fixed reversal and a random permutation of the "
            "channels at the same depth, with additive and with affine couplings (Kingma and Dhariwal, 2018, "
            "figure 3, CIFAR-10); its full models were also far deeper (32 steps per scale) and trained far longer "
            "than these.")


Markdown(verdict(curves, results) if results["glow"] and results["multiscale"] else
         "Without results JSONs for both flows this notebook cannot compare them (`docs/training.md`).")

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
# like a digit gets a low likelihood, and we could flag it. Nalisnick et al. (2019a) found the opposite for
# flows trained on natural images: a flow trained on CIFAR-10 gives the digits of SVHN a *higher* likelihood
# than CIFAR's own test images. We can test the same on MNIST with inputs made from MNIST itself:

# %%
n_ood = settings.eval_images or 2000
variants = ood.ood_variants(test_set.images[:n_ood])
viz.show_imgs(torch.cat([v[:1] for v in variants.values()]),
              "One example of each input: " + ", ".join(variants), row_size=len(variants));

# %% [markdown]
# We score each under the trained multi-scale flow (bpd with one dequantization sample; lower bpd means a
# higher likelihood). `ood.bpd_terms` also splits each bpd into two terms and measures each input's latent,
# which the typicality section below uses:

# %%
flow = models["multiscale"]
torch.manual_seed(0)
terms = {name: ood.bpd_terms(flow, imgs) for name, imgs in config.progress_bar(variants.items(), "scoring",
                                                                                total=len(variants))}
bpd = {name: t["bpd"] for name, t in terms.items()}
digits_median = bpd["digits"].median().item()
rows = [[name, f"{b.mean():.2f}", f"{b.median():.2f}", f"{(b < digits_median).float().mean():.0%}"]
        for name, b in bpd.items()]
print(f"{len(bpd['digits']):,} images of each kind, made from the first test images")
print(tabulate(rows, headers=["input", "mean bpd", "median bpd", "below the digits' median"], disable_numparse=True))
assert all(torch.isfinite(b).all() for b in bpd.values()), "no NaN is dropped: every input has a finite bpd"

# %%
likelier = [n for n, b in bpd.items() if n != "digits" and b.median() < digits_median]
viz.plot_histogram({n: b.clamp(max=12) for n, b in bpd.items()
                    if n in ("digits", *likelier, "inverted", "constant grey", "uniform noise")},
                   bins=120, xlabel="bits per dimension (clipped at 12; dashed: 8, the uniform model of 8-bit pixels)",
                   title="bpd under the multi-scale flow: real digits against inputs made from them", ymax=3, vline=8);

# %%
def ood_sentence(bpd):
    med = {n: b.median().item() for n, b in bpd.items()}
    ranking = " < ".join(f"{n} ({med[n]:.2f})" for n in sorted(med, key=med.get))
    above_uniform = [n for n in med if med[n] > 8]
    grey_vs_noise = (bpd["uniform noise"] < med["constant grey"]).float().mean().item()
    return (f"Ranked by median bpd under the multi-scale flow on screen: {ranking}. "
            + (f"Only {', '.join(likelier)} {'is' if len(likelier) == 1 else 'are'} *more* likely than the digits. "
               if likelier else "No input is more likely than the digits. ")
            + (f"The {' and '.join(above_uniform)} images cost more than 8 bpd, more than under a model that knows "
               "nothing and gives every 8-bit image the same probability. " if above_uniform else "")
            + f"{grey_vs_noise:.0%} of the uniform-noise images have a lower bpd than the constant grey image.")


Markdown(ood_sentence(bpd))

# %% [markdown]
# **Why.** Kirichenko et al. (2020) show that coupling layers learn to predict each pixel from its neighbours,
# so that a coupling flow's likelihood is dominated by local pixel statistics, not by what the image shows. The
# table says *which* statistics. The cheap input is not a smooth one: the constant grey image is as smooth as an
# image can be, and it is among the most expensive. The cheap input is the *black* one, because black is what
# most training pixels are. A black pixel among black neighbours costs about 0 bits: the model's conditional
# for it puts almost all its mass inside that pixel's unit interval $[0, 1)$ of dequantized values. A flow is a
# normalised density: the mass it puts on black backgrounds and strokes is missing elsewhere, and inputs made of
# grey levels that MNIST rarely shows can cost more than the 8 bpd of the uniform model.
#
# Why does a constant grey image cost more than most noise images? Compare the flow with the simplest model of
# local statistics, one that knows only how often each grey level occurs in the training images (every pixel
# independent), and count how often a mid-grey training pixel has mid-grey neighbours:

# %%
pixels = train_set.images.flatten().long()
freq = torch.bincount(pixels, minlength=256).double() / len(pixels)
cost = -torch.log2(freq.clamp(min=1 / len(pixels)))  # bits per pixel of each grey level (never-seen levels: 1 count)
hist_bpd = {n: cost[v.long()].flatten(1).mean(1) for n, v in variants.items()}
print(tabulate([[n, f"{bpd[n].median():.2f}", f"{hist_bpd[n].median():.2f}"] for n in variants],
               headers=["input", "flow: median bpd", "grey-level frequencies only: median bpd"],
               disable_numparse=True))
imgs = train_set.images[:10000, 0].long()
mid = (imgs >= 100) & (imgs <= 155)  # mid grey, around the constant image's 128
inner = mid[:, 1:-1, 1:-1]
mid_neighbours = inner & mid[:, :-2, 1:-1] & mid[:, 2:, 1:-1] & mid[:, 1:-1, :-2] & mid[:, 1:-1, 2:]
share = {"black (0)": freq[0].item(), "128": freq[128].item(), "mid grey (100..155)": freq[100:156].sum().item()}
print("share of training pixels: " + ", ".join(f"{k} {v:.2%}" for k, v in share.items()))
n_mid, n_mid_neighbours = int(inner.sum()), int(mid_neighbours.sum())
print(f"mid-grey pixels (10,000 training images, borders left out): {n_mid:,}; with four mid-grey neighbours: "
      f"{n_mid_neighbours:,}")

# %%
Markdown(f"Knowing only the frequencies of the grey levels already charges {hist_bpd['constant grey'].median():.2f} "
         f"bpd for the constant grey image ({share['128']:.2%} of training pixels are 128) and "
         f"{hist_bpd['uniform noise'].median():.2f} for uniform noise. The flow charges the grey image *more* than "
         f"that ({bpd['constant grey'].median():.2f}), and the noise less ({bpd['uniform noise'].median():.2f}): "
         "for the grey image, the neighbours make each pixel less predictable, not more. In MNIST a mid-grey pixel "
         "is the edge of a stroke, between black and white; a mid-grey pixel among four mid-grey neighbours is a "
         f"context the training images {'never' if n_mid_neighbours == 0 else 'almost never'} show "
         f"({n_mid_neighbours:,} of {n_mid:,} mid-grey pixels in 10,000 of them). The inverted digits have the "
         "digits' shapes but the wrong grey levels in most "
         f"pixels: {bpd['inverted'].median():.2f} bpd. Smoothness is not what this flow rewards; the grey levels "
         "and the neighbourhoods of its training images are.")

# %% [markdown]
# ## Typicality
#
# The likelihood has two parts. With $z = f(x + u)$ the whole latent (for the multi-scale flow, the final
# `[8, 7, 7]` latent and the `[2, 14, 14]` half that the split factored out: $D = 784$ numbers, as many as
# pixels),
#
# $$\mathrm{bpd} = \underbrace{\frac{-\log \mathcal N(z)}{D \log 2}}_{\text{prior term}} +
#   \underbrace{\frac{-\log|\det J_f(x + u)| + \log q(u \mid x)}{D \log 2}}_{\text{volume term}}.$$
#
# The volume term holds the flow's log-determinant together with the dequantization's $\log q(u \mid x)$ (chapter
# 2: zero for uniform noise; this flow learned its noise, so not zero here). It is negative where $f$ expands
# volume by more than the noise's density takes back, and positive where it contracts.
#
# In $D$ dimensions a standard normal sample has $\|z\|^2 \sim \chi^2_D$, so $\|z\| \approx \sqrt{D}$ with a
# spread of about $1/\sqrt 2$: almost all the mass lies in a thin shell, far from the mode $z = 0$, which has
# the highest density but is itself *atypical*. On the shell, $-\log \mathcal N(z) = \frac D2 \log 2\pi +
# \frac12\|z\|^2 \approx \frac D2 (\log 2\pi + 1)$, a prior term of $(\log 2\pi + 1) / (2 \log 2) \approx 2.05$
# bits per dimension for *every* typical latent. Where do the latents of the inputs above lie?

# %%
latent_dims = math.prod(variants["digits"].shape[1:])
torch.manual_seed(0)
norms_prior = torch.randn(len(variants["digits"]), latent_dims).norm(dim=1)
shown = ("digits", "all black", "constant grey", "uniform noise", "inverted")
viz.plot_histogram({**{f"{n}: f(x + u)": terms[n]["norm"] for n in shown}, "prior samples z ~ N(0, I)": norms_prior},
                   bins=120, xlabel=f"norm of the whole latent (dashed: sqrt(D) = {latent_dims ** 0.5:.0f}, D = "
                                    f"{latent_dims}; the mode has norm 0)",
                   title="Latent norms under the multi-scale flow", ymax=1, vline=latent_dims ** 0.5);
shell_term = (math.log(2 * math.pi) + 1) / (2 * math.log(2))
print(tabulate([[n, f"{t['norm'].median():.1f}", f"{t['prior'].median():.2f}", f"{t['volume'].median():+.2f}",
                 f"{t['bpd'].median():.2f}"] for n, t in terms.items()],
               headers=["input", "median ||z||", "prior term", "volume term", "bpd"], disable_numparse=True))
print(f"prior samples: ||z|| {norms_prior.mean():.1f} ± {norms_prior.std():.1f}; prior term on the shell "
      f"{shell_term:.2f} bits per dimension")

# %%
med = {n: {k: v.median().item() for k, v in t.items()} for n, t in terms.items()}
Markdown(f"The digits' latents lie on the prior's shell (median norm {med['digits']['norm']:.1f}, prior samples "
         f"{norms_prior.mean():.1f} ± {norms_prior.std():.1f}), so their prior term is the typical "
         f"{med['digits']['prior']:.2f} bits per dimension, and their typical bpd of {med['digits']['bpd']:.2f} is "
         f"that plus a volume term of {med['digits']['volume']:+.2f}: around a digit, $f$ expands volume (net of "
         f"$\\log q$) by {-med['digits']['volume']:.2f} bits per dimension. The all-black image's latent lies on the shell too "
         f"(median norm {med['all black']['norm']:.1f}, prior term {med['all black']['prior']:.2f}): neither its "
         "latent norm nor its prior term marks it as unusual. Its low bpd comes from the volume term alone, "
         f"{med['all black']['volume']:+.2f}, about twice the digits' in bits per dimension: $f$ expands the volume "
         "around it far more than around a typical digit. The "
         "constant grey image, the noise and the inverted digits leave the shell (median norms "
         f"{med['constant grey']['norm']:.1f}, {med['uniform noise']['norm']:.1f} and {med['inverted']['norm']:.1f}), "
         f"and their volume terms ({med['constant grey']['volume']:+.2f}, {med['uniform noise']['volume']:+.2f}, "
         f"{med['inverted']['volume']:+.2f}) are far above the digits': $f$ spreads these inputs over much less "
         "latent volume than a digit (for the grey image and the noise the volume term is positive: net of $\\log q$, "
         "$f$ contracts volume there). "
         f"The noise's latent is further out (prior term {med['uniform noise']['prior']:.2f} against "
         f"{med['constant grey']['prior']:.2f}), but the grey image's volume term is the larger: that is where the "
         "constant grey image loses to the noise.")

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
mode_terms = {k: v.item() for k, v in ood.bpd_terms(flow, mode_img).items()}
mode_bpd = mode_terms["bpd"]
black_bpd = bpd["all black"].median().item()
lit = [(r.float() > 64).float().mean().item() for r in rows]
digits_lit = (test_set.images[:1000].float() > 64).float().mean().item()
Markdown(f"At $T = 0$ all eight samples are one image, the decoding of the mode $z = 0$: "
         + ("a blank or nearly blank image" if lit[0] < 0.02 else "a digit-like image, not a blank one")
         + f", with {lit[0]:.1%} of its pixels above 64 (test digits: {digits_lit:.1%}). Its bpd is {mode_bpd:.2f}; "
         f"the all-black image's is {black_bpd:.2f}. "
         + ("So the most likely latent does not decode to the most likely image: the all-black image, at least, is "
            "more likely (which image is the most likely, this chapter does not find). " if mode_bpd > black_bpd
            else "")
         + "From $T = 0$ to $1$ the share of pixels above 64 goes "
         + ", ".join(f"{v:.1%}" for v in lit) + ".")

# %% [markdown]
# Why can the decoded mode lose to another image? The density of an image is
# $\log p(x) = \log \mathcal N(f(x)) + \log|\det J_f(x)|$ (with dequantization, the bound of chapter 2): the
# prior term is largest at $f(x) = 0$, but $\log|\det J_f(x)|$ is large (and the volume term of a bpd negative)
# wherever $f$ *expands* volume, that is, where
# $f$ spreads a small region of images over a large region of latent space (and the sampler $f^{-1}$
# contracts that latent region onto a few images). The next cell splits both images' bpd into the two terms.
#
# %%
Markdown(f"The decoded mode, encoded again with fresh dequantization noise like any input, lands at latent norm "
         f"{mode_terms['norm']:.1f}, not at 0: decoding rounded every pixel to an integer, and the image owns a "
         "whole region of latent space, of which $z = 0$ is one point. Scored like the other inputs, it has a prior "
         f"term of {mode_terms['prior']:.2f} and a volume term of {mode_terms['volume']:+.2f} bits per dimension; the "
         f"all-black image has {med['all black']['prior']:.2f} and {med['all black']['volume']:+.2f}. The prior terms "
         f"differ by {abs(med['all black']['prior'] - mode_terms['prior']):.2f}, the volume terms by "
         f"{abs(mode_terms['volume'] - med['all black']['volume']):.2f}: "
         + ("the volume term decides. " if abs(mode_terms['volume'] - med['all black']['volume'])
            > abs(med['all black']['prior'] - mode_terms['prior']) else "here the prior term decides. ")
         + "Density in the latent and density in the image are different things, and neither says which images are "
           "*typical*.")

# %% [markdown]
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
print(tabulate(auc_rows, headers=["input", "AUC: high bpd", "AUC: |bpd - typical|"], disable_numparse=True))

# %%
missed = [n for n, (a, _) in aucs.items() if a < 0.5]
caught = [n for n in missed if aucs[n][1] > 0.9]
hard = [n for n, (a, t) in aucs.items() if max(a, t) < 0.75]
Markdown(
    (f"Ranked by likelihood alone, {', '.join(missed)} {'is' if len(missed) == 1 else 'are'} ranked as *more* "
     "digit-like than the digits (AUC below 0.5). " if missed else "Likelihood alone ranks every variant as less "
     "likely than the digits here. ")
    + (f"The typicality score catches {', '.join(caught)} (AUC above 0.9). " if caught else "")
    + (f"Neither score separates {', '.join(hard)} well (AUC below 0.75 for both): their bpd is close to the "
       "digits' (table above), and so is their latents' norm. " if hard else "")
    + "A typicality test is not a cure: it flags inputs whose likelihood is unusual, and an input with a typical "
      "likelihood passes whatever it shows.")

# %% [markdown]
# ## Summary
#
# - ActNorm is a per-channel affine flow layer, $\log|\det J| = H W \sum_i \log s_i$, initialised from the
#   first batch to zero mean and unit variance; the initialisation is part of the saved state, so it happens
#   once.
# - The invertible 1x1 convolution learns how to mix channels before each coupling; its log-determinant is
#   $H W \log|\det W|$, and the LU parametrisation makes it $H W \sum_i \log|d_i|$.
# - Each shipped model has its own training history (printed from its results JSON). After the same number
#   of training images, the Glow-style flow's validation bpd was the lower in these runs (one run each,
#   different schedules); the multi-scale flow, trained on more images, ends with the lower test bpd.
# - A flow trained on MNIST is not a digit detector: here the all-black image is far more likely than any digit,
#   while constant grey and uniform noise cost more than the 8 bpd of a uniform model. Its likelihood rewards the
#   grey levels and neighbourhoods of its training images (black above all), not smoothness.
# - A bpd is a prior term plus a volume term. Digits' latents, and the all-black image's, lie on the prior's
#   typical shell, far from its mode, with a prior term of about 2.05 bits per dimension; what separates them is
#   the volume term, which also makes the all-black image likelier than the decoded mode.
# - A typicality test (is the bpd near the usual value?) separates the all-black image, which the likelihood
#   ranks above the digits, and cannot separate inputs whose local statistics are those of digits.
#
# ## Exercises
#
# ### Exercise 1: the LU-parametrised 1x1 convolution and its inverse (implementation, 5 points, about 40 minutes)
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
# ### Exercise 2: ActNorm and its initialisation (implementation, 3 points, about 25 minutes)
#
# Write `ActNormLayer.forward(z, ldj, reverse=False)`: on the first forward call in training mode (when
# `self.training` is true and the buffer `self.initialized` is false), set `loc` and `log_scale` from the
# batch so that it comes out with zero mean and unit standard deviation per channel (over batch, height and
# width; the standard deviation is `torch.std`'s default, the unbiased one), and mark the layer initialised
# in the buffer; then apply $z' = (z + \beta)\, e^{\log s}$ with $\beta$ = `loc` and $\log s$ = `log_scale`, and
# add $H W \sum_i \log s_i$ to `ldj` (the inverse with `reverse=True`). Set the values *in place*: an optimizer
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
# ### Exercise 3: the ROC curve and its area (implementation, 4 points, about 30 minutes)
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
# ### Exercise 4: a fixed permutation versus a learned 1x1 convolution (conceptual, 2 points, about 15 minutes)
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
# ### Exercise 5: the mode of a one-dimensional flow (conceptual, 2 points, about 20 minutes)
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
#   they don't know?* ICLR 2019 (2019a above).
# - E. Nalisnick, A. Matsukawa, Y. W. Teh, B. Lakshminarayanan. *Detecting out-of-distribution inputs to deep
#   generative models using typicality.* 2019 (2019b above).
# - P. Kirichenko, P. Izmailov, A. G. Wilson. *Why normalizing flows fail to detect out-of-distribution data.*
#   NeurIPS 2020.
# - L. Dinh, J. Sohl-Dickstein, S. Bengio. *Density estimation using Real NVP.* ICLR 2017.
# - P. Lippe. *Normalizing Flows for Image Modeling*, UvA Deep Learning Tutorial 11 (CC BY-SA), the
#   tutorial this collection starts from and extends here.

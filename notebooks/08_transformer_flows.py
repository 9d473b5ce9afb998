# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 8: Transformer flows, from autoregressive flows to TarFlow
#
# After Glow (chapter 6) normalizing flows fell behind diffusion models and flow matching (chapter 7) as image
# generators, and for some years looked like a finished chapter of the field. In 2024 they came back. TarFlow
# (Zhai et al., 2024) stacks causal transformer blocks over image patches, each an *autoregressive* affine
# flow; it set new likelihood records on ImageNet 64x64, and with Gaussian noise augmentation and one
# denoising step (and guidance, section 5) drew samples close to those of diffusion models. STARFlow (Gu et
# al., 2025) scaled it up, and Jet (Kolesnikov et al., 2024) showed that plain coupling flows with
# vision-transformer networks go far too.
# This chapter builds a TarFlow from the ground up, next to the RealNVP-style flows of chapters 3 to 6, on the
# same MNIST, in the same units.
#
# **Convention.** As in every chapter, $f$ maps data to latent, $z = f(x)$, and sampling computes
# $f^{-1}$. This chapter cuts an image into $n$ patches of $\ell \times \ell$ pixels, the *tokens*
# $x_1, \dots, x_n$, each a vector of $d = \ell^2 C$ values (so $n d = D$); chapter 1's table of symbols lists
# $n$, $d$ and $\ell$. A token's shift and log-scale are $t_i$ and $s_i$, with chapter 3's meaning.
#
# **You will learn**
# - what an autoregressive flow is, why its Jacobian is triangular and its log-determinant a sum of
#   log-scales, and why a coupling layer is the special case of two tokens;
# - how a TarFlow block computes every token's shift and log-scale with one causal transformer, and what the
#   attention mask and the shift by one position do;
# - a TarFlow trained on MNIST by `flowbook.train`, how it enters the results table with every other model,
#   and what its sequential sampling costs, with and without a key-value cache;
# - Gaussian noise augmentation and Tweedie's denoising step, with the score from the flow's own density,
#   judged by chapter 7's digit classifier; and why a noise-trained model's likelihood is not a bpd of MNIST.

# %% [markdown]
# **Learning objectives.** After this chapter and its exercises you can
# - derive the log-determinant of an autoregressive affine flow, and say why its density takes one parallel
#   pass and its sampling one pass per token (Exercise 4 asks why);
# - write a causal attention mask, and see it, together with the shift by one position, keep a token's shift
#   and log-scale independent of that token and the ones after it (Exercise 1);
# - invert an autoregressive layer token by token, with its log-determinant (Exercise 2);
# - implement Tweedie's denoising step with a flow's score (Exercise 3), and explain what noise augmentation
#   does to a likelihood (Exercise 5).

# %%
import math
import time

import torch
from IPython.display import Markdown
from tabulate import tabulate
from torch.autograd.functional import jacobian

from flowbook import config, exercises, viz
from flowbook.checkpoints import read_checkpoint
from flowbook.classifier import load_classifier, recognisability, recognised
from flowbook.data import load_mnist
from flowbook.denoise import log_density, sample_denoised, tweedie_denoise
from flowbook.gallery import sample_grid
from flowbook.exercises._harness import perturbed
from flowbook.layers import Dequantization, NoiseAugmentation, TarFlowBlock
from flowbook.layers.tarflow import patchify, unpatchify
import flowbook.layers.tarflow as tarflow_layers
from flowbook.models import ALL_MODELS, num_parameters
from flowbook.pretrained import checkpoint_file, load_trained, training_history
from flowbook.results import load_results, validation_curves

settings = config.settings()
device = config.get_device()
train_set, val_set, test_set = load_mnist()
print(f"mode: {settings.mode}")

# %% [markdown]
# ## 1. Autoregressive flows
#
# Write the data as a sequence of tokens $x = (x_1, \dots, x_n)$. An **autoregressive affine flow** maps each
# token with a shift and a log-scale that depend only on the tokens *before* it:
#
# $$z_i = (x_i + t_i) \odot e^{s_i}, \qquad (t_i, s_i) = \psi_i(x_1, \dots, x_{i-1}), \qquad i = 1, \dots, n,$$
#
# where $\psi_i$ is any function at all, a transformer for instance; $\psi_1$ sees nothing and gives constants.
# The Jacobian $\partial z / \partial x$, ordered token by token, is block lower triangular:
# - $\partial z_i / \partial x_{i'} = 0$ for $i' > i$, since $z_i$ reads only $x_1, \dots, x_i$;
# - $\partial z_i / \partial x_i = \operatorname{diag}(e^{s_i})$, since $t_i$ and $s_i$ do not depend on $x_i$;
# - the blocks below the diagonal, $\partial z_i / \partial x_{i'}$ for $i' < i$, are whatever $\psi_i$ makes them.
#
# The determinant of a block triangular matrix is the product of the determinants of its diagonal blocks, so
#
# $$\log\lvert\det J_f\rvert = \sum_{i=1}^{n} \sum_{j=1}^{d} s_{i,j},$$
#
# a sum of log-scales ($s_{i,j}$ is the log-scale of value $j$ of token $i$), whatever the network: the blocks
# below the diagonal never enter it. (The TarFlow paper writes the same map as $z_i = (x_i - \mu_i) \odot
# e^{-\alpha_i}$, that is $\mu_i = -t_i$ and $\alpha_i = -s_i$, the paper's $\alpha_i$ not chapter 2's logit
# margin $\alpha$; flowbook keeps chapter 3's signs.)
#
# **Density in one pass, sampling in $n$.** Given $x$, every $(t_i, s_i)$ can be computed at once, since all
# the $x_{<i}$ are known: the log-likelihood $\log \mathcal{N}(z; 0, I) + \sum s$ costs one parallel pass of
# $\psi$. The inverse, $x_i = z_i \odot e^{-s_i} - t_i$, needs $t_i$ and $s_i$, which need $x_1, \dots,
# x_{i-1}$ *after* they were inverted: $n$ passes, one token at a time. This is the masked autoregressive
# flow (MAF, Papamakarios et al., 2017). The inverse autoregressive flow (IAF, Kingma et al., 2016) conditions
# on $z_{<i}$ instead and swaps the costs: sampling in one pass, density in $n$.
#
# **A coupling layer is a two-token autoregressive flow.** Take $n = 2$, with $x_1$ the half that chapter 3's
# mask $b$ keeps and $x_2$ the other half, and let $\psi_1$ give $t_1 = s_1 = 0$: then $z_1 = x_1$ and
# $z_2 = (x_2 + t(x_1)) \odot e^{s(x_1)}$, chapter 3's affine coupling, with the same sum of log-scales. An
# autoregressive flow with $n$ tokens lets every token condition on all the ones before it, where a coupling
# layer lets half of the values condition on the other half.
#
# A small check: a TarFlow block (section 2 builds it) on images of $8 \times 8$ pixels cut into $2 \times 2$
# patches, $n = 16$ tokens of $d = 4$ values, in float64. A new block is the identity (its output layer starts
# at zero), so `perturbed` moves every weight by random noise first, as flowbook's tests do. Its Jacobian by
# autograd, ordered token by token: the cell checks that nothing lies above the diagonal, that each diagonal
# block is itself diagonal, and that the block's own `ldj` equals $\log\lvert\det J\rvert$:

# %%
torch.manual_seed(0)
small = perturbed(TarFlowBlock((1, 8, 8), patch_size=2, width=32, depth=1), scale=0.2).double()
x_small = torch.randn(1, 1, 8, 8, dtype=torch.float64)
z_small, ldj_small = small(x_small, torch.zeros(1, dtype=torch.float64))
tokens_of = lambda img: patchify(img, 2).flatten(1)  # [1, 64] in token order
J = jacobian(lambda v: tokens_of(small(unpatchify(v.view(1, 16, 4), 2, (1, 8, 8)), torch.zeros(1, dtype=v.dtype))[0]),
             tokens_of(x_small)).view(64, 64)
log_det = torch.linalg.slogdet(J)[1].item()
above = J.triu(1).abs().max().item()
in_blocks = torch.block_diag(*[torch.ones(4, 4)] * 16).bool()
off_diag_in_block = J[in_blocks & ~torch.eye(64, dtype=torch.bool)].abs().max().item()
print(f"ldj of the block {ldj_small.item():.10f}, log|det J| by autograd {log_det:.10f}")
print(f"largest entry above the diagonal: {above:.1e}; largest off-diagonal entry inside a diagonal block: "
      f"{off_diag_in_block:.1e}")
assert abs(ldj_small.item() - log_det) < 1e-9 and above == 0 and off_diag_in_block == 0
viz.plot_masks({"J != 0": (J.abs() > 0).float().unsqueeze(0)},
               title="Where the Jacobian of one block is not zero (white); rows: outputs z, columns: inputs x,\n"
                     "both in token order: lower triangular",
               channel_labels=False);

# %% [markdown]
# The picture shows what the derivation says: nothing above the diagonal, a diagonal of scales, and below it
# blocks that the network filled in freely (the first token's four rows have no entries left of the
# diagonal: it sees no earlier token). The black triangles inside each $4 \times 4$ diagonal block are the
# zeros of $\operatorname{diag}(e^{s_i})$: the values of one token do not depend on each other in one block,
# so this Jacobian is even lower triangular, value by value.
#
# ## 2. The TarFlow block
#
# **Tokens.** MNIST's $28 \times 28$ images cut into $4 \times 4$ patches give $n = 49$ tokens of $d = 16$
# values, numbered row by row (`flowbook.layers.tarflow.patchify`, with `unpatchify` its exact inverse):

# %%
digit = test_set.images[:1].float()
tokens = patchify(digit, 4)
print(f"image {list(digit.shape)} -> tokens {list(tokens.shape)}; back: "
      f"{torch.equal(unpatchify(tokens, 4, (1, 28, 28)), digit)}")
viz.show_imgs(tokens[0].view(49, 1, 4, 4).to(torch.uint8), row_size=7,
              title="The 49 tokens of a test digit, in order: tokens 1 to 7 in the first row, 8 to 14 in the second, ...",
              scale=0.6);

# %% [markdown]
# **The network.** One TarFlow block computes every $(t_i, s_i)$ with one causal transformer:
# 1. the tokens are projected to the transformer's width and **shifted right by one position**: the input at
#    position $i$ is $x_{i-1}$ (a learned start vector at position 1), plus a learned position embedding;
# 2. a few pre-norm transformer layers run with a **causal attention mask**: position $i$ may attend to
#    positions $j \le i$;
# 3. a final layer norm and linear map, the map initialised at zero so that a new block is the identity, give
#    $t_i$ and
#    $s_i$, each in $\mathbb{R}^d$; the log-scale is bounded like chapter 3's, $s \leftarrow \tanh(s/e^c)\,
#    e^c$, with one learned $c$ for each of the $d$ values of a token, shared by all tokens.
#
# The mask alone lets position $i$ see its own input; the shift makes that input $x_{i-1}$, so that
# $(t_i, s_i)$ depend on $x_1, \dots, x_{i-1}$ and never on $x_i$, which is what the triangular Jacobian
# needs. The mask, $M_{ij} = 1$ where $j \le i$:

# %%
viz.plot_masks({"causal mask, n = 49": tarflow_layers.causal_mask(49).float().unsqueeze(0)},
               title="Attention mask: query i (row) may attend to key j (column) where white", channel_labels=False);

# %% [markdown]
# **The stack.** A block only lets later tokens depend on earlier ones, so blocks alternate the order:
# every second block reverses the sequence (`flip`), and a token's transformation then depends on tokens on
# both sides. flowbook's `tarflow` model is chapter 2's dequantization followed by four such blocks and a
# standard normal prior. For one image, `encode` adds to `ldj`:
# - chapter 2's dequantization terms, $D \log(1 - 2m) - D\log 256 + D\log(1 - \alpha) - \sum \log
#   r (1 - r)$ (the noise margin $m$, the $\log 256$ of the discrete pixels, the logit margin $\alpha$, and
#   the sum over the $D$ pixels $r$ squeezed into $(\alpha/2, 1 - \alpha/2)$ before the logit);
# - for each block $k$, its sum of log-scales $\sum_{i,j} s^{(k)}_{i,j}$;
# - nothing for cutting into tokens, putting them back (`patchify`, `unpatchify`) or reversing their order
#   (`flip`): these only move values around, a permutation, whose determinant is $\pm 1$;
#
# and the log-likelihood adds the prior, $\log \mathcal{N}(z; 0, I)$. The model and its size:

# %%
tarflow, tar_source, _ = load_trained("tarflow", device=device)
print(f"tarflow: {tar_source}")
print(f"{num_parameters(tarflow):,} parameters in {len(tarflow.flows)} layers:")
for k, layer in enumerate(tarflow.flows):
    if isinstance(layer, TarFlowBlock):
        print(f"  {k}: TarFlowBlock, {layer.num_tokens} tokens of {layer.token_dim}, {len(layer.layers)} transformer "
              f"layers of width {layer.proj_in.out_features}, flip={layer.flip}, {num_parameters(layer):,} parameters")
    else:
        print(f"  {k}: {type(layer).__name__}")

# %% [markdown]
# Section 1 checked a block on $8 \times 8$ images. At MNIST's size we compare only the `ldj` with autograd's
# $\log\lvert\det J\rvert$, for a flipped block with $4 \times 4$ patches and random weights (a narrow one,
# so that autograd's $784 \times 784$ Jacobian is quick; in pixel order this Jacobian is not triangular, and
# `tests/` checks the structure in token order):

# %%
check = perturbed(TarFlowBlock((1, 28, 28), patch_size=4, width=16, depth=1, flip=True), scale=0.1).double()
y = torch.randn(1, 1, 28, 28, dtype=torch.float64)
_, ldj_block = check(y, torch.zeros(1, dtype=torch.float64))
J_block = jacobian(lambda v: check(v.view(1, 1, 28, 28), torch.zeros(1, dtype=v.dtype))[0].flatten(), y.flatten())
print(f"a flipped block on a 28x28 input: ldj {ldj_block.item():.8f}, log|det J| by autograd "
      f"{torch.linalg.slogdet(J_block)[1].item():.8f}")

# %% [markdown]
# ## 3. A TarFlow on MNIST
#
# flowbook's TarFlow is trained by `python -m flowbook.train --model tarflow` on the CPU with chapter 2's
# uniform dequantization, like chapter 3's `simple` flow (the flows of chapters 4 and 6 learn theirs,
# variationally; the runbook `docs/training.md` has the command). Where a
# trained checkpoint is shipped, its training, stage by stage (minutes are wall time, and the stages ran under
# different loads: the first beside another training run, the second on one thread beside the noise-trained
# TarFlow, the later ones with two threads, mostly alone, so their minutes per epoch differ):

# %%
history = training_history("tarflow")
if history:
    print(tabulate([[r["stage"], r["start"], r["epochs"], r["batch_size"], f"{r['peak_lr']:g}", f"{r['minutes']:.0f}",
                     r["hardware"]] for r in history],
                   headers=["stage", "starts from", "epochs", "batch", "peak lr", "minutes", "hardware"]))
else:
    print(f"no shipped checkpoint: this chapter uses {tar_source}")

# %% [markdown]
# ### In the results table
#
# Every shipped model from its results JSON, on the full test set: the flows' test bpd with 8 importance
# samples (the flow-matching model's with one sample through the ODE: chapter 7), the
# parameters and the training images; a model that has no results JSON yet is listed as not evaluated.
# `tarflow_noise` is section 4's model: its number is a bpd of MNIST too, but of a model trained on noisy images.
# `tarflow_vardeq` is the TarFlow with learned dequantization noise and one more stage of training (its training
# images include the TarFlow's), compared with it in "Part of the gap measured" below.

# %%
results = load_results()
rows = [[name, f"{r['test_bpd']:.3f}", f"{r['eval_images']['test']:,}", r["importance_samples"], f"{r['parameters']:,}",
         f"{int(r['images_seen']):,}"] for name, r in results.items()]
for name in ALL_MODELS:
    if name not in results and (checkpoint_file(name) is not None or name == "tarflow"):
        rows.append([name, "not evaluated yet", "-", "-", "-", "-"])
print(tabulate(rows, ["model", "test bpd", "test images", "K", "parameters", "training images"],
               floatfmt=".3f"))  # 1.200, not 1.2

# %%
if "tarflow" in results and "multiscale" in results:
    gap = results["tarflow"]["test_bpd"] - results["multiscale"]["test_bpd"]
    text = (f"On the full test set the TarFlow reaches {results['tarflow']['test_bpd']:.3f} bpd, "
            + (f"{-gap:.3f} better than" if gap < 0 else f"{gap:.3f} behind")
            + f" the multi-scale flow's {results['multiscale']['test_bpd']:.3f}, with "
            f"{results['tarflow']['parameters']:,} parameters against {results['multiscale']['parameters']:,} and "
            f"{int(results['tarflow']['images_seen']):,} training images against "
            f"{int(results['multiscale']['images_seen']):,}.")
else:
    text = ("There is no results JSON for a shipped TarFlow on this machine, so this chapter compares no TarFlow "
            "number with the other models; the demonstration model above is not meant to be compared.")
Markdown(text)

# %% [markdown]
# ### Validation bpd against training images
#
# Would more training close the gap? The runs that made the shipped checkpoints recorded the validation bpd
# (one dequantization sample, the 10,000 validation images) after each epoch they logged (a curve that starts
# later than 49,984 images lacks its first epochs); `docs/validation_curves.csv`
# keeps them for the TarFlow, chapter 4's multi-scale flow and chapter 6's Glow-style flow, against the images seen since each model's
# first training stage began (each later stage restarts its learning-rate schedule, and a curve can jump
# where a stage begins):

# %%
curves = validation_curves()
viz.plot_curves({f"{m} ({max(c[2] for c in pts)} stage{'s' if max(c[2] for c in pts) > 1 else ''})": ([c[0] for c in pts], [c[1] for c in pts])
                 for m, pts in curves.items()},
                "training images seen", "validation bpd (1 sample)",
                title="Validation bpd against training images, shipped flows");

# %%
if "tarflow" in curves and "multiscale" in curves:
    xs, ys, stage = zip(*curves["tarflow"])
    ms = dict((x, y) for x, y, _ in curves["multiscale"])
    text = (f"The TarFlow's validation bpd went from {ys[0]:.3f} after its first epoch ({xs[0]:,} images) to "
            f"{ys[-1]:.3f} after {xs[-1]:,} images")
    # The last stage, measured from where the stage before it ended (or from the first epoch, with one stage).
    k = max([i for i, st in enumerate(stage) if st < stage[-1]], default=0)
    span, fall = xs[-1] - xs[k], ys[k] - ys[-1]
    if span:
        text += (f"; its last stage took it from {ys[k]:.3f}, where the stage before ended, to {ys[-1]:.3f} in "
                 f"{span:,} images" if k else f"; it fell by {fall:.3f} over {span:,} images")
    both = sorted(set(xs) & set(ms))
    if both:
        at = both[-1]
        gap = dict(zip(xs, ys))[at] - ms[at]
        remaining = ys[-1] - ms[max(ms)]
        if span and 10 * fall < remaining:
            text += (f"; another {10 * span:,} images (ten times as many) at that average rate, a fall of "
                     f"{10 * fall:.3f}, would not close the {remaining:.3f} bpd between its last value and the "
                     "multi-scale flow's last")
        text += (f". After {at:,} images, the last point the two curves share, the multi-scale flow stood at "
                 f"{ms[at]:.3f} and the TarFlow at {dict(zip(xs, ys))[at]:.3f}: "
                 + (f"{gap:.3f} bpd behind at equal training images" if gap > 0 else f"{-gap:.3f} bpd ahead"))
    text += (f"; the multi-scale flow ended there." if both and both[-1] == max(ms) else
             f"; the multi-scale flow ended at {ms[max(ms)]:.3f} after {max(ms):,} images.")
    if "glow" in curves:
        gx, gy, _ = curves["glow"][-1]
        tar_at = dict(zip(xs, ys)).get(gx)
        text += (f" Chapter 6's Glow-style flow, a convolutional coupling flow too, stood at {gy:.3f} after its "
                 f"{gx:,} images" + (f", where the TarFlow stood at {tar_at:.3f}." if tar_at is not None else "."))
else:
    text = "`docs/validation_curves.csv` has no TarFlow curve on this machine, so there is nothing to compare."
Markdown(text)

# %% [markdown]
# Three differences between the TarFlow and the multi-scale flow may explain the gap at equal training images
# (not measured one by one; the subsection after the list measures how much of the final test-set gap, not the
# gap at equal training images, one more stage of training with learned dequantization closes, and estimates
# the dequantization's share against an unmatched control), and one that does not:
#
# - **No convolutions.** The coupling networks of chapters 3 to 6 are convolutional: each output sees its
#   neighbourhood through 3x3 filters, with the same weights at every position, a prior that suits images.
#   The transformer sees $n = 49$ tokens of $d = 16$ numbers and has to learn from the data which tokens
#   matter to which (its only hint is a learned embedding of each position).
# - **Inside a patch, only by way of other patches.** A block moves each of a token's $d$ values by a shift
#   and a scale computed from the tokens before it (the first token from the start token alone), so two pixels of one patch act on each other only through
#   the blocks in between. (A version that mixes each patch's values with chapter 6's invertible 1x1
#   convolution after every block did not learn faster in a one-epoch comparison; `docs/training.md` has the
#   numbers.)
# - **Dequantization and scales.** The multi-scale flow learns its dequantization noise (chapter 2's
#   variational dequantization; the results table compares the single-scale flows with and without it,
#   `vardeq` and `simple`, which also differ in their training images) and works at three resolutions, 28x28,
#   14x14 and 7x7, factoring out half of its values once, before the 7x7 scale (chapter 4); the TarFlow has
#   uniform noise and one resolution of 49 patches.
# - **Not size.** The TarFlow has more parameters than the multi-scale flow (1.6 million against 1.1 million,
#   in the results table). The TarFlows of the paper have hundreds of millions of parameters, hundreds of
#   times more, and train for days on accelerators; this one trained for the minutes of the stage table above, on a CPU.

# %% [markdown]
# ### Part of the gap measured: learned dequantization
#
# `tarflow_vardeq` is the TarFlow with a variational dequantization layer (chapter 2) in place of uniform
# noise, in front of the same four blocks: the layer of the multi-scale flow, the same architecture with weights
# of its own. It was not trained from scratch: `python -m flowbook.train --model tarflow_vardeq --init
# checkpoints/tarflow.pt` fills every tensor the two models share (the blocks) with the shipped TarFlow's
# weights, starts the dequantization's coupling layers from their initialisation, and trains both together for
# one more stage.
#
# **Its log-determinant.** The bound is $\log P(x) \ge \mathbb{E}_{u \sim q(\cdot \mid x)}[\log p(x + u) - \log
# q(u \mid x)]$ (chapter 2). The noise $u$ is made from uniform noise $u_0$, whose density is 1 on $[0, 1)^D$: a
# logit takes $u_0$ to $\eta$ (with $r_0 = (1 - \alpha) u_0 + \alpha / 2$, as in chapter 2), four checkerboard
# couplings conditioned on the image take $\eta$ to $\eta'$, and a sigmoid takes $\eta'$ to $u$. By the change
# of variables, $\log q(u \mid x) = -\log\lvert\det \partial u / \partial u_0\rvert$, so `encode` adds to `ldj`
#
# $$-\log q(u \mid x) = D \log(1 - \alpha) - \sum \log r_0 (1 - r_0) + \sum_{k=1}^{4} \log\lvert\det J_k\rvert
#   - \sum \big(\operatorname{softplus}(\eta') + \operatorname{softplus}(-\eta')\big),$$
#
# where the last term is $\sum \log \sigma'(\eta')$, the sigmoid's log-derivative; then the TarFlow's terms of
# section 2, unchanged, with the learned $u$ in place of the uniform one: it is squeezed into $[m, 1 - m)$ as
# before, and $r$ is computed from $(x + m + (1 - 2m) u) / 256$. Fresh, the couplings are the identity, so
# $u = (1 - \alpha) u_0 + \alpha / 2$: the blocks get the uniform noise, moved by at most $\alpha / 2$, and the
# stage starts where the TarFlow ended.
#
# The two TarFlows side by side: the test bpd, and the validation bpd with one dequantization sample (recorded
# in training after the shipped epoch, the best) and with eight (importance sampling, chapter 2, by
# `flowbook.evaluate`). Their difference is what importance sampling recovers of the bound, up to the noise
# drawn and the bfloat16 arithmetic of the validation in training. The training images include the TarFlow's:

# %%
vardeq_history = training_history("tarflow_vardeq")
pair = [name for name in ("tarflow", "tarflow_vardeq") if name in results]
if len(pair) == 2 and vardeq_history:
    for name in pair:
        assert results[name]["eval_images"]["val"] == len(val_set), "the table says the whole validation set"
    print(tabulate([[name, f"{results[name]['test_bpd']:.3f}", f"{results[name]['training']['best_val_bpd_1sample']:.3f}",
                     f"{results[name]['val_bpd']:.3f}",
                     f"{round(results[name]['training']['best_val_bpd_1sample'], 3) - round(results[name]['val_bpd'], 3):.3f}",
                     f"{int(results[name]['images_seen']):,}"] for name in pair],
                   ["model", "test bpd (8 samples)", "val bpd (1 sample)", "val bpd (8 samples)", "1 sample - 8 samples",
                    "training images"], disable_numparse=True))
    control, stage = training_history("tarflow")[-1], vardeq_history[-1]
    print(tabulate([[f"tarflow, stage {control['stage']} (uniform noise)", control["start"], control["epochs"],
                     f"{control['peak_lr']:g}", control["warmup_steps"], f"{control['budget_minutes']:.0f}",
                     f"{control['minutes']:.0f}"],
                    [f"tarflow_vardeq, stage {stage['stage']} (learned noise)", f"{stage['start']}, the TarFlow's last",
                     stage["epochs"], f"{stage['peak_lr']:g}", stage["warmup_steps"], f"{stage['budget_minutes']:.0f}",
                     f"{stage['minutes']:.0f}"]],
                   ["last stage", "starts from", "epochs", "peak lr", "warm-up steps", "budget (min)", "minutes"]))
else:
    print("no evaluated tarflow_vardeq checkpoint on this machine: nothing to compare")

# %% [markdown]
# The test bpd fell, but the new model also had one more stage of training. The TarFlow's own last stage, with
# uniform noise, is the control; it is not a matched one (the second table, whose epochs and minutes count up
# to the shipped epoch: another starting point, peak learning rate, warm-up, budget and number of epochs), and no stage with uniform noise from the TarFlow's last weights was run. The
# validation curves (one sample) of the two last stages, each against the images of its stage, up to the
# shipped epoch; the uniform one starts at zero images from where the stage before it ended (its first epoch
# rises, as the restarts of stages 3 and 4 did), the learned one's first point is after its first epoch (it
# started from the TarFlow's last value, by the identity above; not drawn, as it was not measured). The
# multi-scale flow's best value is dashed:

# %%
def last_stage_curve(name):
    """[images seen in the last stage], [validation bpd, one sample] of the shipped checkpoint `name`, and the
    last validation bpd of the stage before it."""
    history = read_checkpoint(checkpoint_file(name))["meta"]["history"]
    points = history[-1]["val_curve"]
    return [int(x) for x, _ in points], [y for _, y in points], history[-2]["val_curve"][-1][1]


if len(pair) == 2 and vardeq_history:
    x_uni, y_uni, before_uni = last_stage_curve("tarflow")
    x_var, y_var, _ = last_stage_curve("tarflow_vardeq")
    ms_last = results["multiscale"]["training"]["best_val_bpd_1sample"]
    curves_last = {f"tarflow, stage {control['stage']} (uniform noise)": ([0, *x_uni], [before_uni, *y_uni]),
                   f"tarflow_vardeq, stage {stage['stage']} (learned noise)": (x_var, y_var),
                   "multiscale, best": ([0, max(x_uni[-1], x_var[-1])], [ms_last, ms_last])}
    fig = viz.plot_curves(curves_last, "training images in the stage", "validation bpd (1 sample)",
                          title="The last stage of each TarFlow", dashed=("multiscale, best",))
    fig.axes[0].legend(loc="upper right", bbox_to_anchor=(1, 0.82), fontsize=8)  # between the two curves

# %%
if len(pair) == 2 and vardeq_history:
    tar, var = results["tarflow"], results["tarflow_vardeq"]
    drop = tar["test_bpd"] - var["test_bpd"]
    fall_uni, below = before_uni - y_uni[-1], y_uni[-1] - y_var[-1]
    shrink = (tar["training"]["best_val_bpd_1sample"] - tar["val_bpd"]) - (
        var["training"]["best_val_bpd_1sample"] - var["val_bpd"])
    text = (f"One more stage with learned dequantization took the TarFlow's test bpd from {tar['test_bpd']:.3f} "
            f"to {var['test_bpd']:.3f}, {abs(drop):.3f} {'lower' if drop > 0 else 'higher'}, in "
            f"{int(stage['images_seen']):,} images ({stage['minutes']:.0f} minutes on {stage['hardware']}). "
            f"The control, the TarFlow's own last stage with uniform noise, took its validation bpd from "
            f"{before_uni:.4f} to {y_uni[-1]:.4f} in {x_uni[-1]:,} images, a fall of {fall_uni:.4f}; the stage "
            f"with learned noise, which by the identity above started at about {y_uni[-1]:.4f} (not measured), "
            f"ended at {y_var[-1]:.4f}, "
            f"{abs(below):.3f} {'below' if below > 0 else 'above'} it, after {x_var[-1]:,} images.")
    if below > 3 * max(fall_uni, 0):
        text += (f" That is more than three times the control's fall: if a stage with uniform noise from the same "
                 "weights fell as much as the control, most of the difference is the dequantization.")
    text += (f" What eight importance samples recover of the bound {'shrank' if shrink > 0 else 'grew'} by "
             f"{abs(shrink):.3f} (" + ("with the learned noise, one sample's bound is closer to what eight give"
             if shrink > 0 else "learning the noise did not leave less to importance sampling")
             + f"), which is why the one-sample validation gain ({below:.3f}) is larger than the eight-sample one "
             f"({tar['val_bpd'] - var['val_bpd']:.3f}; on the test set, {drop:.3f}).")
    gap = tar["test_bpd"] - results["multiscale"]["test_bpd"]
    if gap > 0:
        closed = min(max(drop, 0), gap)
        text += (f" Of the TarFlow's {gap:.3f} bpd behind the multi-scale flow on the test set (each after all its "
                 f"training, not at equal training images), the stage closed {closed:.3f} ({100 * closed / gap:.0f}%), "
                 f"of which a stage of training like the control would account for about {min(max(fall_uni, 0), closed):.3f} "
                 "(the control's validation fall); "
                 f"{gap - closed:.3f} remain.")
else:
    text = ("There is no evaluated `tarflow_vardeq` checkpoint on this machine, so this chapter does not measure "
            "what learned dequantization does for the TarFlow.")
Markdown(text)


# %% [markdown]
# ### What a likelihood and a sample cost
#
# A likelihood is one parallel pass through every block. A sample runs each block backwards one token at a
# time: $n$ steps per block, each a pass of that block's transformer. Without a cache, step $i$ reruns the
# transformer on the whole sequence, $n$ positions, so a block costs about $n$ times a likelihood's pass; with
# a **key-value cache**, each layer keeps the keys and values of the positions already done and computes only
# the new one, so the steps of a block together do about the work of one pass, in $n$ small pieces. Both
# compute the same map; in float32 they round differently, and with trained weights that can move a rare pixel
# to the neighbouring grey level (the first line below counts such pixels). Times for 64 images on this
# machine (the median of three calls; the slow one without a cache is timed once):

# %%
def timed(fn, repeats=3):
    """The median of `repeats` calls' wall-clock time in seconds, and the last call's result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2], out


batch = test_set.images[:64].to(device)
z64 = torch.randn(tarflow.latent_shape(64), generator=torch.Generator().manual_seed(0)).to(device)


def sample_with(cache):
    for layer in tarflow.flows:
        if isinstance(layer, TarFlowBlock):
            layer.kv_cache = cache
    return tarflow.sample(z64.shape, z_init=z64)


with torch.no_grad():
    ll_s, _ = timed(lambda: tarflow.log_likelihood(batch))
    cached_s, cached = timed(lambda: sample_with(True))
    plain_s, plain = timed(lambda: sample_with(False), repeats=1)
sample_with(True)  # the blocks back to their default, the cache
print(f"pixels that differ between the samples with and without the cache: {(cached != plain).sum().item()} of "
      f"{cached.numel():,} (largest difference, in grey levels: {(cached - plain).abs().max().item()})")
print(tabulate([["likelihood of 64 images", f"{1000 * ll_s:.0f}"],
                ["64 samples, key-value cache", f"{1000 * cached_s:.0f}"],
                ["64 samples, no cache", f"{1000 * plain_s:.0f}"]], ["", "ms"]))
print(f"on {torch.get_num_threads()} CPU threads" if device.type == "cpu" else f"on {torch.cuda.get_device_name()}")
viz.show_imgs(cached[:32], title=f"Samples at temperature 1.0 ({'shipped' if history else 'demonstration'} TarFlow)");

# %%
Markdown(f"On this machine, for 64 images, sampling costs {cached_s / ll_s:.1f} times a likelihood with the cache and "
         f"{plain_s / ll_s:.0f} times without: the {sum(isinstance(f, TarFlowBlock) for f in tarflow.flows)} blocks run "
         f"{tarflow.flows[1].num_tokens} sequential steps each, where the likelihood runs one pass per block. Without the "
         f"cache that is {'close to' if 0.5 < plain_s / ll_s / tarflow.flows[1].num_tokens < 2 else 'far from'} the "
         f"{tarflow.flows[1].num_tokens} times that counting passes predicts (each step reruns a whole pass of its "
         f"block). With the cache the steps add up to about one pass per block, plus the overhead of many small steps; the cache saves "
         f"{100 * (1 - cached_s / plain_s):.0f}% of the sampling time here. The samples above come from the "
         + ("shipped TarFlow." if history else "demonstration model, trained for a few steps: noise, not digits."))

# %% [markdown]
# ## 4. Noise augmentation and denoising
#
# The samples of the flows so far show stray pixels and broken strokes at temperature 1.0 (chapter 5), and
# lowering the temperature trades them for less variety. TarFlow's remedy is to train on images with
# **Gaussian noise** added. flowbook's `tarflow_noise` model scales the pixels to $[-1, 1]$ (bin centres
# $x' = 2(x + \tfrac12)/256 - 1$) and trains on $\tilde x = x' + \sigma \epsilon$, $\epsilon \sim
# \mathcal N(0, I)$ (`flowbook.layers.NoiseAugmentation`; no logit). The flow then learns $p_\sigma$, the
# density of the *noisy* images, which is smoother than that of the images, and its samples are noisy images.
# Below, $\sigma_{\text{grey}} = 128\,\sigma$ is the same noise in grey levels.
#
# **Tweedie's formula** removes the noise in one step. The clean images $x'$ are discrete, with probabilities
# $P(x')$, and $\tilde x = x' + \sigma\epsilon$ has the density $p_\sigma(\tilde x) = \sum_{x'} P(x')\,
# \mathcal N(\tilde x; x', \sigma^2 I)$. Since $\nabla_{\tilde x} \mathcal N(\tilde x; x', \sigma^2 I) =
# \mathcal N(\tilde x; x', \sigma^2 I)\, (x' - \tilde x) / \sigma^2$, and by Bayes' rule
# $P(x' \mid \tilde x) = P(x')\, \mathcal N(\tilde x; x', \sigma^2 I) / p_\sigma(\tilde x)$,
#
# $$\nabla_{\tilde x}\, p_\sigma(\tilde x) = \frac{1}{\sigma^2} \sum_{x'} P(x')\, \mathcal N(\tilde x; x',
#   \sigma^2 I)\, (x' - \tilde x) = \frac{p_\sigma(\tilde x)}{\sigma^2} \sum_{x'} P(x' \mid \tilde x)\,
#   (x' - \tilde x) = \frac{p_\sigma(\tilde x)}{\sigma^2} \left(\mathbb E[x' \mid \tilde x] - \tilde x\right),$$
#
# so that
#
# $$\mathbb E[x' \mid \tilde x] = \tilde x + \sigma^2\, \nabla_{\tilde x} \log p_\sigma(\tilde x).$$
#
# The best guess of the clean image (in squared error) needs only the *score* of the noisy density. A flow
# trained on noisy images gives its own model of that density exactly, $\log p_\sigma(\tilde x) = \log
# \mathcal N(z; 0, I) + \sum_k \sum_{i,j} s^{(k)}_{i,j}$ with $z$ what the blocks make of $\tilde x$, in the
# $[-1, 1]$ units the model sees (flowbook's model also adds a constant for the change to grey levels, which
# the next section explains; a constant changes no gradient), and autograd differentiates it
# (`flowbook.denoise`): the step uses the score of the model's density, exact for that density and as good as
# the model. A
# sample then is: draw $z$, run the blocks backwards to $\tilde x$, take one Tweedie step, and quantize.
#
# The model and its noise level:

# %%
noisy, noisy_source, _ = load_trained("tarflow_noise", device=device)
sigma = noisy.noise_sigma
print(f"tarflow_noise: {noisy_source}")
print(f"sigma = {sigma} in units of the [-1, 1] pixel scale, {sigma * 128:.1f} grey levels")

# %% [markdown]
# Samples before and after the denoising step, and what a few step sizes do: Tweedie's step with $\sigma'$ in
# place of $\sigma$, from no step ($\sigma' = 0$) to twice the training noise. The step grows as
# $\sigma'^2$: at $\sigma' = 2\sigma$ it is four times Tweedie's. Where the model's posterior mean is close
# to the clean image, $\tilde x + 4(\mathbb E[x' \mid \tilde x] - \tilde x) \approx x' - 3\sigma\epsilon$:
# it overshoots and leaves three times the noise, with its sign flipped. The classifier of chapter 7
# judges each set (the share of samples it recognises with probability at least 0.9), next to the samples of
# the TarFlow of section 3 and of chapter 4's multi-scale flow, all at temperature 1.0 (chapter 7's table
# judges other samples of the same models, drawn with another seed, so its shares differ somewhat from these):

# %%
clf = load_classifier()
real = recognisability(clf, test_set.images[:settings.judged_samples])
steps = [0.0, 0.5 * sigma, sigma, 2 * sigma]
samples = {s: sample_denoised(noisy, settings.judged_samples, sigma=s, seed=0) for s in steps}
verdict = {s: recognised(clf, samples[s]) for s in steps}  # [N] bool per step size
scores = {s: verdict[s].float().mean().item() for s in steps}
others = {}  # the uniform TarFlow above and chapter 4's multi-scale flow, at temperature 1.0 with the same seed
for name, model in [("tarflow", tarflow), ("multiscale", load_trained("multiscale", device=device, progress=False)[0])]:
    others[name] = recognisability(clf, sample_grid(model, settings.judged_samples, temperature=1.0, seed=0))
print(tabulate([[f"{s:.3f}" + (" (no step)" if s == 0 else " (the training sigma)" if s == sigma else ""),
                 scores[s]] for s in steps]
               + [[f"{name} (no noise in training)", score] for name, score in others.items()]
               + [["real test digits", real]],
               ["Tweedie step sigma'", f"share recognisable (of {settings.judged_samples})"], floatfmt=".2f"))
viz.show_imgs(torch.cat([samples[s][:8] for s in steps]), row_size=8,
              row_labels=["no step", "sigma' = sigma/2", "sigma' = sigma", "sigma' = 2 sigma"],
              title="The same 8 samples, one row per step size");

# %%
# The same samples at every step size: a share changes only where the step changes a sample's verdict.
n = settings.judged_samples
changed = int(torch.stack([verdict[s] != verdict[0.0] for s in steps]).any(dim=0).sum())
gained, lost = int((verdict[sigma] & ~verdict[0.0]).sum()), int((verdict[0.0] & ~verdict[sigma]).sum())
paired_noise = 2 * math.sqrt(gained + lost) / n  # two standard errors of a paired difference of shares
best = max(steps, key=scores.get)
p_a, p_b = scores[0.0], others["tarflow"]  # two independent sets of samples, from two models
independent_noise = 2 * math.sqrt(max(p_a * (1 - p_a) + p_b * (1 - p_b), 1e-4) / n)
text = (f"The same {n} samples of the `tarflow_noise` model named above are judged at every step size, so the "
        f"shares differ only where a step changes the classifier's verdict on a sample: the three step sizes "
        f"change {changed} of the {n} verdicts between them, and the shares lie within "
        f"{max(scores.values()) - min(scores.values()):.2f} of each other. Tweedie's step at the training "
        f"$\\sigma$ makes {gained} sample{'s' * (gained != 1)} recognisable and {lost} unrecognisable, a change of {scores[sigma] - scores[0.0]:+.2f} in the share, "
        + ("within" if abs(scores[sigma] - scores[0.0]) <= paired_noise else "beyond")
        + f" two standard errors of such a paired difference ({paired_noise:.2f}); the best of the four step "
        f"sizes is $\\sigma' = {best:.3f}$ ({scores[best]:.2f})")
Markdown(text + f". The TarFlow trained without noise scores {others['tarflow']:.2f} and chapter 4's multi-scale flow "
         f"{others['multiscale']:.2f}; real test digits score {real:.2f}."
         + (f" Without the step the noise-trained TarFlow's samples score {scores[0.0]:.2f}, against "
            f"{others['tarflow']:.2f} for the TarFlow trained without noise: a difference of "
            f"{abs(scores[0.0] - others['tarflow']):.2f}, "
            + ("within" if abs(scores[0.0] - others['tarflow']) <= independent_noise else "beyond")
            + f" two standard errors of the difference of two independent shares ({independent_noise:.2f}). A larger difference "
            "would not single out the cause either: the two models differ in more than the noise (the logit, the "
            "training runs)."
            if checkpoint_file("tarflow_noise") else "")
         + ("" if checkpoint_file("tarflow_noise") else " This demonstration model has trained for a few steps only: "
            "its samples are not digits yet, with or without the step."))

# %% [markdown]
# ### Why its likelihood is not a bpd of MNIST
#
# Chapter 2's bound holds for noise that stays inside each pixel's bin: $P(x) = \int_{[0,1)^D} p(x + u)\,
# du \ge \exp \mathbb E_u[\log p(x + u)]$. Gaussian noise leaves the bin. The number the noise-trained flow
# minimises, $-\mathbb E[\log_2 p_\sigma(\tilde x)] / D$, is the cross-entropy of a different, continuous
# dataset, the noisy images. Measure every entropy in grey levels here, as the bpd below are (the noise is
# then $\sigma_{\text{grey}}\epsilon$). A cross-entropy is never below the entropy, and conditioning never
# raises an entropy, so per dimension it is at least $h(\tilde x)/D \ge h(\tilde x \mid x')/D =
# h(\sigma_{\text{grey}}\epsilon)/D = \tfrac12 \log_2(2\pi e\, \sigma_{\text{grey}}^2)$ bits, the noise's own
# entropy.
# (`NoiseAugmentation` adds $D \log(2/256)$ to `ldj`, the change of units from $[-1, 1]$ to grey levels, so
# that its numbers are per grey level like every bpd here; evaluated with uniform noise it also adds chapter
# 2's margin term $D \log(1 - 2m)$. Tweedie's step used the density in $[-1, 1]$ units: a constant does not
# change a gradient.) The same model can
# still be scored honestly: evaluated with uniform noise inside the bins, as `flowbook.evaluate` does, any
# continuous density gives a valid bound on $-\log_2 P(x)/D$; a model that spread its density by $\sigma$
# pays for the mass it puts outside the bins. Both numbers for the model above, on the first test images with
# one noise sample each (an estimate of each quantity), with the uniform TarFlow's for comparison; the first
# number and the last two measure different things:

# %%
images = test_set.images[:settings.eval_images].to(device)
with torch.no_grad():
    with noisy.flows[0].using("gaussian"):  # on purpose: the noise it was trained with
        noisy_nll = noisy.bits_per_dim(images).mean().item()
    noisy_bpd = noisy.bits_per_dim(images).mean().item()  # in eval mode the layer draws uniform noise in the bins
    tar_bpd = tarflow.bits_per_dim(images).mean().item()
noise_entropy = 0.5 * math.log2(2 * math.pi * math.e * (sigma * 128) ** 2)
print(tabulate([["tarflow_noise on Gaussian-noised images (what it was trained on)", f"{noisy_nll:.3f}"],
                ["the noise's own entropy, a floor for the first line (only)", f"{noise_entropy:.3f}"],
                ["tarflow_noise with uniform dequantization: a bpd of MNIST", f"{noisy_bpd:.3f}"],
                ["tarflow (uniform dequantization): a bpd of MNIST", f"{tar_bpd:.3f}"]],
               [f"bits per dimension, first {len(images)} test images, one noise sample", ""], floatfmt=".3f",
               disable_numparse=True))
trained = checkpoint_file("tarflow") is not None and checkpoint_file("tarflow_noise") is not None
Markdown("Both TarFlows above are shipped, trained models. They differ in the noise they were trained with, in the "
         "logit (which only the uniform TarFlow has) and in their training runs: the gap between the last two lines "
         "is what these differences cost together in a bpd of MNIST, and this chapter has not separated them. "
         f"These numbers are on the first {len(images)} test images with one noise sample each; the results table's "
         "are on all 10,000 with 8 importance samples, so the two can differ either way." if trained else
         "At least one of the two TarFlows above is a demonstration model trained for a few steps, so the gap "
         "between the last two lines says more about the short training (and the logit the noise-trained model "
         "lacks) than about the noise; the first two lines hold for any model.")

# %% [markdown]
# ## 5. What changed since RealNVP
#
# - **The networks, not the flow.** TarFlow's layer is MAF's affine autoregressive flow of 2017, and Jet's is
#   RealNVP's affine coupling; what is new is a transformer for $\psi$, with patches as tokens. Jet's ablations
#   (Kolesnikov et al., 2024) find that the width and depth of the network, and many coupling layers, matter
#   more than clever layers.
# - **Scale.** The 2024 models have hundreds of millions of parameters and train for days on accelerators;
#   the one here has 1.6 million and trained for the minutes of section 3's stage table, on a CPU.
# - **Likelihood stayed the flows' strength.** One parallel pass gives an exact log-likelihood (up to the
#   dequantization bound), where chapter 7's flow-matching model needed an ODE solve with hundreds of network
#   evaluations and an estimator. TarFlow's likelihoods on ImageNet beat every other kind of model when it
#   appeared (the paper's claim); on MNIST, with this chapter's small model and CPU budget, the TarFlow stays
#   behind the coupling flows (section 3).
# - **Sampling stayed sequential.** An autoregressive flow samples token by token, block by block; key-value
#   caches make each step cheap (section 3 measured the difference), and the number of sequential steps is
#   still $n$ per block.
# - **Samples need help.** In the TarFlow paper, Gaussian noise augmentation, a denoising step (section 4) and
#   guidance (classifier-free guidance for class-conditional models, and a variant for unconditional ones)
#   made the samples competitive with diffusion models'; section 4 measures what the step and the noise training do
#   for the small models here. The price is a model of noisy images, whose likelihood is no
#   longer that of the data.
#
# ## Summary
#
# - An autoregressive affine flow, $z_i = (x_i + t_i) \odot e^{s_i}$ with $(t_i, s_i)$ from $x_{<i}$, has a
#   block triangular Jacobian and $\log\lvert\det J\rvert = \sum s$, whatever network computes $t$ and $s$;
#   density takes one parallel pass, sampling one pass per token. A coupling layer is the case of two tokens.
# - A TarFlow block computes all $(t_i, s_i)$ with one causal transformer over patches, the inputs shifted by
#   one position; blocks alternate the token order.
# - flowbook's TarFlow is trained on the CPU by `flowbook.train` and evaluated like every other flow here; on
#   this budget it stays behind the multi-scale flow at equal training images (section 3 plots by how much).
#   Learned (variational) dequantization in place of uniform noise, in one more stage, closed part of the
#   final test-set gap (`tarflow_vardeq`; section 3 says how much, against a stage of training with uniform noise).
#   The TarFlow's samples cost $n$ sequential transformer steps per block, which a key-value cache makes cheaper.
# - The noise-trained TarFlow (`tarflow_noise`) trains on Gaussian-noised images and denoises its samples with
#   one Tweedie step, $\tilde x + \sigma^2 \nabla \log p_\sigma(\tilde x)$, with the score of the flow's own
#   density (by autograd); the likelihood of noisy images is
#   not a bpd of MNIST, but the same model evaluated with uniform dequantization gives one.
#
# ## Exercises
#
# ### Exercise 1: the causal mask (implementation, 2 points, about 10 minutes)
#
# Write `causal_mask(n)`: the boolean attention mask [n, n] of a causal transformer, `True` where query $i$
# may attend to key $j$, that is where $j \le i$ (`nn.MultiheadAttention` uses the opposite convention, True
# where attention is forbidden; `scaled_dot_product_attention`, which flowbook uses, this one). The checker
# switches off flowbook's `causal_mask`, compares your mask with the right one for several $n$, and puts it
# into a TarFlow block to check that a token's shift and log-scale do not change when the same or a later
# token does.

# %% tags=["student"]
def causal_mask(n):
    """[n, n] bool: True where query i may attend to key j (j <= i)."""
    raise NotImplementedError("Exercise 1: implement causal_mask")


# %% jupyter={"source_hidden": true} tags=["solution"]
def causal_mask(n):
    """[n, n] bool: True where query i may attend to key j (j <= i)."""
    return torch.ones(n, n, dtype=torch.bool).tril()


# %%
exercises.check_causal_mask(causal_mask)

# %% [markdown]
# ### Exercise 2: inverting an autoregressive layer (implementation, 4 points, about 25 minutes)
#
# Write `ar_inverse(shift_and_log_scale, z)` for latent tokens `z` [B, n, d]: return `(x, log_det)` with
# $x_i = z_i \odot e^{-s_i} - t_i$ computed token by token, where `t, s = shift_and_log_scale(x)` gives
# [B, n, d] tensors whose row $i$ depends only on rows $< i$ of its argument, and `log_det` [B] is the
# log-determinant of the map $z \mapsto x$. The rows not inverted yet may hold anything (zeros, say): pass the
# whole [B, n, d] sequence each time, in z's dtype. Keep `x` differentiable in `z`, through every path (no
# `torch.no_grad`, no `.detach()`, and no in-place write into a tensor that `shift_and_log_scale` has already
# read: write into a copy, or collect the tokens in a list and stack them). The checker switches off the
# TarFlow block's own reverse pass, inverts a random block's output with your function, and checks the round
# trip, and your Jacobian $\partial x / \partial z$ and log-determinant against autograd.

# %% tags=["student"]
def ar_inverse(shift_and_log_scale, z):
    """z [B, n, d] latent tokens -> (x [B, n, d], log_det [B]) for z_i = (x_i + t_i) * exp(s_i)."""
    raise NotImplementedError("Exercise 2: implement ar_inverse")


# %% jupyter={"source_hidden": true} tags=["solution"]
def ar_inverse(shift_and_log_scale, z):
    """z [B, n, d] latent tokens -> (x [B, n, d], log_det [B]) for z_i = (x_i + t_i) * exp(s_i)."""
    x = torch.zeros_like(z)
    log_det = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    for i in range(z.shape[1]):
        t, s = shift_and_log_scale(x)  # row i reads rows < i of x, which are final
        x = x.clone()
        x[:, i] = z[:, i] * torch.exp(-s[:, i]) - t[:, i]
        log_det = log_det - s[:, i].sum(dim=1)
    return x, log_det


# %%
exercises.check_autoregressive_inverse(ar_inverse)

# %% [markdown]
# ### Exercise 3: Tweedie's denoising step (implementation, 3 points, about 15 minutes)
#
# Write `tweedie_step(log_density, x_noisy, sigma)`: return $\tilde x + \sigma^2 \nabla_{\tilde x} \log
# p_\sigma(\tilde x)$ for a batch `x_noisy` [B, ...], where `log_density(x)` returns the [B] log-densities of
# a batch, with the gradient from autograd. Return a tensor without a graph and leave `x_noisy` unchanged; a
# sampler may call your step inside `torch.no_grad()`, so compute the gradient under `torch.enable_grad()`. The
# checker switches off flowbook's `tweedie_denoise` and compares your step with the closed form for a
# Gaussian, where $\mathbb E[x' \mid \tilde x]$ is known, and with autograd on a non-Gaussian density.

# %% tags=["student"]
def tweedie_step(log_density, x_noisy, sigma):
    """log_density(x [B, ...]) -> [B]; x_noisy [B, ...] -> the denoised batch [B, ...]."""
    raise NotImplementedError("Exercise 3: implement tweedie_step")


# %% jupyter={"source_hidden": true} tags=["solution"]
def tweedie_step(log_density, x_noisy, sigma):
    """log_density(x [B, ...]) -> [B]; x_noisy [B, ...] -> the denoised batch [B, ...]."""
    x = x_noisy.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = torch.autograd.grad(log_density(x).sum(), x)[0]
    return (x + sigma ** 2 * score).detach()


# %%
exercises.check_tweedie_step(tweedie_step)

# %% [markdown]
# ### Exercise 4: parallel density, sequential sampling (conceptual, 2 points, about 10 minutes)
#
# Explain, from the formulas of section 1, why the log-likelihood of an autoregressive flow of $n$ tokens
# takes one pass of its network while a sample takes $n$, and why the inverse autoregressive flow has the
# opposite costs. Which of the two would you choose for a model that is trained by maximum likelihood and
# sampled rarely, and which for a model that must sample fast? (Hint: which tokens does $\psi_i$ need, and are
# they known at the start of the computation?)

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** The likelihood of $x$ needs $z_i = (x_i + t_i) \odot e^{s_i}$ for all $i$, and $(t_i, s_i) =
# \psi_i(x_{<i})$ reads only data, all of which is given: one (masked) pass computes every $\psi_i$ at once. A
# sample starts from $z$ and needs $x_i = z_i \odot e^{-s_i} - t_i$, but $(t_i, s_i)$ need $x_{<i}$, which
# exist only after the earlier steps: $n$ passes in order. IAF computes $(t_i, s_i)$ from $z_{<i}$, which a
# sample knows at the start (one pass) but a likelihood must first recover from $x$ one token at a time ($n$
# passes). Maximum-likelihood training evaluates the density at every step, so MAF (and TarFlow) suit it;
# a model that must sample fast, or that is trained by distillation (to imitate another model, on samples it
# draws itself) or by a bound on its own samples (as an IAF posterior in a VAE is), suits IAF.

# %% [markdown]
# ### Exercise 5: what noise augmentation buys and costs (conceptual, 3 points, about 15 minutes)
#
# The TarFlow paper reports that training on $\tilde x = x' + \sigma\epsilon$ and one Tweedie step improve
# the samples. Explain (a) why they can, (b) why the bits per
# dimension the noise-trained flow reaches on noisy images cannot be compared with the bpd of the other
# models, and (c) how you would report a likelihood of MNIST for such a model. (Hint: where does the
# density of the noisy images put mass, and what does chapter 2's bound need of the noise?)

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** (a) With uniform dequantization the flow must fit a density that is nearly flat inside each bin
# and drops sharply at its edges, for every pixel, and its mistakes show as speckles. The noisy images'
# density is the data's convolved with a Gaussian: smooth, easier to fit, with fewer spurious modes;
# sampling it and then moving to $\mathbb E[x' \mid \tilde x]$ with the model's score removes the noise, as
# well as the model knows $p_\sigma$ (a posterior mean is smooth, close to the data's manifold). Whether it
# shows in a given model's samples is a measurement: section 4 made it for the small model here. (b) That number is a cross-entropy of a
# different random variable, the noisy images; it includes about $\tfrac12 \log_2 (2\pi e
# \sigma_{\text{grey}}^2)$ bits per dimension of the noise itself, and Gaussian noise leaves the pixels'
# bins, so it is no bound on $-\log_2 P(x)/D$. (c) Evaluate the same density with uniform noise inside the
# bins (chapter 2's bound, valid for any continuous density, with importance sampling if wanted), as
# `flowbook.evaluate` does: it is a valid bpd of MNIST, usually worse than that of a model trained for it,
# since the noise-trained flow spreads mass outside the bins.

# %% [markdown]
# ## References
#
# - S. Zhai, R. Zhang, P. Nakkiran, D. Berthelot, J. Gu, H. Zheng, T. Chen, M. A. Bautista, N. Jaitly,
#   J. Susskind. *Normalizing flows are capable generative models.* ICML 2025 (arXiv 2412.06329, 2024).
# - J. Gu, T. Chen, D. Berthelot, H. Zheng, Y. Wang, R. Zhang, L. Dinh, M. A. Bautista, J. Susskind, S. Zhai.
#   *STARFlow: Scaling latent normalizing flows for high-resolution image synthesis.* 2025.
# - A. Kolesnikov, A. Susano Pinto, M. Tschannen. *Jet: A modern transformer-based normalizing flow.* 2024.
# - G. Papamakarios, T. Pavlakou, I. Murray. *Masked autoregressive flow for density estimation.* NeurIPS 2017.
# - D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever, M. Welling. *Improved variational
#   inference with inverse autoregressive flow.* NeurIPS 2016.
# - A. Vaswani et al. *Attention is all you need.* NeurIPS 2017.
# - B. Efron. *Tweedie's formula and selection bias.* Journal of the American Statistical Association, 2011.
# - M. Germain, K. Gregor, I. Murray, H. Larochelle. *MADE: Masked autoencoder for distribution estimation.*
#   ICML 2015.

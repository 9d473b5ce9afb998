# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 5: Analysing the trained flows
#
# This chapter puts the reference tutorial's three models side by side: the single-scale flow with uniform
# dequantization (`simple`), with variational dequantization (`vardeq`), and the multi-scale flow
# (`multiscale`). We report their likelihoods, speed and size, look at their samples, interpolate between digits
# in latent space, ask what the multi-scale flow stores at each scale, and look at the noise that variational
# dequantization learned. Chapter 6 then goes beyond RealNVP.
#
# **You will learn**
# - how to report a flow's results: validation and test bpd with importance sampling, on the whole test set,
#   speed and size;
# - what the samples of single- and multi-scale flows show, and what the sampling temperature does;
# - interpolation in latent space, and the information stored by the split-off variables;
# - what distribution variational dequantization learns for the noise.
#
# Every number and picture below is computed by the cells of this notebook or read from the results JSONs of
# the trained checkpoints in `checkpoints/` (the quick-mode models stand in where there are none; the first
# cell says which).

# %% [markdown]
# **Learning objectives.** After this chapter and its exercises you can
# - read a results table: whole-test-set bpd with importance sampling, speed and size, next to the reference's;
# - interpolate between latents on the line and on the sphere, and explain why linear midpoints are atypical
#   (Exercise 1);
# - sample at a temperature, with truncation, and by hand through the layers in reverse (Exercises 2 and 3);
# - argue why bpd and sample quality can disagree (Exercise 4).

# %%
import torch
from IPython.display import HTML, Markdown, display
from tabulate import tabulate

from flowbook import config, exercises, viz
from flowbook.data import load_mnist
from flowbook.evaluate import SLICE_IMAGES, check_slice, inference_time, sampling_time, slice_bpd
from flowbook.layers import SplitFlow
from flowbook.models import MODEL_NAMES, interpolate_latents, num_parameters
from flowbook.pretrained import load_trained
from flowbook.results import REFERENCE_TEST_BPD, load_results

settings = config.settings()
device = config.get_device()
train_set, val_set, test_set = load_mnist()
models, sources = {}, {}
for name in MODEL_NAMES:
    models[name], sources[name], _ = load_trained(name, device=device)
    print(f"{name:10s} {sources[name]}")

# %% [markdown]
# ## Density modeling: the results table
#
# For each model: the bound on $-\log_2 P(x) / D$ on all 10,000 validation and all 10,000 test images, from the
# results JSON that `python -m flowbook.evaluate` wrote for the shipped checkpoint (test: $K = 8$ importance
# samples, chapter 2; validation: one sample), next to the reference tutorial's test bpd after 200 epochs on a
# GPU. Evaluating 10,000 images with $K = 8$ takes tens of minutes on a CPU, so this notebook recomputes only a
# **slice**: the JSON records the bpd of each of the first 256 test images (each image's noise drawn from a
# seed of its own), and the cell recomputes the first ones (32 in quick mode, all 256 in full mode), which
# must agree with the JSON's values for the same images: a check that the weights on screen are the ones
# evaluated. A slice is never compared with the reference.

# %%
shipped = load_results()
rows, live = [], {}
for name, model in config.progress_bar(models.items(), "checking the slices", total=len(models)):
    res = shipped.get(name) if "trained checkpoint" in sources[name] else None
    if res is None:
        live[name] = slice_bpd(model, test_set.images, settings.slice_images)
        rows.append([name, "-", "-", f"{REFERENCE_TEST_BPD[name]:.3f}", "-", f"{live[name]:.3f}", "-"])
        continue
    live[name], recorded = check_slice(model, res, test_set.images, settings.slice_images)  # raises if they differ
    rows.append([name, f"{res['val_bpd']:.3f}", f"{res['test_bpd']:.3f}", f"{REFERENCE_TEST_BPD[name]:.3f}",
                 f"{res['test_bpd'] - REFERENCE_TEST_BPD[name]:+.3f}", f"{live[name]:.3f}", f"{recorded:.3f}"])
slice_images = settings.slice_images or SLICE_IMAGES
headers = ["model", "validation bpd (10,000, K=1)", "test bpd (10,000, K=8)", "reference test bpd (200 epochs)",
           "gap to the reference", f"slice bpd now ({slice_images} images, K=8)", "same images in the JSON"]
HTML(tabulate(rows, headers=headers, tablefmt="html", disable_numparse=True))

# %%
full = {n: shipped[n] for n in models if n in shipped and "trained checkpoint" in sources[n]}
if full:
    best = min(full, key=lambda n: full[n]["test_bpd"])
    display(Markdown(
        f"On the whole test set the best is `{best}` with {full[best]['test_bpd']:.3f} bpd. The gaps to the "
        "reference's 200-epoch results are " + ", ".join(f"{full[n]['test_bpd'] - REFERENCE_TEST_BPD[n]:+.3f} for "
        f"`{n}` ({full[n]['epochs']} epochs)" for n in full) + ". The slice of the first "
        f"{slice_images} test images gives " + ", ".join(f"{live[n]:.3f}" for n in full) + ", lower than the whole "
        "test set for " + ("every model" if all(live[n] < full[n]["test_bpd"] for n in full) else "some models")
        + ": the first test images are easier than the average, and next to the reference a slice would make the "
        "gap look several times smaller than it is."))
else:
    display(Markdown("No shipped results JSON on this machine: the slice values above are not comparable with the "
                     "reference's whole-test-set results."))

# %% [markdown]
# Speed and size, measured now on this machine: the median time of three calls (after two warm-up calls) for
# the likelihood of a batch of 64 test images and for sampling 64 images, in float32 without compilation. On a
# shared machine these times vary from run to run; the README's speed table gives `flowbook.bench`'s numbers
# on an idle machine.

# %%
speed = {}
for name, model in models.items():
    speed[name] = (1000 * inference_time(model, test_set.images[:64], repeats=3),
                   1000 * sampling_time(model, 64, repeats=3), num_parameters(model))
print(f"device: {device}, {torch.get_num_threads()} thread(s), batch 64, float32 eager")
print(tabulate([[n, f"{a:.0f} ms", f"{b:.0f} ms", f"{c:,}"] for n, (a, b, c) in speed.items()],
               headers=["model", "likelihood of 64 images", "sampling 64 images", "parameters"],
               disable_numparse=True))
assert [c for _, _, c in speed.values()] == [335_128, 379_556, 1_062_090]
ratio = speed["multiscale"][0] / speed["vardeq"][0]
Markdown(f"Here the multi-scale flow computes the likelihood of 64 images in {ratio:.2f} times the time of the "
         f"single-scale flow with variational dequantization, with {speed['multiscale'][2] / speed['vardeq'][2]:.1f} "
         "times the parameters; six of its eight couplings run on the 14x14 and 7x7 grids, while all twelve of "
         "`vardeq`'s couplings (four in its dequantization) run on 28x28 (chapter 4).")

# %% [markdown]
# ## Samples
#
# The same random seed for both models; no cherry picking.

# %%
samples = {}
torch.manual_seed(44)
samples["vardeq"] = models["vardeq"].sample([16, 1, 28, 28])
viz.show_imgs(samples["vardeq"], "vardeq: single-scale samples");
torch.manual_seed(44)
samples["multiscale"] = models["multiscale"].sample([16, 8, 7, 7])
viz.show_imgs(samples["multiscale"], "multiscale: multi-scale samples");

# %%
def bright(imgs):  # share of bright pixels (above 127) per image
    return (imgs > 127).float().mean(dim=(1, 2, 3))


real_bright = bright(test_set.images[:1000])
empty = {n: int((bright(x) < 0.02).sum()) for n, x in samples.items()}
Markdown("Measured on the samples above: " + "; ".join(
    f"`{n}`: {empty[n]} of {len(x)} samples have under 2% bright pixels, the median share is {bright(x).median():.1%}"
    for n, x in samples.items()) + f" (the first 1,000 test digits: median {real_bright.median():.1%}, and "
    f"{int((real_bright < 0.02).sum())} of 1,000 under 2%). Look at the two grids for the rest: the single-scale "
    "flow's samples are scattered stroke fragments, the multi-scale flow's are connected, digit-like shapes, not all "
    "of them digits. Both are the models named at the top of the chapter.")

# %% [markdown]
# ## Temperature
#
# Sampling at temperature $T$ draws $z \sim \mathcal N(0, T^2 I)$ (the split layers too), closer to the prior's
# mode for $T < 1$: a common trick with flows, which Kingma and Dhariwal (2018) found to give better-looking
# samples at the cost of diversity. Each row below uses the same latent directions, scaled:

# %%
temperatures = (0.4, 0.7, 1.0)
rows = []
for T in temperatures:
    torch.manual_seed(44)
    rows.append(models["multiscale"].sample([8, 8, 7, 7], temperature=T))
viz.show_imgs(torch.cat(rows), "multiscale at temperature " + ", ".join(map(str, temperatures)) + " (one row each)");

# %%
ink = {T: bright(r) for T, r in zip(temperatures, rows)}
spread = {T: r.float().view(len(r), -1).std(dim=0).mean().item() for T, r in zip(temperatures, rows)}
Markdown("Measured on the rows above: the share of bright pixels (above 127) per image is " +
         ", ".join(f"{ink[T].mean():.1%} at T = {T}" for T in temperatures) + " (the first 256 "
         f"test digits: {(test_set.images[:256] > 127).float().mean():.1%}); the pixel standard deviation across a row's "
         "samples, a measure of their diversity, is " + ", ".join(f"{spread[T]:.0f}" for T in temperatures) +
         " grey levels. At $T = 0$ every sample is the decoding of the mode $z = 0$ (chapter 6 shows it).")

# %% [markdown]
# ## Interpolation in latent space
#
# A flow encodes an image (with one draw of its dequantization noise) to a latent $z = f(x + u)$, so we can
# walk on a straight line between the latents of two training images and decode each point:
# $z_\lambda = (1 - \lambda)\,z_a + \lambda\,z_b$. Another draw of $u$ gives another latent of the same image:
# an image owns a small region of latent space, not a point, and decoding anywhere in it returns the
# image. For the multi-scale flow the latent is the final `[8, 7, 7]` tensor *and* the `[2, 14, 14]` half that
# the split factored out: `encode(..., return_splits=True)` returns both, `sample(..., z_splits=...)` takes both,
# and we interpolate both.

# %%
@torch.no_grad()
def interpolation_grid(model, pairs, num_steps=8):
    """Decoded images along each line, and the norm of the whole latent at each point."""
    rows, norms = [], []
    for a, b in pairs:
        z, _, splits = model.encode(torch.stack([a, b]).to(device), return_splits=True)
        z_line = interpolate_latents(z[:1], z[1:], num_steps)
        split_lines = [interpolate_latents(s[:1], s[1:], num_steps) for s in splits]
        rows.append(model.sample(z_line.shape, z_init=z_line, z_splits=split_lines))
        norms.append(torch.cat([z_line.flatten(1), *[s.flatten(1) for s in split_lines]], dim=1).norm(dim=1))
    return torch.cat(rows), torch.stack(norms).cpu()


pairs = [(train_set.images[0], train_set.images[1]), (train_set.images[2], train_set.images[3])]
grids, path_norms = {}, {}
for name in ("vardeq", "multiscale"):
    torch.manual_seed(42)
    grids[name], path_norms[name] = interpolation_grid(models[name], pairs)
    viz.show_imgs(grids[name], f"{name}: interpolations between training images");

# %%
def path_sentence(name):
    ends, middle = path_norms[name][:, [0, -1]].mean(), path_norms[name][:, 3:5].mean()
    ink_ends = bright(grids[name].view(2, 8, 1, 28, 28)[:, [0, -1]].flatten(0, 1)).mean()
    ink_middle = bright(grids[name].view(2, 8, 1, 28, 28)[:, 3:5].flatten(0, 1)).mean()
    return (f"for `{name}`, the latent norm is {ends:.1f} at the ends and {middle:.1f} in the middle of the lines, "
            f"and the share of bright pixels {ink_ends:.1%} at the ends and {ink_middle:.1%} in the middle")


dims = test_set.images[0].numel()
Markdown(f"Along both lines, " + "; ".join(path_sentence(n) for n in grids) + f". A typical latent has norm about "
         f"$\\sqrt D = {dims ** 0.5:.0f}$ (chapter 6): the midpoint of two nearly orthogonal latents on that shell "
         "lies inside it, at about $1/\\sqrt 2$ of its radius, where no training image's latent lies. The "
         "single-scale flow decodes these midpoints to the white blobs and tangles in its grid, which are no digits; "
         "the multi-scale flow's middle images are digit-like shapes, and its line passes from one digit to another "
         "within a few steps.")

# %% [markdown]
# The end points of each line are the training images themselves, for every model: the flow is invertible, and
# with the split-off halves the multi-scale flow's latent is the whole image too. Let us check that claim:

# %%
with torch.no_grad():
    for name, model in models.items():
        z, _, splits = model.encode(train_set.images[:4].to(device), return_splits=True)
        reconstructed = model.sample(z.shape, z_init=z, z_splits=splits).cpu()
        mismatch = int((reconstructed != train_set.images[:4]).sum())
        print(f"{name:10s} pixels that differ after encode and decode: {mismatch} of {reconstructed.numel():,}")
        assert mismatch == 0, f"{name}: encoding then decoding must give back the image"

# %% [markdown]
# ## What do the scales store?
#
# Fix the final `[8, 7, 7]` latent and let only the split-off `[2, 14, 14]` variables vary: each row below
# shares its final latent, and the eight images differ only in the variables factored out at the split.

# %%
torch.manual_seed(44)
rows = []
for _ in range(3):
    z_final = torch.randn(1, 8, 7, 7, device=device).expand(8, -1, -1, -1)
    rows.append(models["multiscale"].sample(z_final.shape, z_init=z_final))
grid = torch.cat(rows)
viz.show_imgs(grid, "Each row: one final latent, eight draws of the split-off variables");

# %%
within_row = torch.stack([r.float().std(dim=0).mean() for r in rows]).mean().item()
across_rows = grid.float().view(3, 8, -1).mean(dim=1).std(dim=0).mean().item()
verdict = ("so the final latent carries more of the image than the split-off variables do" if across_rows > within_row
           else "so this model has not yet learned to put the shape into the final latent (a quick-mode model "
                "trained for a few dozen steps rarely has)")
Markdown(f"The mean pixel standard deviation within a row is {within_row:.1f} grey levels; between the rows' "
         f"average images it is {across_rows:.1f}, {verdict}. (In the reference tutorial's fully trained "
         "multi-scale flow, each row shows one digit, the split-off variables changing only details of the strokes.)")

# %% [markdown]
# ## The learned dequantization noise
#
# The dequantization layer turns each integer pixel $x$ into a continuous value $v = x + u$. Uniform
# dequantization draws $u$ evenly from $[0, 1)$ whatever the pixel. Variational dequantization learns
# $q(u \mid x)$, and the bound of chapter 2, $\log P(x) \ge \mathbb E_{q}[\log p(x + u) - \log q(u \mid x)]$,
# is tight when $q(u \mid x)$ equals the flow's own conditional density of $u$ given $x$: training moves the noise
# to where the flow puts its density within each unit interval. Where does the learned noise differ from uniform
# most? Here is $u$ for the background pixels and the stroke centres, from 1,000 test images, under `vardeq` (the
# printed table covers all pixel values):

# %%
imgs = test_set.images[:1000].to(device)
torch.manual_seed(0)
with torch.no_grad():
    ldj = torch.zeros(len(imgs), device=device)
    u_learned, _ = models["vardeq"].flows[0].dequant_noise(imgs, ldj)
x_flat, u_flat = imgs.flatten().cpu(), u_learned.flatten().cpu()
assert 0 <= u_flat.min() and u_flat.max() <= 1


def ks_from_uniform(u):  # the largest gap between the noise's distribution function and the uniform one
    u, _ = u.sort()
    return (torch.arange(1, len(u) + 1) / len(u) - u).abs().max().item()


groups = {"0 (background)": x_flat == 0, "1..9": (x_flat >= 1) & (x_flat <= 9),
          "10..247": (x_flat >= 10) & (x_flat <= 247), "248..255 (stroke centres)": x_flat >= 248}
stats = {g: (m.float().mean().item(), u_flat[m]) for g, m in groups.items()}
print(tabulate([[g, f"{share:.1%}", f"{u.mean():.3f}", f"{u.std():.3f}", f"{(u < 0.1).float().mean():.1%}",
                 f"{(u > 0.9).float().mean():.1%}", f"{ks_from_uniform(u):.3f}"] for g, (share, u) in stats.items()],
               headers=["pixel value x", "share of pixels", "mean u", "std u", "u < 0.1", "u > 0.9",
                        "distance from uniform (KS)"], disable_numparse=True))
print("uniform noise: mean 0.500, std 0.289, 10.0% below 0.1 and 10.0% above 0.9, distance 0")
viz.plot_histogram({g: u for g, (_, u) in stats.items() if g.startswith(("0 ", "248"))}, bins=50,
                   xlabel="learned dequantization noise u (uniform dequantization: flat at density 1)",
                   title="vardeq: the noise it learned for background pixels and for stroke centres");

# %%
u0, u_top = stats["0 (background)"][1], stats["248..255 (stroke centres)"][1]
Markdown(f"The learned noise differs from uniform most for the background: for $x = 0$, "
         f"{stats['0 (background)'][0]:.0%} of all pixels, it puts {(u0 < 0.1).float().mean():.0%} of its mass "
         f"below $u = 0.1$ (mean {u0.mean():.3f}), so a dequantized background pixel stays just above 0. For the "
         f"stroke centres ($x \\ge 248$) it is close to uniform (distance {ks_from_uniform(u_top):.3f} against "
         f"{ks_from_uniform(u0):.3f}), a little away from the borders: "
         f"{((u_top < 0.1) | (u_top > 0.9)).float().mean():.1%} within 0.1 of them, against 20% for uniform noise. "
         "How much of `vardeq`'s lower bpd comes from this the figure cannot say: the two single-scale models were "
         "also trained for different budgets (chapter 6 prints each one's history).")

# %% [markdown]
# ## Discussion and where to go next
#
# **Samples.** Unlike a VAE, whose decoder adds independent noise to every pixel and so tends to blur, a flow
# maps the prior through an exact, invertible function and can represent sharp, multi-modal distributions;
# samples are as sharp as the model's density. Yet they are far from perfect: not every sample is a digit,
# and a small difference in bpd can hide a large difference in samples (exercise 4).
#
# **How big are these differences?** Neighbouring models in the table above differ by a few hundredths of a
# bit per dimension. That is the scale at which generative models compete: on CIFAR-10 the flows of the
# references below report 3.49 (RealNVP), 3.35 (Glow) and 3.08 (Flow++) bits per dimension on the test set.
#
# **Beyond RealNVP.** Glow (Kingma and Dhariwal, 2018) adds learned 1x1 convolutions and activation
# normalisation between couplings; Flow++ (Ho et al., 2019) adds variational dequantization and stronger
# coupling networks; neural spline flows (Durkan et al., 2019) replace the affine coupling with monotone
# rational-quadratic splines; continuous normalizing flows use neural ODEs, a flow with infinitely many
# infinitesimal layers; and flows apply beyond images, for example to molecules and graphs (Lippe and
# Gavves, 2021), and to discrete data through dequantization (Hoogeboom et al., 2020).
#
# ## Summary
#
# - Results are reported as validation and test bpd with importance sampling on the whole test set, next to
#   speed and size (the tables above, for the models named at the top). A slice of the first test images
#   scores lower and must not stand next to the reference's whole-test-set numbers.
# - Single-scale flows model local texture well and global shape poorly; the multi-scale flow's final
#   latent can carry the shape, and the split-off variables the details (measured above for these models).
# - Lower sampling temperatures reduce the samples' diversity (measured above), down to one image, the decoded
#   mode, at $T = 0$.
# - An image and its dequantization noise map to a whole latent exactly (for the multi-scale flow, with the
#   split-off half); decoding gives the image back, so interpolations start and end at real images. Their
#   midpoints lie inside the prior's typical shell.
# - Variational dequantization learns where in each unit interval to put the noise; the model here changed it
#   most for the background, keeping dequantized black pixels just above 0.
#
# ## Exercises
#
# ### Exercise 1: interpolation on the line and on the sphere (implementation, 4 points, about 30 minutes)
#
# The interpolations above walk on a straight line. In $D$ dimensions a standard normal latent has norm close
# to $\sqrt D$ (the "typical shell"), and two independent latents are nearly orthogonal, so the midpoint of the
# line between them has norm close to $\sqrt{D/2}$: a region the prior almost never samples. Spherical linear
# interpolation (slerp; Shoemake, 1985, used for generative models by White, 2016) walks on the great circle
# instead: with $\Omega$ the angle between the flattened latents, $\cos \Omega = \frac{z_a \cdot z_b}{|z_a|\,|z_b|}$,
# $$z_\lambda = \frac{\sin((1-\lambda)\Omega)}{\sin \Omega}\, z_a + \frac{\sin(\lambda \Omega)}{\sin \Omega}\, z_b .$$
# Write `interpolate(z_a, z_b, num_steps, spherical=False)` for latents of shape `[1, C, H, W]`, returning
# `[num_steps, C, H, W]` from `z_a` to `z_b` in equal steps of $\lambda$, both ends included: on the line by
# default, on the great circle with `spherical=True`. Then (a) check numerically, for two latents of the
# multi-scale flow's shape, that the slerp midpoint keeps the norm of the ends and the line's does not, and
# (b) decode both paths between two test digits with `models["multiscale"]` and compare the middle images.
# The checker switches off `interpolate_latents`.

# %% tags=["student"]
def interpolate(z_a, z_b, num_steps, spherical=False):
    """[1, C, H, W] x 2 -> [num_steps, C, H, W], from z_a to z_b; on the great circle if spherical."""
    raise NotImplementedError("Exercise 1: implement interpolate")


# %% jupyter={"source_hidden": true} tags=["solution"]
def interpolate(z_a, z_b, num_steps, spherical=False):
    """[1, C, H, W] x 2 -> [num_steps, C, H, W], from z_a to z_b; on the great circle if spherical."""
    lam = torch.linspace(0, 1, num_steps, dtype=z_a.dtype).view(-1, 1, 1, 1)
    if not spherical:
        return (1 - lam) * z_a + lam * z_b
    a, b = z_a.flatten(), z_b.flatten()
    omega = torch.arccos((a @ b / (a.norm() * b.norm())).clamp(-1, 1))  # one angle for the whole latent
    return (torch.sin((1 - lam) * omega) * z_a + torch.sin(lam * omega) * z_b) / torch.sin(omega)


# %%
exercises.check_interpolate(interpolate)

# %% [markdown]
# ### Exercise 2: temperature and truncation (implementation, 4 points, about 30 minutes)
#
# Temperature is one way to trade diversity for cleaner samples; the *truncation trick* of GANs (Brock et al.,
# 2019) is another: draw each entry of $e \sim \mathcal N(0, 1)$ again while it lies outside $[-r, r]$ (the
# truncated normal), so that no entry is extreme but the rest of the distribution keeps its shape. Write
# `temperature_latent(shape, temperature, truncation=None)` returning a float32 $z = T e$ of the given shape,
# with $e \sim \mathcal N(0, I)$, or $e$ from the normal truncated to $[-r, r]$ when `truncation=r` is given
# (clamping is not the same: it piles the tails onto $\pm r$). Then (a) derive the standard deviation of the
# truncated normal, $\sqrt{1 - 2 r \varphi(r) / (2\Phi(r) - 1)}$, and check it on your samples; (b) for the
# multi-scale flow's final latent (`models["multiscale"].latent_shape(n)`, $D_z = 392$ numbers: the other 392
# were split off), compare the norm of latents at
# $T = 0.7$ with that of truncated latents ($T = 1$, $r = 1$): which stays closer to the typical shell of the
# prior, $\|z\| \approx \sqrt{D_z}$? (c) Decode a row of each with `models["multiscale"].sample(shape, z_init=z)`
# and compare them with the temperature rows above.

# %% tags=["student"]
def temperature_latent(shape, temperature, truncation=None):
    """A float32 tensor of `shape`: temperature * e, e ~ N(0, I), truncated to [-truncation, truncation] if given."""
    raise NotImplementedError("Exercise 2: implement temperature_latent")


# %% jupyter={"source_hidden": true} tags=["solution"]
def temperature_latent(shape, temperature, truncation=None):
    """A float32 tensor of `shape`: temperature * e, e ~ N(0, I), truncated to [-truncation, truncation] if given."""
    e = torch.randn(shape)
    if truncation is not None:
        outside = e.abs() > truncation
        while outside.any():  # draw the entries outside [-r, r] again, until none is left
            e[outside] = torch.randn(int(outside.sum()))
            outside = e.abs() > truncation
    return e * temperature


# %%
exercises.check_temperature_latent(temperature_latent)

# %% [markdown]
# ### Exercise 3: sampling by hand (implementation, 2 points, about 15 minutes)
#
# Write `sample_images(model, num_images, temperature)` without `model.sample` (the checker switches it off):
# draw $z \sim \mathcal N(0, T^2 I)$ of shape `model.latent_shape(num_images)`, then run every layer of
# `model.flows` in reverse order with `reverse=True`; split layers draw their half at the same temperature
# (`temperature=...`). Return the integer images. Drawn in this order, with the same seed, your images equal
# `model.sample`'s exactly, which is what the checker compares.

# %% tags=["student"]
def sample_images(model, num_images, temperature):
    """Integer images [num_images, C, H, W] from `model` at `temperature`."""
    raise NotImplementedError("Exercise 3: implement sample_images")


# %% jupyter={"source_hidden": true} tags=["solution"]
def sample_images(model, num_images, temperature):
    """Integer images [num_images, C, H, W] from `model` at `temperature`."""
    z = torch.randn(model.latent_shape(num_images)) * temperature
    ldj = torch.zeros(num_images)
    with torch.no_grad():
        for flow in reversed(model.flows):
            if isinstance(flow, SplitFlow):
                z, ldj = flow(z, ldj, reverse=True, temperature=temperature)
            else:
                z, ldj = flow(z, ldj, reverse=True)
    return z


# %%
exercises.check_sample_images(sample_images)

# %% [markdown]
# ### Exercise 4: bpd and sample quality (conceptual, 2 points, about 15 minutes)
#
# In the reference tutorial's results, the multi-scale flow's samples look much more like digits, yet its test
# bpd (1.026) is only 4% lower than the single-scale flow's with variational dequantization (1.066). Why can a
# small difference in bpd come with a large difference in samples?

# %% [markdown] jupyter={"source_hidden": true} tags=["answer"]
# **Answer.** bpd averages the log-likelihood over all 784 pixels, and most of it is spent on local detail:
# the exact grey levels of stroke edges and the (near-deterministic) black background. Global structure, whether
# the strokes form a digit, is a small number of bits per image, a tiny fraction of the roughly 800 bits an
# image costs at about one bit per pixel.
# A model can get the local statistics nearly right (good bpd) while sampling incoherent shapes, so bpd
# differences of 0.04 can hide very different samples; likelihood and sample quality are related but
# distinct criteria (Theis et al., 2016).

# %% [markdown]
# ## References
#
# - L. Dinh, J. Sohl-Dickstein, S. Bengio. *Density estimation using Real NVP.* ICLR 2017.
# - D. P. Kingma, P. Dhariwal. *Glow.* NeurIPS 2018 (temperature).
# - J. Ho et al. *Flow++.* ICML 2019 (variational dequantization).
# - L. Theis, A. van den Oord, M. Bethge. *A note on the evaluation of generative models.* ICLR 2016.
# - C. Durkan, A. Bekasov, I. Murray, G. Papamakarios. *Neural spline flows.* NeurIPS 2019.
# - E. Hoogeboom, T. S. Cohen, J. M. Tomczak. *Learning discrete distributions by dequantization.* 2020.
# - P. Lippe, E. Gavves. *Categorical normalizing flows via continuous transformations.* ICLR 2021.
# - R. T. Q. Chen, Y. Rubanova, J. Bettencourt, D. Duvenaud. *Neural ordinary differential equations.*
#   NeurIPS 2018 (continuous flows).
# - P. Lippe. *Normalizing Flows for Image Modeling*, UvA Deep Learning Tutorial 11 (CC BY-SA).
# - K. Shoemake. *Animating rotation with quaternion curves.* SIGGRAPH 1985 (slerp).
# - T. White. *Sampling generative networks.* arXiv:1609.04468, 2016.
# - A. Brock, J. Donahue, K. Simonyan. *Large scale GAN training for high fidelity natural image synthesis.*
#   ICLR 2019 (the truncation trick).
# - MNIST: Y. LeCun, C. Cortes, C. J. C. Burges, *The MNIST database of handwritten digits* (CC BY-SA 3.0).

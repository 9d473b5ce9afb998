"""Plotting helpers for the chapters. Each returns a matplotlib Figure (shown as PNG in Jupyter);
end a notebook line with `;` to avoid showing it twice."""
from __future__ import annotations

import math

import matplotlib
import matplotlib.patches
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import torch
import torchvision

from flowbook.layers import Dequantization
from flowbook.models import num_parameters


_FRAME_RGB = [0.35, 0.55, 0.85]  # the frame between images in `show_imgs`: a blue that no grey image has


def _to_display(imgs) -> torch.Tensor:
    imgs = torch.stack(list(imgs)) if not isinstance(imgs, torch.Tensor) else imgs
    imgs = imgs.detach().cpu()
    if not imgs.is_floating_point():
        imgs = imgs.float() / 255
    return imgs


def show_imgs(imgs, title: str | None = None, row_size: int = 8, scale: float = 1.2, row_labels=None):
    """A grid of images [N, C, H, W] (int 0..255 or float 0..1), `row_size` per row; `row_labels`, one string
    per row, written left of the rows."""
    imgs = _to_display(imgs)
    nrow = min(len(imgs), row_size)
    ncol = math.ceil(len(imgs) / nrow)
    if row_labels is not None and len(row_labels) != ncol:
        raise ValueError(f"{len(row_labels)} row labels for {ncol} rows")
    # The frame between images is coloured (no grey level), so that a constant grey image stays visible.
    padding = 2
    grid = torchvision.utils.make_grid(imgs, nrow=nrow, pad_value=-1.0, padding=padding)
    frame = (grid == -1.0).all(dim=0)
    grid[:, frame] = torch.tensor(_FRAME_RGB[:grid.shape[0]] if grid.shape[0] == 3 else [0.5]).view(-1, 1)
    fig, ax = plt.subplots(figsize=(scale * nrow + (1.6 if row_labels else 0), scale * ncol + (0.4 if title else 0)))
    ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest", vmin=0, vmax=1)
    if row_labels:
        height = imgs.shape[2] + padding
        ax.set_yticks([padding + r * height + imgs.shape[2] / 2 for r in range(ncol)], row_labels)
        ax.set_xticks([])
        ax.tick_params(length=0)
        for spine in ax.spines.values():
            spine.set_visible(False)
    else:
        ax.axis("off")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_masks(masks: dict, title: str = "Coupling masks: white is kept (and conditions), black is transformed",
               channel_labels: bool = True):
    """Side by side masks {name: [C, H, W] tensor}, one panel per channel (labelled with its channel unless
    `channel_labels` is False)."""
    panels = [(f"{name}, channel {c}" if channel_labels else name, m[c]) for name, m in masks.items()
              for c in range(m.shape[0])]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
    for ax, (label, m) in zip(np.atleast_1d(axes), panels):
        ax.imshow(m.cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(label, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_dequantization(quants: int = 8, prior=None, title: str | None = None, ax=None):
    """Density over y = logit(...) of `Dequantization(quants)` when value k has probability prior[k]
    (uniform by default): each value owns the slice of the y axis that quantizes to it."""
    prior = np.full(quants, 1 / quants) if prior is None else np.asarray(prior, dtype=float) / np.sum(prior)
    y = torch.linspace(-4, 4, 2001, dtype=torch.float64).view(-1, 1, 1, 1)
    x, log_det = Dequantization(quants=quants)(y, torch.zeros(len(y), dtype=torch.float64), reverse=True)
    x, y = x.flatten().numpy(), y.flatten().numpy()
    density = prior[x] * np.exp(log_det.numpy())  # mass prior[k] spread over a slice of width 1 in x + u
    fig = ax.figure if ax is not None else plt.subplots(figsize=(7, 3))[0]
    ax = ax or fig.axes[0]
    for k in np.unique(x):
        sel = x == k
        ax.fill_between(y[sel], density[sel], color=f"C{k % 10}", alpha=0.5, label=str(k))
    ax.plot(y, density, color="black", linewidth=1)
    ax.set_xlabel("y (output of the dequantization layer)")
    ax.set_ylabel("density p(y)")
    ax.set_title(title or f"Dequantization of {quants} values" + (" (uniform prior)" if prior.std() == 0 else ""))
    ax.legend(title="value", ncol=2, fontsize=8)
    ax.set_xlim(y.min(), y.max())
    fig.tight_layout()
    return fig


def plot_scaling_factors(factors=(0.5, 1.0, 2.0)):
    """s = tanh(s_raw / exp(f)) * exp(f) for a few bounds exp(f): near the identity, then saturating."""
    x = torch.linspace(-5, 5, 401)
    fig, axes = plt.subplots(1, len(factors), figsize=(3.6 * len(factors), 3), sharey=True)
    for ax, bound in zip(axes, factors):
        ax.plot(x, torch.tanh(x / bound) * bound, label="bounded s")
        ax.plot(x, x, "--", color="gray", linewidth=1, label="raw s")
        ax.set_ylim(-3, 3)
        ax.set_title(f"exp(scaling_factor) = {bound}")
        ax.set_xlabel("network output s_raw")
    axes[0].set_ylabel("log-scale s")
    axes[0].legend()
    fig.tight_layout()
    return fig


def plot_histogram(values: dict, bins: int = 128, xlabel: str = "", title: str = "", ymax: float | None = None,
                   vline: float | None = None):
    """Overlaid density histograms of {label: 1-D array} (seaborn's histplot, one colour per label).
    ymax: cut the density axis there, so that one narrow peak does not flatten the others; vline: an x to mark."""
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(8, 3))
    for label, v in values.items():
        v = np.asarray(torch.as_tensor(v).detach().cpu().flatten(), dtype=float)
        sns.histplot(v, bins=bins, stat="density", alpha=0.45, element="step", label=label, ax=ax)
    if ymax is not None:
        ax.set_ylim(0, ymax)
    if vline is not None:
        ax.axvline(vline, color="black", linestyle="--", linewidth=1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density" + (f" (cut at {ymax:g})" if ymax is not None else ""))
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(curves: dict, xlabel: str, ylabel: str, title: str = "", logx: bool = False, logy: bool = False,
                dashed=()):
    """Line plot of {label: (xs, ys)}; the curves whose labels are in `dashed` drawn as dashed reference lines."""
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o" if len(xs) < 20 and label not in dashed else None, label=label,
                linestyle="--" if label in dashed else "-")
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _density_panel(ax, log_prob, lim: float, grid: int, label: str):
    """exp(log_prob) on a grid x grid square of side 2 lim, on ax."""
    g = torch.linspace(-lim, lim, grid)
    xx, yy = torch.meshgrid(g, g, indexing="xy")
    with torch.no_grad():
        dens = log_prob(torch.stack([xx.flatten(), yy.flatten()], dim=1)).detach().exp().view(grid, grid)
    ax.imshow(dens.cpu().numpy(), origin="lower", extent=[-lim, lim, -lim, lim], cmap="viridis")
    ax.set_title(label)


def _scatter_panel(ax, pts, lim: float, label: str):
    pts = pts.detach().cpu()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.4)
    ax.set_xlim(-lim, lim), ax.set_ylim(-lim, lim)
    ax.set_title(label)


def _finish_2d(fig, axes, title: str):
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xlabel("x1")
    axes[0].set_ylabel("x2")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_density_2d(log_prob, data=None, samples=None, lim: float = 3.0, title: str = ""):
    """Learned density exp(log_prob) on a grid, beside the data and the model's samples ([N, 2] each)."""
    panels = [(label, pts) for label, pts in (("data", data), ("samples from the flow", samples)) if pts is not None]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(3.6 * (1 + len(panels)), 3.4))
    axes = np.atleast_1d(axes)
    _density_panel(axes[0], log_prob, lim, 200, "learned density p(x)")
    for ax, (label, pts) in zip(axes[1:], panels):
        _scatter_panel(ax, pts, lim, label)
    return _finish_2d(fig, axes, title)


def plot_training_curves(curves: dict, title: str = "Training: bits per dimension of each batch"):
    """Training bpd against step for {model name: [(step, bpd), ...] or None}; a model without a curve
    (loaded from a checkpoint) is named in the legend as such."""
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for name, curve in curves.items():
        if curve:
            steps, bpd = zip(*curve)
            ax.plot(steps, bpd, label=name)
        else:
            ax.plot([], [], label=f"{name} (loaded from a checkpoint: no curve)")
    ax.set_yscale("log")  # the first steps' bpd is many times the last ones': a log axis keeps both readable
    low, high = ax.get_ylim()
    ticks = [t for t in (1, 1.2, 1.5, 2, 3, 5, 10, 20, 30, 50) if low <= t <= high]
    ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlabel("training step")
    ax.set_ylabel("bits per dimension (log scale)")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _box(ax, x, y, text, color="#dbe9f6", w=1.6, h=0.5, fontsize=9):
    ax.add_patch(matplotlib.patches.FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05",
                                                   facecolor=color, edgecolor="#333333"))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def _arrow(ax, start, end, text=None):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="->", color="#333333", lw=1.2))
    if text:
        ax.text((start[0] + end[0]) / 2 + 0.08, (start[1] + end[1]) / 2, text, fontsize=8, color="#555555")


def draw_coupling_layer():
    """The computation graph of one affine coupling layer (forward direction), as a figure."""
    fig, ax = plt.subplots(figsize=(9, 4.2))
    _box(ax, 0, 3, "z  [B, C, H, W]")
    _box(ax, -1.6, 2, "kept half\nz * mask", "#e8f4e0")
    _box(ax, 1.6, 2, "transformed half\nz * (1 - mask)", "#fbe3d6")
    _box(ax, -1.6, 1, "network NN\n(gated ResNet)", "#f2f2f2")
    _box(ax, -1.6, 0, "s = tanh(s'/e^c) e^c,  t", "#f2f2f2", w=2.2)
    _box(ax, 1.6, 0, "(z + t) * exp(s)", "#fbe3d6")
    _box(ax, 0, -1, "z'  (kept half unchanged)")
    _box(ax, -3.6, -1, "ldj += sum(s)", "#fff6cc", w=1.5)
    _arrow(ax, (-0.3, 2.75), (-1.3, 2.25))
    _arrow(ax, (0.3, 2.75), (1.3, 2.25))
    _arrow(ax, (-1.6, 1.75), (-1.6, 1.25))
    _arrow(ax, (-1.6, 0.75), (-1.6, 0.25), "s', t")
    _arrow(ax, (1.6, 1.75), (1.6, 0.25))
    _arrow(ax, (-0.5, 0), (0.8, 0), "s, t")
    _arrow(ax, (1.3, -0.25), (0.3, -0.75))
    ax.annotate("", xy=(-0.7, -1), xytext=(-2.45, 2), arrowprops=dict(arrowstyle="->", color="#2a7a2a", lw=1.2,
                                                                      connectionstyle="arc3,rad=0.35"))
    _arrow(ax, (-2.3, -0.25), (-3.3, -0.75))
    ax.text(-3.2, 0.9, "kept half\npassed through", fontsize=8, color="#2a7a2a")
    ax.set_xlim(-4.6, 3.2), ax.set_ylim(-1.6, 3.5)
    ax.axis("off")
    ax.set_title("An affine coupling layer, forward: the kept half conditions a scale and shift of the other half")
    fig.tight_layout()
    return fig


def _layer_label(layer) -> str:
    name = type(layer).__name__
    if name == "CouplingLayer":
        kind = "checkerboard" if layer.mask.shape[1] == 1 else "channel"
        width = next(m for m in layer.network.modules() if isinstance(m, torch.nn.Conv2d)).out_channels
        return f"coupling ({kind}, {width} hidden)"
    if name == "GlowStep":
        coupling = layer.flows[-1]
        width = next(m for m in coupling.network.modules() if isinstance(m, torch.nn.Conv2d)).out_channels
        return f"Glow step: actnorm, 1x1 conv, coupling ({width} hidden)"
    if name == "TarFlowBlock":
        order = ", flipped" if layer.flip else ""
        return (f"TarFlow block: {layer.num_tokens} tokens of {layer.token_dim}, {len(layer.layers)} layers x "
                f"{layer.proj_in.out_features}{order}")
    if name == "VariationalDequantization":
        return f"variational dequantization ({len(layer.flows)} couplings)"
    return {"Dequantization": "dequantization (uniform)", "SqueezeFlow": "squeeze", "SplitFlow": "split: half to the prior"}.get(name, name)


@torch.no_grad()
def draw_architectures(models: dict):
    """The layers of each model in {name: ImageFlow} from image (top) to latent (bottom), with the shape each
    layer outputs, traced through the models themselves."""
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 7.2))
    colors = {"coupling": "#dbe9f6", "Glow": "#e6def5", "TarFlow": "#f6e0ec", "variational": "#e8f4e0",
              "dequantization": "#e8f4e0", "squeeze": "#fff6cc", "split": "#fbe3d6"}
    for ax, (name, model) in zip(np.atleast_1d(axes), models.items()):
        z = torch.zeros(1, *model.img_shape, dtype=torch.int32, device=next(model.parameters()).device)
        ldj = torch.zeros(1, device=z.device)
        rows = []
        for layer in model.flows:
            z, ldj = layer(z, ldj, reverse=False)
            rows.append((_layer_label(layer), list(z.shape[1:])))
        top = len(rows)
        _box(ax, 0, top + 0.2, f"image {list(model.img_shape)}", "#f2f2f2", w=2.6, h=0.55)
        for i, (label, shape) in enumerate(rows):
            y = top - 1 - i
            color = colors.get(label.split(" ")[0].rstrip(":"), "#dbe9f6")
            _box(ax, 0, y + 0.2, f"{label}\n-> {shape}", color, w=2.9, h=0.72, fontsize=8)
            _arrow(ax, (0, y + 0.9), (0, y + 0.58))
        ax.set_xlim(-1.7, 1.7), ax.set_ylim(-0.6, top + 0.7)
        ax.axis("off")
        ax.set_title(f"{name}\n{num_parameters(model):,} parameters, latent {list(z.shape[1:])}", fontsize=10)
    count = {2: "two", 3: "three", 4: "four"}.get(len(models), str(len(models)))
    fig.suptitle(f"The {count} MNIST flows, from image (top) to latent (bottom)")
    fig.tight_layout()
    return fig


def plot_densities_2d(log_probs: dict, data=None, lim: float = 3.0, title: str = "", grid: int = 90):
    """The data ([N, 2], first panel where given) beside the density exp(log_prob) of each model, for
    {name: log_prob function of [M, 2] points -> [M]}, on one colour scale per panel."""
    n = len(log_probs) + (data is not None)
    fig, axes = plt.subplots(1, n, figsize=(3.3 * n, 3.3))
    axes = np.atleast_1d(axes)
    if data is not None:
        _scatter_panel(axes[0], data, lim, "data")
    for ax, (name, log_prob) in zip(axes[n - len(log_probs):], log_probs.items()):
        _density_panel(ax, log_prob, lim, grid, name)
    return _finish_2d(fig, axes, title)

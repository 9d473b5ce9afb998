"""Sample grids of the shipped models, reproducible from a fixed seed: docs/samples_<model>.png.

    python -m flowbook.gallery                    # every model in checkpoints/, into docs/
    python -m flowbook.gallery --models multiscale --temperatures 1.0 0.7 --out docs

Each picture shows `n` samples at each temperature, all drawn after `torch.manual_seed(seed)`, so the
same weights give the same picture on any machine of the same kind (tests/test_checkpoints.py checks it).
A model trained on Gaussian-noised images ("tarflow_noise") is shown denoised, one Tweedie step with the
noise it was trained with (`flowbook.denoise.sample_denoised`, from the same latents).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

import torch

from flowbook import config
from flowbook.models import ALL_MODELS, ImageFlow

SEED = 0
TEMPERATURES = (1.0, 0.7)


@torch.no_grad()
def sample_grid(model: ImageFlow, n: int = 32, temperature: float = 1.0, seed: int = SEED) -> torch.Tensor:
    """int32 images [n, 1, 28, 28] sampled at `temperature` after torch.manual_seed(seed); denoised for a model
    trained on Gaussian-noised images (its `noise_sigma` set)."""
    if getattr(model, "noise_sigma", None) is not None:
        from flowbook.denoise import sample_denoised

        return sample_denoised(model, n, temperature=temperature, seed=seed)
    shape = model.latent_shape(n)  # before seeding: its first call runs the flow once and draws noise
    torch.manual_seed(seed)
    return model.sample(shape, temperature=temperature)


def gallery_figure(model: ImageFlow, title: str, n: int = 32, temperatures=TEMPERATURES, seed: int = SEED):
    """A figure with one panel of `n` samples per temperature (8 per row)."""
    import matplotlib.pyplot as plt
    import torchvision

    fig, axes = plt.subplots(1, len(temperatures), figsize=(5.2 * len(temperatures), 2.9 * n / 32 + 0.6))
    for ax, t in zip(list(getattr(axes, "flat", [axes])), temperatures):
        imgs = sample_grid(model, n, t, seed).float().cpu() / 255
        grid = torchvision.utils.make_grid(imgs, nrow=8, pad_value=0.5, padding=2)
        ax.imshow(grid.permute(1, 2, 0).numpy(), interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"temperature {t}")
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv=None):
    from flowbook.checkpoints import load_model, read_checkpoint
    from flowbook.pretrained import checkpoint_file, describe_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(ALL_MODELS), choices=ALL_MODELS)
    parser.add_argument("--temperatures", nargs="+", type=float, default=list(TEMPERATURES))
    parser.add_argument("--n", type=int, default=32, help="samples per temperature")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, default=config.PROJECT_ROOT / "docs")
    args = parser.parse_args(argv)
    matplotlib.use("Agg")
    for name in args.models:
        path = checkpoint_file(name)
        if path is None:
            print(f"{name}: no checkpoint in {config.checkpoint_path()}, skipped")
            continue
        model = load_model(path, arch=name)
        fig = gallery_figure(model, f"{name}: {describe_checkpoint(read_checkpoint(path), path.name)}",
                             args.n, args.temperatures, args.seed)
        target = args.out / f"samples_{name}.png"
        fig.savefig(target, dpi=80)
        print(f"{name}: {target}")


if __name__ == "__main__":
    main()

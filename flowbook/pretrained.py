"""The trained models a chapter works with: shipped checkpoints where present, else a quick training run.

    model, source, curve = load_or_train("multiscale")

1. `<PATH_CHECKPOINT>/<name>.pt` (the repository's checkpoints/ by default): the real, fully trained model.
2. Otherwise, in quick mode, a model trained for a few dozen steps on a subset (cached in runs/quick/),
   and in full mode the full training run (`flowbook.train`, resumable in runs/<name>/).
`source` says which one it is, so that a chapter can say so next to every number it shows; `curve` is
the list of (step, training bpd) where the model was trained just now, else None.
"""
from __future__ import annotations

import shutil

import torch

from flowbook import config
from flowbook.checkpoints import model_from_checkpoint, read_checkpoint
from flowbook.train import train


def checkpoint_file(name: str):
    """Path of the shipped checkpoint for `name`, or None."""
    path = config.checkpoint_path() / f"{name}.pt"
    return path if path.is_file() else None


def _quick_args(s: config.Settings):
    return dict(epochs=1, max_steps=s.train_steps, batch_size=s.batch_size, train_images=s.train_images,
                val_images=s.eval_images)


def load_or_train(name: str, retrain: bool = False, device: torch.device | None = None,
                  progress: bool | None = None):
    """(model in eval mode on `device`, a sentence saying where it comes from, training curve or None).

    retrain: in quick mode, train now even if a cached quick model exists (chapters that teach training
    use it); shipped checkpoints are always preferred, since they are what the chapter is about.
    progress: show Lightning's progress bar (default: the mode's setting, on in full mode).
    """
    device = device or config.get_device()
    s = config.settings()
    progress = s.progress if progress is None else progress
    shipped = checkpoint_file(name)
    if shipped is not None:
        ckpt = read_checkpoint(shipped)
        source = (f"the trained checkpoint {shipped.name} ({ckpt['meta'].get('epochs', '?')} epochs, "
                  f"{ckpt['meta'].get('device', 'unknown device')})")
        return model_from_checkpoint(ckpt, map_location=device, arch=name), source, None
    if s.quick:
        out = config.PROJECT_ROOT / "runs" / "quick" / name
        cached = out / f"{name}.pt"
        ckpt = read_checkpoint(cached) if cached.exists() and not retrain else None
        if ckpt is not None and ckpt["meta"].get("settings", {}).get("max_steps") == s.train_steps:
            model, curve = model_from_checkpoint(ckpt, map_location=device, arch=name), None
        else:
            shutil.rmtree(out, ignore_errors=True)
            model, summary = train(name, out, device=str(device), progress=progress, **_quick_args(s))
            curve = summary["train_curve"]
        return model, (f"a quick-mode model trained for only {s.train_steps} steps on {s.train_images} images "
                       "(no trained checkpoint found; full mode or the shipped checkpoints give the real thing)"), curve
    out = config.PROJECT_ROOT / "runs" / name
    model, summary = train(name, out, epochs=s.epochs, batch_size=s.batch_size, resume=True,
                           device=str(device), progress=progress)
    return model, f"a model trained here for {summary['epochs']} epochs (full mode)", summary["train_curve"]

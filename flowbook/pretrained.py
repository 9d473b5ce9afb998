"""The models a chapter works with: the shipped, trained checkpoints, and quick models trained live.

    model, source, curve = load_trained("multiscale")   # checkpoints/multiscale.pt where it is shipped
    model, source, curve = train_quick("multiscale")    # trained now, in a cell, for chapters on training

`load_trained` returns the shipped checkpoint `<PATH_CHECKPOINT>/<name>.pt` (the repository's
checkpoints/ by default) where there is one, in quick and full mode alike. Without one it falls back to a
quick model and says so: no chapter starts a long training run inside a cell unasked (`make train-all`
trains the real models). `train_quick` trains a small model now, apart from the shipped one: a few dozen
steps in quick mode, `Settings.demo_steps` in full mode; it is cached in runs/quick/<name>/.
`source` is a sentence saying which model it is, so that a chapter can say so next to every number;
`curve` is the list of (step, training bpd) where the model was trained just now, else None (for
"tarflow_noise", the bpd of the Gaussian-noised training images, `train_noisy_bpd`: no bpd of MNIST).
`training_history(name)` lists how the shipped checkpoint was trained, one row per stage;
`shipped_results(name)` is its results JSON (test bpd on the full test set), the numbers a chapter compares
with the reference tutorial's.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from flowbook import config
from flowbook.checkpoints import model_from_checkpoint, read_checkpoint
from flowbook.data import NUM_TRAIN
from flowbook.models import ImageFlow
from flowbook.provenance import file_sha256
from flowbook.train import run_lock, train


def checkpoint_file(name: str):
    """Path of the shipped checkpoint for `name`, or None."""
    path = config.checkpoint_path() / f"{name}.pt"
    return path if path.is_file() else None


def describe_checkpoint(ckpt: dict, filename: str) -> str:
    """'the trained checkpoint multiscale.pt (6 epochs, 300,000 images, AMD EPYC ..., 2 cores)'."""
    meta = ckpt["meta"]
    total = meta.get("total", {})
    seen = f", {int(total['images_seen']):,} images" if total.get("images_seen") else ""
    where = meta.get("hardware") or meta.get("device", "unknown hardware")
    epochs = total.get("epochs", meta.get("epochs", "?"))
    return f"the trained checkpoint {filename} ({epochs} epoch{'' if epochs == 1 else 's'}{seen}, {where})"


def training_history(name: str) -> list[dict]:
    """How the shipped checkpoint `name` was trained: one row per stage (a run of `flowbook.train`; a later
    stage continues the previous one's weights with `--init`), read from the checkpoint's own metadata.

    Each row is a dict with
        stage (1, 2, ...), start ("random initialisation", "stage N's weights", or for a first stage that
        started from other weights "the weights of <path>"),
        epochs, steps, images_seen, batch_size, peak_lr, schedule ("cosine" or "exponential"),
        warmup_steps, budget_minutes (the --max-minutes budget, or None), minutes (wall time of the stage),
        precision (e.g. "bf16-mixed"), hardware (e.g. "AMD EPYC, 2 cores"), arch (the architecture the stage
        trained where its record names one, else None: --init may start a stage from another architecture's
        weights, as "tarflow_vardeq" from the TarFlow's).
    A checkpoint from before stages were recorded gives one row from its run summary. No shipped
    checkpoint `name`: an empty list.
    """
    path = checkpoint_file(name)
    if path is None:
        return []
    meta = read_checkpoint(path)["meta"]
    history = meta.get("history") or [{**meta, "init": meta.get("settings", {}).get("init")}]
    rows = []
    for i, stage in enumerate(history, start=1):
        run = stage.get("settings", {})
        wall = stage.get("wall_s")
        rows.append({
            "stage": i,
            "start": (f"stage {i - 1}'s weights" if i > 1 else
                      f"the weights of {stage['init']}" if stage.get("init") else "random initialisation"),
            "epochs": stage.get("epochs"), "steps": stage.get("steps"), "images_seen": stage.get("images_seen"),
            "batch_size": run.get("batch_size"), "peak_lr": run.get("lr"), "schedule": run.get("schedule"),
            "warmup_steps": run.get("warmup_steps"), "budget_minutes": run.get("max_minutes"),
            "minutes": None if wall is None else wall / 60,  # unrounded: a table rounds it once
            "precision": run.get("precision"), "hardware": stage.get("hardware") or stage.get("device"),
            "arch": stage.get("arch"),
        })
    return rows


def shipped_results(name: str) -> dict | None:
    """The results JSON `<name>.json` of the shipped checkpoint `name` (written by `flowbook.evaluate`:
    test_bpd on eval_images["test"] images with importance_samples samples, val_bpd, slice_bpd, training
    totals), or None where there is no shipped checkpoint, no JSON, or the JSON belongs to other weights
    (its checkpoint_sha256 differs from the checkpoint's)."""
    path = checkpoint_file(name)
    results_path = config.checkpoint_path() / f"{name}.json"
    if path is None or not results_path.is_file():
        return None
    results = json.loads(results_path.read_text())
    if results.get("checkpoint_sha256") not in (None, file_sha256(path)):
        return None
    return results


def _clear_run(folder: Path) -> None:
    """Remove a demonstration run's files, all but the lock file that `run_lock` holds."""
    for entry in folder.iterdir():
        if entry.name == ".lock":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def train_quick(name: str, retrain: bool = False, device: torch.device | None = None,
                progress: bool | None = None) -> tuple[ImageFlow, str, list | None]:
    """(a small model trained now or cached in runs/quick/<name>, a sentence saying so, its training curve
    or None where it came from the cache). retrain: train anew even where a cached model exists."""
    device = device or config.get_device()
    s = config.settings()
    if s.train_images and s.demo_steps * s.batch_size < s.train_images:
        raise ValueError(f"{s.demo_steps} steps of {s.batch_size} images are less than one epoch of {s.train_images} "
                         "images, so the demonstration run would end before its first validation")
    progress = s.progress if progress is None else progress
    out = config.PROJECT_ROOT / "runs" / "quick" / name
    cached = out / f"{name}.pt"
    out.mkdir(parents=True, exist_ok=True)
    # Another notebook training the same demonstration model at this moment: wait for it and use its model.
    per_epoch = (s.train_images or NUM_TRAIN) // s.batch_size  # demo_steps may span epochs (full mode)
    run = {"epochs": -(-s.demo_steps // per_epoch), "max_steps": s.demo_steps, "batch_size": s.batch_size,
           "train_images": s.train_images, "val_images": s.eval_images}
    with run_lock(out, wait=True):
        ckpt = read_checkpoint(cached) if cached.exists() and not retrain else None
        settings = ckpt["meta"].get("settings", {}) if ckpt is not None else {}
        if ckpt is not None and all(settings.get(key) == value for key, value in run.items()):  # this mode's run
            model, curve = model_from_checkpoint(ckpt, map_location=device, arch=name), None
        else:
            _clear_run(out)
            model, summary = train(name, out, device=str(device), progress="steps" if progress else False, **run)
            curve = summary["train_curve"]
    images = f"{s.train_images} images" if s.train_images else "the training set"
    return model, f"a small model trained here for only {s.demo_steps} steps on {images}", curve


def load_trained(name: str, device: torch.device | None = None,
                 progress: bool | None = None) -> tuple[ImageFlow, str, list | None]:
    """(the shipped checkpoint of `name` in eval mode on `device`, a sentence saying where it comes from,
    None); without a shipped checkpoint, `train_quick`'s model and a sentence that says so."""
    device = device or config.get_device()
    shipped = checkpoint_file(name)
    if shipped is not None:
        ckpt = read_checkpoint(shipped)
        return (model_from_checkpoint(ckpt, map_location=device, arch=name), describe_checkpoint(ckpt, shipped.name),
                None)
    model, source, curve = train_quick(name, device=device, progress=progress)
    folder = config.checkpoint_path()
    shown = folder.relative_to(config.PROJECT_ROOT) if folder.is_relative_to(config.PROJECT_ROOT) else folder
    return model, (f"{source}, since there is no trained checkpoint {name}.pt in {shown}/ "
                   "(`make train-all` trains the real models)"), curve

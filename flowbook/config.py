"""One switch for the whole collection: quick mode (CPU, minutes) or full mode (GPU, the real models).

    FLOWBOOK_MODE=quick|full   default: full where CUDA is available, quick elsewhere
    PATH_DATASETS              folder holding MNIST/raw (default: <project>/data)
    PATH_CHECKPOINT            folder holding trained checkpoints (default: <project>/checkpoints)

A chapter reads its settings from `settings()` and never decides on its own whether it runs on a laptop.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODES = ("quick", "full")


@dataclass(frozen=True)
class Settings:
    """What a chapter does in the current mode.

    train_images: training images used (None: all 50,000)
    demo_steps: optimisation steps of the small models that chapters on training train live (at least one
        epoch of train_images, so that the run ends with a validation)
    epochs: epochs of the full training run
    batch_size: training batch size
    eval_images: validation/test images evaluated (None: all 10,000)
    importance_samples: samples for the importance-weighted bpd bound
    toy_steps: optimisation steps of the 2-D toy flow in chapter 1
    bound_images: test images for the importance-sampling study of chapter 2
    cnf_steps: maximum-likelihood steps of chapter 7's 2-D continuous flow (each solves an ODE)
    judged_samples: samples per model that chapters 7 and 8 show the digit classifier
    ode_images: test images whose bpd chapter 7 computes through the ODE (None: all 10,000)
    slice_images: first images of a shipped model's fingerprint slice (`flowbook.evaluate.slice_spec`) that
        chapter 5 recomputes to check the weights against the results JSON (None: the whole slice)
    progress: show progress bars (text tqdm bars) for training and evaluation, which take over ten seconds
        in a cell even in quick mode
    """

    mode: str
    train_images: int | None
    demo_steps: int
    epochs: int
    batch_size: int
    eval_images: int | None
    importance_samples: int
    toy_steps: int
    bound_images: int
    cnf_steps: int
    judged_samples: int
    ode_images: int | None
    slice_images: int | None
    progress: bool

    @property
    def quick(self) -> bool:
        return self.mode == "quick"


QUICK = Settings("quick", train_images=320, demo_steps=20, epochs=1, batch_size=16,
                 eval_images=128, importance_samples=4, toy_steps=400,
                 bound_images=64, cnf_steps=60, judged_samples=100, ode_images=8, slice_images=32,
                 progress=True)
FULL = Settings("full", train_images=None, demo_steps=1000, epochs=200, batch_size=128,
                eval_images=None, importance_samples=8, toy_steps=3000,
                bound_images=1024, cnf_steps=600, judged_samples=1000, ode_images=None, slice_images=None,
                progress=True)


def mode() -> str:
    """'quick' or 'full', from FLOWBOOK_MODE, else full where CUDA is available."""
    value = os.environ.get("FLOWBOOK_MODE", "").strip().lower()
    if not value:
        return "full" if torch.cuda.is_available() else "quick"
    if value not in MODES:
        raise ValueError(f"FLOWBOOK_MODE must be one of {MODES}, got {value!r}")
    return value


def settings() -> Settings:
    """The settings of the current mode (see `Settings`)."""
    return QUICK if mode() == "quick" else FULL


def progress_bar(iterable, desc: str, total: int | None = None):
    """`iterable` wrapped in a compact text progress bar on standard output (in a notebook it reads as
    output, not as a red warning), shown where the mode's `progress` is on."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, file=sys.stdout, mininterval=2, disable=not settings().progress)


def get_device() -> torch.device:
    """The device chapters put their models on: CUDA when present, else the CPU.

    Modules never read this themselves; they follow the device of their inputs.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve(env: str, default: str) -> Path:
    raw = os.environ.get(env)
    if not raw:
        return PROJECT_ROOT / default
    path = Path(raw).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    # A relative path that does not exist from here (a notebook runs in notebooks/) is read
    # from the project root, where the README's commands set it.
    return (PROJECT_ROOT / path).resolve()


def data_path() -> Path:
    """Folder that holds (or will hold) MNIST/raw."""
    return _resolve("PATH_DATASETS", "data")


def checkpoint_path() -> Path:
    """Folder of the trained checkpoints (`<name>.pt` and `<name>.json`)."""
    return _resolve("PATH_CHECKPOINT", "checkpoints")

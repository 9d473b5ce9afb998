"""Plain state-dict checkpoints: `{"format", "arch", "state_dict", "meta"}`, saved atomically and
loaded with `weights_only=True`, on any device."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from flowbook.models import MODEL_NAMES, ImageFlow, create_flow

FORMAT = "flowbook-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that does not fit: another format, another architecture, or a damaged file."""


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file, then rename: a crash leaves either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(model: ImageFlow, arch: str, path: str | Path, **meta) -> None:
    """Save `model`'s weights (on the CPU, float32) under `arch` with JSON-able `meta`."""
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {MODEL_NAMES}")
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype)
             for k, v in model.state_dict().items()}
    atomic_save({"format": FORMAT, "arch": arch, "state_dict": state, "meta": meta}, path)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict at `path` (CPU tensors), checked for the flowbook format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable flowbook checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a flowbook checkpoint (expected format {FORMAT!r}); "
                              "Lightning's .ckpt files are converted by `python -m flowbook.train`")
    return ckpt


def load_state(model: ImageFlow, ckpt: dict, arch: str | None = None) -> ImageFlow:
    """Load `ckpt`'s weights into `model`, with a clear error where the architectures differ."""
    if arch is not None and ckpt["arch"] != arch:
        raise CheckpointError(f"checkpoint is for the {ckpt['arch']!r} flow, not {arch!r}; "
                              f"build it with flowbook.models.create_flow({ckpt['arch']!r})")
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint of the {ckpt['arch']!r} flow does not fit this model: "
                              f"{str(err).splitlines()[0]}") from None
    return model


def model_from_checkpoint(ckpt: dict, map_location: str | torch.device = "cpu", arch: str | None = None) -> ImageFlow:
    """Build the architecture of a checkpoint dict (from `read_checkpoint`), load its weights, and return it
    in eval mode on `map_location`. With `arch` given, another architecture raises CheckpointError."""
    if ckpt["arch"] not in MODEL_NAMES:
        raise CheckpointError(f"the checkpoint holds an unknown architecture {ckpt['arch']!r}")
    model = load_state(create_flow(ckpt["arch"]), ckpt, arch)
    return model.to(map_location).eval()


def load_model(path: str | Path, map_location: str | torch.device = "cpu", arch: str | None = None) -> ImageFlow:
    """`model_from_checkpoint` of the file at `path`."""
    return model_from_checkpoint(read_checkpoint(path), map_location, arch)

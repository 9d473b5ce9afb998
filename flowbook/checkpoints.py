"""Plain state-dict checkpoints: `{"format", "arch", "state_dict", "meta"}`, saved atomically and
loaded with `weights_only=True`, on any device."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path, PurePath

import torch

from flowbook.models import ALL_MODELS, ImageFlow, create_flow

FORMAT = "flowbook-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that does not fit: another format, another architecture, or a damaged file."""


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file of a name of its own, fsync it, rename it over `path` and fsync the
    folder: a crash leaves either the old or the new file, never a mix, and no temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = _umask()
    if hasattr(os, "fchmod"):  # as a plain open() would make it (mkstemp's 0600 would hide it from others)
        os.fchmod(fd, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _umask() -> int:
    """This process's umask, read without changing it where Linux says it (/proc/self/status); elsewhere set
    and restored at once (for a moment the whole process, every thread, has umask 0 then)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on every system
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _plain(value, key="meta"):
    """`value` as plain JSON-able data (paths become strings); a clear error for anything else, which
    `torch.load(weights_only=True)` could not read back."""
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{key}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint metadata must be plain data (numbers, strings, lists, dicts, paths); "
                    f"{key} is a {type(value).__name__}")


def save_checkpoint(model: ImageFlow, arch: str, path: str | Path, **meta) -> None:
    """Save `model`'s weights (on the CPU, float32) under `arch` with JSON-able `meta` (paths are stored as
    strings; anything else raises a TypeError before a file is written)."""
    if arch not in ALL_MODELS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {ALL_MODELS}")
    meta = _plain(meta)
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
        raise CheckpointError(f"{path} is not a flowbook checkpoint (expected format {FORMAT!r}). A Lightning "
                              "last.ckpt is for `python -m flowbook.train ... --resume`; to start a new stage "
                              "from a run, pass its <model>.pt to --init")
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


def load_shared_state(model: ImageFlow, ckpt: dict) -> list[str]:
    """Load a checkpoint of another architecture whose every tensor has a place of the same shape in `model`
    (the TarFlow's blocks into "tarflow_vardeq", the simple flow's couplings into "vardeq"); the layers it
    lacks keep their initialisation. Returns the names of those fresh tensors; a tensor of the checkpoint
    that `model` has no place for, or one of another shape, raises CheckpointError."""
    own = model.state_dict()
    misfits = [k for k, v in ckpt["state_dict"].items() if k not in own or own[k].shape != v.shape]
    if misfits:
        raise CheckpointError(f"the {ckpt['arch']!r} checkpoint does not fit inside this model: {len(misfits)} of "
                              f"its tensors have no place of the same shape (the first: {misfits[0]!r})")
    model.load_state_dict(ckpt["state_dict"], strict=False)
    return [k for k in own if k not in ckpt["state_dict"]]


def model_from_checkpoint(ckpt: dict, map_location: str | torch.device = "cpu", arch: str | None = None) -> ImageFlow:
    """Build the architecture of a checkpoint dict (from `read_checkpoint`), load its weights, and return it
    in eval mode on `map_location`. With `arch` given, another architecture raises CheckpointError."""
    if ckpt["arch"] not in ALL_MODELS:
        raise CheckpointError(f"the checkpoint holds an unknown architecture {ckpt['arch']!r}")
    model = load_state(create_flow(ckpt["arch"]), ckpt, arch)
    return model.to(map_location).eval()


def load_model(path: str | Path, map_location: str | torch.device = "cpu", arch: str | None = None) -> ImageFlow:
    """`model_from_checkpoint` of the file at `path`."""
    return model_from_checkpoint(read_checkpoint(path), map_location, arch)

"""Input validation shared by the flow layers and models: clear errors instead of silent wrong numbers."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

_trusted = False  # set by `trusted_images()`


def _describe(x: torch.Tensor) -> str:
    return f"{str(x.dtype).replace('torch.', '')} {list(x.shape)}"


def check_images(imgs: torch.Tensor, quants: int = 256, img_shape: tuple | None = None) -> None:
    """Raise a ValueError unless `imgs` is a batch of integer images in 0..quants-1.

    imgs: [B, C, H, W], an integer dtype; `img_shape` (C, H, W), where given, must match.
    The value range is read back to the host (on a GPU, a synchronisation); it is not checked inside
    `trusted_images()` or while torch.compile traces, where the caller checks the data once instead.
    """
    shape = "[B, C, H, W]" if img_shape is None else "[B, " + ", ".join(map(str, img_shape)) + "]"
    expected = f"expected integer images in 0..{quants - 1} of shape {shape}"
    hint = "; pass the images as returned by flowbook.data (int32, 0..255)"
    if not isinstance(imgs, torch.Tensor):
        raise TypeError(f"{expected}, got {type(imgs).__name__}{hint}")
    bad_shape = imgs.dim() != 4 or (img_shape is not None and tuple(imgs.shape[1:]) != tuple(img_shape))
    if imgs.is_floating_point() or imgs.is_complex() or imgs.dtype == torch.bool or bad_shape:
        raise ValueError(f"{expected}, got {_describe(imgs)}{hint}")
    if imgs.numel() == 0:
        raise ValueError(f"{expected}, got an empty batch {list(imgs.shape)}")
    if _trusted or torch.compiler.is_compiling():
        return
    low, high = torch.aminmax(imgs)
    low, high = int(low), int(high)
    if low < 0 or high > quants - 1:
        raise ValueError(f"{expected}, got values in {low}..{high}{hint}")


def check_precision(dtype: torch.dtype) -> None:
    """A ValueError for half-precision weights (bfloat16, float16): a model's bpd in them would be off by tenths
    of a bit (the log 256 term alone is thousands of nats per image) and dequantization would not invert."""
    if dtype in (torch.bfloat16, torch.float16):
        raise ValueError(f"this model's weights are {str(dtype).replace('torch.', '')}: its bpd would be off by "
                         "tenths of a bit and dequantization would no longer invert exactly. Keep the weights in "
                         "float32 (model.float()) and use autocast for speed (training: --precision bf16-mixed)")


def check_latent(z: torch.Tensor, name: str = "z") -> None:
    """Raise a ValueError unless `z` is a floating tensor of shape [B, C, H, W]."""
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.dim() != 4:
        got = _describe(z) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"expected {name} as a float tensor of shape [B, C, H, W], got {got}")


def check_temperature(temperature) -> None:
    """Raise a ValueError unless `temperature` is a finite number >= 0."""
    if (not isinstance(temperature, (int, float)) or isinstance(temperature, bool)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")


@contextmanager
def trusted_images():
    """Within this block `check_images` checks dtype and shape but not the value range: for batches drawn
    from data that was checked once as a whole (a training set held on the GPU, say), so that no step
    waits for the GPU to report a minimum and a maximum."""
    global _trusted
    before, _trusted = _trusted, True
    try:
        yield
    finally:
        _trusted = before

"""Where the random noise of a forward pass comes from: dequantization noise, and flow matching's time and
starting point.

By default it is torch's global generator, as `torch.rand` draws it. Two contexts change that, without
changing any layer's interface:

- `rows_of(start, total)`: one process of several draws the noise of the whole batch of `total` images and
  keeps its own rows `start, start + B` (training on several processes: each sees the noise that one process
  training on the whole batch would draw for the same images, so that the runs agree step for step).
- `per_image(seeds)`: image i of the batch draws from a generator of its own, seeded with `seeds[i]`
  (evaluation: an image's bpd then depends on its seed alone, not on its batch or process).
"""
from __future__ import annotations

import contextlib

import torch

_source = None  # None: torch's global generator; else a function (kind, shape, device, dtype) -> tensor


def rand(shape, device=None, dtype=None) -> torch.Tensor:
    """Uniform noise in [0, 1) of `shape` ([B, ...], one row per image), from the current source."""
    if _source is None:
        return torch.rand(shape, device=device, dtype=dtype)
    return _source(torch.rand, tuple(shape), device, dtype)


def randn(shape, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of `shape` ([B, ...], one row per image), from the current source."""
    if _source is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return _source(torch.randn, tuple(shape), device, dtype)


@contextlib.contextmanager
def _using(source):
    global _source
    previous, _source = _source, source
    try:
        yield
    finally:
        _source = previous


def rows_of(start: int, total: int):
    """Within this context, noise of B rows is rows start..start + B of a draw of `total` rows."""
    if not (isinstance(start, int) and isinstance(total, int) and 0 <= start < total):
        raise ValueError(f"expected rows starting at 0 <= start < total, got start={start!r}, total={total!r}")

    def draw(fn, shape, device, dtype):
        if start + shape[0] > total:
            raise ValueError(f"rows {start}..{start + shape[0]} do not fit into a batch of {total}")
        return fn((total, *shape[1:]), device=device, dtype=dtype)[start:start + shape[0]]
    return _using(draw)


def per_image(seeds):
    """Within this context, row i of any noise comes from a generator of its own, seeded with seeds[i];
    every draw continues that image's generator (so that importance sample k of image i is the same
    whatever batch or process it is computed in)."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def draw(fn, shape, device, dtype):
        if shape[0] != len(generators):
            raise ValueError(f"noise for {shape[0]} images, but {len(generators)} seeds were given")
        rows = [fn(shape[1:], generator=g, dtype=dtype) for g in generators]
        return torch.stack(rows).to(device) if rows else torch.empty(shape, device=device, dtype=dtype)
    return _using(draw)

"""MNIST as integer images: [1, 28, 28], int32, 0..255, with the reference's train/validation split.

The root folder comes from PATH_DATASETS (see flowbook.config); torchvision reads MNIST/raw there and
downloads it when it is missing and a network is at hand.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from flowbook import config

SPLIT_SEED = 42
NUM_TRAIN, NUM_VAL = 50_000, 10_000


class MNISTNotFoundError(FileNotFoundError):
    """MNIST is neither on disk nor downloadable."""


class ImageDataset(Dataset):
    """Integer images [N, 1, 28, 28] (int32) with their labels [N]; item i is (image [1, 28, 28], label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def subset(self, n: int | None) -> "ImageDataset":
        """The first n items (all of them for None)."""
        return self if n is None else ImageDataset(self.images[:n], self.labels[:n])


def _torchvision_mnist(root: Path, train: bool, download: bool):
    from torchvision.datasets import MNIST

    try:
        return MNIST(root=str(root), train=train, download=download)
    except Exception as err:  # torchvision raises RuntimeError (missing) or URLError/HTTPError (offline)
        raise MNISTNotFoundError(
            f"MNIST was not found in {root / 'MNIST' / 'raw'} and could not be downloaded "
            f"({type(err).__name__}: {err}). Set PATH_DATASETS to the folder that holds MNIST/raw "
            f"(for example PATH_DATASETS=../shared/data), or run once with a network to download it."
        ) from None


def _as_dataset(mnist) -> ImageDataset:
    images = mnist.data.to(torch.int32).unsqueeze(1).contiguous()
    return ImageDataset(images, mnist.targets.clone())


def load_mnist(root: str | Path | None = None, download: bool = True):
    """(train, val, test): 50,000 / 10,000 training images split with seed 42 (as the reference's
    `random_split` after `seed_everything(42)`) and the official 10,000 test images."""
    root = Path(root) if root is not None else config.data_path()
    full = _as_dataset(_torchvision_mnist(root, train=True, download=download))
    test = _as_dataset(_torchvision_mnist(root, train=False, download=download))
    perm = torch.randperm(NUM_TRAIN + NUM_VAL, generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, val_idx = perm[:NUM_TRAIN], perm[NUM_TRAIN:]
    train = ImageDataset(full.images[train_idx], full.labels[train_idx])
    val = ImageDataset(full.images[val_idx], full.labels[val_idx])
    return train, val, test


class EpochShuffle(Sampler):
    """A new random order of range(n) each epoch, fixed by (seed, epoch): epoch k's order is the same
    whether a run got there uninterrupted or resumed from a checkpoint (Lightning calls `set_epoch`)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


def make_loader(dataset: Dataset, batch_size: int = 64, shuffle: bool = False, drop_last: bool = False,
                seed: int | None = None) -> DataLoader:
    """A DataLoader of (images, labels) batches; with `shuffle`, a new order each epoch fixed by `seed`
    and the epoch (`EpochShuffle`; seed None: 0)."""
    sampler = EpochShuffle(len(dataset), seed or 0) if shuffle else None
    # A generator of its own: creating an iterator draws a base seed, which must not move the global
    # random state (the dequantization noise) at a moment that differs between fresh and resumed runs.
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      generator=torch.Generator().manual_seed(seed or 0))

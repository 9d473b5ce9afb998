"""MNIST as integer images: [1, 28, 28], int32, 0..255, with the reference's train/validation split.

The root folder comes from PATH_DATASETS (see flowbook.config); torchvision reads MNIST/raw there and
downloads it when it is missing and a network is at hand.
"""
from __future__ import annotations

import socket
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from flowbook import config
from flowbook.provenance import file_sha256

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
        """The first n items (all of them for None); more than there are is an error, not a silent cap (a run
        would record the number asked for, not the number it used)."""
        if n is not None and n > len(self):
            raise ValueError(f"asked for {n:,} images, but this set has {len(self):,}")
        return self if n is None else ImageDataset(self.images[:n], self.labels[:n])


# The official MNIST release (yann.lecun.com/exdb/mnist), unpacked: size in bytes and sha256 of each file.
OFFICIAL_FILES = {
    "train-images-idx3-ubyte": (47_040_016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    "train-labels-idx1-ubyte": (60_008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    "t10k-images-idx3-ubyte": (7_840_016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    "t10k-labels-idx1-ubyte": (10_008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
}
DOWNLOAD_TIMEOUT_S = 30
_verified: dict = {}  # (path, size, mtime) -> True: each file is hashed once per process


class MNISTCorruptError(ValueError):
    """An MNIST file on disk that is not the official one: truncated, damaged, or another file."""


def verify_mnist_files(raw: Path) -> None:
    """Check the MNIST files present in `raw` against the official sizes and checksums; a
    MNISTCorruptError naming the file and the fix for the first that differs. Missing files are left to
    the loader (which downloads them where it can)."""
    fix = (f"delete it and copy the official file into {raw} (or delete it and run once with a network "
           "to download it again)")
    for name, (size, sha256) in OFFICIAL_FILES.items():
        path = raw / name
        if not path.is_file():
            continue
        stat = path.stat()
        if stat.st_size != size:
            sizes = {s: n for n, (s, _) in OFFICIAL_FILES.items()}
            other = f"; that is the size of {sizes[stat.st_size]}: files swapped?" if stat.st_size in sizes else ""
            raise MNISTCorruptError(f"{path} has {stat.st_size:,} bytes, the official file {size:,}{other}: {fix}")
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in _verified:
            if file_sha256(path) != sha256:
                raise MNISTCorruptError(f"{path} is damaged: its sha256 differs from the official file's: {fix}")
            _verified[key] = True


def _torchvision_mnist(root: Path, train: bool, download: bool):
    from torchvision.datasets import MNIST

    verify_mnist_files(root / "MNIST" / "raw")
    try:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a dead network fails in seconds instead of hanging
        try:
            mnist = MNIST(root=str(root), train=train, download=download)
        finally:
            socket.setdefaulttimeout(previous)
    except Exception as err:  # torchvision raises RuntimeError (missing) or URLError/HTTPError (offline)
        raise MNISTNotFoundError(
            f"MNIST was not found in {root / 'MNIST' / 'raw'} and could not be downloaded "
            f"({type(err).__name__}: {err}). Set PATH_DATASETS to the folder that holds MNIST/raw "
            f"(for example PATH_DATASETS=/path/to/data), or run once with a network to download it."
        ) from None
    verify_mnist_files(root / "MNIST" / "raw")  # what was just downloaded, too
    return mnist


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

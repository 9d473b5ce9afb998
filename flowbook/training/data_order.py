"""The order of the training data and the seeds of each epoch: what makes a resumed run, and a run on several
processes, see what an uninterrupted one-process run sees.

On one GPU (`DeviceBatches`, the images held on the GPU) the order comes from a generator on that device and
validation runs in larger batches: such a run repeats itself when resumed, but sees another order than the
CPU's and several processes' runs with the same seed (which agree with each other)."""
from __future__ import annotations

import math

import pytorch_lightning as pl
import torch

from torch.utils.data import DataLoader, Sampler, SequentialSampler

from flowbook.data import EpochShuffle, ImageDataset

class DeviceBatches:
    """Batches (images,) drawn from a tensor held on one device: no loader, no copies per step.

    images: int [N, C, H, W]; reshuffled each pass when `shuffle`; the last partial batch is dropped
    when `drop_last`.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0):
        self.images, self.batch_size, self.shuffle, self.drop_last = images, batch_size, shuffle, drop_last
        self.seed = seed
        self.generator = torch.Generator(device=images.device).manual_seed(seed)

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Fix this epoch's order by (seed, epoch), so that a resumed run draws what an uninterrupted one does."""
        self.generator.manual_seed(self.seed * 100_003 + epoch)

    def __iter__(self):
        n = len(self.images)
        order = (torch.randperm(n, device=self.images.device, generator=self.generator) if self.shuffle
                 else torch.arange(n, device=self.images.device))
        for i in range(len(self)):
            yield (self.images[order[i * self.batch_size:(i + 1) * self.batch_size]],)


class EpochSeeds(pl.Callback):
    """At the start of epoch k, seed the global random generators (dequantization noise) and the GPU
    batches' order with (seed, k): a run resumed after epoch k - 1 then continues exactly as an
    uninterrupted run of the same command on the same machine (the data loader's `EpochShuffle` does
    the same for the order on the CPU)."""

    def __init__(self, seed: int, batches=None):
        self.seed, self.batches = seed, batches

    def on_train_epoch_start(self, trainer, module):
        torch.manual_seed(self.seed * 100_003 + 7919 * (trainer.current_epoch + 1))
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(trainer.current_epoch)
        sampler = getattr(trainer.train_dataloader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(trainer.current_epoch)


class ShardedBatches(Sampler):
    """The batches of indices of process `rank` of `world` (a batch sampler for a DataLoader).

    The global batches hold `batch_size` indices each, in the order of `EpochShuffle` with `shuffle` (a new
    order each epoch, fixed by (seed, epoch)), else 0..n-1; the last partial one is dropped with `drop_last`.
    Process `rank` takes the rows `rows(i)` of global batch i: contiguous, the same for every epoch. With
    one process this is exactly the DataLoader of `flowbook.data.make_loader`; with several, step k of every
    process together covers step k of the one-process run, image for image.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0, rank: int = 0,
                 world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"expected a process rank in 0..{world - 1}, got {rank}")
        self.n, self.batch_size, self.drop_last, self.rank, self.world = n, batch_size, drop_last, rank, world
        # `sampler`, as in torch's BatchSampler: Lightning passes each epoch to its set_epoch
        self.sampler = EpochShuffle(n, seed) if shuffle else SequentialSampler(range(n))

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self):
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def rows(self, i: int) -> tuple[int, int, int]:
        """(start, stop, size) of this process's rows in global batch i, which holds `size` images."""
        size = min(self.batch_size, self.n - i * self.batch_size)
        return size * self.rank // self.world, size * (self.rank + 1) // self.world, size

    def __iter__(self):
        order = list(self.sampler)
        for i in range(len(self)):
            start, stop, _ = self.rows(i)
            if stop > start:  # a last, small validation batch may leave a process nothing
                yield order[i * self.batch_size + start:i * self.batch_size + stop]


VAL_BATCH = 256


def _loaders(train_set: ImageDataset, val_set: ImageDataset, batch_size: int, device: torch.device, seed: int,
             rank: int = 0, world: int = 1):
    """(train, validation) batches of process `rank` of `world`. `batch_size` is the global batch."""
    if device.type == "cuda" and world == 1:  # hold the whole data set on the GPU; validate in few, large batches
        return (DeviceBatches(train_set.images.to(device), batch_size, True, True, seed),
                DeviceBatches(val_set.images.to(device), 1000, False, False))
    # A generator of its own: creating an iterator draws a base seed, which must not move the global
    # random state (the dequantization noise) at a moment that differs between fresh and resumed runs.
    train_batches = ShardedBatches(len(train_set), batch_size, True, True, seed, rank, world)
    return (DataLoader(train_set, batch_sampler=train_batches, generator=torch.Generator().manual_seed(seed or 0)),
            DataLoader(val_set, batch_sampler=ShardedBatches(len(val_set), VAL_BATCH, False, False, 0, rank, world),
                       generator=torch.Generator().manual_seed(0)))

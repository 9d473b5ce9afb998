"""The Lightning module that trains one of the MNIST models, and what ends a run that learns nothing."""
from __future__ import annotations

import contextlib
import math
import os

import pytorch_lightning as pl
import torch

from flowbook import noise
from flowbook.models import create_flow
from flowbook.training.schedule import LRFactor

MAX_BAD_STEPS = int(os.environ.get("FLOWBOOK_MAX_BAD_STEPS", 50))  # non-finite steps in a row that end a run


class TrainingDiverged(RuntimeError):
    """The run learned nothing: too many non-finite steps, in a row or in all, or no finite validation score."""


class FlowModule(pl.LightningModule):
    """Training of one of the MNIST models: the loss is what the model's forward returns, named by its
    `loss_name`: the mean bpd of a batch for the flows (maximum likelihood), the flow-matching loss ("cfm")
    for the flow-matching model. Logged as train_<train_loss_name> and val_<loss_name>: the two differ for a
    model trained on Gaussian-noised images ("tarflow_noise"), whose training loss is the bpd of the noisy
    images (train_noisy_bpd, no bpd of MNIST) and whose validation, in evaluation mode, draws uniform noise
    inside the bins (val_bpd, a bound on MNIST's -log2 P(x) / D, like every other flow's).

    Adam(lr) with the learning-rate schedule `LRFactor`. A batch with a non-finite loss is skipped (no
    backward, no step) and counted in `skipped_steps`; MAX_BAD_STEPS in a row raise TrainingDiverged.
    `batches` counts the training batches of the run (skipped or not), so that `check_learned` can refuse
    a run that skipped most of them.

    On several processes (DDP), `shards` = (train, validation) `ShardedBatches` of this process: each
    step then draws the noise of the whole global batch and keeps this process's rows (`flowbook.noise`),
    a step is skipped on every process when its loss is non-finite on any, and the validation score is the
    mean over all processes' images.
    """

    def __init__(self, arch: str, lr: float = 1e-3, schedule: str = "cosine", gamma: float = 0.99,
                 warmup_steps: int = 0, steps_per_epoch: int = 1, total_steps: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.flow = create_flow(arch)
        self.skipped_steps = 0
        self.batches = 0
        self.bad_in_a_row = 0
        self.lr_factor = LRFactor(schedule, total_steps, warmup_steps, gamma, steps_per_epoch)
        self.shards = None
        self._val = None
        self._drop_gradients = False

    def forward(self, imgs):
        return self.flow(imgs)

    def _noise_rows(self, which: int, batch_idx: int):
        """The noise of this process's rows of the global batch (several processes), else the plain noise."""
        if self.shards is None or self.shards[which].world == 1:
            return contextlib.nullcontext()
        start, _, size = self.shards[which].rows(batch_idx)
        return noise.rows_of(start, size)

    def _anywhere(self, flag: torch.Tensor) -> bool:
        """Whether `flag` (a bool tensor) holds on this process or on any other."""
        if self.trainer.world_size == 1:
            return bool(flag)
        return bool(self.trainer.strategy.reduce(flag.float().to(self.device), reduce_op="sum") > 0)

    def training_step(self, batch, batch_idx):
        with self._noise_rows(0, batch_idx):
            loss = self.flow(batch[0])
        self.batches += 1
        if self._anywhere(~torch.isfinite(loss.detach())):
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            self.log("skipped_steps", float(self.skipped_steps))
            if self.bad_in_a_row >= MAX_BAD_STEPS:
                raise TrainingDiverged(
                    f"{self.bad_in_a_row} training steps in a row had a non-finite loss (step "
                    f"{self.global_step}): the run diverged. Lower --lr (now {self.hparams.lr:g}) or "
                    "add --warmup-steps, and start a new run.")
            if self.trainer.world_size == 1:
                return None
            # Lightning refuses None on several processes: a loss of zero keeps DDP's gradient averaging in
            # step on every process, and on_before_optimizer_step drops the gradients, so that Adam skips
            # every parameter (its moments included), as it does for None.
            self._drop_gradients = True
            return sum(p.sum() for p in self.parameters()) * 0.0
        self.bad_in_a_row = 0
        self.log(f"train_{train_loss_name(self.flow)}", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer):
        if self._drop_gradients:
            optimizer.zero_grad(set_to_none=True)
            self._drop_gradients = False

    def on_validation_epoch_start(self):
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of losses x images, images

    def validation_step(self, batch, batch_idx):
        # .forward: eager even when the flow's __call__ is compiled, so that validation batches of other
        # shapes compile nothing.
        with self._noise_rows(1, batch_idx):
            loss = self.flow.forward(batch[0])
        self._val += torch.stack([loss.detach().double() * len(batch[0]),
                                  torch.tensor(len(batch[0]), dtype=torch.float64, device=loss.device)])

    def on_validation_epoch_end(self):
        total = self.trainer.strategy.reduce(self._val, reduce_op="sum") if self.trainer.world_size > 1 else self._val
        if total[1] > 0:  # the mean over every process's images, the same number on each
            self.log(f"val_{self.flow.loss_name}", (total[0] / total[1]).float(), prog_bar=True)

    def check_learned(self, best_val: float) -> None:
        """A TrainingDiverged error where the run never reached a finite validation score, or skipped most
        of its training batches: such a run must not report that it finished."""
        name = self.flow.loss_name
        if not math.isfinite(best_val):
            raise TrainingDiverged(
                f"the run ended without a finite validation {name} ({self.skipped_steps} of {self.batches} "
                f"training batches skipped as non-finite): it learned nothing and wrote no weights. Lower --lr "
                f"(now {self.hparams.lr:g}) or add --warmup-steps, and start a new run.")
        if 2 * self.skipped_steps > self.batches:
            raise TrainingDiverged(
                f"the run skipped {self.skipped_steps} of its {self.batches} training batches as non-finite: "
                f"its weights are not to be trusted. Lower --lr (now {self.hparams.lr:g}) or add --warmup-steps, "
                "and start a new run.")

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr,
                                     fused=fused_adam(self.device, self.trainer.precision))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def on_save_checkpoint(self, checkpoint):
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["batches"] = self.batches

    def on_load_checkpoint(self, checkpoint):
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
        self.batches = checkpoint.get("batches", 0)


def train_loss_name(flow) -> str:
    """What the training loss of `flow` is called: its `train_loss_name` where it has one, else its `loss_name`."""
    return getattr(flow, "train_loss_name", flow.loss_name)


def _best_key(flow) -> str:
    """The summary's key for the best validation score: bpd with one dequantization sample for the flows."""
    return "best_val_bpd_1sample" if flow.loss_name == "bpd" else f"best_val_{flow.loss_name}"


def fused_adam(device: torch.device, precision: str) -> bool:
    """Whether to use fused Adam (one kernel for the whole update instead of several per parameter):
    on a GPU, except under mixed precision, where Lightning refuses to clip the gradients of an optimizer
    that unscales them itself, as the fused one does."""
    return device.type == "cuda" and "mixed" not in str(precision)

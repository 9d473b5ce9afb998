"""A compact progress bar of the optimizer steps, for notebooks."""
from __future__ import annotations

import sys

import pytorch_lightning as pl
from tqdm import tqdm  # text bars: work in a terminal and in Jupyter without ipywidgets

from flowbook.training.module import train_loss_name


class StepProgress(pl.Callback):
    """One compact text bar of the run's optimizer steps and its latest training bpd, refreshed every few
    seconds: for notebooks, where Lightning's bar would store a line per refresh."""

    def on_train_start(self, trainer, module):
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.max_epochs * trainer.num_training_batches
        self.bar = tqdm(total=total, desc="training", unit="step", mininterval=5, leave=True, file=sys.stdout)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.bar.update(trainer.global_step - self.bar.n)
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.bar.set_postfix({train_loss_name(module.flow): f"{float(loss):.3f}"}, refresh=False)

    def on_train_end(self, trainer, module):
        self.bar.close()

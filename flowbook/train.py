"""Training with PyTorch Lightning, as the reference does, made resumable and safe.

    python -m flowbook.train --model multiscale                      # 200 epochs, Adam 1e-3, decay 0.99/epoch
    python -m flowbook.train --model simple --max-minutes 30 --resume

A run folder (default runs/<model>) holds
    <model>.pt         best weights by validation bpd (a plain state dict, see flowbook.checkpoints)
    last.ckpt          the full training state after the last finished epoch, for --resume
    train_summary.json settings, epochs, wall time, skipped steps, best validation bpd
    logs/              CSV logs (and TensorBoard logs where tensorboard is installed)
Both checkpoint files are written atomically, so a run killed at any moment (kill -9 included) resumes
from the last finished epoch with --resume and loses nothing before it.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from flowbook import config
from flowbook.checkpoints import load_model, save_checkpoint
from flowbook.data import ImageDataset, load_mnist, make_loader
from flowbook.fast import COMPILE_MODES, enable_tf32, speed_up
from flowbook.layers.checks import check_images, trusted_images
from flowbook.models import MNIST_SHAPE, MODEL_NAMES, ImageFlow, create_flow, num_parameters


class FlowModule(pl.LightningModule):
    """Maximum likelihood training of one of the MNIST flows: the loss is the mean bpd of a batch.

    Adam(lr), learning rate warmed up linearly over `warmup_steps` and decayed by `gamma` per epoch.
    A batch with a non-finite loss is skipped (no backward, no step) and counted in `skipped_steps`.
    """

    def __init__(self, arch: str, lr: float = 1e-3, gamma: float = 0.99, warmup_steps: int = 0,
                 steps_per_epoch: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.flow = create_flow(arch)
        self.skipped_steps = 0

    def forward(self, imgs):
        return self.flow(imgs)

    def training_step(self, batch, batch_idx):
        loss = self.flow(batch[0])
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            self.log("skipped_steps", float(self.skipped_steps))
            return None
        self.log("train_bpd", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        # .forward: eager even when the flow's __call__ is compiled, so that validation batches of other
        # shapes compile nothing.
        self.log("val_bpd", self.flow.forward(batch[0]), prog_bar=True)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr,
                                     fused=fused_adam(self.device, self.trainer.precision))

        def factor(step):
            warmup = min(1.0, (step + 1) / hp.warmup_steps) if hp.warmup_steps > 0 else 1.0
            return warmup * hp.gamma ** (step // max(1, hp.steps_per_epoch))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def on_save_checkpoint(self, checkpoint):
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint):
        self.skipped_steps = checkpoint.get("skipped_steps", 0)


def fused_adam(device: torch.device, precision: str) -> bool:
    """Whether to use fused Adam (one kernel for the whole update instead of several per parameter):
    on a GPU, except under mixed precision, where Lightning refuses to clip the gradients of an optimizer
    that unscales them itself, as the fused one does."""
    return device.type == "cuda" and "mixed" not in str(precision)


class DeviceBatches:
    """Batches (images,) drawn from a tensor held on one device: no loader, no copies per step.

    images: int [N, C, H, W]; reshuffled each pass when `shuffle`; the last partial batch is dropped
    when `drop_last`.
    """

    def __init__(self, images: torch.Tensor, batch_size: int, shuffle: bool, drop_last: bool, seed: int = 0):
        self.images, self.batch_size, self.shuffle, self.drop_last = images, batch_size, shuffle, drop_last
        self.generator = torch.Generator(device=images.device).manual_seed(seed)

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        n = len(self.images)
        order = (torch.randperm(n, device=self.images.device, generator=self.generator) if self.shuffle
                 else torch.arange(n, device=self.images.device))
        for i in range(len(self)):
            yield (self.images[order[i * self.batch_size:(i + 1) * self.batch_size]],)


class TimeBudget(pl.Callback):
    """Stop training at the end of an epoch when the next one would end after `minutes` of training in
    this run. Every epoch stays whole, and a resumed run gets a budget of its own (Lightning's max_time
    would count the earlier runs' time too and stop a resumed run at once).

    epoch_s: the durations of this run's epochs, appended by a callback listed before this one
    (`RunCheckpoints.epoch_s`); the last one estimates the next (the first may include compiling)."""

    def __init__(self, minutes: float, epoch_s: list):
        self.seconds, self.epoch_s = 60 * minutes, epoch_s
        self._start = time.monotonic()

    def on_train_start(self, trainer, module):
        self._start = time.monotonic()

    def on_train_epoch_end(self, trainer, module):
        if time.monotonic() - self._start + self.epoch_s[-1] > self.seconds:
            trainer.should_stop = True


class RunCheckpoints(pl.Callback):
    """After each epoch: the best weights (by val_bpd) to <arch>.pt and the full state to last.ckpt,
    both atomically; keeps the wall time and best score across resumed runs."""

    def __init__(self, out_dir: Path, arch: str, settings: dict):
        self.out_dir, self.arch, self.settings = out_dir, arch, settings
        self.best_val = math.inf
        self.best_epoch = -1
        self.wall_before = 0.0
        self._start = time.time()
        self.curve = []  # (step, train bpd) of this process, for plots; not saved
        self.epoch_s = []  # duration of each epoch of this process, validation included; not saved
        self._epoch_start = time.monotonic()

    def on_train_epoch_start(self, trainer, module):
        self._epoch_start = time.monotonic()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # None: a skipped, non-finite step
            self.curve.append((trainer.global_step, float(loss)))

    def state_dict(self):
        return {"best_val": self.best_val, "best_epoch": self.best_epoch, "wall_s": self.wall_s()}

    def load_state_dict(self, state):
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.wall_before, self._start = state["wall_s"], time.time()

    def wall_s(self):
        return self.wall_before + time.time() - self._start

    def on_train_epoch_end(self, trainer, module):
        self.epoch_s.append(time.monotonic() - self._epoch_start)
        val = trainer.callback_metrics.get("val_bpd")
        epoch = trainer.current_epoch
        if val is not None and math.isfinite(float(val)) and float(val) < self.best_val:
            self.best_val, self.best_epoch = float(val), epoch
            save_checkpoint(module.flow, self.arch, self.out_dir / f"{self.arch}.pt",
                            **self.summary(trainer, module, epochs=epoch + 1))
        trainer.save_checkpoint(self.out_dir / "last.ckpt.tmp")
        (self.out_dir / "last.ckpt.tmp").replace(self.out_dir / "last.ckpt")

    def summary(self, trainer, module, epochs):
        return {"settings": self.settings, "epochs": epochs,
                "best_epoch": self.best_epoch + 1, "best_val_bpd_1sample": self.best_val,
                "skipped_steps": module.skipped_steps, "wall_s": round(self.wall_s(), 1),
                "train_img_per_s": self.images_per_s(trainer),
                "device": str(module.device), "parameters": num_parameters(module.flow)}

    def images_per_s(self, trainer):
        """Training images per second over a whole epoch (validation included): the median epoch of this
        process, so that compiling in the first epoch does not count; None before the first epoch ends."""
        if not self.epoch_s:
            return None
        median = sorted(self.epoch_s)[len(self.epoch_s) // 2]
        return round(trainer.num_training_batches * self.settings["batch_size"] / median, 1)


def _loaders(train_set: ImageDataset, val_set: ImageDataset, batch_size: int, device: torch.device, seed: int):
    if device.type == "cuda":  # hold the whole data set on the GPU; validate in few, large batches
        return (DeviceBatches(train_set.images.to(device), batch_size, True, True, seed),
                DeviceBatches(val_set.images.to(device), 1000, False, False))
    return (make_loader(train_set, batch_size, shuffle=True, drop_last=True, seed=seed),
            make_loader(val_set, 256))


def train(arch: str, out_dir: str | Path | None = None, epochs: int = 200, batch_size: int = 128,
          lr: float = 1e-3, gamma: float = 0.99, warmup_steps: int = 0, max_minutes: float | None = None,
          max_steps: int = -1, train_images: int | None = None, val_images: int | None = None,
          resume: bool = False, device: str | None = None, precision: str = "32-true",
          channels_last: bool = False, compile: str | None = None,
          seed: int = 42, progress: bool = True, datasets=None) -> tuple[ImageFlow, dict]:
    """Train one model; return (the best model by validation bpd, or the last where none was saved,
    the run summary). `datasets` = (train, val) overrides MNIST (tests use it).

    The GPU fast path (flowbook.fast): the data set is held on the GPU, TF32 is on, `precision`
    "bf16-mixed" runs the networks in bfloat16 autocast, `channels_last` stores activations NHWC and
    `compile` (a torch.compile mode) compiles the training loss. The images are checked once as a
    whole, so that no training step waits for the GPU to report their value range."""
    if arch not in MODEL_NAMES:
        raise ValueError(f"unknown model {arch!r}; choose one of {MODEL_NAMES}")
    out_dir = Path(out_dir) if out_dir is not None else config.PROJECT_ROOT / "runs" / arch
    out_dir.mkdir(parents=True, exist_ok=True)
    last = out_dir / "last.ckpt"
    if last.exists() and not resume:
        raise FileExistsError(f"{last} exists: pass --resume to continue that run, or choose another --out")
    device = torch.device(device) if device else config.get_device()
    if device.type == "cuda":
        enable_tf32()
    if not progress:
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    pl.seed_everything(seed, verbose=False)

    train_set, val_set = datasets if datasets is not None else load_mnist()[:2]
    train_set, val_set = train_set.subset(train_images), val_set.subset(val_images)
    for images in (train_set.images, val_set.images):
        check_images(images, img_shape=MNIST_SHAPE)
    train_batches, val_batches = _loaders(train_set, val_set, batch_size, device, seed)
    if len(train_batches) == 0:
        raise ValueError(f"batch size {batch_size} is larger than the {len(train_set)} training images")
    settings = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "gamma": gamma,
                "warmup_steps": warmup_steps, "max_steps": max_steps, "train_images": len(train_set),
                "val_images": len(val_set), "precision": precision, "channels_last": channels_last,
                "compile": compile, "seed": seed}
    module = FlowModule(arch, lr=lr, gamma=gamma, warmup_steps=warmup_steps, steps_per_epoch=len(train_batches))
    speed_up(module.flow, channels_last=channels_last, compile=compile)
    saver = RunCheckpoints(out_dir, arch, settings)
    loggers = [pl.loggers.CSVLogger(out_dir, name="logs")]
    try:
        loggers.append(pl.loggers.TensorBoardLogger(out_dir, name="logs"))
    except (ImportError, ModuleNotFoundError):
        pass
    callbacks = [saver] + ([TimeBudget(max_minutes, saver.epoch_s)] if max_minutes else [])
    callbacks += [pl.callbacks.LearningRateMonitor("step")] if progress else []
    trainer = pl.Trainer(
        default_root_dir=out_dir, max_epochs=epochs, max_steps=max_steps,
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
        gradient_clip_val=1.0, callbacks=callbacks, logger=loggers if progress else False,
        enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=min(50, len(train_batches)),
    )
    with trusted_images():
        trainer.fit(module, train_batches, val_batches, ckpt_path=str(last) if last.exists() else None)

    summary = {"arch": arch, **saver.summary(trainer, module, epochs=trainer.current_epoch)}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    summary["train_curve"] = saver.curve
    best = out_dir / f"{arch}.pt"
    model = module.flow
    if best.exists():
        model = load_model(best, map_location=device, arch=arch)
    return model.eval(), summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gamma", type=float, default=0.99, help="learning-rate decay per epoch")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time budget of this run: stop at the last epoch end within it (a resumed run gets its own)")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--train-images", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--val-images", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/<model>)")
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.ckpt")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. bf16-mixed")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory layout (GPU fast path)")
    parser.add_argument("--compile", default=None, choices=COMPILE_MODES, help="torch.compile the training loss")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    _, summary = train(args.model, args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       gamma=args.gamma, warmup_steps=args.warmup_steps, max_minutes=args.max_minutes,
                       max_steps=args.max_steps, train_images=args.train_images, val_images=args.val_images,
                       resume=args.resume, device=args.device, precision=args.precision,
                       channels_last=args.channels_last, compile=args.compile, seed=args.seed)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

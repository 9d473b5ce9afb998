"""`train`: one training run, from its settings to its run folder (the orchestration of the other modules)."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

from flowbook import config
from flowbook.checkpoints import load_model, read_checkpoint
from flowbook.data import load_mnist
from flowbook.fast import enable_tf32, speed_up
from flowbook.layers.checks import check_images, trusted_images
from flowbook.models import ALL_MODELS, MNIST_SHAPE, ImageFlow
from flowbook.training.data_order import DeviceBatches, EpochSeeds, _loaders
from flowbook.training.distributed import Processes
from flowbook.training.module import FlowModule, TrainingDiverged
from flowbook.training.progress import StepProgress
from flowbook.training.run_folder import (RunCheckpoints, _check_same_run, _init_weights, _saved_settings,
                                          check_schedule_left, requeue_checkpoints, run_lock)
from flowbook.training.schedule import BudgetPlanner
from flowbook.training.settings import GRADIENT_CLIP, RunSettings


def train(arch: str, out_dir: str | Path | None = None, *, resume: bool = False, device: str | None = None,
          progress: bool = True, datasets=None, devices: int | None = None, num_nodes: int | None = None,
          strategy: str = "auto", **settings) -> tuple[ImageFlow, dict]:
    """Train one model; return (the best model by validation score, or the last where none was saved,
    the run summary). `settings` are the fields of `RunSettings` (epochs, batch_size, lr, ...), all
    validated before any data is loaded. `datasets` = (train, val) overrides MNIST (tests use it).
    progress: True for Lightning's progress bar and logs, "steps" for one compact bar (notebooks), False
    for silence.

    devices, num_nodes, strategy: Lightning's, for training on several processes (`distributed`); the
    global batch is `batch_size`, split evenly between them. Only the first process writes into the run
    folder, and it holds the folder's lock. Several processes are started from the command line (Lightning
    re-runs it for the others), torchrun or srun, not from a notebook.

    The fast path (flowbook.fast): `precision` "bf16-mixed" runs the networks in bfloat16 autocast,
    `channels_last` stores activations NHWC and `compile` (a torch.compile mode) compiles the training
    loss; left unset, they are chosen for the device (`RunSettings.resolved`). On a GPU the data set is
    held on the device and TF32 is on. The images are checked once as a whole, so that no training step
    waits for the GPU to report their value range.

    A run that ends without a finite validation score, or that skipped most of its batches as non-finite,
    records status "diverged" in its summary and raises TrainingDiverged."""
    if arch not in ALL_MODELS:
        raise ValueError(f"unknown model {arch!r}; choose one of {ALL_MODELS}")
    run = RunSettings(**settings)
    procs = Processes(devices, num_nodes, strategy).resolved()
    if run.batch_size % procs.world:
        raise ValueError(f"the global batch of {run.batch_size} does not split evenly into {procs.world} processes: "
                         f"choose a --batch-size that is a multiple of {procs.world}")
    if run.init is not None and resume:
        raise ValueError("--init starts a new stage and --resume continues an old one: pass only one")
    if run.init is not None:
        read_checkpoint(run.init)  # a clear error now rather than after loading the data
    out_dir = Path(out_dir) if out_dir is not None else config.PROJECT_ROOT / "runs" / arch
    last = out_dir / "last.ckpt"
    if last.exists() and not resume:
        raise FileExistsError(f"{last} exists: pass --resume to continue that run, or choose another --out")
    if resume and not last.exists():
        raise FileNotFoundError(f"--resume: there is no run to continue in {out_dir} (no last.ckpt); "
                                "leave out --resume to start one")
    if not resume and (out_dir / f"{arch}.pt").exists():
        raise FileExistsError(f"{out_dir / f'{arch}.pt'} exists and this run did not write it: choose another --out "
                              f"(to continue from those weights: --init {out_dir / f'{arch}.pt'} --out <new folder>)")
    device = torch.device(device) if device else config.get_device()
    if device.type == "cuda":
        enable_tf32()
    if progress is not True:  # Lightning's notes (accelerators, tips) only with its own progress bar
        logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    train_set, val_set = datasets if datasets is not None else load_mnist()[:2]
    train_set, val_set = train_set.subset(run.train_images), val_set.subset(run.val_images)
    for images in (train_set.images, val_set.images):
        check_images(images, img_shape=MNIST_SHAPE)
    steps_per_epoch = len(train_set) // run.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {run.batch_size} is larger than the {len(train_set)} training images")
    if 0 < run.max_steps < steps_per_epoch:
        raise ValueError(f"max_steps {run.max_steps} ends the run before its first epoch of {steps_per_epoch} steps, "
                         "so before its first validation: ask for at least one epoch's steps, or fewer --train-images")
    state = torch.load(last, map_location="cpu", weights_only=False) if resume else None  # read once, checked twice
    saved = _saved_settings(state, last, arch) if resume else None
    if saved is not None:  # what this run left to the defaults, it inherits from the run it continues
        run = dataclasses.replace(run, **{k: saved[k] for k in ("precision", "channels_last", "compile", "init")
                                          if getattr(run, k) is None and k in saved})
    run = run.resolved(device, steps_per_epoch)
    if saved is not None:
        _check_same_run(saved, run, out_dir, arch)
    if resume:
        check_schedule_left(state, last, arch)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume and (stale := requeue_checkpoints(out_dir)):
        # A job requeued before its first epoch ended: less than an epoch, which Lightning would load inexactly
        # (see requeue_checkpoints). The run starts again from its first step.
        print(f"Starting from the first step: removing {', '.join(p.name for p in stale)} (a requeued job's "
              "unfinished first epoch)", flush=True)
        for path in stale:
            path.unlink(missing_ok=True)  # every process of the run does this
    pl.seed_everything(run.seed, verbose=False)
    module = FlowModule(arch, lr=run.lr, schedule=run.schedule, gamma=run.gamma, warmup_steps=run.warmup_steps,
                        steps_per_epoch=steps_per_epoch, total_steps=run.planned_steps(steps_per_epoch))
    history = _init_weights(module, arch, run.init) if run.init and not resume else []
    speed_up(module.flow, channels_last=run.channels_last, compile=None if run.compile == "off" else run.compile)
    saver = RunCheckpoints(out_dir, arch, run, history, device)
    loggers = False
    if progress is True:
        loggers = [pl.loggers.CSVLogger(out_dir, name="logs")]
        try:
            loggers.append(pl.loggers.TensorBoardLogger(out_dir, name="logs"))
        except (ImportError, ModuleNotFoundError):
            pass
    epoch_seeds = EpochSeeds(run.seed)
    callbacks = [saver, BudgetPlanner(run.planned_steps(steps_per_epoch), run.max_minutes, saver.epoch_s),
                 epoch_seeds]
    callbacks += [pl.callbacks.LearningRateMonitor("step")] if progress is True else []
    callbacks += [StepProgress()] if progress == "steps" else []
    trainer = pl.Trainer(
        default_root_dir=out_dir, max_epochs=run.epochs, max_steps=run.max_steps,
        accelerator="gpu" if device.type == "cuda" else "cpu", **procs.trainer_options(), precision=run.precision,
        # Logs for runs with Lightning's own progress (the command line); a chapter's short demonstration
        # run keeps its curve in memory and writes no log files.
        gradient_clip_val=GRADIENT_CLIP, callbacks=callbacks, logger=loggers,
        enable_checkpointing=False, enable_progress_bar=progress is True, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=min(50, steps_per_epoch),
    )
    train_batches, val_batches = _loaders(train_set, val_set, run.batch_size, device, run.seed,
                                          trainer.global_rank, trainer.world_size)
    if isinstance(train_batches, DeviceBatches):
        epoch_seeds.batches = train_batches
    else:
        module.shards = (train_batches.batch_sampler, val_batches.batch_sampler)
    first = trainer.is_global_zero

    def write_summary(status, **extra):
        summary = {"arch": arch, "status": status, **extra,
                   **saver.summary(trainer, module, epochs=trainer.current_epoch)}
        if first:
            (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # The first process holds the folder's lock: with several, the others are its helpers.
    with run_lock(out_dir) if first else contextlib.nullcontext(), trusted_images():
        try:
            trainer.fit(module, train_batches, val_batches, ckpt_path=str(last) if resume else None)
            module.check_learned(saver.best_val)
        except TrainingDiverged as err:
            write_summary("diverged", error=str(err))
            raise

    summary = write_summary("finished")
    summary["train_curve"] = saver.curve
    best = out_dir / f"{arch}.pt"
    model = module.flow
    if best.exists():
        model = load_model(best, map_location=device, arch=arch)
    return model.eval(), summary

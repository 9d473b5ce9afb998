"""Training with PyTorch Lightning, as the reference does, made resumable, safe and budget-aware.

    python -m flowbook.train --model multiscale --max-minutes 120        # on the CPU: its fast defaults
    python -m flowbook.train --model multiscale --max-minutes 120 --init checkpoints/multiscale.pt
    python -m flowbook.train --model simple --out runs/simple --resume   # continue a killed run

The learning rate warms up over `--warmup-steps` and then follows half a cosine down to zero at the end of
the run: after `--epochs`, `--max-steps`, or the last whole epoch that fits into `--max-minutes` (planned
from the measured speed of the first steps and re-planned after every epoch). `--schedule exponential`
gives the reference's decay by `--gamma` per epoch instead. `--init PATH` starts a new stage from a
checkpoint's weights with a fresh optimizer and schedule; the summary then carries the whole history.

A run folder (default runs/<model>) holds
    <model>.pt         best weights by validation bpd (a plain state dict, see flowbook.checkpoints)
    last.ckpt          the full training state after the last finished epoch, for --resume
    train_summary.json settings, history of stages, epochs, wall time, skipped steps, best validation bpd
    logs/              CSV logs (and TensorBoard logs where tensorboard is installed)
Both checkpoint files are written atomically, so a run killed at any moment (kill -9 included) resumes
from the last finished epoch with --resume and loses nothing before it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from tqdm import tqdm  # text bars: work in a terminal and in Jupyter without ipywidgets

from flowbook import config
from flowbook.checkpoints import load_model, load_state, read_checkpoint, save_checkpoint
from flowbook.data import ImageDataset, load_mnist, make_loader
from flowbook.fast import COMPILE_MODES, enable_tf32, speed_up
from flowbook.layers.checks import check_images, trusted_images
from flowbook.models import ALL_MODELS, MNIST_SHAPE, ImageFlow, create_flow, num_parameters
from flowbook.provenance import hardware

# Library chatter that says nothing about the run: Lightning's own deprecation of a torch API, and its note
# on the skipped (non-finite) steps, which the run counts and reports itself.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`")

SCHEDULES = ("cosine", "exponential")
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed")
# What --resume may change: the budget of the new run, and how fast it computes (not what it computes).
RESUMABLE_CHANGES = ("epochs", "max_minutes", "max_steps", "channels_last", "compile")
# The fastest configuration measured on a CPU (`python -m flowbook.bench --device cpu --compare`, README:
# 2.7x fp32 eager for the multi-scale flow), for runs long enough to repay the minute or two torch.compile
# takes. Short runs (a chapter's demonstration) stay in float32, eager: bfloat16 alone would give them
# 1.4x to 1.6x, but from untrained weights its loss is further from float32's (README, Speed).
CPU_FAST = {"precision": "bf16-mixed", "channels_last": True, "compile": "default"}
COMPILE_PAYS_AFTER_STEPS = 1000
MAX_BAD_STEPS = int(os.environ.get("FLOWBOOK_MAX_BAD_STEPS", 50))  # non-finite steps in a row that end a run
GRADIENT_CLIP = 1.0


class TrainingDiverged(RuntimeError):
    """Too many consecutive training steps had a non-finite loss."""


@dataclass(frozen=True)
class RunSettings:
    """The settings of one training run: validated once, recorded in the summary, compared on --resume.

    precision, channels_last and compile left as None are chosen for the device by `resolved`
    (compile "off": eager).
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    schedule: str = "cosine"
    gamma: float = 0.99
    warmup_steps: int = 0
    max_minutes: float | None = None
    max_steps: int = -1
    train_images: int | None = None
    val_images: int | None = None
    precision: str | None = None
    channels_last: bool | None = None
    compile: str | None = None
    seed: int = 42
    init: str | None = None

    def __post_init__(self):
        problems = []

        def need(ok, what):
            if not ok:
                problems.append(what)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        need(is_int(self.epochs) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}")
        need(is_int(self.batch_size) and self.batch_size >= 1,
             f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        need(isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0,
             f"lr must be a finite number > 0, got {self.lr!r}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(isinstance(self.gamma, (int, float)) and 0 < self.gamma <= 1,
             f"gamma must be in (0, 1], got {self.gamma!r}")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0,
             f"warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        need(self.max_minutes is None or (isinstance(self.max_minutes, (int, float))
                                          and math.isfinite(self.max_minutes) and self.max_minutes > 0),
             f"max_minutes must be a number > 0 (or None for no time limit), got {self.max_minutes!r}")
        need(is_int(self.max_steps) and (self.max_steps == -1 or self.max_steps >= 1),
             f"max_steps must be an integer >= 1 (or -1 for no limit), got {self.max_steps!r}")
        for name in ("train_images", "val_images"):
            value = getattr(self, name)
            need(value is None or (is_int(value) and value >= 1),
                 f"{name} must be an integer >= 1 (or None for all), got {value!r}")
        need(self.precision is None or self.precision in PRECISIONS,
             f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        need(self.compile is None or self.compile in (*COMPILE_MODES, "off"),
             f"compile must be one of {COMPILE_MODES} or 'off', got {self.compile!r}")
        need(is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        if problems:
            raise ValueError("invalid training settings: " + "; ".join(problems))

    def planned_steps(self, steps_per_epoch: int) -> int:
        """Optimizer steps of the run before any time budget: epochs x steps per epoch, or max_steps."""
        steps = self.epochs * steps_per_epoch
        return min(steps, self.max_steps) if self.max_steps > 0 else steps

    def resolved(self, device: torch.device, steps_per_epoch: int) -> "RunSettings":
        """These settings with the fast-path choices left as None filled in for `device`: CPU_FAST for
        runs on a CPU with bfloat16 support of at least COMPILE_PAYS_AFTER_STEPS steps and 10 minutes;
        else float32, contiguous, eager (the GPU runbook sets its choices explicitly)."""
        long_run = (self.planned_steps(steps_per_epoch) >= COMPILE_PAYS_AFTER_STEPS
                    and (self.max_minutes is None or self.max_minutes >= 10))
        fast = CPU_FAST if device.type == "cpu" and long_run and _cpu_has_bf16() else {}
        return dataclasses.replace(
            self,
            precision=self.precision or fast.get("precision", "32-true"),
            channels_last=self.channels_last if self.channels_last is not None else fast.get("channels_last", False),
            compile=self.compile or fast.get("compile", "off"))


def training_recipe(settings: RunSettings | None = None) -> str:
    """A sentence with the optimiser and schedule of `settings` (default: the trainer's defaults)."""
    r = settings or RunSettings()
    schedule = ("half a cosine from the peak down to zero at the end of the run" if r.schedule == "cosine"
                else f"decayed by {r.gamma} per epoch")
    warmup = f"warmed up linearly over {r.warmup_steps} steps, then " if r.warmup_steps else ""
    return (f"Adam, peak learning rate {r.lr:g}, {warmup}{schedule}; gradient norm clipped at {GRADIENT_CLIP}; "
            f"batches of {r.batch_size}; {r.epochs} epochs unless a time or step budget ends the run first")


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class LRFactor:
    """The learning-rate factor of optimizer step `step` (a LambdaLR function): a linear warm-up over
    `warmup_steps`, times either half a cosine from 1 to 0 over `total_steps` ("cosine") or
    gamma ** epoch ("exponential").

    `total_steps` may be re-planned during the run (a time budget): the cosine's progress then
    continues from where it is at the new pace, so the learning rate never jumps. A callable object
    rather than a function, so that LambdaLR's state dict saves its progress and --resume restores it.
    """

    def __init__(self, schedule: str, total_steps: int, warmup_steps: int = 0, gamma: float = 0.99,
                 steps_per_epoch: int = 1):
        self.schedule, self.total_steps, self.warmup_steps = schedule, total_steps, warmup_steps
        self.gamma, self.steps_per_epoch = gamma, steps_per_epoch
        self.progress, self.last_step = 0.0, 0

    def __call__(self, step: int) -> float:
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        if self.schedule == "exponential":
            return warm * self.gamma ** (step // max(1, self.steps_per_epoch))
        if step > self.last_step:
            left = max(1, self.total_steps - self.last_step)
            self.progress = min(1.0, self.progress + (step - self.last_step) * (1 - self.progress) / left)
            self.last_step = step
        return warm * 0.5 * (1 + math.cos(math.pi * self.progress))


class FlowModule(pl.LightningModule):
    """Training of one of the MNIST models: the loss is what the model's forward returns, named by its
    `loss_name`: the mean bpd of a batch for the flows (maximum likelihood), the flow-matching loss ("cfm")
    for the flow-matching model. Logged as train_<loss_name> and val_<loss_name>.

    Adam(lr) with the learning-rate schedule `LRFactor`. A batch with a non-finite loss is skipped (no
    backward, no step) and counted in `skipped_steps`; MAX_BAD_STEPS in a row raise TrainingDiverged.
    """

    def __init__(self, arch: str, lr: float = 1e-3, schedule: str = "cosine", gamma: float = 0.99,
                 warmup_steps: int = 0, steps_per_epoch: int = 1, total_steps: int = 1):
        super().__init__()
        self.save_hyperparameters()
        self.flow = create_flow(arch)
        self.skipped_steps = 0
        self.bad_in_a_row = 0
        self.lr_factor = LRFactor(schedule, total_steps, warmup_steps, gamma, steps_per_epoch)

    def forward(self, imgs):
        return self.flow(imgs)

    def training_step(self, batch, batch_idx):
        loss = self.flow(batch[0])
        if not torch.isfinite(loss):
            self.skipped_steps += 1
            self.bad_in_a_row += 1
            self.log("skipped_steps", float(self.skipped_steps))
            if self.bad_in_a_row >= MAX_BAD_STEPS:
                raise TrainingDiverged(
                    f"{self.bad_in_a_row} training steps in a row had a non-finite loss (step "
                    f"{self.global_step}): the run diverged. Lower --lr (now {self.hparams.lr:g}) or "
                    "add --warmup-steps, and start a new run.")
            return None
        self.bad_in_a_row = 0
        self.log(f"train_{self.flow.loss_name}", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        # .forward: eager even when the flow's __call__ is compiled, so that validation batches of other
        # shapes compile nothing.
        self.log(f"val_{self.flow.loss_name}", self.flow.forward(batch[0]), prog_bar=True)

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr,
                                     fused=fused_adam(self.device, self.trainer.precision))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_factor)
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def on_save_checkpoint(self, checkpoint):
        checkpoint["skipped_steps"] = self.skipped_steps

    def on_load_checkpoint(self, checkpoint):
        self.skipped_steps = checkpoint.get("skipped_steps", 0)


def _best_key(flow) -> str:
    """The summary's key for the best validation score: bpd with one dequantization sample for the flows."""
    return "best_val_bpd_1sample" if flow.loss_name == "bpd" else f"best_val_{flow.loss_name}"


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
            self.bar.set_postfix({module.flow.loss_name: f"{float(loss):.3f}"}, refresh=False)

    def on_train_end(self, trainer, module):
        self.bar.close()


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


class BudgetPlanner(pl.Callback):
    """Plans the cosine schedule's length (`FlowModule.lr_factor.total_steps`) and, with a time budget
    of `minutes` for this run, stops training at the end of the last whole epoch that fits.

    Without a budget the schedule ends after `planned_steps`. With one, the length is estimated from
    the speed of this run's steps after the first `skip` (which may compile), first after `probe` steps
    and again every `probe` steps, so that a run that slows down (another job starts beside it) ends its
    schedule with the last epoch that still fits rather than half-way down the cosine; at every epoch end
    it is re-planned from that epoch's measured duration (validation included). The learning rate then
    reaches about zero when the budget ends. A resumed run gets a budget of its own.

    epoch_s: the durations of this run's epochs, appended by a callback listed before this one
    (`RunCheckpoints.epoch_s`); clock: the time in seconds (time.monotonic; a test passes its own)."""

    VAL_SHARE = 0.1  # validation: forward only, on a fifth of the data, about a tenth of an epoch

    def __init__(self, planned_steps: int, minutes: float | None, epoch_s: list, skip: int = 5, probe: int = 20,
                 clock=time.monotonic):
        self.planned_steps, self.epoch_s, self.skip, self.probe = planned_steps, epoch_s, skip, probe
        self.seconds = 60 * minutes if minutes else None
        self.clock = clock
        self._start = self._rate_start = clock()
        self._run_steps = self._rate_steps = 0
        self._epoch_start_step = 0

    def _plan(self, trainer, module, total: int):
        module.lr_factor.total_steps = max(trainer.global_step + 1, min(self.planned_steps, total))

    def on_train_start(self, trainer, module):
        self._start = self.clock()
        self._plan(trainer, module, self.planned_steps)

    def on_train_epoch_start(self, trainer, module):
        self._epoch_start_step = trainer.global_step
        if self._run_steps >= self.skip:  # past the first steps: measure this epoch's speed from its start
            self._rate_start, self._rate_steps = self.clock(), self._run_steps

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._run_steps += 1
        if self.seconds is None:
            return
        if self._run_steps == self.skip:
            self._rate_start, self._rate_steps = self.clock(), self._run_steps
        measured = self._run_steps - self._rate_steps
        if self._run_steps > self.skip and measured >= self.probe and measured % self.probe == 0:
            self._plan_from_speed(trainer, module, (self.clock() - self._rate_start) / measured)

    def _plan_from_speed(self, trainer, module, per_step: float):
        """Plan this epoch and as many more whole epochs as the budget has room for at `per_step` seconds."""
        steps = trainer.num_training_batches
        epoch_est = max(self.epoch_s[-1:] + [steps * per_step * (1 + self.VAL_SHARE)])
        done = trainer.global_step - self._epoch_start_step
        this_epoch_left = (steps - done + self.VAL_SHARE * steps) * per_step
        after = self.seconds - (self.clock() - self._start) - this_epoch_left
        more = int(max(0.0, after) // epoch_est)
        self._plan(trainer, module, self._epoch_start_step + (1 + more) * steps)

    def on_train_epoch_end(self, trainer, module):
        factor = module.lr_factor
        if factor.schedule == "cosine" and factor.progress >= 1.0:
            trainer.should_stop = True  # the schedule has ended: more epochs at a zero learning rate change nothing
            return
        if self.seconds is None:
            return
        left = self.seconds - (self.clock() - self._start)
        more = int(max(0.0, left) // self.epoch_s[-1])
        if more == 0:
            trainer.should_stop = True
        else:
            self._plan(trainer, module, trainer.global_step + more * trainer.num_training_batches)


class RunCheckpoints(pl.Callback):
    """After each epoch: the best weights (by val_bpd) to <arch>.pt and the full state to last.ckpt,
    both atomically; keeps the wall time and best score across resumed runs.

    history: the stages before this run (from --init's checkpoint); `summary` appends this one."""

    def __init__(self, out_dir: Path, arch: str, settings: RunSettings, history: list, device: torch.device):
        self.out_dir, self.arch, self.settings = out_dir, arch, settings
        self.history, self.hardware, self.device = history, hardware(device), str(device)
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
        return {"best_val": self.best_val, "best_epoch": self.best_epoch, "wall_s": self.wall_s(),
                "settings": dataclasses.asdict(self.settings), "history": self.history}

    def load_state_dict(self, state):
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.wall_before, self._start = state["wall_s"], time.time()
        self.history = state.get("history", self.history)

    def wall_s(self):
        return self.wall_before + time.time() - self._start

    def on_train_epoch_end(self, trainer, module):
        self.epoch_s.append(time.monotonic() - self._epoch_start)
        val = trainer.callback_metrics.get(f"val_{module.flow.loss_name}")
        epoch = trainer.current_epoch
        if val is not None and math.isfinite(float(val)) and float(val) < self.best_val:
            self.best_val, self.best_epoch = float(val), epoch
            save_checkpoint(module.flow, self.arch, self.out_dir / f"{self.arch}.pt",
                            **self.summary(trainer, module, epochs=epoch + 1))
        tmp = self.out_dir / f".last.ckpt.{os.getpid()}.tmp"
        try:
            trainer.save_checkpoint(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.out_dir / "last.ckpt")
        finally:
            tmp.unlink(missing_ok=True)

    def stage(self, trainer, epochs: int) -> dict:
        """This run's stage of the history: where it started, its settings, hardware and amounts."""
        return {"init": self.settings.init, "settings": dataclasses.asdict(self.settings),
                "hardware": self.hardware, "device": self.device, "torch": str(torch.__version__),
                "epochs": epochs, "steps": trainer.global_step,
                "images_seen": trainer.global_step * self.settings.batch_size, "wall_s": round(self.wall_s(), 1),
                "train_img_per_s": self.images_per_s(trainer)}

    def summary(self, trainer, module, epochs):
        history = [*self.history, self.stage(trainer, epochs)]
        return {"settings": dataclasses.asdict(self.settings), "epochs": epochs,
                "best_epoch": self.best_epoch + 1, _best_key(module.flow): self.best_val,
                "skipped_steps": module.skipped_steps, "wall_s": round(self.wall_s(), 1),
                "train_img_per_s": self.images_per_s(trainer),
                "device": self.device, "hardware": self.hardware, "parameters": num_parameters(module.flow),
                "history": history,
                "total": {key: round(sum(s[key] for s in history), 1) for key in ("epochs", "images_seen", "wall_s")}}

    def images_per_s(self, trainer):
        """Training images per second over a whole epoch (validation included): the median epoch of this
        process, so that compiling in the first epoch does not count; None before the first epoch ends."""
        if not self.epoch_s:
            return None
        median = sorted(self.epoch_s)[len(self.epoch_s) // 2]
        return round(trainer.num_training_batches * self.settings.batch_size / median, 1)


def _loaders(train_set: ImageDataset, val_set: ImageDataset, batch_size: int, device: torch.device, seed: int):
    if device.type == "cuda":  # hold the whole data set on the GPU; validate in few, large batches
        return (DeviceBatches(train_set.images.to(device), batch_size, True, True, seed),
                DeviceBatches(val_set.images.to(device), 1000, False, False))
    return (make_loader(train_set, batch_size, shuffle=True, drop_last=True, seed=seed),
            make_loader(val_set, 256))


_HELD_LOCKS: set[Path] = set()  # run folders whose lock this process holds (run_lock is re-entrant)


@contextlib.contextmanager
def run_lock(folder: Path, wait: bool = False):
    """Hold an exclusive lock on the run folder while training: a second trainer started on the same
    folder gets a clear error instead of writing over the first one's files, or with `wait`, waits until
    the first has finished. Re-entrant within a process, so a caller can hold it around `train`."""
    key = Path(folder).resolve()
    if key in _HELD_LOCKS:
        yield
        return
    try:
        import fcntl
    except ImportError:  # not on Unix: no lock
        yield
        return
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            if not wait:
                raise FileExistsError(f"another trainer is running in {folder} (process {holder}): "
                                      "wait for it to end, or choose another --out") from None
            print(f"Waiting for another trainer in {folder} (process {holder}) to finish ...", flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        _HELD_LOCKS.add(key)
        try:
            yield
        finally:
            _HELD_LOCKS.discard(key)
            fcntl.flock(f, fcntl.LOCK_UN)


def _saved_settings(last: Path, arch: str) -> dict | None:
    """The settings of the run whose state is `last` (None for a run from before they were saved); a
    clear error where it is a run of another model."""
    state = torch.load(last, map_location="cpu", weights_only=False)
    saved_arch = state.get("hyper_parameters", {}).get("arch")
    if saved_arch is not None and saved_arch != arch:
        raise ValueError(f"{last} is a run of the {saved_arch!r} flow, not {arch!r}: choose another --out")
    return next((cb["settings"] for cb in state.get("callbacks", {}).values()
                 if isinstance(cb, dict) and "settings" in cb), None)


def _check_same_run(saved: dict, run: RunSettings, folder: Path, arch: str) -> None:
    """A clear error where --resume would continue a run with other settings than it was started with."""
    new = dataclasses.asdict(run)
    changed = [f"{k} {saved.get(k)!r} -> {new[k]!r}" for k in new
               if k not in RESUMABLE_CHANGES and saved.get(k) != new[k]]
    if changed:
        raise ValueError(f"--resume continues the run in {folder} with its own settings, and these differ: "
                         f"{', '.join(changed)}. Resume with the same settings (only {', '.join(RESUMABLE_CHANGES)} "
                         f"may change), or start a new stage from its weights with --init "
                         f"{folder / f'{arch}.pt'} --out <new folder>.")


def _init_weights(module: FlowModule, arch: str, path: str) -> list:
    """Load --init's weights into `module` and return that checkpoint's training history."""
    ckpt = read_checkpoint(path)
    load_state(module.flow, ckpt, arch)
    meta = ckpt.get("meta", {})
    if "history" in meta:
        return list(meta["history"])
    # A checkpoint from before histories were kept: one stage of what its metadata says.
    return [{"init": None, "settings": meta.get("settings"), "hardware": meta.get("hardware", meta.get("device")),
             "device": meta.get("device"), "torch": None, "epochs": meta.get("epochs", 0),
             "steps": None, "images_seen": 0, "wall_s": meta.get("wall_s", 0.0), "train_img_per_s": None}]


def train(arch: str, out_dir: str | Path | None = None, *, resume: bool = False, device: str | None = None,
          progress: bool = True, datasets=None, **settings) -> tuple[ImageFlow, dict]:
    """Train one model; return (the best model by validation bpd, or the last where none was saved,
    the run summary). `settings` are the fields of `RunSettings` (epochs, batch_size, lr, ...), all
    validated before any data is loaded. `datasets` = (train, val) overrides MNIST (tests use it).
    progress: True for Lightning's progress bar and logs, "steps" for one compact bar (notebooks), False
    for silence.

    The fast path (flowbook.fast): `precision` "bf16-mixed" runs the networks in bfloat16 autocast,
    `channels_last` stores activations NHWC and `compile` (a torch.compile mode) compiles the training
    loss; left unset, they are chosen for the device (`RunSettings.resolved`). On a GPU the data set is
    held on the device and TF32 is on. The images are checked once as a whole, so that no training step
    waits for the GPU to report their value range."""
    if arch not in ALL_MODELS:
        raise ValueError(f"unknown model {arch!r}; choose one of {ALL_MODELS}")
    run = RunSettings(**settings)
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
    train_batches, val_batches = _loaders(train_set, val_set, run.batch_size, device, run.seed)
    if len(train_batches) == 0:
        raise ValueError(f"batch size {run.batch_size} is larger than the {len(train_set)} training images")
    saved = _saved_settings(last, arch) if resume else None
    if saved is not None:  # what this run left to the defaults, it inherits from the run it continues
        run = dataclasses.replace(run, **{k: saved[k] for k in ("precision", "channels_last", "compile", "init")
                                          if getattr(run, k) is None and k in saved})
    run = run.resolved(device, len(train_batches))
    if saved is not None:
        _check_same_run(saved, run, out_dir, arch)
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(run.seed, verbose=False)
    module = FlowModule(arch, lr=run.lr, schedule=run.schedule, gamma=run.gamma, warmup_steps=run.warmup_steps,
                        steps_per_epoch=len(train_batches), total_steps=run.planned_steps(len(train_batches)))
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
    callbacks = [saver, BudgetPlanner(run.planned_steps(len(train_batches)), run.max_minutes, saver.epoch_s),
                 EpochSeeds(run.seed, train_batches if isinstance(train_batches, DeviceBatches) else None)]
    callbacks += [pl.callbacks.LearningRateMonitor("step")] if progress is True else []
    callbacks += [StepProgress()] if progress == "steps" else []
    trainer = pl.Trainer(
        default_root_dir=out_dir, max_epochs=run.epochs, max_steps=run.max_steps,
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=run.precision,
        # Logs for runs with Lightning's own progress (the command line); a chapter's short demonstration
        # run keeps its curve in memory and writes no log files.
        gradient_clip_val=GRADIENT_CLIP, callbacks=callbacks, logger=loggers,
        enable_checkpointing=False, enable_progress_bar=progress is True, enable_model_summary=False,
        num_sanity_val_steps=0, log_every_n_steps=min(50, len(train_batches)),
    )
    with run_lock(out_dir), trusted_images():
        try:
            trainer.fit(module, train_batches, val_batches, ckpt_path=str(last) if resume else None)
        except TrainingDiverged as err:
            summary = {"arch": arch, "status": "diverged", "error": str(err),
                       **saver.summary(trainer, module, epochs=trainer.current_epoch)}
            (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
            raise

    summary = {"arch": arch, "status": "finished", **saver.summary(trainer, module, epochs=trainer.current_epoch)}
    (out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    summary["train_curve"] = saver.curve
    best = out_dir / f"{arch}.pt"
    model = module.flow
    if best.exists():
        model = load_model(best, map_location=device, arch=arch)
    return model.eval(), summary


def _optional(kind):
    """argparse type: `kind`, or None for 'auto'."""
    def parse(text):
        return None if text == "auto" else kind(text)
    return parse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=ALL_MODELS)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (after warm-up)")
    parser.add_argument("--schedule", default="cosine", choices=SCHEDULES,
                        help="cosine: down to zero at the end of the run; exponential: --gamma per epoch")
    parser.add_argument("--gamma", type=float, default=0.99, help="learning-rate decay per epoch (exponential)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="time budget of this run: stop at the last epoch end within it (a resumed run gets its own)")
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--train-images", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--val-images", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/<model>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last.ckpt")
    parser.add_argument("--init", default=None, help="start from this checkpoint's weights (new optimizer and schedule)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda where available)")
    parser.add_argument("--precision", default=None, type=_optional(str),
                        help=f"one of {PRECISIONS} (default auto: bf16-mixed on a CPU with bfloat16, else 32-true)")
    parser.add_argument("--channels-last", default=None, type=_optional(lambda s: s.lower() in ("1", "true", "yes")),
                        nargs="?", const="1", help="NHWC memory layout (default auto: on for the CPU)")
    parser.add_argument("--compile", default=None, type=_optional(str),
                        help=f"torch.compile mode for the training loss, one of {COMPILE_MODES} or off "
                             "(default auto: 'default' for long runs on a CPU)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("model", "out", "resume", "device")}
    try:
        _, summary = train(args.model, args.out, resume=args.resume, device=args.device, **settings)
    except (ValueError, FileExistsError, FileNotFoundError, TrainingDiverged) as err:
        parser.exit(2, f"flowbook.train: error: {err}\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

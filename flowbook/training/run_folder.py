"""The run folder: its lock, the checkpoints and summary written into it, and the checks before a run
continues (--resume) or starts from (--init) what is there."""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from flowbook.checkpoints import load_shared_state, load_state, read_checkpoint, save_checkpoint
from flowbook.models import noise_record, num_parameters
from flowbook.provenance import hardware
from flowbook.training.module import FlowModule, _best_key
from flowbook.training.settings import RESUMABLE_CHANGES, RunSettings

class RunCheckpoints(pl.Callback):
    """After each epoch: the best weights (by the validation score) to <arch>.pt and the full state to
    last.ckpt, both atomically and by the first process only; keeps the wall time and best score across
    resumed runs.

    history: the stages before this run (from --init's checkpoint); `summary` appends this one."""

    def __init__(self, out_dir: Path, arch: str, settings: RunSettings, history: list, device: torch.device):
        self.out_dir, self.arch, self.settings = out_dir, arch, settings
        self.history, self.hardware, self.device = history, hardware(device), str(device)
        self.best_val = math.inf
        self.best_epoch = -1
        self.wall_before = 0.0
        self._start = time.time()
        self.curve = []  # (step, training loss: bpd, or noisy_bpd for a noise-trained model) of this process; not saved
        self.epoch_s = []  # duration of each epoch of this process, validation included; not saved
        self.val_curve = []  # [images seen in this stage, validation score] after each epoch: saved, in the history
        self._epoch_start = time.monotonic()

    def on_train_epoch_start(self, trainer, module):
        self._epoch_start = time.monotonic()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # None: a skipped, non-finite step
            self.curve.append((trainer.global_step, float(loss)))

    def state_dict(self):
        return {"best_val": self.best_val, "best_epoch": self.best_epoch, "wall_s": self.wall_s(),
                "settings": dataclasses.asdict(self.settings), "history": self.history, "val_curve": self.val_curve}

    def load_state_dict(self, state):
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.wall_before, self._start = state["wall_s"], time.time()
        self.history = state.get("history", self.history)
        self.val_curve = state.get("val_curve", [])

    def wall_s(self):
        return self.wall_before + time.time() - self._start

    def on_train_epoch_end(self, trainer, module):
        """Only the first process writes (on several, every process has the same weights); all of them call
        `trainer.save_checkpoint`, which waits for the others."""
        self.epoch_s.append(time.monotonic() - self._epoch_start)
        val = trainer.callback_metrics.get(f"val_{module.flow.loss_name}")
        epoch = trainer.current_epoch
        if val is not None:
            self.val_curve.append([trainer.global_step * self.settings.batch_size, round(float(val), 5)])
        if val is not None and math.isfinite(float(val)) and float(val) < self.best_val:
            self.best_val, self.best_epoch = float(val), epoch
            if trainer.is_global_zero:
                save_checkpoint(module.flow, self.arch, self.out_dir / f"{self.arch}.pt",
                                **self.summary(trainer, module, epochs=epoch + 1))
        tmp = self.out_dir / ".last.ckpt.tmp"  # the run lock makes this process the folder's only writer
        try:
            trainer.save_checkpoint(tmp)  # written by the first process only
            if trainer.is_global_zero:
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, self.out_dir / "last.ckpt")
                for stale in self.out_dir.glob("hpc_ckpt_*.ckpt"):  # see `requeue_checkpoints`
                    stale.unlink()
        finally:
            if trainer.is_global_zero:
                tmp.unlink(missing_ok=True)

    def stage(self, trainer, epochs: int) -> dict:
        """This run's stage of the history: where it started, its settings, hardware and amounts, and its
        validation curve `val_curve`: [images seen in this stage, validation score] after each epoch; `arch`,
        as --init may start from another architecture's weights."""
        return {"arch": self.arch, "init": self.settings.init, "settings": dataclasses.asdict(self.settings),
                "hardware": self.hardware, "device": self.device, "torch": str(torch.__version__),
                "processes": trainer.world_size, "epochs": epochs, "steps": trainer.global_step,
                "images_seen": trainer.global_step * self.settings.batch_size, "wall_s": round(self.wall_s(), 1),
                "train_img_per_s": self.images_per_s(trainer), "val_curve": [list(p) for p in self.val_curve]}

    def summary(self, trainer, module, epochs):
        history = [*self.history, self.stage(trainer, epochs)]
        return {"settings": dataclasses.asdict(self.settings), "epochs": epochs,
                "best_epoch": self.best_epoch + 1, _best_key(module.flow): self.best_val, **noise_record(module.flow),
                "skipped_steps": module.skipped_steps, "batches": module.batches,
                "processes": trainer.world_size, "wall_s": round(self.wall_s(), 1),
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


def _saved_settings(state: dict, last: Path, arch: str) -> dict | None:
    """The settings of the run whose state (loaded from `last`) is `state` (None for a run from before they
    were saved); a clear error where it is a run of another model."""
    saved_arch = state.get("hyper_parameters", {}).get("arch")
    if saved_arch is not None and saved_arch != arch:
        raise ValueError(f"{last} is a run of the {saved_arch!r} flow, not {arch!r}: choose another --out")
    return next((cb["settings"] for cb in state.get("callbacks", {}).values()
                 if isinstance(cb, dict) and "settings" in cb), None)


def check_schedule_left(state: dict, last: Path, arch: str) -> None:
    """A clear error where --resume would continue the run whose state (loaded from `last`) is `state` and
    whose cosine schedule has ended: every further step would run at a learning rate of zero, recorded as
    training. A new stage (--init) starts a schedule anew."""
    factors = [f for s in state.get("lr_schedulers", []) for f in s.get("lr_lambdas", []) if isinstance(f, dict)]
    if any(f.get("schedule") == "cosine" and f.get("progress", 0.0) >= 1.0 for f in factors):
        raise ValueError(f"the run in {last.parent} has ended its cosine schedule (its learning rate is zero): "
                         f"--resume would train at zero. To train further, start a new stage: --init "
                         f"{last.parent / f'{arch}.pt'} --out <new folder>")


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
    """Load --init's weights into `module` and return that checkpoint's training history. A checkpoint of
    another architecture is accepted where all its tensors fit this one (`load_shared_state`): the layers
    it lacks start from their initialisation, and the run says which."""
    ckpt = read_checkpoint(path)
    if ckpt["arch"] == arch:
        load_state(module.flow, ckpt, arch)
    else:
        fresh = load_shared_state(module.flow, ckpt)
        layers = sorted({".".join(k.split(".")[:2]) for k in fresh})  # "flows.0": the first layer
        print(f"--init: the {ckpt['arch']!r} weights fill {arch!r} but for {len(fresh)} tensors, which start "
              f"from their initialisation (in {', '.join(layers) or 'no layer'})")
    meta = ckpt.get("meta", {})
    if "history" in meta:
        return list(meta["history"])
    # A checkpoint from before histories were kept: one stage of what its metadata says.
    return [{"init": None, "settings": meta.get("settings"), "hardware": meta.get("hardware", meta.get("device")),
             "device": meta.get("device"), "torch": None, "epochs": meta.get("epochs", 0),
             "steps": None, "images_seen": 0, "wall_s": meta.get("wall_s", 0.0), "train_img_per_s": None}]


def requeue_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints that Lightning writes on SLURM's time-limit signal before it requeues the job
    (hpc_ckpt_<n>.ckpt). They hold the middle of an epoch, which Lightning would resume without the epoch's
    data order and noise: a requeued run resumes from last.ckpt instead (--resume), exactly, and repeats
    the part of the epoch after it. They are deleted when the next epoch ends."""
    return sorted(Path(folder).glob("hpc_ckpt_*.ckpt"))

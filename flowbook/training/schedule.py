"""The learning-rate schedule (`LRFactor`) and the planner that fits it into a time budget (`BudgetPlanner`)."""
from __future__ import annotations

import math
import time

import pytorch_lightning as pl

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


def _from_first_process(trainer, value):
    """`value` as the first process computed it. With several processes (DDP) each measures its own clock;
    the first one's plan is everyone's, so that their learning rates, and the epoch they stop after, agree
    (a process that stopped alone would leave the others waiting in their next all-reduce)."""
    if getattr(trainer, "world_size", 1) > 1:
        return trainer.strategy.broadcast(value, src=0)
    return value


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
        total = _from_first_process(trainer, total)
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
        more = _from_first_process(trainer, int(max(0.0, left) // self.epoch_s[-1]))
        if more == 0:
            trainer.should_stop = True
        else:
            self._plan(trainer, module, trainer.global_step + more * trainer.num_training_batches)

"""The settings of a training run: validated once, recorded in the summary, compared on --resume."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from flowbook.fast import COMPILE_MODES

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
GRADIENT_CLIP = 1.0


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

"""The command line: `python -m flowbook.train` (see flowbook.train for what it does)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from pytorch_lightning.utilities import rank_zero_only

from flowbook.cpu import keep_freed_memory
from flowbook.fast import COMPILE_MODES
from flowbook.models import ALL_MODELS
from flowbook.training.distributed import ACCELERATORS, STRATEGIES
from flowbook.training.module import TrainingDiverged
from flowbook.training.run import train
from flowbook.training.settings import PRECISIONS, SCHEDULES


DESCRIPTION = "Training with PyTorch Lightning, as the reference does, made resumable, safe and budget-aware."


def _optional(kind):
    """argparse type: `kind`, or None for 'auto'."""
    def parse(text):
        return None if text == "auto" else kind(text)
    return parse


def _switch(text: str) -> bool:
    """argparse type: 1/true/yes/on or 0/false/no/off (any case); anything else is an error, not False."""
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected 1/true/yes/on or 0/false/no/off (or auto), got {text!r}")


def main(argv=None):
    keep_freed_memory()  # see flowbook.cpu: a tenth or more faster on a Linux CPU
    parser = argparse.ArgumentParser(description=DESCRIPTION)
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
    parser.add_argument("--accelerator", default=None, choices=ACCELERATORS,
                        help="Lightning's name for --device: cpu, gpu (cuda) or auto")
    parser.add_argument("--devices", type=int, default=None,
                        help="processes per node, one per GPU (default: what torchrun or SLURM says, else 1)")
    parser.add_argument("--num-nodes", type=int, default=None, help="nodes (default: torchrun's or SLURM's, else 1)")
    parser.add_argument("--strategy", default="auto", choices=STRATEGIES,
                        help="Lightning's strategy; auto: ddp for more than one process")
    parser.add_argument("--precision", default=None, type=_optional(str),
                        help=f"one of {PRECISIONS} (default auto: bf16-mixed for runs of 1,000 steps and 10 minutes "
                             "or more on a CPU with bfloat16 instructions, else 32-true)")
    parser.add_argument("--channels-last", default=None, type=_optional(_switch), nargs="?", const="1",
                        help="NHWC memory layout (default auto: on for runs of 1,000 steps and 10 minutes or more "
                             "on a CPU with bfloat16 instructions)")
    parser.add_argument("--compile", default=None, type=_optional(str),
                        help=f"torch.compile mode for the training loss, one of {COMPILE_MODES} or off "
                             "(default auto: 'default' for long runs on a CPU)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    processes = ("devices", "num_nodes", "strategy")
    settings = {k: v for k, v in vars(args).items()
                if k not in ("model", "out", "resume", "device", "accelerator", *processes)}
    try:
        device = _device(args.device, args.accelerator)
        _, summary = train(args.model, args.out, resume=args.resume, device=device,
                           **{k: getattr(args, k) for k in processes}, **settings)
    except (ValueError, FileExistsError, FileNotFoundError, TrainingDiverged) as err:
        parser.exit(2, f"flowbook.train: error: {err}\n")
    if rank_zero_only.rank == 0:  # with several processes, the first speaks for all
        print(json.dumps(summary, indent=2))


def _device(device: str | None, accelerator: str | None) -> str | None:
    """The device type of --device and --accelerator (Lightning's names), with a clear error where they differ."""
    from_accelerator = {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda", "auto": None, None: None}[accelerator]
    if device and from_accelerator and torch.device(device).type != from_accelerator:
        raise ValueError(f"--device {device} and --accelerator {accelerator} differ: pass one of them")
    return device or from_accelerator


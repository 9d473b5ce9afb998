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

On several processes (DDP; docs/training.md, "On a cluster"):
    python -m flowbook.train --model multiscale --devices 2 --strategy ddp ...   # Lightning starts them
    torchrun --nproc-per-node 2 -m flowbook.train --model multiscale ...
    sbatch scripts/slurm/train.sbatch                                            # srun, under SLURM
--batch-size is the global batch, split evenly between the processes; only the first process writes.

The code lives in flowbook.training, one concept per module; this module is the command and keeps the
names that chapters, tests and exercise checkers import from it.
"""
from __future__ import annotations

from flowbook.training import *  # noqa: E402,F401,F403
from flowbook.training import (_HELD_LOCKS, _best_key, _check_same_run, _cpu_has_bf16,  # noqa: E402,F401
                               _init_weights, _loaders, _saved_settings, main)

if __name__ == "__main__":
    main()

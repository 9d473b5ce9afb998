"""Training with PyTorch Lightning, one concept per module; `python -m flowbook.train` runs `cli.main`.

    settings      RunSettings: what a run is, validated once, compared on --resume; training_recipe
    schedule      LRFactor (warm-up and cosine) and BudgetPlanner (the schedule fitted into --max-minutes)
    module        FlowModule, the LightningModule; TrainingDiverged and when a run has learned nothing
    data_order    the batches of each epoch and process (ShardedBatches, DeviceBatches) and their seeds
    run_folder    the run lock, checkpoints and summary of a run folder, the checks of --resume and --init
    distributed   how many processes, and which launcher (Lightning, torchrun, SLURM) started them
    progress      a compact progress bar for notebooks
    run           train(): one run, from settings to run folder
    cli           the command line
"""
import warnings

# Library chatter that says nothing about the run: Lightning's own deprecation of a torch API, and its note
# on the skipped (non-finite) steps, which the run counts and reports itself.
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
warnings.filterwarnings("ignore", message=r".*`training_step` returned `None`")
warnings.filterwarnings("ignore", message=r".*sync_dist=True.*")  # the validation score is already the same on all

from flowbook.training.data_order import VAL_BATCH, DeviceBatches, EpochSeeds, ShardedBatches, _loaders
from flowbook.training.distributed import ACCELERATORS, REQUEUE_SIGNAL, STRATEGIES, Processes
from flowbook.training.module import MAX_BAD_STEPS, FlowModule, TrainingDiverged, _best_key, fused_adam
from flowbook.training.progress import StepProgress
from flowbook.training.run import train
from flowbook.training.run_folder import (_HELD_LOCKS, RunCheckpoints, _check_same_run, _init_weights,
                                          _saved_settings, requeue_checkpoints, run_lock)
from flowbook.training.schedule import BudgetPlanner, LRFactor
from flowbook.training.settings import (COMPILE_PAYS_AFTER_STEPS, CPU_FAST, GRADIENT_CLIP, PRECISIONS,
                                        RESUMABLE_CHANGES, SCHEDULES, RunSettings, _cpu_has_bf16,
                                        training_recipe)
from flowbook.training.cli import main  # noqa: E402 (after train, which it calls)

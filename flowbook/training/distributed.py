"""Training on several processes with Lightning's DDP: how many processes, who started them, and who writes.

The same run starts in three ways, and Lightning recognises each (its cluster environments):
    python -m flowbook.train ... --devices 2                         Lightning starts the other processes
    torchrun --nproc-per-node 2 -m flowbook.train ...                torchrun starts them (TorchElastic)
    srun python -m flowbook.train ...   (in scripts/slurm/train.sbatch)  SLURM starts them (SLURMEnvironment)
Under torchrun and SLURM, the processes per node and the nodes default to what the launcher says. Each of the
processes trains on its rows of every global batch (`data_order.ShardedBatches`) and DDP averages the
gradients, so that a step on N processes is the step one process takes on the whole batch.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass

from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
STRATEGIES = ("auto", "ddp")
REQUEUE_SIGNAL = signal.SIGUSR1  # what `#SBATCH --signal=USR1@<seconds>` sends before the time limit


@dataclass(frozen=True)
class Processes:
    """How many processes train: `devices` per node on `num_nodes` nodes, with Lightning's `strategy`.
    None: what the launcher (torchrun, SLURM) says, else 1."""

    devices: int | None = None
    num_nodes: int | None = None
    strategy: str = "auto"

    def __post_init__(self):
        for name in ("devices", "num_nodes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")

    def resolved(self) -> "Processes":
        """These settings with devices and num_nodes filled in from the launcher's environment."""
        devices, nodes = self.devices, self.num_nodes
        if TorchElasticEnvironment.detect():
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
            devices = devices or local
            nodes = nodes or max(1, int(os.environ["WORLD_SIZE"]) // local)
        elif SLURMEnvironment.detect():
            devices = devices or int(os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
            nodes = nodes or int(os.environ.get("SLURM_NNODES", 1))
        devices, nodes = devices or 1, nodes or 1
        strategy = self.strategy
        if strategy == "auto" and devices * nodes > 1:
            strategy = "ddp"
        return Processes(devices, nodes, strategy)

    @property
    def world(self) -> int:
        return (self.devices or 1) * (self.num_nodes or 1)

    def trainer_options(self) -> dict:
        """The Trainer's arguments for these processes: DDP (gloo on CPUs, NCCL on GPUs) for several, and
        on SLURM its environment with automatic requeue on REQUEUE_SIGNAL."""
        options = {"devices": self.devices, "num_nodes": self.num_nodes, "strategy": self.strategy,
                   "use_distributed_sampler": False}  # ShardedBatches shards the data itself
        if SLURMEnvironment.detect():
            options["plugins"] = [SLURMEnvironment(auto_requeue=True, requeue_signal=REQUEUE_SIGNAL)]
        return options

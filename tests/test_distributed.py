"""Training and evaluation on several processes: two CPU processes on gloo, one thread each.

A two-process run takes the steps a one-process run takes with the same global batch (each process its
rows of the batch, their noise drawn as one process would draw it); killed and resumed, it ends where an
uninterrupted one does; SLURM's time-limit signal requeues the job and --resume continues it exactly.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from flowbook.training import ShardedBatches, train

RUN = ["--model", "simple", "--train-images", "32", "--val-images", "16", "--batch-size", "16", "--epochs", "2",
       "--accelerator", "cpu"]  # 2 steps per epoch, 4 in all
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
# Two processes average two half-batch gradients where one process takes the mean over the whole batch: the
# same sum in another order, which float32 rounds differently (about 1e-7), and Adam carries the difference on.
FLOAT_TOLERANCE = 1e-5


def _weights(folder):
    return torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)


def _cli(out, *extra):
    return [sys.executable, "-m", "flowbook.train", *RUN, "--out", str(out), *extra]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)
    train("simple", out, progress=False, device="cpu", epochs=2, batch_size=16, train_images=32, val_images=16,
          datasets=mnist[:2])
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, mnist):
    out = tmp_path_factory.mktemp("two")
    result = subprocess.run(_cli(out, "--devices", "2", "--strategy", "ddp"), cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_processes_train_to_the_weights_of_one_process_with_the_same_global_batch(one_process, two_processes):
    one, two = _weights(one_process), _weights(two_processes)
    assert one["global_step"] == two["global_step"] == 4
    for key, value in one["state_dict"].items():
        assert torch.allclose(value, two["state_dict"][key], rtol=0, atol=FLOAT_TOLERANCE), \
            f"{key} differs by {(value - two['state_dict'][key]).abs().max():.2e} between 1 and 2 processes"
    import json
    s1, s2 = (json.loads((f / "train_summary.json").read_text()) for f in (one_process, two_processes))
    assert s2["processes"] == 2 and s2["status"] == "finished" and s2["history"][-1]["images_seen"] == 64
    assert s1["best_val_bpd_1sample"] == pytest.approx(s2["best_val_bpd_1sample"], abs=1e-5)


def test_only_the_first_of_two_processes_writes_into_the_run_folder(two_processes):
    names = {p.name for p in two_processes.iterdir()}
    assert names == {"simple.pt", "last.ckpt", "train_summary.json", "logs", ".lock"}, names
    assert len(list((two_processes / "logs").rglob("metrics.csv"))) == 1


def test_a_killed_two_process_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, two_processes):
    proc = subprocess.Popen(_cli(tmp_path, "--devices", "2"), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    last, deadline = tmp_path / "last.ckpt", time.time() + 240
    try:
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # both processes, as a lost node or kill -9 would
        proc.wait()
    assert _weights(tmp_path)["global_step"] == 2, "the run was not killed after its first epoch"
    result = subprocess.run(_cli(tmp_path, "--devices", "2", "--resume"), cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, whole = _weights(tmp_path), _weights(two_processes)
    assert resumed["global_step"] == whole["global_step"] == 4
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), f"{key} differs after resuming"


def test_slurm_time_limit_signal_requeues_and_resume_continues_exactly(tmp_path, one_process):
    """SLURM without SLURM: its environment variables, a fake scontrol that records the requeue, and the
    signal that `#SBATCH --signal=USR1@90` sends before the time limit."""
    bin_dir, record = tmp_path / "bin", tmp_path / "requeued"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {record}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = dict(ENV, PATH=f"{bin_dir}{os.pathsep}{ENV['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NAME="flowbook",
                 SLURM_NTASKS="1", SLURM_NTASKS_PER_NODE="1", SLURM_NNODES="1", SLURM_NODELIST="localhost",
                 SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0")
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli(out), cwd=ROOT, env=slurm, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:
        while not (out / "last.ckpt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)  # in the second epoch: the job is about to reach its time limit
        while not record.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        proc.kill()  # the time limit
        proc.wait()
    assert record.read_text().split() == ["requeue", "4242"], "Lightning did not requeue the job"
    assert list(out.glob("hpc_ckpt_*.ckpt")), "no checkpoint was written on the signal"
    assert _weights(out)["global_step"] == 2
    result = subprocess.run(_cli(out, "--resume"), cwd=ROOT, env=slurm, capture_output=True, text=True,
                            timeout=300)  # the requeued job, as scripts/slurm/train.sbatch starts it
    assert result.returncode == 0, result.stderr[-3000:]
    resumed, whole = _weights(out), _weights(one_process)
    assert resumed["global_step"] == whole["global_step"] == 4 and not list(out.glob("hpc_ckpt_*.ckpt"))
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), f"{key} differs after the requeue"


def test_sharded_batches_split_each_global_batch_into_the_rows_of_each_process():
    one = list(ShardedBatches(10, 4, shuffle=True, drop_last=True, seed=3))
    parts = [list(ShardedBatches(10, 4, shuffle=True, drop_last=True, seed=3, rank=r, world=2)) for r in (0, 1)]
    assert [a + b for a, b in zip(*parts)] == one and all(len(b) == 2 for p in parts for b in p)
    val = [list(ShardedBatches(5, 4, shuffle=False, drop_last=False, rank=r, world=3)) for r in range(3)]
    assert sorted(i for p in val for b in p for i in b) == list(range(5))
    with pytest.raises(ValueError, match="rank"):
        ShardedBatches(10, 4, True, True, rank=2, world=2)


def test_seeded_bpd_depends_neither_on_the_batches_nor_on_the_shards(mnist):
    from flowbook.evaluate import bpd_per_image
    from flowbook.models import create_flow

    model = create_flow("vardeq").eval()  # learned noise: the per-image seeds go through its flows too
    images = mnist[2].images[:12]
    whole = bpd_per_image(model, images, importance_samples=2, batch_size=12, seed=5)
    batched = bpd_per_image(model, images, importance_samples=2, batch_size=5, seed=5)
    shards = torch.cat([bpd_per_image(model, images[:7], 2, batch_size=4, seed=5),
                        bpd_per_image(model, images[7:], 2, batch_size=3, seed=5, first_index=7)])
    # The same noise for every image; only the float rounding of batched convolutions may differ.
    assert torch.allclose(whole, batched, rtol=0, atol=1e-5) and torch.allclose(whole, shards, rtol=0, atol=1e-5)
    assert not torch.allclose(whole, bpd_per_image(model, images, 2, batch_size=12, seed=6), rtol=0, atol=1e-5), \
        "another seed drew the same noise"


def test_evaluation_on_two_processes_equals_one_process_exactly(tmp_path, one_process):
    import json

    from flowbook.evaluate import evaluate_checkpoint

    # 40 images in batches of 16: the first process evaluates one batch, the second two
    args = ["--checkpoint", str(one_process / "simple.pt"), "--importance-samples", "2", "--eval-images", "40",
            "--batch-size", "16", "--bpd-only"]
    result = subprocess.run([sys.executable, "-m", "flowbook.evaluate", *args, "--device", "cpu", "--devices", "2",
                             "--out", str(tmp_path / "two.json")], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    one = evaluate_checkpoint(one_process / "simple.pt", device="cpu", importance_samples=2, eval_images=40,
                              progress=False, out=tmp_path / "one.json", bpd_only=True,
                              batch_size=8)  # other batches than either process's: the same numbers
    assert two["processes"] == 2 and two["eval_images"] == one["eval_images"] == {"val": 40, "test": 40}
    for key in ("test_bpd", "test_bpd_stderr", "val_bpd"):
        assert two[key] == one[key], f"{key}: {two[key]} on 2 processes, {one[key]} on one"


def test_the_sbatch_script_asks_for_the_signal_that_lightning_requeues_on():
    from flowbook.training import REQUEUE_SIGNAL

    script = ROOT / "scripts" / "slurm" / "train.sbatch"
    text = script.read_text()
    assert f"#SBATCH --signal={REQUEUE_SIGNAL.name.removeprefix('SIG')}@" in text
    assert "srun python -m flowbook.train" in text
    assert "--resume" in text and "#SBATCH --requeue" in text
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, "the script has a syntax error"

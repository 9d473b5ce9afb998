"""Training: a run saves what it promises, resumes after kill -9, and skips non-finite steps."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from flowbook.checkpoints import load_model
from flowbook.data import ImageDataset
from flowbook.models import ImageFlow
from flowbook.train import DeviceBatches, fused_adam, train


def _fake_mnist(n):
    gen = torch.Generator().manual_seed(n)
    imgs = (torch.rand(n, 1, 28, 28, generator=gen) ** 4 * 255).to(torch.int32)
    return ImageDataset(imgs, torch.zeros(n, dtype=torch.int64))


def _tiny_run(out, **kwargs):
    args = dict(epochs=1, batch_size=16, train_images=32, val_images=16, progress=False,
                datasets=(_fake_mnist(32), _fake_mnist(16)))
    args.update(kwargs)
    return train("simple", out, **args)


def test_train_writes_best_weights_last_state_and_summary(tmp_path):
    model, summary = _tiny_run(tmp_path, epochs=2)
    assert {"simple.pt", "last.ckpt", "train_summary.json"} <= set(os.listdir(tmp_path))
    assert summary["epochs"] == 2 and summary["skipped_steps"] == 0 and summary["parameters"] == 335_128
    assert summary["best_val_bpd_1sample"] < 8 and summary["train_img_per_s"] > 0
    assert json.loads((tmp_path / "train_summary.json").read_text())["epochs"] == 2
    loaded = load_model(tmp_path / "simple.pt", arch="simple")
    assert isinstance(model, ImageFlow) and not model.training
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a.cpu(), b), k


def test_a_finished_run_is_not_overwritten_and_resumes(tmp_path):
    _tiny_run(tmp_path, epochs=1)
    with pytest.raises(FileExistsError, match="--resume"):
        _tiny_run(tmp_path, epochs=2)
    _, summary = _tiny_run(tmp_path, epochs=2, resume=True)
    assert summary["epochs"] == 2
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 4  # 2 epochs x 2 steps, none repeated


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_forward = ImageFlow.forward

    def sometimes_nan(self, imgs):
        loss = real_forward(self, imgs)
        if self.training:
            calls["n"] += 1
            if calls["n"] % 2 == 0:
                return loss * float("nan")
        return loss

    monkeypatch.setattr(ImageFlow, "forward", sometimes_nan)
    _, summary = _tiny_run(tmp_path, epochs=2)
    assert calls["n"] == 4 and summary["skipped_steps"] == 2
    model = load_model(tmp_path / "simple.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters()), "a NaN step leaked into the weights"


def test_fast_path_trains_and_saves_plain_weights(tmp_path):
    """channels-last + torch.compile (on the CPU here): the run trains, records its settings, and its
    best weights load into a plain eager model."""
    model, summary = _tiny_run(tmp_path, epochs=1, channels_last=True, compile="default")
    assert summary["settings"]["compile"] == "default" and summary["settings"]["channels_last"]
    assert summary["skipped_steps"] == 0 and summary["best_val_bpd_1sample"] < 8
    loaded = load_model(tmp_path / "simple.pt", arch="simple")
    assert all(torch.equal(a.cpu(), b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_bf16_mixed_precision_trains_with_gradient_clipping(tmp_path):
    _, summary = _tiny_run(tmp_path, precision="bf16-mixed")
    assert summary["settings"]["precision"] == "bf16-mixed" and summary["best_val_bpd_1sample"] < 8


def test_fused_adam_only_where_lightning_can_clip_its_gradients():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused_adam(cuda, "32-true") and not fused_adam(cuda, "bf16-mixed") and not fused_adam(cpu, "32-true")


def test_bad_training_images_are_refused_before_training(tmp_path):
    bad = _fake_mnist(32)
    bad.images[3, 0, 0, 0] = 256
    with pytest.raises(ValueError, match="values in 0..256"):
        _tiny_run(tmp_path, datasets=(bad, _fake_mnist(16)))


def test_training_from_device_batches_as_on_a_gpu(tmp_path, monkeypatch):
    """The GPU's loaders (DeviceBatches, no DataLoader) through Lightning, here on the CPU."""
    import flowbook.train as train_module

    def device_loaders(train_set, val_set, batch_size, device, seed):
        return (DeviceBatches(train_set.images, batch_size, True, True, seed),
                DeviceBatches(val_set.images, 1000, False, False))

    monkeypatch.setattr(train_module, "_loaders", device_loaders)
    _, summary = _tiny_run(tmp_path, epochs=2)
    assert summary["epochs"] == 2 and summary["best_val_bpd_1sample"] < 8
    state = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 4  # 2 epochs x 32 images / 16 per batch


def test_time_budget_stops_at_an_epoch_end_and_a_resumed_run_gets_its_own(tmp_path):
    data = dict(train_images=64, datasets=(_fake_mnist(64), _fake_mnist(16)))  # 4 steps per epoch
    start = time.monotonic()
    _tiny_run(tmp_path, epochs=10_000, max_minutes=0.05, **data)
    assert time.monotonic() - start < 60
    first = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert first["global_step"] == 4 * (first["epoch"] + 1) and first["epoch"] < 10_000 - 1
    _tiny_run(tmp_path, epochs=10_000, max_minutes=0.05, resume=True, **data)
    second = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=False)
    assert second["epoch"] > first["epoch"] and second["global_step"] == 4 * (second["epoch"] + 1)


def test_device_batches_cover_the_data_once_per_pass():
    imgs = torch.arange(10).view(10, 1, 1, 1)
    batches = list(DeviceBatches(imgs, 4, shuffle=True, drop_last=False))
    assert len(batches) == 3 and sorted(torch.cat([b[0] for b in batches]).flatten().tolist()) == list(range(10))
    assert len(DeviceBatches(imgs, 4, shuffle=True, drop_last=True)) == 2


def _cli(out, epochs):
    return [sys.executable, "-m", "flowbook.train", "--model", "multiscale", "--epochs", str(epochs),
            "--train-images", "96", "--val-images", "32", "--batch-size", "32", "--out", str(out),
            "--device", "cpu"]


def test_run_killed_with_sigkill_resumes_from_last_saved_epoch(tmp_path, mnist):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(_cli(tmp_path, 100), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    last = tmp_path / "last.ckpt"
    deadline = time.time() + 240
    try:
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert last.exists(), "no last.ckpt was written within 4 minutes"
        time.sleep(1.0)  # now somewhere inside a later epoch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = torch.load(last, map_location="cpu", weights_only=False)
    saved_epochs, saved_steps = saved["epoch"] + 1, saved["global_step"]
    assert saved_steps == 3 * saved_epochs
    result = subprocess.run(_cli(tmp_path, saved_epochs + 1) + ["--resume"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed = torch.load(last, map_location="cpu", weights_only=False)
    assert resumed["epoch"] + 1 == saved_epochs + 1 and resumed["global_step"] == saved_steps + 3
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["epochs"] == saved_epochs + 1

"""Training: a run saves what it promises, resumes after kill -9, and skips non-finite steps."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import ROOT
from flowbook.checkpoints import CheckpointError, load_model
from flowbook.data import ImageDataset
from flowbook.models import ImageFlow
from flowbook.results import CURVES_FILE, curve_rows, val_curve_from_log, validation_curves
from flowbook.train import (CPU_FAST, BudgetPlanner, DeviceBatches, FlowModule, LRFactor, RunSettings,
                            TrainingDiverged, _cpu_has_bf16, fused_adam, train)


def _fake_mnist(n):
    gen = torch.Generator().manual_seed(n)
    imgs = (torch.rand(n, 1, 28, 28, generator=gen) ** 4 * 255).to(torch.int32)
    return ImageDataset(imgs, torch.zeros(n, dtype=torch.int64))


TINY = dict(epochs=1, batch_size=16, train_images=32, val_images=16, progress=False,
            datasets=(_fake_mnist(32), _fake_mnist(16)))


def _tiny_run(out, **kwargs):
    return train("simple", out, **{**TINY, **kwargs})


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
    _tiny_run(tmp_path, epochs=1, schedule="exponential")  # a schedule without an end
    with pytest.raises(FileExistsError, match="--resume"):
        _tiny_run(tmp_path, epochs=2)
    _, summary = _tiny_run(tmp_path, epochs=2, resume=True, schedule="exponential")
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
    import flowbook.training.run as run_module

    def device_loaders(train_set, val_set, batch_size, device, seed, rank=0, world=1):
        return (DeviceBatches(train_set.images, batch_size, True, True, seed),
                DeviceBatches(val_set.images, 1000, False, False))

    monkeypatch.setattr(run_module, "_loaders", device_loaders)
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
    assert [seen for seen, _ in summary["history"][-1]["val_curve"]] == [96 * e for e in range(1, saved_epochs + 2)], \
        "the resumed run lost the validation curve of the epochs before the kill"


# --- settings, schedule, stages -------------------------------------------------------------------

@pytest.mark.parametrize("bad", [dict(epochs=-1), dict(epochs=0), dict(max_minutes=0), dict(train_images=-8),
                                 dict(batch_size=0), dict(lr=float("nan")), dict(max_steps=0),
                                 dict(warmup_steps=-1), dict(compile="fastest"), dict(schedule="linear")])
def test_bad_settings_are_refused_before_any_data_is_loaded(tmp_path, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        train("simple", tmp_path, progress=False, datasets="not loaded", **bad)
    assert not (tmp_path / "last.ckpt").exists()


def test_cli_reports_bad_settings_in_one_line_and_exits_non_zero(tmp_path):
    result = subprocess.run([sys.executable, "-m", "flowbook.train", "--model", "simple", "--epochs", "-1",
                             "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "epochs must be an integer >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_cosine_factor_warms_up_reaches_zero_and_never_jumps_when_replanned():
    f = LRFactor("cosine", total_steps=100, warmup_steps=10)
    values = [f(step) for step in range(101)]
    assert values[0] == pytest.approx(0.1) and max(values) <= 1 and values[-1] == pytest.approx(0, abs=1e-12)
    assert all(b <= a + 1e-12 for a, b in zip(values[10:], values[11:])), "decays monotonically after warm-up"
    g = LRFactor("cosine", total_steps=100)
    replanned = []
    for step in range(301):
        if step == 50:
            g.total_steps = 300  # a time budget found room for more steps
        replanned.append(g(step))
    jumps = [abs(b - a) for a, b in zip(replanned, replanned[1:])]
    assert max(jumps) < 0.02 and replanned[-1] == pytest.approx(0, abs=1e-12)
    e = LRFactor("exponential", total_steps=1, gamma=0.5, steps_per_epoch=4)
    assert [e(s) for s in (0, 3, 4, 8)] == [1, 1, 0.5, 0.25]


def test_budget_planner_plans_the_epochs_that_fit_and_stops_when_the_next_does_not():
    class Stub:
        global_step, num_training_batches, should_stop = 40, 10, False

    module = types.SimpleNamespace(lr_factor=LRFactor("cosine", 1))
    epoch_s = [60.0]
    planner = BudgetPlanner(planned_steps=10_000, minutes=3.5, epoch_s=epoch_s)
    trainer = Stub()
    planner.on_train_start(trainer, module)
    assert module.lr_factor.total_steps == 10_000
    planner._start -= 60  # one minute of the 3.5 spent: two more 60-second epochs fit
    planner.on_train_epoch_end(trainer, module)
    assert module.lr_factor.total_steps == 40 + 2 * 10 and not trainer.should_stop
    planner._start -= 120  # 3 of 3.5 minutes spent: no further epoch fits
    planner.on_train_epoch_end(trainer, module)
    assert trainer.should_stop


def test_budget_planner_shortens_the_schedule_when_the_run_slows_down_within_an_epoch():
    class Stub:
        global_step, num_training_batches, should_stop = 0, 100, False

    clock = [0.0]
    module = types.SimpleNamespace(lr_factor=LRFactor("cosine", 1))
    planner = BudgetPlanner(planned_steps=10_000, minutes=4, epoch_s=[], clock=lambda: clock[0])
    trainer = Stub()
    planner.on_train_start(trainer, module)
    planner.on_train_epoch_start(trainer, module)
    for step in range(100):
        clock[0] += 1.0 if step < 25 else 3.0  # 1 s a step: two epochs fit in 4 minutes; then 3 s a step
        module.lr_factor(step)
        trainer.global_step = step + 1
        planner.on_train_batch_end(trainer, module, None, None, step)
        if step == 30:
            assert module.lr_factor.total_steps == 200, "at first, two epochs fit the budget"
    assert module.lr_factor.total_steps == 100, "the slower steps leave room for one epoch only"
    module.lr_factor(100)
    clock[0] += 30  # validation
    planner.on_train_epoch_end(trainer, module)
    assert module.lr_factor.progress == pytest.approx(1.0) and trainer.should_stop, \
        "the run stopped with its learning rate half-way down the cosine"


def test_budget_planner_stops_when_the_schedule_has_ended_even_with_time_left():
    class Stub:
        global_step, num_training_batches, should_stop = 60, 10, False

    module = types.SimpleNamespace(lr_factor=LRFactor("cosine", 60))
    for step in range(61):
        module.lr_factor(step)  # the learning rate has reached zero at step 60
    planner = BudgetPlanner(planned_steps=10_000, minutes=600, epoch_s=[60.0])
    trainer = Stub()
    planner.on_train_start(trainer, module)
    planner.on_train_epoch_end(trainer, module)
    assert trainer.should_stop, "an epoch at a zero learning rate was planned"


def test_init_starts_a_new_stage_from_weights_and_keeps_the_history(tmp_path):
    _tiny_run(tmp_path / "a", epochs=2, progress=True)  # with Lightning's logs
    _, summary = _tiny_run(tmp_path / "b", epochs=1, init=str(tmp_path / "a" / "simple.pt"), lr=5e-4)
    history = summary["history"]
    assert len(history) == 2 and history[1]["init"].endswith("simple.pt") and history[1]["settings"]["lr"] == 5e-4
    assert [s["epochs"] for s in history] == [2, 1] and summary["total"]["epochs"] == 3
    assert summary["total"]["images_seen"] == 3 * 32 and history[0]["hardware"] and history[1]["torch"]
    meta = torch.load(tmp_path / "b" / "simple.pt", weights_only=True)["meta"]
    assert len(meta["history"]) == 2  # the shipped weights carry the history to the next stage
    assert [seen for seen, _ in history[0]["val_curve"]] == [32, 64] and len(history[1]["val_curve"]) == 1
    assert history[1]["val_curve"][0][1] == pytest.approx(summary["best_val_bpd_1sample"], abs=1e-5)
    rows = curve_rows(tmp_path / "b" / "simple.pt", ["a"])
    assert [r.split(",")[:5] for r in rows] == [["simple", "a", "1", "1", "32"], ["simple", "a", "1", "2", "64"],
                                               ["simple", "simple/stage2", "2", "1", "96"]], \
        "the second stage's epochs count from the images of the first"
    csv = tmp_path / "curves.csv"
    csv.write_text(CURVES_FILE.read_text().splitlines()[0] + "\n" + "\n".join(rows) + "\n")
    assert [p[0] for p in validation_curves(csv)["simple"]] == [32, 64, 96]
    log = next((tmp_path / "a").rglob("metrics.csv"))
    assert val_curve_from_log(log, batch_size=16) == history[0]["val_curve"], \
        "the curve rebuilt from the Lightning log differs from the recorded one"
    state = torch.load(tmp_path / "b" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 2, "a fresh optimizer and schedule: the step count starts at 0"


def _spy_on_starting_weights(monkeypatch) -> dict:
    """A dict that gets "weights": the model's state when training is about to start (after --init)."""
    seen = {}
    real = FlowModule.configure_optimizers

    def spy(self):
        seen["weights"] = {k: v.clone() for k, v in self.flow.state_dict().items()}
        return real(self)

    monkeypatch.setattr(FlowModule, "configure_optimizers", spy)
    return seen


def test_init_weights_are_the_checkpoint_weights(tmp_path, monkeypatch):
    _tiny_run(tmp_path / "a", epochs=1)
    seen = _spy_on_starting_weights(monkeypatch)
    _tiny_run(tmp_path / "b", epochs=1, init=str(tmp_path / "a" / "simple.pt"))
    start = load_model(tmp_path / "a" / "simple.pt").state_dict()
    assert all(torch.equal(seen["weights"][k].cpu(), v) for k, v in start.items())


def test_init_from_another_architecture_loads_the_shared_layers_and_starts_the_rest_fresh(tmp_path, monkeypatch,
                                                                                          capsys):
    _tiny_run(tmp_path / "a", epochs=1)  # "simple": uniform dequantization and 8 couplings
    seen = _spy_on_starting_weights(monkeypatch)
    _, summary = train("vardeq", tmp_path / "b", init=str(tmp_path / "a" / "simple.pt"), **TINY)
    start = load_model(tmp_path / "a" / "simple.pt").state_dict()
    assert start and all(torch.equal(seen["weights"][k].cpu(), v) for k, v in start.items()), \
        "the couplings were not loaded"
    dequant = [k for k in seen["weights"] if k.startswith("flows.0.")]
    assert dequant and all(k not in start for k in dequant)
    assert "start from their initialisation (in flows.0)" in capsys.readouterr().out
    assert [s["arch"] for s in summary["history"][1:]] == ["vardeq"]
    with pytest.raises(CheckpointError, match="does not fit inside this model"):
        train("simple", tmp_path / "c", init=str(tmp_path / "b" / "vardeq.pt"), **TINY)


def test_resume_refuses_other_settings_another_model_and_a_missing_run(tmp_path):
    _tiny_run(tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"lr 0.001 -> 0.002.*--init"):
        _tiny_run(tmp_path, epochs=2, lr=2e-3, resume=True)
    with pytest.raises(ValueError, match="'simple' flow, not 'vardeq'"):
        train("vardeq", tmp_path, resume=True, progress=False, epochs=2, batch_size=16, train_images=32,
              val_images=16, datasets=(_fake_mnist(32), _fake_mnist(16)))
    with pytest.raises(FileNotFoundError, match="no run to continue"):
        _tiny_run(tmp_path / "empty", epochs=1, resume=True)


def test_a_run_never_replaces_weights_it_did_not_write(tmp_path):
    _tiny_run(tmp_path / "a", epochs=1)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "simple.pt").write_bytes((tmp_path / "a" / "simple.pt").read_bytes())
    before = (shipped / "simple.pt").read_bytes()
    with pytest.raises(FileExistsError, match="did not write it"):
        _tiny_run(shipped, epochs=1)
    assert (shipped / "simple.pt").read_bytes() == before


def test_a_diverged_run_stops_with_a_clear_error(tmp_path, monkeypatch):
    import flowbook.training.module as module_module

    monkeypatch.setattr(module_module, "MAX_BAD_STEPS", 3)
    monkeypatch.setattr(ImageFlow, "forward", lambda self, imgs: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingDiverged, match="3 training steps in a row"):
        _tiny_run(tmp_path, epochs=5, train_images=64, datasets=(_fake_mnist(64), _fake_mnist(16)))


def test_fast_path_defaults_only_for_long_cpu_runs():
    short = RunSettings(epochs=1, max_steps=30).resolved(torch.device("cpu"), steps_per_epoch=30)
    assert (short.precision, short.channels_last, short.compile) == ("32-true", False, "off")
    long = RunSettings(max_minutes=60).resolved(torch.device("cpu"), steps_per_epoch=390)
    expected = CPU_FAST if _cpu_has_bf16() else {"precision": "32-true", "channels_last": False, "compile": "off"}
    assert (long.precision, long.channels_last, long.compile) == tuple(expected.values())
    chosen = RunSettings(max_minutes=60, compile="off").resolved(torch.device("cpu"), steps_per_epoch=390)
    assert chosen.compile == "off"
    gpu = RunSettings().resolved(torch.device("cuda"), steps_per_epoch=390)
    assert (gpu.precision, gpu.channels_last, gpu.compile) == ("32-true", False, "off")


def test_a_run_interrupted_and_resumed_ends_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    import flowbook.train as train_module

    data = dict(epochs=3, train_images=48, datasets=(_fake_mnist(48), _fake_mnist(16)))  # 3 steps per epoch
    _tiny_run(tmp_path / "whole", **data)

    class Killed(Exception):
        pass

    real_end = train_module.RunCheckpoints.on_train_epoch_end

    def killed_after_first_epoch(self, trainer, module):
        real_end(self, trainer, module)
        if trainer.current_epoch == 0:
            raise Killed()

    monkeypatch.setattr(train_module.RunCheckpoints, "on_train_epoch_end", killed_after_first_epoch)
    with pytest.raises(Killed):
        _tiny_run(tmp_path / "cut", **data)
    monkeypatch.setattr(train_module.RunCheckpoints, "on_train_epoch_end", real_end)
    torch.manual_seed(1234)  # whatever the global random state is now, the resumed run must not depend on it
    _tiny_run(tmp_path / "cut", resume=True, **data)
    whole = torch.load(tmp_path / "whole" / "last.ckpt", map_location="cpu", weights_only=False)
    cut = torch.load(tmp_path / "cut" / "last.ckpt", map_location="cpu", weights_only=False)
    assert whole["global_step"] == cut["global_step"] == 9
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, cut["state_dict"][key]), f"{key} differs after resuming"


def test_a_second_trainer_on_the_same_folder_gets_a_clear_error(tmp_path):
    import fcntl

    tmp_path.mkdir(exist_ok=True)
    with open(tmp_path / ".lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running trainer holds it
        with pytest.raises(FileExistsError, match="another trainer is running"):
            _tiny_run(tmp_path, epochs=1)
        assert not (tmp_path / "last.ckpt").exists()
    _tiny_run(tmp_path, epochs=1)  # once it is released, training goes ahead
    assert (tmp_path / "last.ckpt").exists() and not list(tmp_path.glob("*.tmp"))


def test_a_diverged_run_records_it_in_its_summary_and_the_cli_exits_non_zero(tmp_path):
    result = subprocess.run(_cli(tmp_path, 3) + ["--lr", "1e30"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, FLOWBOOK_MAX_BAD_STEPS="2"))
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    if summary["skipped_steps"] == 0:
        pytest.skip("a learning rate of 1e30 did not make this run diverge")
    assert result.returncode != 0 and summary["status"] == "diverged" and "in a row" in result.stderr


def test_a_run_that_never_reaches_a_finite_validation_score_is_diverged_not_finished(tmp_path, monkeypatch):
    """A short run under the 50-in-a-row rule that learns nothing (as a careless --lr 1e3 does): it ends
    with status "diverged", a clear error, and no weights."""
    real_forward = ImageFlow.forward

    def blows_up(self, imgs):
        loss = real_forward(self, imgs)
        return loss * float("nan") if not self.training else loss  # validation never finite

    monkeypatch.setattr(ImageFlow, "forward", blows_up)
    with pytest.raises(TrainingDiverged, match="without a finite validation bpd"):
        _tiny_run(tmp_path, epochs=2)
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["status"] == "diverged" and "without a finite validation" in summary["error"]
    assert not (tmp_path / "simple.pt").exists()


def test_a_run_that_skipped_most_of_its_steps_is_diverged_not_finished(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_forward = ImageFlow.forward

    def mostly_nan(self, imgs):
        loss = real_forward(self, imgs)
        if self.training:
            calls["n"] += 1
            if calls["n"] % 4 != 0:  # 3 of every 4 training steps non-finite, never 50 in a row
                return loss * float("nan")
        return loss

    monkeypatch.setattr(ImageFlow, "forward", mostly_nan)
    with pytest.raises(TrainingDiverged, match="skipped 3 of its 4 training batches"):
        _tiny_run(tmp_path, epochs=2)
    assert json.loads((tmp_path / "train_summary.json").read_text())["status"] == "diverged"



def test_a_run_whose_cosine_schedule_ended_is_not_resumed_at_a_zero_learning_rate(tmp_path):
    _tiny_run(tmp_path, epochs=1)  # cosine: its learning rate reaches zero at the end
    before = (tmp_path / "last.ckpt").read_bytes()
    with pytest.raises(ValueError, match="ended its cosine schedule.*--init"):
        _tiny_run(tmp_path, epochs=2, resume=True)
    assert (tmp_path / "last.ckpt").read_bytes() == before


def test_budget_planner_follows_the_first_process_under_ddp():
    """Each process measures its own clock; all follow the first one's plan. Here this process's clock says
    no further epoch fits, the first process's says two do: this one plans two and does not stop."""
    class Strategy:
        def broadcast(self, value, src=0):
            assert src == 0
            return 2 if value == 0 else value  # the first process has room for two more epochs, this one none

    class Stub:
        global_step, num_training_batches, should_stop, world_size, strategy = 40, 10, False, 2, Strategy()

    module = types.SimpleNamespace(lr_factor=LRFactor("cosine", 10_000))
    planner = BudgetPlanner(planned_steps=10_000, minutes=3.5, epoch_s=[60.0])
    trainer = Stub()
    planner.on_train_start(trainer, module)
    planner._start -= 200  # this process: 3.3 of 3.5 minutes spent
    planner.on_train_epoch_end(trainer, module)
    assert not trainer.should_stop and module.lr_factor.total_steps == 40 + 2 * 10


def test_max_steps_shorter_than_an_epoch_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match="max_steps 1 ends the run before its first epoch of 2 steps"):
        _tiny_run(tmp_path, epochs=1, max_steps=1)
    assert not (tmp_path / "last.ckpt").exists()

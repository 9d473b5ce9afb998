"""Evaluation, benchmark, plots, the toy flow and the chapters' model loader."""
import dataclasses
import json
import subprocess
import sys
import time

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from conftest import perturb_  # noqa: E402
from flowbook import config, viz  # noqa: E402
from flowbook.bench import bench, compare  # noqa: E402
from flowbook.checkpoints import save_checkpoint  # noqa: E402
from flowbook.evaluate import bpd_per_image, evaluate_checkpoint  # noqa: E402
from flowbook.models import create_flow, interpolate_latents  # noqa: E402
from flowbook.pretrained import load_trained  # noqa: E402
from flowbook.toy import ToyFlow, sample_toy, train_toy_flow  # noqa: E402


def test_evaluate_checkpoint_writes_a_complete_results_json(tmp_path, mnist, monkeypatch):
    import flowbook.evaluate as evaluate

    monkeypatch.setattr(evaluate, "SLICE_IMAGES", 8)
    model = perturb_(create_flow("simple"), scale=0.01)
    save_checkpoint(model, "simple", tmp_path / "simple.pt", epochs=1, settings={"lr": 1e-3})
    results = evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", importance_samples=2, eval_images=16,
                                  progress=False)
    on_disk = json.loads((tmp_path / "simple.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    for key in ("val_bpd", "test_bpd", "slice_bpd", "slice_bpd_per_image", "inference_ms", "sampling_ms",
                "parameters", "training", "device", "git_commit", "versions"):
        assert key in results, key
    assert results["parameters"] == 335_128 and results["training"]["epochs"] == 1
    assert 0 < results["test_bpd"] < 100 and results["eval_images"] == {"val": 16, "test": 16}
    assert results["slice"] == {"images": 8, "seed": 0, "importance_samples": 8, "noise": "per image"}
    # The first images of the slice are a slice of their own: each image's noise has its own seed.
    first = evaluate.slice_bpd_per_image(model, mnist[2].images, images=3)
    assert first.tolist() == pytest.approx(results["slice_bpd_per_image"][:3], abs=1e-4)
    # --refresh-slice rewrites the slice fields, and only them, for the same weights alone.
    on_disk.update(slice_bpd=0.0, slice_bpd_per_image=[0.0] * 8)
    (tmp_path / "simple.json").write_text(json.dumps(on_disk))
    refreshed = evaluate.refresh_slice(tmp_path / "simple.pt", device="cpu")
    assert refreshed["slice_bpd"] == pytest.approx(results["slice_bpd"], abs=1e-4)
    assert {k: v for k, v in refreshed.items() if not k.startswith("slice")} == \
        {k: v for k, v in on_disk.items() if not k.startswith("slice")}
    save_checkpoint(perturb_(create_flow("simple"), scale=0.01), "simple", tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other weights"):
        evaluate.refresh_slice(tmp_path / "other.pt", out=tmp_path / "simple.json")


def test_val_images_evaluates_fewer_validation_images_and_the_table_says_how_many(tmp_path, mnist):
    from flowbook.results import results_table

    model = perturb_(create_flow("simple"), scale=0.01)
    save_checkpoint(model, "simple", tmp_path / "simple.pt", epochs=1, settings={"lr": 1e-3})
    with pytest.raises(ValueError, match="val_images"):
        evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", eval_images=8, val_images=0, progress=False)
    results = evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", importance_samples=1, eval_images=8,
                                  val_images=4, bpd_only=True, progress=False)
    assert results["eval_images"] == {"val": 4, "test": 8}
    first_four = bpd_per_image(model, mnist[1].images[:4], 1, seed=results["eval_seed"] + 1)
    assert results["val_bpd"] == pytest.approx(first_four.mean().item(), abs=1e-5)
    results.update({k: 1 for k in ("train_wall_s", "images_seen", "epochs") if results.get(k) is None})
    (tmp_path / "simple.json").write_text(json.dumps(results))
    assert f"| {results['val_bpd']:.3f} (4 images) |" in results_table(tmp_path)
    assert f"| {results['test_bpd']:.3f} (1 sample) | 8 |" in results_table(tmp_path), "not the usual 8 samples"


def test_a_stopped_evaluation_continues_from_its_saved_batches(tmp_path, mnist):
    from flowbook.evaluate import bpd_per_image

    model = perturb_(create_flow("simple"), scale=0.01)
    images, key = mnist[2].images[:12], {"checkpoint_sha256": "abc"}
    whole = bpd_per_image(model, images, 2, batch_size=4, seed=0)
    calls, stop_at = [], [3]
    original = model.bits_per_dim

    def stopping(batch, k):  # the first evaluation is killed during its third batch
        calls.append(len(batch))
        if len(calls) in stop_at:
            raise RuntimeError("killed")
        return original(batch, k)
    model.bits_per_dim = stopping
    with pytest.raises(RuntimeError, match="killed"):
        bpd_per_image(model, images, 2, batch_size=4, seed=0, partial=tmp_path / "p.pt", partial_key=key)
    calls.clear()
    stop_at.clear()
    again = bpd_per_image(model, images, 2, batch_size=4, seed=0, partial=tmp_path / "p.pt", partial_key=key)
    assert calls == [4], "only the batch that was not finished is computed again"
    assert torch.allclose(again, whole, atol=1e-5)
    calls.clear()  # other weights (another key): nothing is taken from the file
    bpd_per_image(model, images, 2, batch_size=4, seed=0, partial=tmp_path / "p.pt", partial_key={"other": 1})
    assert calls == [4, 4, 4]


def test_bpd_per_image_keeps_non_finite_values():
    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def bits_per_dim(self, imgs, k):
            out = torch.ones(len(imgs))
            out[0] = float("nan")
            return out

    bpd = bpd_per_image(Broken(), torch.zeros(5, 1, 2, 2, dtype=torch.int32), 1, batch_size=2)
    assert len(bpd) == 5 and torch.isnan(bpd).sum() == 3  # one NaN per batch, none dropped


def test_bench_reports_every_model():
    rows = bench(models=("multiscale",), batch_size=4, steps=1)
    assert rows[0]["model"] == "multiscale" and rows[0]["parameters"] == 1_062_090
    assert rows[0]["train_img_per_s"] > 0 and rows[0]["likelihood_ms"] > 0 and rows[0]["sampling_ms"] > 0
    fast = bench(models=("simple",), batch_size=4, steps=1, eval_batch=2, bf16=True, channels_last=True)
    assert fast[0]["model"] == "simple" and fast[0]["train_img_per_s"] > 0


def test_bench_compare_measures_every_configuration_against_the_first():
    configs = {"fp32 eager": {}, "fp32 + channels-last": dict(channels_last=True)}
    rows, what = compare("simple", batch_size=4, steps=1, configs=configs)
    assert [r["config"] for r in rows] == list(configs) and "256" in what
    assert rows[0]["speedup"] == 1.0 and rows[0]["bpd_diff"] == 0.0 and rows[1]["train_img_per_s"] > 0
    assert abs(rows[1]["bpd_diff"]) < 1e-4  # the same weights, images and noise in another memory layout


def test_plots_return_figures():
    figs = [viz.show_imgs(torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.int32), "t"),
            viz.plot_masks({"m": torch.ones(2, 4, 4)}), viz.plot_dequantization(4, prior=[1, 2, 3, 4]),
            viz.plot_scaling_factors(), viz.plot_histogram({"a": torch.rand(100)}),
            viz.plot_curves({"a": ([1, 2], [3, 4])}, "x", "y"), viz.plot_training_curves({"a": [(1, 2.0)], "b": None}),
            viz.plot_density_2d(lambda p: -p.pow(2).sum(1), data=torch.randn(10, 2), samples=torch.randn(10, 2))]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figs)


def test_dequantization_plot_has_unit_mass():
    fig = viz.plot_dequantization(8)
    line = fig.axes[0].lines[-1]
    x, y = line.get_xdata(), line.get_ydata()
    mass = float(((y[1:] + y[:-1]) / 2 * (x[1:] - x[:-1])).sum())
    assert 0.95 < mass < 1.0  # the logistic tails beyond |y| = 4 hold the rest


def test_toy_flow_learns_and_inverts():
    data = sample_toy("ring", 2000, seed=1)
    flow, losses = train_toy_flow(data, steps=150)
    assert sum(losses[-10:]) / 10 < losses[0]
    z, _ = flow(data[:5])
    ldj = torch.zeros(5)
    for layer in reversed(flow.flows):
        z, ldj = layer(z, ldj, reverse=True)
    torch.testing.assert_close(z, data[:5], atol=1e-5, rtol=0)
    assert flow.sample(7).shape == (7, 2) and isinstance(ToyFlow(), torch.nn.Module)
    with pytest.raises(ValueError, match="moons"):
        sample_toy("spiral", 3)


def test_interpolate_latents_hits_both_ends():
    a, b = torch.zeros(1, 2, 3, 3), torch.ones(1, 2, 3, 3)
    line = interpolate_latents(a, b, 5)
    assert line.shape == (5, 2, 3, 3) and torch.equal(line[0], a[0]) and torch.equal(line[-1], b[0])
    assert torch.allclose(line[2], torch.full((2, 3, 3), 0.5))


def test_load_trained_prefers_a_shipped_checkpoint(tmp_path, monkeypatch):
    model = perturb_(create_flow("simple"), scale=0.01)
    save_checkpoint(model, "simple", tmp_path / "simple.pt", epochs=7, device="cuda:0")
    monkeypatch.setenv("PATH_CHECKPOINT", str(tmp_path))
    loaded, source, curve = load_trained("simple", device=torch.device("cpu"))
    assert "simple.pt" in source and "7 epochs" in source and curve is None
    assert torch.equal(next(loaded.parameters()), next(model.parameters()))
    assert config.checkpoint_path() == tmp_path


def test_evaluation_never_replaces_a_more_thorough_json_of_the_same_weights(tmp_path, mnist, monkeypatch):
    import flowbook.evaluate as evaluate

    for slow in ("inference_time", "sampling_time"):  # not what this test is about
        monkeypatch.setattr(evaluate, slow, lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(evaluate, "slice_bpd_per_image", lambda *args, **kwargs: torch.ones(4))
    model = perturb_(create_flow("simple"), scale=0.01)
    save_checkpoint(model, "simple", tmp_path / "simple.pt", epochs=1)
    thorough = evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", importance_samples=2, eval_images=16,
                                   progress=False)
    before = (tmp_path / "simple.json").read_text()
    with pytest.raises(FileExistsError, match="less thorough than in"):
        evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", importance_samples=1, eval_images=8, progress=False)
    with pytest.raises(FileExistsError, match="slice and timings 0 < 1"):  # as thorough in bpd, without the slice
        evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", importance_samples=2, eval_images=16,
                            bpd_only=True, progress=False)
    with pytest.raises(FileExistsError, match="validation images 4 < 16"):
        evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", importance_samples=2, eval_images=16,
                            val_images=4, progress=False)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="eval_images must be an integer >= 1"):
            evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", eval_images=bad, progress=False)
    assert (tmp_path / "simple.json").read_text() == before
    stale = tmp_path / ".quick.test.partial.rank1.pt"  # left by an earlier run with --devices 2
    stale.write_bytes(b"")
    other = evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", importance_samples=1, eval_images=8,
                                progress=False, out=tmp_path / "quick.json")
    assert other["eval_images"]["test"] == 8 and (tmp_path / "simple.json").read_text() == before
    assert not stale.exists() and not list(tmp_path.glob(".quick.*")), "a finished evaluation leaves no partial files"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C during the timings, after the bpd of both sets

    monkeypatch.setattr(evaluate, "sampling_time", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", importance_samples=1, eval_images=8,
                            progress=False, out=tmp_path / "stopped.json")
    kept = sorted(p.name for p in tmp_path.glob(".stopped.*"))
    assert not (tmp_path / "stopped.json").exists() and kept == [".stopped.test.partial.rank0.pt",
                                                                 ".stopped.val.partial.rank0.pt"], kept
    monkeypatch.setattr(evaluate, "sampling_time", lambda *args, **kwargs: 1.0)
    again = evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", importance_samples=1, eval_images=8,
                                progress=False, out=tmp_path / "stopped.json")
    assert again["test_bpd"] == other["test_bpd"] and not list(tmp_path.glob(".stopped.*"))
    assert thorough["images_seen"] is None or thorough["images_seen"] >= 0
    save_checkpoint(perturb_(create_flow("simple"), scale=0.02), "simple", tmp_path / "simple.pt", epochs=2)
    newer = evaluate_checkpoint(tmp_path / "simple.pt", device="cpu", importance_samples=1, eval_images=8,
                                progress=False)  # new weights: the old JSON describes weights that are gone
    assert newer["checkpoint_sha256"] != thorough["checkpoint_sha256"]
    assert json.loads((tmp_path / "simple.json").read_text())["training"]["epochs"] == 2


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_without_a_checkpoint_no_chapter_starts_a_long_run(tmp_path, monkeypatch, mode):
    import flowbook.pretrained as pretrained

    calls = []

    def fake_train(name, out, **kwargs):
        calls.append(kwargs)
        return create_flow(name).eval(), {"train_curve": [(1, 5.0)]}

    monkeypatch.setenv("PATH_CHECKPOINT", str(tmp_path / "none"))
    monkeypatch.setenv("FLOWBOOK_MODE", mode)
    monkeypatch.setattr(pretrained, "train", fake_train)
    monkeypatch.setattr(pretrained.config, "PROJECT_ROOT", tmp_path)
    model, source, curve = pretrained.load_trained("simple", device=torch.device("cpu"))
    assert len(calls) == 1 and calls[0]["max_steps"] == config.settings().demo_steps <= 1000
    per_epoch = (config.settings().train_images or 50_000) // config.settings().batch_size
    epochs = calls[0]["epochs"]  # enough for the steps (1,000 in full mode span three epochs), and no more
    assert (epochs - 1) * per_epoch < calls[0]["max_steps"] <= epochs * per_epoch
    assert "make train-all" in source and curve == [(1, 5.0)]


def _hold_lock_in_another_process(folder, seconds):
    """Start a process that holds `folder`'s run lock for `seconds`, as a running trainer does; returns it
    once the lock is held, with the time it was taken as `.held_at`."""
    code = ("import fcntl, sys, time\n"
            f"f = open({str(folder / '.lock')!r}, 'a+'); fcntl.flock(f, fcntl.LOCK_EX)\n"
            "print('held', flush=True); time.sleep(float(sys.argv[1]))\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(seconds)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.held_at = time.perf_counter()
    return holder


def test_the_run_lock_is_reentrant_and_can_wait_for_another_trainer(tmp_path):
    from flowbook.train import run_lock

    with run_lock(tmp_path), run_lock(tmp_path):  # a caller holding it around `train` is no second trainer
        pass
    holder = _hold_lock_in_another_process(tmp_path, 1.5)
    with pytest.raises(FileExistsError, match="another trainer is running"):
        with run_lock(tmp_path):
            pass
    with run_lock(tmp_path, wait=True):
        assert time.perf_counter() - holder.held_at > 1.4, "the lock was taken while the other trainer held it"
    holder.wait()


def test_two_notebooks_training_the_same_quick_model_do_not_clear_each_others_run(tmp_path, monkeypatch):
    import flowbook.pretrained as pretrained
    from flowbook.train import _HELD_LOCKS

    monkeypatch.setattr(pretrained.config, "PROJECT_ROOT", tmp_path)
    out = tmp_path / "runs" / "quick" / "simple"
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an older run")
    seen = {}

    def fake_train(name, folder, **kwargs):
        seen["other done"] = time.perf_counter() - holder.held_at > 0.9
        seen["files"] = sorted(p.name for p in folder.iterdir())
        seen["locked"] = folder.resolve() in _HELD_LOCKS
        return create_flow(name).eval(), {"train_curve": [(1, 5.0)]}

    monkeypatch.setattr(pretrained, "train", fake_train)
    holder = _hold_lock_in_another_process(out, 1.0)
    pretrained.train_quick("simple", device=torch.device("cpu"), progress=False)
    # it waited for the other trainer, then removed the stale files but kept the lock file, and held it
    assert seen == {"other done": True, "files": [".lock"], "locked": True}
    holder.wait()


def test_a_cached_demonstration_model_is_reused_only_when_it_was_trained_as_this_mode_would(tmp_path, monkeypatch):
    import flowbook.pretrained as pretrained
    from flowbook.checkpoints import save_checkpoint

    monkeypatch.setattr(pretrained.config, "PROJECT_ROOT", tmp_path)
    monkeypatch.setattr(config, "settings", lambda: config.FULL)
    s, trained = config.FULL, []
    monkeypatch.setattr(pretrained, "train", lambda name, folder, **run: trained.append(run) or (
        create_flow(name).eval(), {"train_curve": []}))
    cached = tmp_path / "runs" / "quick" / "simple" / "simple.pt"
    cached.parent.mkdir(parents=True)
    old = {"epochs": 1, "max_steps": s.demo_steps, "batch_size": s.batch_size, "train_images": s.train_images,
           "val_images": s.eval_images}  # an older full-mode run: one epoch, so it stopped before demo_steps
    save_checkpoint(create_flow("simple"), "simple", cached, settings=old)
    pretrained.train_quick("simple", device=torch.device("cpu"), progress=False)
    assert len(trained) == 1 and trained[0]["epochs"] > 1, "the stale model must be trained again"
    save_checkpoint(create_flow("simple"), "simple", cached, settings=trained[0])
    _, _, curve = pretrained.train_quick("simple", device=torch.device("cpu"), progress=False)
    assert len(trained) == 1 and curve is None, "a model trained as this mode would is reused"


def test_quick_demonstrations_train_at_least_one_epoch_so_that_they_end_with_a_validation(monkeypatch):
    import flowbook.pretrained as pretrained

    s = config.QUICK
    assert s.demo_steps * s.batch_size >= s.train_images, "a demonstration run would end before its validation"
    monkeypatch.setattr(config, "settings", lambda: dataclasses.replace(s, demo_steps=s.demo_steps - 1))
    with pytest.raises(ValueError, match="less than one epoch"):
        pretrained.train_quick("simple", device=torch.device("cpu"), progress=False)


def test_image_grid_labels_each_row_at_its_centre():
    imgs = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.int32)
    ax = viz.show_imgs(imgs, row_size=3, row_labels=["first", "second"]).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["first", "second"]
    assert list(ax.get_yticks()) == [2 + 4, 2 + 10 + 4]  # padding 2, rows of 8 + 2 pixels
    with pytest.raises(ValueError, match="3 row labels for 2 rows"):
        viz.show_imgs(imgs, row_size=3, row_labels=["a", "b", "c"])


def test_a_switch_option_accepts_only_clear_values():
    import argparse

    from flowbook.training.cli import _switch

    assert [_switch(v) for v in ("1", "On", "yes", "0", "off", "FALSE")] == [True, True, True, False, False, False]
    with pytest.raises(argparse.ArgumentTypeError, match="expected 1/true/yes/on"):
        _switch("y")


def test_a_subset_larger_than_the_set_is_refused():
    from flowbook.data import ImageDataset

    data = ImageDataset(torch.zeros(5, 1, 28, 28, dtype=torch.int32), torch.zeros(5, dtype=torch.int64))
    assert len(data.subset(5)) == 5 and len(data.subset(None)) == 5
    with pytest.raises(ValueError, match="asked for 6 images, but this set has 5"):
        data.subset(6)

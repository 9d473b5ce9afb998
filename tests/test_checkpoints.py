"""Checkpoints: plain state dicts, clear errors for the wrong architecture, and shipped results that hold."""
import json

import pytest
import torch

from conftest import ROOT, perturb_
from flowbook.checkpoints import CheckpointError, load_model, read_checkpoint, save_checkpoint
from flowbook.evaluate import check_slice
from flowbook.gallery import SEED, sample_grid
from flowbook.provenance import file_sha256
from flowbook.models import ALL_MODELS, create_flow

MAX_BYTES = 8 * 2 ** 20  # a shipped checkpoint stays small enough for a git repository (docs/training.md)
MODEL_FILES = sorted(p for p in (ROOT / "checkpoints").glob("*.pt") if p.stem in ALL_MODELS)  # not the classifier
SHIPPED = [p for p in MODEL_FILES if p.with_suffix(".json").is_file()]  # evaluated: the README's results table
AWAITING = [p for p in MODEL_FILES if p not in SHIPPED]  # trained, not evaluated yet


def test_checkpoint_round_trip_is_a_plain_weights_only_state_dict(tmp_path):
    model = perturb_(create_flow("vardeq"), scale=0.01)
    save_checkpoint(model, "vardeq", tmp_path / "m.pt", epochs=3)
    raw = torch.load(tmp_path / "m.pt", map_location="cpu", weights_only=True)
    assert raw["arch"] == "vardeq" and raw["meta"] == {"epochs": 3}
    loaded = load_model(tmp_path / "m.pt", map_location="cpu")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert not loaded.training


def test_loading_into_the_wrong_architecture_is_a_clear_error(tmp_path):
    save_checkpoint(create_flow("simple"), "simple", tmp_path / "s.pt")
    with pytest.raises(CheckpointError, match="'simple' flow, not 'multiscale'"):
        load_model(tmp_path / "s.pt", arch="multiscale")
    from flowbook.checkpoints import load_state
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_state(create_flow("multiscale"), read_checkpoint(tmp_path / "s.pt"))


def test_files_that_are_no_flowbook_checkpoint_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a flowbook checkpoint"):
        load_model(tmp_path / "other.pt")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_model(tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


def shipped(test):
    """Parametrise `test` over the shipped checkpoints (skipped where there are none)."""
    return pytest.mark.parametrize("path", SHIPPED or [pytest.param(None, marks=pytest.mark.skip("no shipped checkpoints"))],
                                   ids=lambda p: p.stem if p else "none")(test)


def test_the_four_flows_are_shipped_with_their_results():
    assert {"glow", "multiscale", "simple", "vardeq"} <= {p.stem for p in SHIPPED}
    for path in SHIPPED:
        assert (ROOT / "docs" / f"samples_{path.stem}.png").is_file(), f"no sample grid of {path.stem} in docs/"


@pytest.mark.parametrize("path", AWAITING or [pytest.param(None, marks=pytest.mark.skip("every model is evaluated"))],
                         ids=lambda p: p.stem if p else "none")
def test_a_checkpoint_awaiting_evaluation_carries_its_training_history(path):
    """A model may be shipped before its (hours-long) evaluation: it loads, and its metadata says how it was
    trained, so that the chapters can show it and say that its bpd is not measured yet."""
    ckpt = read_checkpoint(path)
    assert ckpt["arch"] == path.stem and path.stat().st_size < MAX_BYTES
    history = ckpt["meta"]["history"]
    assert history and all(stage["images_seen"] > 0 and stage["settings"] for stage in history)
    load_model(path, map_location="cpu")
    assert (ROOT / "docs" / f"samples_{path.stem}.png").is_file(), f"no sample grid of {path.stem} in docs/"


@shipped
def test_shipped_results_json_is_complete_and_matches_its_checkpoint(path):
    results = json.loads(path.with_suffix(".json").read_text())
    assert results["arch"] == path.stem and results["checkpoint_sha256"] == file_sha256(path)
    # The full evaluation is all 10,000 test images; a shipped JSON may be a smaller one, which the README's
    # table shows (the next `flowbook.evaluate` of the same weights replaces it, never the other way round).
    # A flow's bpd uses 8 importance samples; a flow-matching model's, one Hutchinson estimate (its JSON says so).
    assert results["eval_images"]["test"] >= 2_000
    assert results["importance_samples"] >= 8 or (results["importance_samples"] == 1 and "likelihood" in results)
    assert 0 < results["val_bpd"] < 8 and 0 < results["test_bpd"] < 8
    for key in ("epochs", "images_seen", "train_wall_s", "train_hardware", "parameters", "git_commit", "versions"):
        assert results.get(key) not in (None, "", [], "unknown"), f"{path.stem}: {key} missing"
    assert results["versions"]["torch"] and results["images_seen"] >= 50_000 * 0.9 * min(1, results["epochs"])
    for stage in results["training"]["history"]:
        for key in ("settings", "hardware", "torch", "epochs", "images_seen", "wall_s"):
            assert stage.get(key) is not None, f"{path.stem}: a stage lacks {key}"


@shipped
def test_shipped_sample_grid_is_reproducible_from_its_seed(path):
    model = load_model(path, map_location="cpu")
    first, again = sample_grid(model, n=8, temperature=0.7), sample_grid(model, n=8, temperature=0.7)
    assert torch.equal(first, again) and first.dtype == torch.int32
    assert 0 <= first.min() and first.max() <= 255
    other = sample_grid(model, n=8, temperature=0.7, seed=SEED + 1)
    assert not torch.equal(first, other), "another seed must give other samples"


@shipped
def test_shipped_checkpoint_reproduces_its_recorded_slice_bpd(path, mnist):
    results = json.loads(path.with_suffix(".json").read_text())
    assert path.stat().st_size < MAX_BYTES
    model = load_model(path, map_location="cpu", arch=results["arch"])
    per_image = results["slice_bpd_per_image"]
    assert len(per_image) == results["slice"]["images"] and results["slice"]["noise"] == "per image"
    assert abs(sum(per_image) / len(per_image) - results["slice_bpd"]) < 1e-4, "the slice's mean is its values' mean"
    bpd, recorded = check_slice(model, results, mnist[2].images, images=32)  # raises if the weights differ
    assert results["test_bpd"] >= bpd - 0.15, "the recorded test bpd is far better than the slice shows"
    with pytest.raises(ValueError, match="not the ones evaluated"):
        check_slice(model, {**results, "slice_bpd_per_image": [v + 0.05 for v in per_image]}, mnist[2].images, 8)
    with pytest.raises(ValueError, match="--refresh-slice"):  # a slice of other settings is not compared
        check_slice(model, {**results, "slice": {**results["slice"], "seed": results["slice"]["seed"] + 1}},
                    mnist[2].images, 8)


def test_metadata_with_paths_loads_back_and_other_objects_are_refused_before_writing(tmp_path):
    from pathlib import Path

    save_checkpoint(create_flow("simple"), "simple", tmp_path / "m.pt", out=Path("/some/run"), stages=[Path("a")])
    meta = read_checkpoint(tmp_path / "m.pt")["meta"]
    assert meta == {"out": "/some/run", "stages": ["a"]}
    with pytest.raises(TypeError, match=r"meta\['device'\] is a device"):
        save_checkpoint(create_flow("simple"), "simple", tmp_path / "n.pt", device=torch.device("cpu"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"], "no file, and no temporary file, is left"


def test_a_failed_save_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    save_checkpoint(create_flow("simple"), "simple", tmp_path / "m.pt", epochs=1)
    before = (tmp_path / "m.pt").read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(create_flow("simple"), "simple", tmp_path / "m.pt", epochs=2)
    assert (tmp_path / "m.pt").read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_readme_shows_exactly_the_shipped_results():
    from flowbook.results import results_table

    if not SHIPPED:
        pytest.skip("no shipped checkpoints")
    assert results_table(ROOT / "checkpoints") in (ROOT / "README.md").read_text(), \
        "the README's results table differs from checkpoints/*.json: paste `python -m flowbook.results`"


def test_the_umask_is_read_without_changing_it(monkeypatch):
    import os

    from flowbook import checkpoints

    before = os.umask(0o027)
    try:
        changes = []
        real = os.umask
        monkeypatch.setattr(os, "umask", lambda mask: changes.append(mask) or real(mask))
        assert checkpoints._umask() == 0o027
        if os.path.exists("/proc/self/status"):
            assert changes == [], "on Linux the umask is read from /proc, never set to 0 for a moment"
    finally:
        os.umask(before)


def test_atomic_save_makes_a_file_as_readable_as_a_plain_one(tmp_path):
    from flowbook.checkpoints import atomic_save

    atomic_save({"a": 1}, tmp_path / "saved.pt")
    (tmp_path / "plain.txt").write_text("")
    assert (tmp_path / "saved.pt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777

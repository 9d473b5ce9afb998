"""flowbook.pretrained: the training history and the results JSON of a shipped checkpoint, as the chapters print them."""
import json
import shutil

import pytest

from flowbook import config
from flowbook.checkpoints import read_checkpoint
from flowbook.models import ALL_MODELS
from flowbook.pretrained import shipped_results, training_history
from flowbook.results import validation_curves

# the evaluated models (a checkpoint with its results JSON); not the digit classifier
SHIPPED = sorted(p.stem for p in config.checkpoint_path().glob("*.pt")
                 if p.stem in ALL_MODELS and p.with_suffix(".json").is_file())


@pytest.mark.parametrize("name", SHIPPED)
def test_training_history_matches_the_results_json(name):
    rows = training_history(name)
    results = json.loads((config.checkpoint_path() / f"{name}.json").read_text())
    assert len(rows) == results["stages"], "one row per training stage"
    assert [r["stage"] for r in rows] == list(range(1, len(rows) + 1))
    assert rows[0]["start"] == "random initialisation"
    assert all(r["start"] == f"stage {r['stage'] - 1}'s weights" for r in rows[1:])
    assert sum(r["epochs"] for r in rows) == results["epochs"], "the stages' epochs must add up to the total"
    assert sum(r["images_seen"] for r in rows) == results["images_seen"]
    assert all(r["batch_size"] > 0 and r["peak_lr"] > 0 and r["schedule"] for r in rows)
    history = results.get("training", {}).get("history") or []
    for row, stage in zip(rows, history):  # rounded only where a table prints it (113.47 is not 114)
        assert row["minutes"] == pytest.approx(stage["wall_s"] / 60)
        assert row["arch"] in (None, name), "a stage recorded under another architecture's name"
    if name == "tarflow_vardeq":  # its last stage started from the TarFlow's weights, so it says which it trained
        assert rows[-1]["arch"] == name and rows[-1]["start"] == f"stage {len(rows) - 1}'s weights"


def test_training_history_without_a_shipped_checkpoint_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH_CHECKPOINT", str(tmp_path))
    assert training_history("multiscale") == []


@pytest.mark.parametrize("name", sorted(validation_curves()))
def test_validation_curves_end_at_the_shipped_checkpoint(name):
    """docs/validation_curves.csv, which chapters 6 and 8 plot, belongs to the shipped weights: its last point
    is at the checkpoint's images and best one-sample validation bpd, and the stages follow each other."""
    points = validation_curves()[name]
    images, scores, stages = zip(*points)
    assert list(images) == sorted(set(images)) and list(stages) == sorted(stages)
    meta = read_checkpoint(config.checkpoint_path() / f"{name}.pt")["meta"]
    assert images[-1] == meta["total"]["images_seen"], "the curve does not end at the shipped checkpoint's images"
    assert scores[-1] == pytest.approx(meta["best_val_bpd_1sample"], abs=5e-4)
    assert max(stages) == len(meta["history"]), "one stage of the curve per stage of the checkpoint's training"


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_results_are_the_json_of_the_shipped_weights(name):
    results = shipped_results(name)
    assert results is not None and results["arch"] == name
    assert results["eval_images"]["test"] == 10_000, "the shipped results are on the full test set"


def test_shipped_results_refuses_a_json_of_other_weights(tmp_path, monkeypatch):
    name = SHIPPED[0]
    shutil.copy(config.checkpoint_path() / f"{name}.pt", tmp_path / f"{name}.pt")
    results = json.loads((config.checkpoint_path() / f"{name}.json").read_text())
    (tmp_path / f"{name}.json").write_text(json.dumps({**results, "checkpoint_sha256": "0" * 64}))
    monkeypatch.setenv("PATH_CHECKPOINT", str(tmp_path))
    assert shipped_results(name) is None

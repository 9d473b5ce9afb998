"""flowbook.pretrained.training_history: the stages of a shipped checkpoint, as chapters 3 and 6 print them."""
import json

import pytest

from flowbook import config
from flowbook.pretrained import training_history

SHIPPED = sorted(p.stem for p in config.checkpoint_path().glob("*.pt"))


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


def test_training_history_without_a_shipped_checkpoint_is_empty(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH_CHECKPOINT", str(tmp_path))
    assert training_history("multiscale") == []

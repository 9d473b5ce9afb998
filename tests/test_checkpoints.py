"""Checkpoints: plain state dicts, clear errors for the wrong architecture, and shipped results that hold."""
import json

import pytest
import torch

from conftest import ROOT, perturb_
from flowbook.checkpoints import CheckpointError, load_model, read_checkpoint, save_checkpoint
from flowbook.evaluate import slice_bpd
from flowbook.models import create_flow

SHIPPED = sorted((ROOT / "checkpoints").glob("*.pt"))


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


@pytest.mark.parametrize("path", SHIPPED or [pytest.param(None, marks=pytest.mark.skip("no shipped checkpoints"))],
                         ids=lambda p: p.stem if p else "none")
def test_shipped_checkpoint_reproduces_its_recorded_slice_bpd(path, mnist):
    results = json.loads(path.with_suffix(".json").read_text())
    assert path.stat().st_size < 5 * 2 ** 20
    model = load_model(path, map_location="cpu", arch=results["arch"])
    bpd = slice_bpd(model, mnist[2].images)
    assert abs(bpd - results["slice_bpd"]) <= 0.02, (bpd, results["slice_bpd"])
    assert results["test_bpd"] >= bpd - 0.1, "the recorded test bpd is far better than the slice shows"

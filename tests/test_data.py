"""MNIST loading: offline from PATH_DATASETS, the reference's split, and a clear error without data."""
import shutil

import pytest
import torch

from flowbook import config
from flowbook.data import (OFFICIAL_FILES, MNISTCorruptError, MNISTNotFoundError, load_mnist, make_loader,
                           verify_mnist_files)


def test_mnist_loads_offline_as_int32_images_with_the_reference_split(mnist):
    train, val, test = mnist
    assert (len(train), len(val), len(test)) == (50_000, 10_000, 10_000)
    img, label = train[0]
    assert img.dtype == torch.int32 and img.shape == (1, 28, 28) and 0 <= int(label) <= 9
    assert int(train.images.min()) == 0 and int(train.images.max()) == 255
    # random_split(60000 -> 50000/10000) after seed_everything(42) puts training image 37542 first.
    from torchvision.datasets import MNIST
    raw = MNIST(str(config.data_path()), train=True)
    assert torch.equal(train.images[0, 0], raw.data[37542].to(torch.int32))
    assert torch.equal(val.images[0, 0], raw.data[59753].to(torch.int32))
    assert len(set(map(int, train.labels[:1000]))) == 10


def test_loader_batches_and_seeded_shuffling(mnist):
    train = mnist[0].subset(256)
    first = next(iter(make_loader(train, 64, shuffle=True, seed=3)))[0]
    again = next(iter(make_loader(train, 64, shuffle=True, seed=3)))[0]
    assert first.shape == (64, 1, 28, 28) and torch.equal(first, again)


def test_missing_data_without_network_gives_one_clear_error(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    def offline(self):
        raise OSError("network is unreachable")

    monkeypatch.setattr(MNIST, "download", offline)
    with pytest.raises(MNISTNotFoundError) as info:
        load_mnist(tmp_path, download=True)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "PATH_DATASETS" in message
    with pytest.raises(MNISTNotFoundError, match="PATH_DATASETS"):
        load_mnist(tmp_path, download=False)


def test_relative_data_path_is_read_from_the_project_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH_DATASETS", "some/relative/folder")
    assert config.data_path() == config.PROJECT_ROOT / "some" / "relative" / "folder"
    monkeypatch.setenv("FLOWBOOK_MODE", "quick")
    assert config.settings().quick
    monkeypatch.setenv("FLOWBOOK_MODE", "fast")
    with pytest.raises(ValueError, match="FLOWBOOK_MODE"):
        config.mode()


def _copy_of_mnist(tmp_path):
    from flowbook import config

    source = config.data_path() / "MNIST" / "raw"
    if not (source / "train-images-idx3-ubyte").exists():
        pytest.skip(f"MNIST not under {config.data_path()}; set PATH_DATASETS")
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in OFFICIAL_FILES:
        shutil.copyfile(source / name, raw / name)
    return raw


def test_damaged_truncated_and_swapped_mnist_files_are_named_with_the_fix(tmp_path):
    raw = _copy_of_mnist(tmp_path)
    with open(raw / "train-images-idx3-ubyte", "r+b") as f:  # 100 KB of zeros in the middle
        f.seek(20_000_000)
        f.write(bytes(100_000))
    with pytest.raises(MNISTCorruptError, match=r"train-images-idx3-ubyte is damaged.*copy the official file"):
        load_mnist(tmp_path, download=False)
    with open(raw / "train-images-idx3-ubyte", "r+b") as f:
        f.truncate(1_000_000)
    with pytest.raises(MNISTCorruptError, match=r"train-images-idx3-ubyte has 1,000,000 bytes, the official file 47,040,016"):
        load_mnist(tmp_path, download=False)
    (raw / "train-images-idx3-ubyte").unlink()
    shutil.copyfile(raw / "t10k-images-idx3-ubyte", raw / "train-images-idx3-ubyte")
    with pytest.raises(MNISTCorruptError, match="t10k-images-idx3-ubyte: files swapped"):
        load_mnist(tmp_path, download=False)


def test_the_official_files_pass_the_check(tmp_path):
    raw = _copy_of_mnist(tmp_path)
    verify_mnist_files(raw)
    train, val, test = load_mnist(tmp_path, download=False)
    assert len(train) == 50_000 and len(test) == 10_000

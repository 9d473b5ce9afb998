"""A digit classifier for judging samples: how many of a model's samples does a good MNIST classifier
recognise as a digit, with confidence?

    python -m flowbook.classifier                        # train it (about a minute) -> checkpoints/classifier.pt
    clf = load_classifier(); score = recognisability(clf, imgs)

`recognisability` is the share of images whose most likely class has probability >= `threshold` (0.9): a
crisp, well-formed digit scores near 1 (the real test digits' score is the reference), a blob or a mix of
two digits near 0. It measures how digit-like samples are, not how varied: a model that drew one perfect
"1" over and over would score 1, so chapters show the class histogram beside it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowbook import config
from flowbook.cpu import keep_freed_memory
from flowbook.layers.checks import check_images
from flowbook.provenance import hardware

THRESHOLD = 0.9


class DigitClassifier(nn.Module):
    """int images [B, 1, 28, 28] in 0..255 -> logits [B, 10]: two convolution blocks and two linear layers."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                  nn.Linear(128, 10))

    def forward(self, imgs):
        check_images(imgs, img_shape=(1, 28, 28))
        return self.head(self.features(imgs.float() / 255 - 0.5))


def train_classifier(train_images, train_labels, epochs: int = 2, batch_size: int = 128, lr: float = 2e-3,
                     seed: int = 0, progress: bool = True) -> DigitClassifier:
    """Adam with a cosine schedule over `epochs` passes of the images [N, 1, 28, 28] and labels [N]."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    steps = epochs * (len(train_images) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    bar = tqdm(total=steps, desc="classifier", disable=not progress, mininterval=2)
    for _ in range(epochs):
        order = torch.randperm(len(train_images))
        for i in range(len(train_images) // batch_size):
            idx = order[i * batch_size:(i + 1) * batch_size]
            loss = F.cross_entropy(clf(train_images[idx]), train_labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
    bar.close()
    return clf.eval()


@torch.no_grad()
def probabilities(clf: DigitClassifier, imgs: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """[N, 10] class probabilities of int images [N, 1, 28, 28]."""
    return torch.cat([F.softmax(clf(imgs[i:i + batch_size]), dim=1) for i in range(0, len(imgs), batch_size)])


def recognised(clf: DigitClassifier, imgs: torch.Tensor, threshold: float = THRESHOLD) -> torch.Tensor:
    """[N] bool: whether each image [N, 1, 28, 28]'s most likely class has probability >= threshold."""
    return probabilities(clf, imgs).max(dim=1).values >= threshold


def recognisability(clf: DigitClassifier, imgs: torch.Tensor, threshold: float = THRESHOLD) -> float:
    """The share of images [N, 1, 28, 28] that are `recognised`."""
    return recognised(clf, imgs, threshold).float().mean().item()


def accuracy(clf: DigitClassifier, imgs: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of images classified as their label."""
    return (probabilities(clf, imgs).argmax(dim=1) == labels).float().mean().item()


def default_path() -> Path:
    return config.checkpoint_path() / "classifier.pt"


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """The shipped classifier (checkpoints/classifier.pt) in eval mode, with its accuracy and training facts in
    `.meta`; a clear error where it is missing."""
    path = Path(path) if path is not None else default_path()
    if not path.is_file():
        raise FileNotFoundError(f"no digit classifier at {path}: train it with `python -m flowbook.classifier`")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    clf = DigitClassifier()
    clf.load_state_dict(saved["state_dict"])
    clf.meta = saved["meta"]
    return clf.eval()


def main(argv=None):
    keep_freed_memory()  # see flowbook.cpu
    from flowbook.data import load_mnist

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="default: checkpoints/classifier.pt")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="replace an existing classifier")
    args = parser.parse_args(argv)
    out = args.out or default_path()
    if out.exists() and not args.force:
        parser.exit(2, f"flowbook.classifier: error: {out} exists; pass --force to replace it\n")
    train_set, val_set, test_set = load_mnist()
    clf = train_classifier(train_set.images, train_set.labels, epochs=args.epochs)
    stats = {"val_accuracy": accuracy(clf, val_set.images, val_set.labels),
             "test_accuracy": accuracy(clf, test_set.images, test_set.labels),
             "test_recognisability": recognisability(clf, test_set.images),
             "threshold": THRESHOLD, "epochs": args.epochs, "hardware": hardware(torch.device("cpu"))}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    torch.save({"state_dict": clf.state_dict(), "meta": stats}, tmp)
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()

"""Evaluation: importance-weighted bpd, inference and sampling time, and a results JSON per checkpoint.

    python -m flowbook.evaluate --checkpoint checkpoints/multiscale.pt

writes checkpoints/multiscale.json with validation and test bpd (8 importance samples, full sets), the
time to compute the likelihood of and to sample a batch of 64, the parameter count, the bpd of a fixed
256-image test slice (which tests/test_checkpoints.py recomputes on the CPU), the training settings, and
the device, git commit and library versions it was computed with. `--graphs` adds the likelihood and
sampling times through compiled calls (one CUDA graph each on a GPU; see flowbook.fast).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm  # text bars: work in a terminal and in Jupyter without ipywidgets

from flowbook import config
from flowbook.checkpoints import model_from_checkpoint, read_checkpoint
from flowbook.data import load_mnist
from flowbook.fast import compiled_calls
from flowbook.models import ImageFlow, num_parameters

SLICE_IMAGES, SLICE_SEED = 256, 0


@torch.no_grad()
def bpd_per_image(model: ImageFlow, images: torch.Tensor, importance_samples: int = 8, batch_size: int = 256,
                  progress: bool = False, desc: str = "bpd") -> torch.Tensor:
    """[N] bits per dimension of int images [N, C, H, W], on the model's device, batch by batch.

    Non-finite values are kept (never dropped): a mean over them is non-finite too, as it should be."""
    device = next(model.parameters()).device
    batches = images.split(batch_size)
    out = [model.bits_per_dim(b.to(device), importance_samples).float().cpu()
           for b in tqdm(batches, desc=desc, disable=not progress, leave=False)]
    return torch.cat(out)


def mean_bpd(model: ImageFlow, images: torch.Tensor, importance_samples: int = 8, **kwargs) -> float:
    """Mean bpd over `images` (see `bpd_per_image`)."""
    return bpd_per_image(model, images, importance_samples, **kwargs).mean().item()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_call(fn, device: torch.device, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds, synchronising the GPU around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def inference_time(model: ImageFlow, images: torch.Tensor, repeats: int = 10, graphs: bool = False) -> float:
    """Seconds to compute log-likelihoods of `images` (one dequantization sample); with `graphs`, through
    `flowbook.fast.compiled_calls` (compiled once before timing)."""
    device = next(model.parameters()).device
    images = images.to(device)
    log_likelihood = compiled_calls(model)[0] if graphs else model.log_likelihood
    return time_call(lambda: log_likelihood(images), device, repeats)


def sampling_time(model: ImageFlow, num: int = 64, repeats: int = 10, graphs: bool = False) -> float:
    """Seconds to sample `num` images; with `graphs`, through `flowbook.fast.compiled_calls`."""
    device = next(model.parameters()).device
    shape = model.latent_shape(num)
    sample = compiled_calls(model)[1] if graphs else model.sample
    return time_call(lambda: sample(shape), device, repeats)


def slice_bpd(model: ImageFlow, test_images: torch.Tensor) -> float:
    """bpd (8 importance samples) of the first 256 test images with the noise seeded: a fingerprint of
    the weights that any machine can recompute in seconds."""
    torch.manual_seed(SLICE_SEED)
    return mean_bpd(model, test_images[:SLICE_IMAGES], importance_samples=8)


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=config.PROJECT_ROOT, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions() -> dict:
    import pytorch_lightning
    import torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pytorch_lightning": pytorch_lightning.__version__}


def evaluate_checkpoint(path: str | Path, device: str | None = None, importance_samples: int = 8,
                        eval_images: int | None = None, progress: bool = True, graphs: bool = False) -> dict:
    """Evaluate the checkpoint at `path` and write the results JSON beside it (same name, .json).
    With `graphs`, the likelihood and sampling times are also measured through compiled calls (CUDA
    graphs on a GPU) and recorded as inference_ms_graphs and sampling_ms_graphs."""
    path = Path(path)
    device = torch.device(device) if device else config.get_device()
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, map_location=device)
    _, val, test = load_mnist()
    val_imgs, test_imgs = val.images[:eval_images], test.images[:eval_images]
    torch.manual_seed(0)
    batch = test.images[:64]
    results = {
        "arch": ckpt["arch"],
        "val_bpd": mean_bpd(model, val_imgs, importance_samples, progress=progress, desc="validation bpd"),
        "test_bpd": mean_bpd(model, test_imgs, importance_samples, progress=progress, desc="test bpd"),
        "importance_samples": importance_samples,
        "eval_images": {"val": len(val_imgs), "test": len(test_imgs)},
        "slice_bpd": slice_bpd(model, test.images),
        "slice": {"images": SLICE_IMAGES, "seed": SLICE_SEED, "importance_samples": 8},
        "inference_ms": 1000 * inference_time(model, batch),
        "sampling_ms": 1000 * sampling_time(model, 64),
        **({"inference_ms_graphs": 1000 * inference_time(model, batch, graphs=True),
            "sampling_ms_graphs": 1000 * sampling_time(model, 64, graphs=True)} if graphs else {}),
        "parameters": num_parameters(model),
        "training": ckpt["meta"],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "git_commit": _git_commit(),
        "versions": _versions(),
    }
    path.with_suffix(".json").write_text(json.dumps(results, indent=2))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a flowbook checkpoint and write its results JSON.")
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--device", default=None)
    parser.add_argument("--importance-samples", type=int, default=8)
    parser.add_argument("--eval-images", type=int, default=None, help="first N validation/test images only")
    parser.add_argument("--graphs", action="store_true", help="also time compiled likelihood and sampling")
    args = parser.parse_args(argv)
    results = evaluate_checkpoint(args.checkpoint, args.device, args.importance_samples, args.eval_images,
                                  graphs=args.graphs)
    print(json.dumps({k: v for k, v in results.items() if k not in ("training", "versions")}, indent=2))


if __name__ == "__main__":
    main()

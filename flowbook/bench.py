"""Speed of the three models: training images/s, likelihood and sampling time per batch, parameters.

    python -m flowbook.bench                 # on the CPU, batch 64
    python -m flowbook.bench --device cuda   # on a GPU
"""
from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

from flowbook.evaluate import _sync, inference_time, sampling_time
from flowbook.models import MODEL_NAMES, create_flow, num_parameters


def train_images_per_s(model, batch_size: int = 64, steps: int = 10, warmup: int = 2) -> float:
    """Images per second of full training steps (forward, backward, clipping, Adam) on random images."""
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    imgs = torch.randint(0, 256, (batch_size, *model.img_shape), dtype=torch.int32, device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        model(imgs).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def bench(models=MODEL_NAMES, device: str = "cpu", batch_size: int = 64, steps: int = 10, seed: int = 0):
    """One row per model: name, parameters, train img/s, likelihood ms and sampling ms for `batch_size`."""
    rows = []
    for name in models:
        torch.manual_seed(seed)
        model = create_flow(name).to(device)
        ips = train_images_per_s(model, batch_size, steps)
        model.eval()
        imgs = torch.randint(0, 256, (batch_size, *model.img_shape), dtype=torch.int32, device=device)
        rows.append({"model": name, "parameters": num_parameters(model), "train_img_per_s": ips,
                     "likelihood_ms": 1000 * inference_time(model, imgs, repeats=5),
                     "sampling_ms": 1000 * sampling_time(model, batch_size, repeats=5)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    args = parser.parse_args(argv)
    rows = bench(args.models, args.device, args.batch_size, args.steps)
    print(f"device: {args.device}, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(tabulate([[r["model"], f"{r['parameters']:,}", f"{r['train_img_per_s']:.0f}",
                     f"{r['likelihood_ms']:.1f}", f"{r['sampling_ms']:.1f}"] for r in rows],
                   headers=["model", "parameters", "train img/s", "likelihood ms", "sampling ms"]))


if __name__ == "__main__":
    main()

"""Speed of the three models: training images/s, likelihood and sampling time per batch, parameters.

    python -m flowbook.bench                                  # on the CPU, batch 64, eager
    python -m flowbook.bench --device cuda --batch-size 1024 --bf16 --channels-last --compile default
    python -m flowbook.bench --device cuda --graphs           # likelihood and sampling as CUDA graphs

Training steps run on random images with the fast-path options given (see flowbook.fast); likelihood
and sampling are timed for `--eval-batch` images (64), eagerly or, with `--graphs`, through
`compiled_calls` (torch.compile "reduce-overhead": one CUDA graph per call on a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch
from tabulate import tabulate

from flowbook.evaluate import _sync, inference_time, sampling_time
from flowbook.fast import COMPILE_MODES, enable_tf32, speed_up
from flowbook.layers.checks import trusted_images
from flowbook.models import MODEL_NAMES, create_flow, num_parameters


def train_images_per_s(model, batch_size: int = 64, steps: int = 10, warmup: int = 2, bf16: bool = False) -> float:
    """Images per second of full training steps (forward, backward, clipping, Adam) on random images."""
    device = next(model.parameters()).device
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=device.type == "cuda")
    imgs = torch.randint(0, 256, (batch_size, *model.img_shape), dtype=torch.int32, device=device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext())

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model(imgs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    with trusted_images():  # as in training: the data is checked once, not every step
        for _ in range(warmup):
            step()
        _sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
    return batch_size * steps / (time.perf_counter() - start)


def bench(models=MODEL_NAMES, device: str = "cpu", batch_size: int = 64, steps: int = 10, seed: int = 0,
          eval_batch: int = 64, bf16: bool = False, channels_last: bool = False, compile: str | None = None,
          graphs: bool = False):
    """One row per model: name, parameters, train img/s for `batch_size`, and likelihood ms and sampling
    ms for `eval_batch` images (through `compiled_calls` when `graphs`)."""
    device = torch.device(device)
    if device.type == "cuda":
        enable_tf32()
    rows = []
    for name in models:
        torch.manual_seed(seed)
        model = speed_up(create_flow(name).to(device), channels_last=channels_last, compile=compile)
        ips = train_images_per_s(model, batch_size, steps, bf16=bf16)
        model.eval()  # likelihood and sampling are methods: `compile` above changed only the training loss
        imgs = torch.randint(0, 256, (eval_batch, *model.img_shape), dtype=torch.int32, device=device)
        rows.append({"model": name, "parameters": num_parameters(model), "train_img_per_s": ips,
                     "likelihood_ms": 1000 * inference_time(model, imgs, repeats=5, graphs=graphs),
                     "sampling_ms": 1000 * sampling_time(model, eval_batch, repeats=5, graphs=graphs)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--eval-batch", type=int, default=64, help="batch for likelihood and sampling")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=MODEL_NAMES)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast in training steps")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", default=None, choices=COMPILE_MODES, help="torch.compile the training loss")
    parser.add_argument("--graphs", action="store_true", help="compiled likelihood and sampling (CUDA graphs)")
    args = parser.parse_args(argv)
    rows = bench(args.models, args.device, args.batch_size, args.steps, eval_batch=args.eval_batch,
                 bf16=args.bf16, channels_last=args.channels_last, compile=args.compile, graphs=args.graphs)
    print(f"device: {args.device}, train batch {args.batch_size}, eval batch {args.eval_batch}, "
          f"bf16 {args.bf16}, channels-last {args.channels_last}, compile {args.compile}, graphs {args.graphs}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print(tabulate([[r["model"], f"{r['parameters']:,}", f"{r['train_img_per_s']:.0f}",
                     f"{r['likelihood_ms']:.2f}", f"{r['sampling_ms']:.2f}"] for r in rows],
                   headers=["model", "parameters", "train img/s", "likelihood ms", "sampling ms"]))
    return rows


if __name__ == "__main__":
    main()

"""Speed of the three models: training images/s, likelihood and sampling time per batch, parameters.

    python -m flowbook.bench                                  # on the CPU, batch 64, eager
    python -m flowbook.bench --device cuda --batch-size 1024 --bf16 --channels-last --compile default
    python -m flowbook.bench --device cuda --graphs           # likelihood and sampling as CUDA graphs
    python -m flowbook.bench --compare --models multiscale    # the CPU fast path next to fp32 eager
    python -m flowbook.bench --processes 2 --models multiscale  # 2 DDP processes x 1 thread, 1 process x 2

Training steps run on random images with the fast-path options given (see flowbook.fast); likelihood
and sampling are timed for `--eval-batch` images (64), eagerly or, with `--graphs`, through
`compiled_calls` (torch.compile "reduce-overhead": one CUDA graph per call on a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import time

import torch
from tabulate import tabulate

from flowbook.cpu import keep_freed_memory
from flowbook.evaluate import _sync, inference_time, sampling_time
from flowbook.fast import COMPILE_MODES, enable_tf32, speed_up
from flowbook.layers.checks import trusted_images
from flowbook.models import ALL_MODELS, MODEL_NAMES, create_flow, num_parameters


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


# The configurations `--compare` measures in one run: fp32 eager first, as the baseline.
CONFIGS = {"fp32 eager": {},
           "bf16 + channels-last": dict(bf16=True, channels_last=True),
           "bf16 + channels-last + compile": dict(bf16=True, channels_last=True, compile="default")}


def fixed_batch_bpd(model, imgs, bf16: bool, seed: int = 0) -> float:
    """The training loss (mean bpd, one dequantization sample) of `imgs` with the noise seeded, in the
    model's precision and layout, through its compiled forward where `speed_up` compiled it: what a
    configuration computes, for comparison with fp32 eager. Compiled code draws the noise the eager way
    here (inductor's `fallback_random`), so that every configuration sees the same noise."""
    import torch._inductor.config as inductor_config

    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    torch.manual_seed(seed)
    with torch.no_grad(), autocast, inductor_config.patch(fallback_random=True):
        return float(model(imgs))


def _comparison_start(name: str, seed: int):
    """(weights, images, what they are) for `compare`: the shipped checkpoint and 256 MNIST test images
    where they are at hand (a fair test of reduced precision: trained weights, real digits), else weights
    moved away from their zero initialisation and random images."""
    from flowbook.checkpoints import load_model
    from flowbook.data import MNISTNotFoundError, load_mnist
    from flowbook.pretrained import checkpoint_file

    gen = torch.Generator().manual_seed(seed)
    path = checkpoint_file(name)
    try:
        imgs, what = load_mnist(download=False)[2].images[:256], "256 MNIST test images"
    except MNISTNotFoundError:
        imgs, what = (torch.rand(256, 1, 28, 28, generator=gen) ** 3 * 256).to(torch.int32), "256 random images"
    if path is not None:
        return load_model(path, arch=name), imgs, f"{what}, the weights of {path.name}"
    torch.manual_seed(seed)
    start = create_flow(name)
    with torch.no_grad():
        for p in start.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return start, imgs, f"{what}, untrained weights perturbed by N(0, 0.02^2)"


def compare(name: str = "multiscale", device: str = "cpu", batch_size: int = 64, steps: int = 10,
            seed: int = 0, configs: dict = CONFIGS) -> tuple[list[dict], str]:
    """(one row per configuration of `configs` for model `name`, measured in this run: training images/s,
    the speed-up over the first configuration, and the difference of a fixed batch's loss from it;
    a sentence saying which weights and images the loss was computed on). Every configuration starts
    from the same weights and sees the same images with the same noise."""
    device = torch.device(device)
    start, imgs, what = _comparison_start(name, seed)
    imgs = imgs.to(device)
    rows = []
    for label, options in configs.items():
        model = speed_up(copy.deepcopy(start).to(device), channels_last=options.get("channels_last", False),
                         compile=options.get("compile"))
        bpd = fixed_batch_bpd(model, imgs, options.get("bf16", False), seed)  # before training changes it
        ips = train_images_per_s(model, batch_size, steps, bf16=options.get("bf16", False))
        rows.append({"config": label, "train_img_per_s": ips, "fixed_batch_bpd": bpd})
    for row in rows:
        row["speedup"] = row["train_img_per_s"] / rows[0]["train_img_per_s"]
        row["bpd_diff"] = row["fixed_batch_bpd"] - rows[0]["fixed_batch_bpd"]
    return rows, what


def _ddp_images_per_s(fabric, name: str, batch_size: int, steps: int, warmup: int, seed: int) -> float:
    """In each process of `fabric` (one thread each): DDP training steps of model `name` on its share of a
    global batch of `batch_size` random images; the global images per second (rank 0's clock)."""
    import lightning_fabric  # noqa: F401 (fabric is one)

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    model = create_flow(name)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model, opt = fabric.setup(model, opt)
    local = batch_size // fabric.world_size
    imgs = torch.randint(0, 256, (local, *create_flow(name).img_shape), dtype=torch.int32)

    def step():
        opt.zero_grad(set_to_none=True)
        fabric.backward(model(imgs))
        fabric.clip_gradients(model, opt, max_norm=1.0)
        opt.step()

    with trusted_images():
        for _ in range(warmup):
            step()
        fabric.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        fabric.barrier()
    return batch_size * steps / (time.perf_counter() - start)


def processes_vs_threads(name: str = "multiscale", processes: int = 2, batch_size: int = 64, steps: int = 10,
                         seed: int = 0) -> list[dict]:
    """Training images/s of model `name` on this CPU, in one run: `processes` DDP processes (Lightning
    Fabric, gloo) with one thread each, against one process with `processes` threads, at the same global
    batch. The ratio says what training on several processes costs (or gains) over threads."""
    from lightning_fabric import Fabric

    if batch_size % processes:
        raise ValueError(f"the global batch of {batch_size} does not split into {processes} processes")
    threads = torch.get_num_threads()
    torch.set_num_threads(processes)
    try:
        torch.manual_seed(seed)
        one = train_images_per_s(create_flow(name), batch_size, steps)
    finally:
        torch.set_num_threads(threads)
    fabric = Fabric(accelerator="cpu", devices=processes, strategy="ddp_spawn")
    many = fabric.launch(_ddp_images_per_s, name, batch_size, steps, 2, seed)
    return [{"config": f"1 process x {processes} threads", "train_img_per_s": one, "ratio": 1.0},
            {"config": f"{processes} processes x 1 thread (DDP, gloo)", "train_img_per_s": many,
             "ratio": many / one}]


def main(argv=None):
    keep_freed_memory()  # see flowbook.cpu; the timings are with it
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64, help="training batch")
    parser.add_argument("--eval-batch", type=int, default=64, help="batch for likelihood and sampling")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per model")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), choices=ALL_MODELS)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast in training steps")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", default=None, choices=COMPILE_MODES, help="torch.compile the training loss")
    parser.add_argument("--graphs", action="store_true", help="compiled likelihood and sampling (CUDA graphs)")
    parser.add_argument("--compare", action="store_true",
                        help="training speed of fp32 eager, bf16 + channels-last and bf16 + channels-last + compile")
    parser.add_argument("--processes", type=int, default=None,
                        help="on the CPU: N DDP processes x 1 thread against 1 process x N threads")
    args = parser.parse_args(argv)
    if args.processes and args.device == "cpu":
        for name in args.models:
            rows = processes_vs_threads(name, args.processes, args.batch_size, args.steps)
            print(f"{name}: global batch {args.batch_size}, {args.steps} timed steps, torch {torch.__version__}, "
                  f"{os.cpu_count()} CPU cores")
            print(tabulate([[r["config"], f"{r['train_img_per_s']:.1f}", f"{r['ratio']:.2f}"] for r in rows],
                           headers=["configuration", "train img/s", "of 1 process"]))
        return rows
    if args.compare:
        for name in args.models:
            rows, what = compare(name, args.device, args.batch_size, args.steps)
            print(f"{name}: device {args.device}, batch {args.batch_size}, {args.steps} timed steps, "
                  f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; fixed batch: {what}")
            print(tabulate([[r["config"], f"{r['train_img_per_s']:.0f}", f"{r['speedup']:.2f}x",
                             f"{r['bpd_diff']:+.4f}"] for r in rows],
                           headers=["configuration", "train img/s", "speed-up", "fixed-batch bpd - fp32"]))
        return rows
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

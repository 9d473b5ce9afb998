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
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm  # text bars: work in a terminal and in Jupyter without ipywidgets

from flowbook import config, noise
from flowbook.checkpoints import atomic_save, model_from_checkpoint, read_checkpoint
from flowbook.cpu import keep_freed_memory
from flowbook.data import load_mnist
from flowbook.fast import compiled_calls
from flowbook.models import ImageFlow, noise_record, num_parameters
from flowbook.provenance import file_sha256, git_commit, hardware, versions

SLICE_IMAGES, SLICE_SEED = 256, 0
EVAL_SEED = 0  # the test set's images draw their noise with seeds from it, the validation set's from EVAL_SEED + 1
ODE_SLICE_IMAGES = 16  # a likelihood through an ODE costs seconds per image on a CPU core (3.4 s, flowmatch)


def default_importance_samples(model) -> int:
    """8 for a flow (exact log-likelihood per dequantization sample), 1 for a model whose log-likelihood is
    an estimate (flow matching: importance sampling over estimates would be biased)."""
    return 8 if getattr(model, "exact_likelihood", True) else 1


def _load_partial(path: Path | None, key: str) -> dict:
    """{batch start: [b] bpd} that an interrupted evaluation with the same `key` saved at `path`, else {}."""
    if path is None or not path.exists():
        return {}
    saved = torch.load(path, weights_only=True)
    return saved["batches"] if saved.get("key") == key else {}


@torch.no_grad()
def bpd_per_image(model: ImageFlow, images: torch.Tensor, importance_samples: int = 8, batch_size: int = 256,
                  progress: bool = False, desc: str = "bpd", seed: int | None = None,
                  first_index: int = 0, partial: Path | None = None, partial_key: dict | None = None) -> torch.Tensor:
    """[N] bits per dimension of int images [N, C, H, W], on the model's device, batch by batch.

    seed None: the dequantization noise comes from torch's global generator. With a `seed`, image i (its
    index in the whole set: `first_index` + its position in `images`) draws its noise, every importance
    sample of it, from a generator of its own seeded with `image_seed(seed, i)` (`flowbook.noise.per_image`):
    its bpd then depends neither on the batches nor on how the set is shared between processes (for a model
    that solves an ODE with an adaptive solver, whose steps are chosen per batch: within the solver's
    tolerance).
    Non-finite values are kept (never dropped): a mean over them is non-finite too, as it should be.
    A model that draws Gaussian noise now (a noise-trained model in training mode) is refused: its numbers would
    be the bpd of noisy images, no bound on MNIST's likelihood.

    partial: a file where each finished batch is saved, with `partial_key` (what else decides the values:
    the weights, the options); an evaluation started again with the same file and key takes the batches
    saved there instead of computing them again (an hours-long ODE evaluation survives being stopped). The
    key does not cover flowbook's own code: delete the file after changing how a likelihood is computed."""
    if not getattr(model, "gives_bound", True):
        raise ValueError("this model draws Gaussian noise now (training mode, or its noise_kind set), so its bpd "
                         "would be that of noisy images, not a bound on MNIST's: call model.eval() first")
    device = next(model.parameters()).device
    key = json.dumps({**(partial_key or {}), "importance_samples": importance_samples, "batch_size": batch_size,
                      "seed": seed, "first_index": first_index, "images": len(images)}, sort_keys=True)
    done = _load_partial(partial, key)
    if done and progress:
        print(f"{desc}: {sum(len(v) for v in done.values()):,} of {len(images):,} images from {partial}")
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False,
                      file=sys.stdout, mininterval=2):
        if start in done:
            out.append(done[start])
            continue
        batch = images[start:start + batch_size].to(device)
        seeds = [image_seed(seed, first_index + start + i) for i in range(len(batch))] if seed is not None else None
        with noise.per_image(seeds) if seeds is not None else contextlib.nullcontext():
            out.append(model.bits_per_dim(batch, importance_samples).float().cpu())
        if partial is not None:
            done[start] = out[-1]
            atomic_save({"key": key, "batches": done}, partial)
    return torch.cat(out) if out else torch.empty(0)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index`'s noise in an evaluation seeded with `seed`."""
    return seed * 1_000_003 + index


def shard(n: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """(start, stop) of process `rank`'s images among n: whole batches of `batch_size`, split evenly, so that
    every process computes the batches one process would."""
    batches = -(-n // batch_size)
    return min(n, batches * rank // world * batch_size), min(n, batches * (rank + 1) // world * batch_size)


def sharded_bpd(model, images: torch.Tensor, importance_samples: int, batch_size: int, seed: int, fabric=None,
                **kwargs) -> torch.Tensor:
    """`bpd_per_image` of all `images` with the noise seeded per image, each process of `fabric` (a
    lightning Fabric; None: this process alone) computing its `shard`; the values gathered in order on
    every process. Equal, value for value, to one process's."""
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    start, stop = shard(len(images), batch_size, rank, world)
    if kwargs.get("partial") is not None:  # one file per process
        kwargs["partial"] = Path(f"{kwargs['partial']}.rank{rank}.pt")
    mine = bpd_per_image(model, images[start:stop], importance_samples, batch_size, seed=seed, first_index=start,
                         **kwargs)
    if world == 1:
        return mine
    longest = max(stop - start for start, stop in (shard(len(images), batch_size, r, world) for r in range(world)))
    padded = torch.full((longest,), float("nan"))
    padded[:len(mine)] = mine
    gathered = fabric.all_gather(padded.to(fabric.device)).cpu()  # [world, longest]
    return torch.cat([gathered[r, :stop - start] for r, (start, stop) in
                      enumerate(shard(len(images), batch_size, r, world) for r in range(world))])


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
    return time_call(lambda: log_likelihood(images), device, repeats, warmup=min(2, repeats))


def sampling_time(model: ImageFlow, num: int = 64, repeats: int = 10, graphs: bool = False) -> float:
    """Seconds to sample `num` images; with `graphs`, through `flowbook.fast.compiled_calls`."""
    device = next(model.parameters()).device
    shape = model.latent_shape(num)
    sample = compiled_calls(model)[1] if graphs else model.sample
    return time_call(lambda: sample(shape), device, repeats, warmup=min(2, repeats))


def slice_spec(model) -> dict:
    """The test slice that `slice_bpd` evaluates for `model`: 256 images with 8 importance samples for a
    flow, 16 images with one sample for a model whose likelihood solves an ODE; each image's noise drawn
    from a seed of its own (`bpd_per_image`), so that the first n images of the slice are a slice too."""
    exact = getattr(model, "exact_likelihood", True)
    return {"images": SLICE_IMAGES if exact else ODE_SLICE_IMAGES, "seed": SLICE_SEED,
            "importance_samples": default_importance_samples(model), "noise": "per image"}


def slice_bpd_per_image(model: ImageFlow, test_images: torch.Tensor, images: int | None = None) -> torch.Tensor:
    """[n] bpd of the first n = `images` test images of `slice_spec(model)` (default: all of them), with
    its importance samples and each image's noise seeded: a fingerprint of the weights that any machine can
    recompute in seconds (a minute for a flow-matching model)."""
    spec = slice_spec(model)
    n = spec["images"] if images is None else images
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= spec["images"]:
        raise ValueError(f"images must be an integer in 1..{spec['images']} (the slice), got {images!r}")
    return bpd_per_image(model, test_images[:n], spec["importance_samples"],
                         batch_size=SLICE_IMAGES if spec["images"] == SLICE_IMAGES else spec["images"],
                         seed=spec["seed"])


def slice_bpd(model: ImageFlow, test_images: torch.Tensor, images: int | None = None) -> float:
    """Mean of `slice_bpd_per_image`: the bpd of the first `images` images of the slice (default all)."""
    return slice_bpd_per_image(model, test_images, images).mean().item()


def check_slice(model: ImageFlow, results: dict, test_images: torch.Tensor, images: int | None = None,
                tolerance: float = 0.01) -> tuple[float, float]:
    """(live, recorded): the slice bpd of `model` on the first `images` images of the slice, recomputed now
    and as its results JSON `results` records it (the mean of the same images' recorded values). Raises
    ValueError where they differ by more than `tolerance`: the weights on screen are not the ones evaluated."""
    per_image = results.get("slice_bpd_per_image")
    if per_image is None:
        raise ValueError(f"the results JSON of {results.get('checkpoint', 'this model')} has no per-image slice "
                         "values: refresh it with python -m flowbook.evaluate --checkpoint ... --refresh-slice")
    if results.get("slice") != slice_spec(model):
        raise ValueError(f"the results JSON of {results.get('checkpoint', 'this model')} records the slice "
                         f"{results.get('slice')}, but this flowbook computes {slice_spec(model)}: refresh it with "
                         "python -m flowbook.evaluate --checkpoint ... --refresh-slice")
    n = len(per_image) if images is None else min(images, len(per_image))
    live = slice_bpd(model, test_images, n)
    recorded = sum(per_image[:n]) / n
    if not abs(live - recorded) <= tolerance:
        raise ValueError(f"{results.get('checkpoint', 'the model')}: slice bpd {live:.4f} on {n} images, but its "
                         f"results JSON records {recorded:.4f}: the weights on screen are not the ones evaluated")
    return live, recorded


THOROUGHNESS = ("test images", "importance samples", "validation images", "validation importance samples",
                "slice and timings")


def thoroughness(results: dict) -> tuple:
    """(test images, importance samples, validation images, validation importance samples, 1 with the slice
    fingerprint and timings else 0) of a results JSON: what `evaluate_checkpoint` compares before it replaces
    one evaluation of the same weights with another (each must be at least the old one's)."""
    return (results.get("eval_images", {}).get("test", 0), results.get("importance_samples", 0),
            results.get("eval_images", {}).get("val", 0),
            results.get("val_importance_samples", results.get("importance_samples", 0)),
            0 if results.get("bpd_only") else 1)


def _check_replace(out: Path, results: dict) -> None:
    """A FileExistsError where `results` would silently replace a more thorough evaluation of the same
    weights in `out`; an evaluation of other weights (another checkpoint file) replaces a stale one."""
    if not out.exists():
        return
    try:
        old = json.loads(out.read_text())
    except (OSError, ValueError):
        raise FileExistsError(f"{out} exists and is not a readable results JSON: move it away first") from None
    if old.get("checkpoint_sha256") not in (None, results["checkpoint_sha256"]):
        return
    less = [f"{what} {new} < {before}" for what, new, before in zip(THOROUGHNESS, thoroughness(results),
                                                                     thoroughness(old)) if new < before]
    if less:
        raise FileExistsError(
            f"{out} holds an evaluation of these weights that this one is less thorough than in "
            f"{'; '.join(less)}: it is kept. Write this one elsewhere with --out, or pass --overwrite.")


def training_totals(meta: dict) -> dict:
    """Epochs, images seen, wall time and hardware over every stage of a checkpoint's training history."""
    history = meta.get("history") or [{"epochs": meta.get("epochs", 0), "images_seen": None,
                                       "wall_s": meta.get("wall_s"), "hardware": meta.get("device")}]

    def total(key):
        values = [stage.get(key) for stage in history]
        return None if any(v is None for v in values) else round(sum(values), 1)
    return {"epochs": total("epochs"), "images_seen": total("images_seen"), "train_wall_s": total("wall_s"),
            "train_hardware": sorted({str(stage.get("hardware")) for stage in history}), "stages": len(history)}


def evaluate_checkpoint(path: str | Path, device: str | None = None, importance_samples: int | None = None,
                        eval_images: int | None = None, progress: bool = True, graphs: bool = False,
                        val_importance_samples: int | None = None, out: str | Path | None = None,
                        overwrite: bool = False, devices: int = 1, bpd_only: bool = False,
                        batch_size: int | None = None, val_images: int | None = None) -> dict | None:
    """Evaluate the checkpoint at `path` and write the results JSON to `out` (default: beside it, same
    name, .json). The test set gets `importance_samples`, the validation set `val_importance_samples`
    (default the same); left as None, 8 for a flow and 1 for a flow-matching model, whose log-likelihood is
    an estimate (see `default_importance_samples`); its JSON also records the solver and the estimator, and
    every JSON the standard error of the test bpd over images. An existing JSON for the same weights is only replaced by an evaluation at
    least as thorough in each of `THOROUGHNESS` (test images, importance samples, validation images and their
    importance samples, the slice and timings), unless `overwrite`. With `graphs`, likelihood
    and sampling are also timed through compiled calls (CUDA graphs on a GPU): inference_ms_graphs and
    sampling_ms_graphs.

    The test and validation bpd draw each image's noise from a seed of its own (`bpd_per_image` with
    EVAL_SEED), so that they depend neither on the batches nor on `devices` (an ODE model's only within the
    solver's tolerance, since an adaptive solver picks its steps per batch; the processes keep the batches
    one process would make, so `devices` changes nothing there either): with devices N > 1, N processes
    (Lightning Fabric's DDP; started from the command line) each evaluate a shard of the images, the values
    are gathered, and the first process computes the rest and writes the JSON; the others return None.
    An evaluation that is stopped keeps its finished batches in hidden files beside `out`
    (`.<name>.test.partial.rank0.pt`, ...); started again for the same weights and options, it continues from
    them, and deletes them once the JSON is written.
    `val_images`: the first N validation images only (default: as many as the test set gets, `eval_images`), for
    a model whose likelihood costs seconds per image (an ODE): the test set is what results are compared on.
    `bpd_only`: the test and validation bpd alone, without the slice fingerprint and the timings (a quick look
    at a training run's weights; the JSON says so)."""
    path = Path(path)
    for name, k in (("devices", devices), ("batch_size", 1 if batch_size is None else batch_size),
                    ("val_images", 1 if val_images is None else val_images),
                    ("eval_images", 1 if eval_images is None else eval_images)):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    out = Path(out) if out is not None else path.with_suffix(".json")
    for name, k in (("importance_samples", importance_samples), ("val_importance_samples", val_importance_samples)):
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {k!r}")
    device = torch.device(device) if device else config.get_device()
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt, map_location=device if devices == 1 else "cpu")
    importance_samples = importance_samples or default_importance_samples(model)
    _, val, test = load_mnist()
    val_imgs, test_imgs = val.images[:val_images or eval_images], test.images[:eval_images]
    val_k = val_importance_samples or importance_samples
    results = {"arch": ckpt["arch"], "checkpoint": path.name, "checkpoint_sha256": file_sha256(path),
               "eval_images": {"val": len(val_imgs), "test": len(test_imgs)},
               "importance_samples": importance_samples, "val_importance_samples": val_k, "eval_seed": EVAL_SEED,
               "processes": devices, **({"bpd_only": True} if bpd_only else {}), **noise_record(model)}
    if not overwrite:
        _check_replace(out, results)  # before the minutes of evaluation, not after
    fabric = None
    if devices > 1:
        from lightning_fabric import Fabric

        fabric = Fabric(accelerator="cuda" if device.type == "cuda" else "cpu", devices=devices, strategy="ddp")
        fabric.launch()  # from here on, in every process
        device = fabric.device
        model.to(device)
        progress = progress and fabric.global_rank == 0
    torch.manual_seed(0)
    batch = test.images[:64]
    ode = not getattr(model, "exact_likelihood", True)
    repeats = 1 if ode else 10  # an ODE solve takes seconds to minutes: time it once
    batch_size = batch_size or (64 if ode else 256)
    partial = {split: out.with_name(f".{out.stem}.{split}.partial") for split in ("test", "val")}
    key = {"checkpoint_sha256": results["checkpoint_sha256"], "world": devices,
           **{name: getattr(model, name) for name in ("method", "rtol", "atol", "probe") if hasattr(model, name)}}
    test_bpd = sharded_bpd(model, test_imgs, importance_samples, batch_size, EVAL_SEED, fabric, progress=progress,
                           desc="test bpd", partial=partial["test"], partial_key=key)
    val_bpd = sharded_bpd(model, val_imgs, val_k, batch_size, EVAL_SEED + 1, fabric, progress=progress,
                          desc="validation bpd", partial=partial["val"], partial_key=key)
    rank = fabric.global_rank if fabric is not None else 0
    if rank != 0:
        return None
    if ode:  # an adaptive solver's steps are chosen per batch: the batch size is part of the record
        results["likelihood"] = {"estimator": "hutchinson", "probe": model.probe, "probes_per_image": 1,
                                 "method": model.method, "rtol": model.rtol, "atol": model.atol,
                                 "batch_size": batch_size}
    results.update({
        "test_bpd": test_bpd.mean().item(),
        "test_bpd_stderr": (test_bpd.std() / len(test_bpd) ** 0.5).item() if len(test_bpd) > 1 else None,
        "val_bpd": val_bpd.mean().item(),
        **({} if bpd_only else _fingerprint_and_times(model, test.images, batch, repeats, graphs)),
        "parameters": num_parameters(model),
        **training_totals(ckpt["meta"]),
        "training": ckpt["meta"],
        "device": hardware(device),
        "git_commit": git_commit(),
        "versions": versions(),
    })
    _write_json(out, results)
    for split in partial.values():  # the JSON holds both sets now: every process's saved batches have served
        for stale in split.parent.glob(f"{split.name}.rank*.pt"):  # (those of an earlier --devices count too);
            stale.unlink(missing_ok=True)  # until then a failure in the slice or the timings loses no batch
    return results


def refresh_slice(path: str | Path, out: str | Path | None = None, device: str | None = None) -> dict:
    """Recompute the slice fields (`_fingerprint`) of the results JSON `out` (default: beside the checkpoint
    at `path`) for the same weights, and nothing else: for a JSON written before the slice recorded its
    per-image values. The JSON names the commit that did it (`slice_git_commit`)."""
    path = Path(path)
    out = Path(out) if out is not None else path.with_suffix(".json")
    if not out.exists():
        raise FileNotFoundError(f"{out} does not exist: evaluate the checkpoint first")
    results = json.loads(out.read_text())
    if results.get("checkpoint_sha256") != file_sha256(path):
        raise ValueError(f"{out} was written for other weights than {path}: evaluate it again instead")
    model = model_from_checkpoint(read_checkpoint(path), map_location=device or config.get_device())
    results.update(_fingerprint(model, load_mnist()[2].images), slice_git_commit=git_commit())
    _write_json(out, results)
    return results


def _write_json(out: Path, results: dict) -> None:
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, out)


def _fingerprint(model, test_images) -> dict:
    """The slice's bpd, its per-image values and its spec (`slice_bpd_per_image`), for a results JSON."""
    per_image = slice_bpd_per_image(model, test_images)
    return {"slice_bpd": per_image.mean().item(), "slice_bpd_per_image": [round(v, 6) for v in per_image.tolist()],
            "slice": slice_spec(model)}


def _fingerprint_and_times(model, test_images, batch, repeats, graphs) -> dict:
    """The slice (`_fingerprint`) and the times of a likelihood and of sampling 64 images."""
    return {
        **_fingerprint(model, test_images),
        "inference_ms": 1000 * inference_time(model, batch, repeats=repeats),
        "sampling_ms": 1000 * sampling_time(model, 64, repeats=repeats),
        **({"inference_ms_graphs": 1000 * inference_time(model, batch, graphs=True),
            "sampling_ms_graphs": 1000 * sampling_time(model, 64, graphs=True)} if graphs else {}),
    }


def main(argv=None):
    keep_freed_memory()  # see flowbook.cpu
    parser = argparse.ArgumentParser(description="Evaluate a flowbook checkpoint and write its results JSON.")
    parser.add_argument("--checkpoint", required=True, type=Path)
    parser.add_argument("--device", default=None)
    parser.add_argument("--importance-samples", type=int, default=None,
                        help="for the test set (default: 8 for a flow, 1 for a flow-matching model)")
    parser.add_argument("--val-importance-samples", type=int, default=None,
                        help="for the validation set (default: as many as for the test set)")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: beside the checkpoint)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing results JSON even where it is more thorough")
    parser.add_argument("--eval-images", type=int, default=None, help="first N validation/test images only")
    parser.add_argument("--val-images", type=int, default=None,
                        help="first N validation images only (default: as many as the test set gets)")
    parser.add_argument("--graphs", action="store_true", help="also time compiled likelihood and sampling")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per batch (default 256; 64 for a flow-matching model); a flow's results do "
                             "not depend on it, an ODE model's only within the solver's tolerance")
    parser.add_argument("--bpd-only", action="store_true",
                        help="test and validation bpd only: no slice fingerprint, no timings")
    parser.add_argument("--devices", type=int, default=1,
                        help="processes (one per GPU) that each evaluate a shard of the images (default 1)")
    parser.add_argument("--refresh-slice", action="store_true",
                        help="recompute only the slice fields of the existing results JSON of these weights")
    args = parser.parse_args(argv)
    try:
        if args.refresh_slice:
            results = refresh_slice(args.checkpoint, args.out, args.device)
            print(json.dumps({k: results[k] for k in ("checkpoint", "slice_bpd", "slice")}, indent=2))
            return
        results = evaluate_checkpoint(args.checkpoint, args.device, args.importance_samples, args.eval_images,
                                      graphs=args.graphs, val_importance_samples=args.val_importance_samples,
                                      out=args.out, overwrite=args.overwrite, devices=args.devices,
                                      bpd_only=args.bpd_only, batch_size=args.batch_size, val_images=args.val_images)
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        parser.exit(2, f"flowbook.evaluate: error: {err}\n")
    if results is not None:  # with several processes, the first reports
        print(json.dumps({k: v for k, v in results.items() if k not in ("training", "versions")}, indent=2))


if __name__ == "__main__":
    main()

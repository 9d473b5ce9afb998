"""The fast path for one modern GPU: TF32, channels-last memory, torch.compile and CUDA graphs.

    model = speed_up(create_flow("multiscale").cuda(), channels_last=True, compile="default")
    loss = model(imgs)                           # the training loss (mean bpd), compiled

    log_likelihood, sample = compiled_calls(model)   # fixed-shape calls, one CUDA graph each on a GPU
    ll = log_likelihood(imgs)                    # [B] nats, as model.log_likelihood(imgs)
    x = sample(model.latent_shape(64))           # int32 [64, 1, 28, 28], as model.sample(...)

None of it changes what a model computes (tests/test_fast.py compares with the eager model), its state
dict or its checkpoints. It runs on the CPU too (inductor compiles C++ there), which is how the tests
check it; the speed is for the GPU.

Why it pays: a flow is many small layers. Eager PyTorch launches one kernel per elementwise step, over a
thousand per likelihood of the multi-scale flow, so a batch of 64 is bound by launch overhead, not by
arithmetic. torch.compile fuses the elementwise steps; "reduce-overhead" also records the whole call
as one CUDA graph and replays it with a single launch.
"""
from __future__ import annotations

import torch

from flowbook.layers.checks import check_images, check_temperature
from flowbook.models import ImageFlow

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def enable_tf32() -> None:
    """TF32 matrix products and convolutions on Ampere and later GPUs: float32 range, 10-bit mantissa
    inside the products, accumulation in float32."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def check_compile_mode(mode: str | None) -> None:
    """A ValueError unless `mode` is None or one of COMPILE_MODES."""
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")


def speed_up(model: ImageFlow, channels_last: bool = False, compile: str | None = None) -> ImageFlow:
    """Return `model`, changed in place: its 4-d weights and masks stored channels-last (NHWC), and/or its
    forward (the training loss) compiled with torch.compile mode `compile` for fixed shapes.

    The state dict keeps its keys and values, so checkpoints are unaffected. `model.forward(imgs)` called
    directly still runs eagerly (the trainer uses that for validation batches of other shapes).
    """
    check_compile_mode(compile)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile(mode=compile, dynamic=False)
        compiled = model._compiled_call_impl

        def checked(imgs, *args, **kwargs):
            # The value range is checked here, outside the compiled graph (which skips it while tracing),
            # unless the caller checked the data once as a whole (`trusted_images`, as the trainer does).
            check_images(imgs, img_shape=model.img_shape)
            return compiled(imgs, *args, **kwargs)

        model._compiled_call_impl = checked
    return model


def compiled_calls(model: ImageFlow, mode: str = "reduce-overhead"):
    """(log_likelihood, sample): `model.log_likelihood(imgs)` and `model.sample(latent_shape, temperature)`
    compiled with torch.compile `mode` for fixed shapes (each new shape compiles once more).

    log_likelihood(imgs): int [B, C, H, W] -> [B] nats, one dequantization sample; the images are checked
        (dtype, shape, value range) before the compiled call, which does not check them again.
    sample(latent_shape, temperature=1.0): int32 images [B, C, H, W].
    Both return tensors of their own: a CUDA graph reuses its output memory on the next replay, so the
    results are cloned. Random numbers inside a compiled call come from another generator than eager
    PyTorch's, so compiled and eager calls draw different (equally distributed) noise.
    """
    check_compile_mode(mode)
    model.latent_shape()  # computed and cached now, not while tracing
    ll = torch.compile(model.log_likelihood, mode=mode, dynamic=False)
    draw = torch.compile(model.sample, mode=mode, dynamic=False)

    def log_likelihood(imgs):
        check_images(imgs, img_shape=model.img_shape)
        return ll(imgs).clone()

    def sample(latent_shape, temperature: float = 1.0):
        check_temperature(temperature)
        imgs = draw(tuple(latent_shape), temperature=temperature).clone()
        if imgs.min() < 0:  # -1 marks a NaN or infinite value (dequantization._mark_non_finite): checked here,
            # outside the compiled graph
            raise ValueError("the flow's reverse pass produced NaN or infinite values, which are no pixels: "
                             "the latent was too large for the trained model (lower the temperature)")
        return imgs

    return log_likelihood, sample

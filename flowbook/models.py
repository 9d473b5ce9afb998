"""`ImageFlow`, a stack of flow layers with a standard normal prior, and the three MNIST flows."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from flowbook.layers import (CouplingLayer, Dequantization, GatedConvNet, GlowStep, NoiseAugmentation, SplitFlow,
                             SqueezeFlow, TarFlowBlock, VariationalDequantization, create_channel_mask,
                             create_checkerboard_mask)
from flowbook.layers.checks import check_images, check_latent, check_precision, check_temperature
from flowbook.prior import gaussian_log_prob

MNIST_SHAPE = (1, 28, 28)
MODEL_NAMES = ("simple", "vardeq", "multiscale")  # the reference tutorial's three models
# and the ones flowbook adds
ALL_MODELS = (*MODEL_NAMES, "glow", "flowmatch", "tarflow", "tarflow_noise", "tarflow_vardeq")
# The noise of "tarflow_noise" in [-1, 1] pixel units: TarFlow's value for ImageNet 64 in the same units. On
# MNIST it is 6.4 grey levels (a bin is 2/256 = 0.0078 wide), 1/40 of the ink-to-paper contrast of 2: enough to
# smooth the spikes of a nearly binary data set at -1 and 1, small enough that one Tweedie step (which moves a
# pixel by sigma^2 times the score) recovers the strokes, leaving digits that a classifier reads as clean ones.
TARFLOW_NOISE_SIGMA = 0.05


class ImageFlow(nn.Module):
    """A normalizing flow on integer images: `flows[0]` dequantizes, the rest map to a N(0, I) latent.

    Args:
        flows: flow layers, applied in order by `encode` and in reverse order by `sample`.
        import_samples: default number of importance samples for `bits_per_dim` in evaluation.
        img_shape: (C, H, W) of the images, checked on every call when given.
    """

    loss_name = "bpd"  # what forward returns in evaluation: the validation score
    exact_likelihood = True  # log_likelihood is exact for its dequantization sample: importance sampling applies

    def __init__(self, flows, import_samples: int = 8, img_shape: tuple | None = None):
        super().__init__()
        self.flows = nn.ModuleList(flows)
        self.import_samples = import_samples
        self.img_shape = tuple(img_shape) if img_shape is not None else None

    @property
    def _param(self):
        """A tensor whose device and dtype the model works in (float32 on the CPU for a flow without weights)."""
        return next(self.parameters(), torch.zeros(()))

    @property
    def noise_sigma(self) -> float | None:
        """The standard deviation of the Gaussian noise the model trains on (`NoiseAugmentation`, in [-1, 1] pixel
        units), or None for a model trained with dequantization noise inside the bins."""
        return getattr(self.flows[0], "sigma", None)

    @property
    def gives_bound(self) -> bool:
        """Whether `log_likelihood` now bounds log P(x) of the discrete images: True unless the first layer draws
        Gaussian noise (a noise-trained model in training mode, or one set to on purpose)."""
        return getattr(self.flows[0], "gives_bound", True)

    @property
    def train_loss_name(self) -> str:
        """What forward returns in training: "bpd", or "noisy_bpd" for a noise-trained model, whose training
        loss is -log2 p / D of Gaussian-noised images: a density of another data set, no bpd of MNIST."""
        return "noisy_bpd" if self.noise_sigma is not None else self.loss_name

    def _check_precision(self):
        check_precision(self._param.dtype)

    def encode(self, imgs, return_splits: bool = False):
        """imgs: int [B, C, H, W] in 0..255 -> (z, ldj): latent [B, C', H', W'] and ldj [B] in nats.

        ldj is the sum of every layer's log|det J|, with the split layers' log N(z_split) folded in.
        With `return_splits=True`, returns (z, ldj, splits): `splits` lists the halves that the split layers
        factored out, in the order of the layers (empty for a single-scale flow). Together with z they are the
        whole latent: `sample(z.shape, z_init=z, z_splits=splits)` gives back `imgs` exactly.
        """
        self._check_precision()
        check_images(imgs, img_shape=self.img_shape)
        z = imgs
        ldj = torch.zeros(imgs.shape[0], device=imgs.device, dtype=self._param.dtype)
        splits = []
        for flow in self.flows:
            if return_splits and isinstance(flow, SplitFlow):
                splits.append(z.chunk(2, dim=1)[1])  # the half SplitFlow scores and drops
            z, ldj = flow(z, ldj, reverse=False)
        return (z, ldj, splits) if return_splits else (z, ldj)

    def log_likelihood(self, imgs):
        """[B]: log p(x + u) + (bound terms) for one dequantization sample u, in nats (for a noise-trained
        model in training mode, u is Gaussian noise and this is the log-density of the noisy image)."""
        z, ldj = self.encode(imgs)
        return gaussian_log_prob(z) + ldj

    def bits_per_dim(self, imgs, importance_samples: int = 1):
        """[B]: -log2 p(x) / D, D = C*H*W, estimated with K = `importance_samples` dequantization samples:
            log p(x) >= logsumexp_k(log_likelihood_k) - log K,
        a bound that tightens with K (K = 1 is the plain Jensen bound). Includes the log(256) term of
        the discretisation, so a uniform model of 8-bit pixels scores 8. Where the first layer draws Gaussian
        noise (`gives_bound` False), it is -log2 p(y) / D of the noisy images instead, no bound on MNIST's
        likelihood, and importance sampling (K > 1) is refused.
        """
        if isinstance(importance_samples, bool) or not isinstance(importance_samples, int) or importance_samples < 1:
            raise ValueError(f"importance_samples must be an integer >= 1, got {importance_samples!r}")
        if importance_samples > 1 and not self.gives_bound:
            raise ValueError("importance sampling needs dequantization noise inside the bins, but this model now "
                             "draws Gaussian noise: call model.eval() (uniform noise, a bound on -log2 P(x)), or "
                             "pass importance_samples=1 for the likelihood of the noisy images")
        if importance_samples == 1:
            ll = self.log_likelihood(imgs)
        else:
            lls = torch.stack([self.log_likelihood(imgs) for _ in range(importance_samples)], dim=-1)
            ll = torch.logsumexp(lls, dim=-1) - math.log(importance_samples)
        return -ll / (math.log(2) * imgs[0].numel())

    def forward(self, imgs):
        """Mean bits per dimension of a batch with one dequantization sample (the training loss; named by
        `train_loss_name` in training and `loss_name` in evaluation)."""
        return self.bits_per_dim(imgs).mean()

    @torch.no_grad()
    def sample(self, img_shape, z_init=None, temperature: float = 1.0, z_splits=None):
        """Draw images: z ~ N(0, temperature^2 I) of shape `img_shape` (the latent's [B, C', H', W']),
        or z = z_init, then every layer in reverse. Returns int32 images [B, C, H, W] in 0..255.
        Split layers draw their factored-out half at the same temperature, or take it from `z_splits`: a
        list with one tensor per split layer, in the order `encode(..., return_splits=True)` returns them.
        """
        param = self._param
        self._check_precision()
        check_temperature(temperature)
        if z_init is None and (not isinstance(img_shape, (tuple, list, torch.Size)) or len(img_shape) != 4
                               or not all(isinstance(n, int) and n > 0 for n in img_shape)):
            raise ValueError(f"expected the latent shape as four positive integers [B, C, H, W], got {img_shape!r}; "
                             "pass model.latent_shape(B)")
        if self.img_shape is not None and tuple(img_shape[1:]) != self.latent_shape()[1:]:
            raise ValueError(f"this model's latent has shape [B, {', '.join(map(str, self.latent_shape()[1:]))}], "
                             f"got {list(img_shape)}; pass model.latent_shape(B)")
        if z_init is None:
            z = torch.randn(tuple(img_shape), device=param.device, dtype=param.dtype) * temperature
        else:
            check_latent(z_init, "z_init")
            if not torch.isfinite(z_init).all():
                raise ValueError("z_init holds NaN or infinite values: a latent must be finite")
            z = z_init.to(device=param.device, dtype=param.dtype)
        return self.decode(z, temperature=temperature, z_splits=self._check_splits(z_splits, z.shape[0]))

    def decode(self, z, temperature: float = 1.0, z_splits=None, stop: int = 0):
        """The layers flows[stop:] in reverse order on the latent z [B, C', H', W'] (as `sample` runs them, which
        checks its arguments first): int32 images [B, C, H, W] for stop = 0, the first layer's output y
        [B, C, H, W] (float) for stop = 1. Split layers draw their half at `temperature`, or take it from
        `z_splits` (a list, one tensor per split layer among flows[stop:], in encode's order)."""
        splits = list(z_splits) if z_splits is not None else None
        ldj = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
        for flow in reversed(self.flows[stop:]):
            if isinstance(flow, SplitFlow):
                z_split = splits.pop().to(device=z.device, dtype=z.dtype) if splits is not None else None
                z, ldj = flow(z, ldj, reverse=True, temperature=temperature, z_split=z_split)
            else:
                z, ldj = flow(z, ldj, reverse=True)
        return z

    def _check_splits(self, z_splits, batch_size: int):
        """A copy of `z_splits` as a list (None stays None), checked against this model's split layers."""
        if z_splits is None:
            return None
        n_splits = sum(isinstance(flow, SplitFlow) for flow in self.flows)
        if not isinstance(z_splits, (list, tuple)) or len(z_splits) != n_splits:
            got = f"{len(z_splits)} tensors" if isinstance(z_splits, (list, tuple)) else type(z_splits).__name__
            raise ValueError(f"z_splits must be a list of {n_splits} tensor(s), one per split layer of this model, "
                             f"got {got}; pass the splits returned by encode(imgs, return_splits=True)")
        for i, z_split in enumerate(z_splits):
            check_latent(z_split, f"z_splits[{i}]")
            if z_split.shape[0] != batch_size or not torch.isfinite(z_split).all():
                raise ValueError(f"z_splits[{i}] must hold {batch_size} finite latents (one per image of z_init), "
                                 f"got shape {list(z_split.shape)}")
        return list(z_splits)

    def latent_shape(self, batch_size: int = 1):
        """The shape of z for `batch_size` images of `img_shape` (runs one zero image through the flow)."""
        if self.img_shape is None:
            raise ValueError("latent_shape needs the model's img_shape")
        if getattr(self, "_latent", None) is None:
            # fork_rng: the probe's dequantization noise must not move the caller's random state
            with torch.no_grad(), torch.random.fork_rng(devices=[self._param.device] if self._param.is_cuda else []):
                zeros = torch.zeros((1, *self.img_shape), dtype=torch.int32, device=self._param.device)
                self._latent = tuple(self.encode(zeros)[0].shape[1:])
        return (batch_size, *self._latent)


def noise_record(model) -> dict:
    """For a model trained on Gaussian-noised images, {"noise": ...}: which noise its training loss and its
    validation and evaluation draw (training summaries and results JSONs carry it); {} for every other model."""
    sigma = getattr(model, "noise_sigma", None)
    if sigma is None:
        return {}
    return {"noise": {"training": "gaussian", "sigma": sigma, "training_loss": "noisy_bpd", "evaluation": "uniform",
                      "note": "the training loss (train_noisy_bpd) is -log2 p / D of Gaussian-noised images in "
                              "[-1, 1], the density of another data set, not a bpd of MNIST; validation and evaluation draw "
                              "uniform noise inside each pixel's bin: bpd, a bound on -log2 P(x) / D of MNIST"}}


def num_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _vardeq_layer():
    var_flows = [
        CouplingLayer(GatedConvNet(c_in=2, c_out=2, c_hidden=16),
                      create_checkerboard_mask(28, 28, invert=(i % 2 == 1)), c_in=1)
        for i in range(4)
    ]
    return VariationalDequantization(var_flows)


def _checkerboard_couplings(n):
    return [CouplingLayer(GatedConvNet(c_in=1, c_hidden=32),
                          create_checkerboard_mask(28, 28, invert=(i % 2 == 1)), c_in=1)
            for i in range(n)]


def _channel_couplings(n, c_in, c_hidden):
    return [CouplingLayer(GatedConvNet(c_in=c_in, c_hidden=c_hidden),
                          create_channel_mask(c_in, invert=(i % 2 == 1)), c_in=c_in)
            for i in range(n)]


def create_simple_flow(use_vardeq: bool = False) -> ImageFlow:
    """Single-scale flow on [B, 1, 28, 28]: (variational) dequantization and 8 checkerboard couplings.
    335,128 parameters, or 379,556 with variational dequantization (4 conditional couplings)."""
    first = _vardeq_layer() if use_vardeq else Dequantization()
    return ImageFlow([first, *_checkerboard_couplings(8)], img_shape=MNIST_SHAPE)


def create_multiscale_flow() -> ImageFlow:
    """Multi-scale flow (1,062,090 parameters): variational dequantization, 2 checkerboard couplings on
    [1, 28, 28], squeeze, 2 channel couplings on [4, 14, 14], split, squeeze, 4 channel couplings on
    [8, 7, 7]. Its latent has shape [B, 8, 7, 7]."""
    flows = [_vardeq_layer(), *_checkerboard_couplings(2), SqueezeFlow(),
             *_channel_couplings(2, c_in=4, c_hidden=48), SplitFlow(), SqueezeFlow(),
             *_channel_couplings(4, c_in=8, c_hidden=64)]
    return ImageFlow(flows, img_shape=MNIST_SHAPE)


def create_glow_flow() -> ImageFlow:
    """The multi-scale flow with Glow steps (ActNorm, invertible 1x1 convolution, coupling) in place of its
    channel couplings: variational dequantization, 2 checkerboard couplings on [1, 28, 28] (a 1x1
    convolution needs two channels or more), squeeze, 2 Glow steps on [4, 14, 14], split, squeeze, 4 Glow
    steps on [8, 7, 7]. About the multi-scale flow's parameter count; latent [B, 8, 7, 7]."""
    flows = [_vardeq_layer(), *_checkerboard_couplings(2), SqueezeFlow(),
             *[GlowStep(4, c_hidden=48) for _ in range(2)], SplitFlow(), SqueezeFlow(),
             *[GlowStep(8, c_hidden=64) for _ in range(4)]]
    return ImageFlow(flows, img_shape=MNIST_SHAPE)


def create_tarflow(blocks: int = 4, depth: int = 2, width: int = 128, patch_size: int = 4,
                   noise_sigma: float | None = None, vardeq: bool = False) -> ImageFlow:
    """A transformer flow (TarFlow): uniform dequantization and `blocks` TarFlow blocks on [1, 28, 28], cut into
    patches of patch_size x patch_size (4: 49 tokens of 16 values), each block a causal transformer of
    `depth` layers of `width`, the token order flipped from block to block. Single scale: latent [B, 1, 28, 28].
    With `noise_sigma`, the first layer is `NoiseAugmentation(noise_sigma)` instead of dequantization and logit:
    the pixels in [-1, 1] with Gaussian noise in training, uniform noise in evaluation ("tarflow_noise").
    With `vardeq`, the first layer is the multi-scale flow's variational dequantization ("tarflow_vardeq").
    1,638,080 parameters with the defaults; sampling runs 49 sequential steps per block (a key-value cache each)."""
    if noise_sigma is not None and vardeq:
        raise ValueError("choose noise_sigma or vardeq, not both: each replaces the dequantization layer")
    first = (NoiseAugmentation(noise_sigma) if noise_sigma is not None
             else _vardeq_layer() if vardeq else Dequantization())
    flows = [first, *[TarFlowBlock(MNIST_SHAPE, patch_size, width=width, depth=depth, flip=i % 2 == 1)
                      for i in range(blocks)]]
    return ImageFlow(flows, img_shape=MNIST_SHAPE)


def _create_flowmatch():
    from flowbook.flowmatch import create_flowmatch_model  # it builds on this module's layers
    return create_flowmatch_model()


MODEL_FACTORIES = {  # name -> factory: one registry of the models flowbook trains and ships
    "simple": lambda: create_simple_flow(use_vardeq=False),
    "vardeq": lambda: create_simple_flow(use_vardeq=True),
    "multiscale": create_multiscale_flow,
    "glow": create_glow_flow,
    "flowmatch": _create_flowmatch,
    "tarflow": create_tarflow,
    "tarflow_noise": lambda: create_tarflow(noise_sigma=TARFLOW_NOISE_SIGMA),
    "tarflow_vardeq": lambda: create_tarflow(vardeq=True),
}


def create_flow(name: str) -> nn.Module:
    """A model by name: the reference's "simple", "vardeq" or "multiscale", "glow", "tarflow" (a transformer
    flow), "tarflow_noise" (the same, trained on Gaussian-noised pixels: sample it with `flowbook.denoise`),
    "tarflow_vardeq" (the same blocks after variational dequantization), or "flowmatch" (a
    `flowbook.flowmatch.FlowMatchingModel`, with the interface of `ImageFlow`)."""
    if name not in MODEL_FACTORIES:
        raise ValueError(f"unknown model {name!r}; choose one of {ALL_MODELS}")
    return MODEL_FACTORIES[name]()


def interpolate_latents(z_a: torch.Tensor, z_b: torch.Tensor, num_steps: int = 8) -> torch.Tensor:
    """[num_steps, C, H, W]: z_a, evenly spaced points on the line to z_b, and z_b (z_a, z_b: [1, C, H, W])."""
    alpha = torch.linspace(0, 1, num_steps, device=z_a.device, dtype=z_a.dtype).view(-1, 1, 1, 1)
    return (1 - alpha) * z_a + alpha * z_b

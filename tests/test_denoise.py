"""Noise-trained TarFlow ("tarflow_noise") and Tweedie denoising: the units of the bpd, the score against finite
differences, Tweedie against the closed form for Gaussian data, seeded sampling, training and evaluation."""
import functools
import json
import math

import pytest
import torch
import torch.nn as nn

from conftest import perturb_
from flowbook import noise as noise_source
from flowbook.denoise import log_density, sample_denoised, sample_noisy, score, tweedie_denoise
from flowbook.layers import ActNorm, Dequantization, NoiseAugmentation, TarFlowBlock
from flowbook.models import ALL_MODELS, MODEL_FACTORIES, TARFLOW_NOISE_SIGMA, ImageFlow, create_flow, num_parameters

F64 = torch.float64
SHAPE = (1, 8, 8)


class CubeToGaussian(nn.Module):
    """z = sqrt(2) erfinv(y): maps the uniform density on (-1, 1)^D to N(0, I), so that an ImageFlow of it has
    p(y) = 2^-D exactly. dz/dy = sqrt(pi / 2) exp(erfinv(y)^2)."""

    def forward(self, z, ldj, reverse=False):
        if reverse:
            e = z / math.sqrt(2)
            return torch.erf(e), ldj - (0.5 * math.log(math.pi / 2) + e ** 2).flatten(1).sum(dim=1)
        e = torch.erfinv(z)
        return math.sqrt(2) * e, ldj + (0.5 * math.log(math.pi / 2) + e ** 2).flatten(1).sum(dim=1)


def small_noise_tarflow(sigma=TARFLOW_NOISE_SIGMA):
    """A noise-trained TarFlow on [1, 8, 8] (16 tokens of 4 values), two blocks with every weight perturbed."""
    blocks = [TarFlowBlock(SHAPE, 2, width=16, depth=2, heads=2, flip=flip) for flip in (False, True)]
    return perturb_(ImageFlow([NoiseAugmentation(sigma), *blocks], img_shape=SHAPE), scale=0.1)


def gaussian_model(m, tau, sigma):
    """An ImageFlow whose density of y is exactly N(m, tau^2) per pixel: z = (y - m) / tau (ActNorm, set)."""
    actnorm = ActNorm(1).double()  # before setting the weights: m and log(tau) to float64 precision
    with torch.no_grad():
        actnorm.loc.fill_(-m)
        actnorm.log_scale.fill_(-math.log(tau))
    actnorm.initialized.fill_(True)
    return ImageFlow([NoiseAugmentation(sigma), actnorm], img_shape=SHAPE).double()


# Units

def test_a_density_uniform_on_the_pixel_cube_scores_8_bits_per_dim():
    """p(y) = 2^-D on [-1, 1]^D and ldj's D log(2 / 256): -log2 P / D = 8, plus -log2(1 - 2 margin) for the
    margin that keeps the uniform noise off the bins' borders."""
    model = ImageFlow([NoiseAugmentation(0.05), CubeToGaussian()], img_shape=SHAPE).double().eval()
    x = torch.randint(0, 256, (5, *SHAPE), dtype=torch.int32)
    x[0] = 0
    x[1] = 255
    bpd = model.bits_per_dim(x)
    expected = 8 - math.log2(1 - 2 * model.flows[0].margin)
    # a model without weights works in float32: 1e-6 bits of rounding, far below the margin's 3e-4
    torch.testing.assert_close(bpd, torch.full((5,), expected), rtol=0, atol=1e-5,
                               msg=f"a uniform density must score 8 bits per dimension (+ margin), got {bpd}")


def test_log_density_is_the_model_likelihood_without_the_first_layer_term():
    """bpd = -(first layer's ldj + log p(y)) / (D log 2) for the same noise: log_density is the rest of the model."""
    model = small_noise_tarflow().double().eval()
    x = torch.randint(0, 256, (3, *SHAPE), dtype=torch.int32)
    with noise_source.per_image([1, 2, 3]):
        bpd = model.bits_per_dim(x)
    with noise_source.per_image([1, 2, 3]):
        u = noise_source.rand(x.shape, dtype=F64)
    y, ldj = model.flows[0](x, torch.zeros(3, dtype=F64), noise=u)
    torch.testing.assert_close(bpd, -(ldj + log_density(model, y)) / (math.log(2) * 64), rtol=1e-12, atol=1e-12)


# Score and Tweedie

def test_score_matches_finite_differences_of_the_log_density_of_a_perturbed_tarflow():
    model = small_noise_tarflow().double()
    y = 0.5 * torch.randn(2, *SHAPE, dtype=F64)
    y_before = y.clone()
    s = score(model, y)
    assert s.shape == y.shape and not s.requires_grad and torch.equal(y, y_before)
    assert all(p.grad is None for p in model.parameters()), "the score must not touch the weights' gradients"
    h, D = 1e-5, y[0].numel()
    basis = torch.eye(D, dtype=F64).view(D, *SHAPE)
    for b in range(2):
        with torch.no_grad():
            plus, minus = log_density(model, y[b] + h * basis), log_density(model, y[b] - h * basis)
        fd = ((plus - minus) / (2 * h)).view(SHAPE)
        torch.testing.assert_close(s[b], fd, rtol=1e-6, atol=1e-6, msg="autograd score != finite differences")
    torch.testing.assert_close(score(model, y[1:]), s[1:], rtol=0, atol=1e-12,
                               msg="an image's score must not depend on the other images of the batch")


def test_tweedie_gives_the_posterior_mean_of_gaussian_data_in_closed_form():
    """x ~ N(m, s^2), y = x + sigma eps: p(y) = N(m, s^2 + sigma^2) and E[x | y] = m + s^2 / (s^2 + sigma^2) (y - m).
    A flow with exactly that density of y gives it through its score; a Monte Carlo draw has the posterior's
    mean squared error s^2 sigma^2 / (s^2 + sigma^2)."""
    m, s, sigma = 0.3, 0.4, 0.2
    model = gaussian_model(m, math.sqrt(s ** 2 + sigma ** 2), sigma)
    x = m + s * torch.randn(4000, *SHAPE, dtype=F64)
    y = x + sigma * torch.randn_like(x)
    y_before = y.clone()
    denoised = tweedie_denoise(functools.partial(log_density, model), y, sigma)
    assert not denoised.requires_grad and torch.equal(y, y_before), "y must be left as it was"
    torch.testing.assert_close(denoised, m + s ** 2 / (s ** 2 + sigma ** 2) * (y - m), rtol=0, atol=1e-12)
    torch.testing.assert_close(score(model, y), -(y - m) / (s ** 2 + sigma ** 2), rtol=0, atol=1e-12)
    mse, posterior_var = ((denoised - x) ** 2).mean().item(), s ** 2 * sigma ** 2 / (s ** 2 + sigma ** 2)
    assert abs(mse / posterior_var - 1) < 0.03, f"MSE {mse:.5f}, the posterior variance is {posterior_var:.5f}"
    assert mse < 0.85 * ((y - x) ** 2).mean().item(), "denoising must reduce the error (here by s^2 / (s^2 + sigma^2))"
    torch.testing.assert_close(tweedie_denoise(functools.partial(log_density, model), y, 0), y, rtol=0, atol=0)


@pytest.mark.parametrize("sigma", [-0.1, float("nan"), True, None])
def test_tweedie_rejects_a_bad_sigma_and_a_log_density_of_the_wrong_shape(sigma):
    y = torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match="sigma.* must be a finite number >= 0"):
        tweedie_denoise(lambda v: v.flatten(1).sum(1), y, sigma)
    with pytest.raises(ValueError, match=r"one value per image, shape \[2\], got \[\]"):
        tweedie_denoise(lambda v: v.sum(), y, 0.1)


# Sampling

def test_sample_denoised_is_reproducible_from_a_seed_and_returns_valid_pixels():
    model = small_noise_tarflow().eval()
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    a = sample_denoised(model, 3, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state), "a seeded draw must not move the caller's random state"
    b = sample_denoised(model, 3, sigma=TARFLOW_NOISE_SIGMA, seed=11)
    assert a.dtype == torch.int32 and a.shape == (3, *SHAPE) and 0 <= a.min() and a.max() <= 255
    assert torch.equal(a, b), "the same seed (and the model's own sigma by default) must give the same images"
    noisy = sample_noisy(model, 3, seed=11)
    torch.manual_seed(11)
    z = torch.randn(model.latent_shape(3))
    assert torch.equal(noisy, model.sample(z.shape, z_init=z)), "sample_noisy is the model's plain sample"
    assert (noisy != a).any(), "the Tweedie step must move some pixels"
    assert not torch.equal(sample_denoised(model, 3), sample_denoised(model, 3)), "unseeded draws must differ"


def test_the_gallery_shows_a_noise_trained_model_denoised_from_the_same_latents():
    from flowbook.gallery import sample_grid

    model = small_noise_tarflow().eval()
    assert torch.equal(sample_grid(model, 4, 0.7, seed=3), sample_denoised(model, 4, temperature=0.7, seed=3))


def test_sample_denoised_refuses_bad_arguments_and_needs_a_sigma_for_a_model_without_noise():
    model = small_noise_tarflow()
    with pytest.raises(ValueError, match="num must be an integer >= 1"):
        sample_denoised(model, 0)
    with pytest.raises(ValueError, match="sigma.* must be a finite number >= 0"):
        sample_denoised(model, 2, sigma=-0.05)
    with pytest.raises(ValueError, match="temperature"):
        sample_denoised(model, 2, temperature=-1.0)
    plain = ImageFlow([Dequantization(), TarFlowBlock(SHAPE, 2, width=16, depth=1)], img_shape=SHAPE)
    assert plain.noise_sigma is None and plain.train_loss_name == "bpd"
    with pytest.raises(ValueError, match="not trained on Gaussian-noised images"):
        sample_denoised(plain, 2)


# The model "tarflow_noise": registered, trained through the real trainer, evaluated with uniform noise

def test_tarflow_noise_is_registered_with_tarflow_layers_and_noise_augmentation():
    model = create_flow("tarflow_noise")
    assert "tarflow_noise" in ALL_MODELS and "tarflow_noise" in MODEL_FACTORIES
    assert isinstance(model.flows[0], NoiseAugmentation) and model.noise_sigma == TARFLOW_NOISE_SIGMA == 0.05
    assert num_parameters(model) == num_parameters(create_flow("tarflow")), "the same TarFlow stack"
    assert model.train_loss_name == "noisy_bpd" and model.loss_name == "bpd"
    assert not model.train().gives_bound and model.eval().gives_bound


def test_tarflow_noise_trains_with_the_noisy_loss_and_validates_with_the_uniform_bound(tmp_path):
    from test_train import _fake_mnist

    from flowbook.train import train

    model, summary = train("tarflow_noise", tmp_path, epochs=1, batch_size=8, train_images=16, val_images=8,
                           progress=True, datasets=(_fake_mnist(16), _fake_mnist(8)))
    logged = next(tmp_path.glob("logs/version_*/metrics.csv")).read_text().splitlines()[0].split(",")
    assert "train_noisy_bpd" in logged and "val_bpd" in logged and "train_bpd" not in logged, logged
    assert summary["status"] == "finished" and summary["skipped_steps"] == 0 and len(summary["train_curve"]) == 2
    assert math.isfinite(summary["best_val_bpd_1sample"]), "validation is the uniform-noise bpd"
    assert summary["noise"]["training"] == "gaussian" and summary["noise"]["sigma"] == TARFLOW_NOISE_SIGMA
    assert summary["noise"]["evaluation"] == "uniform" and summary["noise"]["training_loss"] == "noisy_bpd"
    saved = json.loads((tmp_path / "train_summary.json").read_text())
    assert saved["noise"] == summary["noise"] and not model.training


def test_evaluate_on_a_tarflow_noise_checkpoint_reports_the_uniform_bound_and_the_training_noise(tmp_path, mnist):
    from flowbook.checkpoints import load_model, save_checkpoint
    from flowbook.evaluate import EVAL_SEED, bpd_per_image, evaluate_checkpoint, image_seed

    save_checkpoint(perturb_(create_flow("tarflow_noise"), scale=0.02), "tarflow_noise", tmp_path / "tn.pt")
    results = evaluate_checkpoint(tmp_path / "tn.pt", device="cpu", importance_samples=1, eval_images=8,
                                  progress=False, bpd_only=True)
    assert results["noise"]["training"] == "gaussian" and results["noise"]["evaluation"] == "uniform"
    assert json.loads((tmp_path / "tn.json").read_text())["noise"]["sigma"] == TARFLOW_NOISE_SIGMA
    model = load_model(tmp_path / "tn.pt")
    imgs = mnist[2].images[:8]
    bpd = bpd_per_image(model, imgs, importance_samples=1, seed=EVAL_SEED)
    assert torch.isfinite(bpd).all() and abs(bpd.mean().item() - results["test_bpd"]) < 1e-5
    seeds = [image_seed(EVAL_SEED, i) for i in range(8)]
    with torch.no_grad(), model.train().flows[0].using("uniform"), noise_source.per_image(seeds):
        uniform = model.bits_per_dim(imgs).float()
    with torch.no_grad(), noise_source.per_image(seeds):
        gaussian = model.bits_per_dim(imgs).float()
    torch.testing.assert_close(bpd, uniform, rtol=0, atol=1e-6, msg="evaluation must draw uniform noise")
    assert (gaussian - bpd).abs().min() > 1e-5, "training mode draws Gaussian noise: other numbers for every image"
    with pytest.raises(ValueError, match="draws Gaussian noise now"):
        bpd_per_image(model, imgs, importance_samples=1)
    with pytest.raises(ValueError, match="importance sampling needs dequantization noise inside the bins"):
        model.bits_per_dim(imgs, importance_samples=2)

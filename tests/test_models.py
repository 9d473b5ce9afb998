"""ImageFlow and the three MNIST models: parameters, sampling, bpd and the whole-model log-determinant."""
import math

import pytest
import torch
import torch.nn as nn

from conftest import perturb_
from flowbook.layers import (CouplingLayer, Dequantization, GatedConvNet, SqueezeFlow, TarFlowBlock,
                             VariationalDequantization, create_channel_mask, create_checkerboard_mask)
from flowbook.models import (ALL_MODELS, ImageFlow, create_flow, create_multiscale_flow, create_simple_flow,
                             num_parameters)
from test_layers import autograd_logdet

REFERENCE_PARAMETERS = {"simple": 335_128, "vardeq": 379_556, "multiscale": 1_062_090}


@pytest.mark.parametrize("name", REFERENCE_PARAMETERS)
def test_parameter_counts_equal_the_reference(name):
    assert num_parameters(create_flow(name)) == REFERENCE_PARAMETERS[name]


def test_factories_agree_with_create_flow():
    assert num_parameters(create_simple_flow()) == REFERENCE_PARAMETERS["simple"]
    assert num_parameters(create_simple_flow(use_vardeq=True)) == REFERENCE_PARAMETERS["vardeq"]
    assert num_parameters(create_multiscale_flow()) == REFERENCE_PARAMETERS["multiscale"]
    with pytest.raises(ValueError, match="unknown model 'realnvp'"):
        create_flow("realnvp")


@pytest.mark.parametrize("name, latent", [("simple", (1, 28, 28)), ("multiscale", (8, 7, 7))])
def test_sample_returns_int32_images_in_range_on_cpu(name, latent):
    model = perturb_(create_flow(name), scale=0.05)
    assert model.latent_shape(5) == (5, *latent)
    imgs = model.sample(model.latent_shape(5))
    assert imgs.dtype == torch.int32 and imgs.shape == (5, 1, 28, 28) and imgs.device.type == "cpu"
    assert imgs.min() >= 0 and imgs.max() <= 255


def test_sampling_with_the_image_shape_instead_of_the_latent_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"latent has shape \[B, 8, 7, 7\], got \[2, 1, 28, 28\]"):
        create_flow("multiscale").sample([2, 1, 28, 28])


def test_sample_with_z_init_is_deterministic_for_single_scale():
    model = perturb_(create_flow("simple"), scale=0.05)
    z = torch.randn(2, 1, 28, 28)
    assert torch.equal(model.sample(z.shape, z_init=z), model.sample(z.shape, z_init=z))
    with pytest.raises(ValueError, match="z_init"):
        model.sample(z.shape, z_init=torch.zeros(2, 28, 28))


def test_encode_then_sample_reconstructs_the_image():
    model = perturb_(create_flow("simple"), scale=0.05).double()
    imgs = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.int32)
    z, _ = model.encode(imgs)
    assert torch.equal(model.sample(z.shape, z_init=z), imgs)


def test_models_reject_bad_images_with_a_clear_error():
    model = create_flow("simple")
    with pytest.raises(ValueError, match=r"shape \[B, 1, 28, 28\], got float32 \[4, 1, 28, 28\]"):
        model.bits_per_dim(torch.rand(4, 1, 28, 28))
    with pytest.raises(ValueError, match=r"got int32 \[4, 28, 28\]"):
        model.bits_per_dim(torch.zeros(4, 28, 28, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"got int32 \[4, 1, 32, 32\]"):
        model.bits_per_dim(torch.zeros(4, 1, 32, 32, dtype=torch.int32))
    with pytest.raises(ValueError, match="got values in 256..256"):
        model.bits_per_dim(torch.full((4, 1, 28, 28), 256, dtype=torch.int32))


def test_bpd_with_one_importance_sample_is_the_single_sample_value():
    model = perturb_(create_flow("vardeq"), scale=0.05)
    imgs = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.int32)
    torch.manual_seed(1)
    bpd = model.bits_per_dim(imgs, importance_samples=1)
    torch.manual_seed(1)
    ll = model.log_likelihood(imgs)
    torch.testing.assert_close(bpd, -ll / (math.log(2) * 784))


def test_more_importance_samples_never_give_a_higher_bound_in_expectation():
    model = perturb_(create_flow("vardeq"), scale=0.05)
    imgs = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.int32)
    torch.manual_seed(0)
    with torch.no_grad():
        lls = torch.stack([model.log_likelihood(imgs) for _ in range(32)])  # [32, B]
    # The K-sample bound is E[logsumexp of K samples - log K], estimated from disjoint groups of the 32.
    bound = {k: (torch.logsumexp(lls.view(32 // k, k, -1), dim=1) - math.log(k)).mean().item() for k in (1, 4, 16)}
    assert bound[1] <= bound[4] + 1e-6 <= bound[16] + 2e-6, bound
    with torch.no_grad():
        bpd1 = model.bits_per_dim(imgs, 1).mean()
        bpd8 = model.bits_per_dim(imgs, 8).mean()
    assert bpd8 < bpd1 + 0.01, (bpd1, bpd8)


class _LogisticToGaussian(nn.Module):
    """Test-only flow: y -> Phi^-1(sigmoid(y)) maps the logistic density onto N(0, 1)."""

    def forward(self, z, ldj, reverse=False):
        normal = torch.distributions.Normal(0.0, 1.0)
        p = torch.sigmoid(z)
        out = normal.icdf(p)
        log_det = (torch.log(p) + torch.log1p(-p) - normal.log_prob(out)).sum(dim=[1, 2, 3])
        return out, ldj + log_det


def test_uniform_model_of_8bit_pixels_costs_8_bits_per_dimension():
    deq = Dequantization()
    model = ImageFlow([deq, _LogisticToGaussian()])
    imgs = torch.randint(0, 256, (16, 1, 4, 4), dtype=torch.int32)
    bpd = model.bits_per_dim(imgs)
    # Exactly 8 bits, up to the alpha squeeze and the noise margin: -log2(1 - alpha) - log2(1 - 2 margin).
    expected = 8 - math.log2(1 - deq.alpha) - math.log2(1 - 2 * deq.margin)
    torch.testing.assert_close(bpd, torch.full_like(bpd, expected), rtol=0, atol=1e-4)


def _tiny_multiscale():
    def coupling(c, mask):
        return CouplingLayer(GatedConvNet(c, c_hidden=8, num_layers=1), mask, c_in=c)
    return ImageFlow([coupling(1, create_checkerboard_mask(4, 4)), coupling(1, create_checkerboard_mask(4, 4, True)),
                      SqueezeFlow(), coupling(4, create_channel_mask(4)), coupling(4, create_channel_mask(4, True))])


def test_whole_flow_ldj_matches_autograd_jacobian_on_continuous_input():
    model = perturb_(_tiny_multiscale()).double()
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64)

    def run(v):
        ldj = torch.zeros(v.shape[0], dtype=torch.float64)
        for flow in model.flows:
            v, ldj = flow(v, ldj)
        return v, ldj

    torch.testing.assert_close(run(z)[1], autograd_logdet(lambda v: run(v)[0], z), rtol=1e-9, atol=1e-9)


def _tiny_tarflow_body():
    """Two TarFlow blocks on [1, 4, 4] in patches of 2x2 (4 tokens of 4), the second flipped."""
    return [TarFlowBlock((1, 4, 4), 2, width=8, depth=1, flip=flip) for flip in (False, True)]


@pytest.mark.parametrize("body", ["multiscale", "tarflow"])  # the layouts of "multiscale" and "tarflow_vardeq"
def test_whole_model_ldj_matches_autograd_jacobian_of_noise_to_latent(body):
    var_flows = [CouplingLayer(GatedConvNet(2, c_out=2, c_hidden=8, num_layers=1),
                               create_checkerboard_mask(4, 4, invert=(i % 2 == 1)), c_in=1) for i in range(2)]
    layers = _tiny_multiscale().flows if body == "multiscale" else _tiny_tarflow_body()
    model = perturb_(ImageFlow([VariationalDequantization(var_flows), *layers], img_shape=(1, 4, 4))).double()
    imgs = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.int32)
    noise = torch.rand(2, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05

    def run(x, u):
        ldj = torch.zeros(x.shape[0], dtype=torch.float64)
        z, ldj = model.flows[0](x, ldj, noise=u)
        for flow in model.flows[1:]:
            z, ldj = flow(z, ldj)
        return z, ldj

    expected = torch.cat([autograd_logdet(lambda u: run(imgs[b:b + 1], u)[0], noise[b:b + 1]) for b in range(2)])
    torch.testing.assert_close(run(imgs, noise)[1], expected, rtol=1e-9, atol=1e-8)


def test_model_follows_the_device_and_dtype_of_its_parameters():
    model = create_flow("multiscale").double()
    imgs = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.int32)
    assert model.log_likelihood(imgs).dtype == torch.float64
    assert model.sample(model.latent_shape(2)).dtype == torch.int32


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -1.0])
def test_sampling_with_a_bad_temperature_is_a_clear_error(temperature):
    model = create_flow("multiscale")
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        model.sample(model.latent_shape(2), temperature=temperature)


@pytest.mark.parametrize("shape", [(0, 8, 7, 7), 4, (4, 8, 7), (2.0, 8, 7, 7)])
def test_sampling_with_a_bad_shape_is_a_clear_error(shape):
    with pytest.raises(ValueError, match="four positive integers"):
        create_flow("multiscale").sample(shape)


def test_sampling_from_a_non_finite_latent_is_a_clear_error():
    model = create_flow("simple")
    z = torch.zeros(3, 1, 28, 28)
    z[1, 0, 5, 5] = float("nan")
    with pytest.raises(ValueError, match="z_init holds NaN"):
        model.sample(z.shape, z_init=z)
    huge = perturb_(create_flow("simple"), scale=0.5)
    try:
        imgs = huge.sample([4, 1, 28, 28], temperature=1e30)
    except ValueError as err:
        assert "NaN or infinite" in str(err)
    else:
        assert 0 <= imgs.min() and imgs.max() <= 255, "pixels out of 0..255 came back without an error"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_are_refused_rather_than_giving_a_wrong_bpd(dtype):
    model = create_flow("simple").to(dtype)
    imgs = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.int32)
    with pytest.raises(ValueError, match="autocast"):
        model.bits_per_dim(imgs)
    with pytest.raises(ValueError, match="autocast"):
        model.sample([2, 1, 28, 28])


@pytest.mark.parametrize("k", [2.5, 0, True, "8"])
def test_importance_samples_must_be_a_positive_integer(k):
    with pytest.raises(ValueError, match="importance_samples must be an integer"):
        create_flow("simple").bits_per_dim(torch.zeros(1, 1, 28, 28, dtype=torch.int32), k)


def test_glow_flow_has_about_the_multiscale_parameter_count_and_round_trips():
    glow, multiscale = create_flow("glow"), create_flow("multiscale")
    assert abs(num_parameters(glow) / num_parameters(multiscale) - 1) < 0.02
    assert glow.latent_shape(2) == (2, 8, 7, 7)
    perturb_(glow, scale=0.01)
    imgs = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.int32)
    with torch.no_grad():
        z, _ = glow.encode(imgs)
        back = glow.sample(z.shape, z_init=z)  # the split-off half is drawn afresh: compare shapes and range
    assert back.shape == imgs.shape and 0 <= back.min() and back.max() <= 255
    assert torch.isfinite(glow.bits_per_dim(imgs)).all()


def test_tarflow_vardeq_is_the_tarflow_with_the_multiscale_flows_learned_dequantization():
    from flowbook.models import create_tarflow

    vardeq_tar, tar, multiscale = create_flow("tarflow_vardeq"), create_flow("tarflow"), create_flow("multiscale")
    assert isinstance(vardeq_tar.flows[0], VariationalDequantization) and isinstance(tar.flows[0], Dequantization)
    assert (num_parameters(vardeq_tar) - num_parameters(tar) == num_parameters(multiscale.flows[0])
            == num_parameters(vardeq_tar.flows[0])), "only the dequantization layer differs"
    assert [type(f) for f in vardeq_tar.flows[1:]] == [type(f) for f in tar.flows[1:]]
    with pytest.raises(ValueError, match="choose noise_sigma or vardeq"):
        create_tarflow(noise_sigma=0.05, vardeq=True)
    # Fresh, its couplings are the identity: the blocks get the uniform noise (up to the logit's margin), so a
    # stage from the TarFlow's weights starts where the TarFlow ended.
    dequant = vardeq_tar.double().flows[0]
    u0 = torch.rand(2, 1, 28, 28, dtype=torch.float64) * 0.98 + 0.01
    u, _ = dequant.dequant_noise(torch.randint(0, 256, (2, 1, 28, 28)), torch.zeros(2, dtype=torch.float64), noise=u0)
    torch.testing.assert_close(u, u0, rtol=0, atol=dequant.alpha)


def test_latent_shape_does_not_move_the_random_state():
    model = create_flow("multiscale")
    torch.manual_seed(3)
    model.latent_shape(4)  # its first call runs the flow on a zero image, with dequantization noise
    after = torch.rand(5)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(5)), "sampling right after a seed would depend on a cache"


@pytest.mark.parametrize("name", [m for m in ALL_MODELS if m != "flowmatch"])  # an ODE: tests/test_flowmatch.py
def test_encode_with_splits_then_sample_gives_back_every_pixel(name):
    model = perturb_(create_flow(name), scale=0.01).eval()
    imgs = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.int32)
    with torch.no_grad():
        z, ldj, splits = model.encode(imgs, return_splits=True)
        z_plain, _ = model.encode(imgs)
    assert len(splits) == (1 if name in ("multiscale", "glow") else 0)
    assert z.shape == z_plain.shape and ldj.shape == (3,)
    back = model.sample(z.shape, z_init=z, z_splits=splits)
    assert torch.equal(back, imgs), f"{name}: {(back != imgs).sum().item()} pixels differ after encode and decode"


def test_sample_with_splits_of_the_wrong_number_or_batch_is_a_clear_error():
    model = create_flow("multiscale")
    z = torch.zeros(2, 8, 7, 7)
    with pytest.raises(ValueError, match="z_splits must be a list of 1 tensor"):
        model.sample(z.shape, z_init=z, z_splits=[])
    with pytest.raises(ValueError, match=r"z_splits\[0\] must hold 2 finite latents"):
        model.sample(z.shape, z_init=z, z_splits=[torch.zeros(3, 2, 14, 14)])


def test_sample_without_splits_draws_the_same_images_as_before():
    model = perturb_(create_flow("multiscale"), scale=0.01)
    torch.manual_seed(5)
    a = model.sample(model.latent_shape(2), temperature=0.7)
    torch.manual_seed(5)
    z = torch.randn(model.latent_shape(2)) * 0.7
    torch.manual_seed(6)
    b = model.sample(z.shape, z_init=z, temperature=0.7)
    torch.manual_seed(6)
    c = model.sample(z.shape, z_init=z, temperature=0.7, z_splits=None)
    assert a.shape == (2, 1, 28, 28) and torch.equal(b, c)

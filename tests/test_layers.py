"""Every flow layer: exact inverse, and log-determinant equal to log|det| of the autograd Jacobian.

All checks run in float64 on small inputs with weights perturbed away from their zero initialisation.
"""
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from conftest import perturb_
from flowbook import noise as noise_source
from flowbook.layers import (ActNorm, CouplingLayer, Dequantization, GatedConvNet, GlowStep, InvConv1x1,
                             NoiseAugmentation, SplitFlow, SqueezeFlow, VariationalDequantization,
                             create_channel_mask, create_checkerboard_mask)

B = 3


def autograd_logdet(fn, x):
    """[B]: log|det d fn(x_b) / d x_b| for each sample of x [B, ...], fn mapping [1, ...] -> [1, ...]."""
    out = []
    for xb in x:
        jac = jacobian(lambda v: fn(v.unsqueeze(0)).flatten(), xb)
        out.append(torch.linalg.slogdet(jac.reshape(jac.shape[0], -1))[1])
    return torch.stack(out)


def coupling_checkerboard():
    return CouplingLayer(GatedConvNet(1, c_hidden=8, num_layers=2), create_checkerboard_mask(4, 4), c_in=1), (1, 4, 4)


def coupling_checkerboard_inverted():
    mask = create_checkerboard_mask(4, 4, invert=True)
    return CouplingLayer(GatedConvNet(1, c_hidden=8, num_layers=1), mask, c_in=1), (1, 4, 4)


def coupling_channel():
    return CouplingLayer(GatedConvNet(4, c_hidden=8, num_layers=2), create_channel_mask(4), c_in=4), (4, 2, 3)


def coupling_channel_inverted():
    mask = create_channel_mask(4, invert=True)
    return CouplingLayer(GatedConvNet(4, c_hidden=8, num_layers=1), mask, c_in=4), (4, 2, 2)


def squeeze():
    return SqueezeFlow(), (2, 4, 2)


def toy_coupling():
    from flowbook.toy import ToyCoupling
    return ToyCoupling(keep=1, hidden=8), (2,)


def _initialized(actnorm):
    actnorm.initialized.fill_(True)  # keep the perturbed weights: no data-dependent initialisation
    return actnorm


def actnorm():
    return _initialized(ActNorm(3)), (3, 2, 3)


def invconv_lu():
    return InvConv1x1(4, lu=True), (4, 2, 2)


def invconv_plain():
    return InvConv1x1(4, lu=False), (4, 2, 2)


def glow_step():
    step = GlowStep(4, c_hidden=8)
    _initialized(step.flows[0])
    return step, (4, 2, 2)


CONTINUOUS_LAYERS = [coupling_checkerboard, coupling_checkerboard_inverted, coupling_channel,
                     coupling_channel_inverted, squeeze, toy_coupling, actnorm, invconv_lu, invconv_plain, glow_step]


@pytest.fixture(params=CONTINUOUS_LAYERS, ids=lambda f: f.__name__)
def continuous_layer(request):
    layer, shape = request.param()
    return perturb_(layer).double(), shape


def test_layer_reverse_inverts_forward(continuous_layer):
    layer, shape = continuous_layer
    z = torch.randn(B, *shape, dtype=torch.float64)
    ldj0 = torch.randn(B, dtype=torch.float64)
    y, ldj = layer(z, ldj0.clone())
    z_back, ldj_back = layer(y, ldj, reverse=True)
    assert y.dtype == torch.float64 and ldj.shape == (B,)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-12, msg="reverse(forward(z)) != z")
    torch.testing.assert_close(ldj_back, ldj0, rtol=0, atol=1e-12, msg="reverse does not undo forward's ldj")


def test_layer_ldj_matches_autograd_jacobian(continuous_layer):
    layer, shape = continuous_layer
    z = torch.randn(B, *shape, dtype=torch.float64)
    _, ldj = layer(z, torch.zeros(B, dtype=torch.float64))
    expected = autograd_logdet(lambda v: layer(v, torch.zeros(1, dtype=torch.float64))[0], z)
    torch.testing.assert_close(ldj, expected, rtol=1e-9, atol=1e-9, msg="ldj != log|det J| from autograd")


def test_perturbed_coupling_is_not_the_identity():
    layer, shape = coupling_checkerboard()
    z = torch.randn(B, *shape)
    assert torch.equal(layer(z, torch.zeros(B))[0], z), "a fresh coupling layer should be the identity"
    y, ldj = perturb_(layer)(z, torch.zeros(B))
    assert not torch.allclose(y, z) and ldj.abs().min() > 0, "perturbed weights should change z and ldj"


def test_coupling_keeps_masked_half_and_conditions_on_orig_img():
    net = GatedConvNet(c_in=2, c_out=2, c_hidden=8, num_layers=1)
    layer = perturb_(CouplingLayer(net, create_checkerboard_mask(4, 4), c_in=1)).double()
    z = torch.randn(B, 1, 4, 4, dtype=torch.float64)
    cond_a, cond_b = torch.randn(2, B, 1, 4, 4, dtype=torch.float64)
    zero = torch.zeros(B, dtype=torch.float64)
    y_a, ldj_a = layer(z, zero, orig_img=cond_a)
    y_b, _ = layer(z, zero, orig_img=cond_b)
    kept = layer.mask.bool().expand_as(z)
    assert torch.equal(y_a[kept], z[kept]), "the masked half must pass unchanged"
    assert not torch.allclose(y_a, y_b), "the output must depend on orig_img"
    z_back, _ = layer(y_a, ldj_a, reverse=True, orig_img=cond_a)
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-12)
    expected = autograd_logdet(lambda v: layer(v, zero[:1], orig_img=cond_a[:1])[0], z[:1])
    torch.testing.assert_close(ldj_a[:1], expected, rtol=1e-9, atol=1e-9)


def test_masks_are_complementary_and_alternate():
    cb = create_checkerboard_mask(3, 4)
    assert cb.shape == (1, 1, 3, 4) and cb[0, 0, 0, 0] == 0 and cb[0, 0, 0, 1] == 1 and cb[0, 0, 1, 0] == 1
    assert torch.equal(cb + create_checkerboard_mask(3, 4, invert=True), torch.ones(1, 1, 3, 4))
    ch = create_channel_mask(5)
    assert ch.flatten().tolist() == [1, 1, 0, 0, 0]
    assert create_channel_mask(4, invert=True).flatten().tolist() == [0, 0, 1, 1]


def test_squeeze_matches_reference_4x4_example_and_unsqueezes():
    img = torch.arange(1, 17).view(1, 1, 4, 4)
    out, _ = SqueezeFlow()(img, None)
    assert out.permute(0, 2, 3, 1).tolist() == [[[[1, 2, 5, 6], [3, 4, 7, 8]], [[9, 10, 13, 14], [11, 12, 15, 16]]]]
    back, _ = SqueezeFlow()(out, None, reverse=True)
    assert torch.equal(back, img)


def test_squeeze_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even height and width"):
        SqueezeFlow()(torch.zeros(1, 1, 3, 4), torch.zeros(1))


def test_split_adds_in_forward_exactly_what_reverse_subtracts():
    z = torch.randn(B, 4, 3, 3, dtype=torch.float64)
    ldj0 = torch.randn(B, dtype=torch.float64)
    kept, ldj = SplitFlow()(z, ldj0.clone())
    z_split = z[:, 2:]
    expected = ldj0 + torch.distributions.Normal(0.0, 1.0).log_prob(z_split).sum(dim=[1, 2, 3])
    torch.testing.assert_close(ldj, expected, rtol=0, atol=1e-12, msg="split must add log N(z_split)")
    z_back, ldj_back = SplitFlow()(kept, ldj, reverse=True, z_split=z_split)
    assert torch.equal(z_back, z)
    torch.testing.assert_close(ldj_back, ldj0, rtol=0, atol=1e-12)


def test_split_reverse_samples_on_input_device_and_dtype():
    z, _ = SplitFlow()(torch.zeros(2, 3, 2, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                       reverse=True, temperature=0.0)
    assert z.shape == (2, 6, 2, 2) and z.dtype == torch.float64 and torch.all(z == 0)


# Dequantization: the continuous part is the map noise -> y for fixed integer pixels x.

def small_vardeq():
    flows = [CouplingLayer(GatedConvNet(2, c_out=2, c_hidden=8, num_layers=1),
                           create_checkerboard_mask(4, 4, invert=(i % 2 == 1)), c_in=1) for i in range(2)]
    return perturb_(VariationalDequantization(flows)).double()


@pytest.fixture(params=["uniform", "variational"])
def dequant(request):
    return Dequantization().double() if request.param == "uniform" else small_vardeq()


def test_dequantization_ldj_matches_autograd_jacobian_of_noise_to_latent(dequant):
    x = torch.randint(0, 256, (B, 1, 4, 4), dtype=torch.int32)
    x[0, 0, 0, :2] = torch.tensor([0, 255])
    noise = torch.rand(B, 1, 4, 4, dtype=torch.float64) * 0.98 + 0.01
    zero = torch.zeros(B, dtype=torch.float64)
    _, ldj = dequant(x, zero, noise=noise)
    expected = torch.cat([autograd_logdet(lambda u: dequant(x[b:b + 1], zero[:1], noise=u)[0], noise[b:b + 1])
                          for b in range(B)])
    torch.testing.assert_close(ldj, expected, rtol=1e-9, atol=1e-8)


def test_dequantization_reverse_returns_the_integer_image(dequant):
    x = torch.randint(0, 256, (B, 1, 4, 4), dtype=torch.int32)
    y, ldj = dequant(x, torch.zeros(B, dtype=torch.float64))
    back, _ = dequant(y, ldj, reverse=True)
    assert back.dtype == torch.int32 and torch.equal(back, x)


def test_dequantization_reverse_ldj_inverts_the_deterministic_part():
    deq = Dequantization().double()
    x = torch.randint(0, 256, (B, 1, 4, 4), dtype=torch.int32)
    y, ldj = deq(x, torch.zeros(B, dtype=torch.float64))
    _, ldj_back = deq(y, ldj, reverse=True)
    margin_term = 16 * torch.log1p(torch.tensor(-2 * deq.margin, dtype=torch.float64))
    torch.testing.assert_close(ldj_back, margin_term.expand(B), rtol=0, atol=1e-9)


def test_split_refuses_an_odd_number_of_channels_and_a_z_split_of_another_shape():
    with pytest.raises(ValueError, match="even number, got 3"):
        SplitFlow()(torch.randn(2, 3, 4, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="z_split must have the shape of z"):
        SplitFlow()(torch.randn(2, 2, 4, 4), torch.zeros(2), reverse=True, z_split=torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.7, float("nan")])
def test_dequantization_refuses_noise_outside_the_unit_interval(bad):
    """Noise 1.7 would score pixel 10 as pixel 11; NaN would only surface in a later reverse pass."""
    x = torch.full((1, 1, 2, 2), 10, dtype=torch.int32)
    noise = torch.full(x.shape, 0.5)
    noise[0, 0, 0, 0] = bad
    for layer in (Dequantization(), NoiseAugmentation(sigma=0.05).eval()):
        with pytest.raises(ValueError, match="noise"):
            layer(x, torch.zeros(1), noise=noise)


def test_non_finite_values_become_pixels_of_minus_one_for_a_compiled_sampler_to_catch():
    """A compiled sampler skips the finiteness check; NaN and infinities are marked -1 (an eager pass raises)."""
    from flowbook.layers.dequantization import _mark_non_finite

    y = torch.tensor([0.3, float("nan"), float("inf"), -float("inf")])
    x = torch.floor(y).clamp(0, 255).nan_to_num(0).to(torch.int32)
    assert _mark_non_finite(x, y).tolist() == [0, -1, -1, -1]
    with pytest.raises(ValueError, match="NaN or infinite"):
        Dequantization()(torch.full((1, 1, 2, 2), float("inf")), torch.zeros(1), reverse=True)


@pytest.mark.parametrize("extreme", [0.0, 1 - 2 ** -24, 0.5])
def test_dequantization_is_exact_in_float32_for_every_value_and_extreme_noise(extreme):
    x = torch.arange(256, dtype=torch.int32).view(1, 1, 16, 16)
    deq = Dequantization()
    y, ldj = deq(x, torch.zeros(1), noise=torch.full(x.shape, extreme))
    assert y.dtype == torch.float32
    back, _ = deq(y, ldj, reverse=True)
    assert torch.equal(back, x), f"quantize(dequantize(x)) != x for noise {extreme}: {(back != x).sum()} pixels"


def test_variational_dequantization_is_exact_when_its_sigmoid_saturates():
    deq = small_vardeq().float()
    with torch.no_grad():  # huge shifts push the noise flows' sigmoid to exactly 0.0 and 1.0 in float32
        for flow in deq.flows:
            flow.scaling_factor.fill_(3.0)
            flow.network.nn[-1].bias.fill_(40.0)
    x = torch.randint(0, 256, (B, 1, 4, 4), dtype=torch.int32)
    y, ldj = deq(x, torch.zeros(B))
    back, _ = deq(y, ldj, reverse=True)
    assert torch.equal(back, x)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(2, 1, 4, 4), "float32"),
    (torch.randint(0, 256, (2, 4, 4)), r"\[2, 4, 4\]"),
    (torch.full((2, 1, 4, 4), 256), "got values in 256..256"),
    (torch.full((2, 1, 4, 4), -1), "got values in -1..-1"),
])
def test_dequantization_rejects_non_images_with_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        Dequantization()(bad, torch.zeros(2))


@pytest.mark.parametrize("noise", ["random", "zero", "largest below one"])
def test_dequantization_round_trip_is_exact_on_the_whole_mnist_test_set(mnist, noise):
    images = mnist[2].images
    u = {"random": torch.rand(images.shape), "zero": torch.zeros(images.shape),
         "largest below one": torch.full(images.shape, 1 - 2 ** -24)}[noise]
    deq = Dequantization()
    y, ldj = deq(images, torch.zeros(len(images)), noise=u)
    back, _ = deq(y, ldj, reverse=True)
    assert y.dtype == torch.float32
    assert torch.equal(back, images), f"{(back != images).sum()} of {images.numel()} pixels differ"


# Noise augmentation (TarFlow's input layer): pixels to [-1, 1], Gaussian noise in training, uniform in evaluation.

SIGMA = 0.05
EVERY_VALUE = torch.arange(256, dtype=torch.int32).view(1, 1, 16, 16)


def bin_centres(x):
    return (2 * x.to(torch.float64) + 1) / 256 - 1


@pytest.mark.parametrize("u0", [0.0, 1 - 2 ** -24, 0.5, "random"])
def test_noise_augmentation_with_uniform_noise_gives_back_every_pixel_value_in_float32(u0):
    layer = NoiseAugmentation(SIGMA).eval()
    x = EVERY_VALUE.repeat(4, 1, 1, 1)
    u = torch.rand(x.shape) if u0 == "random" else torch.full(x.shape, u0)
    y, ldj = layer(x, torch.zeros(4), noise=u)
    assert y.dtype == torch.float32 and layer.current_noise == "uniform"
    back, ldj_back = layer(y, ldj, reverse=True)
    assert back.dtype == torch.int32 and torch.equal(back, x), f"{(back != x).sum()} pixels differ for noise {u0}"
    margin_term = 256 * math.log(1 - 2 * layer.margin)
    torch.testing.assert_close(ldj_back, torch.full((4,), margin_term), rtol=1e-6, atol=1e-4,
                               msg="reverse must take back the D log(2 / quants) term, and only it")


def test_noise_augmentation_with_gaussian_noise_reverses_to_the_bin_that_y_falls_in():
    layer = NoiseAugmentation(SIGMA).train()
    x = EVERY_VALUE.repeat(8, 1, 1, 1)
    eps = torch.randn(x.shape, dtype=torch.float64)
    zero = torch.zeros(8, dtype=torch.float64)
    centre, _ = layer(x, zero, noise=torch.zeros(x.shape, dtype=torch.float64))
    assert torch.equal(layer(centre, zero, reverse=True)[0], x), "the bin centre (no noise) must give x back"
    inside = eps.clamp(-1, 1) * (0.99 / (256 * SIGMA))  # |sigma eps| < 1 / 256: y stays in x's bin
    assert torch.equal(layer(layer(x, zero, noise=inside)[0], zero, reverse=True)[0], x)
    y, _ = layer(x, zero, noise=eps)
    expected = torch.floor(x + 0.5 + 128 * SIGMA * eps).clamp(0, 255).to(torch.int32)
    assert torch.equal(layer(y, zero, reverse=True)[0], expected), "reverse must give the bin of y, clamped"
    assert (expected != x).float().mean() > 0.5, "sigma = 0.05 is 6.4 grey levels: most pixels leave their bin"


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_noise_augmentation_ldj_is_the_log_determinant_of_x_plus_u_to_y(kind):
    """ldj is log|dy / d(x + u)| = D log(2 / quants) (+ D log(1 - 2 margin) for the uniform density), checked
    against the autograd Jacobian of noise -> y: for Gaussian noise, u = 1/2 + (quants / 2) sigma eps, so the
    map eps -> y has D log(quants sigma / 2) more."""
    layer = NoiseAugmentation(SIGMA).double()
    layer.noise_kind = kind
    x = torch.randint(0, 256, (B, 1, 4, 4), dtype=torch.int32)
    x[0, 0, 0, :2] = torch.tensor([0, 255])
    draw = torch.rand if kind == "uniform" else torch.randn
    noise = draw(B, 1, 4, 4, dtype=torch.float64)
    zero = torch.zeros(B, dtype=torch.float64)
    _, ldj = layer(x, zero, noise=noise)
    from_noise = torch.cat([autograd_logdet(lambda v: layer(x[b:b + 1], zero[:1], noise=v)[0], noise[b:b + 1])
                            for b in range(B)])
    noise_to_u = 0.0 if kind == "uniform" else 16 * math.log(256 * SIGMA / 2)
    torch.testing.assert_close(ldj, from_noise - noise_to_u, rtol=1e-9, atol=1e-8)
    expected = 16 * math.log(2 / 256) + (16 * math.log(1 - 2 * layer.margin) if kind == "uniform" else 0.0)
    torch.testing.assert_close(ldj, torch.full((B,), expected, dtype=torch.float64), rtol=0, atol=1e-10)


def test_noise_augmentation_draws_gaussian_noise_in_training_and_uniform_noise_in_evaluation():
    layer = NoiseAugmentation(SIGMA)
    x = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.int32)
    zero = torch.zeros(64)
    y, _ = layer.train()(x, zero)
    d = y.double() - bin_centres(x)
    assert abs(d.std().item() / SIGMA - 1) < 0.01 and abs(d.mean().item()) < 1e-3, \
        f"train mode: y - y_clean should be N(0, {SIGMA}^2), got mean {d.mean():.2e}, std {d.std():.4f}"
    y, _ = layer.eval()(x, zero)
    d = (y.double() - bin_centres(x)) * 128  # in bins: uniform on (-1/2, 1/2)
    assert d.abs().max() < 0.5, "eval mode: the noise must stay inside the pixel's bin"
    assert abs(d.std().item() * math.sqrt(12) - 1) < 0.01, f"eval mode: uniform noise, got std {d.std():.4f} bins"
    with layer.using("gaussian"):
        assert layer.current_noise == "gaussian" and not layer.gives_bound
        assert ((layer(x, zero)[0].double() - bin_centres(x)) * 128).abs().max() > 1, "gaussian on demand in eval"
    assert layer.current_noise == "uniform" and layer.gives_bound and layer.noise_kind is None
    layer.train().noise_kind = "uniform"
    assert layer.current_noise == "uniform", "noise_kind overrides the mode"


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_noise_augmentation_draws_through_flowbook_noise_so_that_each_image_has_its_seed(kind):
    layer = NoiseAugmentation(SIGMA)
    layer.noise_kind = kind
    x = torch.randint(0, 256, (3, 1, 4, 4), dtype=torch.int32)
    with noise_source.per_image([5, 6, 7]):
        y_batch, _ = layer(x, torch.zeros(3))
    with noise_source.per_image([6]):
        y_alone, _ = layer(x[1:2], torch.zeros(1))
    assert torch.equal(y_batch[1:2], y_alone), "an image's noise must depend on its seed alone"


@pytest.mark.parametrize("sigma", [0, -0.1, float("nan"), float("inf"), True, "0.05"])
def test_noise_augmentation_rejects_a_sigma_that_is_not_positive(sigma):
    with pytest.raises(ValueError, match=r"sigma.* must be a finite number > 0"):
        NoiseAugmentation(sigma)


def test_noise_augmentation_rejects_bad_images_noise_and_non_finite_values_with_clear_errors():
    layer = NoiseAugmentation(SIGMA)
    with pytest.raises(ValueError, match=r"expected integer images.*got float32 \[2, 1, 4, 4\]"):
        layer(torch.rand(2, 1, 4, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="got values in 256..256"):
        layer(torch.full((2, 1, 4, 4), 256), torch.zeros(2))
    x = torch.zeros(2, 1, 4, 4, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"expected noise as a float tensor of shape \[2, 1, 4, 4\]"):
        layer.eval()(x, torch.zeros(2), noise=torch.rand(2, 16))
    with pytest.raises(ValueError, match="NaN or infinite"):
        layer(torch.full((2, 1, 4, 4), float("nan")), torch.zeros(2), reverse=True)
    with pytest.raises(ValueError, match="the noise must be one of"):
        with layer.using("laplace"):
            pass
    layer.noise_kind = "laplace"
    with pytest.raises(ValueError, match="noise_kind must be one of"):
        layer(x, torch.zeros(2))


def test_actnorm_initialises_from_the_first_batch_to_zero_mean_and_unit_variance():
    z = torch.randn(16, 3, 4, 4, dtype=torch.float64) * torch.tensor([0.5, 2.0, 7.0]).view(1, 3, 1, 1) + 3
    layer = ActNorm(3).double()
    y, _ = layer(z, torch.zeros(16, dtype=torch.float64))
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(y.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-5, rtol=0)
    before = [p.clone() for p in layer.parameters()]
    layer(z * 10, torch.zeros(16, dtype=torch.float64))  # a second batch: no new initialisation
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters()))
    probe = ActNorm(3)
    with torch.no_grad():
        probe(torch.zeros(1, 3, 4, 4), torch.zeros(1))  # a shape probe of zeros must not initialise it
    assert not probe.initialized and torch.equal(probe.log_scale, torch.zeros_like(probe.log_scale))


def test_actnorm_refuses_to_initialise_from_too_few_or_non_finite_values():
    with pytest.raises(ValueError, match="at least two values per channel"):
        ActNorm(2)(torch.randn(1, 2, 1, 1), torch.zeros(1))
    bad = torch.randn(4, 2, 3, 3)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        ActNorm(2)(bad, torch.zeros(4))


def _actnorm_on_half(rank, world, init_file, z, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        layer = ActNorm(3).double()
        layer(z.chunk(world)[rank], torch.zeros(len(z) // world, dtype=torch.float64))
        torch.save({k: v for k, v in layer.state_dict().items()}, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_actnorm_initialises_on_two_processes_as_one_process_on_the_whole_batch(tmp_path):
    """Under DDP each process sees half of the global batch; the statistics are gathered, so both start from
    the weights one process would compute from the whole batch (not each from its own half)."""
    z = torch.randn(8, 3, 4, 4, dtype=torch.float64) * torch.tensor([0.5, 2.0, 7.0]).view(1, 3, 1, 1) + 3
    z[4:] += 5  # the halves differ: a per-process initialisation would disagree
    torch.multiprocessing.spawn(_actnorm_on_half, args=(2, tmp_path / "init", z, tmp_path / "state"), nprocs=2)
    whole = ActNorm(3).double()
    whole(z, torch.zeros(8, dtype=torch.float64))
    for rank in range(2):
        state = torch.load(tmp_path / f"state.{rank}", weights_only=True)
        torch.testing.assert_close(state["loc"], whole.loc.detach(), rtol=0, atol=1e-10)
        torch.testing.assert_close(state["log_scale"], whole.log_scale.detach(), rtol=0, atol=1e-10)


def test_invertible_1x1_convolution_stays_in_float32_under_bfloat16_autocast():
    """Its log-determinant is that of the float32 matrix: the matrix applied must be that one too."""
    layer = perturb_(InvConv1x1(4, lu=True), scale=0.3)
    z = torch.randn(2, 4, 3, 3)
    expected, ldj = layer(z, torch.zeros(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ldj_auto = layer(z, torch.zeros(2))
        back, ldj_back = layer(got, ldj_auto, reverse=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(ldj_auto, ldj)
    torch.testing.assert_close(back, z, rtol=1e-5, atol=1e-5)


def test_actnorm_initialisation_survives_saving_and_loading(tmp_path):
    layer = ActNorm(3)
    layer(torch.randn(8, 3, 4, 4) * 5 + 2, torch.zeros(8))
    torch.save(layer.state_dict(), tmp_path / "actnorm.pt")
    reloaded = ActNorm(3)
    reloaded.load_state_dict(torch.load(tmp_path / "actnorm.pt", weights_only=True))
    reloaded(torch.randn(8, 3, 4, 4) * 100, torch.zeros(8))  # its first batch after loading
    for a, b in zip(layer.parameters(), reloaded.parameters()):
        assert torch.equal(a, b), "a reloaded ActNorm initialised itself again"


def test_lu_and_plain_1x1_convolutions_agree_for_the_same_matrix():
    lu = perturb_(InvConv1x1(4, lu=True)).double()
    w, log_det = lu.weight_and_logdet()
    plain = InvConv1x1(4, lu=False).double()
    with torch.no_grad():
        plain.weight.copy_(w)
    torch.testing.assert_close(log_det, torch.linalg.slogdet(w)[1], rtol=1e-10, atol=1e-10)
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    (a, la), (b, lb) = lu(z, torch.zeros(2, dtype=torch.float64)), plain(z, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(la, lb)


def test_glow_step_needs_an_even_number_of_channels():
    with pytest.raises(ValueError, match="even number of channels"):
        GlowStep(3, c_hidden=8)


def test_a_compiled_actnorm_does_not_break_its_graph_once_initialised():
    step = GlowStep(4, c_hidden=8)  # ActNorm inside a larger module, as in a model
    step(torch.randn(8, 4, 4, 4) * 5 + 2, torch.zeros(8))  # the data-dependent initialisation, eagerly
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(torch.randn(8, 4, 4, 4), torch.zeros(8))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    layer = step.flows[0]
    fresh = ActNorm(4)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.is_initialized()
    fresh.load_state_dict(ActNorm(4).state_dict())  # an uninitialised state: the next batch initialises it
    assert not fresh.is_initialized()

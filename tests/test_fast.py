"""The GPU fast path computes what the eager model computes: channels-last, torch.compile, compiled calls.

Compiled code is checked on the CPU (inductor's C++ backend) on a tiny flow with every kind of layer,
with `fallback_random`, so that compiled and eager calls draw the same noise and must agree. The tests at
the end run only where CUDA is available (on a GPU machine: `pytest tests/test_fast.py`).
"""
import copy

import pytest
import torch
import torch._inductor.config as inductor_config

from conftest import perturb_
from flowbook.fast import compiled_calls, speed_up
from flowbook.layers import (CouplingLayer, Dequantization, GatedConvNet, SplitFlow, SqueezeFlow,
                             create_channel_mask, create_checkerboard_mask)
from flowbook.layers.checks import check_images, trusted_images
from flowbook.models import ImageFlow, create_flow

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny_flow(split=True):
    """[B, 1, 4, 4] images; latent [B, 2, 2, 2]: every layer kind of the multi-scale flow, small.
    Without `split`, the latent is [B, 4, 2, 2] and sampling draws all its noise at once."""
    c = 2 if split else 4
    flows = [Dequantization(),
             CouplingLayer(GatedConvNet(1, c_hidden=8, num_layers=1), create_checkerboard_mask(4, 4), c_in=1),
             SqueezeFlow(),
             CouplingLayer(GatedConvNet(4, c_hidden=8, num_layers=1), create_channel_mask(4), c_in=4),
             *([SplitFlow()] if split else []),
             CouplingLayer(GatedConvNet(c, c_hidden=8, num_layers=1), create_channel_mask(c, invert=True), c_in=c)]
    return perturb_(ImageFlow(flows, img_shape=(1, 4, 4)), scale=0.1)


def images(b=6, shape=(1, 4, 4)):
    return torch.randint(0, 256, (b, *shape), dtype=torch.int32)


@pytest.fixture
def same_noise():
    """Compiled code draws random numbers the eager way, so that seeded calls can be compared."""
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True):
        yield
    torch._dynamo.reset()


def _loss_and_grads(model, imgs, seed=1):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(imgs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_channels_last_computes_the_same_and_keeps_the_state_dict():
    eager, imgs = tiny_flow(), images()
    fast = speed_up(copy.deepcopy(eager), channels_last=True)
    conv = fast.flows[1].network.nn[1].net[0].weight  # [8, 8, 3, 3]
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert list(fast.state_dict()) == list(eager.state_dict())
    (la, ga), (lb, gb) = _loss_and_grads(eager, imgs), _loss_and_grads(fast, imgs)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_compiled_training_loss_and_gradients_equal_eager(same_noise):
    eager, imgs = tiny_flow(), images()
    fast = speed_up(copy.deepcopy(eager), channels_last=True, compile="default")
    (la, ga), (lb, gb) = _loss_and_grads(eager, imgs), _loss_and_grads(fast, imgs)
    assert la.item() != 0 and any(g.abs().sum() > 0 for g in ga)
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-5)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    # the value range is still checked, outside the compiled graph
    bad = torch.randint(300, 556, imgs.shape, dtype=torch.int32)
    bad.view(-1)[:2] = torch.tensor([300, 555])
    with pytest.raises(ValueError, match=r"values in 300\.\.555"):
        fast(bad)
    # the state dict is untouched by compiling: it loads into an eager model of the same architecture
    plain = tiny_flow()
    plain.load_state_dict(fast.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), fast.state_dict().values()))


@pytest.mark.parametrize("split", [True, False])
def test_compiled_calls_equal_eager_and_still_check_images(same_noise, split):
    model, imgs = tiny_flow(split).eval(), images()
    log_likelihood, sample = compiled_calls(model, mode="default")
    with torch.no_grad():
        torch.manual_seed(2)
        expected = model.log_likelihood(imgs)
        torch.manual_seed(2)
        got = log_likelihood(imgs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
        shape = model.latent_shape(5)
        torch.manual_seed(3)
        x_eager = model.sample(shape, temperature=0.7)
        torch.manual_seed(3)
        x_fast = sample(shape, temperature=0.7)
    assert x_fast.dtype == torch.int32 and x_fast.shape == (5, 1, 4, 4)
    assert 0 <= x_fast.min() and x_fast.max() <= 255
    if not split:  # the split layer's draw may come first in compiled code: then other noise, other images
        # floor() may round a pixel that sits on a border the other way; nothing more
        assert (x_fast - x_eager).abs().max() <= 1 and (x_fast != x_eager).float().mean() < 0.05
    with pytest.raises(ValueError, match=r"values in 300\.\.300"):
        log_likelihood(torch.full((6, 1, 4, 4), 300, dtype=torch.int32))


def test_compiled_calls_in_their_default_mode_run_on_the_cpu(same_noise):
    """"reduce-overhead" (CUDA graphs on a GPU) falls back to plain compiled code on the CPU."""
    model, imgs = tiny_flow().eval(), images()
    log_likelihood, sample = compiled_calls(model)
    with torch.no_grad():
        torch.manual_seed(4)
        expected = model.log_likelihood(imgs)
        torch.manual_seed(4)
        torch.testing.assert_close(log_likelihood(imgs), expected, rtol=1e-5, atol=1e-4)
    assert sample(model.latent_shape(3)).shape == (3, 1, 4, 4)


def test_the_benchmarks_fixed_batch_loss_of_a_compiled_model_sees_the_eager_noise():
    """`bench --compare` computes each configuration's fixed-batch loss through its own (compiled) code,
    with the noise of fp32 eager: equal losses in float32 (a different draw would differ by far more)."""
    from flowbook.bench import fixed_batch_bpd

    torch._dynamo.reset()
    eager, imgs = tiny_flow(), images(b=32)
    fast = speed_up(copy.deepcopy(eager), channels_last=True, compile="default")
    reference = fixed_batch_bpd(eager, imgs, bf16=False, seed=3)
    assert fixed_batch_bpd(fast, imgs, bf16=False, seed=3) == pytest.approx(reference, abs=1e-5)
    assert fixed_batch_bpd(eager, imgs, bf16=False, seed=4) != pytest.approx(reference, abs=1e-5)
    assert fixed_batch_bpd(fast, imgs, bf16=True, seed=3) == pytest.approx(reference, abs=0.05)
    torch._dynamo.reset()


def test_unknown_compile_mode_is_an_error():
    with pytest.raises(ValueError, match="unknown compile mode 'fastest'"):
        speed_up(tiny_flow(), compile="fastest")
    with pytest.raises(ValueError, match="unknown compile mode"):
        compiled_calls(tiny_flow(), mode="turbo")


def test_trusted_images_skip_only_the_value_range():
    bad = torch.full((2, 1, 4, 4), 256, dtype=torch.int32)
    with pytest.raises(ValueError, match="values in 256..256"):
        check_images(bad)
    with trusted_images():
        check_images(bad)  # the range is the caller's promise here
        with pytest.raises(ValueError, match="float32"):
            check_images(bad.float())
    with pytest.raises(ValueError, match="values in"):
        check_images(bad)  # and the promise ends with the block


@cuda
@pytest.mark.parametrize("name", ["simple", "vardeq", "multiscale"])
def test_cuda_fast_path_matches_eager_bpd(name):
    """On a GPU: channels-last + compile + bf16 autocast give a training loss close to eager fp32 with the
    same weights (different noise: compare means over a large batch), and compiled sampling works."""
    torch.manual_seed(0)
    eager = perturb_(create_flow(name), scale=0.01).cuda()
    fast = speed_up(copy.deepcopy(eager), channels_last=True, compile="default")
    imgs = images(512, (1, 28, 28)).cuda()
    with torch.no_grad():
        ref = eager(imgs)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = fast(imgs)
    assert torch.isfinite(got) and abs(got.item() - ref.item()) < 0.02 * ref.item()
    log_likelihood, sample = compiled_calls(eager.eval())
    x = sample(eager.latent_shape(64))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.int32 and 0 <= x.min() and x.max() <= 255
    with torch.no_grad():
        torch.testing.assert_close(log_likelihood(imgs[:64]).mean(), eager.log_likelihood(imgs[:64]).mean(),
                                   rtol=0.01, atol=0)

"""Transformer flows (TarFlow): patches, the causal mask, the block's inverse, log-determinant and Jacobian
structure in float64 with perturbed weights, the key-value cache, and the "tarflow" model."""
import math

import pytest
import torch
from torch.autograd.functional import jacobian

from conftest import dequantized_logits_by_hand, perturb_
from flowbook.layers import TarFlowBlock, causal_mask, patchify, unpatchify
from flowbook.models import create_flow, num_parameters
from flowbook.prior import gaussian_log_prob
from test_layers import autograd_logdet

B = 2
F64 = torch.float64


def small_block(patch_size=2, flip=False, shape=(1, 8, 8)):
    """A block on small images (16 tokens of 4 values for patch 2, 4 of 16 for patch 4), every weight perturbed:
    the output projection starts at zero, which would make the block the identity."""
    return perturb_(TarFlowBlock(shape, patch_size, width=16, depth=2, heads=2, flip=flip)).double()


BLOCKS = [dict(patch_size=2, flip=False), dict(patch_size=2, flip=True), dict(patch_size=4, flip=False),
          dict(patch_size=4, flip=True, shape=(2, 8, 4))]


@pytest.fixture(params=BLOCKS, ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
def block(request):
    return small_block(**request.param)


def test_patchify_orders_patches_row_by_row_and_unpatchify_inverts_it():
    x = torch.randn(2, 3, 4, 6)
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    assert torch.equal(tokens[:, 0], x[:, :, 0:2, 0:2].flatten(1)), "token 0 is the top-left patch"
    assert torch.equal(tokens[:, 1], x[:, :, 0:2, 2:4].flatten(1)), "token 1 is its right neighbour"
    assert torch.equal(tokens[:, 3], x[:, :, 2:4, 0:2].flatten(1)), "token 3 starts the second row of patches"
    assert torch.equal(unpatchify(tokens, 2, (3, 4, 6)), x)


@pytest.mark.parametrize("bad, message", [
    ((torch.zeros(2, 1, 6, 8), 4), r"divides the height and width.*\[2, 1, 6, 8\]"),
    ((torch.zeros(2, 6, 8), 2), r"expects images \[B, C, H, W\], got float32 \[2, 6, 8\]"),
    ((torch.zeros(2, 1, 8, 8), 0), "positive integer"),
])
def test_patchify_rejects_bad_shapes_with_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        patchify(*bad)
    with pytest.raises(ValueError, match=r"expected tokens \[B, 4, 16\]"):
        unpatchify(torch.zeros(2, 4, 4), 4, (1, 8, 8))


def test_causal_mask_lets_token_i_attend_to_tokens_up_to_i():
    mask = causal_mask(4)
    assert mask.dtype == torch.bool and mask.shape == (4, 4)
    assert mask.tolist() == [[j <= i for j in range(4)] for i in range(4)]


def test_a_fresh_block_is_the_identity():
    block = TarFlowBlock((1, 8, 8), 2, width=16, depth=1)
    z = torch.randn(B, 1, 8, 8)
    y, ldj = block(z, torch.zeros(B))
    assert torch.equal(y, z) and torch.equal(ldj, torch.zeros(B)), "a new block must start as the identity"


@pytest.mark.parametrize("kv_cache", [True, False], ids=["kv-cache", "plain"])
def test_tarflow_reverse_inverts_forward(block, kv_cache):
    z = torch.randn(B, *block.img_shape, dtype=F64)
    ldj0 = torch.randn(B, dtype=F64)
    with torch.no_grad():
        y, ldj = block(z, ldj0.clone())
        z_back, ldj_back = block(y, ldj, reverse=True, kv_cache=kv_cache)
    assert not torch.allclose(y, z), "the perturbed block should change z"
    torch.testing.assert_close(z_back, z, rtol=0, atol=1e-12, msg="reverse(forward(z)) != z")
    torch.testing.assert_close(ldj_back, ldj0, rtol=0, atol=1e-12, msg="reverse does not undo forward's ldj")


def test_kv_cache_reverse_equals_plain_reverse(block):
    z = torch.randn(3, *block.img_shape, dtype=F64)
    zero = torch.zeros(3, dtype=F64)
    with torch.no_grad():
        cached, ldj_cached = block(z, zero, reverse=True, kv_cache=True)
        plain, ldj_plain = block(z, zero, reverse=True, kv_cache=False)
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(ldj_cached, ldj_plain, rtol=0, atol=1e-12)
    block.float()
    with torch.no_grad():  # and in float32, the dtype of training and sampling
        a, _ = block(z.float(), zero.float(), reverse=True, kv_cache=True)
        b, _ = block(z.float(), zero.float(), reverse=True, kv_cache=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_tarflow_ldj_matches_autograd_jacobian(block, reverse):
    z = torch.randn(B, *block.img_shape, dtype=F64)
    zero = torch.zeros(B, dtype=F64)
    _, ldj = block(z, zero, reverse=reverse)
    expected = autograd_logdet(lambda v: block(v, zero[:1], reverse=reverse)[0], z)
    torch.testing.assert_close(ldj, expected, rtol=1e-9, atol=1e-9, msg="ldj != log|det J| from autograd")


def test_tarflow_jacobian_is_block_lower_triangular_with_diagonal_blocks_in_token_order(block):
    """Token i of z depends on token i of x elementwise and on tokens < i only: a missing shift by one puts
    a full block on the diagonal, a mask that is not causal puts blocks above it."""
    T, D = block.num_tokens, block.token_dim
    x = torch.randn(1, T, D, dtype=F64)  # tokens in the block's own order (flipped where flip=True)

    def tokens_out(v):
        return block._tokens(block(block._image(v), torch.zeros(1, dtype=F64))[0])

    jac = jacobian(tokens_out, x).reshape(T, D, T, D)  # [i, d, j, e] = dz_{i,d} / dx_{j,e}
    _, s = block.shift_and_log_scale(x)
    for i in range(T):
        for j in range(T):
            blk = jac[i, :, j, :]
            if j > i:
                assert torch.all(blk == 0), f"token {i} depends on the later token {j}"
            elif j == i:
                torch.testing.assert_close(blk, torch.diag(torch.exp(s[0, i])), rtol=1e-12, atol=1e-12,
                                           msg=f"token {i}'s own block is not diag(exp(s))")
    below = torch.stack([jac[i, :, j, :].abs().max() for i in range(T) for j in range(i)])
    assert below.min() > 0, "some token does not depend on an earlier one: the transformer should see them all"


def test_flip_reverses_the_order_in_which_tokens_condition_each_other():
    plain, flipped = small_block(flip=False), small_block(flip=True)
    z = torch.randn(1, 1, 8, 8, dtype=F64)
    zero = torch.zeros(1, dtype=F64)
    # The first patch in image order (top left) is the first token without flip and the last with it: without
    # flip it depends on nothing else, with flip it depends on every other patch.
    for blk, depends in ((plain, False), (flipped, True)):
        jac = jacobian(lambda v: patchify(blk(v, zero)[0], 2)[0, 0], z)  # [4, 1, 1, 8, 8]
        others = patchify(jac.reshape(4, 1, 8, 8), 2)[:, 1:]  # d token 0 / d the other tokens
        assert (others.abs().max() > 0) == depends


def test_log_scales_are_bounded_by_exp_of_the_scaling_factor():
    """s = tanh(s_raw / e^c) e^c: a huge raw log-scale gives s = e^c in every value of every token, so the
    block's ldj is n d e^c (and -n d e^c for a huge negative one with c = log 2)."""
    block = TarFlowBlock((1, 8, 8), patch_size=2, width=16, depth=1).double()
    n, d = block.num_tokens, block.token_dim
    x = torch.randn(B, 1, 8, 8, dtype=F64)
    with torch.no_grad():
        block.proj_out.bias[d:] = 100.0  # the log-scale half; the shifts stay 0
    _, ldj = block(x, torch.zeros(B, dtype=F64))
    torch.testing.assert_close(ldj, torch.full((B,), n * d * 1.0, dtype=F64))
    with torch.no_grad():
        block.proj_out.bias[d:] = -100.0
        block.scaling_factor.fill_(math.log(2))
    _, ldj = block(x, torch.zeros(B, dtype=F64))
    torch.testing.assert_close(ldj, torch.full((B,), -n * d * 2.0, dtype=F64))


def test_block_rejects_a_bad_patch_size_or_input_shape():
    for bad in (3, 0, True, 2.0):
        with pytest.raises(ValueError, match=r"patch size must be a positive integer that divides.*\[B, 1, 28, 28\]"
                                             r".*divisor of 28"):
            TarFlowBlock((1, 28, 28), patch_size=bad)
    for name, bad in (("width", 0), ("depth", 1.5), ("heads", 0), ("heads", True)):
        with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
            TarFlowBlock((1, 8, 8), patch_size=2, **{name: bad})
    with pytest.raises(ValueError, match="divisible by the number of heads"):
        TarFlowBlock((1, 8, 8), patch_size=2, width=30, heads=4)
    block = TarFlowBlock((1, 8, 8), patch_size=2, width=16)
    with pytest.raises(ValueError, match=r"expects z of shape \[B, 1, 8, 8\], got \[2, 1, 8, 4\]"):
        block(torch.zeros(2, 1, 8, 4), torch.zeros(2))
    with pytest.raises(ValueError, match=r"float tensor of shape \[B, C, H, W\]"):
        block(torch.zeros(2, 64), torch.zeros(2))


def test_tarflow_keeps_the_ldj_in_float32_under_bfloat16_autocast():
    block = perturb_(TarFlowBlock((1, 8, 8), 2, width=16, depth=1), scale=0.05)
    z = torch.randn(B, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, ldj = block(z, torch.zeros(B))
        _, s = block.shift_and_log_scale(block._tokens(z))  # the network's log-scales under autocast
    exact_y, exact_ldj = block(z, torch.zeros(B))
    assert y.dtype == torch.float32 and ldj.dtype == torch.float32 and s.dtype == torch.float32
    # the sum is taken in float32 (a bfloat16 sum of 64 terms would be off by about 1e-2), of log-scales that
    # came from a bfloat16 network, so only close to the float32 model's
    torch.testing.assert_close(ldj, s.double().flatten(1).sum(1).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(ldj, exact_ldj, rtol=0.05, atol=0.05)


# The model

def test_untrained_tarflow_bpd_on_real_images_is_dequantization_under_the_normal_prior(mnist):
    """A new model is dequantization followed by identities, so its bpd is that of the logits under N(0, I),
    log 256 per dimension included; the numbers are checked against a direct computation."""
    model = create_flow("tarflow")
    imgs = mnist[2].images[:8]
    torch.manual_seed(0)
    bpd = model.bits_per_dim(imgs)
    torch.manual_seed(0)  # the same noise, drawn as Dequantization draws it
    dequant = model.flows[0]
    y, ldj = dequantized_logits_by_hand(imgs, torch.rand(imgs.shape, dtype=torch.float64), dequant.alpha,
                                        dequant.margin)
    expected = -(gaussian_log_prob(y) + ldj) / (math.log(2) * 784)
    torch.testing.assert_close(bpd, expected.float(), rtol=1e-6, atol=1e-5)
    assert bpd.shape == (8,) and torch.isfinite(bpd).all()
    # Mostly black digits: logits near logit(0.5 / 256) = -6.2 cost about 0.5 * 6.2^2 / log 2 = 28 bits.
    assert 20 < bpd.min() and bpd.max() < 35, bpd


def test_tarflow_model_encodes_and_samples_back_every_pixel_and_has_gradients():
    model = perturb_(create_flow("tarflow"), scale=0.02)
    assert model.latent_shape(3) == (3, 1, 28, 28)
    imgs = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.int32)
    with torch.no_grad():
        z, _ = model.encode(imgs)
    assert torch.equal(model.sample(z.shape, z_init=z), imgs), "encode then sample(z_init=z) must give the images"
    loss = model(imgs)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
               or p.grad.abs().max() == 0]
    assert torch.isfinite(loss) and not missing, f"parameters without a finite gradient: {missing}"
    assert num_parameters(model) == 1_638_080, "the docstring of create_tarflow states the parameter count"


def test_tarflow_is_registered_and_saves_and_loads(tmp_path):
    from flowbook.checkpoints import load_model, save_checkpoint

    model = perturb_(create_flow("tarflow"), scale=0.02)
    save_checkpoint(model, "tarflow", tmp_path / "tarflow.pt")
    loaded = load_model(tmp_path / "tarflow.pt", arch="tarflow")
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
    imgs = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.int32)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.log_likelihood(imgs)
        torch.manual_seed(0)
        b = loaded.log_likelihood(imgs)
    assert torch.equal(a, b), "a reloaded model computes other numbers"

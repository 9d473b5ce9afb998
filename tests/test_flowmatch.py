"""Continuous-time flows: the ODE log-determinant, Hutchinson's estimator, the flow-matching loss and model."""
import math

import pytest
import torch
import torch.nn as nn

from conftest import dequantized_logits_by_hand, perturb_
from test_layers import autograd_logdet
from flowbook.flowmatch import FlowMatchingModel, LinearPath
from flowbook.models import create_flow
from flowbook.ode import divergence_exact, divergence_hutchinson, draw_probe, integrate
from flowbook.unet import VelocityUNet


class LinearField(nn.Module):
    """v(x, t) = A x on [B, D]."""

    def __init__(self, a):
        super().__init__()
        self.a = nn.Parameter(a)

    def forward(self, x, t):
        return x @ self.a.T


def small_model(seed=0):
    net = VelocityUNet(c_in=1, channels=(8, 8, 8), c_emb=16)
    return perturb_(FlowMatchingModel(net=net, img_shape=(1, 12, 12)), scale=0.05, seed=seed)


def small_images(b=3, seed=0):
    return torch.randint(0, 256, (b, 1, 12, 12), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def test_ode_log_determinant_of_a_linear_field_is_t_trace_a():
    """dz/dt = A z for time T: z(T) = exp(TA) z(0) and log det = T tr A (the integral of div v = tr A)."""
    a = torch.randn(3, 3, dtype=torch.float64) * 0.5
    x = torch.randn(4, 3, dtype=torch.float64)
    z, logdet = integrate(LinearField(a), x, 0.0, 0.7, divergence="exact", rtol=1e-9, atol=1e-9)
    assert torch.allclose(z, x @ torch.linalg.matrix_exp(0.7 * a).T, atol=1e-7)
    assert torch.allclose(logdet, torch.full((4,), 0.7 * a.trace().item(), dtype=torch.float64), atol=1e-7)
    # and as the flow's ldj: from t = 1 back to 0, a(0) = -int_0^1 tr A dt
    _, back = integrate(LinearField(a), x, 1.0, 0.0, divergence="exact", rtol=1e-9, atol=1e-9)
    assert torch.allclose(back, torch.full((4,), -a.trace().item(), dtype=torch.float64), atol=1e-7)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_ode_hutchinson_uses_one_probe_per_point_for_the_whole_solve(probe):
    """For v = A x the estimate of div v is eps^T A eps at every time, so a solve that draws its probe once
    gives exactly T eps^T A eps (a probe drawn anew at each evaluation would not)."""
    a = torch.randn(3, 3, dtype=torch.float64) * 0.5
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.manual_seed(5)
    eps = draw_probe(x, probe)
    torch.manual_seed(5)
    _, est = integrate(LinearField(a), x, 0.0, 0.7, divergence="hutchinson", probe=probe, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(est, 0.7 * torch.einsum("bi,ij,bj->b", eps, a, eps), rtol=0, atol=1e-9)
    assert not torch.allclose(est, torch.full_like(est, 0.7 * a.trace().item())), "an estimate, not the trace"


def test_fixed_step_methods_are_torchdiffeqs_fixed_grid_solvers():
    from torchdiffeq._impl.odeint import SOLVERS
    from torchdiffeq._impl.solvers import FixedGridODESolver

    from flowbook.ode import FIXED_STEP_METHODS

    assert set(FIXED_STEP_METHODS) == {name for name, solver in SOLVERS.items() if issubclass(solver, FixedGridODESolver)}


def test_ode_log_determinant_of_a_nonlinear_field_equals_the_autograd_jacobian():
    """The flow f: x(1) -> x(0) of a perturbed 2-D field (rk4, fine steps): a(0) from the exact divergence
    equals log|det df/dx| by autograd, and toy_cnf.log_prob adds the prior to it."""
    from flowbook import toy_cnf
    from flowbook.prior import gaussian_log_prob

    field = perturb_(toy_cnf.ToyVelocity(hidden=16).double(), scale=0.3)
    x = torch.randn(3, 2, dtype=torch.float64)
    z, a = integrate(field, x, 1.0, 0.0, divergence="exact", method="rk4", steps=200)
    expected = autograd_logdet(lambda v: integrate(field, v, 1.0, 0.0, method="rk4", steps=200), x)
    assert a.abs().min() > 1e-2, "a field that changes volume"
    torch.testing.assert_close(a, expected, rtol=1e-8, atol=1e-8)
    lp = toy_cnf.log_prob(field, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lp, gaussian_log_prob(z) + expected, rtol=1e-6, atol=1e-6)


def test_divergence_through_the_velocity_unet_is_the_trace_of_each_images_jacobian():
    """The image network (perturbed, float64, 8x8 images, 16 channels so that the time matters: see the next
    test): the exact divergence, from one backward pass per pixel over the whole batch, is the trace of each
    image's own Jacobian, and Hutchinson's estimates average to it. (Its integral along a solve is checked on
    the 2-D field above: the sinusoidal time embedding of an untrained network oscillates in t too fast for a
    fixed-step comparison here.)"""
    net = perturb_(VelocityUNet(c_in=1, channels=(16, 16, 16), c_emb=16), scale=0.05).double()
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    div = divergence_exact(net(x, t), x)
    traces = torch.stack([torch.autograd.functional.jacobian(
        lambda v: net(v.view(1, 1, 8, 8), t[b:b + 1]).flatten(), x[b].detach().flatten()).trace() for b in range(2)])
    assert traces.abs().min() > 1e-2
    torch.testing.assert_close(div, traces, rtol=1e-10, atol=1e-10)
    many = x.detach()[:1].repeat(2000, 1, 1, 1).requires_grad_(True)
    est = divergence_hutchinson(net(many, t[:1].expand(2000)), many, draw_probe(many))
    assert abs(est.mean() - traces[0]) < 4 * est.std() / math.sqrt(2000)


def test_gradient_through_the_solver_reaches_the_field():
    """Maximum likelihood backpropagates through the solve: for v = A x, a(0) = -tr A per point, so the
    gradient of its sum over 4 points with respect to A is -4 I."""
    field = LinearField(torch.randn(3, 3, dtype=torch.float64) * 0.5)
    x = torch.randn(4, 3, dtype=torch.float64)
    _, back = integrate(field, x, 1.0, 0.0, divergence="exact", create_graph=True, rtol=1e-9, atol=1e-9)
    back.sum().backward()
    torch.testing.assert_close(field.a.grad, -4 * torch.eye(3, dtype=torch.float64), rtol=0, atol=1e-7)


def test_velocity_unet_treats_each_image_alone_and_uses_its_time():
    """(16 channels: with 8, each of group norm's 8 groups is one channel, and the norm after the time is
    added removes it, a per-channel constant, entirely.)"""
    net = perturb_(VelocityUNet(c_in=1, channels=(16, 16, 16), c_emb=16), scale=0.05).double().eval()
    x = torch.randn(3, 1, 12, 12, dtype=torch.float64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    torch.testing.assert_close(net(x, t)[:1], net(x[:1], t[:1]), rtol=0, atol=1e-10)  # no batch statistics
    assert (net(x, torch.full_like(t, 0.2)) - net(x, torch.full_like(t, 0.8))).abs().max() > 1e-3
    torch.testing.assert_close(net(x, torch.tensor(0.3, dtype=torch.float64)), net(x, torch.full_like(t, 0.3)))
    fresh = VelocityUNet(c_in=1, channels=(8, 8, 8), c_emb=16)
    assert torch.equal(fresh(x.float(), t.float()), torch.zeros_like(x.float())), "a new field is v = 0"


def test_velocity_unet_in_float64_is_smooth_in_time():
    """A float64 solve at a tight tolerance needs v to be float64-accurate in t too: the derivative in t by
    central differences agrees for steps of 1e-4 and 1e-7 (with t rounded to float32, the small step sees noise)."""
    net = perturb_(VelocityUNet(c_in=1, channels=(16, 16, 16), c_emb=16), scale=0.05).double().eval()
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    with torch.no_grad():
        slope = {h: (net(x, t + h) - net(x, t - h)) / (2 * h) for h in (1e-4, 1e-7)}
    torch.testing.assert_close(slope[1e-7], slope[1e-4], rtol=1e-3, atol=1e-3 * slope[1e-4].abs().max().item())


def test_ode_and_flowmatch_refuse_bad_options():
    x = torch.randn(2, 3)
    field = LinearField(torch.eye(3))
    with pytest.raises(ValueError, match="unknown divergence"):
        integrate(field, x, 0.0, 1.0, divergence="trace")
    for steps in (0, True, 2.5):
        with pytest.raises(ValueError, match="steps must be an integer"):
            integrate(field, x, 0.0, 1.0, steps=steps)
    with pytest.raises(ValueError, match="unknown probe"):
        draw_probe(x, "uniform")
    for method in ("rk4", "euler", "midpoint"):  # torchdiffeq alone would take one step from t0 to t1
        with pytest.raises(ValueError, match="needs steps"):
            integrate(field, x, 0.0, 1.0, method=method)
    with pytest.raises(ValueError, match="is adaptive"):
        integrate(field, x, 0.0, 1.0, method="bosh3", steps=10)
    model = small_model()
    with pytest.raises(ValueError, match="bfloat16"):
        small_model().bfloat16().bits_per_dim(small_images())
    with pytest.raises(ValueError, match="bfloat16"):
        small_model().bfloat16().sample(model.latent_shape(1))
    with pytest.raises(ValueError, match="splits nothing off"):
        model.sample(model.latent_shape(1), z_splits=[torch.zeros(1)])
    with pytest.raises(ValueError, match="must be finite"):
        model.sample(model.latent_shape(1), z_init=torch.full(model.latent_shape(1), float("nan")))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="z holds NaN or infinite values"):
            model.decode(torch.full(model.latent_shape(1), bad))
    with pytest.raises(ValueError, match=r"expected z of shape \[B, 1, 12, 12\], got \[1, 1, 12, 11\]"):
        model.decode(torch.zeros(1, 1, 12, 11))
    with pytest.raises(ValueError, match=r"expected z_init of shape \[B, 1, 12, 12\]"):
        model.sample(model.latent_shape(1), z_init=torch.zeros(1, 1, 11, 12))


def test_exact_divergence_is_the_trace_of_the_autograd_jacobian():
    net = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    div = divergence_exact(net(x), x)
    jac = torch.stack([torch.autograd.functional.jacobian(net, xb) for xb in x.detach()])
    assert torch.allclose(div, jac.diagonal(dim1=1, dim2=2).sum(-1), atol=1e-10)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_estimate_is_unbiased(probe):
    """The mean of many probes is within 4 standard errors of the exact trace (a biased estimator, e.g.
    eps^T J eps / D or a probe without unit variance, fails this)."""
    net = perturb_(nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 6)).double(), scale=0.3)
    x = torch.randn(1, 6, dtype=torch.float64).repeat(4000, 1).requires_grad_(True)
    v = net(x)
    exact = divergence_exact(v, x)[0]
    est = divergence_hutchinson(v, x, draw_probe(x, probe))
    stderr = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - exact) < 4 * stderr, (est.mean().item(), exact.item(), stderr.item())
    assert est.std() > 0  # a real estimate, not the exact trace


def test_rademacher_probes_have_lower_variance_than_gaussian_ones():
    net = perturb_(nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 6)).double(), scale=0.3)
    x = torch.randn(1, 6, dtype=torch.float64).repeat(4000, 1).requires_grad_(True)
    var = {p: divergence_hutchinson(net(x), x, draw_probe(x, p)).var() for p in ("rademacher", "gaussian")}
    assert var["rademacher"] < var["gaussian"]


def test_flow_matching_loss_is_zero_for_the_true_velocity_of_a_linear_path():
    """x1 = x0 + c for a fixed shift c: every path is a straight line with velocity c, so v = c has zero
    loss and any other constant does not."""
    path = LinearPath()
    x0 = torch.randn(64, 2, dtype=torch.float64)
    c = torch.tensor([1.5, -0.5], dtype=torch.float64)
    assert path.loss(lambda x, t: c.expand_as(x), x0 + c, x0=x0) == 0
    assert path.loss(lambda x, t: -c.expand_as(x), x0 + c, x0=x0) > 1
    xt, ut = path.interpolate(x0, x0 + c, torch.zeros(64))
    assert torch.equal(xt, x0) and torch.allclose(ut, c.expand_as(x0))


def test_flowmatch_model_bpd_is_finite_and_every_parameter_gets_a_gradient():
    model = small_model()
    imgs = small_images()
    loss = model(imgs)
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters()
               if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().max() == 0]
    assert not missing, f"parameters without a finite, non-zero gradient: {missing}"
    bpd = model.bits_per_dim(imgs, rtol=1e-4, atol=1e-4)
    assert bpd.shape == (3,) and torch.isfinite(bpd).all()


def test_flowmatch_bpd_counts_the_log_256_term():
    """An untrained network (v = 0) leaves z = x1 = logits / 4 and an ODE log-determinant of 0: the bpd is
    then the dequantization's terms (log 256 per pixel included) and a Gaussian on x1."""
    net = VelocityUNet(c_in=1, channels=(8, 8, 8), c_emb=16)  # zero-initialised output: v = 0
    model = FlowMatchingModel(net=net, img_shape=(1, 12, 12))
    imgs = small_images()
    torch.manual_seed(1)
    got = model.bits_per_dim(imgs)
    torch.manual_seed(1)  # the same noise, drawn as Dequantization draws it
    y, ldj = dequantized_logits_by_hand(imgs, torch.rand(imgs.shape, dtype=torch.float64), model.dequant.alpha,
                                        model.dequant.margin)
    x1, ldj = y / model.data_scale, ldj - 144 * math.log(model.data_scale)
    expected = -(-0.5 * (x1 ** 2 + math.log(2 * math.pi)).flatten(1).sum(1) + ldj) / (math.log(2) * 144)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


def test_ode_log_determinant_with_hutchinson_is_unbiased_for_the_exact_one():
    """Along a nonlinear field, the solve with one Hutchinson probe per point averages to the exact solve."""
    from flowbook.toy_cnf import ToyVelocity

    field = perturb_(ToyVelocity(hidden=16).double(), scale=0.3)
    x = torch.randn(1, 2, dtype=torch.float64)
    _, exact = integrate(field, x, 1.0, 0.0, divergence="exact", rtol=1e-7, atol=1e-7)
    _, est = integrate(field, x.repeat(2000, 1), 1.0, 0.0, divergence="hutchinson", rtol=1e-7, atol=1e-7)
    assert est.std() > 1e-3, "one probe per point must give a spread of estimates"
    assert abs(est.mean() - exact[0]) < 4 * est.std() / math.sqrt(2000)


def test_flowmatch_encode_adds_the_dequantization_the_scaling_and_the_ode_terms():
    """encode's ldj = chapter 2's dequantization terms - D log(data_scale) + a(0), each computed here on its
    own (exact divergence, a few rk4 steps, a perturbed network so that a(0) is not zero)."""
    from flowbook.layers import Dequantization

    model = small_model().double()
    imgs = small_images()
    torch.manual_seed(3)
    z, ldj = model.encode(imgs, divergence="exact", method="rk4", steps=3)
    torch.manual_seed(3)
    y, ldj_deq = Dequantization()(imgs, torch.zeros(3, dtype=torch.float64))
    z_ode, a = integrate(model.net, y / 4, 1.0, 0.0, divergence="exact", method="rk4", steps=3)
    assert model.data_scale == 4 and a.abs().min() > 1e-3
    torch.testing.assert_close(z, z_ode)
    torch.testing.assert_close(ldj, ldj_deq - 144 * math.log(4) + a)


def test_flowmatch_bpd_of_an_image_depends_on_its_seed_not_its_batch():
    """With per-image seeds (as in an evaluation) an image draws the same noise and probe in any batch: with
    fixed steps its bpd is the same alone or among others; the adaptive solver, whose steps the whole batch
    shares, agrees within its tolerance."""
    from flowbook import noise

    model = small_model().double()
    imgs = small_images()
    alone = {}
    for name, solver, tol in (("fixed", dict(steps=6), 1e-12), ("adaptive", dict(rtol=1e-6, atol=1e-6), 1e-3)):
        with noise.per_image([11, 12, 13]):
            batch = model.bits_per_dim(imgs, **solver)
        with noise.per_image([12]):
            alone[name] = model.bits_per_dim(imgs[1:2], **solver)
        torch.testing.assert_close(batch[1:2], alone[name], rtol=0, atol=tol)
    with noise.per_image([13]):
        other = model.bits_per_dim(imgs[1:2], steps=6)
    assert not torch.allclose(other, alone["fixed"], rtol=0, atol=1e-6), "another seed draws other noise"


def test_flowmatch_refuses_importance_sampling_over_estimates():
    for bad in (8, 1.0, True):
        with pytest.raises(ValueError, match="importance_samples must be 1"):
            small_model().bits_per_dim(small_images(), importance_samples=bad)


def test_flowmatch_encode_then_decode_returns_the_images():
    model = small_model().double()
    imgs = small_images()
    z, _ = model.encode(imgs, rtol=1e-8, atol=1e-8)
    assert torch.equal(model.decode(z, rtol=1e-8, atol=1e-8), imgs)
    # in the continuous space, not only after rounding to pixels: the solve back lands on x1 within the tolerance
    torch.manual_seed(0)
    x1, _ = model.to_data_space(imgs)
    z = integrate(model.net, x1, 1.0, 0.0, rtol=1e-9, atol=1e-9)
    assert (z - x1).abs().max() > 1e-2, "the perturbed field moves x1"
    torch.testing.assert_close(integrate(model.net, z, 0.0, 1.0, rtol=1e-9, atol=1e-9), x1, rtol=0, atol=1e-6)


def test_flowmatch_sampling_is_reproducible_from_a_seed_and_in_range():
    model = small_model()
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append(model.sample(model.latent_shape(2), steps=4))
    assert torch.equal(*draws)
    assert draws[0].dtype == torch.int32 and draws[0].min() >= 0 and draws[0].max() <= 255
    with pytest.raises(ValueError, match="latent shape"):
        model.sample((2, 1, 28, 28))
    with pytest.raises(ValueError, match="temperature"):
        model.sample(model.latent_shape(2), temperature=-1)


def test_euler_sampler_converges_to_the_adaptive_solution():
    model = small_model().double()
    z = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    exact = integrate(model.net, z, 0.0, 1.0, rtol=1e-9, atol=1e-9)
    errors = [(integrate(model.net, z, 0.0, 1.0, steps=n) - exact).abs().max().item() for n in (4, 16, 64)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 8  # first order: 16x the steps, about 1/16 of the error


def test_flowmatch_is_registered_and_saves_and_loads(tmp_path):
    from flowbook.checkpoints import load_model, save_checkpoint

    model = perturb_(create_flow("flowmatch"), scale=0.01)
    save_checkpoint(model, "flowmatch", tmp_path / "fm.pt")
    loaded = load_model(tmp_path / "fm.pt", arch="flowmatch")
    x = torch.randn(2, 1, 28, 28)
    t = torch.rand(2)
    assert torch.equal(model.net(x, t), loaded.net(x, t))


def test_toy_flow_matching_trains_a_velocity_with_a_finite_density():
    from flowbook import toy_cnf
    from flowbook.toy import sample_toy

    data = sample_toy("moons", 512, seed=0)
    fm, record = toy_cnf.train_flow_matching(data, steps=40, progress=False)
    assert sum(record["loss"][-10:]) < sum(record["loss"][:10]), "the mean loss of the last 10 steps fell"
    lp = toy_cnf.log_prob(fm, data[:8], rtol=1e-4, atol=1e-4)
    assert lp.shape == (8,) and torch.isfinite(lp).all()


def test_toy_sample_is_reproducible_from_a_seed_in_the_velocitys_dtype():
    from flowbook import toy_cnf

    field = perturb_(toy_cnf.ToyVelocity(hidden=8), scale=0.3)
    first, again = (toy_cnf.sample(field, 5, steps=4, seed=3) for _ in range(2))
    assert torch.equal(first, again) and not torch.equal(first, toy_cnf.sample(field, 5, steps=4, seed=4))
    double = toy_cnf.sample(field.double(), 5, steps=4, seed=3)
    assert double.dtype == torch.float64
    torch.testing.assert_close(double, first.double(), rtol=0, atol=1e-5)


def test_toy_max_likelihood_step_records_solver_cost_and_lowers_the_loss():
    from flowbook import toy_cnf
    from flowbook.toy import sample_toy

    data = sample_toy("moons", 512, seed=0)
    _, record = toy_cnf.train_max_likelihood(data, steps=6, lr=1e-2, batch_size=64, progress=False)
    assert len(record["nfe"]) == 6, "one solver cost per training step"
    assert all(n >= 6 for n in record["nfe"]), "dopri5 evaluates v at least 6 times per solve"
    assert min(record["loss"][3:]) < record["loss"][0]


def test_evaluate_writes_an_estimated_bpd_with_its_solver_and_standard_error(tmp_path, mnist, monkeypatch):
    from flowbook import evaluate
    from flowbook.checkpoints import save_checkpoint

    model = perturb_(create_flow("flowmatch"), scale=0.002)
    save_checkpoint(model, "flowmatch", tmp_path / "flowmatch.pt")
    for slow in ("inference_time", "sampling_time"):  # not what this test is about
        monkeypatch.setattr(evaluate, slow, lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(evaluate, "ODE_SLICE_IMAGES", 2)
    monkeypatch.setattr(FlowMatchingModel, "rtol", 1e-2)
    monkeypatch.setattr(FlowMatchingModel, "atol", 1e-2)
    results = evaluate.evaluate_checkpoint(tmp_path / "flowmatch.pt", device="cpu", eval_images=3, progress=False)
    assert results["importance_samples"] == 1 and results["likelihood"] == {
        "estimator": "hutchinson", "probe": model.probe, "probes_per_image": 1, "method": model.method,
        "rtol": 1e-2, "atol": 1e-2, "batch_size": 64}, "the record names the solve that made the numbers"
    assert results["test_bpd_stderr"] > 0 and 0 < results["test_bpd"] < 16
    assert results["slice"]["images"] == 2
    with pytest.raises(ValueError, match="importance_samples must be 1"):
        evaluate.evaluate_checkpoint(tmp_path / "flowmatch.pt", device="cpu", eval_images=2, importance_samples=8,
                                     progress=False, out=tmp_path / "other.json")


def test_classifier_scores_confident_digits_and_refuses_a_missing_file(tmp_path):
    from flowbook.classifier import DigitClassifier, load_classifier, recognisability, recognised

    clf = DigitClassifier().eval()
    with torch.no_grad():
        clf.head[-1].bias.copy_(torch.tensor([10.0] + [0.0] * 9))  # every image is a confident "0"
    imgs = torch.randint(0, 256, (5, 1, 28, 28), dtype=torch.int32)
    assert recognisability(clf, imgs) == 1.0
    assert recognisability(clf, imgs, threshold=1.01) == 0.0
    assert recognised(clf, imgs).tolist() == [True] * 5 and not recognised(clf, imgs, threshold=1.01).any()
    with pytest.raises(FileNotFoundError, match="python -m flowbook.classifier"):
        load_classifier(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="integer images"):
        clf(imgs.float())


def test_shipped_classifier_recognises_the_test_digits(mnist):
    from flowbook.classifier import accuracy, load_classifier

    clf = load_classifier()
    test = mnist[2]
    assert accuracy(clf, test.images[:1000], test.labels[:1000]) > 0.97
    assert clf.meta["test_accuracy"] > 0.98

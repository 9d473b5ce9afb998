"""Exercise checkers pass the chapters' solutions and catch plausible mistakes; the editions are right."""
import contextlib
import math
import re
from types import SimpleNamespace

import jupytext
import nbformat
import pytest
import torch
from nbclient import NotebookClient

from conftest import ROOT, perturb_
from flowbook import editions, exercises
from flowbook import ode, ood, pretrained
from flowbook import denoise as denoise_module
from flowbook.flowmatch import LinearPath
from flowbook.layers import tarflow
from flowbook.layers import (ActNorm, CouplingLayer, GatedConvNet, SplitFlow, SqueezeFlow, VariationalDequantization,
                             create_checkerboard_mask)
from flowbook.models import ImageFlow, create_multiscale_flow, interpolate_latents

CHAPTERS = editions.chapters()

def _tagged_cells(tag):
    return [(src, c) for src in CHAPTERS for c in jupytext.read(src).cells if tag in c.metadata.get("tags", [])]


def _namespace(tag):
    """Everything the chapters' `tag` cells define, executed with the chapters' imports."""
    ns = {"torch": torch, "math": math}
    exec("from flowbook.layers import *\nfrom flowbook.models import ImageFlow", ns)
    for _, cell in _tagged_cells(tag):
        exec(cell.source, ns)
    return ns


SOLUTIONS = _namespace("solution")
STUBS = _namespace("student")
STUB_SOURCES = {  # checker: the source of the stub cell of its exercise
    re.search(r"exercises\.(check_\w+)", text).group(1): stub
    for stub, text in ((c.source, "\n".join(d.source for d in cells[i + 1:i + 4]))
                       for src in CHAPTERS for cells in [jupytext.read(src).cells]
                       for i, c in enumerate(cells) if "student" in c.metadata.get("tags", []))
    if re.search(r"exercises\.(check_\w+)", text)}
CHECKS = {  # checker: name defined by the chapter's exercise
    "check_change_of_variables": "log_prob_affine", "check_bits_per_dim": "bits_per_dim",
    "check_logit_transform": "logit_transform", "check_importance_weighted_bpd": "importance_weighted_bpd",
    "check_vardeq_noise": "vardeq_noise", "check_checkerboard_mask": "checkerboard_mask",
    "check_affine_coupling": "AffineCoupling", "check_additive_coupling": "AdditiveCoupling",
    "check_train_flow": "train_flow", "check_squeeze": "squeeze", "check_split": "Split",
    "check_multiscale_flow": "build_multiscale_flow", "check_interpolate": "interpolate",
    "check_temperature_latent": "temperature_latent", "check_sample_images": "sample_images",
    "check_lu_weight": "lu_weight_and_logdet", "check_actnorm": "ActNormLayer", "check_separation_auc": "separation_auc",
    "check_hutchinson_divergence": "hutchinson_divergence", "check_cfm_loss": "cfm_loss",
    "check_euler_sample": "euler_sample", "check_causal_mask": "causal_mask",
    "check_autoregressive_inverse": "ar_inverse", "check_tweedie_step": "tweedie_step",
}
QUICK = [c for c in CHECKS if c != "check_train_flow"]  # the training check has its own, shortened tests


def _check(checker, fn):
    if checker == "check_train_flow":
        return exercises.check_train_flow(fn, SOLUTIONS["AffineCoupling"], SOLUTIONS["checkerboard_mask"])
    return getattr(exercises, checker)(fn)


def test_every_checker_is_used_by_a_chapter():
    used = set(re.findall(r"exercises\.(check_\w+)", " ".join(c.source for src in CHAPTERS
                                                             for c in jupytext.read(src).cells)))
    assert used == set(CHECKS) == set(exercises.__all__) - {"CheckFailed", "grade"}


@pytest.mark.parametrize("checker", QUICK)
def test_checker_passes_the_chapter_solution(checker, capsys):
    import time

    start = time.perf_counter()
    _check(checker, SOLUTIONS[CHECKS[checker]])
    seconds = time.perf_counter() - start
    assert capsys.readouterr().out.startswith(f"✓ {checker}: all")
    assert seconds < 20, f"{checker} took {seconds:.0f} s; a checker must stay well under a minute on two cores"


@pytest.mark.parametrize("checker", CHECKS)
def test_checker_lets_the_stub_raise_not_implemented(checker):
    with pytest.raises(NotImplementedError, match=r"^Exercise \d: "):
        _check(checker, STUBS[CHECKS[checker]])


class _Wrapped(torch.nn.Module):
    """A correct layer from the chapter whose output `change(z, ldj, reverse, inner)` alters."""

    def __init__(self, inner, change):
        super().__init__()
        self.inner, self.change = inner, change

    def forward(self, z, ldj, reverse=False, **kw):
        return self.change(z, ldj, reverse, self.inner, **kw)


class _CouplingShell(torch.nn.Module):
    """The attributes of the exercise's AffineCoupling: a wrong forward is all that the cases below differ in."""

    def __init__(self, network, mask, c_in):
        super().__init__()
        self.network = network
        self.scaling_factor = torch.nn.Parameter(torch.zeros(c_in))
        self.register_buffer("mask", mask)


def _affine_with(bound=lambda s, f: torch.tanh(s / f) * f, order="shift first", swap=False, mask_s=True, sign=1.0,
                 mask_all=True, factor=lambda f: f.exp().view(1, -1, 1, 1), sees=lambda z, mask: z * mask,
                 ldj_sum=lambda s: s.sum(dim=[1, 2, 3])):
    class Wrong(_CouplingShell):
        def forward(self, z, ldj, reverse=False):
            s, t = self.network(sees(z, self.mask)).chunk(2, dim=1)
            if swap:
                s, t = t, s
            s = bound(s, factor(self.scaling_factor))
            keep = (1 - self.mask) if mask_all else 1
            s_sum = ldj_sum(s * (1 - self.mask) if mask_s else s)
            s, t = s * keep, t * keep
            if not reverse:
                z = (z + t) * torch.exp(s) if order == "shift first" else z * torch.exp(s) + t
                return z, ldj + sign * s_sum
            return (z * torch.exp(-s) - t if order == "shift first" else (z - t) * torch.exp(-s)), ldj - sign * s_sum
    return Wrong


class _AdditiveForgotMask(torch.nn.Module):
    def __init__(self, network, mask):
        super().__init__()
        self.network = network
        self.register_buffer("mask", mask)

    def forward(self, z, ldj, reverse=False):
        t = self.network(z * self.mask)  # forgot * (1 - mask): changes the kept half too
        return (z + t if not reverse else z - t), ldj


class _AdditiveNetworkSeesAll(_AdditiveForgotMask):
    def forward(self, z, ldj, reverse=False):
        t = self.network(z) * (1 - self.mask)  # not invertible: t depends on the half it changes
        return (z + t if not reverse else z - t), ldj


class _AdditiveBogusLdj(_AdditiveForgotMask):
    def forward(self, z, ldj, reverse=False):
        t = self.network(z * self.mask) * (1 - self.mask)
        return (z + t, ldj + t.sum(dim=[1, 2, 3])) if not reverse else (z - t, ldj - t.sum(dim=[1, 2, 3]))


def _squeeze_perm(order):
    def squeeze(z, reverse=False):
        B, C, H, W = z.shape
        if not reverse:
            return z.reshape(B, C, H // 2, 2, W // 2, 2).permute(*order).reshape(B, 4 * C, H // 2, W // 2)
        return SqueezeFlow()(z, None, reverse=True)[0]
    return squeeze


def _log_n(v):
    return (-0.5 * (v ** 2 + math.log(2 * math.pi))).flatten(1).sum(1)


def _split_with(forward=None, draw=None, scale_given=False, score=None):
    class Wrong(torch.nn.Module):
        def forward(self, z, ldj, reverse_=False, z_split=None, temperature=1.0, **kw):
            raise AssertionError

    def run(self, z, ldj, reverse=False, z_split=None, temperature=1.0):
        if not reverse:
            return forward(z, ldj)
        if z_split is None:
            z_split = torch.randn_like(z) * (temperature if draw is None else draw(temperature))
            if score is not None:
                return torch.cat([z, z_split], dim=1), ldj - score(z_split, temperature)
        elif scale_given:
            z_split = z_split * temperature
        return torch.cat([z, z_split], dim=1), ldj - _log_n(z_split)
    Wrong.forward = run
    return Wrong


def _vardeq_with(cond=lambda x: x.double() / 255 * 2 - 1, sigmoid_sign=1.0, logit=True, flows=True):
    def vardeq_noise(var_flows, x, u0, alpha):
        e, ldj = SOLUTIONS["logit_transform"](u0, alpha)
        if not logit:
            ldj = torch.zeros_like(ldj)
        for flow in var_flows:
            e, step = flow(e, torch.zeros_like(ldj), orig_img=cond(x))
            ldj = ldj + (step if flows else 0)
        sig = (torch.nn.functional.logsigmoid(e) + torch.nn.functional.logsigmoid(-e)).flatten(1).sum(1)
        return torch.sigmoid(e), ldj + sigmoid_sign * sig
    return vardeq_noise


def _multiscale_with(change):
    def build():
        model = SOLUTIONS["build_multiscale_flow"]()
        change(model)
        return model
    return build


def _sample_with(t_latent=lambda t: t, t_split=lambda t: t):
    @torch.no_grad()
    def sample_images(model, n, temperature):
        z = torch.randn(model.latent_shape(n)) * t_latent(temperature)
        ldj = torch.zeros(n)
        for flow in reversed(model.flows):
            z, ldj = flow(z, ldj, reverse=True, temperature=t_split(temperature)) if isinstance(flow, SplitFlow) \
                else flow(z, ldj, reverse=True)
        return z
    return sample_images


def _actnorm_with(scale=lambda std: -std.log(), once=True, hw=True, sign=1.0, flag="buffer", new_params=False,
                  only_training=True, form="shift first", reverse_sign=1.0, unbiased=True):
    class Wrong(torch.nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.loc = torch.nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.log_scale = torch.nn.Parameter(torch.zeros(1, channels, 1, 1))
            self.register_buffer("initialized", torch.tensor(False))

        def done(self):
            return bool(self.initialized) if flag == "buffer" else getattr(self, "_done", False)

        def forward(self, z, ldj, reverse=False):
            if not reverse and (self.training or not only_training) and (not once or not self.done()):
                with torch.no_grad():
                    flat = z.transpose(0, 1).flatten(1)
                    mean, std = flat.mean(1), flat.std(1, unbiased=unbiased)
                    loc = -mean if form == "shift first" else -mean / std
                    if new_params:
                        self.loc = torch.nn.Parameter(loc.view_as(self.loc).clone())
                        self.log_scale = torch.nn.Parameter(scale(std).view_as(self.log_scale).clone())
                    else:
                        self.loc.copy_(loc.view_as(self.loc))
                        self.log_scale.copy_(scale(std).view_as(self.log_scale))
                    if flag == "buffer":
                        self.initialized.fill_(True)
                    else:
                        self._done = True
            log_det = sign * (z.shape[2] * z.shape[3] if hw else 1) * self.log_scale.sum()
            if form == "shift first":
                y = (z + self.loc) * torch.exp(self.log_scale) if not reverse else z * torch.exp(-self.log_scale) - self.loc
            else:
                y = z * torch.exp(self.log_scale) + self.loc if not reverse else (z - self.loc) * torch.exp(-self.log_scale)
            return y, (ldj + log_det if not reverse else ldj - reverse_sign * log_det)
    return Wrong


_BORROWED_FORWARD = CouplingLayer.forward  # references a student captured in a cell above the check
_PU, _PS = torch.nn.functional.pixel_unshuffle, torch.nn.functional.pixel_shuffle
_SQUEEZE_FORWARD = SqueezeFlow.forward
_SLD, _SVDVALS, _LU_FACTOR = torch.linalg.slogdet, torch.linalg.svdvals, torch.linalg.lu_factor
_MADE_EARLIER = create_multiscale_flow()  # a model made in an earlier cell
_DEQUANT_NOISE = VariationalDequantization.dequant_noise
_SAMPLE = ImageFlow.sample


def _copy_of_an_earlier_model():
    import copy

    return copy.deepcopy(_MADE_EARLIER)


class _BorrowingCoupling(_CouplingShell):
    def forward(self, z, ldj, reverse=False):
        return _BORROWED_FORWARD(self, z, ldj, reverse)


def _lu_right(p, lo, up, sg, ls):
    return p @ (torch.tril(lo, -1) + torch.eye(len(ls), dtype=ls.dtype)) @ (torch.triu(up, 1) + torch.diag(sg * ls.exp()))


def _lu_inverse_with(combine, sign=-1.0, detach=False):
    def lu_weight_and_logdet(p, lo, up, sg, ls, inverse=False):
        if not inverse:
            return SOLUTIONS["lu_weight_and_logdet"](p, lo, up, sg, ls)
        eye = torch.eye(len(ls), dtype=ls.dtype)
        lower, upper = torch.tril(lo, -1) + eye, torch.triu(up, 1) + torch.diag(sg * ls.exp())
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        u_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
        log_det = sign * ls.sum()
        return combine(p, l_inv, u_inv), log_det.detach() if detach else log_det
    return lu_weight_and_logdet


def _squeeze_reverse_swapped(z, reverse=False):
    B, C, H, W = z.shape
    if not reverse:
        return SOLUTIONS["squeeze"](z)
    return z.reshape(B, C // 4, 2, 2, H, W).permute(0, 1, 4, 3, 5, 2).reshape(B, C // 4, 2 * H, 2 * W)


def _set_vardeq_masks(model, invert):
    for j, flow in enumerate(model.flows[0].flows):
        flow.mask.copy_(create_checkerboard_mask(28, 28, invert=invert(j)))


def _slerp_with(a, b, n, spherical, angle):
    if not spherical:
        return SOLUTIONS["interpolate"](a, b, n)
    lam, omega = torch.linspace(0, 1, n).view(-1, 1, 1, 1), angle(a, b)
    return (torch.sin((1 - lam) * omega) * a + torch.sin(lam * omega) * b) / torch.sin(omega)


def _truncate_after(shape, t, r):
    """Truncation applied to z = T e instead of to e (|z| <= r instead of |z| <= r T)."""
    z = torch.randn(shape) * t
    outside = z.abs() > r
    while outside.any():
        z[outside] = torch.randn(int(outside.sum())) * t
        outside = z.abs() > r
    return z


def _roc_without_start(in_scores, out_scores):
    t = torch.cat([in_scores, out_scores]).unique().flip(0).view(-1, 1)
    tpr = (out_scores.view(1, -1) >= t).double().mean(1)
    fpr = (in_scores.view(1, -1) >= t).double().mean(1)
    return torch.trapezoid(tpr, fpr).item()


def _roc_with(swapped=False, ascending=False):
    """The ROC curve from (0, 0) to (1, 1) and the trapezoid rule, with torch.trapezoid's arguments swapped
    (x before y) or the thresholds from the smallest score up."""
    def auc(in_scores, out_scores):
        top = torch.cat([in_scores, out_scores]).max().view(1) + 1  # above every score: the point (0, 0)
        t = torch.cat([in_scores, out_scores, top]).unique().flip(0).view(-1, 1)
        t = t.flip(0) if ascending else t
        tpr = (out_scores.view(1, -1) >= t).double().mean(1)
        fpr = (in_scores.view(1, -1) >= t).double().mean(1)
        return (torch.trapezoid(fpr, tpr) if swapped else torch.trapezoid(tpr, fpr)).item()
    return auc


def _no_volume(x, a, b):
    return torch.distributions.Normal(0.0, 1.0).log_prob((x - b) / a)


def _hutchinson_with(probe="rademacher", times_eps=True, average=True, detach=True, sign=1.0, per_dim=False,
                     time=None, shared=False, flat=True):
    """Chapter 7's estimator with one thing changed."""
    def estimate(velocity, x, t, num_probes=1):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            v, total = velocity(x, t if time is None else torch.full_like(t, time)), 0
            for _ in range(num_probes):
                eps = {"gaussian": torch.randn_like(x),
                       "zero_one": torch.randint(0, 2, x.shape).to(x.dtype)}.get(
                    probe, torch.randint(0, 2, x.shape).to(x.dtype) * 2 - 1)
                eps = eps[:1].expand_as(x) if shared else eps
                vjp = torch.autograd.grad(v, x, eps, retain_graph=True, create_graph=not detach)[0]
                terms = (vjp * eps if times_eps else vjp)
                terms = terms.flatten(1) if flat else terms  # not flat: sums dimension 1 only, fits [B, D] data only
                total = total + sign * (terms.mean(1) if per_dim else terms.sum(1))
        out = total / num_probes if average else total
        return out.detach() if detach else out
    return estimate


def _cfm_with(t="uniform", swap=False, target="velocity", reduce="mean", detach=False, flat_t=False):
    """Chapter 7's flow-matching loss with one thing changed."""
    def loss(velocity, x1):
        b = x1.shape[0]
        tt = {"normal": torch.randn(b), "shared": torch.full((b,), torch.rand(()).item()),
              "grid": torch.linspace(0, 1, b)}.get(t, torch.rand(b))
        tt = tt.to(x1.dtype)
        x0, tb = torch.randn_like(x1), tt.view(-1, 1) if flat_t else tt.view(-1, *[1] * (x1.dim() - 1))
        xt = (1 - tb) * x1 + tb * x0 if swap else (1 - tb) * x0 + tb * x1
        u = {"sign": x0 - x1, "data": x1}.get(target, x1 - x0)
        v = velocity(xt, tt)
        err = ((v.detach() if detach else v) - u).pow(2)
        return err.sum() if reduce == "sum" else err.mean()
    return loss


def _euler_with(time="start", backwards=False, t_as_float=False, in_place=False, dtype=None):
    """Chapter 7's Euler sampler with one thing changed."""
    def sample(velocity, z, steps):
        x, h = z, 1.0 / steps
        for k in range(steps):
            tk = {"end": (k + 1) * h}.get(time, 1 - k * h if backwards else k * h)
            t = tk if t_as_float else torch.full((x.shape[0],), tk, dtype=dtype or x.dtype)
            if in_place:
                x += h * velocity(x, t)
            else:
                x = x - h * velocity(x, t) if backwards else x + h * velocity(x, t)
        return x
    return sample


def _bool_ones(T):
    return torch.ones(T, T, dtype=torch.bool)


_CAUSAL_MASK = tarflow.causal_mask  # captured before the check
_TWEEDIE = denoise_module.tweedie_denoise  # captured before the check


def _ar_inverse_with(params="x", scale=1.0, shift=1.0, order="scale first", sign=1.0, reduce="sum", write="clone",
                     graph=True, prefix=False, dtype=None, shape="tokens", detach=None):
    """Chapter 8's autoregressive inverse with one thing changed (`detach`: "z" cuts z off the graph, "x" feeds
    shift_and_log_scale a detached x, the shortcut around the in-place error)."""
    def ar_inverse(shift_and_log_scale, z):
        z = z.detach() if detach == "z" else z
        with contextlib.nullcontext() if graph else torch.no_grad():
            if params in ("z", "zeros"):  # one parallel pass
                t, scales = shift_and_log_scale(z if params == "z" else torch.zeros_like(z))
                x = z * torch.exp(-scale * scales) - shift * t
            else:
                x = z if write == "alias" else torch.zeros(z.shape, dtype=dtype or z.dtype)
                scales = []
                for i in range(z.shape[1]):
                    read = x.detach() if detach == "x" else x
                    t, s = shift_and_log_scale(read[:, :i + 1] if prefix else read)
                    t, s = t[:, i], s[:, i]
                    xi = z[:, i] * torch.exp(-scale * s) - shift * t if order == "scale first" else (
                        (z[:, i] - t) * torch.exp(-s))
                    if write == "list":  # the tokens so far, then zeros
                        x = torch.cat([x[:, :i], xi.unsqueeze(1), torch.zeros_like(z[:, i + 1:])], dim=1)
                    else:
                        if write == "clone":
                            x = x.clone()
                        x[:, i] = xi  # "in place" and "alias" write into the tensor read (or into z itself)
                    scales.append(s)
                scales = torch.stack(scales, dim=1)
            log_det = -sign * {"sum": scales.flatten(1).sum(1), "mean": scales.flatten(1).mean(1),
                               "batch": scales.sum()}[reduce]
        return (x.flatten(1) if shape == "flat" else x), log_det
    return ar_inverse


def _tweedie_with(power=2, sign=1.0, reduce="sum", copy="detach", result="detach", in_place=False, enable_grad=True,
                  way="autograd.grad"):
    """Chapter 8's Tweedie step with one thing changed."""
    def tweedie_denoise(log_density, y, sigma):
        with torch.enable_grad() if enable_grad else contextlib.nullcontext():
            y_ = {"detach": lambda: y.detach().requires_grad_(True), "flag": lambda: y.requires_grad_(True),
                  "none": lambda: y}[copy]()
            if way == "torch.func":
                score = torch.func.grad(lambda v: log_density(v).sum())(y.detach())
            else:
                lp = log_density(y_)
                total = {"sum": lp.sum(), "mean": lp.mean(), "none": lp}[reduce]
                if way == "backward":
                    total.backward()
                    score = y_.grad
                else:
                    score = torch.autograd.grad(total, y_)[0]
        step = sign * sigma ** power * score
        if in_place:
            return y.detach().add_(step)
        return {"detach": lambda: (y + step).detach(), "graph": lambda: y_ + step}[result]()
    return tweedie_denoise


WRONG = {  # checker: [(a plausible mistake, the words its hint must contain)]
    "check_change_of_variables": [
        (_no_volume, "volume term is missing"),
        (lambda x, a, b: _no_volume(x, a, b) + math.log(abs(a)), "wrong sign"),
        (lambda x, a, b: _no_volume(x, a, b) - torch.log(torch.tensor(a, dtype=x.dtype)), "log|scale|"),
        (lambda x, a, b: torch.distributions.Normal(b, abs(a)).log_prob(x), "not the change of variables"),
        (lambda x, a, b: torch.distributions.TransformedDistribution(
            torch.distributions.Normal(torch.tensor(0.0, dtype=x.dtype), torch.tensor(1.0, dtype=x.dtype)),
            [torch.distributions.AffineTransform(b, a)]).log_prob(x), "does the change of variables for you"),
    ],
    "check_bits_per_dim": [
        (lambda ll, d: -ll / d, "divide by log 2"),
        (lambda ll, d: ll / (d * math.log(2)), "sign"),
        (lambda ll, d: -ll / (d * math.log(10)), "off by"),
    ],
    "check_logit_transform": [
        (lambda u, a: (torch.logit(u), (-torch.log(u) - torch.log1p(-u)).flatten(1).sum(1)), "first squeeze u"),
        (lambda u, a: (torch.logit((1 - a) * u + a / 2),
                       (-torch.log((1 - a) * u + a / 2) - torch.log1p(-(1 - a) * u - a / 2)).flatten(1).sum(1)),
         "alpha term is missing"),
        (lambda u, a: (torch.logit((1 - a) * u + a / 2), -SOLUTIONS["logit_transform"](u, a)[1]), "wrong sign"),
        (lambda u, a: (torch.logit((1 - a) * u + a / 2), SOLUTIONS["logit_transform"](u, a)[1].sum()), "shape [B]"),
        (lambda u, a: SOLUTIONS["logit_transform"](u, 0.05), "fixed at 0.05"),
    ],
    "check_importance_weighted_bpd": [
        (lambda lls, d: -lls.mean(0) / (d * math.log(2)), "averaged the log-likelihoods"),
        (lambda lls, d: -torch.log(lls.exp().mean(0)) / (d * math.log(2)), "torch.logsumexp"),
        (lambda lls, d: -torch.logsumexp(lls, 0) / (d * math.log(2)), "- log K is missing"),
        (lambda lls, d: -(torch.logsumexp(lls, 0) - math.log(len(lls))) / d, "divide by D log 2"),
    ],
    "check_vardeq_noise": [
        (_vardeq_with(cond=lambda x: x.double() / 255), "not x / 255"),
        (_vardeq_with(cond=lambda x: x.double()), "not the raw integers"),
        (_vardeq_with(sigmoid_sign=0.0), "sigmoid's log-determinant is missing"),
        (_vardeq_with(sigmoid_sign=-1.0), "sigmoid's log-determinant has the wrong sign"),
        (_vardeq_with(logit=False), "logit's log-determinant is missing"),
        (_vardeq_with(flows=False), "coupling layers' log-determinants are missing"),
        (lambda flows, x, u0, a: SOLUTIONS["vardeq_noise"](flows, x, u0, 0.05), "fixed at 0.05"),
        (lambda flows, x, u0, a: _DEQUANT_NOISE(VariationalDequantization(flows, alpha=a), x,
                                                torch.zeros(len(x), dtype=u0.dtype), noise=u0),
         "implement this yourself"),
    ],
    "check_checkerboard_mask": [
        (lambda h, w, invert=False: 1 - SOLUTIONS["checkerboard_mask"](h, w, invert), "starts with 1"),
        (lambda h, w, invert=False: SOLUTIONS["checkerboard_mask"](h, w, False), "invert=True must swap"),
        (lambda h, w, invert=False: SOLUTIONS["checkerboard_mask"](h, w, invert).double(), "dtype"),
    ],
    "check_affine_coupling": [
        (_affine_with(mask_all=False, mask_s=True), "multiply s and t by (1 - mask)"),
        (_affine_with(bound=lambda s, f: s), "not bounded"),
        (_affine_with(bound=lambda s, f: torch.tanh(s)), "ignores the learnable factor"),
        (_affine_with(order="scale first"), "shifts first"),
        (_affine_with(swap=True), "swapped"),
        (_affine_with(sign=0.0), "ldj is unchanged"),
        (_affine_with(sign=-1.0), "wrong sign"),
        (_affine_with(mask_s=False), "summed s over every pixel".replace("summed s", "sums s")),
        (_affine_with(factor=lambda f: f.mean().exp()), "all channels share one factor"),
        (_affine_with(factor=lambda f: f.exp()), "broadcasts along the width"),
        (_affine_with(bound=lambda s, f: torch.tanh(s) * f), "changes its slope"),
        (_affine_with(ldj_sum=lambda s: s.sum()), "one number for the whole batch"),
        (_affine_with(sees=lambda z, mask: z), "must see z * mask, not z"),
        (_BorrowingCoupling, "implement this yourself"),
    ],
    "check_additive_coupling": [
        (_AdditiveForgotMask, "multiply t by (1 - mask)"),
        (_AdditiveNetworkSeesAll, "must see z * mask only"),
        (_AdditiveBogusLdj, "log|det J| = 0"),
    ],
    "check_squeeze": [
        (_squeeze_perm((0, 1, 5, 3, 2, 4)), "row and column are swapped"),
        (_squeeze_perm((0, 3, 5, 1, 2, 4)), "grouped by position"),
        (lambda z, reverse=False: z.reshape(z.shape[0], -1, z.shape[2] // 2, z.shape[3] // 2), "channels of the 4x4"),
        (lambda z, reverse=False: torch.nn.functional.pixel_unshuffle(z, 2) if not reverse else
         torch.nn.functional.pixel_shuffle(z, 2), "implement this yourself"),
    ],
    "check_split": [
        (_split_with(lambda z, ldj: (z.chunk(2, 1)[1], ldj + _log_n(z.chunk(2, 1)[0]))), "kept the second half"),
        (_split_with(lambda z, ldj: (z.chunk(2, 1)[0], ldj)), "ldj is unchanged"),
        (_split_with(lambda z, ldj: (z.chunk(2, 1)[0], ldj - _log_n(z.chunk(2, 1)[1]))), "the sign"),
        (_split_with(lambda z, ldj: (z.chunk(2, 1)[0], ldj + _log_n(z.chunk(2, 1)[0]))), "scored the kept half"),
        (_split_with(lambda z, ldj: (z.chunk(2, 1)[0], ldj - 0.5 * (z.chunk(2, 1)[1] ** 2).flatten(1).sum(1))),
         "-0.5 log(2 pi)"),
        (_split_with(lambda z, ldj: (z.chunk(2, 1)[0], ldj + _log_n(z.chunk(2, 1)[1])), draw=lambda t: t * t),
         "temperature^2"),
        (_split_with(lambda z, ldj: (z.chunk(2, 1)[0], ldj + _log_n(z.chunk(2, 1)[1])), scale_given=True),
         "appended as it is"),
        (_split_with(lambda z, ldj: (z.chunk(2, 1)[0], ldj + (-0.5 * (z.chunk(2, 1)[1] ** 2 + math.log(2 * math.pi)))
                                     .flatten(1).mean(1))), "averaged log N"),
        (_split_with(lambda z, ldj: (z.chunk(2, 1)[0], ldj + _log_n(z.chunk(2, 1)[1])),
                     score=lambda v, t: _log_n(v / t) - v[0].numel() * math.log(t)), "scored under the prior"),
    ],
    "check_multiscale_flow": [
        (_multiscale_with(lambda m: m.flows.__delitem__(6)), "layer 6 is a SqueezeFlow"),
        (_multiscale_with(lambda m: m.flows[2].mask.copy_(m.flows[1].mask)),
         "layer 2 has the checkerboard mask of shape [1, 1, 28, 28]; expected the inverted"),
        (_multiscale_with(lambda m: m.flows.__setitem__(4, SOLUTIONS["build_multiscale_flow"]().flows[5])),
         "layer 4 has the inverted channel mask"),
        (_multiscale_with(lambda m: _set_vardeq_masks(m, lambda j: False)),
         "layer 0's noise coupling 1 has the checkerboard mask"),
        (_multiscale_with(lambda m: _set_vardeq_masks(m, lambda j: j % 2 == 0)),
         "layer 0's noise coupling 0 has the inverted checkerboard mask"),
        (_multiscale_with(lambda m: m.flows[1].__setattr__("network", GatedConvNet(1, c_hidden=32, c_out=4))),
         "layer 1: c_out = 4, expected 2"),
        (_multiscale_with(lambda m: m.flows[0].flows[0].__setattr__(
            "scaling_factor", torch.nn.Parameter(torch.zeros(2)))), "c_in (its scaling factors) = 2, expected 1"),
        (_copy_of_an_earlier_model, "not built by build_multiscale_flow"),
        (lambda: create_multiscale_flow(), "implement this yourself"),
        (lambda: torch.nn.Sequential(*SOLUTIONS["build_multiscale_flow"]().flows), "return an ImageFlow"),
    ],
    "check_interpolate": [
        (lambda a, b, n, spherical=False: (1 - torch.linspace(0, 1, n + 2)[1:-1].view(-1, 1, 1, 1)) * a
         + torch.linspace(0, 1, n + 2)[1:-1].view(-1, 1, 1, 1) * b, "first step must be z_a"),
        (lambda a, b, n, spherical=False: (1 - torch.arange(n).view(-1, 1, 1, 1) / n) * a + torch.arange(n).view(-1, 1, 1, 1) / n * b,
         "last step must be z_b"),
        (lambda a, b, n, spherical=False: torch.linspace(0, 1, n).view(-1, 1, 1, 1) * a
         + (1 - torch.linspace(0, 1, n).view(-1, 1, 1, 1)) * b, "go backwards"),
        (lambda a, b, n, spherical=False: interpolate_latents(a, b, n), "implement this yourself"),
        (lambda a, b, n, spherical=False: SOLUTIONS["interpolate"](a, b, n), "gives the straight line"),
        (lambda a, b, n, spherical=False: _slerp_with(a, b, n, spherical, lambda a, b: torch.arccos((
            a.flatten() @ b.flatten()).clamp(-1, 1))), "divide the dot product by both norms"),
        (lambda a, b, n, spherical=False: _slerp_with(a, b, n, spherical, lambda a, b: torch.arccos((
            a * b / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True))).sum(1, keepdim=True).clamp(-1, 1))),
         "not one per pixel"),
    ],
    "check_temperature_latent": [
        (lambda shape, t, truncation=None: torch.randn(shape) * t ** 2, "temperature^2"),
        (lambda shape, t, truncation=None: torch.randn(shape) + t, "scale, do not shift"),
        (lambda shape, t, truncation=None: torch.randn(shape, dtype=torch.float64) * t, "expected float32"),
        (lambda shape, t, truncation=None: torch.randn(shape) * t, "draw again every entry"),
        (lambda shape, t, truncation=None: torch.randn(shape).clamp(-truncation, truncation) * t
         if truncation else torch.randn(shape) * t, "clamping piles the tails"),
        (lambda shape, t, truncation=None: (SOLUTIONS["temperature_latent"](shape, 1.0) * t).clamp(-10, 10)
         if truncation is None else _truncate_after(shape, t, truncation), "before the temperature"),
        (lambda shape, t, truncation=None: SOLUTIONS["temperature_latent"](shape, t, truncation=1.0),
         "only when truncation is given"),
    ],
    "check_sample_images": [
        (_sample_with(t_latent=lambda t: t * t, t_split=lambda t: t * t), "not * T**2"),
        (_sample_with(t_split=lambda t: 1.0), "split layer must draw its half at the temperature"),
        (lambda model, n, t: model.sample(model.latent_shape(n), temperature=t), "implement this yourself"),
        (lambda model, n, t: _SAMPLE(model, model.latent_shape(n), temperature=t), "implement this yourself"),
    ],
    "check_lu_weight": [
        (lambda p, lo, up, sg, ls: (p @ lo @ (torch.triu(up, 1) + torch.diag(sg * ls.exp())), ls.sum()), "unit lower"),
        (lambda p, lo, up, sg, ls: (p @ torch.tril(lo, -1) @ (torch.triu(up, 1) + torch.diag(sg * ls.exp())), ls.sum()),
         "ones on its diagonal"),
        (lambda p, lo, up, sg, ls: (p @ (torch.tril(lo, -1) + torch.eye(len(ls), dtype=ls.dtype))
                                    @ (up + torch.diag(sg * ls.exp())), ls.sum()), "strictly upper part"),
        (lambda p, lo, up, sg, ls: (p @ (torch.tril(lo, -1) + torch.eye(len(ls), dtype=ls.dtype))
                                    @ (torch.triu(up, 1) + torch.diag(ls.exp())), ls.sum()), "left out the sign"),
        (lambda p, lo, up, sg, ls: (p @ (torch.tril(lo, -1) + torch.eye(len(ls), dtype=ls.dtype))
                                    @ (torch.triu(up, 1) + torch.diag(sg * ls.exp())), ls.exp().sum()), "not the sum of exp"),
        (lambda p, lo, up, sg, ls: (p @ (torch.tril(lo, -1) + torch.eye(len(ls), dtype=ls.dtype))
                                    @ (torch.triu(up, 1) + torch.diag(sg * ls.exp())), ls.sum().detach()), "has no graph"),
        (lambda p, lo, up, sg, ls: (lambda w: (w, torch.linalg.slogdet(w)[1]))(
            p @ (torch.tril(lo, -1) + torch.eye(len(ls), dtype=ls.dtype)) @ (torch.triu(up, 1) + torch.diag(sg * ls.exp()))),
         "implement this yourself"),
        (lambda p, lo, up, sg, ls: (lambda w: (w, _SLD(w)[1]))(_lu_right(p, lo, up, sg, ls)), "implement this yourself"),
        (lambda p, lo, up, sg, ls: (lambda w: (w, w.slogdet()[1]))(_lu_right(p, lo, up, sg, ls)), "implement this yourself"),
        (lambda p, lo, up, sg, ls: (lambda w: (w, _SVDVALS(w).log().sum()))(_lu_right(p, lo, up, sg, ls)),
         "implement this yourself"),
        (lambda p, lo, up, sg, ls: (lambda w: (w, _LU_FACTOR(w)[0].diagonal().abs().log().sum()))(
            _lu_right(p, lo, up, sg, ls)), "implement this yourself"),
        (lambda p, lo, up, sg, ls: ((torch.tril(lo, -1) + torch.eye(len(ls), dtype=ls.dtype))
                                    @ (torch.triu(up, 1) + torch.diag(sg * ls.exp())) @ p, ls.sum()), "not L @ U @ P"),
        (_lu_inverse_with(lambda p, l_inv, u_inv: u_inv @ l_inv @ p), "P^-1 is P transposed"),
        (_lu_inverse_with(lambda p, l_inv, u_inv: p.T @ l_inv @ u_inv), "reverses the order"),
        (_lu_inverse_with(lambda p, l_inv, u_inv: u_inv @ l_inv @ p.T, sign=1.0), "-sum(log_s)"),
        (_lu_inverse_with(lambda p, l_inv, u_inv: torch.linalg.inv(p @ torch.linalg.inv(l_inv) @ torch.linalg.inv(u_inv))),
         "implement this yourself"),
        (_lu_inverse_with(lambda p, l_inv, u_inv: (p @ l_inv.inverse() @ u_inv.inverse()).inverse()), "implement this yourself"),
        (lambda p, lo, up, sg, ls, inverse=False: (lambda w, ld: (torch.linalg.matrix_power(w, -1), -ld) if inverse
                                                   else (w, ld))(*SOLUTIONS["lu_weight_and_logdet"](p, lo, up, sg, ls)),
         "implement this yourself"),
        (_lu_inverse_with(lambda p, l_inv, u_inv: u_inv @ l_inv @ p.T, detach=True), "has no graph"),
    ],
    "check_actnorm": [
        (_actnorm_with(scale=lambda std: std.log()), "wrong sign"),
        (_actnorm_with(scale=lambda std: -(std * std).log()), "variance"),
        (_actnorm_with(once=False), "initialise only once"),
        (_actnorm_with(hw=False), "H * W"),
        (_actnorm_with(sign=-1.0), "wrong sign"),
        (lambda c: ActNorm(c), "implement this yourself"),
        (_actnorm_with(flag="python"), "load_state_dict does not restore"),
        (_actnorm_with(new_params=True), "by new Parameters"),
        (_actnorm_with(only_training=False), "in evaluation mode"),
        (_actnorm_with(form="scale first"), "belongs to the form z * exp(log_scale) + loc"),
        (_actnorm_with(unbiased=False), "biased standard deviation"),
        (_actnorm_with(reverse_sign=-1.0), "it subtracts"),
    ],
    "check_hutchinson_divergence": [
        (_hutchinson_with(probe="gaussian"), "Rademacher"),
        (_hutchinson_with(probe="zero_one"), "entries -1 and +1"),
        (_hutchinson_with(times_eps=False), "multiply the vector-Jacobian product"),
        (_hutchinson_with(average=False), "average the probes"),
        (_hutchinson_with(detach=False), "without its graph"),
        (_hutchinson_with(sign=-1.0), "check the sign"),
        (_hutchinson_with(per_dim=True), "do not average it"),
        (_hutchinson_with(time=0.0), "evaluate v at the given times"),
        (_hutchinson_with(flat=False), "sum over every dimension but the first"),
        (lambda v, x, t, n=1: ode.divergence_hutchinson(v(x.requires_grad_(), t), x, torch.ones_like(x)),
         "implement this yourself"),
    ],
    "check_cfm_loss": [
        (_cfm_with(t="normal"), "torch.rand, not torch.randn"),
        (_cfm_with(t="shared"), "one t per example"),
        (_cfm_with(swap=True), "you swapped x0 and x1"),
        (_cfm_with(target="sign"), "not x0 - x1"),
        (_cfm_with(target="data"), "not the data x1"),
        (_cfm_with(reduce="sum"), "not the sum"),
        (_cfm_with(detach=True), "nothing can train on it"),
        (_cfm_with(t="grid"), "not on a grid"),
        (_cfm_with(flat_t=True), "images"),
        (lambda v, x1: LinearPath().loss(v, x1), "implement this yourself"),
    ],
    "check_euler_sample": [
        (_euler_with(time="end"), "at the start of each step"),
        (_euler_with(backwards=True), "from t = 0 (noise) to t = 1"),
        (_euler_with(t_as_float=True), "as a tensor [B]"),
        (_euler_with(in_place=True), "changed z in place"),
        (lambda v, z, steps: ode.integrate(v, z, 0.0, 1.0, steps=steps), "implement this yourself"),
    ],
    "check_separation_auc": [
        (lambda a, b: ((a.view(-1, 1) - b.view(1, -1)) > 0).float().mean().item()
         + 0.5 * ((a.view(-1, 1) - b.view(1, -1)) == 0).float().mean().item(), "the other way round".replace(
            "the other way round", "in-distribution input scores higher")),
        (lambda a, b: ((b.view(-1, 1) - a.view(1, -1)) > 0).float().mean().item(), "ties count half"),
        (lambda a, b: ((b.view(-1, 1) - a.view(1, -1)) > 0).float().mean() + 0.5 * (
            (b.view(-1, 1) - a.view(1, -1)) == 0).float().mean(), "Python float"),
        (lambda a, b: ood.separation_auc(a, b), "implement this yourself"),
        (lambda a, b: _roc_without_start(a, b), "starts at (0, 0)"),
        (_roc_with(swapped=True), "torch.trapezoid(y=tpr, x=fpr)"),
        (_roc_with(ascending=True), "minus the AUC"),
    ],
    "check_causal_mask": [
        (lambda T: _bool_ones(T).triu(), "True above the diagonal"),
        (lambda T: torch.arange(T)[:, None] <= torch.arange(T)[None, :], "True above the diagonal"),  # transposed
        (lambda T: _bool_ones(T).tril().T, "True above the diagonal"),
        (lambda T: _bool_ones(T).tril(-1), "strictly lower"),
        (lambda T: torch.ones(T, T).tril(), "ADDS a float mask to the attention scores"),
        (lambda T: torch.zeros(T, T).masked_fill(~_bool_ones(T).tril(), -math.inf), "additive float mask"),
        (lambda T: _bool_ones(T), "True everywhere"),
        (lambda T: _bool_ones(T).triu(1), "nn.MultiheadAttention's convention"),
        (lambda T: torch.ones(T, T, dtype=torch.long).tril(), "dtype torch.bool"),
        (lambda T: _bool_ones(T).tril()[None, None], "shape [T, T]"),
        (lambda T: torch.eye(T, dtype=torch.bool), "hides keys that query i may see"),
        (lambda T: _CAUSAL_MASK(T), "implement this yourself"),
    ],
    "check_autoregressive_inverse": [
        (_ar_inverse_with(params="z"), "from z in one parallel pass"),
        (_ar_inverse_with(params="zeros"), "zero-filled x"),
        (_ar_inverse_with(scale=-1.0), "ran the forward again"),
        (_ar_inverse_with(shift=-1.0), "subtract t"),
        (_ar_inverse_with(order="shift first"), "unscales first, then subtracts t"),
        (_ar_inverse_with(sign=-1.0), "wrong sign"),
        (_ar_inverse_with(reduce="mean"), "sums log-scales over all tokens"),
        (_ar_inverse_with(reduce="batch"), "one number for the whole batch"),
        (_ar_inverse_with(write="in place"), "autograd cannot differentiate your inverse"),
        (_ar_inverse_with(write="alias"), "changed z in place"),
        (_ar_inverse_with(graph=False), "has no graph"),
        (_ar_inverse_with(prefix=True), "the whole sequence"),
        (_ar_inverse_with(dtype=torch.float32), "z's dtype"),
        (_ar_inverse_with(shape="flat"), "x must have z's shape"),
        (_ar_inverse_with(detach="z"), "no path from z to your x"),
        (_ar_inverse_with(detach="x", write="in place"), "depend on z_i only"),
        (lambda f, z: tarflow.TarFlowBlock._reverse_plain(SimpleNamespace(shift_and_log_scale=f, num_tokens=z.shape[1]),
                                                          z), "implement this yourself"),
    ],
    "check_tweedie_step": [
        (_tweedie_with(power=1), "sigma ** 2"),
        (_tweedie_with(sign=-1.0), "plus, not minus"),
        (_tweedie_with(reduce="mean"), "batch's mean log-density"),
        (_tweedie_with(copy="none"), "does not require grad"),
        (_tweedie_with(reduce="none"), "differentiate its sum"),
        (_tweedie_with(result="graph"), "still requires grad"),
        (_tweedie_with(copy="flag"), "set requires_grad on the y it was given"),
        (_tweedie_with(in_place=True), "changed y in place"),
        (_tweedie_with(enable_grad=False), "torch.enable_grad()"),
        (lambda log_density, y, sigma: _TWEEDIE(log_density, y, sigma), "implement this yourself"),
    ],
}


@pytest.mark.parametrize("checker, index", [(c, i) for c, wrongs in WRONG.items() for i in range(len(wrongs))])
def test_checker_gives_a_plausible_mistake_its_own_hint(checker, index, capsys):
    wrong, hint = WRONG[checker][index]
    with pytest.raises(exercises.CheckFailed) as failed:
        _check(checker, wrong)
    message = str(failed.value)
    assert message.startswith(f"✗ {checker}: check ") and hint in message, message
    assert capsys.readouterr().out == "", "a failed check says its message once, in the error"


def test_chapter_7_checkers_pass_correct_variants(capsys):
    exercises.check_hutchinson_divergence(_hutchinson_with(shared=True))  # one probe for the whole batch
    exercises.check_euler_sample(_euler_with(dtype=torch.float32))  # the times in float32
    assert capsys.readouterr().out.count("✓") == 2


def test_ch8_checkers_pass_correct_variants(capsys):
    exercises.check_causal_mask(lambda T: torch.arange(T)[None, :] <= torch.arange(T)[:, None])  # j <= i by aranges
    exercises.check_causal_mask(lambda T: ~_bool_ones(T).triu(1))  # not above the diagonal
    exercises.check_causal_mask(lambda T: torch.tril(torch.ones(T, T)).bool())
    exercises.check_autoregressive_inverse(_ar_inverse_with(write="list"))  # the tokens in a list, then stacked

    def ar_inverse_stacked(shift_and_log_scale, z):  # a growing list, the rest padded with zeros at each step
        xs, log_det = [], 0
        for i in range(z.shape[1]):
            t, s = shift_and_log_scale(torch.stack(xs + [torch.zeros_like(z[:, 0])] * (z.shape[1] - i), dim=1))
            xs.append(z[:, i] * (-s[:, i]).exp() - t[:, i])
            log_det = log_det - s[:, i].sum(-1)
        return torch.stack(xs, dim=1), log_det

    exercises.check_autoregressive_inverse(ar_inverse_stacked)
    exercises.check_tweedie_step(_tweedie_with(way="backward"))  # .backward() and y_.grad
    exercises.check_tweedie_step(_tweedie_with(way="torch.func"))  # torch.func.grad
    assert capsys.readouterr().out.count("✓") == 7


def test_ch8_checks_leave_flowbook_working_even_after_a_failed_one():
    with pytest.raises(exercises.CheckFailed, match="implement this yourself"):
        exercises.check_causal_mask(lambda T: _CAUSAL_MASK(T))
    with pytest.raises(exercises.CheckFailed, match="implement this yourself"):
        exercises.check_autoregressive_inverse(WRONG["check_autoregressive_inverse"][-1][0])
    assert torch.equal(tarflow.causal_mask(3), _bool_ones(3).tril())
    block = perturb_(tarflow.TarFlowBlock((1, 4, 4), patch_size=2, width=16, depth=1)).double()  # not the identity
    z = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x, ldj = block(z, torch.zeros(2, dtype=torch.float64), reverse=True, kv_cache=False)
    assert not torch.allclose(x, z)
    torch.testing.assert_close(block(x, ldj)[0], z, rtol=0, atol=1e-12)


def test_ch8_tweedie_checker_leaves_flowbook_denoise_working_after_switching_it_off():
    from flowbook import denoise

    with pytest.raises(exercises.CheckFailed, match=r"called .*tweedie_denoise.*implement this"):
        exercises.check_tweedie_step(lambda log_density, y, sigma: denoise.tweedie_denoise(log_density, y, sigma))
    assert denoise.tweedie_denoise(lambda y: -y.pow(2).sum(1) / 2, torch.ones(2, 3), 1.0).abs().max() == 0


@pytest.mark.parametrize("way", ["exact count", "float64 mean", "float32 mean", "torchmetrics", "chapter"])
def test_auc_checker_passes_every_correct_way_to_count(way, capsys):
    def separation_auc(in_scores, out_scores):
        if way == "chapter":  # the ROC curve and the trapezoid rule
            return SOLUTIONS["separation_auc"](in_scores, out_scores)
        if way == "torchmetrics":
            from torchmetrics.functional.classification import binary_auroc

            scores = torch.cat([in_scores, out_scores])
            labels = torch.cat([torch.zeros(len(in_scores)), torch.ones(len(out_scores))]).long()
            return binary_auroc(scores, labels).item()
        o, i = out_scores.view(-1, 1), in_scores.view(1, -1)
        if way == "exact count":
            return ((o > i).sum().item() + 0.5 * (o == i).sum().item()) / (len(out_scores) * len(in_scores))
        dtype = torch.float64 if way == "float64 mean" else torch.float32
        return ((o > i).to(dtype).mean() + 0.5 * (o == i).to(dtype).mean()).item()

    exercises.check_separation_auc(separation_auc)
    assert capsys.readouterr().out.startswith("✓ check_separation_auc: all")


def test_every_checker_names_the_mistakes_it_catches():
    for checker in CHECKS:
        doc = getattr(exercises, checker).__doc__
        assert "Catches:" in doc and doc.split("Catches:")[1].count("\n    - ") >= len(WRONG.get(checker, [1, 2])) - 1


def test_a_failed_check_and_an_unsolved_stub_are_one_line_each_in_a_notebook_without_a_traceback():
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from flowbook import exercises\nexercises.check_bits_per_dim(lambda ll, d: -ll / d)"),
        nbformat.v4.new_code_cell("import torch\n" + STUB_SOURCES["check_affine_coupling"] + "\nexercises.check_affine_coupling(AffineCoupling)")])
    NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True).execute()
    [error] = [o for o in nb.cells[0].outputs if o.output_type == "error"]
    assert error.ename == "CheckFailed" and len(error.traceback) == 1, error.traceback
    assert "divide by log 2" in error.traceback[0] and "exercises" not in error.traceback[0].split("✗")[0]
    assert not [o for o in nb.cells[0].outputs if o.output_type == "stream"], "the message is shown once"
    [stub] = [o for o in nb.cells[1].outputs if o.output_type == "error"]
    assert stub.ename == "NotImplementedError" and len(stub.traceback) == 1, stub.traceback
    assert "Exercise 1: implement AffineCoupling.forward" in stub.traceback[0]
    assert "switches off" not in stub.traceback[0] and "_harness" not in stub.traceback[0]


def test_flowbook_works_again_after_a_check_even_a_failed_one():
    with pytest.raises(exercises.CheckFailed):
        exercises.check_checkerboard_mask(lambda h, w, invert=False: create_checkerboard_mask(h, w, invert))
    with pytest.raises(exercises.CheckFailed):
        exercises.check_squeeze(lambda z, reverse=False: SqueezeFlow()(z, None, reverse)[0])
    assert create_checkerboard_mask(2, 2).tolist() == [[[[0.0, 1.0], [1.0, 0.0]]]]
    assert SqueezeFlow()(torch.zeros(1, 1, 2, 2), None)[0].shape == (1, 4, 1, 1)
    assert torch.nn.functional.pixel_unshuffle(torch.zeros(1, 1, 2, 2), 2).shape == (1, 4, 1, 1)


def test_a_crash_in_the_students_code_names_its_line(capsys):
    def squeeze(z, reverse=False):
        return z.view(3, -1)  # wrong numel: raises

    with pytest.raises(exercises.CheckFailed, match=r"your code raised RuntimeError \(line \d+ of test_exercises.py\)"):
        exercises.check_squeeze(squeeze)


@pytest.fixture
def short_training(monkeypatch):
    from flowbook.exercises import ch3

    for name, value in {"TRAIN_STEPS": 40, "TRAIN_IMAGES": 512, "VAL_IMAGES": 64, "TARGET_BPD": 6.0}.items():
        monkeypatch.setattr(ch3, name, value)


def _train_flow_with(wrong):
    """The chapter's training loop with one mistake (or a cheat) in it."""
    def train_flow(model, images, num_steps, batch_size=64, lr=3e-3):
        if wrong == "delegates":
            return pretrained.train_quick("simple")
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        model.train()
        losses, first = [], torch.randint(len(images), (batch_size,))
        for _ in range(num_steps):
            batch = images[first if wrong == "same_batch" else torch.randint(len(images), (batch_size,))]
            loss = model(batch)
            if wrong != "no_zero_grad" and wrong != "zero_grad_late":
                optimizer.zero_grad()
            loss.backward()
            if wrong == "zero_grad_late":
                optimizer.zero_grad()
            if wrong != "no_clip":
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5 if wrong == "clip_at_half" else 1.0)
            if wrong != "no_step":
                optimizer.step()
            losses.append(loss.item())
        return losses if wrong != "no_list" else None
    return train_flow


@pytest.mark.parametrize("wrong, hint", [
    ("no_step", "no parameter changed"), ("no_list", "return the list"), ("delegates", "implement this yourself"),
    ("no_zero_grad", "gradients add up across steps"), ("zero_grad_late", "stepped with a zero gradient"),
    ("no_clip", "unclipped"), ("clip_at_half", "clip the total norm at 1.0"), ("same_batch", "used the same batch"),
])
def test_train_flow_checker_names_the_mistake(short_training, wrong, hint):
    with pytest.raises(exercises.CheckFailed, match=re.escape(hint)):
        exercises.check_train_flow(_train_flow_with(wrong), SOLUTIONS["AffineCoupling"], SOLUTIONS["checkerboard_mask"])


def test_train_flow_checker_passes_the_chapter_solution_on_a_short_run(short_training, capsys):
    exercises.check_train_flow(SOLUTIONS["train_flow"], SOLUTIONS["AffineCoupling"], SOLUTIONS["checkerboard_mask"])
    assert "✓ check_train_flow" in capsys.readouterr().out


def test_solutions_edition_has_no_stubs_and_keeps_everything_else(tmp_path):
    for src in CHAPTERS:
        full = jupytext.read(src)
        edition = editions.make_edition(src, "solutions")
        assert not any("student" in c.metadata.get("tags", []) for c in edition.cells)
        assert len(edition.cells) == len(full.cells) - sum("student" in c.metadata.get("tags", []) for c in full.cells)


def test_student_edition_has_stubs_and_neither_solutions_nor_answers_and_key_has_answers(tmp_path):
    project_key = ROOT / "answers" / "answer_key.md"
    before = project_key.stat().st_mtime_ns if project_key.exists() else None
    written = editions.write_edition("student", tmp_path / "student", CHAPTERS)
    assert [p.stem for p in written] == [p.stem for p in CHAPTERS]
    assert (project_key.stat().st_mtime_ns if project_key.exists() else None) == before, \
        "an edition written elsewhere replaced the project's answer key"
    assert not list((tmp_path / "student").rglob("answer_key*")), "the answer key went into the folder handed out"
    for path in written:
        text = path.read_text()
        assert "NotImplementedError" in text and "**Answer.**" not in text
        assert not any("solution" in c.metadata.get("tags", []) for c in nbformat.read(path, 4).cells)
    key = (tmp_path / "answers" / "answer_key.md").read_text()
    assert key.count("**Answer.**") == len(_tagged_cells("answer")) >= len(CHAPTERS)
    assert key.count("**Solution.**") == len(_tagged_cells("student")) >= 14
    assert key.count("### Exercise") == len(_tagged_cells("answer")) + len(_tagged_cells("student"))
    for checker in CHECKS:  # each implementation exercise lists the mistakes its checker names
        assert f"`exercises.{checker}`" in key
        catches = [line.strip() for line in getattr(exercises, checker).__doc__.split("Catches:")[1].split("\n    - ")[1:]]
        assert catches and all(f"- {line}" in key for line in catches), checker


def test_student_edition_shows_no_solution_before_its_exercise():
    for src in CHAPTERS:
        cells = editions.make_edition(src, "student").cells
        code = "\n".join(c.source for c in cells if c.cell_type == "code")
        for shown in ("CouplingLayer.forward", "SqueezeFlow.forward", "SplitFlow.forward", "dequant_noise",
                      "toy.ToyCoupling.forward", "causal_mask", "tarflow.causal_mask", "tarflow)", "TarFlowBlock)",
                      "TarFlowBlock._reverse"):  # chapter 8: the mask and the reverse pass are exercises
            assert f"getsource({shown}" not in code and f"getsource(VariationalDequantization.{shown}" not in code
        assert all(editions.SPOILER_NOTE != c.source or c.cell_type == "markdown" for c in cells)
    full = [c for src in CHAPTERS for c in jupytext.read(src).cells if "spoiler" in c.metadata.get("tags", [])]
    assert len(full) >= 4 and sum("getsource" in c.source for c in full) >= 4


def _code_tokens(source):
    """The tokens of Python code with every name replaced by N and every number by 0, so that the same
    computation on other variables (`-uniform_ll / (D * math.log(2))`) reads the same."""
    import io
    import keyword
    import tokenize

    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
                out.append("N")
            elif tok.type == tokenize.NUMBER:
                out.append("0")
            elif tok.type == tokenize.OP or tok.type == tokenize.NAME:
                out.append(tok.string)
    except (tokenize.TokenError, IndentationError):
        pass
    return out


def _solution_expressions(source, min_tokens=9):
    """The token sequences of the right-hand sides and return values in a solution cell (the work it does):
    arithmetic of at least `min_tokens` tokens (shorter ones, like `z * mask`, and plain calls such as
    `flow(e, ldj, orig_img=cond)` say nothing on their own)."""
    import ast

    found = []
    for node in ast.walk(ast.parse(source)):
        value = node.value if isinstance(node, (ast.Assign, ast.Return, ast.AugAssign)) else None
        if value is not None:
            toks = _code_tokens(ast.unparse(value))
            if len(toks) >= min_tokens and any(t in "+-*/@" for t in toks):  # a computation, not a call
                found.append(toks)
    return found


def _contains(seq, sub):
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@pytest.mark.parametrize("source", CHAPTERS, ids=lambda p: p.stem)
def test_no_student_edition_cell_above_an_exercise_contains_its_solution(source):
    """Issue 19, item 13: the student edition must not show, above an exercise, code that computes what its
    solution computes (the same expression on other names counts)."""
    cells = jupytext.read(source).cells
    student = editions.make_edition(source, "student").cells
    exercises_start = next(i for i, c in enumerate(student) if c.cell_type == "markdown" and "## Exercises" in c.source)
    above = [_code_tokens(c.source) for c in student[:exercises_start] if c.cell_type == "code"]
    for c in cells:
        if "solution" not in c.metadata.get("tags", []):
            continue
        for expr in _solution_expressions(c.source):
            shown = [i for i, toks in enumerate(above) if _contains(toks, expr)]
            assert not shown, f"{source.name}: a cell above the exercises computes {' '.join(expr)} as the " \
                              f"solution\n{c.source}\ndoes"


def test_hidden_cells_still_run_in_the_student_edition():
    src = next(p for p in CHAPTERS if p.stem.startswith("02_"))
    cells = editions.make_edition(src, "student").cells
    hidden = [c for c in cells if "spoiler-run" in c.metadata.get("tags", [])]
    assert hidden and all("run_hidden(" in c.source and "logsumexp" not in c.source for c in hidden)
    ns = {}
    exec("x = 1", ns)
    assert ns["x"] == 1


def test_a_students_edited_notebook_survives_a_second_make_student(tmp_path):
    tmp_path = tmp_path / "student"  # the answer key goes beside it
    first = editions.write_edition("student", tmp_path, CHAPTERS[:2])
    work = nbformat.read(first[0], 4)
    work.cells[-1].source += "\n# my own notes"
    nbformat.write(work, first[0])
    mine = first[0].read_text()
    untouched_before = editions.fingerprint(nbformat.read(first[1], 4))
    again = editions.write_edition("student", tmp_path, CHAPTERS[:2])
    assert first[0].read_text() == mine, "the student's edited notebook was overwritten"
    assert again[0].name == f"{CHAPTERS[0].stem}.new.ipynb" and again[0].exists()
    assert again[1] == first[1] and editions.fingerprint(nbformat.read(first[1], 4)) == untouched_before
    editions.write_edition("student", tmp_path, CHAPTERS[:1], force=True)
    assert "my own notes" not in first[0].read_text()


def test_a_second_make_student_from_the_command_line_names_the_files_it_did_not_touch(tmp_path):
    import subprocess
    import sys

    run = [sys.executable, "-m", "flowbook.editions", "student", "--out", str(tmp_path / "student")]
    first = subprocess.run(run, cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    assert f"wrote {tmp_path / 'answers' / 'answer_key.md'}" in first.stdout, "it must say where the key went"
    tmp_path = tmp_path / "student"
    path = tmp_path / f"{CHAPTERS[0].stem}.ipynb"
    nb = nbformat.read(path, 4)
    nb.cells[0].source += " (edited)"
    nbformat.write(nb, path)
    result = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "NOT touched" in result.stdout and path.name in result.stdout
    assert "(edited)" in path.read_text()


def test_editions_refuse_the_sources_folder_and_name_broken_cells(tmp_path):
    with pytest.raises(editions.EditionError, match="never written into"):
        editions.write_edition("student", editions.NOTEBOOKS, CHAPTERS[:1])
    broken = tmp_path / "09_broken.py"
    broken.write_text('# %% [markdown]\n# A chapter\n\n# %%\nx = 1\n\n# %% tags=["solutoin"]\ny = 2\n')
    with pytest.raises(editions.EditionError, match=r"09_broken.py, cell 3: unknown tag 'solutoin'"):
        editions.make_edition(broken, "student")
    broken.write_text('# %% [markdown]\n# A chapter\n\n# %%\ndef f(:\n    pass\n')
    with pytest.raises(editions.EditionError, match=r"09_broken.py, cell 2, line 1: syntax error"):
        editions.write_edition("student", tmp_path / "out", [broken])
    assert not (tmp_path / "out").exists(), "nothing is written when a source is broken"


def test_student_edition_has_an_empty_answer_cell_under_each_conceptual_question():
    for src in CHAPTERS:
        cells = editions.make_edition(src, "student").cells
        full = jupytext.read(src).cells
        questions = sum("answer" in c.metadata.get("tags", []) for c in full)
        slots = [i for i, c in enumerate(cells) if c.source == editions.ANSWER_HERE]
        assert len(slots) == questions, src.name
        assert all(cells[i - 1].cell_type == "markdown" and "Exercise" in cells[i - 1].source for i in slots)

"""Chapter 2 checkers: the logit transform, the importance-weighted bound, variational dequantization."""
from __future__ import annotations

import math

import torch

from flowbook.exercises._harness import close, diagnose, expect, logdet, perturbed, reference, run_checks
from flowbook.layers import CouplingLayer, GatedConvNet, VariationalDequantization, create_checkerboard_mask
from flowbook.layers import dequantization
from flowbook.models import ImageFlow


def _logit_parts(u, alpha):
    p = (1 - alpha) * u + alpha / 2
    return torch.log(p) - torch.log1p(-p), (-torch.log(p) - torch.log1p(-p)).flatten(1).sum(1), \
        math.log(1 - alpha) * u[0].numel()


def check_logit_transform(logit_transform) -> None:
    """logit_transform(u [B, ...] in [0, 1], alpha) -> (y, ldj [B]), y = logit((1 - alpha) u + alpha / 2).

    Catches:
    - no squeeze by alpha (y = logit(u))
    - the D log(1 - alpha) term missing
    - the log-determinant with the wrong sign
    - ldj not summed to [B]
    - alpha fixed in the code instead of taken from the argument
    - infinite values at u = 0 or 1
    """
    torch.manual_seed(0)
    u = torch.rand(3, 1, 3, 3, dtype=torch.float64) * 0.98 + 0.01
    y_ref, logit_part, alpha_part = _logit_parts(u, 0.05)

    def values():
        y, _ = logit_transform(u, 0.05)
        diagnose(y, y_ref, {"y = logit(u): first squeeze u into [alpha/2, 1 - alpha/2] with p = (1 - alpha) u + alpha/2":
                     torch.log(u) - torch.log1p(-u)}, 1e-9)
        close(y, y_ref, "y", atol=1e-9)

    def ldj_shape():
        _, ldj = logit_transform(u, 0.05)
        expect(isinstance(ldj, torch.Tensor) and ldj.shape == (3,),
               f"ldj must have shape [B] = [3] (summed over all but the batch dimension), "
               f"got {list(getattr(ldj, 'shape', [])) or type(ldj).__name__}")

    def ldj_autograd():
        _, ldj = logit_transform(u, 0.05)
        diagnose(ldj, logit_part + alpha_part, {
            "the alpha term is missing: dp/du = 1 - alpha adds D log(1 - alpha)": logit_part,
            "the log-determinant has the wrong sign: dy/dp = 1 / (p (1 - p)) adds -log p - log(1 - p)":
                -(logit_part + alpha_part),
        }, 1e-8)
        with reference():
            expected = torch.stack([logdet(lambda v: logit_transform(v, 0.05)[0], ub) for ub in u])
        close(ldj, expected, "ldj against log|det J| from autograd", 1e-8)

    def other_alpha():
        y_other, logit_other, alpha_other = _logit_parts(u, 0.2)
        y, ldj = logit_transform(u, 0.2)
        close(y, y_other, "y with alpha = 0.2 (is alpha fixed at 0.05 in your code?)", 1e-9)
        close(ldj, logit_other + alpha_other, "ldj with alpha = 0.2 (is alpha fixed at 0.05 in your code?)", 1e-8)

    def edges():
        y, ldj = logit_transform(torch.tensor([[0.0, 1.0]]), 1e-5)
        expect(torch.isfinite(y).all() and torch.isfinite(ldj).all(), "u = 0 and u = 1 must give finite values")

    return run_checks("check_logit_transform", [("values", values), ("ldj shape", ldj_shape),
                                                ("ldj = log|det J|", ldj_autograd), ("alpha = 0.2", other_alpha),
                                                ("u at 0 and 1", edges)],
                      blocks=[dequantization.logit_transform])


def check_importance_weighted_bpd(iw_bpd) -> None:
    """iw_bpd(log_likelihoods [K, B] in nats, num_dims) -> [B] bpd of log((1/K) sum_k exp(ll_k)).

    Catches:
    - the mean of the log-likelihoods (Jensen) instead of the log of the mean likelihood
    - logsumexp without the - log K
    - nats instead of bits
    - exp() of real log-likelihoods underflows (no logsumexp)
    """
    torch.manual_seed(0)
    small = torch.randn(8, 5, dtype=torch.float64) * 3 - 20  # exp() of these is fine in float64
    d, ln2 = 784, math.log(2)

    def to_bpd(ll):
        return -ll / (d * ln2)

    def formula():
        got = iw_bpd(small, d)
        diagnose(got, to_bpd(torch.logsumexp(small, 0) - math.log(8)), {
            "you averaged the log-likelihoods (the Jensen bound): the K-sample bound averages the likelihoods, "
            "log((1/K) sum_k exp(ll_k))": to_bpd(small.mean(0)),
            "the - log K is missing: logsumexp sums the K likelihoods, the bound needs their mean":
                to_bpd(torch.logsumexp(small, 0)),
            "that is nats: divide by D log 2 for bits per dimension": -(torch.logsumexp(small, 0) - math.log(8)) / d,
        }, 1e-9)
        close(got, to_bpd(torch.logsumexp(small, 0) - math.log(8)), "bpd of the K-sample bound", 1e-9)

    def one_sample():
        close(iw_bpd(small[:1], d), to_bpd(small[0]), "with K = 1 it is the plain bpd", 1e-9)

    def stable():
        lls = torch.randn(4, 2, dtype=torch.float64) - 1e5
        out = iw_bpd(lls, d)
        expect(isinstance(out, torch.Tensor) and torch.isfinite(out).all(),
               "log-likelihoods around -1e5 nats (a real image's) give inf or nan: exp() underflows to 0. "
               "Use torch.logsumexp, which subtracts the maximum first")
        close(out, to_bpd(torch.logsumexp(lls, 0) - math.log(4)), "bpd for log-likelihoods around -1e5", 1e-9)

    def tighter():
        expect(bool((iw_bpd(small, d) <= to_bpd(small.mean(0)) + 1e-9).all()),
               "the K-sample bpd must never exceed the bpd of the mean log-likelihood (Jensen)")

    return run_checks("check_importance_weighted_bpd", [
        ("formula", formula), ("K = 1", one_sample), ("numerical stability", stable), ("tighter than Jensen", tighter),
    ], blocks=[(ImageFlow, "bits_per_dim")])


def _var_flows(size=4):
    torch.manual_seed(1)
    flows = [CouplingLayer(GatedConvNet(c_in=2, c_out=2, c_hidden=8, num_layers=1),
                           create_checkerboard_mask(size, size, invert=i % 2 == 1), c_in=1) for i in range(2)]
    return [perturbed(f, seed=i).double() for i, f in enumerate(flows)]


def check_vardeq_noise(vardeq_noise) -> None:
    """vardeq_noise(var_flows, x, u0, alpha) -> (u, ldj): the noise u [B, C, H, W] of variational
    dequantization for integer images x, from uniform noise u0 (logit, var_flows conditioned on x scaled to
    [-1, 1], sigmoid), and ldj [B], the log-determinant of u0 -> u.

    Catches:
    - the image passed to the couplings unscaled, or scaled to [0, 1] instead of [-1, 1]
    - the sigmoid's log-determinant missing
    - the sigmoid's log-determinant with the wrong sign
    - the logit's log-determinant missing
    - the coupling layers' log-determinants missing
    - alpha fixed in the code instead of taken from the argument
    - flowbook's dequant_noise, logit_transform or sigmoid_transform used (switched off, even when captured)
    """
    flows, alpha = _var_flows(), 0.05
    torch.manual_seed(0)
    x = torch.randint(0, 256, (3, 1, 4, 4))
    u0 = torch.rand(3, 1, 4, 4, dtype=torch.float64) * 0.9 + 0.05
    with reference():
        layer = VariationalDequantization(flows, alpha=alpha)
        u_ref, ldj_ref = layer.dequant_noise(x, torch.zeros(3, dtype=torch.float64), noise=u0)

    def run_flows(cond):
        e, ldj = dequantization.logit_transform(u0, alpha)
        for flow in flows:
            e, ldj = flow(e, ldj, orig_img=cond)
        return e, ldj

    def noise():
        u, _ = vardeq_noise(flows, x, u0, alpha)
        diagnose(u, u_ref, {
            "the image must be scaled to [-1, 1]: orig_img = x / 255 * 2 - 1, not x / 255":
                lambda: torch.sigmoid(run_flows(x.double() / 255)[0]),
            "the image must be scaled to [-1, 1]: orig_img = x / 255 * 2 - 1, not the raw integers":
                lambda: torch.sigmoid(run_flows(x.double())[0]),
        }, 1e-8)
        close(u, u_ref, "the noise u", 1e-8)
        expect(bool(((u > 0) & (u < 1)).all()), "u must lie in (0, 1): end with a sigmoid")

    def ldj_terms():
        _, ldj = vardeq_noise(flows, x, u0, alpha)
        expect(isinstance(ldj, torch.Tensor) and ldj.shape == (3,), f"ldj must have shape [B] = [3], got "
               f"{list(getattr(ldj, 'shape', [])) or type(ldj).__name__}")
        with reference():
            e, flow_ldj = run_flows(x.double() / 255 * 2 - 1)
            sig = dequantization.sigmoid_transform(e)[1]
            _, logit_ldj = dequantization.logit_transform(u0, alpha)
        diagnose(ldj, ldj_ref, {
            "the sigmoid's log-determinant is missing: add sum(log sigmoid(e) + log sigmoid(-e))": flow_ldj,
            "the sigmoid's log-determinant has the wrong sign: du/de = sigmoid(e) sigmoid(-e), whose log is "
            "-softplus(-e) - softplus(e)": flow_ldj - sig,
            "the logit's log-determinant is missing (the first step, u0 -> e, is part of the map too)":
                flow_ldj - logit_ldj + sig,
            "the coupling layers' log-determinants are missing: start from the logit's ldj and pass it through "
            "every flow": logit_ldj + sig,
        }, 1e-8)
        close(ldj, ldj_ref, "ldj", 1e-8)

    def other_alpha():
        with reference():
            u_other, ldj_other = VariationalDequantization(flows, alpha=0.2).dequant_noise(
                x, torch.zeros(3, dtype=torch.float64), noise=u0)
        u, ldj = vardeq_noise(flows, x, u0, 0.2)
        close(u, u_other, "u with alpha = 0.2 (is alpha fixed at 0.05 in your code?)", 1e-8)
        close(ldj, ldj_other, "ldj with alpha = 0.2 (is alpha fixed at 0.05 in your code?)", 1e-8)

    def autograd():
        _, ldj = vardeq_noise(flows, x, u0, alpha)
        with reference():
            expected = torch.stack([logdet(lambda v, i=i: vardeq_noise(flows, x[i:i + 1], v, alpha)[0], u0[i])
                                    for i in range(3)])
        close(ldj, expected, "ldj against log|det J| of u0 -> u from autograd", 1e-8)

    return run_checks("check_vardeq_noise", [("the noise u", noise), ("every log-determinant term", ldj_terms),
                                             ("alpha = 0.2", other_alpha), ("ldj = log|det J|", autograd)],
                      blocks=[(VariationalDequantization, "dequant_noise"), dequantization.logit_transform,
                              dequantization.sigmoid_transform])

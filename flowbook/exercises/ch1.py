"""Chapter 1 checkers: the change of variables and bits per dimension."""
from __future__ import annotations

import contextlib
import math

import torch
from torch.distributions import Normal, TransformedDistribution

from flowbook.exercises._harness import Delegated, _REFERENCE, close, diagnose, expect, run_checks


@contextlib.contextmanager
def _standard_normal_only():
    """While the student's code runs: Normal(loc, scale).log_prob works for the standard normal only (a
    Normal(shift, |scale|) is the answer without the change of variables), and TransformedDistribution, which
    does the change of variables for you, not at all."""
    normal, transformed = Normal.log_prob, TransformedDistribution.log_prob

    def standard(self, value):
        if not _REFERENCE[0] and not (bool((self.loc == 0).all()) and bool((self.scale == 1).all())):
            raise Delegated("your code scored x under Normal(shift, |scale|), which is the answer, not the change of "
                            "variables: map x back to z = (x - shift) / scale, score z under N(0, 1) and add the "
                            "volume term")
        return normal(self, value)

    def refused(self, value):
        if not _REFERENCE[0]:
            raise Delegated("your code used TransformedDistribution, which does the change of variables for you: "
                            "implement this yourself")
        return transformed(self, value)

    Normal.log_prob, TransformedDistribution.log_prob = standard, refused
    try:
        yield
    finally:
        Normal.log_prob, TransformedDistribution.log_prob = normal, transformed


def check_change_of_variables(log_prob_affine) -> None:
    """log_prob_affine(x, scale, shift) -> log p(x) for x = scale * z + shift, z ~ N(0, 1), elementwise.

    Catches:
    - no volume term (log N(z) alone)
    - the volume term with the wrong sign
    - log(scale) instead of log|scale| (NaN for a negative scale)
    - a density that does not integrate to one
    - the answer from Normal(shift, |scale|) instead of the change of variables
    - TransformedDistribution, which does the change of variables for you
    """
    x = torch.linspace(-4, 4, 17, dtype=torch.float64)
    student = log_prob_affine

    def log_prob_affine(*args):
        with _standard_normal_only():
            return student(*args)
    normal = torch.distributions.Normal(0.0, 1.0)

    def matches(scale, shift):
        def check():
            got = log_prob_affine(x, scale, shift)
            z = (x - shift) / scale
            right = torch.distributions.Normal(shift, abs(scale)).log_prob(x)
            diagnose(got, right, {
                "the volume term is missing: subtract log|scale| (the log of df/dx = 1 / scale)":
                    normal.log_prob(z),
                "the volume term has the wrong sign: log p(x) = log N(z) - log|scale|":
                    normal.log_prob(z) + math.log(abs(scale)),
            })
            close(got, right, f"log p(x) with scale={scale}, shift={shift}")
        return check

    def integrates_to_one():
        grid = torch.linspace(-30, 30, 60001, dtype=torch.float64)
        mass = torch.trapezoid(log_prob_affine(grid, 3.0, 1.0).exp(), grid).item()
        expect(abs(mass - 1) < 1e-4, f"the density integrates to {mass:.4f}, not 1: is the volume term -log|scale| there?")

    def negative_scale():
        got = log_prob_affine(x, -0.5, 1.0)
        expect(isinstance(got, torch.Tensor) and torch.isfinite(got).all(),
               "a negative scale gives NaN: the volume term is log|scale|, with the absolute value")
        matches(-0.5, 1.0)()

    return run_checks("check_change_of_variables", [
        ("identity", matches(1.0, 0.0)), ("shift", matches(1.0, 2.0)), ("scale", matches(2.5, 0.0)),
        ("density integrates to one", integrates_to_one), ("negative scale", negative_scale),
    ])


def check_bits_per_dim(bits_per_dim) -> None:
    """bits_per_dim(log_likelihood [B] in nats, num_dims) -> [B].

    Catches:
    - nats per dimension (no division by log 2)
    - the wrong sign
    """
    def uniform_is_8_bits():
        ll = torch.full((3,), -784 * math.log(256.0))
        got = bits_per_dim(ll, 784)
        diagnose(got, torch.full((3,), 8.0), {"that is nats per dimension: divide by log 2 as well to get bits": torch.full((3,), math.log(256.0)),
                       "the sign: a log-likelihood is negative, bits are positive": torch.full((3,), -8.0)}, 1e-4)
        close(got, torch.full((3,), 8.0), "a uniform model of 8-bit pixels", atol=1e-4)

    def general():
        ll = torch.tensor([-1000.0, -500.0])
        close(bits_per_dim(ll, 100), ll / (-100 * math.log(2)), "bpd = -log p / (D log 2)", atol=1e-4)

    return run_checks("check_bits_per_dim", [("8 bits for a uniform model", uniform_is_8_bits),
                                             ("nats to bits", general)])

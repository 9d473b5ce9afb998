"""Continuous normalizing flows: an ODE dx/dt = v(x, t) and its log-determinant, by an adaptive solver.

The instantaneous change of variables (Chen et al. 2018): along a solution x(t),
    d log p_t(x(t)) / dt = -div v(x(t), t),      div v = trace(dv/dx) = sum_i dv_i / dx_i.
`integrate` solves the ODE together with a(t), da/dt = div v, a(t0) = 0, from t0 to t1, and returns
(x(t1), a(t1)). Run from t0 = 1 (data) to t1 = 0 (latent), a(0) = -int_0^1 div v dt = log|det dx(0)/dx(1)|:
the log-determinant of the flow f: data -> latent, as every flowbook layer adds it to `ldj`.

The divergence is either exact (one backward pass per dimension: for the 2-D flows of chapter 7) or
Hutchinson's estimate eps^T (dv/dx) eps with one probe eps per solve (FFJORD, Grathwohl et al. 2019): one
vector-Jacobian product, unbiased, so log-likelihoods from it are unbiased estimates, not bounds.

The solver is torchdiffeq's `odeint` (adaptive Dormand-Prince "dopri5" by default, or fixed-step "euler",
"rk4", ...); flowbook writes no solver of its own.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torchdiffeq import odeint

from flowbook import noise

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
# torchdiffeq's fixed-grid methods: they step only between the requested times unless given a step size
FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams", "fixed_adams")


def divergence_exact(v: torch.Tensor, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """[B]: sum_i dv_i/dx_i of v(x) (v, x: [B, ...], v computed from x with autograd on), one backward pass
    per dimension of x[0]. Exact, and costs D passes: for small D."""
    v_flat = v.flatten(1)
    div = torch.zeros(x.shape[0], device=x.device, dtype=v.dtype)
    for i in range(v_flat.shape[1]):
        grad = torch.autograd.grad(v_flat[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0]
        div = div + grad.flatten(1)[:, i]
    return div


def divergence_hutchinson(v: torch.Tensor, x: torch.Tensor, eps: torch.Tensor,
                          create_graph: bool = False) -> torch.Tensor:
    """[B]: eps^T (dv/dx) eps for a probe eps [B, ...] with E[eps eps^T] = I, from one vector-Jacobian
    product. Its expectation over eps is the exact divergence."""
    vjp = torch.autograd.grad(v, x, eps, create_graph=create_graph)[0]
    return (vjp * eps).flatten(1).sum(dim=1)


def draw_probe(like: torch.Tensor, probe: str = "rademacher") -> torch.Tensor:
    """A probe of the shape of `like` [B, ...]: Rademacher (+-1, each with probability 1/2) or standard normal,
    drawn from `flowbook.noise` (so that an evaluation seeded per image draws each image's probe from its seed)."""
    if probe == "rademacher":
        return (noise.rand(like.shape, device=like.device) < 0.5).to(like.dtype) * 2 - 1
    if probe == "gaussian":
        return noise.randn(like.shape, device=like.device, dtype=like.dtype)
    raise ValueError(f"unknown probe {probe!r}; choose one of {PROBES}")


class _Dynamics(nn.Module):
    """The augmented right-hand side (dx/dt, da/dt) = (v(x, t), div v(x, t)) for torchdiffeq, with a count
    of the velocity's evaluations."""

    def __init__(self, velocity, divergence: str | None, eps: torch.Tensor | None, create_graph: bool):
        super().__init__()
        self.velocity, self.divergence, self.eps, self.create_graph = velocity, divergence, eps, create_graph
        self.nfe = 0

    def forward(self, t, state):
        self.nfe += 1
        if self.divergence is None:
            x = state
            return self.velocity(x, t.expand(x.shape[0]).to(x.dtype))
        x, _ = state
        with torch.enable_grad():
            if not x.requires_grad:
                x = x.requires_grad_(True)
            v = self.velocity(x, t.expand(x.shape[0]).to(x.dtype))
            if self.divergence == "exact":
                div = divergence_exact(v, x, create_graph=self.create_graph)
            else:
                div = divergence_hutchinson(v, x, self.eps, create_graph=self.create_graph)
        if not self.create_graph:
            v, div = v.detach(), div.detach()
        return v, div.to(x.dtype)


def integrate(velocity, x: torch.Tensor, t0: float, t1: float, *, divergence: str | None = None,
              probe: str = "rademacher", method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5,
              steps: int | None = None, create_graph: bool = False, return_nfe: bool = False):
    """Solve dx/dt = velocity(x, t) from x(t0) = x to t1.

    velocity: a callable (x [B, ...], t [B]) -> [B, ...]. divergence: None (only x(t1)), "exact" or
    "hutchinson" (with one `probe` per solve). method: a torchdiffeq method; adaptive ones ("dopri5")
    use rtol/atol, fixed-step ones ("euler", "rk4", ...: FIXED_STEP_METHODS) take `steps` equal steps and
    refuse to run without them (torchdiffeq would take one step for the whole interval). `steps` with the
    default "dopri5" means Euler steps; with another adaptive method it is refused. create_graph: keep
    the graph for a gradient of the result (maximum-likelihood training).

    An adaptive solver picks one step size for the whole batch (from an error norm over all of it), so a
    point's result depends, within the tolerance, on the batch it is solved with.

    Returns x(t1) [B, ...], or (x(t1), a) with a [B] = int_t0^t1 div v dt where a divergence is asked
    for; and the number of velocity evaluations last where `return_nfe`.
    """
    if divergence is not None and divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES} or None")
    options = {}
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if method == "dopri5":
            method = "euler"
        if method not in FIXED_STEP_METHODS:
            raise ValueError(f"steps={steps} needs a fixed-step method {FIXED_STEP_METHODS}; {method!r} is "
                             "adaptive: leave steps out and set rtol and atol")
        options = {"step_size": abs(t1 - t0) / steps}
    elif method in FIXED_STEP_METHODS:
        raise ValueError(f"the fixed-step method {method!r} needs steps (without, it would take a single step "
                         "from t0 to t1)")
    eps = draw_probe(x, probe) if divergence == "hutchinson" else None
    dynamics = _Dynamics(velocity, divergence, eps, create_graph)
    times = torch.tensor([t0, t1], device=x.device, dtype=x.dtype if x.dtype == torch.float64 else torch.float32)
    state = x if divergence is None else (x, torch.zeros(x.shape[0], device=x.device, dtype=x.dtype))
    out = odeint(dynamics, state, times, method=method, rtol=rtol, atol=atol, options=options or None)
    result = out[-1] if divergence is None else (out[0][-1], out[1][-1])
    return (result, dynamics.nfe) if return_nfe else result

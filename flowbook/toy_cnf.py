"""Continuous normalizing flows on chapter 1's 2-D data (chapter 7): one velocity network v(x, t), trained
either by maximum likelihood through the ODE or by flow matching, without it.

Convention as everywhere in flowbook: the data x sits at t = 1, the N(0, I) latent z at t = 0; f (data ->
latent) solves the ODE from t = 1 to t = 0, and log p(x) = log N(z) + a with a = -int_0^1 div v dt
(`flowbook.ode.integrate`). In two dimensions the divergence is computed exactly (two backward passes).
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from flowbook.flowmatch import LinearPath
from flowbook.ode import integrate
from flowbook.prior import gaussian_log_prob


class ToyVelocity(nn.Module):
    """v(x, t): [B, 2] and [B] -> [B, 2], a multilayer perceptron of (x, t) with smooth (SiLU) activations,
    so that the ODE's solution is smooth and an adaptive solver takes few steps."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, t.to(x.dtype).view(-1, 1).expand(x.shape[0], 1)], dim=1))


def log_prob(velocity, x, rtol: float = 1e-5, atol: float = 1e-5, create_graph: bool = False,
             return_nfe: bool = False):
    """[B]: log p(x) of points x [B, 2] under the continuous flow of `velocity`, with the exact divergence
    (and the number of velocity evaluations where `return_nfe`)."""
    (z, a), nfe = integrate(velocity, x, 1.0, 0.0, divergence="exact", rtol=rtol, atol=atol,
                            create_graph=create_graph, return_nfe=True)
    lp = gaussian_log_prob(z) + a
    return (lp, nfe) if return_nfe else lp


@torch.no_grad()
def sample(velocity, n: int, steps: int | None = None, seed: int | None = None, **solver):
    """[n, 2]: z ~ N(0, I) solved from t = 0 to t = 1 (adaptive, or `steps` Euler steps), in the dtype and
    on the device of `velocity`'s parameters (float32 on the CPU for a function without any)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    param = next(velocity.parameters(), None) if isinstance(velocity, torch.nn.Module) else None
    z = torch.randn(n, 2, generator=gen)
    if param is not None:
        z = z.to(device=param.device, dtype=param.dtype)
    return integrate(velocity, z, 0.0, 1.0, steps=steps, **solver)


def train_max_likelihood(data, steps: int = 300, lr: float = 3e-3, batch_size: int = 256, seed: int = 0,
                         rtol: float = 1e-4, atol: float = 1e-4, progress: bool = True):
    """Fit a ToyVelocity to `data` [N, 2] by maximum likelihood through the ODE (exact divergence, dopri5,
    backpropagating through the solver's steps). Returns (velocity, record) with the record's lists
    "loss" (negative log-likelihood, nats), "nfe" (velocity evaluations of each step's forward solve)
    and "seconds" (each step's wall time, backward included)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    velocity = ToyVelocity()
    opt = torch.optim.Adam(velocity.parameters(), lr=lr)
    record = {"loss": [], "nfe": [], "seconds": []}
    for _ in tqdm(range(steps), desc="maximum likelihood", disable=not progress, mininterval=2):
        start = time.perf_counter()
        batch = data[torch.randint(0, len(data), (batch_size,))]
        lp, nfe = log_prob(velocity, batch, rtol=rtol, atol=atol, create_graph=True, return_nfe=True)
        loss = -lp.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        record["loss"].append(loss.item())
        record["nfe"].append(nfe)
        record["seconds"].append(time.perf_counter() - start)
    return velocity.eval(), record


def train_flow_matching(data, steps: int = 2000, lr: float = 3e-3, batch_size: int = 256, seed: int = 0,
                        progress: bool = True):
    """Fit a ToyVelocity to `data` [N, 2] by conditional flow matching on the linear path (no ODE solved).
    Returns (velocity, record) with the lists "loss" and "seconds" per step."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    velocity, path = ToyVelocity(), LinearPath()
    opt = torch.optim.Adam(velocity.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    record = {"loss": [], "seconds": []}
    for _ in tqdm(range(steps), desc="flow matching", disable=not progress, mininterval=2):
        start = time.perf_counter()
        loss = path.loss(velocity, data[torch.randint(0, len(data), (batch_size,))])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        record["loss"].append(loss.item())
        record["seconds"].append(time.perf_counter() - start)
    return velocity.eval(), record

"""A two-dimensional flow for chapter 1: the change of variables you can see, trained in seconds.

The layers follow the same contract as the image layers, on z: [B, 2] and ldj: [B].
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from flowbook.prior import gaussian_log_prob


def sample_toy(name: str, n: int, seed: int | None = None) -> torch.Tensor:
    """[n, 2] samples of a toy density: "moons" (two interleaved half circles) or "ring" (8 Gaussians)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if name == "moons":
        t = torch.rand(n, generator=gen) * math.pi
        upper = torch.rand(n, generator=gen) < 0.5
        x = torch.where(upper, torch.cos(t), 1 - torch.cos(t))
        y = torch.where(upper, torch.sin(t), 0.5 - torch.sin(t))
        pts = torch.stack([x - 0.5, y - 0.25], dim=1) * 1.5
        return pts + 0.08 * torch.randn(n, 2, generator=gen)
    if name == "ring":
        k = torch.randint(0, 8, (n,), generator=gen).float() * (2 * math.pi / 8)
        centres = 2.0 * torch.stack([torch.cos(k), torch.sin(k)], dim=1)
        return centres + 0.2 * torch.randn(n, 2, generator=gen)
    raise ValueError(f"unknown toy density {name!r}; choose 'moons' or 'ring'")


class ToyCoupling(nn.Module):
    """Affine coupling on [B, 2]: coordinate `keep` conditions a shift t and log-scale s of the other.

    forward: z_o' = (z_o + t) * exp(s), ldj += s;  reverse: z_o = z_o' * exp(-s) - t, ldj -= s.
    s = tanh(s_raw) bounds the log-scale to (-1, 1); the last layer starts at zero (the identity).
    """

    def __init__(self, keep: int, hidden: int = 64):
        super().__init__()
        self.keep = keep
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z, ldj, reverse=False):
        kept, other = z[:, self.keep:self.keep + 1], z[:, 1 - self.keep:2 - self.keep]
        s, t = self.net(kept).chunk(2, dim=1)
        s = torch.tanh(s)
        other = (other + t) * torch.exp(s) if not reverse else other * torch.exp(-s) - t
        ldj = ldj + s.squeeze(1) if not reverse else ldj - s.squeeze(1)
        parts = [kept, other] if self.keep == 0 else [other, kept]
        return torch.cat(parts, dim=1), ldj


class ToyFlow(nn.Module):
    """A stack of `num_layers` ToyCouplings (alternating coordinates) with a N(0, I) prior on [B, 2]."""

    def __init__(self, num_layers: int = 8, hidden: int = 64):
        super().__init__()
        self.flows = nn.ModuleList(ToyCoupling(i % 2, hidden) for i in range(num_layers))

    def forward(self, x):
        """(z [B, 2], ldj [B]): the latent of data points x and log|det dz/dx|."""
        ldj = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for flow in self.flows:
            x, ldj = flow(x, ldj)
        return x, ldj

    def log_prob(self, x):
        """[B]: log p(x) = log N(z) + log|det dz/dx| (change of variables)."""
        z, ldj = self(x)
        return gaussian_log_prob(z) + ldj

    @torch.no_grad()
    def sample(self, n: int):
        """[n, 2]: z ~ N(0, I) pushed through every layer in reverse."""
        p = next(self.parameters())
        z = torch.randn(n, 2, dtype=p.dtype, device=p.device)
        ldj = torch.zeros(n, dtype=p.dtype, device=p.device)
        for flow in reversed(self.flows):
            z, ldj = flow(z, ldj, reverse=True)
        return z


def train_toy_flow(data: torch.Tensor, steps: int = 500, lr: float = 3e-3, batch_size: int = 256,
                   seed: int = 0, num_layers: int = 8):
    """Fit a ToyFlow to `data` [N, 2] by maximum likelihood; return (flow, list of the loss per step)."""
    torch.manual_seed(seed)
    flow = ToyFlow(num_layers)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        batch = data[torch.randint(0, len(data), (batch_size,))]
        loss = -flow.log_prob(batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return flow.eval(), losses


def main(argv=None):
    """python -m flowbook.toy --figure PATH: train the 2-D flow on the moons and save its picture."""
    import argparse

    import matplotlib
    matplotlib.use("Agg")
    from flowbook import viz

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--figure", required=True)
    parser.add_argument("--steps", type=int, default=3000)
    args = parser.parse_args(argv)
    data = sample_toy("moons", 4000, seed=0)
    flow, _ = train_toy_flow(data, steps=args.steps)
    torch.manual_seed(0)
    fig = viz.plot_density_2d(flow.log_prob, data=data[:2000], samples=flow.sample(2000),
                              title="A normalizing flow learns the two moons: its density and its samples")
    fig.savefig(args.figure, dpi=100)


if __name__ == "__main__":
    main()

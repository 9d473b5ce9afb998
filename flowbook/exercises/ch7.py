"""Chapter 7 checkers: Hutchinson's divergence estimate, the conditional flow-matching loss, an Euler sampler."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torchdiffeq

from flowbook import ode
from flowbook.exercises._harness import close, expect, perturbed, reference, run_checks
from flowbook.flowmatch import LinearPath


def _field(dim=6, seed=0):
    torch.manual_seed(seed)
    net = perturbed(nn.Sequential(nn.Linear(dim + 1, 32), nn.Tanh(), nn.Linear(32, dim)).double(), scale=0.3)

    def velocity(x, t):
        return net(torch.cat([x, t.to(x.dtype).view(-1, 1)], dim=1))
    return velocity


def _exact_and_variances(velocity, x, t):
    """Exact divergences [B] and each point's Rademacher and Gaussian one-probe variances [B]."""
    with reference():
        jac = torch.stack([torch.autograd.functional.jacobian(lambda v: velocity(v.unsqueeze(0), tb.view(1))[0], xb)
                           for xb, tb in zip(x, t)])
    sym = (jac + jac.transpose(1, 2)) / 2
    frob, diag = sym.pow(2).sum((1, 2)), sym.diagonal(dim1=1, dim2=2).pow(2).sum(1)
    return jac.diagonal(dim1=1, dim2=2).sum(1), 2 * (frob - diag), 2 * frob


def check_hutchinson_divergence(hutchinson_divergence) -> None:
    """hutchinson_divergence(velocity, x, t, num_probes) -> [B] estimates of div v(x, t), each the mean of
    num_probes Rademacher probes eps^T (dv/dx) eps, from vector-Jacobian products.

    Catches:
    - the vector-Jacobian product summed without multiplying by the probe again (eps^T J 1, mean zero)
    - probes of 0s and 1s instead of -1s and +1s (E[eps eps^T] is not I: biased)
    - Gaussian probes where the exercise asks for Rademacher ones (a larger variance)
    - probes summed instead of averaged
    - the wrong sign, or a mean over the dimensions instead of their sum
    - v evaluated at another time than the given t
    - a result that keeps its graph, or has the wrong shape
    - a sum over dimension 1 only, which fits points [B, D] but not images [B, C, H, W]
    - the exact Jacobian (switched off: the point is one backward pass per probe)
    """
    field = _field()
    times_seen = []

    def velocity(x, t):
        times_seen.append(t.detach().clone() if isinstance(t, torch.Tensor) else t)
        return field(x, t)

    x, t = torch.randn(3, 6, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    exact, var_rademacher, var_gauss = _exact_and_variances(field, x, t)
    n = 3000
    big_x, big_t = x.repeat(n, 1), t.repeat(n)

    def shape():
        times_seen.clear()
        got = hutchinson_divergence(velocity, x, t, 1)
        expect(isinstance(got, torch.Tensor) and got.shape == (3,),
               f"expected a tensor of shape [B] = [3], got {list(getattr(got, 'shape', [])) or type(got).__name__}")
        expect(not got.requires_grad, "return the estimate without its graph (.detach())")
        expect(all(isinstance(s, torch.Tensor) and s.shape == t.shape and torch.allclose(s.double(), t)
                   for s in times_seen), "evaluate v at the given times: velocity(x, t), not another t")
        images = hutchinson_divergence(lambda v, tt: velocity(v.flatten(1), tt).view_as(v), x.view(3, 2, 3), t, 1)
        expect(isinstance(images, torch.Tensor) and images.shape == (3,),
               f"for x of shape [B, C, W] = [3, 2, 3] (images have more than one dimension after the batch) the "
               f"result must still be [B] = [3], got {list(getattr(images, 'shape', [])) or type(images).__name__}: "
               "sum over every dimension but the first, e.g. .flatten(1).sum(1)")

    def unbiased():
        got = hutchinson_divergence(velocity, big_x, big_t, 1).view(n, 3)
        if got.std(0).min() <= 1e-6:  # one probe shared by the batch: draw the spread from separate calls instead
            got = torch.stack([hutchinson_divergence(velocity, x, t, 1) for _ in range(600)])
        mean, stderr = got.mean(0), got.std(0) / math.sqrt(len(got))
        expect(got.std(0).min() > 1e-6, "every estimate equals the exact divergence: use one random probe per "
               "estimate, eps^T (dv/dx) eps, not the full Jacobian")
        near_zero, near_exact = (mean.abs() < 5 * stderr).all(), ((mean - exact).abs() < 5 * stderr).all()
        expect(near_exact or not near_zero, "the estimates average to 0: multiply the vector-Jacobian product "
               "eps^T J by the probe again and sum, (vjp * eps).sum(), instead of summing the product alone")
        off = ((mean - exact).abs() / stderr).max().item()
        expect(off < 5 or ((mean + exact).abs() > 5 * stderr).any(), "the estimates average to minus the "
               "divergence: check the sign, eps^T (dv/dx) eps")
        expect(off < 5 or ((mean - exact / 6).abs() > 5 * stderr).any(), "the estimates average to the divergence "
               "divided by the number of dimensions: sum (vjp * eps) over the dimensions, do not average it")
        expect(off < 5, f"the mean of {len(got)} estimates is off the exact divergence by {off:.1f} standard errors: "
               "the estimate is biased. A probe needs E[eps eps^T] = I, entries -1 and +1 "
               "(torch.randint(0, 2, shape) * 2 - 1), not 0 and 1; and each point gets its own estimate")
        log_var = got.var(0).log()  # nearer, over the three points, to Gaussian probes' variance than to Rademacher's?
        gaussian = (log_var - var_gauss.log()).abs().sum() < (log_var - var_rademacher.log()).abs().sum()
        expect(not gaussian, "these estimates have the variance of Gaussian probes: the exercise asks for "
               "Rademacher probes, entries -1 and +1")

    def averaged():
        got = hutchinson_divergence(velocity, big_x[:3 * 500], big_t[:3 * 500], 16).view(500, 3)
        if got.std(0).min() <= 1e-9:  # probes shared by the batch: separate calls
            got = torch.stack([hutchinson_divergence(velocity, x, t, 16) for _ in range(300)])
        mean, stderr = got.mean(0), got.std(0) / math.sqrt(len(got))
        sixteen_times = ((mean - 16 * exact).abs() < 5 * stderr).all() and ((mean - exact).abs() > 5 * stderr).any()
        expect(not sixteen_times, "with num_probes = 16 the result is 16 times too large: average the probes' "
               "estimates, do not sum them")
        off = ((mean - exact).abs() / (stderr + 1e-12)).max().item()
        expect(off < 5, f"with num_probes = 16 the mean is off the exact divergence by {off:.1f} standard errors")
        ratio = (got.var(0) * 16 / var_rademacher).mean().item()
        expect(0.6 < ratio < 1.6, f"with num_probes = 16 the variance should be 1/16 of one probe's; it is "
               f"{ratio:.2f}/16: use a new probe for each of the num_probes estimates and average them")

    run_checks("check_hutchinson_divergence", [("shape", shape), ("unbiased", unbiased), ("averaged", averaged)],
               blocks=[ode.divergence_hutchinson, ode.divergence_exact, ode.draw_probe,
                       torch.autograd.functional.jacobian, (torch.func, "jacrev"), (torch.func, "jacfwd")])


def check_cfm_loss(cfm_loss) -> None:
    """cfm_loss(velocity, x1) -> the mean of |v(x_t, t) - (x1 - x0)|^2 with t ~ U[0, 1] per example,
    x0 ~ N(0, I) and x_t = (1 - t) x0 + t x1.

    Catches:
    - the velocity's sign (x0 - x1)
    - t not uniform on [0, 1] (torch.randn, or one t for the whole batch)
    - x0 and x1 swapped in the path (the data at t = 0)
    - the data x1 as the target instead of the velocity
    - a sum instead of a mean
    - a loss without a graph (v detached, or computed under no_grad): nothing could train on it
    - t on a grid instead of drawn at random
    - t shaped for data [B, D] only (t.view(-1, 1)): images [B, C, H, W] need t broadcast over every dimension
    - flowbook's LinearPath (switched off)
    """
    n, torch_gen = 4096, torch.Generator().manual_seed(0)
    x1 = 6 + 0.1 * torch.randn(n, 3, generator=torch_gen, dtype=torch.float64)
    calls = []
    weight = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)  # a parameter the loss must reach

    def velocity(x, t):
        calls.append((x.detach().clone(), t.detach().clone() if isinstance(t, torch.Tensor) else t))
        tt = t if isinstance(t, torch.Tensor) else torch.tensor(float(t))
        return weight * x + tt.to(x.dtype).reshape(-1, 1)

    state = {}

    def called():
        state["loss"] = cfm_loss(velocity, x1)
        expect(len(calls) == 1, f"call velocity once, on the whole batch; it was called {len(calls)} times")
        xt, t = calls[0]
        expect(xt.shape == x1.shape, f"velocity must get x_t of the data's shape {list(x1.shape)}, got {list(xt.shape)}")
        expect(isinstance(t, torch.Tensor) and t.shape == (n,),
               f"velocity must get t as a tensor [B] = [{n}], one time per example, got "
               f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")

    def times():
        t = calls[0][1].double()
        expect(t.std() > 0.01, "draw one t per example (torch.rand(B)), not one for the whole batch")
        expect(t.min() >= 0 and t.max() <= 1, "t must lie in [0, 1]: torch.rand, not torch.randn")
        expect(not (t.diff() >= 0).all(), "draw t at random for each example (torch.rand(B)), not on a grid")
        expect(abs(t.mean() - 0.5) < 0.03 and abs(t.std() - math.sqrt(1 / 12)) < 0.02,
               f"t must be uniform on [0, 1]: mean {t.mean():.3f} (expected 0.5), std {t.std():.3f} (expected 0.289)")

    def path():
        xt, t = calls[0]
        tb = t.double().view(-1, 1)
        keep = (t > 0.02).squeeze() & (t < 0.98).squeeze()
        x0 = ((xt - tb * x1) / (1 - tb))[keep]
        swapped = ((xt - (1 - tb) * x1) / tb)[keep]
        if abs(x0.mean()) > 0.1 or abs(x0.std() - 1) > 0.1:
            expect(not (abs(swapped.mean()) < 0.1 and abs(swapped.std() - 1) < 0.1),
                   "x_t = (1 - t) x0 + t x1 puts the noise at t = 0 and the data at t = 1: you swapped x0 and x1, "
                   "or passed velocity another time (1 - t) than the one x_t was built with")
            expect(False, "x_t is not on the linear path from x0 ~ N(0, I) at t = 0 to x1 at t = 1: "
                   "x_t = (1 - t) x0 + t x1")
        state["x0"] = (xt - tb * x1) / (1 - tb)

    def value():
        loss = state["loss"]
        expect(isinstance(loss, torch.Tensor) and loss.numel() == 1, "return the loss as a scalar tensor")
        expect(loss.requires_grad, "the loss has no graph, so nothing can train on it: do not detach v(x_t, t) or "
               "compute the loss under torch.no_grad()")
        weight.grad = None
        loss.backward()
        expect(weight.grad is not None and weight.grad != 0, "the loss's gradient does not reach the velocity "
               "network: compute it from velocity(x_t, t) itself")
        xt, t = calls[0]
        v, x0 = 0.5 * xt + t.double().view(-1, 1), state["x0"]
        right = (v - (x1 - x0)).pow(2).mean()
        for wrong, hint in (((v - (x0 - x1)).pow(2).mean(), "the path's velocity is dx_t/dt = x1 - x0, not x0 - x1"),
                            ((v - x1).pow(2).mean(), "the target is the path's velocity x1 - x0, not the data x1"),
                            ((v - (x1 - x0)).pow(2).sum(), "take the mean over the batch and the dimensions, not the sum"),
                            ((v - (x1 - x0)).pow(2).sum(1).mean(), "take the mean over the dimensions too, not their "
                             "sum (the exercise asks for the mean over everything)")):
            expect(abs(loss.double().item() - wrong.item()) > 1e-6 * abs(wrong.item()), hint)
        close(loss.double().reshape(()), right.reshape(()), "the loss mean |v(x_t, t) - (x1 - x0)|^2", 1e-6 * right.item())

    def images():
        imgs = 6 + 0.1 * torch.randn(512, 1, 2, 2, generator=torch_gen, dtype=torch.float64)
        seen = []

        def image_velocity(x, t):
            seen.append((x.detach().clone(), t.detach().clone() if isinstance(t, torch.Tensor) else t))
            return weight * x + torch.as_tensor(t).to(x.dtype).reshape(-1, 1, 1, 1)

        loss = cfm_loss(image_velocity, imgs)
        expect(isinstance(loss, torch.Tensor) and loss.numel() == 1, "for images [B, C, H, W] return a scalar too")
        xt, t = seen[-1]
        expect(xt.shape == imgs.shape and isinstance(t, torch.Tensor) and t.numel() == len(imgs),
               f"for images [B, C, H, W] = {list(imgs.shape)} velocity must get x_t of that shape and one t per image")
        tb = t.double().reshape(-1, 1, 1, 1)
        keep = (t.reshape(-1) > 0.02) & (t.reshape(-1) < 0.98)
        x0 = ((xt - tb * imgs) / (1 - tb))[keep]
        expect(abs(x0.mean()) < 0.1 and abs(x0.std() - 1) < 0.1, "on images [B, C, H, W] x_t is not on the linear "
               "path: t [B] must broadcast over every dimension of x1, t.view(-1, *[1] * (x1.dim() - 1)), "
               "not t.view(-1, 1), which fits data [B, D] only")

    run_checks("check_cfm_loss", [("velocity called on x_t and t", called), ("t ~ U[0, 1]", times),
                                  ("the linear path", path), ("the loss", value), ("images [B, C, H, W]", images)],
               blocks=[(LinearPath, "loss"), (LinearPath, "interpolate")])


def _euler_reference(velocity, z, steps):
    x, h = z, 1.0 / steps
    for k in range(steps):
        x = x + h * velocity(x, torch.full((x.shape[0],), k * h, dtype=x.dtype))
    return x


def check_euler_sample(euler_sample) -> None:
    """euler_sample(velocity, z, steps) -> x(1): `steps` Euler steps x <- x + h v(x, t_k), t_k = k h, h = 1/steps,
    from t = 0.

    Catches:
    - v evaluated at the end of each step (t_k = (k + 1) h) instead of its start
    - the wrong direction (from t = 1 back to 0)
    - a step size or a number of steps other than 1/steps and steps
    - t passed as a number instead of a tensor [B]
    - z changed in place (x += ...)
    - flowbook's solver or torchdiffeq (switched off)
    """
    calls = []

    def velocity(x, t):
        calls.append(t)
        expect(isinstance(t, torch.Tensor) and t.shape == (x.shape[0],),
               f"pass t to velocity as a tensor [B] = [{x.shape[0]}] (torch.full((B,), t_k, dtype=z.dtype)), got "
               f"{list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        t = t.to(x.dtype)
        return -x * (1 + 2 * t.view(-1, 1)) + torch.cos(3 * t).view(-1, 1)

    z = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def steps_taken():
        calls.clear()
        euler_sample(velocity, z, 5)
        expect(len(calls) == 5, f"with steps = 5, evaluate v 5 times (once per step), not {len(calls)} times")

    def result():
        for steps in (1, 4, 10):
            calls.clear()
            start = z.clone()
            got = euler_sample(velocity, start, steps)
            expect(torch.equal(start, z), "your sampler changed z in place (x += ...): start from x = z and build "
                   "new tensors, x = x + h * v")
            with reference():
                calls_before = len(calls)
                right = _euler_reference(velocity, z, steps)
                h = 1.0 / steps
                late, x = z, z
                for k in range(steps):
                    late = late + h * velocity(late, torch.full((4,), (k + 1) * h, dtype=z.dtype))
                back = z
                for k in range(steps):
                    back = back - h * velocity(back, torch.full((4,), 1 - k * h, dtype=z.dtype))
                del calls[calls_before:]
            expect(isinstance(got, torch.Tensor) and got.shape == z.shape, f"return x(1) of z's shape {list(z.shape)}")
            if (got - right).abs().max() > 1e-6:
                expect((got - late).abs().max() > 1e-6, "evaluate v at the start of each step, t_k = k / steps "
                       "(k = 0 .. steps - 1), not at its end")
                expect((got - back).abs().max() > 1e-6, "sampling runs from t = 0 (noise) to t = 1 (data): "
                       "x <- x + h v(x, t) with t growing from 0")
            close(got, right, f"x(1) after {steps} Euler steps", 1e-6)

    run_checks("check_euler_sample", [("one evaluation per step", steps_taken), ("x(1)", result)],
               blocks=[ode.integrate, torchdiffeq.odeint])

"""Chapter 8 checkers: the causal attention mask, the autoregressive inverse of a TarFlow block, a Tweedie step."""
from __future__ import annotations

import math

import torch
from torch.autograd.functional import jacobian

from flowbook import denoise
from flowbook.exercises._harness import close, diagnose, expect, perturbed, reference, run_checks
from flowbook.layers import tarflow
from flowbook.layers.tarflow import TarFlowBlock


def _block(seed=0):
    """A small TarFlow block in float64, moved away from its identity start: 8 tokens of 4 values. Built from its
    own seed without touching the notebook's random state."""
    with torch.random.fork_rng(devices=[]), reference():
        torch.manual_seed(seed)
        block = TarFlowBlock((1, 4, 8), patch_size=2, width=16, depth=2, heads=1).double()
    return perturbed(block, scale=0.3, seed=seed)


def _tokens(block, batch=3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, block.num_tokens, block.token_dim, generator=gen, dtype=torch.float64)


def _shape(v) -> str:
    return str(list(v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__


# Exercise 1: the causal mask ----------------------------------------------------------------------------

def _mask_mistakes(T):
    right = torch.ones(T, T, dtype=torch.float64).tril()
    return {
        "your mask is True above the diagonal (j >= i): rows are the queries i and columns the keys j, so query i "
        "sees the keys after it, the future. That is the upper triangle (torch.triu), or the lower one transposed "
        "(with aranges, compare arange(T)[:, None] >= arange(T)[None, :], not <=)": right.T,
        "your mask is True only where j < i (strictly lower, tril(-1)): a query may not attend to itself, so row 0 "
        "has no key at all, a softmax over nothing, which scaled_dot_product_attention turns into NaN or zeros "
        "(depending on the torch version and backend). Causality needs no strict mask: TarFlowBlock already shifts "
        "the tokens by one place (a start token, then x_0 .. x_{T-2}), and that shift is what makes token i's "
        "parameters depend on tokens < i only. The mask lets position i see j <= i, itself included":
            right.tril(-1),
        "your mask is True where attention is forbidden (j > i): that is nn.MultiheadAttention's convention for a "
        "boolean mask; scaled_dot_product_attention's is the opposite, True where query i MAY attend to key j "
        "(j <= i)": 1 - right,
        "your mask is True everywhere: that is no mask at all, every query sees every key, the future included; "
        "True only where j <= i": torch.ones(T, T, dtype=torch.float64),
    }


def check_causal_mask(causal_mask) -> None:
    """causal_mask(T) -> [T, T] torch.bool, True where query i may attend to key j: j <= i (the lower triangle,
    diagonal included), the mask scaled_dot_product_attention takes. Checked as a tensor, inside a TarFlowBlock
    (a later token must not change an earlier token's (t, s), and token k must reach every later token's), and
    entry by entry for several T. flowbook's causal_mask is switched off; torch.tril and torch.triu are not (the
    exercise is to know which triangle, not to build one by hand).

    Catches:
    - the upper triangle (torch.triu)
    - the lower triangle transposed (.T), or aranges compared the other way (arange(T)[:, None] <= arange(T))
    - strictly lower (j < i): row 0 has no key (NaN or zeros); the block's shift by one already makes it causal
    - True where attention is forbidden (nn.MultiheadAttention's convention, the opposite of SDPA's)
    - all True (no mask)
    - a float 0/1 mask (scaled_dot_product_attention adds a float mask to the scores)
    - an additive float mask (0 and -inf): SDPA takes it, but the exercise asks for the boolean form
    - an integer dtype instead of torch.bool
    - another shape than [T, T] (e.g. [1, 1, T, T])
    - a mask that hides too much (e.g. the diagonal alone): a token's parameters miss earlier tokens
    - flowbook's causal_mask (switched off, also through a reference taken before the check)
    """
    block = _block()
    T = block.num_tokens
    x = _tokens(block, batch=2)
    k = T // 2
    later = x.clone()
    later[:, k] += 1.0  # change token k only

    def tensor():
        m = causal_mask(5)
        expect(isinstance(m, torch.Tensor), f"expected a torch.Tensor, got {type(m).__name__}")
        expect(m.shape == (5, 5), f"causal_mask(5) must have shape [T, T] = [5, 5], got {list(m.shape)} "
               "(scaled_dot_product_attention broadcasts it over the batch and the heads)")
        if m.is_floating_point():
            additive = bool(torch.isinf(m).any())
            expect(not additive, "your mask is an additive float mask (0 where allowed, -inf where not), which "
                   "scaled_dot_product_attention also accepts; the exercise asks for the boolean form: "
                   "dtype torch.bool, True where query i may attend to key j (j <= i)")
            expect(False, f"your mask is {m.dtype}: scaled_dot_product_attention ADDS a float mask to the attention "
                   "scores, so 0s and 1s hide nothing (they only favour the keys marked 1 by a factor e). Return a "
                   "boolean mask, dtype torch.bool, True where query i may attend to key j")
        expect(m.dtype == torch.bool, f"return a boolean mask (dtype torch.bool), got {m.dtype}")

    def in_block():
        m = causal_mask(T)
        block.mask = m
        try:
            with torch.no_grad():
                t, s = block.shift_and_log_scale(x)
                t2, s2 = block.shift_and_log_scale(later)
        finally:
            with reference():
                block.mask = tarflow.causal_mask(T)
        finite = bool(torch.isfinite(t).all() and torch.isfinite(s).all())
        params, params2 = torch.cat([t, s], -1), torch.cat([t2, s2], -1)
        changed = [(params[:, i] - params2[:, i]).abs().max().item() > 1e-12 for i in range(T)]
        leak = any(changed[:k + 1])
        blind = not all(changed[k + 1:])
        if not finite or leak or blind:
            diagnose(m.double(), torch.ones(T, T, dtype=torch.float64).tril(), _mask_mistakes(T), 0)
        expect(finite, "with your mask, the block's (t, s) have NaN: a row of your mask without any True is a "
               "query with no key (a softmax over nothing); every query i may attend to keys j <= i")
        first = changed.index(True) if leak else None
        unseen = changed.index(False, k + 1) if blind else None
        expect(not leak, f"with your mask in a TarFlowBlock, changing token {k} changed the (t, s) of token "
               f"{first}: a token's parameters saw a later token. Query i may attend only to keys j <= i")
        expect(not blind, f"with your mask in a TarFlowBlock, changing token {k} did not change the (t, s) of "
               f"token {unseen}: your mask hides keys that query i may see (j <= i, itself "
               "included)")

    def values():
        for t in (1, 2, 3, 16):
            m = causal_mask(t)
            right = torch.ones(t, t, dtype=torch.bool).tril()
            expect(isinstance(m, torch.Tensor) and m.shape == (t, t) and m.dtype == torch.bool,
                   f"causal_mask({t}) must be a torch.bool tensor [{t}, {t}], got {_shape(m)} "
                   f"{getattr(m, 'dtype', '')}")
            diagnose(m.double(), right.double(), _mask_mistakes(t), 0)
            wrong = (m != right).nonzero().tolist()
            if wrong:
                i, j = wrong[0]
                expect(False, f"causal_mask({t}) differs from j <= i at {len(wrong)} entries, e.g. (i, j) = ({i}, "
                       f"{j}): expected {bool(right[i, j])}. True exactly where key j is at or before query i, "
                       "the lower triangle with the diagonal")

    run_checks("check_causal_mask", [("a boolean [T, T] tensor", tensor),
                                     ("in a TarFlowBlock: token i's (t, s) from tokens < i", in_block),
                                     ("values for T = 1, 2, 3, 16", values)],
               blocks=[(tarflow, "causal_mask")])  # named flowbook.layers.tarflow.causal_mask in the message


# Exercise 2: the autoregressive inverse ----------------------------------------------------------------

def _inverse_variant(f, z, params="x", scale=1.0, shift=1.0, order="scale then shift"):
    """The token-by-token inverse with one thing changed (the right one with the defaults); x only."""
    if params in ("z", "zeros"):
        t, s = f(z if params == "z" else torch.zeros_like(z))
        return z * torch.exp(-scale * s) - shift * t
    xs = []
    for i in range(z.shape[1]):
        done = torch.stack(xs + [torch.zeros_like(z[:, 0])] * (z.shape[1] - i), dim=1)
        t, s = (p[:, i] for p in f(done))
        if order == "scale then shift":
            xs.append(z[:, i] * torch.exp(-scale * s) - shift * t)
        else:
            xs.append((z[:, i] - t) * torch.exp(-scale * s))
    return torch.stack(xs, dim=1)


def check_autoregressive_inverse(ar_inverse) -> None:
    """ar_inverse(shift_and_log_scale, z) -> (x, log_det): the inverse of a TarFlow block's forward
    z_i = (x_i + t_i) * exp(s_i), for latent tokens z [B, T, D]. Token by token, i = 0 .. T-1:
    (t, s) = shift_and_log_scale(x) [B, T, D] each, whose row i reads only the tokens x_<i already
    inverted; x_i = z_i * exp(-s_i) - t_i. log_det [B] = -sum of s over tokens and dimensions, the
    log-determinant of z -> x. Checked in float64 on a perturbed block (8 tokens of 4 values): the round trip
    x -> forward -> z -> your inverse -> x, log_det against the forward's ldj and against autograd.

    Catches:
    - (t, s) from z in one parallel pass (only token 0 right)
    - (t, s) from a zero-filled x in one pass, never recomputed (only token 0 right)
    - exp(s) instead of exp(-s) (the forward again, not its inverse)
    - t added instead of subtracted
    - t subtracted before unscaling ((z - t) * exp(-s))
    - log_det with the wrong sign
    - log_det a mean of s instead of a sum (the per-dimension mean of TarFlow's reference code)
    - log_det summed over the batch (one number)
    - in-place writes into x (x[:, i] = ...) after shift_and_log_scale read it: autograd fails
    - x built in z itself (z changed in place)
    - no graph (torch.no_grad or .detach() inside)
    - a prefix x[:, :i + 1] passed to shift_and_log_scale instead of the whole sequence
    - x in another dtype than z (torch.zeros(z.shape) is float32)
    - x of another shape than z's
    - z detached (autograd sees no path from z to x)
    - a detached x fed to shift_and_log_scale (x_i then depends on z_i alone for autograd, though the round trip holds)
    - TarFlowBlock's own reverse (switched off: forward, _reverse_plain and _reverse_cached)
    """
    block = _block()
    T, D, B = block.num_tokens, block.token_dim, 3

    def shift_and_log_scale(x):
        expect(isinstance(x, torch.Tensor) and tuple(x.shape[1:]) == (T, D),
               f"shift_and_log_scale takes the whole sequence [B, T, D] = [{B}, {T}, {D}], got {_shape(x)}: row i "
               "reads only x_<i, so the tokens not inverted yet may hold anything (zeros, say)")
        expect(x.dtype == torch.float64, f"shift_and_log_scale got {x.dtype} tokens, but z is float64: build x in "
               "z's dtype (torch.zeros_like(z), or a list of tokens and torch.stack)")
        return block.shift_and_log_scale(x)

    x_true = _tokens(block, batch=B)
    with torch.no_grad():
        t, s = block.shift_and_log_scale(x_true)
        z = (x_true + t) * torch.exp(s)
    forward_ldj = s.flatten(1).sum(1)
    out = {}

    def shapes():
        z_given = z.clone()
        got = ar_inverse(shift_and_log_scale, z_given)
        expect(torch.equal(z_given, z), "your code changed z in place: build x in a new tensor")
        expect(isinstance(got, (tuple, list)) and len(got) == 2, f"return a pair (x, log_det), got {_shape(got)}")
        x, ld = got
        expect(isinstance(x, torch.Tensor) and x.shape == z.shape,
               f"x must have z's shape [B, T, D] = {list(z.shape)}, got {_shape(x)}")
        expect(isinstance(ld, torch.Tensor), f"log_det must be a tensor [B] = [{B}], got {type(ld).__name__}")
        expect(ld.numel() != 1, f"log_det is one number for the whole batch: one log-determinant per example, "
               f"s summed over tokens and dimensions only, shape [B] = [{B}]")
        expect(ld.shape == (B,), f"log_det must have shape [B] = [{B}], got {list(ld.shape)}: sum s over the "
               "tokens and the token dimensions")
        out["x"], out["log_det"] = x.detach(), ld.detach()

    def inverse():
        with torch.no_grad():
            diagnose(out["x"], x_true, {
                "(t, s) came from z in one parallel pass, so only token 0 is right: token i's parameters "
                "come from the data-side tokens x_<i, which exist only once tokens 0 .. i-1 are inverted. Go token "
                "by token, calling shift_and_log_scale on the x built so far":
                    lambda: _inverse_variant(shift_and_log_scale, z, params="z"),
                "only token 0 is right: one pass of shift_and_log_scale on a zero-filled x gives every token the "
                "parameters of a sequence of zeros. Loop over i = 0 .. T-1 and recompute (t, s) from the x "
                "built so far before inverting token i":
                    lambda: _inverse_variant(shift_and_log_scale, z, params="zeros"),
                "x_i = z_i * exp(-s_i) - t_i: the forward multiplied by exp(s), so its inverse multiplies "
                "by exp(-s); with exp(s) you ran the forward again":
                    lambda: _inverse_variant(shift_and_log_scale, z, scale=-1.0),
                "subtract t, x_i = z_i * exp(-s_i) - t_i: the forward added it":
                    lambda: _inverse_variant(shift_and_log_scale, z, shift=-1.0),
                "undo the forward's steps in reverse order: it added t, then scaled, so the inverse unscales "
                "first, then subtracts t: x_i = z_i * exp(-s_i) - t_i, not (z_i - t_i) * exp(-s_i)":
                    lambda: _inverse_variant(shift_and_log_scale, z, order="shift then scale"),
            }, 1e-9)
        close(out["x"], x_true, "x from z (the round trip x -> forward -> z -> your inverse)", 1e-9)

    def log_det():
        got, right = out["log_det"], -forward_ldj
        diagnose(got, right, {
            "log_det has the wrong sign: the inverse multiplies by exp(-s), so log|det dx/dz| = -sum of s "
            "(minus the forward's ldj)": forward_ldj,
            "log_det is a mean of s: the log-determinant sums log-scales over all tokens and dimensions, "
            "-s.sum(dim=(1, 2)) (TarFlow's reference code takes a mean per dimension; flowbook does not)":
                right / (T * D),
        }, 1e-9)
        close(got, right, "log_det (= minus the sum of s = minus the forward's ldj)", 1e-9)

    def autograd():
        z1 = z[:1].clone().requires_grad_(True)
        x1, _ = ar_inverse(shift_and_log_scale, z1)
        expect(x1.requires_grad, "your x has no graph (torch.no_grad or .detach() inside): the checker compares "
               "log_det with autograd's log|det dx/dz|, so leave the graph in (a sampler can call your inverse "
               "under torch.no_grad())")
        try:
            got = jacobian(lambda v: ar_inverse(shift_and_log_scale, v.unsqueeze(0))[0].flatten(), z[0])
        except RuntimeError as err:
            expect("inplace" not in str(err), "autograd cannot differentiate your inverse: writing x[:, i] = ... "
                   "into the tensor that shift_and_log_scale already read changes a value its backward needs. "
                   "Collect the tokens in a list and torch.stack them, or write into a copy (x = x.clone()) each step")
            raise
        got = got.reshape(T * D, T * D)
        want = jacobian(lambda v: _inverse_variant(shift_and_log_scale, v.unsqueeze(0)).flatten(), z[0])
        want = want.reshape(T * D, T * D)
        expect(got.abs().max() > 0, "autograd sees no path from z to your x (z detached?): build x from z itself")
        own_tokens = torch.block_diag(*(want[i * D:(i + 1) * D, i * D:(i + 1) * D] for i in range(T)))
        expect(not torch.allclose(got, own_tokens, rtol=0, atol=1e-9), "autograd sees each x_i depend on z_i only: "
               "x_i also depends on z_<i, through (t_i, s_i) computed from the x_<i already inverted. Call "
               "shift_and_log_scale on x with its graph (no .detach(), no torch.no_grad() inside)")
        close(got, want, "dx/dz from autograd against the inverse's Jacobian (first example)", 1e-8)
        close(out["log_det"][:1], torch.linalg.slogdet(got)[1].view(1),
              "log_det against autograd's log|det dx/dz| (first example)", 1e-8)

    run_checks("check_autoregressive_inverse", [
        ("shapes", shapes), ("x, token by token", inverse), ("log_det = -(the forward's ldj)", log_det),
        ("log_det = log|det dx/dz| from autograd", autograd),
    ], blocks=[(TarFlowBlock, "forward"), TarFlowBlock._reverse_plain, TarFlowBlock._reverse_cached])


# Exercise 3: a Tweedie step ----------------------------------------------------------------------------

def _gaussian_log_density(m, var):
    def log_density(y):
        return (-0.5 * (y - m).pow(2) / var - 0.5 * math.log(2 * math.pi * var)).flatten(1).sum(1)
    return log_density


def _mixture_log_density(y):
    """Two Gaussians in 2-D, weights 0.3 and 0.7: a score that is no linear function of y."""
    means = torch.tensor([[-1.0, 0.5], [1.5, -0.5]], dtype=y.dtype)
    scales = torch.tensor([0.6, 1.1], dtype=y.dtype)
    logw = torch.tensor([0.3, 0.7], dtype=y.dtype).log()
    sq = (y.unsqueeze(1) - means).pow(2).sum(-1)  # [B, 2]
    comp = -0.5 * sq / scales.pow(2) - y.shape[1] * torch.log(scales) - math.log(2 * math.pi)
    return torch.logsumexp(logw + comp, dim=1)


_NO_GRAD = ("autograd has nothing to differentiate: the y you differentiate does not require grad. Take the score "
            "on a copy that does, y = y.detach().requires_grad_(True), then torch.autograd.grad(log_density(y).sum(), "
            "y)[0]")


def _denoise(tweedie_denoise, log_density, y, sigma, in_no_grad=False):
    """The student's result, with autograd's typical errors turned into hints."""
    try:
        return tweedie_denoise(log_density, y, sigma)
    except RuntimeError as err:
        text = str(err)
        if "does not require grad" in text:
            expect(not in_no_grad, "your code fails inside torch.no_grad(), where denoising runs at the end of "
                   "sampling: compute the score under `with torch.enable_grad():`")
            expect(False, _NO_GRAD)
        expect("only for scalar outputs" not in text, "log_density(y) is [B], one log-density per example: "
               "differentiate its sum, torch.autograd.grad(log_density(y).sum(), y) (the examples are independent, "
               "so the sum's gradient at y_b is example b's score)")
        raise


def check_tweedie_step(tweedie_denoise) -> None:
    """tweedie_denoise(log_density, y, sigma) -> y + sigma^2 * grad_y log p(y), for noisy y [B, ...] =
    x + sigma * eps, where log_density(y) [B] is log p at each example: Tweedie's formula for E[x | y].
    The result has no graph, and y is left as it was. Checked in float64 where the answer has a closed form,
    p = N(m, (s^2 + sigma^2) I), E[x | y] = m + s^2 / (s^2 + sigma^2) (y - m), then on a mixture against
    autograd's score, then inside torch.no_grad() (as at the end of a sampler).

    Catches:
    - sigma instead of sigma^2
    - y - sigma^2 * score (the step climbs the log-density: plus)
    - the gradient of the batch's mean log-density (1/B of each score)
    - the gradient of a y that does not require grad
    - the gradient of the [B] log-densities without .sum()
    - a result that still requires grad
    - y changed in place (y += ..., or y.requires_grad_() on the y passed in)
    - no torch.enable_grad() (fails inside torch.no_grad())
    - flowbook.denoise.tweedie_denoise or score (switched off)
    """
    gen = torch.Generator().manual_seed(0)
    B, m, s, sigma = 4, torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0.7, 0.3
    gauss = _gaussian_log_density(m, s ** 2 + sigma ** 2)
    y = m + 1.5 * torch.randn(B, 3, generator=gen, dtype=torch.float64)
    posterior_mean = m + s ** 2 / (s ** 2 + sigma ** 2) * (y - m)
    score = -(y - m) / (s ** 2 + sigma ** 2)
    y_mix, sigma_mix = 1.5 * torch.randn(5, 2, generator=gen, dtype=torch.float64), 1.5
    y_pass = y_mix.clone().requires_grad_(True)
    with reference(), torch.enable_grad():
        mix_score = torch.autograd.grad(_mixture_log_density(y_pass).sum(), y_pass)[0]
    out = {}

    def result():
        y_given = y.clone()
        got = _denoise(tweedie_denoise, gauss, y_given, sigma)
        expect(not y_given.requires_grad, "your code set requires_grad on the y it was given (y.requires_grad_()), "
               "which changes the caller's tensor: work on a copy, y.detach().requires_grad_(True)")
        expect(torch.equal(y_given, y), "your code changed y in place (y += ..., or an in-place op on y.detach(), "
               "which shares y's memory): return a new tensor, y + sigma ** 2 * score")
        expect(isinstance(got, torch.Tensor) and got.shape == y.shape,
               f"return a tensor of y's shape {list(y.shape)}, got {_shape(got)}")
        expect(not got.requires_grad, "the result still requires grad: return it without a graph (.detach()), "
               "built from the y you were given, not from the copy that requires grad")
        out["gauss"] = got

    def gaussian():
        diagnose(out["gauss"], posterior_mean, {
            "the step is sigma * score: Tweedie's formula scales the score by the noise variance, "
            "y + sigma ** 2 * grad log p(y)": y + sigma * score,
            "the step goes downhill: Tweedie's formula moves y up the log-density, y + sigma ** 2 * score, "
            "plus, not minus": y - sigma ** 2 * score,
            f"the step is 1/B = 1/{B} of the right one: you differentiated the batch's mean log-density. Take "
            "the gradient of the sum, log_density(y).sum(): example b's score is then the gradient at y_b":
                y + sigma ** 2 * score / B,
        }, 1e-9)
        close(out["gauss"], posterior_mean, "E[x | y] = m + s^2 / (s^2 + sigma^2) (y - m), for a Gaussian", 1e-9)

    def mixture():
        got = _denoise(tweedie_denoise, _mixture_log_density, y_mix.clone(), sigma_mix)
        right = y_mix + sigma_mix ** 2 * mix_score
        diagnose(got, right, {
            "on a mixture with sigma = 1.5 the step is sigma * score: use sigma ** 2":
                y_mix + sigma_mix * mix_score}, 1e-9)
        close(got, right, "y + sigma^2 * score on a mixture of two Gaussians (sigma = 1.5)", 1e-9)

    def no_grad():
        with torch.no_grad():
            got = _denoise(tweedie_denoise, gauss, y.clone(), sigma, in_no_grad=True)
        close(got, posterior_mean, "E[x | y] computed inside torch.no_grad()", 1e-9)

    run_checks("check_tweedie_step", [
        ("a new tensor, no graph, y untouched", result), ("a Gaussian: E[x | y] in closed form", gaussian),
        ("a mixture: the score from autograd", mixture), ("inside torch.no_grad()", no_grad),
    ], blocks=[denoise.tweedie_denoise, denoise.score])

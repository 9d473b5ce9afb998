"""Chapter 6 checkers: the LU-parametrised 1x1 convolution, ActNorm, and an out-of-distribution score."""
from __future__ import annotations

import torch

from flowbook import ood
from flowbook.exercises._harness import close, diagnose, expect, layer_logdets, perturbed, reference, run_checks
from flowbook.layers import ActNorm, InvConv1x1


def _lu_parts(channels=5):
    layer = InvConv1x1(channels, lu=True, generator=torch.Generator().manual_seed(0)).double()
    perturbed(layer, scale=0.3)  # junk on the diagonals and the wrong triangles, which the mask must remove
    return layer


def check_lu_weight(lu_weight_and_logdet) -> None:
    """lu_weight_and_logdet(perm, lower, upper, sign_s, log_s, inverse=False) -> (W [C, C], log|det W|), as
    InvConv1x1(lu=True): W = P L U with L unit lower triangular (from the strictly lower part of `lower`),
    U upper triangular (the strictly upper part of `upper`, sign_s * exp(log_s) on its diagonal). With
    inverse=True: (W^-1, -log|det W|) from the factors, W^-1 = U^-1 L^-1 P^T with triangular solves
    (torch.linalg.inv, solve and the like are switched off).

    Catches:
    - `lower` used without masking
    - L without its unit diagonal
    - `upper` used without masking
    - the diagonal without its sign
    - log_s on the diagonal instead of exp(log_s)
    - the factors multiplied in another order (P U L, or L U P)
    - a log-determinant other than sum(log_s): the sum of exp(log_s), or their product
    - slogdet or det of torch (switched off, even when captured before the check)
    - svdvals, lu_factor, eigvals or another decomposition of torch (switched off: the point is O(C))
    - the inverse with P instead of P^T
    - the inverse's factors in the forward order instead of reversed
    - the inverse's log-determinant not negated
    - torch.linalg.inv, solve or pinv for the inverse (switched off)
    - torch.linalg.matrix_power(W, -1) for the inverse (switched off too)
    - a log-determinant without its graph (detached, or rebuilt from a number): training could not move log_s
    - the inverse's log-determinant without its graph
    - a determinant through a tensor method, w.slogdet() or w.det() (switched off too)
    - an inverse through a tensor method, w.inverse() or w.pinverse() (switched off too)
    """
    layer = _lu_parts()
    args = (layer.perm, layer.lower, layer.upper, layer.sign_s, layer.log_s)
    with reference(), torch.no_grad():
        w_ref, logdet_ref = layer.weight_and_logdet()
    p, lo, up, sign, log_s = (a.detach() for a in args)
    eye, strict_lo = torch.eye(len(sign), dtype=lo.dtype), torch.tril(torch.ones_like(lo), -1)
    unit_lo, diag = lo * strict_lo + eye, torch.diag(sign * torch.exp(log_s))
    upper_ok = up * strict_lo.T + diag

    def weight():
        with torch.no_grad():
            w, _ = lu_weight_and_logdet(*args)
        expect(isinstance(w, torch.Tensor) and w.shape == w_ref.shape, f"W must be a [C, C] = {list(w_ref.shape)} "
               f"tensor, got {list(getattr(w, 'shape', [])) or type(w).__name__}")
        diagnose(w, w_ref, {
            "L must be unit lower triangular: keep the strictly lower part of `lower` (torch.tril(lower, -1)) and "
            "add the identity": p @ lo @ upper_ok,
            "L needs ones on its diagonal: torch.tril(lower, -1) + I": p @ (lo * strict_lo) @ upper_ok,
            "keep only the strictly upper part of `upper` (torch.triu(upper, 1)), then add the diagonal":
                p @ unit_lo @ (up + diag),
            "the diagonal of U is sign_s * exp(log_s): you left out the sign": p @ unit_lo @ (up * strict_lo.T + torch.diag(torch.exp(log_s))),
            "the diagonal of U is sign_s * exp(log_s), not log_s": p @ unit_lo @ (up * strict_lo.T + torch.diag(sign * log_s)),
            "the order: W = P @ L @ U": p @ upper_ok @ unit_lo,
            "the order: the permutation comes first, W = P @ L @ U, not L @ U @ P": unit_lo @ upper_ok @ p,
        }, 1e-10)
        close(w, w_ref, "W = P L U", 1e-10)

    def log_det():
        with torch.no_grad():
            w, got = lu_weight_and_logdet(*args)
        expect(isinstance(got, torch.Tensor) and got.numel() == 1, "log|det W| must be a scalar tensor")
        diagnose(got.reshape(()), logdet_ref.reshape(()), {
            "log|det W| = sum(log_s), not the sum of exp(log_s)": torch.exp(log_s).sum(),
            "log|det W| = sum(log_s), not their product": log_s.prod(),
        }, 1e-10)
        close(got.reshape(()), logdet_ref.reshape(()), "log|det W| = sum(log|d_i|)", 1e-10)
        with reference():
            exact = torch.linalg.slogdet(w)[1]
        close(got.reshape(()), exact, "log|det W| against slogdet of your W", 1e-8)

    def gradient():
        w, got = lu_weight_and_logdet(*args)
        _logdet_gradient(got, layer.log_s, 1.0, "")
        (w.sum() + got).backward()
        expect(layer.log_s.grad is not None and layer.lower.grad is not None and layer.upper.grad is not None,
               "gradients must reach lower, upper and log_s: build W from them with differentiable operations")

    def inverse():
        with torch.no_grad():
            got = lu_weight_and_logdet(*args, inverse=True)
        expect(isinstance(got, tuple) and len(got) == 2, "with inverse=True, return (W^-1, -log|det W|)")
        w_inv, neg = got
        with reference():
            right = torch.linalg.inv(w_ref)
            l_inv, u_inv = torch.linalg.inv(unit_lo), torch.linalg.inv(upper_ok)
        expect(isinstance(w_inv, torch.Tensor) and w_inv.shape == w_ref.shape, f"W^-1 must be a [C, C] tensor, got "
               f"{list(getattr(w_inv, 'shape', [])) or type(w_inv).__name__}")
        diagnose(w_inv, right, {
            "P^-1 is P transposed (a permutation matrix is orthogonal): W^-1 = U^-1 L^-1 P^T": u_inv @ l_inv @ p,
            "the inverse of a product reverses the order: W^-1 = U^-1 L^-1 P^T": p.T @ l_inv @ u_inv,
            "the inverse of a product reverses the order: W^-1 = U^-1 L^-1 P^T, not L^-1 U^-1 P^T": l_inv @ u_inv @ p.T,
        }, 1e-8)
        close(w_inv, right, "W^-1 = U^-1 L^-1 P^T", 1e-8)
        close(w_inv @ w_ref, torch.eye(len(sign), dtype=w_ref.dtype), "W^-1 @ W = I", 1e-8)
        expect(isinstance(neg, torch.Tensor) and neg.numel() == 1, "with inverse=True, the log-determinant must be "
               "a scalar tensor")
        diagnose(neg.reshape(()), -logdet_ref.reshape(()), {
            "with inverse=True the log-determinant is that of W^-1: -sum(log_s)": logdet_ref.reshape(())}, 1e-10)
        close(neg.reshape(()), -logdet_ref.reshape(()), "log|det W^-1| = -sum(log_s)", 1e-10)

    def inverse_gradient():
        w_inv, neg = lu_weight_and_logdet(*args, inverse=True)
        _logdet_gradient(neg, layer.log_s, -1.0, "with inverse=True, ")
        for p_ in (layer.log_s, layer.lower, layer.upper):
            p_.grad = None
        (w_inv.sum() + neg).backward()
        expect(layer.log_s.grad is not None and layer.lower.grad is not None and layer.upper.grad is not None,
               "with inverse=True too, gradients must reach lower, upper and log_s")

    return run_checks("check_lu_weight", [("W", weight), ("log|det W|", log_det), ("gradients", gradient),
                                          ("W^-1 with inverse=True", inverse),
                                          ("gradients through W^-1", inverse_gradient)],
                      blocks=[(InvConv1x1, "weight_and_logdet"), *_DETERMINANTS, *_INVERSES])


def _logdet_gradient(got, log_s, sign, where):
    """Expect the returned log-determinant `got` to carry its graph to log_s: d got / d log_s = sign * 1."""
    expect(isinstance(got, torch.Tensor) and got.requires_grad, f"{where}the log-determinant has no graph, so "
           "training could not move log_s through it: return it computed from log_s (log_s.sum()), not detached "
           "or rebuilt from a number")
    grad = torch.autograd.grad(got.sum(), log_s, retain_graph=True, allow_unused=True)[0]
    expect(grad is not None and torch.allclose(grad, torch.full_like(grad, sign)),
           f"{where}the log-determinant's gradient with respect to log_s must be {sign:+g} for each entry: "
           f"compute it as {'' if sign > 0 else '-'}log_s.sum()")


# torch functions that compute a determinant, or a decomposition that gives it in O(C^3)
_DETERMINANTS = [(torch.linalg, name) for name in ("slogdet", "det", "svd", "svdvals", "lu", "lu_factor",
                                                    "lu_factor_ex", "eig", "eigvals", "qr", "cholesky", "matrix_norm",
                                                    "cond")] + \
    [(torch, name) for name in ("slogdet", "det", "logdet", "svd", "lu", "qr", "cholesky")] + \
    [(torch.Tensor, name) for name in ("slogdet", "det", "logdet", "svd", "lu", "qr", "cholesky")]
# torch functions that invert a general matrix (the exercise inverts W from its triangular factors)
_INVERSES = [(torch.linalg, name) for name in ("inv", "inv_ex", "solve", "solve_ex", "pinv", "lstsq", "tensorinv",
                                               "tensorsolve", "matrix_power")] + \
    [(torch, name) for name in ("inverse", "pinverse", "matrix_power")] + \
    [(torch.Tensor, name) for name in ("inverse", "pinverse", "matrix_power")]


def check_actnorm(ActNormLayer) -> None:
    """ActNormLayer(channels)(z, ldj, reverse=False) -> (z, ldj), as flowbook's ActNorm: on its first forward
    call in training it sets loc = -mean and log_scale = -log(std) per channel from the batch (over batch,
    height and width; std is torch.std's default, the unbiased one), in place, once, and records that in the
    `initialized` buffer; then z' = (z + loc) * exp(log_scale), ldj += H * W * sum(log_scale).

    Catches:
    - statistics that leave the first batch without zero mean and unit variance per channel
    - the variance instead of the standard deviation, or log_scale with the wrong sign
    - the biased standard deviation (unbiased=False)
    - the form z * exp(log_scale) + loc (loc = -mean / std) instead of (z + loc) * exp(log_scale)
    - loc and log_scale replaced by new Parameters (an optimizer made before the first batch keeps the old ones)
    - an initialisation that runs again on the next batch
    - the flag a plain Python attribute instead of the `initialized` buffer (a reloaded layer initialises again)
    - an initialisation in evaluation mode
    - ldj without the H * W factor
    - ldj with the wrong sign
    - a reverse that adds to ldj instead of subtracting
    - a reverse that does not invert
    - flowbook's ActNorm used (switched off)
    """
    torch.manual_seed(0)
    first = torch.randn(16, 3, 4, 5, dtype=torch.float64) * torch.tensor([2.0, 0.5, 3.0]).view(1, 3, 1, 1).double() \
        + torch.tensor([1.0, -2.0, 4.0]).view(1, 3, 1, 1).double()
    second = torch.randn(16, 3, 4, 5, dtype=torch.float64) * 5 + 7
    zero = torch.zeros(16, dtype=torch.float64)
    layer = ActNormLayer(3).double().train()
    params_before = {name: p for name, p in layer.named_parameters()}
    per_channel = first.transpose(0, 1).reshape(3, -1)
    mean, real_std = per_channel.mean(1), per_channel.std(1)
    result = {}

    def param(name):
        expect(name in params_before, f"the layer needs the Parameter `{name}` of the stub's __init__")
        return dict(layer.named_parameters())[name].detach().flatten()

    def initialises():
        y, ldj = layer(first, zero)
        result["first"] = (y.detach(), ldj.detach())
        flat = y.detach().transpose(0, 1).reshape(3, -1)
        out_mean, std = flat.mean(1), flat.std(1)
        expect(bool((out_mean.abs() < 1e-6).all()), f"the first batch must come out with zero mean per channel; got "
               f"{[round(v, 3) for v in out_mean.tolist()]}: loc = -(mean over batch, height and width)")
        expect(not torch.allclose(std, real_std ** 2, atol=1e-3), "log_scale has the wrong sign: it must be "
               "-log(std), so that exp(log_scale) divides by the standard deviation")
        expect(not torch.allclose(std, 1 / real_std, atol=1e-3), "you divided by the variance: log_scale = -log(std), "
               "the standard deviation")
        biased = per_channel.std(1, unbiased=False)
        expect(not torch.allclose(std, real_std / biased, atol=1e-5), "you used the biased standard deviation "
               "(unbiased=False, or the square root of a mean of squares): use torch.std's default, the unbiased one, "
               "as flowbook's ActNorm does")
        expect(bool(((std - 1).abs() < 1e-4).all()), f"the first batch must come out with unit standard deviation per "
               f"channel; got {[round(v, 6) for v in std.tolist()]}: log_scale = -log(std) per channel, the standard "
               "deviation over batch, height and width")

    def in_place():
        now = dict(layer.named_parameters())
        replaced = [n for n, p in params_before.items() if now.get(n) is not p]
        expect(not replaced, f"the initialisation replaced {', '.join(replaced)} by new Parameters: an optimizer made "
               "before the first batch would go on training the old ones. Copy the values into the Parameters in "
               "place, under torch.no_grad(): self.loc.copy_(...)")

    def parameters():
        diagnose(param("loc"), -mean, {
            "loc = -mean / std belongs to the form z * exp(log_scale) + loc; this layer is (z + loc) * "
            "exp(log_scale), so loc = -mean": -mean / real_std}, 1e-9)
        close(param("loc"), -mean, "loc after the first batch: -(mean per channel)", 1e-9)
        close(param("log_scale"), -real_std.log(), "log_scale after the first batch: -log(std per channel)", 1e-5)

    def once():
        params = [p.detach().clone() for p in layer.parameters()]
        layer(second, zero)
        expect(all(torch.equal(a, p.detach()) for a, p in zip(params, layer.parameters())),
               "the second batch changed loc or log_scale: initialise only once (set the `initialized` flag)")

    def survives_reload():
        state = layer.state_dict()
        expect("initialized" in state and bool(state["initialized"]), "after the first batch the `initialized` "
               "buffer is still False: set it (self.initialized.fill_(True)) and decide from it, not from a Python "
               "attribute, which load_state_dict does not restore (a reloaded layer would initialise again)")
        again = ActNormLayer(3).double().train()
        again.load_state_dict(state)
        again(second, zero)
        expect(all(torch.equal(a, b) for a, b in zip(state.values(), again.state_dict().values())),
               "a layer loaded from a state dict initialised itself again on its next batch, overwriting the loaded "
               "loc and log_scale: decide from the `initialized` buffer (bool(self.initialized)), not from a Python "
               "attribute, which load_state_dict does not restore")

    def not_in_eval():
        fresh = ActNormLayer(3).double().eval()
        fresh(first, zero)
        expect(all(bool((p == 0).all()) for p in fresh.parameters()) and not bool(fresh.initialized),
               "in evaluation mode (model.eval()) the layer initialised itself: initialise only when self.training, "
               "so that evaluating an untrained model does not fit it to the evaluation batch")

    def ldj():
        _, got = result["first"]
        h, w = first.shape[2:]
        log_scale = param("log_scale").sum()
        diagnose(got, zero + h * w * log_scale, {
            "each of the H * W pixels is scaled: ldj += H * W * sum(log_scale)": zero + log_scale,
            "ldj has the wrong sign: the forward pass multiplies by exp(log_scale)": zero - h * w * log_scale,
        }, 1e-8)
        close(got, zero + h * w * log_scale, "ldj += H * W * sum(log_scale)", 1e-8)

    def inverse():
        y, ldj_y = layer(second, zero)
        back, ldj_back = layer(y, ldj_y, reverse=True)
        close(back, second, "reverse(forward(z)): z = z' * exp(-log_scale) - loc", 1e-10)
        diagnose(ldj_back, zero, {"reverse added H * W * sum(log_scale) to ldj again: the reverse divides by "
                                  "exp(log_scale), so it subtracts": 2 * ldj_y}, 1e-9)
        close(ldj_back, zero, "ldj after forward and reverse", 1e-10)

    def autograd():
        small = second[:2, :, :2, :2]
        _, got = layer(small, zero[:2])
        close(got, layer_logdets(layer, small), "ldj against log|det J| from autograd", 1e-8)

    return run_checks("check_actnorm", [
        ("first batch normalised", initialises), ("the same Parameters", in_place), ("loc and log_scale", parameters),
        ("initialised once", once), ("a reloaded layer stays initialised", survives_reload),
        ("no initialisation in eval mode", not_in_eval), ("ldj", ldj), ("inverse", inverse),
        ("ldj = log|det J|", autograd),
    ], blocks=[(ActNorm, "forward"), (ActNorm, "initialize")])


def _exact_auc(in_scores, out_scores) -> float:
    """The AUC counted exactly, in float64: (#(out > in) + #(out == in) / 2) / (M N)."""
    diff = out_scores.double().view(-1, 1) - in_scores.double().view(1, -1)
    return ((diff > 0).sum().item() + 0.5 * (diff == 0).sum().item()) / diff.numel()


def _roc_area(in_scores, out_scores, start=True) -> float:
    """The trapezoid area under the ROC curve (thresholds at every score, largest first), with or without the
    curve's start at (0, 0)."""
    t = torch.cat([in_scores, out_scores]).unique().flip(0).view(-1, 1).double()
    tpr = (out_scores.double().view(1, -1) >= t).double().mean(1)
    fpr = (in_scores.double().view(1, -1) >= t).double().mean(1)
    if start:
        tpr, fpr = torch.cat([torch.zeros(1).double(), tpr]), torch.cat([torch.zeros(1).double(), fpr])
    return torch.trapezoid(tpr, fpr).item()


AUC_TOLERANCE = 1e-6  # a float32 mean of the 0/1 pair comparisons is off by about 1e-7; a mistake by > 1e-3


def check_separation_auc(separation_auc) -> None:
    """separation_auc(in_scores [N], out_scores [M]) -> float: the area under the ROC curve of "out of
    distribution when the score is at least t", which is the probability that an out-of-distribution input
    scores higher than an in-distribution one, ties counted half. Compared with the exact count within
    AUC_TOLERANCE, so the ROC curve with the trapezoid rule, a float32 or float64 mean over all pairs, an
    exact count and torchmetrics' AUROC all pass.

    Catches:
    - the probability the other way round (1 - AUC)
    - torch.trapezoid(fpr, tpr), x and y swapped (also 1 - AUC)
    - minus the AUC (the ROC curve's points in the wrong order)
    - ties not counted half (a step curve instead of the trapezoid)
    - the ROC curve without its start at (0, 0)
    - a tensor instead of a Python float
    """
    torch.manual_seed(0)
    a, b = torch.randn(50), torch.randn(40) + 1.0
    ties_in, ties_out = torch.tensor([0.0, 1.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 3.0])

    def near(x, y):
        return abs(x - y) <= AUC_TOLERANCE

    def value():
        got = separation_auc(a, b)
        expect(isinstance(got, float), f"return a Python float (tensor.item()), got {type(got).__name__}")
        right = _exact_auc(a, b)
        expect(not near(got, 1 - right), "that is 1 - AUC, the probability that an in-distribution input scores "
               "higher: the AUC counts pairs where the out-of-distribution score is the larger one (with the ROC "
               "curve: torch.trapezoid(y=tpr, x=fpr), the y values first)")
        expect(not near(got, -right), f"that is minus the AUC ({got:.6f}): the ROC curve's points must go from "
               "(0, 0) to (1, 1), thresholds from the largest score down, for the trapezoid rule to add up areas")
        expect(near(got, right), f"AUC {got:.6f}, expected {right:.6f} (tolerance {AUC_TOLERANCE:g})")

    def ties():
        got = float(separation_auc(ties_in, ties_out))
        right = _exact_auc(ties_in, ties_out)
        strict = ((ties_out.view(-1, 1) - ties_in.view(1, -1)) > 0).double().mean().item()
        expect(not near(got, strict), f"ties count half: a tie between an in- and an out-of-distribution score is a "
               f"coin flip, a diagonal step of the ROC curve that the trapezoid rule counts half "
               f"(AUC {got:.6f}, expected {right:.6f})")
        expect(near(got, right), f"with ties: AUC {got:.6f}, expected {right:.6f} (tolerance {AUC_TOLERANCE:g})")

    def top_tie():
        top_in, top_out = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.5])  # the largest scores tie
        got, right = float(separation_auc(top_in, top_out)), _exact_auc(top_in, top_out)
        expect(near(got, right) or not near(got, _roc_area(top_in, top_out, start=False)), "the ROC curve starts "
               "at (0, 0), a threshold above every score: prepend that point before integrating (it matters when "
               "the largest scores tie)")
        expect(near(got, right), f"when the largest scores tie: AUC {got:.6f}, expected {right:.6f}")

    def extremes():
        expect(near(float(separation_auc(torch.zeros(5), torch.ones(3))), 1.0), "all out-of-distribution scores "
               "higher: AUC 1")
        expect(near(float(separation_auc(torch.ones(5), torch.zeros(3))), 0.0), "all lower: AUC 0")

    return run_checks("check_separation_auc", [("value", value), ("ties", ties), ("the largest scores tie", top_tie),
                                               ("0 and 1", extremes)],
                      blocks=[ood.separation_auc])

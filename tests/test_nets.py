"""The coupling network's two forms of ConcatELU and the channel layer norm: PyTorch's kernels eagerly,
plain arithmetic inside torch.compile (faster there, see flowbook/nets.py). Each form against the other."""
import pytest
import torch
import torch.nn.functional as F

from conftest import perturb_
from flowbook.nets import ConcatELU, LayerNormChannels, elu_by_exp, layer_norm_channels


def test_elu_by_exp_equals_elu_in_value_and_gradient_even_at_zero_and_for_large_inputs():
    x = torch.tensor([-1e4, -50.0, -3.0, -1e-3, 0.0, 1e-3, 2.0, 100.0, 1e4], dtype=torch.float64)
    x = torch.cat([x, torch.randn(200, dtype=torch.float64)]).requires_grad_()
    y_ref = F.elu(x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    y = elu_by_exp(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)  # finite: no 0 * inf from the other branch
    assert g[4] == 1.0  # ELU's slope at 0 (from both sides)


@pytest.mark.parametrize("channels_last", [False, True])
def test_layer_norm_channels_equals_the_module_in_float32_and_under_bf16_autocast(channels_last):
    norm = perturb_(LayerNormChannels(6), scale=0.3)
    x = 3 * torch.randn(4, 6, 5, 7) + 1
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    ln = norm.layer_norm
    torch.testing.assert_close(layer_norm_channels(x, ln.weight, ln.bias, ln.eps), norm(x), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, ours = norm(xb), layer_norm_channels(xb, ln.weight, ln.bias, ln.eps)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref.float(), rtol=2e-2, atol=2e-2)  # a bfloat16 rounding apart


def test_layer_norm_channels_gradients_equal_the_module():
    norm = perturb_(LayerNormChannels(4).double(), scale=0.3)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    ln = norm.layer_norm
    params = [x, ln.weight, ln.bias]
    ref = torch.autograd.grad((norm(x) ** 2).sum(), params)
    ours = torch.autograd.grad((layer_norm_channels(x, ln.weight, ln.bias, ln.eps) ** 2).sum(), params)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _traced_ops(module, x):
    """The functions in the graph torch.compile traces for `module(x)` (no code is generated)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(module, backend=backend, fullgraph=True)(x)
    torch._dynamo.reset()
    return {getattr(n.target, "__name__", str(n.target)) for g in graphs for n in g.graph.nodes
            if n.op in ("call_function", "call_method")}


def test_the_compiled_form_is_the_one_torch_compile_traces():
    x = torch.randn(2, 4, 3, 3)
    elu_ops = _traced_ops(ConcatELU(), x)
    assert "exp" in elu_ops and "elu" not in elu_ops
    norm_ops = _traced_ops(LayerNormChannels(4), x)
    assert "rsqrt" in norm_ops and "layer_norm" not in norm_ops
    # and eagerly, PyTorch's own kernels: one call each
    assert torch.equal(ConcatELU()(x), torch.cat([F.elu(x), F.elu(-x)], dim=1))

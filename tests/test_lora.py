import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_lab import LinearWithLoRA, LoRALayer

torch.manual_seed(0)


def _seeded_linear(n_in=12, n_out=10, bias=True, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias, dtype=dtype)


def _randomize(layer: LoRALayer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.B.copy_(torch.randn(layer.B.shape, generator=g))


def test_shapes_init_and_closed_form():
    layer = LoRALayer(64, 24, rank=4, alpha=8)
    assert layer.A.shape == (4, 64) and layer.B.shape == (24, 4)
    assert torch.count_nonzero(layer.B) == 0
    # kaiming-uniform with a = sqrt(5) over fan-in 64: U(-1/sqrt(64), 1/sqrt(64)), as nn.Linear
    bound = 1 / math.sqrt(64)
    assert layer.A.abs().max() <= bound and layer.A.abs().max() > 0.9 * bound
    assert layer.A.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)
    _randomize(layer)
    x = torch.randn(5, 3, 64)
    expected = (x @ layer.A.T @ layer.B.T) * (8 / 4)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), layer.B @ layer.A * 2.0)


def test_rslora_scaling():
    assert LoRALayer(8, 8, rank=16, alpha=8, use_rslora=True).scaling == pytest.approx(2.0)
    assert LoRALayer(8, 8, rank=16, alpha=8).scaling == pytest.approx(0.5)


@pytest.mark.parametrize("rank", [0, -2, 2.5, True])
def test_bad_rank(rank):
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        LoRALayer(8, 8, rank=rank, alpha=8)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        LoRALayer(8, 8, rank=2, alpha=alpha)


def test_dropout_only_when_asked():
    assert LoRALayer(8, 8, 2, 2).dropout is None
    layer = LoRALayer(8, 8, 2, 2, dropout=0.5)
    _randomize(layer)
    x = torch.randn(64, 8)
    layer.train()
    assert not torch.allclose(layer(x), layer(x))
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    with pytest.raises(ValueError, match="dropout"):
        LoRALayer(8, 8, 2, 2, dropout=1.0)


def test_fresh_wrapper_is_the_base_and_base_is_frozen():
    base = _seeded_linear()
    x = torch.randn(4, 12)
    expected = base(x)
    wrapped = LinearWithLoRA(base, rank=4, alpha=8)
    torch.testing.assert_close(wrapped(x), expected, atol=0, rtol=0)
    assert not any(p.requires_grad for p in wrapped.base.parameters())
    assert wrapped.lora.A.requires_grad and wrapped.lora.B.requires_grad
    assert wrapped.weight is base.weight and (wrapped.in_features, wrapped.out_features) == (12, 10)


def test_forward_and_gradients_match_closed_form():
    base = _seeded_linear()
    wrapped = LinearWithLoRA(base, rank=3, alpha=6)
    _randomize(wrapped.lora)
    x = torch.randn(4, 12)
    with torch.no_grad():  # inference adds in place, training out of place: the same numbers
        inference = wrapped(x)
    out = wrapped(x)
    torch.testing.assert_close(out, inference, atol=0, rtol=0)
    A, B = wrapped.lora.A, wrapped.lora.B
    torch.testing.assert_close(out, base(x) + x @ (2.0 * B @ A).T, atol=1e-5, rtol=1e-5)
    out.pow(2).sum().backward()
    # the same loss through an explicit merged weight gives the reference gradients
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    ref = nn.functional.linear(x, base.weight + 2.0 * B2 @ A2, base.bias)
    ref.pow(2).sum().backward()
    torch.testing.assert_close(A.grad, A2.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(B.grad, B2.grad, atol=1e-4, rtol=1e-4)
    assert base.weight.grad is None


def test_not_linear_is_rejected():
    with pytest.raises(TypeError, match="LinearWithLoRA wraps linear layers.*Embedding"):
        LinearWithLoRA(nn.Embedding(5, 4), rank=2, alpha=2)


def test_conv1d_matches_linear():
    torch.manual_seed(0)
    conv = Conv1D(10, 12)  # nf=10 out, nx=12 in; weight stored (12, 10)
    with torch.no_grad():
        conv.bias.normal_()
    linear = nn.Linear(12, 10)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = LinearWithLoRA(conv, 4, 8), LinearWithLoRA(linear, 4, 8)
    _randomize(a.lora)
    b.lora.load_state_dict(a.lora.state_dict())
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)
    a.merge()
    b.merge()
    torch.testing.assert_close(a.base.weight, b.base.weight.T)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_unmerge_round_trip(kind):
    base = _seeded_linear() if kind == "linear" else Conv1D(10, 12)
    original = base.weight.detach().clone()
    wrapped = LinearWithLoRA(base, rank=4, alpha=8)
    _randomize(wrapped.lora)
    x = torch.randn(6, 12)
    unmerged_out = wrapped(x).detach()
    wrapped.merge()
    wrapped.merge()  # idempotent
    assert wrapped.merged
    assert not torch.allclose(base.weight, original)
    torch.testing.assert_close(wrapped(x), unmerged_out, atol=1e-5, rtol=1e-5)
    wrapped.unmerge()
    wrapped.unmerge()
    assert not wrapped.merged
    torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(wrapped(x), unmerged_out, atol=1e-5, rtol=1e-5)


def test_merge_refuses_non_finite_delta():
    wrapped = LinearWithLoRA(_seeded_linear(), rank=2, alpha=2)
    original = wrapped.base.weight.detach().clone()
    with torch.no_grad():
        wrapped.lora.B[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        wrapped.merge()
    assert not wrapped.merged
    torch.testing.assert_close(wrapped.base.weight, original, atol=0, rtol=0)


def test_half_precision_base_keeps_fp32_adapter():
    base = _seeded_linear(dtype=torch.bfloat16)
    wrapped = LinearWithLoRA(base, rank=2, alpha=4)
    assert wrapped.lora.A.dtype == torch.float32
    _randomize(wrapped.lora)
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    out = wrapped(x)
    assert out.dtype == torch.bfloat16
    ref = base(x).float() + wrapped.lora(x.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_meta_device_allocates_nothing():
    with torch.device("meta"):
        wrapped = LinearWithLoRA(nn.Linear(4096, 4096), rank=8, alpha=16)
    assert wrapped.lora.A.is_meta and wrapped.lora.B.is_meta
    assert wrapped.lora.A.shape == (8, 4096)


# bitsandbytes runs on the CPU: its 4-bit and 8-bit linears are real bases here.
bnb = pytest.importorskip("bitsandbytes")


def _quantized(kind: str, base: nn.Linear) -> nn.Module:
    if kind == "4-bit":
        q = bnb.nn.Linear4bit(base.in_features, base.out_features, compute_dtype=torch.float32, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(base.in_features, base.out_features, has_fp16_weights=False)
    q.load_state_dict(base.state_dict())
    return q.to("cpu")  # quantizes


@pytest.mark.parametrize("kind", ["4-bit", "8-bit"])
def test_quantized_base_forward_merge_error_and_unload(kind):
    q = _quantized(kind, _seeded_linear(32, 16))
    x = torch.randn(4, 32)
    base_out = q(x).detach()
    wrapped = LinearWithLoRA(q, rank=4, alpha=8)
    torch.testing.assert_close(wrapped(x), base_out)
    _randomize(wrapped.lora)
    out = wrapped(x)
    torch.testing.assert_close(out, base_out + wrapped.lora(x), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert wrapped.lora.A.grad is not None and wrapped.lora.B.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=f"{kind} bitsandbytes.*unload_lora"):
        wrapped.merge()
    plain = wrapped.unloaded()
    assert type(plain) is nn.Linear and plain.weight.dtype == torch.float32
    # the dequantized + merged layer computes what the quantized layer with LoRA computes
    tol = 1e-4 if kind == "4-bit" else 2e-2  # 8-bit also quantizes activations in its matmul
    torch.testing.assert_close(plain(x), out.detach(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", ["4-bit", "8-bit"])
def test_unload_after_an_inference_forward(kind):
    """bitsandbytes repacks 4-bit weights in place at the first inference forward on CPUs with
    AVX512-BF16; unloading must dequantize what the layer holds then, not the repacked bytes."""
    q = _quantized(kind, _seeded_linear(64, 128)).eval()
    wrapped = LinearWithLoRA(q, rank=4, alpha=8).eval()
    _randomize(wrapped.lora)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = wrapped(x)
        again = wrapped.unloaded()(x)
    tol = 2e-2 if kind == "4-bit" else 5e-2  # the CPU kernel's bf16 rounding; 8-bit also quantizes x
    torch.testing.assert_close(again, out, atol=tol, rtol=tol)

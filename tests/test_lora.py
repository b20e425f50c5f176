import copy
import math

import pytest
import torch
from conftest import bnb, needs_bnb
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


def _quantized(kind: str, base: nn.Linear) -> nn.Module:
    if kind == "4-bit":
        q = bnb.nn.Linear4bit(base.in_features, base.out_features, compute_dtype=torch.float32, quant_type="nf4")
    else:
        q = bnb.nn.Linear8bitLt(base.in_features, base.out_features, has_fp16_weights=False)
    q.load_state_dict(base.state_dict())
    return q.to("cpu")  # quantizes


@needs_bnb
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


@needs_bnb
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


# The fused node (`lora_linear`) against the two separate modules it replaces: the same function,
# the same gradients, and it must really be the path taken (grad_fn), or these tests prove nothing.


def _fused_and_plain(kind: str, bias: bool, dropout: float = 0.0, rank: int = 3):
    torch.manual_seed(0)
    base = Conv1D(10, 12) if kind == "conv1d" else nn.Linear(12, 10, bias=bias)
    if kind == "conv1d":
        with torch.no_grad():
            base.bias.normal_()
    fused = LinearWithLoRA(base, rank=rank, alpha=6, dropout=dropout)
    _randomize(fused.lora)
    plain = copy.deepcopy(fused)
    plain.fused = False
    return fused, plain


def _run(layer, x, seed=0):
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(seed)  # the same dropout mask on both paths
    out = layer(x)
    (out.float() * torch.linspace(-1, 1, out.shape[-1])).pow(2).sum().backward()
    grads = (x.grad, layer.lora.A.grad, layer.lora.B.grad)
    layer.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("kind,bias", [("linear", True), ("linear", False), ("conv1d", True)])
@pytest.mark.parametrize("shape", [(2, 5, 12), (12,)])
def test_fused_matches_the_separate_modules(kind, bias, shape):
    fused, plain = _fused_and_plain(kind, bias)
    x = torch.randn(shape)
    out, grads = _run(fused, x)
    assert type(out.grad_fn).__name__ == "_LoRALinearBackward"
    ref, ref_grads = _run(plain, x)
    assert type(ref.grad_fn).__name__ == "AddBackward0"
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert fused.base.weight.grad is None
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_LoRALinearBackward"
    with torch.no_grad():  # inference takes the two modules, adding in place: what the fused node gave
        torch.testing.assert_close(fused(x), out.detach(), atol=1e-6, rtol=1e-6)


def test_fused_with_dropout_and_only_some_inputs_needing_grad():
    fused, plain = _fused_and_plain("linear", True, dropout=0.3)
    x = torch.randn(4, 6, 12)
    (out, grads), (ref, ref_grads) = _run(fused.train(), x, seed=5), _run(plain.train(), x, seed=5)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # A frozen (e.g. a LoRA-FA style run) and an input that needs no grad: B's gradient alone
    for layer in (fused.eval(), plain.eval()):
        layer.lora.A.requires_grad_(False)
    outs = [layer(x) for layer in (fused, plain)]
    for out in outs:
        out.sum().backward()
    torch.testing.assert_close(fused.lora.B.grad, plain.lora.B.grad, atol=1e-5, rtol=1e-5)
    assert fused.lora.A.grad is None


def test_fused_under_autocast_casts_like_autocast():
    fused, plain = _fused_and_plain("linear", True, rank=4)
    x = torch.randn(3, 7, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _run(fused, x)
        ref, ref_grads = _run(plain, x)
    assert type(out.grad_fn).__name__ == "_LoRALinearBackward"
    assert out.dtype == ref.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [g.dtype for g in ref_grads] == [torch.float32] * 3
    # bf16 has 8 significant bits: the two paths round in different places
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    exact, exact_grads = _run(plain, x)  # fp32, no autocast
    for got, want, fp32 in zip(grads, ref_grads, exact_grads, strict=True):
        scale = fp32.abs().max()
        assert (got - fp32).abs().max() <= 0.03 * scale
        assert (got - want).abs().max() <= 0.03 * scale


def test_fusion_steps_aside_where_it_would_change_the_meaning():
    x = torch.randn(2, 12)
    # a hook on the base must still run
    fused, plain = _fused_and_plain("linear", True)
    seen = []
    fused.base.register_forward_hook(lambda module, inputs, out: seen.append(out.shape))
    assert type(fused(x).grad_fn).__name__ == "AddBackward0" and seen == [torch.Size([2, 10])]
    # a base that trains gets its gradient
    fused, plain = _fused_and_plain("linear", True)
    fused.base.weight.requires_grad_(True)
    fused(x).sum().backward()
    assert fused.base.weight.grad is not None
    # a bf16 base with fp32 adapters outside autocast: the branch runs in fp32, as documented
    fused, plain = _fused_and_plain("linear", True)
    fused.base.to(torch.bfloat16)
    plain.base.to(torch.bfloat16)
    xb = x.to(torch.bfloat16).requires_grad_()
    assert _grad_fn(fused, xb) != "_LoRALinearBackward"
    torch.testing.assert_close(fused(xb), plain(xb), atol=0, rtol=0)

    # subclasses of nn.Linear keep their own forward
    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    sub = LinearWithLoRA(Scaled(12, 10), rank=2, alpha=2)
    torch.testing.assert_close(sub(x), 2 * nn.functional.linear(x, sub.base.weight, sub.base.bias))  # B is zero


def _compiled_matches_eager(module, inputs: dict, make_input):
    """`module` under torch.compile(fullgraph=True) (aot_eager: dynamo and AOTAutograd, no C++
    compiler) gives the eager outputs and LoRA gradients; fullgraph raises on any graph break."""
    results = []
    for run in (module, torch.compile(module, fullgraph=True, backend="aot_eager")):
        module.zero_grad(set_to_none=True)
        x = make_input()
        out = run(x, **inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads, x.grad.clone()))
    (out, grads, dx), (ref, ref_grads, ref_dx) = results[1], results[0]
    assert len(grads) == len(ref_grads) > 0
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(dx, ref_dx, atol=1e-6, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_lora_gpt_block_compiles_whole():
    from conftest import randomize_lora, tiny_gpt

    from lora_lab import inject_lora, mark_only_lora_trainable

    model = tiny_gpt()
    inject_lora(model, "all-linear", rank=4, alpha=8, dropout=0.1)
    mark_only_lora_trainable(model)
    randomize_lora(model)
    block = model.trf_blocks[0].eval()  # eval: dropout off, so both runs draw nothing at random
    assert type(block.att.W_query(torch.zeros(1, 16, requires_grad=True)).grad_fn).__name__ == "_LoRALinearBackward"
    _compiled_matches_eager(
        block, {}, lambda: torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
    )


def test_a_lora_llama_layer_compiles_whole():
    from conftest import randomize_lora, tiny_llama

    from lora_lab import inject_lora, mark_only_lora_trainable

    model = tiny_llama()
    inject_lora(model, "all-linear", rank=4, alpha=8)
    mark_only_lora_trainable(model)
    randomize_lora(model)
    model.train()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, 32, generator=g)
    rope = model.model.rotary_emb(hidden, torch.arange(5)[None])
    _compiled_matches_eager(
        model.model.layers[0], {"position_embeddings": rope}, lambda: hidden.clone().requires_grad_()
    )


def _grad_fn(layer, x) -> str:
    return type(layer(x).grad_fn).__name__


def test_fusion_steps_aside_for_what_it_cannot_serve():
    """Found by attacking the fused path: each of these gave silently wrong numbers or crashed
    until `_fusable` refused it; now each takes the two-module path and matches it."""
    x = torch.randn(3, 12, requires_grad=True)
    fused, _ = _fused_and_plain("linear", True)
    assert _grad_fn(fused, x) == "_LoRALinearBackward"
    # accelerate's offloading replaces forward on the instance (the weight lives on meta until then)
    layer, _ = _fused_and_plain("linear", True)
    real = layer.base.forward
    layer.base.forward = lambda inp: real(inp)
    assert _grad_fn(layer, x) == "AddBackward0"
    layer, _ = _fused_and_plain("linear", True)
    real_branch = layer.lora.forward
    layer.lora.forward = lambda inp: 0.5 * real_branch(inp)
    assert _grad_fn(layer, x) == "AddBackward0"
    # hooks on the branch, backward hooks on the base
    layer, _ = _fused_and_plain("linear", True)
    layer.lora.register_forward_hook(lambda module, inputs, out: out * 2)
    assert _grad_fn(layer, x) == "AddBackward0"
    layer, _ = _fused_and_plain("linear", True)
    layer.base.register_full_backward_hook(lambda module, gin, gout: None)
    assert _grad_fn(layer, x) != "_LoRALinearBackward"

    # a LoRALayer subclass with its own forward
    class Gated(LoRALayer):
        def forward(self, x):
            return torch.tanh(super().forward(x))

    layer, _ = _fused_and_plain("linear", True)
    layer.lora.__class__ = Gated
    assert _grad_fn(layer, x) == "AddBackward0"

    # a tensor subclass as the weight (quantized-weight subclasses override F.linear)
    class Marked(torch.Tensor):
        pass

    layer, plain = _fused_and_plain("linear", True)
    layer.base.weight = nn.Parameter(layer.base.weight.detach().as_subclass(Marked), requires_grad=False)
    assert _grad_fn(layer, x) != "_LoRALinearBackward"
    # float64 under autocast: autocast leaves float64 alone, so must we
    layer, plain = _fused_and_plain("linear", True)
    layer.double()
    plain.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, plain(x.double()))
    # inputs on the meta device
    layer, _ = _fused_and_plain("linear", True)
    assert layer.to("meta")(torch.empty(3, 12, device="meta")).shape == (3, 10)


def test_fused_output_may_change_in_place_and_batches_may_be_empty():
    fused, plain = _fused_and_plain("linear", True)
    x = torch.randn(2, 4, 12, requires_grad=True)
    for layer in (fused, plain):  # ReLU(inplace=True) or a residual += after a 3-D linear
        out = layer(x)
        out += 1.0
        torch.relu_(out)
        out.sum().backward()
    torch.testing.assert_close(fused.lora.A.grad, plain.lora.A.grad)
    for shape in [(0, 12), (2, 0, 12)]:  # an expert with no tokens, an empty sequence
        x = torch.randn(shape, requires_grad=True)
        out = fused(x)
        assert out.shape == (*shape[:-1], 10)
        out.sum().backward()
        assert x.grad.shape == shape


def test_fused_refuses_second_derivatives_and_torch_func_falls_back():
    fused, plain = _fused_and_plain("linear", True)
    x = torch.randn(3, 12)
    (grad_a,) = torch.autograd.grad(fused(x).pow(2).sum(), fused.lora.A, create_graph=False)
    with pytest.raises(RuntimeError, match="first-order backward only.*fused = False"):
        torch.autograd.grad(fused(x).pow(2).sum(), fused.lora.A, create_graph=True)
    plain_a = torch.autograd.grad(plain(x).pow(2).sum(), plain.lora.A, create_graph=True)[0]
    torch.testing.assert_close(grad_a, plain_a.detach())
    # torch.func: per-parameter gradients through the functional API take the two-module path
    params = {k: v.detach() for k, v in fused.named_parameters()}
    loss = lambda p: torch.func.functional_call(fused, p, (x,)).pow(2).sum()  # noqa: E731
    grads = torch.func.grad(loss)(params)
    torch.testing.assert_close(grads["lora.A"], grad_a)
    # TorchScript tracing records the plain modules, so the trace can be saved
    traced = torch.jit.trace(fused, x, check_trace=False)
    assert "_LoRALinear" not in str(traced.graph)
    torch.testing.assert_close(traced(x), plain(x))

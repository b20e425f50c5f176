"""The layer kinds beyond linears (embeddings, convolutions, nn.MultiheadAttention) and the variants
(DoRA, LoRA biases, trained base biases), each against PEFT on the same weights: outputs and every
gradient in training with dropout, a few optimiser steps, merge / unmerge / disable / unload, the
trainable counts, and both adapter formats both ways."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_lab import (
    count_parameters,
    disable_lora,
    export_peft_adapter,
    import_peft_adapter,
    inject_lora,
    load_adapter,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from lora_lab.lora import lora_modules

peft = pytest.importorskip("peft")


class Tokens(nn.Module):
    def __init__(self, padding_idx=None, max_norm=None):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=padding_idx, max_norm=max_norm)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.emb(x))


class Convs(nn.Module):
    def __init__(self, dims=2, groups=1, kernel=3, stride=1, dilation=1, padding_mode="zeros"):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        self.conv = conv(4, 8, kernel, stride, padding=kernel // 2 * dilation, dilation=dilation, groups=groups,
                         padding_mode=padding_mode)  # fmt: skip
        self.act = nn.GELU()
        self.out = conv(8, 2, 1)

    def forward(self, x):
        return self.out(self.act(self.conv(x)))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0])


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        return self.out(self.act(self.lin(x)))


def _encoder():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


_G = torch.Generator().manual_seed(7)
INPUTS = {
    "tokens": lambda: torch.randint(0, 20, (3, 5), generator=_G),
    "conv1": lambda: torch.randn(2, 4, 9, generator=_G),
    "conv2": lambda: torch.randn(2, 4, 7, 6, generator=_G),
    "conv3": lambda: torch.randn(2, 4, 5, 4, 3, generator=_G),
    "seq": lambda: torch.randn(2, 5, 8, generator=_G),
    "feat": lambda: torch.randn(4, 6, generator=_G),
}
# name: (model, input, targets, rank, dropout)
MODELS = {
    "embedding": (lambda: Tokens(), "tokens", ["emb"], 4, 0.0),
    "embedding-padding-max-norm": (lambda: Tokens(padding_idx=0, max_norm=1.5), "tokens", ["emb"], 4, 0.0),
    "conv1d": (lambda: Convs(1), "conv1", ["conv", "out"], 2, 0.1),
    "conv2d": (lambda: Convs(2), "conv2", ["conv", "out"], 2, 0.1),
    "conv2d-stride-1x1": (lambda: Convs(2, kernel=1, stride=2), "conv2", ["conv"], 2, 0.1),
    "conv2d-grouped": (lambda: Convs(2, groups=2), "conv2", ["conv"], 4, 0.1),
    "conv3d": (lambda: Convs(3), "conv3", ["conv"], 2, 0.1),
    "multihead-attention": (Attention, "seq", ["mha"], 2, 0.0),
    "transformer-encoder": (_encoder, "seq", ["self_attn", "linear1", "linear2"], 2, 0.0),
    "linear": (MLP, "feat", ["lin", "out"], 2, 0.1),
}
VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "lora_bias": {"lora_bias": True}}
# What PEFT implements (and so what is compared); the rest is refused by both or by us (tested below).
CASES = [
    (m, v)
    for m in MODELS
    for v in VARIANTS
    if not (v == "lora_bias" and m.startswith(("embedding", "multihead", "transformer")))
    and not (v == "dora" and m.startswith(("conv2d-grouped", "multihead", "transformer")))
    and not m.startswith(("multihead", "transformer"))  # PEFT 0.21 applies out_proj's update twice: see below
]


def _randomize(model):
    """Every adapter tensor off its start (B = 0, magnitude = ||W||), reproducibly."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for key, tensor in lora_state_dict(model).items():
            noise = torch.randn(tensor.shape, generator=g) * 0.3
            tensor.add_(noise * tensor.abs().mean() if key.endswith("magnitude") else noise)


def _peft_name(ours: str, theirs: set[str]) -> str:
    """PEFT's parameter name for one of ours (`n.lora.A` -> `base_model.model.n.lora_A.default.weight`)."""
    name, key = ours.split(".lora.") if ".lora." in ours else ours.split(".out_lora.")
    part = {"A": ["lora_A.default.weight", "lora_embedding_A.default"], "B": ["lora_B.default.weight",
            "lora_embedding_B.default"], "bias": ["lora_B.default.bias"],
            "magnitude": ["lora_magnitude_vector.default.weight"]}[key]  # fmt: skip
    inner = "" if ".lora." in ours else "base_layer.out_proj."
    found = [f"base_model.model.{name}.{inner}{p}" for p in part if f"base_model.model.{name}.{inner}{p}" in theirs]
    assert len(found) == 1, (ours, found)
    return found[0]


def _pair(case, tmp_path):
    model_name, variant = case
    make, inputs, targets, rank, dropout = MODELS[model_name]
    torch.manual_seed(0)
    base = make()
    ours = copy.deepcopy(base)
    inject_lora(ours, targets, rank=rank, alpha=2 * rank, dropout=dropout, **VARIANTS[variant])
    mark_only_lora_trainable(ours)
    _randomize(ours)
    export_peft_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    return base, ours, theirs, INPUTS[inputs]


def _loss(out):
    return out.float().pow(2).mean()


@pytest.mark.parametrize("case", CASES, ids=[f"{m}-{v}" for m, v in CASES])
def test_each_kind_and_variant_equals_peft(case, tmp_path):
    base, ours, theirs, make_input = _pair(case, tmp_path)
    x = make_input()
    mine = {f"{n}": p for n, p in ours.named_parameters() if p.requires_grad}
    peft_params = dict(theirs.named_parameters())
    assert set(mine) == set(lora_state_dict(ours))
    assert count_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
    assert {_peft_name(n, set(peft_params)) for n in mine} == {n for n, p in peft_params.items() if p.requires_grad}

    # training mode, dropout on: same outputs and the same gradient for every adapter tensor
    ours.train(), theirs.train()
    torch.manual_seed(1)
    out = ours(x)
    torch.manual_seed(1)
    ref = theirs(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    _loss(out).backward(), _loss(ref).backward()
    for name, param in mine.items():
        theirs_grad = peft_params[_peft_name(name, set(peft_params))].grad
        torch.testing.assert_close(param.grad, theirs_grad.reshape(param.shape), atol=1e-5, rtol=1e-4, msg=name)

    # three AdamW steps with dropout: the same trajectory
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    for step in range(3):
        for model, opt in zip((ours, theirs), opts, strict=True):
            opt.zero_grad()
            torch.manual_seed(10 + step)
            _loss(model(x)).backward()
            opt.step()
    ours.eval(), theirs.eval()
    with torch.no_grad():
        trained = ours(x)
        torch.testing.assert_close(trained, theirs(x), atol=1e-5, rtol=1e-4)
        plain = base.eval()(x)
        assert (trained - plain).abs().max() > 1e-3  # the adapter does something
        with disable_lora(ours):
            torch.testing.assert_close(ours(x), plain, atol=1e-6, rtol=0)
        with theirs.disable_adapter():
            torch.testing.assert_close(theirs(x), plain, atol=1e-6, rtol=0)

    # PEFT's own save loads here with its outputs; ours and lora_lab's format round-trip
    theirs.save_pretrained(tmp_path / "theirs")
    imported = copy.deepcopy(base)
    import_peft_adapter(imported, tmp_path / "theirs")
    save_adapter(ours, tmp_path / "ours.safetensors")
    loaded = copy.deepcopy(base)
    load_adapter(loaded, tmp_path / "ours.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(imported.eval()(x), trained, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(loaded.eval()(x), trained, atol=0, rtol=0)

    refusals = {"conv2d-grouped": r"grouped convolution \(groups=2\)", "embedding-padding-max-norm": "max_norm=1.5"}
    if case[0] in refusals:  # merging could not keep the outputs: refused, and the model stays as it was
        with pytest.raises(ValueError, match=refusals[case[0]] + ".*Keep the adapter unmerged"):
            merge_lora(ours)
        torch.testing.assert_close(ours(x), trained, atol=0, rtol=0)
        return
    with torch.no_grad():
        merge_lora(ours)
        theirs.merge_adapter()
        torch.testing.assert_close(ours(x), trained, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(theirs(x), trained, atol=1e-5, rtol=1e-4)
        unmerge_lora(ours)
        torch.testing.assert_close(ours(x), trained, atol=1e-5, rtol=1e-4)
        theirs.unmerge_adapter()
        unload_lora(ours)
        unloaded = theirs.merge_and_unload()
        assert not list(lora_modules(ours))
        assert [type(m) for m in ours.modules()] == [type(m) for m in unloaded.modules()]
        torch.testing.assert_close(ours(x), unloaded(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours(x), trained, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", ["lora_only", "all"])
def test_trained_base_biases_count_and_travel_as_peft(bias, tmp_path):
    """PEFT's `bias`: which base biases train beside LoRA; saved with the adapter in both formats."""
    torch.manual_seed(0)
    base = nn.Sequential(Convs(2), nn.Flatten(), nn.LazyLinear(4))
    base(INPUTS["conv2"]())
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["0.conv"], bias=bias))
    ours = copy.deepcopy(base)
    inject_lora(ours, ["0.conv"], rank=2, alpha=8)
    mark_only_lora_trainable(ours, bias=bias)
    assert count_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]
    _randomize(ours)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad and p.dim() == 1:
                p.add_(1.0)  # the trained biases move too
    x = INPUTS["conv2"]()
    want = ours.eval()(x)
    export_peft_adapter(ours, tmp_path / "peft")
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(loaded.eval()(x), want, atol=1e-5, rtol=1e-5)
    assert loaded.peft_config["default"].bias == bias
    imported = copy.deepcopy(base)
    import_peft_adapter(imported, tmp_path / "peft")
    torch.testing.assert_close(imported.eval()(x), want, atol=1e-5, rtol=1e-5)
    save_adapter(ours, tmp_path / "ours.safetensors")
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "ours.safetensors")
    torch.testing.assert_close(again.eval()(x), want, atol=0, rtol=0)


def test_a_merged_model_saves_its_trained_biases_unmerged(tmp_path):
    """With lora_bias and trained base biases, a merged base bias holds both: the adapter must carry
    the base bias alone, or loading it would add the LoRA bias twice."""
    torch.manual_seed(0)
    base = MLP()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["lin", "out"], rank=2, lora_bias=True)
    mark_only_lora_trainable(ours, bias="lora_only")
    _randomize(ours)
    with torch.no_grad():
        ours.lin.base.bias.add_(0.5)
    x = INPUTS["feat"]()
    want = ours.eval()(x)
    merge_lora(ours)
    save_adapter(ours, tmp_path / "a.safetensors")
    export_peft_adapter(ours, tmp_path / "peft")
    for load, path in ((load_adapter, "a.safetensors"), (import_peft_adapter, "peft")):
        fresh = copy.deepcopy(base)
        load(fresh, tmp_path / path)
        torch.testing.assert_close(fresh.eval()(x), want, atol=1e-6, rtol=1e-6, msg=path)


@pytest.mark.parametrize(
    ("make", "targets", "kwargs", "message"),
    [
        (lambda: Tokens(), ["emb"], {"lora_bias": True}, "emb: lora_bias is not defined for embeddings"),
        (lambda: Convs(2, groups=2), ["conv"], {"rank": 3}, "rank 3 is not a multiple of the layer's groups=2"),
        (lambda: Convs(2, groups=2), ["conv"], {"rank": 2, "use_dora": True}, "DoRA on a grouped convolution"),
        (Attention, ["mha"], {"lora_bias": True}, "lora_bias on nn.MultiheadAttention is not supported"),
        (MLP, ["lin"], {"lora_bias": True, "use_dora": True}, "lora_bias and use_dora do not go together"),
        (lambda: nn.Sequential(nn.ConvTranspose2d(2, 2, 3)), ["0"], {}, r"LoRA does not wrap: \['0 \(ConvTranspose2d"),
        (lambda: nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4)), ["0"], {}, "kdim or vdim other than"),
        (lambda: nn.Sequential(nn.Embedding(5, 4, sparse=True)), ["0"], {}, "sparse=True: the LoRA branch's gradient"),
    ],
)
def test_what_stays_refused_is_named_and_changes_nothing(make, targets, kwargs, message):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises((ValueError, TypeError), match=message):
        inject_lora(model, targets, **kwargs)
    assert not list(lora_modules(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()]


def test_dilation_and_padding_modes_merge_exactly():
    """PEFT's A convolution leaves out the base's dilation and padding mode (its outputs would not
    even line up); ours keeps them, so the unmerged and merged layer agree."""
    for model in (Convs(2, dilation=2), Convs(1, padding_mode="reflect"), Convs(2, padding_mode="circular")):
        x = INPUTS["conv1" if isinstance(model.conv, nn.Conv1d) else "conv2"]()
        inject_lora(model, ["conv"], rank=2, use_dora=True)
        _randomize(model)
        with torch.no_grad():
            unmerged = model(x)
            merge_lora(model)
            torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=1e-5)


def _attention_reference(model, wrapper_name="mha", out_twice=False):
    """The attention with its weights replaced by W + delta W (DoRA: g * (W + delta W)) in closed
    form, as a function of the adapter tensors, so gradients can be compared too."""
    wrapper = model.get_submodule(wrapper_name)
    weights = {}
    for lora, key in ((wrapper.lora, "in_proj_weight"), (wrapper.out_lora, "out_proj.weight")):
        weight = wrapper.base.get_parameter(key)
        updated = weight + (lora.B @ lora.A) * lora.scaling * (2 if out_twice and lora is wrapper.out_lora else 1)
        if lora.magnitude is not None:
            updated = lora.magnitude[:, None] * updated / updated.detach().norm(dim=1, keepdim=True)
        weights[key] = updated
    return lambda x: torch.func.functional_call(wrapper.base, weights, (x, x, x), {"need_weights": False})[0]


@pytest.mark.parametrize("use_dora", [False, True])
def test_multihead_attention_is_its_merged_weights(use_dora, tmp_path):
    """nn.MultiheadAttention with LoRA computes the attention with W + scaling B A in its in_proj and
    out_proj (DoRA: g * (W + scaling B A) per row), checked in closed form: outputs and gradients in
    training, merge, unmerge, disable, unload, and both formats."""
    torch.manual_seed(0)
    model = Attention()
    base = copy.deepcopy(model).eval()
    inject_lora(model, ["mha"], rank=2, use_dora=use_dora)
    mark_only_lora_trainable(model)
    _randomize(model)
    x = INPUTS["seq"]()
    out = model.mha(x, x, x, need_weights=False)[0]
    ref = _attention_reference(model)(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == (6 if use_dora else 4)
    grads = torch.autograd.grad(_loss(out), params)
    want = torch.autograd.grad(_loss(ref), params)
    for got, expected in zip(grads, want, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    model.eval()
    with torch.no_grad():
        trained = model(x)
        with disable_lora(model):
            torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=0)
        merge_lora(model)
        torch.testing.assert_close(model(x), trained, atol=1e-5, rtol=1e-5)
        unmerge_lora(model)
        torch.testing.assert_close(model(x), trained, atol=1e-5, rtol=1e-5)
        save_adapter(model, tmp_path / "a.safetensors")
        loaded = copy.deepcopy(base)
        load_adapter(loaded, tmp_path / "a.safetensors")
        torch.testing.assert_close(loaded(x), trained, atol=0, rtol=0)
        if not use_dora:  # PEFT has no DoRA for attention: export refuses it (tested below)
            export_peft_adapter(model, tmp_path / "peft")
            imported = copy.deepcopy(base)
            with pytest.warns(UserWarning, match="out_proj update twice"):
                import_peft_adapter(imported, tmp_path / "peft")
            torch.testing.assert_close(imported(x), trained, atol=0, rtol=0)
        unload_lora(model)
        assert type(model.mha) is nn.MultiheadAttention and not list(lora_modules(model))
        torch.testing.assert_close(model(x), trained, atol=1e-5, rtol=1e-5)


def test_multihead_attention_against_peft_which_applies_out_proj_twice(tmp_path):
    """Same tensors, names, shapes and trainable count as PEFT; PEFT 0.21's forward and merge add
    out_proj's update twice (huggingface/peft#3774, open), which is exactly where the two differ.
    When PEFT fixes it, the first assertion fails and this test should compare directly."""
    torch.manual_seed(0)
    model = Attention()
    base = copy.deepcopy(model)
    inject_lora(model, ["mha"], rank=2, alpha=4)
    mark_only_lora_trainable(model)
    _randomize(model)
    export_peft_adapter(model, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    assert count_parameters(model).trainable == theirs.get_nb_trainable_parameters()[0]
    x = INPUTS["seq"]()
    with torch.no_grad():
        twice = _attention_reference(model, out_twice=True)(x)
        torch.testing.assert_close(theirs.base_model.model.mha(x, x, x)[0], twice, atol=1e-5, rtol=1e-5)
        theirs.save_pretrained(tmp_path / "theirs")
        imported = copy.deepcopy(base)
        with pytest.warns(UserWarning, match=r"\['mha'\]: PEFT up to 0.21 adds nn.MultiheadAttention's out_proj"):
            import_peft_adapter(imported, tmp_path / "theirs")
        mine = lora_state_dict(model)
        for key, tensor in lora_state_dict(imported).items():
            torch.testing.assert_close(tensor, mine[key], atol=0, rtol=0, msg=key)
        assert lora_state_dict(imported).keys() == mine.keys()
    with pytest.raises(ValueError, match="PEFT has no DoRA for nn.MultiheadAttention"):
        dora = copy.deepcopy(base)
        inject_lora(dora, ["mha"], rank=2, use_dora=True)
        export_peft_adapter(dora, tmp_path / "dora")


def test_a_tied_embedding_refuses_to_merge_with_the_reason():
    """Merging LoRA into an embedding tied to the output head would change the head too (PEFT does
    it silently): refused, naming both, while the unmerged adapter runs as PEFT's does."""
    model = Tokens()
    model.head = nn.Linear(8, 20, bias=False)
    model.head.weight = model.emb.weight
    inject_lora(model, ["emb"], rank=2)
    with pytest.raises(ValueError, match=r"emb: its weight is shared with .*head.weight.*tied"):
        merge_lora(model)


def _train(model, batches, steps=30, lr=1e-2):
    mark_only_lora_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        x, y = batches[step % len(batches)]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


class ResNetish(nn.Module):
    """Two residual Conv2d blocks with batch norm, global pooling and a linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
            for _ in range(2)
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = F.relu(self.stem(x))
        for block in self.blocks:
            h = F.relu(h + block(h))
        return self.head(h.mean(dim=(2, 3)))


def test_a_resnet_style_cnn_trains_with_conv_lora():
    torch.manual_seed(0)
    model = ResNetish()
    x = torch.randn(16, 3, 8, 8)
    y = (x[:, 0].mean(dim=(1, 2)) > 0).long()  # a learnable rule: the sign of channel 0's mean
    names = inject_lora(model, lambda n, m: isinstance(m, nn.Conv2d), rank=4, alpha=8)
    assert len(names) == 5
    losses = _train(model, [(x, y)], steps=40)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses[::5]


def test_torch_transformer_encoder_trains_with_attention_lora():
    torch.manual_seed(0)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = _encoder()
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.encoder(x).mean(dim=1))

    model = Classifier()
    x = torch.randn(16, 5, 8)
    y = (x[:, 0, 0] > 0).long()
    names = inject_lora(model, "all-linear", rank=4, alpha=8)
    assert "encoder.layers.0.self_attn" in names and "head" not in names
    losses = _train(model, [(x, y)], steps=40)
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses[::5]


def test_parameter_report_counts_every_kind_as_peft():
    """The report's LoRA row: A, B, DoRA's magnitudes and attention's second branch, as PEFT counts them."""
    from lora_lab import parameter_report

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv, self.lin = nn.Embedding(20, 8), nn.Conv2d(4, 8, 3), nn.Linear(8, 8)

    torch.manual_seed(0)
    base = Mixed()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["emb", "conv", "lin"], rank=2, use_dora=True)
    mark_only_lora_trainable(ours)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["emb", "conv", "lin"], use_dora=True)
    )
    lora_row = next(r for r in parameter_report(ours) if r.group == "LoRA")
    assert lora_row.parameters == lora_row.trainable == theirs.get_nb_trainable_parameters()[0]
    # closed form: A + B + magnitude per layer, in the linear layout (in, out)
    assert lora_row.parameters == sum(2 * (i + o) + o for i, o in ((20, 8), (4 * 9, 8), (8, 8)))
    attention = Attention()
    inject_lora(attention, ["mha"], rank=2)
    assert next(r for r in parameter_report(attention) if r.group == "LoRA").parameters == 2 * (8 + 24) + 2 * (8 + 8)


def test_embeddings_of_a_tied_hugging_face_model_equal_peft(tmp_path):
    """Llama with tie_word_embeddings: LoRA on embed_tokens changes the lookup, while the tied lm_head
    keeps the base weight, as PEFT does by default; outputs and gradients equal PEFT's, and merging
    (which would move the head too) is refused with the reason."""
    from conftest import tiny_llama

    base = tiny_llama(tie=True)
    ours = copy.deepcopy(base)
    inject_lora(ours, ["embed_tokens", "q_proj"], rank=4, alpha=8)
    mark_only_lora_trainable(ours)
    _randomize(ours)
    export_peft_adapter(ours, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a", is_trainable=True)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    out, ref = ours(ids).logits, theirs(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out - base(ids).logits).abs().max() > 1e-3
    _loss(out).backward(), _loss(ref).backward()
    peft_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        if param.requires_grad:
            theirs_grad = peft_params[_peft_name(name, set(peft_params))].grad
            torch.testing.assert_close(param.grad, theirs_grad, atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match=r"embed_tokens: its weight is shared with .*lm_head.weight"):
        merge_lora(ours)


@pytest.mark.parametrize("dims", [1, 2])
def test_an_unbatched_input_to_a_dora_convolution_is_the_batched_one(dims):
    """torch's convolutions take (C, H, W) as well as (N, C, H, W): DoRA's per-channel factor must
    find the channels either way (with H = out_channels a wrong axis would broadcast silently)."""
    torch.manual_seed(0)
    model = Convs(dims)
    inject_lora(model, ["conv"], rank=2, use_dora=True)
    _randomize(model)
    x = torch.randn(1, 4, *[8] * dims)  # 8 = out_channels of model.conv
    with torch.no_grad():
        torch.testing.assert_close(model(x[0]), model(x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_parametrized_base_runs_unmerged_and_refuses_to_merge(use_dora):
    """weight_norm's weight is computed on every access: a merge could not write it (it would write
    a temporary and lose the adapter), so merging and unloading are refused; the forward is right."""
    from torch.nn.utils.parametrizations import weight_norm

    torch.manual_seed(0)
    model = nn.Sequential(weight_norm(nn.Conv1d(4, 8, 3, padding=1)), nn.GELU(), weight_norm(nn.Conv1d(8, 2, 1)))
    plain = copy.deepcopy(model)
    assert inject_lora(model, ["0", "2"], rank=2, use_dora=use_dora) == ["0", "2"]
    _randomize(model)
    x = INPUTS["conv1"]()
    with torch.no_grad():
        for (_, wrapper), layer in zip(lora_modules(model), (plain[0], plain[2]), strict=True):
            merged, _ = wrapper.updated_weight()  # W + delta W (DoRA: scaled), the closed form
            parametrize = layer.parametrizations.weight
            layer.parametrizations.weight.original0.copy_(
                merged.view(layer.weight.shape).norm(dim=(1, 2), keepdim=True)
            )
            parametrize.original1.copy_(merged.view(layer.weight.shape))
        torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)
    for action in (merge_lora, unload_lora):
        with pytest.raises(ValueError, match="0: the base weight is computed .*keep the adapter unmerged"):
            action(model)


@pytest.mark.parametrize("use_dora", [False, True])
def test_a_bf16_base_sums_in_fp32_once_as_peft(use_dora, tmp_path):
    """A bf16 base with fp32 adapters: the branch is added in fp32 and rounded once, in training and
    inference alike, giving PEFT's outputs to the last bit."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    ours = copy.deepcopy(base)
    inject_lora(ours, ["0"], rank=4, use_dora=use_dora)
    _randomize(ours)
    export_peft_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = torch.randn(8, 64).to(torch.bfloat16)
    with torch.no_grad():
        inference = ours(x)
    training = ours(x)
    assert training.dtype == inference.dtype == torch.bfloat16
    torch.testing.assert_close(training.detach(), inference, atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(inference, theirs(x), atol=0, rtol=0)


def test_dora_inside_a_transformer_encoder_runs_padded_batches_in_eval():
    """nn.TransformerEncoder makes a padded batch a nested tensor in eval under no_grad, which DoRA's
    per-channel rescaling cannot take: those batches run dense, with the training path's outputs."""
    torch.manual_seed(0)
    model = _encoder()
    model.use_nested_tensor = True
    inject_lora(model, "all-linear", rank=2, use_dora=True)
    _randomize(model)
    x = INPUTS["seq"]()
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    model.eval()
    with torch.no_grad():
        fast = model(x, src_key_padding_mask=pad)
    slow = model(x, src_key_padding_mask=pad)
    torch.testing.assert_close(fast[~pad], slow.detach()[~pad], atol=1e-5, rtol=1e-5)


def test_analyze_reads_every_branch_as_its_update(tmp_path):
    """`updates.update_factors` gives (A, B, scaling) with scaling * B A = the layer's delta W: a grouped
    convolution's B block-diagonal, attention's out_proj as its own entry; DoRA is warned about."""
    from lora_lab.updates import update_factors as read_adapter

    torch.manual_seed(0)
    model = nn.Sequential(Convs(2, groups=2), Attention())
    inject_lora(model, ["0.conv", "1.mha"], rank=4)
    _randomize(model)
    save_adapter(model, tmp_path / "a.safetensors")
    read = read_adapter(tmp_path / "a.safetensors")
    assert set(read) == {"0.conv", "1.mha", "1.mha.out_proj"}
    want = {"0.conv": model[0].conv.lora, "1.mha": model[1].mha.lora, "1.mha.out_proj": model[1].mha.out_lora}
    for name, (a, b, scaling) in read.items():
        torch.testing.assert_close(scaling * b @ a, want[name].delta_weight(), atol=1e-6, rtol=1e-6, msg=name)
    dora = MLP()
    base = copy.deepcopy(dora)
    inject_lora(dora, ["lin"], rank=2, use_dora=True)
    _randomize(dora)
    save_adapter(dora, tmp_path / "d.safetensors")
    with pytest.warns(UserWarning, match="1 DoRA module.*magnitude's rescaling .* is not in them"):
        read_adapter(tmp_path / "d.safetensors")
    # with the base: DoRA's whole update (what merging adds to W), given by its top-rank directions
    a, b, scaling = read_adapter(tmp_path / "d.safetensors", base)["lin"]
    merge_lora(dora)
    whole = (dora.lin.base.weight - base.lin.weight).double()
    top = torch.linalg.svdvals(whole)[:2]
    torch.testing.assert_close(torch.linalg.svdvals(scaling * b @ a)[:2], top, atol=1e-5, rtol=1e-5)


def test_a_bare_attention_module_is_refused_with_the_way_to_wrap_it():
    with pytest.raises(ValueError, match=r"model is a MultiheadAttention itself.*MultiheadAttentionWithLoRA\(model"):
        inject_lora(nn.MultiheadAttention(8, 2), "all-linear")


def test_a_module_held_under_two_names_is_wrapped_under_both():
    """One module object under two names: wrapping one name alone would leave the other (the one the
    forward may call) running the base silently; unloading puts the plain module back under both."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(6, 6)
            self.second = self.first  # the forward calls this name

        def forward(self, x):
            return self.second(x)

    model = Twice()
    base = copy.deepcopy(model)
    inject_lora(model, ["first"], rank=2)
    assert model.second is model.first
    _randomize(model)
    x = INPUTS["feat"]()
    with torch.no_grad():
        adapted = model(x)
        assert (adapted - base(x)).abs().max() > 1e-3
        unload_lora(model)
        assert type(model.second) is nn.Linear and model.second is model.first
        torch.testing.assert_close(model(x), adapted, atol=1e-6, rtol=1e-6)


def test_t5s_shared_embedding_warns_that_its_twins_stay_unadapted():
    """transformers' T5 ties `shared` to `encoder.embed_tokens` and `decoder.embed_tokens`, separate
    modules that the forward calls: `shared` alone would adapt nothing (PEFT's result too), so say so."""
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.warns(UserWarning, match=r"shared: encoder.embed_tokens, decoder.embed_tokens\); those keep the base"):
        inject_lora(model, ["shared"], rank=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # all three targeted: nothing left behind
        inject_lora(copy.deepcopy(T5ForConditionalGeneration(model.config)), ["shared", "embed_tokens"], rank=2)

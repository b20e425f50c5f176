"""Several named adapters on one model (`named_adapters.py`), against PEFT on the same weights: two
adapters on partly different layers of three kinds, switched, disabled, merged one at a time,
unloaded, combined and deleted; saved and loaded by name in both formats; and the refusals."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_lab import (
    active_adapter,
    adapter_names,
    add_weighted_adapter,
    delete_adapter,
    disable_lora,
    export_peft_adapter,
    import_peft_adapter,
    inject_lora,
    load_adapter,
    mark_only_lora_trainable,
    merge_lora,
    save_adapter,
    set_adapter,
    unload_lora,
    unmerge_lora,
)
from lora_lab.lora import lora_modules
from lora_lab.named_adapters import adapter_layer

peft = pytest.importorskip("peft")

TOL = dict(atol=1e-5, rtol=1e-5)


class Mixed(nn.Module):
    """An embedding, linears and a 1-D convolution: three layer kinds in one forward."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.q = nn.Linear(16, 16)
        self.v = nn.Linear(16, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = self.v(F.gelu(self.q(self.emb(x))))
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.fc(F.gelu(h))


FIRST = dict(targets=["emb", "q", "conv"], rank=4, alpha=8)
SECOND = dict(targets=["q", "v", "fc", "conv"], rank=2, alpha=6, use_rslora=True)


def _two_adapters(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(base, model with adapters "default" and "b", every A and B random, "default" active)."""
    torch.manual_seed(seed)
    base = Mixed().eval()
    model = copy.deepcopy(base)
    inject_lora(model, **FIRST)
    inject_lora(model, **SECOND, name="b")
    with torch.no_grad():
        for _, wrapper in lora_modules(model):
            for name in ("default", "b"):
                if name == wrapper.adapter_name or name in wrapper.others:
                    for t in (adapter_layer(wrapper, name).A, adapter_layer(wrapper, name).B):
                        t.normal_(0, 0.3)
    return base, model


def _peft_twin(base: nn.Module, model: nn.Module, tmp_path) -> nn.Module:
    """PEFT's model with the same two adapters, read from our export of them."""
    export_peft_adapter(model, tmp_path / "ours")
    twin = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    twin.load_adapter(tmp_path / "ours" / "b", adapter_name="b")
    return twin.eval()


def _x():
    return torch.randint(0, 20, (3, 7), generator=torch.Generator().manual_seed(5))


def test_two_adapters_switch_disable_merge_and_unload_as_peft(tmp_path):
    base, model = _two_adapters()
    twin = _peft_twin(base, model, tmp_path)
    x = _x()
    assert adapter_names(model) == ["b", "default"] and active_adapter(model) == "default"
    with torch.no_grad():
        base_out, first = base(x), model(x)
        torch.testing.assert_close(first, twin(x), **TOL)
        # fc holds "b" only: it runs its base while "default" is active
        assert not dict(lora_modules(model))["fc"].active
        set_adapter(model, "b")
        twin.set_adapter("b")
        second = model(x)
        torch.testing.assert_close(second, twin(x), **TOL)
        assert (second - first).abs().max() > 1e-2 and (second - base_out).abs().max() > 1e-2
        with disable_lora(model), twin.disable_adapter():
            torch.testing.assert_close(model(x), base_out, **TOL)
            torch.testing.assert_close(twin(x), base_out, **TOL)
        torch.testing.assert_close(model(x), second, **TOL)
        # merge one adapter: "default" becomes the one that runs, merged, as PEFT's merge_adapter
        merge_lora(model, "default")
        twin.set_adapter("default")
        twin.base_model.merge_adapter(["default"])
        assert active_adapter(model) == "default" and all(w.merged for _, w in lora_modules(model) if w.active)
        torch.testing.assert_close(model(x), first, **TOL)
        torch.testing.assert_close(twin(x), first, **TOL)
        unmerge_lora(model)
        twin.base_model.unmerge_adapter()
        torch.testing.assert_close(model(x), first, **TOL)
        # switching a merged model unmerges it first (PEFT does the same)
        merge_lora(model)
        set_adapter(model, "b")
        assert not any(w.merged for _, w in lora_modules(model))
        torch.testing.assert_close(model(x), second, **TOL)
        # unload one: a plain model with that adapter merged, the other dropped
        plain = unload_lora(copy.deepcopy(model), name="default")
        peft_plain = copy.deepcopy(twin).merge_and_unload(adapter_names=["default"])
        assert not list(lora_modules(plain))
        torch.testing.assert_close(plain(x), first, **TOL)
        torch.testing.assert_close(peft_plain(x), first, **TOL)


def test_a_switch_trains_the_adapter_switched_to_and_freezes_the_others():
    _, model = _two_adapters()
    mark_only_lora_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n and ".others." not in n for n in trainable)
    assert not any(n.startswith("fc.") for n in trainable)  # fc's only adapter is "b", waiting
    set_adapter(model, "b")
    layers = dict(lora_modules(model))
    assert layers["fc"].lora.A.requires_grad and not layers["emb"].lora.A.requires_grad
    assert not any(p.requires_grad for w in layers.values() for p in w.others.parameters())
    # a training step moves "b" only
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".others." in k or k.startswith("emb.")}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(_x()).square().mean().backward()
    opt.step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in frozen.items())


def test_combining_adapters_is_their_weighted_sum_as_peft_cat(tmp_path):
    base, model = _two_adapters()
    twin = _peft_twin(base, model, tmp_path)
    x = _x()
    weights = [0.7, -0.4]
    add_weighted_adapter(model, ["default", "b"], weights, "mix")
    twin.add_weighted_adapter(["default", "b"], weights, "mix", combination_type="cat")
    assert active_adapter(model) == "default"  # added waiting, as in PEFT
    for layer, wrapper in lora_modules(model):
        pairs = zip(["default", "b"], weights, strict=True)
        parts = [(adapter_layer(wrapper, a), w) for a, w in pairs if a in wrapper_names(wrapper)]
        want = sum(w * lora.delta_weight() for lora, w in parts)
        mix = adapter_layer(wrapper, "mix")
        assert mix.rank == sum(lora.rank for lora, _ in parts) and mix.scaling == 1.0, layer
        torch.testing.assert_close(mix.delta_weight(), want, atol=1e-6, rtol=1e-6)
    set_adapter(model, "mix")
    twin.set_adapter("mix")
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), **TOL)
    # weights 1 and 1: the two adapters run together, exactly (delta W adds in every layer)
    add_weighted_adapter(model, ["default", "b"], [1, 1], "both")
    set_adapter(model, "both")
    for _, wrapper in lora_modules(model):
        held = [adapter_layer(wrapper, a).delta_weight() for a in ("default", "b") if a in wrapper_names(wrapper)]
        torch.testing.assert_close(wrapper.lora.delta_weight(), sum(held), atol=1e-6, rtol=1e-6)


def wrapper_names(wrapper):
    return {wrapper.adapter_name, *wrapper.others}


def test_deleting_adapters_as_peft(tmp_path):
    base, model = _two_adapters()
    twin = _peft_twin(base, model, tmp_path)
    x = _x()
    delete_adapter(model, "b")  # a waiting one: the active adapter keeps running
    twin.delete_adapter("b")
    assert adapter_names(model) == ["default"] and active_adapter(model) == "default"
    assert "fc" not in dict(lora_modules(model)) and isinstance(model.fc, nn.Linear)  # held "b" only
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), **TOL)
    _, model = _two_adapters()
    twin = _peft_twin(base, model, tmp_path / "again")
    delete_adapter(model, "default")  # the active one: the first other name (sorted) takes over, as PEFT
    twin.delete_adapter("default")
    # PEFT's layers switch to "b"; PeftModel itself keeps the deleted name when its first LoRA layer (emb)
    # has no adapter left, and its forward then fails with KeyError: naming "b" again works around that
    twin.set_adapter("b")
    assert active_adapter(model) == "b"
    assert isinstance(model.emb, nn.Embedding)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin(x), **TOL)
    delete_adapter(model, "b")  # the last one: the base model again
    assert not list(lora_modules(model)) and adapter_names(model) == []
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), **TOL)


def test_each_adapter_saves_and_loads_by_name_in_both_formats(tmp_path):
    base, model = _two_adapters()
    x = _x()
    with torch.no_grad():
        first = model(x)
        set_adapter(model, "b")
        second = model(x)
    set_adapter(model, "default")
    save_adapter(model, tmp_path / "b.safetensors", name="b")
    save_adapter(model, tmp_path / "default.safetensors")  # the active one
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "default.safetensors")
    load_adapter(fresh, tmp_path / "b.safetensors", name="b")
    assert adapter_names(fresh) == ["b", "default"] and active_adapter(fresh) == "default"
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), first, **TOL)
        set_adapter(fresh, "b")
        torch.testing.assert_close(fresh(x), second, **TOL)
    # PEFT's own save of both (default at the top, "b" in a subdirectory) imports one by name
    twin = _peft_twin(base, model, tmp_path)
    twin.save_pretrained(tmp_path / "peft")
    assert (tmp_path / "peft" / "b" / "adapter_config.json").is_file()
    fresh = copy.deepcopy(base)
    import_peft_adapter(fresh, tmp_path / "peft", name="b")
    assert adapter_names(fresh) == ["b"] and active_adapter(fresh) == "b"
    import_peft_adapter(fresh, tmp_path / "peft", name="default")
    assert active_adapter(fresh) == "b"  # the second one waits
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), second, **TOL)
        set_adapter(fresh, "default")
        torch.testing.assert_close(fresh(x), first, **TOL)
    # loading into an adapter the model holds overwrites that one only
    load_adapter(fresh, tmp_path / "b.safetensors", name="b")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), first, **TOL)


def test_refusals_name_the_problem_and_change_nothing(tmp_path):
    _, model = _two_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def unchanged(atol=0.0):
        state = model.state_dict()
        return state.keys() == before.keys() and all(torch.allclose(state[k], before[k], atol=atol) for k in before)

    with pytest.raises(ValueError, match="no adapter named 'c'; it holds \\['b', 'default'\\]"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match="already hold a LoRA adapter named 'b'"):
        inject_lora(model, ["fc"], name="b")
    with pytest.raises(ValueError, match="only"):
        add_weighted_adapter(model, ["default", "b"], [1, 1], "m", combination_type="svd")
    with pytest.raises(ValueError, match="one weight per adapter"):
        add_weighted_adapter(model, ["default", "b"], [1], "m")
    with pytest.raises(ValueError, match="already holds an adapter named 'b'"):
        add_weighted_adapter(model, ["default"], [1], "b")
    with pytest.raises(ValueError, match="init='pissa'.*holds an adapter"):
        inject_lora(model, ["q"], name="p", init="pissa")
    with pytest.raises(ValueError, match="holds no adapter named 'zzz'"):
        save_adapter(model, tmp_path / "x.safetensors", name="zzz")
    assert unchanged()
    merge_lora(model)
    with pytest.raises(ValueError, match="q: is merged"):
        inject_lora(model, ["q"], name="c")
    with pytest.raises(ValueError, match="'default' is merged"):
        delete_adapter(model, "default")
    unmerge_lora(model)
    assert unchanged(atol=1e-6)  # a merge and unmerge round in fp32
    # DoRA adapters do not add: combining them is refused
    inject_lora(model, ["v"], rank=2, name="d", use_dora=True)
    with pytest.raises(ValueError, match="v: a DoRA adapter"):
        add_weighted_adapter(model, ["b", "d"], [1, 1], "m")
    # attention holds one adapter
    mha = nn.Sequential(nn.MultiheadAttention(8, 2))
    inject_lora(mha, ["0"])
    with pytest.raises(ValueError, match="holds one adapter"):
        inject_lora(mha, ["0"], name="second")


def test_the_active_adapter_added_to_a_layer_that_held_another_runs_there():
    _, model = _two_adapters()
    x = _x()
    with torch.no_grad():
        before = model(x)
    inject_lora(model, ["fc"], rank=2, alpha=2)  # "default", the active adapter, on fc, which held "b" only
    fc = dict(lora_modules(model))["fc"]
    assert fc.active and fc.adapter_name == "default" and list(fc.others) == ["b"] and fc.lora.A.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, **TOL)  # B = 0: nothing changes yet
        fc.lora.B.normal_()
        assert (model(x) - before).abs().max() > 1e-3
    set_adapter(model, "b")
    assert fc.adapter_name == "b" and fc.active


def test_switches_and_merges_that_cannot_be_done_change_nothing(tmp_path):
    _, model = _two_adapters()
    for bad in ("v1.0", "train", "", "to"):
        with pytest.raises(ValueError, match="adapter name"):
            inject_lora(model, ["q", "fc"], name=bad)
    assert adapter_names(model) == ["b", "default"] and isinstance(model.fc.base, nn.Linear)
    mark_only_lora_trainable(model)
    merge_lora(model)
    with torch.no_grad():
        dict(lora_modules(model))["fc"].lora.B[0, 0] = float("nan")  # "b" diverged on fc
    with torch.no_grad():
        before = model(_x())
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for call in (lambda: merge_lora(model, "b"), lambda: unload_lora(model, name="b")):
        with pytest.raises(ValueError, match="fc: the LoRA update B @ A has NaN"):
            call()
        assert active_adapter(model) == "default" and all(w.merged for _, w in lora_modules(model) if w.active)
        assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
        with torch.no_grad():
            assert torch.equal(model(_x()), before)


def test_a_combination_follows_the_model_mode():
    _, model = _two_adapters()
    for _, wrapper in lora_modules(model):
        for name in wrapper_names(wrapper):
            adapter_layer(wrapper, name).dropout = nn.Dropout(0.3)
    model.eval()
    add_weighted_adapter(model, ["default", "b"], [1, 1], "mix")
    set_adapter(model, "mix")
    assert all(not w.lora.training for _, w in lora_modules(model) if w.active)
    with torch.no_grad():
        assert torch.equal(model(_x()), model(_x()))


def test_each_adapter_saves_only_its_own_layers_biases_and_heads_are_not_shared(tmp_path):
    torch.manual_seed(0)
    base = Mixed().eval()
    model = copy.deepcopy(base)
    inject_lora(model, ["q"], name="a")
    inject_lora(model, ["v"], name="b")
    set_adapter(model, "b")
    mark_only_lora_trainable(model, bias="lora_only")
    with torch.no_grad():
        model.v.base.bias.add_(1.0)
        model.v.lora.B.normal_()
        out = model(_x())
    save_adapter(model, tmp_path / "b.safetensors")
    export_peft_adapter(model, tmp_path / "peft", name="b")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "b.safetensors")  # v's trained bias, not q's
    with torch.no_grad():
        torch.testing.assert_close(fresh(_x()), out, **TOL)
    twin = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft" / "b", adapter_name="b").eval()
    with torch.no_grad():
        torch.testing.assert_close(twin(_x()), out, **TOL)
    fresh = copy.deepcopy(base)
    import_peft_adapter(fresh, tmp_path / "peft" / "b", name="b")  # a directory of one adapter, by name
    assert adapter_names(fresh) == ["b"]
    with torch.no_grad():
        torch.testing.assert_close(fresh(_x()), out, **TOL)
    # a head saved with an adapter would overwrite the one the model's other adapters run with
    save_adapter(model, tmp_path / "head.safetensors", extra=["fc"])
    with pytest.raises(ValueError, match="one copy of such a module"):
        load_adapter(model, tmp_path / "head.safetensors", name="c")


def test_no_adapter_runs_over_a_pissa_residual():
    torch.manual_seed(0)
    model = Mixed()
    inject_lora(model, ["q"], rank=2, init="pissa")
    with pytest.raises(ValueError, match="started by PiSSA / OLoRA"):
        inject_lora(model, ["v"], name="b")
    other = Mixed()
    inject_lora(other, ["q"], rank=2)
    with pytest.raises(ValueError, match="holds other adapters \\['default'\\]"):
        inject_lora(other, ["v"], rank=2, name="p", init="olora")

"""How adapters start (PiSSA, OLoRA, gaussian) against PEFT's initialisation on the same weights, and
the conversion that lets a PiSSA / OLoRA adapter load into the original base."""

import copy

import pytest
import torch
from conftest import tiny_hf_gpt2
from torch import nn

from lora_lab import export_peft_adapter, inject_lora, load_adapter, mark_only_lora_trainable, save_adapter
from lora_lab.lora import lora_modules

peft = pytest.importorskip("peft")


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.act = nn.GELU()
        self.down = nn.Linear(16, 6)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(1))


def _steps(model, steps: int = 5) -> None:
    """A few AdamW steps on a loss that moves every adapter tensor."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        loss = model(X).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _peft_layer(model, name):
    return model.base_model.model.get_submodule(name)


@pytest.mark.parametrize(("use_rslora", "use_dora"), [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_principal_inits_equal_peft_and_keep_the_output(init, use_rslora, use_dora):
    torch.manual_seed(0)
    base = MLP()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["up", "down"], rank=4, alpha=8, use_rslora=use_rslora, init=init, use_dora=use_dora)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights=init, use_rslora=use_rslora,
        use_dora=use_dora,
    )  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    for name, wrapper in lora_modules(ours):
        layer = _peft_layer(theirs, name)
        torch.testing.assert_close(wrapper.lora.A, layer.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(wrapper.lora.B, layer.lora_B["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(wrapper.base.weight, layer.base_layer.weight, atol=1e-6, rtol=1e-5)
        assert (wrapper.base.weight - base.get_submodule(name).weight).abs().max() > 1e-2  # the residual
        if use_dora:
            torch.testing.assert_close(wrapper.lora.magnitude, layer.lora_magnitude_vector["default"].weight)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), base(X), atol=1e-5, rtol=1e-5)  # starts as the base did


def test_pissa_on_transformers_conv1d_equals_peft():
    """GPT-2 stores its linears (in, out): the SVD is of the (out, in) weight, as PEFT's fan_in_fan_out."""
    base = tiny_hf_gpt2()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["c_attn"], rank=4, alpha=8, init="pissa")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights="pissa", fan_in_fan_out=True
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    for name, wrapper in lora_modules(ours):
        layer = _peft_layer(theirs, name)
        torch.testing.assert_close(wrapper.lora.A, layer.lora_A["default"].weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(wrapper.base.weight, layer.base_layer.weight, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(("init", "use_dora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_a_trained_principal_adapter_loads_into_the_original_base(init, use_dora, tmp_path):
    """Trained over the residual, saved converted (rank 2r, the scaling kept): a fresh original base
    with the file gives the trained model's outputs, in lora_lab and in PEFT. With DoRA too: its
    magnitudes see W_res + scaling B A = W + scaling (B A - B0 A0), the same weight either way."""
    torch.manual_seed(0)
    base = MLP()
    model = copy.deepcopy(base)
    inject_lora(model, ["up", "down"], rank=4, alpha=8, dropout=0.1, init=init, use_dora=use_dora)
    mark_only_lora_trainable(model)
    _steps(model)
    model.eval()
    with torch.no_grad():
        trained = model(X)
        assert (trained - base(X)).abs().max() > 1e-3
    save_adapter(model, tmp_path / "a.safetensors")
    fresh = copy.deepcopy(base)
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert [w.lora.rank for _, w in lora_modules(fresh)] == [8, 8]
    export_peft_adapter(model, tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(X), trained, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(theirs(X), trained, atol=1e-4, rtol=1e-4)


def test_gaussian_init_starts_at_the_base_with_a_spread_of_one_over_rank():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256))
    inject_lora(model, ["0"], rank=8, init="gaussian")
    lora = model[0].lora
    assert torch.count_nonzero(lora.B) == 0
    assert abs(lora.A.std().item() - 1 / 8) < 0.01  # PEFT's "gaussian": A ~ N(0, 1/r)


@pytest.mark.parametrize(
    ("make", "kwargs", "message"),
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 4, 3)), {"init": "pissa"}, r"pissa starts linears .*0 \(Conv2d\)"),
        (MLP, {"init": "pissa", "rank": 8}, r"rank is above the width of \['down'\]"),
        (MLP, {"init": "lora-ga"}, "unknown init 'lora-ga'"),
    ],
)
def test_inits_that_cannot_hold_are_refused(make, kwargs, message):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    targets = ["0"] if isinstance(model, nn.Sequential) else ["up", "down"]
    with pytest.raises(ValueError, match=message):
        inject_lora(model, targets, **{"rank": 2, **kwargs})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not list(lora_modules(model))


def test_lora_plus_groups_b_as_peft_and_is_recorded(tmp_path):
    """LoRA+: B (and LoRA's vectors) at ratio x lr, A and the rest at lr, as PEFT's
    create_loraplus_optimizer groups the LoRA tensors; the ratio is part of the run's config."""
    from peft.optimizers import create_loraplus_optimizer

    from lora_lab import TrainConfig
    from lora_lab.loop import param_groups

    torch.manual_seed(0)
    base = MLP()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["up", "down"], rank=2, use_dora=True)
    mark_only_lora_trainable(ours)
    mine = {id(p): g["lr"] for g in param_groups(ours, 1e-3, 16.0) for p in g["params"]}
    names = {id(p): n for n, p in ours.named_parameters()}
    assert {names[i]: lr for i, lr in mine.items()} == {
        f"{layer}.lora.{t}": 1e-3 * (1 if t == "A" else 16) for layer in ("up", "down") for t in ("A", "B", "magnitude")
    }
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["up", "down"], use_dora=True)
    )
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    peft_lr = {
        n: g["lr"] for g in opt.param_groups for p in g["params"] for n, q in theirs.named_parameters() if q is p
    }
    short = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "magnitude"}
    as_ours = {}
    for name, lr in peft_lr.items():
        layer = name.split(".")[2]
        kind = next(v for k, v in short.items() if f".{k}." in name)
        as_ours[f"{layer}.lora.{kind}"] = lr
    assert as_ours == {names[i]: lr for i, lr in mine.items()}
    assert [g["lr"] for g in param_groups(ours, 1e-3)] == [1e-3]  # ratio 1: one group
    with pytest.raises(ValueError, match="--lr-ratio 0"):
        TrainConfig(lr_ratio=0)


def test_principal_starts_refuse_shared_weights_and_adapters_loaded_over_them(tmp_path):
    """PiSSA rewrites the base weight: a weight tied to another module would change that one too
    (refused); and an adapter loaded into a PiSSA-started layer would run over the residual, not W
    (refused), while a plain file loads into a plain wrapper as before."""
    torch.manual_seed(0)
    tied = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match=r"pissa starts linears .*0 \(weight shared, tied\)"):
        inject_lora(tied, ["0"], rank=2, init="pissa")
    plain = MLP()
    inject_lora(plain, ["up", "down"], rank=4)
    save_adapter(plain, tmp_path / "plain.safetensors")
    started = MLP()
    inject_lora(started, ["up", "down"], rank=4, init="pissa")
    with pytest.raises(ValueError, match="up: was started by PiSSA / OLoRA, so its base holds the residual"):
        load_adapter(started, tmp_path / "plain.safetensors")


def test_gaussian_leaves_embeddings_as_peft_and_reaches_both_attention_branches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(30, 16))
    reference = copy.deepcopy(model)
    inject_lora(model, ["0"], rank=4, init="gaussian", use_dora=True)
    ids = torch.arange(30)
    torch.testing.assert_close(model(ids), reference(ids), atol=0, rtol=0)  # A = 0: starts as the base
    attention = nn.Sequential(nn.MultiheadAttention(64, 4))
    inject_lora(attention, ["0"], rank=8, init="gaussian")
    for branch in (attention[0].lora, attention[0].out_lora):
        assert abs(branch.A.std().item() - 1 / 8) < 0.02


def test_a_sweep_refuses_an_impossible_start_before_any_point_trains(tiny_bert_dir):
    from lora_lab.sweep import check_targets, grid

    points = grid([str(tiny_bert_dir)], [1], target_sets=["word_embeddings+query"], inits=["kaiming", "pissa"])
    with pytest.raises(ValueError, match=r"word_embeddings,query on .*pissa starts linears .*word_embeddings"):
        check_targets(points)


def test_a_pissa_adapter_peft_trained_and_converted_loads_here(tmp_path):
    """PEFT's own PiSSA run, saved converted (`path_initial_model_for_weight_conversion`), imports
    into a fresh original base with PEFT's trained outputs."""
    torch.manual_seed(0)
    base = MLP()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], init_lora_weights="pissa")
    theirs = peft.get_peft_model(copy.deepcopy(base), config)
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: save the initial adapter as plain
    theirs.save_pretrained(tmp_path / "init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    _steps(theirs)
    theirs.save_pretrained(tmp_path / "trained", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    from lora_lab import import_peft_adapter

    ours = copy.deepcopy(base)
    import_peft_adapter(ours, tmp_path / "trained")
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X), atol=1e-5, rtol=1e-5)


def test_a_peft_save_of_several_adapters_imports_the_one_named(tmp_path):
    """PEFT saves "default" at the top and other adapters in subdirectories: each imports by name
    into a fresh base with PEFT's outputs when that adapter is active."""
    from lora_lab import import_peft_adapter

    torch.manual_seed(0)
    base = MLP()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=["up"], init_lora_weights=False)
    )
    theirs.add_adapter(
        "other", peft.LoraConfig(r=4, lora_alpha=4, target_modules=["up", "down"], init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path)
    for name in ("default", "other"):
        theirs.set_adapter(name)
        ours = copy.deepcopy(base)
        import_peft_adapter(ours, tmp_path, name=name)
        with torch.no_grad():
            torch.testing.assert_close(ours(X), theirs(X), atol=1e-6, rtol=1e-6, msg=name)
    with pytest.raises(FileNotFoundError, match=r"holds no adapter 'third'; it holds \['other'\]"):
        import_peft_adapter(copy.deepcopy(base), tmp_path, name="third")

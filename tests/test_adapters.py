import copy
import json
import warnings

import pytest
import torch
from conftest import randomize_lora, tiny_gpt, tiny_hf_gpt2, tiny_llama, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lora_lab import (
    count_parameters,
    export_peft_adapter,
    import_peft_adapter,
    inject_lora,
    load_adapter,
    lora_state_dict,
    mark_only_lora_trainable,
    merge_lora,
    save_adapter,
    unmerge_lora,
)
from lora_lab.lora import lora_modules

peft = pytest.importorskip("peft")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _grads_after_loss(model, tokens):
    out = _logits(model(tokens))
    out.float().pow(2).mean().backward()
    return out.detach()


def _our_grads(model):
    return {f"{n}.{ab}": getattr(w.lora, ab).grad for n, w in lora_modules(model) for ab in "AB"}


def _peft_grads(peft_model):
    grads = {}
    for name, p in peft_model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            module = name.removeprefix("base_model.model.").split(".lora_")[0]
            grads[f"{module}.{'A' if '.lora_A.' in name else 'B'}"] = p.grad
    return grads


def _assert_same(ours, theirs, tokens):
    """Same outputs (max abs diff <= 1e-5) and the same gradients for every A and B."""
    torch.testing.assert_close(_grads_after_loss(ours, tokens), _grads_after_loss(theirs, tokens), atol=1e-5, rtol=0)
    g_ours, g_theirs = _our_grads(ours), _peft_grads(theirs)
    assert g_ours.keys() == g_theirs.keys() and g_ours
    for key in g_ours:
        torch.testing.assert_close(g_ours[key], g_theirs[key], atol=1e-5, rtol=1e-4, msg=key)
    assert count_parameters(ours).trainable == theirs.get_nb_trainable_parameters()[0]


CASES = {
    # model factory, lora_lab targets, PEFT target_modules, tokens' vocabulary
    "mlp": (tiny_model, "all-linear", ["W_query", "W_key", "W_value", "out_proj", "ff.0", "ff.2"], 50),
    "gpt2-conv1d": (tiny_hf_gpt2, ["c_attn", "c_proj", "c_fc"], ["c_attn", "c_proj", "c_fc"], 97),
    "book-gpt": (tiny_gpt, "all-linear", ["W_query", "W_key", "W_value", "out_proj", "layers.0", "layers.2"], 50),
}
# Per case: a rank_pattern key, an alpha_pattern key for lora_lab, then the same for PEFT.
PATTERN_KEYS = {
    "mlp": ("0.ff.0", "W_value", "blocks.1.att.W_key", "out_proj"),
    "gpt2-conv1d": ("h.0.attn.c_attn", "mlp.c_proj", "h.1.mlp.c_fc", "attn.c_proj"),
    "book-gpt": ("trf_blocks.0.ff.layers.0", "W_key", "trf_blocks.1.att.W_query", "layers.2"),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_ours_to_peft_same_outputs_and_gradients(case, use_rslora, tmp_path):
    make, ours_targets, _, vocab = CASES[case]
    tokens = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    ours, base = make(), make()
    inject_lora(
        ours,
        ours_targets,
        rank=4,
        alpha=8,
        use_rslora=use_rslora,
        rank_pattern={PATTERN_KEYS[case][0]: 2},
        alpha_pattern={PATTERN_KEYS[case][1]: 3},
    )
    mark_only_lora_trainable(ours)
    randomize_lora(ours)
    export_peft_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is (case == "gpt2-conv1d") and config["use_rslora"] is use_rslora
    theirs = peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    _assert_same(ours, theirs, tokens)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_to_ours_same_outputs_and_gradients(case, use_rslora, tmp_path):
    make, _, peft_targets, vocab = CASES[case]
    tokens = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=peft_targets,
        use_rslora=use_rslora,
        fan_in_fan_out=case == "gpt2-conv1d",
        rank_pattern={PATTERN_KEYS[case][2]: 6},
        alpha_pattern={PATTERN_KEYS[case][3]: 2},
    )
    theirs = peft.get_peft_model(make(), config)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in theirs.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path)
    ours = make()
    names = import_peft_adapter(ours, tmp_path)
    mark_only_lora_trainable(ours)
    ranks = {n: w.lora.rank for n, w in lora_modules(ours)}
    assert set(names) == set(ranks) and sorted(set(ranks.values())) == [4, 6]
    _assert_same(ours, theirs, tokens)


def test_peft_round_trip_with_a_trained_head(tmp_path, tokens):
    """A classifier: new head trained in full (PEFT's modules_to_save), LoRA elsewhere."""
    ours = tiny_model()
    ours.out_head = nn.Linear(16, 2)
    base = copy.deepcopy(ours)
    with torch.no_grad():
        ours.out_head.weight.normal_()
    inject_lora(ours, "all-linear", rank=2, alpha=4)
    mark_only_lora_trainable(ours, train=["out_head"])
    randomize_lora(ours)
    export_peft_adapter(ours, tmp_path, extra=["out_head"])
    assert json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"] == ["out_head"]
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(theirs(tokens), ours(tokens), atol=1e-5, rtol=0)
    # and back: the head comes along into a fresh model
    again = copy.deepcopy(base)
    import_peft_adapter(again, tmp_path)
    torch.testing.assert_close(again(tokens), ours(tokens), atol=1e-6, rtol=0)


def test_save_load_round_trip_in_a_fresh_model(tmp_path, tokens):
    trained = tiny_model()
    trained.out_head = nn.Linear(16, 3)
    fresh = copy.deepcopy(trained)
    inject_lora(
        trained,
        ["W_query", "W_value", "ff.0"],
        rank=4,
        alpha=8,
        use_rslora=True,
        rank_pattern={"ff.0": 2},
        dropout=0.1,
    )
    randomize_lora(trained)
    with torch.no_grad():
        trained.out_head.bias.fill_(0.5)
    trained.eval()
    path = save_adapter(trained, tmp_path / "run" / "adapter.safetensors", extra=["out_head"])
    assert sorted(p.name for p in path.parent.iterdir()) == ["adapter.safetensors"]  # no temp left
    stored = load_file(path)
    assert set(stored) == set(lora_state_dict(trained)) | {"out_head.weight", "out_head.bias"}

    names = load_adapter(fresh, path)
    fresh.eval()
    assert names == [n for n, _ in lora_modules(trained)]
    torch.testing.assert_close(fresh(tokens), trained(tokens), atol=0, rtol=0)
    loaded = dict(lora_modules(fresh))
    assert loaded["blocks.0.ff.0"].lora.rank == 2 and loaded["blocks.0.att.W_query"].lora.use_rslora
    assert loaded["blocks.0.ff.0"].lora.dropout.p == 0.1

    # a model the user already wrapped the same way loads too; a directory path works
    again = tiny_model()
    again.out_head = nn.Linear(16, 3)
    inject_lora(again, ["W_query", "W_value", "ff.0"], rank=4, alpha=8, use_rslora=True, rank_pattern={"ff.0": 2})
    load_adapter(again, path.parent)
    torch.testing.assert_close(again.eval()(tokens), trained(tokens), atol=0, rtol=0)


def test_save_overwrites_atomically(tmp_path):
    model = tiny_model()
    inject_lora(model, ["W_query"], rank=2)
    path = save_adapter(model, tmp_path / "a.safetensors")
    randomize_lora(model)
    save_adapter(model, path)
    torch.testing.assert_close(
        load_file(path)["blocks.0.att.W_query.lora.B"], model.blocks[0].att.W_query.lora.B.detach()
    )
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]
    # the same permissions as every other file written (safetensors alone makes its own 0600)
    (tmp_path / "plain.txt").write_text("x")
    assert path.stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_load_errors(tmp_path):
    model = tiny_model()
    inject_lora(model, ["W_query", "ff.0"], rank=4)
    path = save_adapter(model, tmp_path / "a.safetensors")

    with pytest.raises(FileNotFoundError, match="missing.safetensors not found; save one with save_adapter"):
        load_adapter(tiny_model(), tmp_path / "missing.safetensors")

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(
        ValueError, match="not a readable safetensors file .corrupt or truncated.*save one with save_adapter"
    ):
        load_adapter(tiny_model(), corrupt)

    wider = tiny_model(d=24)  # another model size
    before = wider.state_dict()
    with pytest.raises(
        ValueError,
        match=r"does not fit this TinyModel(.|\n)*blocks.0.att.W_query: the "
        r"adapter's lora.A is \(4, 16\).*needs \(4, 24\)",
    ):
        load_adapter(wider, path)
    assert wider.state_dict().keys() == before.keys()  # nothing wrapped on failure

    other = tiny_model()
    inject_lora(other, ["W_query"], rank=8)
    inject_lora(other, ["W_key"], rank=4)
    with pytest.raises(ValueError) as err:
        load_adapter(other, path)
    text = str(err.value)
    assert "blocks.0.att.W_query: wrapped with rank=8" in text
    assert "blocks.1.att.W_key: LoRA-wrapped in the model, but the adapter has no weights" in text

    with pytest.raises(ValueError, match="has no LoRA layers to save: call inject_lora"):
        save_adapter(tiny_model(), tmp_path / "b.safetensors")
    with pytest.raises(ValueError, match="extra='head' matches no module"):
        save_adapter(model, tmp_path / "b.safetensors", extra=["head"])


def test_peft_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        import_peft_adapter(tiny_model(), tmp_path)
    model = tiny_model()
    inject_lora(model, ["W_query"], rank=4)
    export_peft_adapter(model, tmp_path)
    with pytest.raises(ValueError, match="looks like a PEFT adapter: use import_peft_adapter"):
        load_adapter(tiny_model(), tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(
        ValueError, match=r"W_query: the adapter's lora.magnitude is missing, the model's Linear needs \(16,\)"
    ):
        import_peft_adapter(tiny_model(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ValueError, match="lora_A has rank 4, the config says 8"):
        import_peft_adapter(tiny_model(), tmp_path)


def _peft_llama_adapter(path, seed: int = 3, tie: bool = False, **config):
    """A PEFT adapter on a tiny Llama with non-zero B (and trained modules_to_save), saved to `path`."""
    base = tiny_llama(tie=tie)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{"r": 4, "lora_alpha": 8, **config}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if ".lora_B." in name or ".modules_to_save." in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(path)
    return base, peft.PeftModel.from_pretrained(copy.deepcopy(base), path).eval()


LLAMA_TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


def test_import_into_an_eval_model_with_dropout_matches_peft(tmp_path):
    base, theirs = _peft_llama_adapter(tmp_path, target_modules=["q_proj", "v_proj"], lora_dropout=0.05)
    ours = copy.deepcopy(base)  # in eval mode, as from_pretrained returns it
    import_peft_adapter(ours, tmp_path)
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(ours(LLAMA_TOKENS).logits, theirs(LLAMA_TOKENS).logits, atol=1e-5, rtol=0)
    # our own format too: load_adapter into a fresh eval model
    save_adapter(ours, tmp_path / "ours.safetensors")
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "ours.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(again(LLAMA_TOKENS).logits, theirs(LLAMA_TOKENS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "setting",
    [
        {"init_lora_weights": "pissa"},
        {"init_lora_weights": "olora"},
        {"alora_invocation_tokens": [5, 6]},
        {"target_parameters": ["experts.weight"]},
        {"layer_replication": [[0, 2], [1, 2]]},
        {"a_future_setting": 3},
    ],
)
def test_peft_settings_that_change_the_math_are_refused(setting, tmp_path):
    known = {k: v for k, v in setting.items() if k != "a_future_setting"}
    _peft_llama_adapter(tmp_path, target_modules=["q_proj", "v_proj"], **known)
    if not known:
        config = json.loads((tmp_path / "adapter_config.json").read_text())
        (tmp_path / "adapter_config.json").write_text(json.dumps({**config, **setting}))
    model = tiny_llama()
    before = model.state_dict()
    key = next(iter(setting))
    with pytest.raises(ValueError, match=rf"imports LoRA adapters.*sets \{{'{key}'"):
        import_peft_adapter(model, tmp_path)
    assert model.state_dict().keys() == before.keys()


def test_peft_plain_inits_import(tmp_path):
    base, theirs = _peft_llama_adapter(tmp_path, target_modules="all-linear", init_lora_weights="gaussian")
    ours = copy.deepcopy(base)
    import_peft_adapter(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(LLAMA_TOKENS).logits, theirs(LLAMA_TOKENS).logits, atol=1e-5, rtol=0)


def test_saved_head_of_a_tied_model_leaves_the_embedding_alone(tmp_path):
    """PEFT keeps its own copy of a modules_to_save head; the tied input embedding stays the base's."""
    base, theirs = _peft_llama_adapter(
        tmp_path, tie=True, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]
    )
    ours = copy.deepcopy(base)
    import_peft_adapter(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(LLAMA_TOKENS).logits, theirs(LLAMA_TOKENS).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.model.embed_tokens.weight, base.model.embed_tokens.weight, atol=0, rtol=0)


def test_trained_tied_head_round_trips_both_names(tmp_path, tokens):
    """A tied head trained as one matrix with the embedding: saved under both names, so the
    loaded model (ours, and PEFT's with its own copies) computes what was trained."""
    trained = tiny_model(tie=True)
    base = copy.deepcopy(trained)
    inject_lora(trained, ["W_query"], rank=2)
    mark_only_lora_trainable(trained, train=["out_head"])
    randomize_lora(trained)
    with torch.no_grad():
        trained.out_head.weight.add_(0.5)  # the embedding moves with it
    path = save_adapter(trained, tmp_path / "a.safetensors", extra=["out_head"])
    assert {"out_head.weight", "tok_emb.weight"} <= set(load_file(path))
    fresh = copy.deepcopy(base)
    load_adapter(fresh, path)
    torch.testing.assert_close(fresh(tokens), trained(tokens), atol=0, rtol=0)
    export_peft_adapter(trained, tmp_path / "peft", extra=["out_head"])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(theirs(tokens), trained(tokens), atol=1e-6, rtol=0)


def test_loading_into_a_merged_model_replaces_the_merged_update(tmp_path, tokens):
    first, second = tiny_model(), tiny_model()
    base_state = copy.deepcopy(first.state_dict())
    for model, seed in ((first, 1), (second, 2)):
        inject_lora(model, "all-linear", rank=4, alpha=8)
        randomize_lora(model, seed)
    path = save_adapter(second, tmp_path / "second.safetensors")
    merge_lora(first)
    load_adapter(first, path)
    assert all(w.merged for _, w in lora_modules(first))  # still merged, now with the new update
    torch.testing.assert_close(first(tokens), second(tokens), atol=1e-5, rtol=1e-5)
    unmerge_lora(first)
    for name, w in lora_modules(first):
        torch.testing.assert_close(w.base.weight, base_state[name + ".weight"], atol=1e-6, rtol=0)
    torch.testing.assert_close(first(tokens), second(tokens), atol=1e-5, rtol=1e-5)


def test_extra_holding_wrapped_layers_is_refused(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2
    )
    model = RobertaForSequenceClassification(cfg)
    inject_lora(model, ["query", "classifier.dense"], rank=2)
    with pytest.raises(ValueError, match=r"extra='classifier' names classifier, which holds LoRA-wrapped layers"):
        save_adapter(model, tmp_path / "a.safetensors", extra=["classifier"])
    with pytest.raises(ValueError, match="either adapted by LoRA or saved whole"):
        export_peft_adapter(model, tmp_path / "peft", extra=["classifier"])
    path = save_adapter(model, tmp_path / "a.safetensors", extra=["classifier.out_proj"])
    assert {k for k in load_file(path) if ".lora." not in k} == {
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    }


WRAPS = {
    "compile": torch.compile,
    "data-parallel": nn.DataParallel,
    "compiled-data-parallel": lambda m: torch.compile(nn.DataParallel(m)),  # how DDP models are compiled
}


@pytest.mark.parametrize("wrap", sorted(WRAPS))
def test_wrapper_prefixes_stay_out_of_adapters(wrap, tmp_path, tokens):
    trained = tiny_model()
    trained.out_head = nn.Linear(16, 3)
    fresh = copy.deepcopy(trained)
    inject_lora(trained, ["W_query", "ff.2"], rank=2)
    randomize_lora(trained)
    wrapped = WRAPS[wrap](trained)
    path = save_adapter(wrapped, tmp_path / "a.safetensors", extra=["out_head"])
    export_peft_adapter(wrapped, tmp_path / "peft", extra=["out_head"])
    keys = set(load_file(path)) | set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    assert not any("_orig_mod" in k or k.startswith("module.") for k in keys), keys
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["modules_to_save"] == ["out_head"]
    plain = copy.deepcopy(fresh)
    load_adapter(plain, path)
    torch.testing.assert_close(plain(tokens), trained(tokens), atol=0, rtol=0)
    # and into a wrapped fresh model, both formats
    for load, source in ((load_adapter, path), (import_peft_adapter, tmp_path / "peft")):
        model = copy.deepcopy(fresh)
        target = WRAPS[wrap](model)
        load(target, source)
        torch.testing.assert_close(model(tokens), trained(tokens), atol=0, rtol=0)


def test_adapter_paths_and_format_version(tmp_path):
    model = tiny_model()
    inject_lora(model, ["W_query"], rank=2)
    assert save_adapter(model, f"{tmp_path}/newdir/") == tmp_path / "newdir" / "adapter.safetensors"
    assert save_adapter(model, tmp_path / "run" / "adapter") == tmp_path / "run" / "adapter" / "adapter.safetensors"
    assert save_adapter(model, tmp_path / "x.safetensors") == tmp_path / "x.safetensors"
    assert (tmp_path / "x.safetensors").is_file()
    load_adapter(tiny_model(), tmp_path / "newdir")  # the directory finds its file

    tensors = load_file(tmp_path / "x.safetensors")
    with safe_open(tmp_path / "x.safetensors", framework="pt") as f:
        metadata = f.metadata()
    info = json.loads(metadata["lora_lab"])
    save_file(
        tensors, tmp_path / "future.safetensors", metadata={**metadata, "lora_lab": json.dumps({**info, "version": 99})}
    )
    with pytest.raises(ValueError, match="adapter format 99; this lora_lab reads format 2 and older: upgrade"):
        load_adapter(tiny_model(), tmp_path / "future.safetensors")


def test_adapter_for_multihead_attention_out_proj_is_refused(tmp_path):
    """Loading must not wrap what injection refuses: nn.MultiheadAttention never calls out_proj."""
    from safetensors.torch import save_file

    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["out_proj"]}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    tensors = {
        "base_model.model.self_attn.out_proj.lora_A.weight": torch.ones(2, 8),
        "base_model.model.self_attn.out_proj.lora_B.weight": torch.ones(8, 2),
    }
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"cannot adapt \[.self_attn.out_proj.\] alone.*never run"):
        import_peft_adapter(layer, tmp_path)
    assert not list(lora_modules(layer))


class _Nested(nn.Module):
    """`proj` and `block.proj`: a name that is the dotted suffix of another."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.block = nn.Module()
        self.block.proj = nn.Linear(8, 8)
        self.out = nn.Linear(8, 4)

    def forward(self, x):
        return self.out(self.block.proj(self.proj(x)))


def test_export_patterns_match_only_their_module(tmp_path):
    """PEFT reads pattern keys and target names as suffixes: 'proj' would also take 'block.proj'."""
    torch.manual_seed(0)
    base = _Nested()
    ours = copy.deepcopy(base)
    chosen = lambda name, _: name in ("proj", "out")  # noqa: E731  (block.proj stays plain)
    inject_lora(ours, chosen, rank=2, alpha=4, alpha_pattern={"proj": 32})
    assert sorted(n for n, _ in lora_modules(ours)) == ["out", "proj"]
    randomize_lora(ours)
    export_peft_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=0)
    assert not isinstance(theirs.base_model.model.block.proj, peft.tuners.lora.LoraLayer)
    again = copy.deepcopy(base)
    import_peft_adapter(again, tmp_path)
    torch.testing.assert_close(again(x), ours(x), atol=0, rtol=0)


def test_tied_extra_that_is_the_base_of_a_wrapped_head_is_refused(tmp_path):
    model = tiny_llama(tie=True)
    inject_lora(model, ["q_proj", "lm_head"], rank=2)
    with pytest.raises(ValueError, match=r"tied to lm_head.base.weight, the frozen base of the LoRA-wrapped lm_head"):
        save_adapter(model, tmp_path / "a.safetensors", extra=["embed_tokens"])


def test_peft_adapter_targeting_the_head_imports(tmp_path):
    """PEFT also saves the head's base weight when LoRA targets lm_head (save_embedding_layers)."""
    base, theirs = _peft_llama_adapter(tmp_path, target_modules=["q_proj", "lm_head"])
    assert any(".base_layer." in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    ours = copy.deepcopy(base)
    import_peft_adapter(ours, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(LLAMA_TOKENS).logits, theirs(LLAMA_TOKENS).logits, atol=1e-5, rtol=0)
    import_peft_adapter(ours, tmp_path)  # again, into the model that is wrapped now
    with torch.no_grad():
        torch.testing.assert_close(ours(LLAMA_TOKENS).logits, theirs(LLAMA_TOKENS).logits, atol=1e-5, rtol=0)
    other = tiny_llama(seed=9)  # another base: its head is not the one the adapter carries
    with pytest.raises(ValueError, match="carries its own base weight lm_head.base_layer.weight"):
        import_peft_adapter(other, tmp_path)


def test_saving_warns_when_trained_parameters_would_be_left_out(tmp_path):
    model = tiny_model()
    model.out_head = nn.Linear(16, 3)  # a new head that trains
    inject_lora(model, ["W_query"], rank=2)
    mark_only_lora_trainable(model, train=["out_head"])
    with pytest.warns(UserWarning, match=r"save_adapter leaves out the trainable parameters of 1 module.*out_head"):
        save_adapter(model, tmp_path / "a.safetensors")
    with pytest.warns(UserWarning, match=r"export_peft_adapter leaves out .*out_head"):
        export_peft_adapter(model, tmp_path / "peft")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_adapter(model, tmp_path / "a.safetensors", extra=["out_head"])
        export_peft_adapter(model, tmp_path / "peft", extra=["out_head"])


def _flat_lora_grads(model, tokens, autocast: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, every A and B gradient in one vector, in PEFT's and our common module order)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _grads_after_loss(model, tokens).float()
    grads = _our_grads(model) if not hasattr(model, "peft_config") else _peft_grads(model)
    assert all(g.dtype == torch.float32 for g in grads.values())
    return out, torch.cat([grads[k].flatten() for k in sorted(grads)])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fused_llama_matches_peft_in_training(checkpointing, tmp_path):
    """The fused LoRA linear (our default) against PEFT on a Llama with grouped-query attention, in
    train mode, with and without gradient checkpointing (the forward runs again in backward): in
    fp32 the same logits and gradients to 1e-5; under bf16 autocast, where both round, ours no
    farther from the fp32 gradients than PEFT's (it rounds once where PEFT rounds three times)."""
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    ours, base = tiny_llama(), tiny_llama()
    inject_lora(ours, "all-linear", rank=4, alpha=8)
    mark_only_lora_trainable(ours)
    randomize_lora(ours)
    export_peft_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
    for model in (ours, theirs):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert ours.model.layers[0].self_attn.q_proj._fusable(torch.zeros(1, 32))
    out, grads = _flat_lora_grads(ours, tokens, autocast=False)
    ref, ref_grads = _flat_lora_grads(theirs, tokens, autocast=False)
    assert grads.numel() == count_parameters(ours).trainable
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads, ref_grads, atol=1e-6, rtol=1e-4)
    low, low_grads = _flat_lora_grads(ours, tokens, autocast=True)
    peft_low, peft_low_grads = _flat_lora_grads(theirs, tokens, autocast=True)
    torch.testing.assert_close(low, peft_low, atol=5e-2, rtol=5e-2)
    ours_error = (low_grads - grads).norm() / grads.norm()
    peft_error = (peft_low_grads - grads).norm() / grads.norm()
    assert ours_error <= 1.1 * peft_error + 1e-3 and ours_error < 0.05, (ours_error, peft_error)

import copy

import pytest
import torch
from conftest import bnb, needs_bnb, randomize_lora, tiny_hf_gpt2, tiny_llama, tiny_model
from torch import nn

from lora_lab import (
    LinearWithLoRA,
    count_parameters,
    disable_lora,
    inject_lora,
    mark_only_lora_trainable,
    merge_lora,
    replace_linear_with_lora,
    unload_lora,
    unmerge_lora,
)
from lora_lab.lora import lora_modules

QKV = [
    "blocks.0.att.W_query",
    "blocks.0.att.W_key",
    "blocks.0.att.W_value",
    "blocks.1.att.W_query",
    "blocks.1.att.W_key",
    "blocks.1.att.W_value",
]


def test_suffix_and_full_name_matching():
    model = tiny_model()
    names = inject_lora(model, ["W_query", "att.W_key", "blocks.1.att.W_value", "blocks.0.att.W_value"])
    assert names == QKV  # model order, each once
    assert all(isinstance(model.get_submodule(n), LinearWithLoRA) for n in names)
    assert not isinstance(model.blocks[0].att.out_proj, LinearWithLoRA)


def test_suffix_matches_whole_components_only():
    model = tiny_model()
    # "query" is not a dotted suffix of "W_query": it must not match
    with pytest.raises(ValueError, match=r"\['query'\] match no module"):
        inject_lora(model, ["query"])


def test_all_linear_skips_the_output_head():
    model = tiny_model()
    names = inject_lora(model, "all-linear")
    assert "out_head" not in names and len(names) == 2 * 6
    hf = tiny_hf_gpt2()
    names = inject_lora(hf, "all-linear")  # head found through get_output_embeddings()
    assert "lm_head" not in names and len(names) == 2 * 4


def test_callable_targets():
    model = tiny_model()
    names = inject_lora(model, lambda name, m: isinstance(m, nn.Linear) and name.endswith("ff.2"))
    assert names == ["blocks.0.ff.2", "blocks.1.ff.2"]


def test_rank_and_alpha_patterns_longest_key_wins():
    model = tiny_model()
    inject_lora(
        model,
        "all-linear",
        rank=4,
        alpha=8,
        rank_pattern={"W_query": 2, "blocks.1.att.W_query": 6},
        alpha_pattern={"ff.0": 3},
    )
    mods = dict(lora_modules(model))
    assert mods["blocks.0.att.W_query"].lora.rank == 2
    assert mods["blocks.1.att.W_query"].lora.rank == 6
    assert mods["blocks.0.att.W_key"].lora.rank == 4
    assert mods["blocks.0.ff.0"].lora.alpha == 3 and mods["blocks.0.ff.0"].lora.scaling == 3 / 4
    assert mods["blocks.0.ff.2"].lora.scaling == 8 / 4


def test_trainable_count_is_rank_times_in_plus_out():
    model = tiny_model()
    inject_lora(model, "all-linear", rank=4)
    mark_only_lora_trainable(model)
    d, h = 16, 32
    per_block = 4 * 4 * (d + d) + 4 * (d + h) + 4 * (h + d)
    assert count_parameters(model).trainable == 2 * per_block


def _unchanged(model: nn.Module, before: dict) -> bool:
    return (
        not list(lora_modules(model))
        and model.state_dict().keys() == before.keys()
        and all(p.requires_grad for p in model.parameters())
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"targets": ["W_qeury"]},
            r"\['W_qeury'\] match no module of TinyModel \(did you mean 'W_query'\?\); the layers LoRA can wrap "
            r"are: tok_emb, blocks.N.att.W_query, blocks.N.att.W_key",
        ),
        ({"targets": ["att"]}, r"LoRA does not wrap: \['blocks.0.att \(Module\)'"),
        ({"targets": ["norm"]}, r"LoRA does not wrap: .*LayerNorm"),
        ({"targets": []}, "targets is empty"),
        ({"targets": ["W_query"], "rank": 0}, "rank must be a positive integer, got 0"),
        ({"targets": ["W_query"], "alpha": 0}, "alpha must be a positive number, got 0"),
        (
            {"targets": ["W_query"], "rank_pattern": {"W_query": -1}},
            r"rank_pattern\['W_query'\] must be a positive integer",
        ),
        (
            {"targets": ["W_query"], "rank_pattern": {"W_key": 2}},
            r"rank_pattern key\(s\) \['W_key'\] match none of the targeted",
        ),
        ({"targets": ["W_query"], "dropout": 1.5}, r"blocks.0.att.W_query: dropout must be in \[0, 1\)"),
        ({"targets": lambda n, m: False}, "select no module"),
    ],
)
def test_errors_name_the_problem_and_leave_the_model_alone(kwargs, message):
    model = tiny_model()
    before = model.state_dict()
    with pytest.raises(ValueError, match=message):
        inject_lora(model, **kwargs)
    assert _unchanged(model, before)


def test_already_wrapped():
    model = tiny_model()
    inject_lora(model, ["W_query"])
    with pytest.raises(ValueError, match=r"already hold a LoRA adapter named 'default': \['blocks.0.att.W_query'"):
        inject_lora(model, ["W_query", "W_key"])
    with pytest.raises(ValueError, match="already hold a LoRA adapter"):
        inject_lora(model, "all-linear")
    # the modules inside a wrapper are never targets themselves
    assert inject_lora(model, ["W_key"]) == ["blocks.0.att.W_key", "blocks.1.att.W_key"]


def test_mark_only_lora_trainable_with_a_new_head():
    model = tiny_model()
    model.out_head = nn.Linear(16, 2)
    inject_lora(model, "all-linear")
    mark_only_lora_trainable(model, train=["out_head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora." in n} | {"out_head.weight", "out_head.bias"}
    assert any(".lora.A" in n for n in trainable)
    with pytest.raises(ValueError, match=r"train=\['head'\] match no module"):
        mark_only_lora_trainable(model, train=["head"])


def test_replace_linear_with_lora_wraps_every_linear():
    model = tiny_model()
    names = replace_linear_with_lora(model, rank=2, alpha=4)
    assert len(names) == 2 * 6 + 1 and names[-1] == "out_head"


def test_merge_unmerge_unload_and_disable(tokens):
    model = tiny_model().eval()
    base_out = model(tokens).detach()
    base_state = copy.deepcopy(model.state_dict())
    inject_lora(model, "all-linear", rank=4, alpha=8)
    randomize_lora(model)
    lora_out = model(tokens).detach()
    assert (lora_out - base_out).abs().max() > 1e-2

    with disable_lora(model):
        torch.testing.assert_close(model(tokens), base_out, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(tokens), lora_out)

    merge_lora(model)
    assert all(w.merged for _, w in lora_modules(model))
    torch.testing.assert_close(model(tokens), lora_out, atol=1e-5, rtol=1e-5)
    with disable_lora(model):  # takes merged adapters out for the while
        torch.testing.assert_close(model(tokens), base_out, atol=1e-5, rtol=1e-5)
    assert all(w.merged for _, w in lora_modules(model))

    unmerge_lora(model)
    for name, _ in lora_modules(model):
        torch.testing.assert_close(
            model.get_submodule(name).base.weight, base_state[name + ".weight"], atol=1e-6, rtol=0
        )

    unloaded = unload_lora(model)
    assert unloaded is model and not list(lora_modules(model))
    assert set(model.state_dict()) == set(base_state)
    torch.testing.assert_close(model(tokens), lora_out, atol=1e-5, rtol=1e-5)


def test_merge_refuses_tied_weights():
    model = tiny_model(tie=True)
    inject_lora(model, ["out_head"])
    randomize_lora(model)
    with pytest.raises(ValueError, match=r"out_head: its weight is shared with .*tok_emb.weight"):
        merge_lora(model)


@needs_bnb
def test_qlora_step_changes_only_lora_parameters(tokens):
    """A tiny model whose linears are 4-bit (NF4), as in QLoRA: one AdamW step moves A and B only."""
    model = tiny_model()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            q = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=torch.float32,
                quant_type="nf4",
            )
            q.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, q.to("cpu"))
    names = inject_lora(model, "all-linear", rank=4, alpha=8)
    assert all(type(model.get_submodule(n).base).__name__ == "Linear4bit" for n in names)
    mark_only_lora_trainable(model)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed, "the step changed nothing"
    assert all(".lora." in k for k in changed), sorted(changed)
    # B moved off zero everywhere, so every adapter now takes part in the forward
    assert all(w.lora.B.abs().sum() > 0 for _, w in lora_modules(model))

    # merging into 4-bit weights is refused; unload dequantizes and merges into plain linears
    with pytest.raises(ValueError, match="4-bit bitsandbytes"):
        merge_lora(model)
    with torch.no_grad():
        expected = model(tokens)
    unload_lora(model)
    assert not list(lora_modules(model))
    assert {type(m).__name__ for n, m in model.named_modules() if n in names} == {"Linear"}
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)


def test_new_wrappers_take_the_mode_of_the_module_they_replace():
    """A model in eval mode (as from_pretrained returns it) stays deterministic with dropout > 0."""
    model = tiny_llama()
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    inject_lora(model, ["q_proj", "v_proj", "down_proj"], rank=4, dropout=0.05)
    randomize_lora(model)
    assert all(not w.training for _, w in lora_modules(model))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, model(tokens).logits, atol=0, rtol=0)
    model.train()  # and back in training mode, dropout acts
    assert (model(tokens).logits - model(tokens).logits).abs().max() > 1e-4


def _torch_encoder(seed: int = 0) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)


def test_torch_transformer_encoder_adapters_act_in_every_mode():
    """nn.TransformerEncoderLayer's inference fast path reads linear1/linear2.weight directly;
    nn.MultiheadAttention reads out_proj.weight directly. Neither may swallow an adapter:
    "all-linear" takes each attention whole (in_proj and out_proj) instead of its out_proj."""
    model = _torch_encoder()
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    real = ~pad
    with torch.no_grad():
        base_train = model.train()(x, src_key_padding_mask=pad)
        base_eval = model.eval()(x, src_key_padding_mask=pad)

    names = inject_lora(model, "all-linear", rank=4, alpha=8)
    assert names == [f"layers.{i}.{n}" for i in range(2) for n in ("self_attn", "linear1", "linear2")]
    randomize_lora(model)

    model.train()
    lora_train = model(x, src_key_padding_mask=pad)
    assert (lora_train - base_train)[real].abs().max() > 1e-2
    model.eval()
    with torch.no_grad():  # the fast path's conditions: eval, no grad, a padding mask (nested tensors)
        lora_eval = model(x, src_key_padding_mask=pad)
        unpadded = model(x)
    assert (lora_eval - base_eval)[real].abs().max() > 1e-2
    torch.testing.assert_close(lora_eval[real], lora_train.detach()[real], atol=1e-5, rtol=0)
    merge_lora(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, src_key_padding_mask=pad)[real], lora_eval[real], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), unpadded, atol=1e-5, rtol=1e-5)
    unload_lora(model)  # plain layers again: the fast path is back and agrees
    with torch.no_grad():
        torch.testing.assert_close(model(x, src_key_padding_mask=pad)[real], lora_eval[real], atol=1e-5, rtol=1e-5)


def test_multihead_attention_out_proj_alone_is_refused_with_the_module_to_target():
    model = _torch_encoder()
    before = model.state_dict()
    for targets in (["out_proj"], ["linear1", "self_attn.out_proj"], lambda n, m: isinstance(m, nn.Linear)):
        with pytest.raises(ValueError, match=r"cannot adapt .*self_attn.out_proj.*Target the attention module itself "):
            inject_lora(model, targets)
    assert model.state_dict().keys() == before.keys()
    assert inject_lora(model, ["self_attn"]) == ["layers.0.self_attn", "layers.1.self_attn"]


@pytest.mark.parametrize("reentrant", [True, False])
def test_lora_gradients_under_gradient_checkpointing(reentrant):
    """ViT takes pixel values, not input_ids: with reentrant checkpointing and a frozen base the
    blocks' inputs require no grad, unless injection turns input gradients on as PEFT does."""
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=16, patch_size=8
    )
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = ViTForImageClassification(cfg).train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        inject_lora(model, ["q_proj", "v_proj", "fc2"], rank=4)
        mark_only_lora_trainable(model)
        randomize_lora(model)
        model(pixel_values=pixels).logits.pow(2).sum().backward()
        grads[checkpointing] = {f"{n}.{ab}": getattr(w.lora, ab).grad for n, w in lora_modules(model) for ab in "AB"}
    assert len(grads[True]) == 12 and all(g is not None for g in grads[True].values()), grads[True]
    for key, g in grads[False].items():
        torch.testing.assert_close(grads[True][key], g, atol=1e-6, rtol=1e-5, msg=key)


@pytest.mark.parametrize("unload", [False, True])
def test_merge_with_bad_modules_changes_nothing_and_names_them(unload, tokens):
    model = tiny_model()
    inject_lora(model, "all-linear", rank=4, alpha=8)
    randomize_lora(model)
    wrappers = dict(lora_modules(model))
    wrappers["blocks.0.ff.2"].lora.B.data[0, 0] = float("nan")
    wrappers["blocks.1.att.W_key"].lora.A.data[1, 2] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        unload_lora(model) if unload else merge_lora(model)
    text = str(err.value)
    assert "2 LoRA layer(s) cannot merge, so nothing was changed" in text
    assert "blocks.0.ff.2: the LoRA update B @ A has NaN or inf" in text and "blocks.1.att.W_key:" in text
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():  # bit-identical, NaN where NaN was
        torch.testing.assert_close(after[key], value, atol=0, rtol=0, equal_nan=True, msg=key)
    assert not any(w.merged for w in wrappers.values()) and dict(lora_modules(model)) == wrappers


def _tiny_hf(name: str) -> nn.Module:
    import transformers as T

    enc = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    dec = dict(enc, pad_token_id=0)
    build = {
        "bert-cls": lambda: T.BertForSequenceClassification(T.BertConfig(**enc)),
        "roberta-cls": lambda: T.RobertaForSequenceClassification(T.RobertaConfig(**enc)),
        "llama-cls": lambda: T.LlamaForSequenceClassification(T.LlamaConfig(**dec)),
        "gpt2-cls": lambda: T.GPT2ForSequenceClassification(
            T.GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
        ),
        "vit-cls": lambda: T.ViTForImageClassification(
            T.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8)
        ),
        "bert-mlm": lambda: T.BertForMaskedLM(T.BertConfig(**enc)),
        "llama-lm": lambda: T.LlamaForCausalLM(T.LlamaConfig(**dec)),
        "t5": lambda: T.T5ForConditionalGeneration(
            T.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1)
        ),
    }
    torch.manual_seed(0)
    return build[name]()


@pytest.mark.parametrize(
    "name", ["bert-cls", "roberta-cls", "llama-cls", "gpt2-cls", "vit-cls", "bert-mlm", "llama-lm", "t5"]
)
def test_all_linear_leaves_the_output_head_out_as_peft_does(name):
    """One rule: the model's output layer is never wrapped; a classification head (however deep
    its last linear) is left whole, as PEFT leaves it for task_type SEQ_CLS."""
    peft = pytest.importorskip("peft")
    task = "SEQ_CLS" if name.endswith("-cls") else None
    theirs = peft.get_peft_model(_tiny_hf(name), peft.LoraConfig(r=2, target_modules="all-linear", task_type=task))
    expected = sorted(
        n.removeprefix("base_model.model.").split(".lora_A")[0] for n, _ in theirs.named_parameters() if ".lora_A." in n
    )
    assert sorted(inject_lora(_tiny_hf(name), "all-linear", rank=2)) == expected


def test_train_names_that_match_nothing_list_the_top_level_modules():
    model = tiny_llama()
    inject_lora(model, ["q_proj"])
    with pytest.raises(
        ValueError, match=r"train=\['classifier'\] match no module.*top-level modules are \['model', 'lm_head'\]"
    ):
        mark_only_lora_trainable(model, train=["classifier"])

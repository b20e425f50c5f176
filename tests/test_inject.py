import copy

import pytest
import torch
from conftest import randomize_lora, tiny_hf_gpt2, tiny_model
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
            r"\['W_qeury'\] match no module of TinyModel; its linear-like modules "
            r"are: blocks.N.att.W_query, blocks.N.att.W_key",
        ),
        ({"targets": ["att"]}, r"not linear-like: \['blocks.0.att \(Module\)'"),
        ({"targets": ["norm"]}, r"not linear-like: .*LayerNorm"),
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
    with pytest.raises(ValueError, match=r"already wrapped with LoRA: \['blocks.0.att.W_query'"):
        inject_lora(model, ["W_query", "W_key"])
    with pytest.raises(ValueError, match="already wrapped"):
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


bnb = pytest.importorskip("bitsandbytes")


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
    with pytest.raises(TypeError, match="4-bit bitsandbytes"):
        merge_lora(model)
    with torch.no_grad():
        expected = model(tokens)
    unload_lora(model)
    assert not list(lora_modules(model))
    assert {type(m).__name__ for n, m in model.named_modules() if n in names} == {"Linear"}
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), expected, atol=1e-4, rtol=1e-4)

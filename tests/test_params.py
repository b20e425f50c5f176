import pytest
import torch
from conftest import tiny_model
from torch import nn

from lora_lab import (
    build_model,
    count_parameters,
    format_trainable,
    inject_lora,
    mark_only_lora_trainable,
    memory_estimate,
    parameter_report,
)
from lora_lab.params import markdown_table, rank_report

peft = pytest.importorskip("peft")


def _hf_gpt2(tie: bool = True) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.device("meta"):
        return GPT2LMHeadModel(GPT2Config(tie_word_embeddings=tie))


@pytest.mark.parametrize(("tie", "expected"), [(True, 124_439_808), (False, 163_037_184)])
def test_counts_tied_tensors_once_on_meta(tie, expected):
    model = _hf_gpt2(tie)
    assert all(p.is_meta for p in model.parameters())
    count = count_parameters(model)
    assert count.total == model.num_parameters() == expected
    assert count.trainable == count.total and count.fraction == 1.0


@pytest.mark.parametrize("model_name", ["gpt2-124m", "openllama-3b", "smollm2-135m"])
@pytest.mark.parametrize("rank", [1, 8, 64])
def test_lora_counts_match_peft_on_meta(model_name, rank):
    row = rank_report(lambda: build_model(model_name), [rank])[0]
    # PEFT's "all-linear" is for transformers models; on our GPTModel name the six linears
    targets = ["W_query", "W_key", "W_value", "out_proj", "layers.0", "layers.2"]
    targets = targets if model_name.startswith("gpt2") else "all-linear"
    theirs = peft.get_peft_model(build_model(model_name), peft.LoraConfig(r=rank, target_modules=targets))
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (row["trainable"], row["total"]) == (trainable, total)


def test_openllama_3b_closed_form():
    """All seven linears of the 26 layers, r=8: 8 * sum(in + out) = 12,712,960."""
    model = build_model("openllama-3b")
    assert count_parameters(model).total == 3_426_473_600
    names = inject_lora(model, "all-linear", rank=8)
    mark_only_lora_trainable(model)
    h, i = 3200, 8640
    assert len(names) == 26 * 7
    assert count_parameters(model).trainable == 26 * 8 * (4 * (h + h) + 2 * (h + i) + (i + h)) == 12_712_960


def test_format_trainable_is_peft_line(capsys):
    model = _hf_gpt2()
    theirs = peft.get_peft_model(_hf_gpt2(), peft.LoraConfig(r=8, target_modules=["c_attn"]))
    theirs.print_trainable_parameters()
    inject_lora(model, ["c_attn"], rank=8)
    mark_only_lora_trainable(model)
    assert format_trainable(count_parameters(model)) == capsys.readouterr().out.strip()


def test_report_groups_gpt2_124m():
    model = _hf_gpt2()
    d, layers, vocab, ctx = 768, 12, 50257, 1024
    rows = {r.group: r for r in parameter_report(model)}
    assert rows["embedding"].parameters == vocab * d + ctx * d  # the tied head counts here, once
    assert rows["attention"].parameters == layers * (d * 3 * d + 3 * d + d * d + d)
    assert rows["feed-forward"].parameters == layers * (d * 4 * d + 4 * d + 4 * d * d + d)
    assert rows["norm"].parameters == (2 * layers + 1) * 2 * d
    assert sum(r.parameters for r in rows.values()) == count_parameters(model).total
    assert all(r.bytes == 4 * r.parameters for r in rows.values())

    inject_lora(model, "all-linear", rank=8)
    mark_only_lora_trainable(model)
    rows = {r.group: r for r in parameter_report(model)}
    assert rows["LoRA"].parameters == rows["LoRA"].trainable == count_parameters(model).trainable
    assert rows["attention"].trainable == 0


def test_report_finds_a_new_head():
    model = tiny_model()
    model.out_head = nn.Linear(16, 2)
    rows = {r.group: r for r in parameter_report(model)}
    assert rows["head"].parameters == 16 * 2 + 2


def test_memory_estimate():
    model = build_model("gpt2-124m")
    inject_lora(model, "all-linear", rank=8)
    mark_only_lora_trainable(model)
    count, memory = count_parameters(model), memory_estimate(model)
    assert memory.weights == 4 * count.total
    assert memory.gradients == 4 * count.trainable
    assert memory.optimizer == 2 * memory.gradients
    assert memory_estimate(model, optimizer_states=0).total == memory.weights + memory.gradients


def test_four_bit_weights_count_as_the_weights_they_hold():
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32).to("cpu")
    assert layer.weight.numel() == 64 * 32 // 2  # two 4-bit values per stored byte
    assert count_parameters(layer).total == 64 * 32 + 32
    row = parameter_report(layer)[0]
    assert row.bytes == 64 * 32 // 2 + 32 * 4


def test_markdown_table():
    text = markdown_table([{"rank": 8, "trainable": 1327104, "pct": 1.05}])
    assert text.splitlines() == [
        "| rank | trainable | pct |",
        "|---:|---:|---:|",
        "| 8 | 1,327,104 | 1.0500 |",
    ]

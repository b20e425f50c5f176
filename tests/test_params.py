import re

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
from lora_lab.params import nf4_bytes, rank_report, stored_bytes, training_memory
from lora_lab.report import markdown_table

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


@pytest.mark.parametrize(
    "model_name", ["gpt2-124m", "gpt2-355m", "gpt2-774m", "gpt2-1558m", "openllama-3b", "smollm2-135m"]
)
@pytest.mark.parametrize("rank", [1, 8, 64])
def test_lora_counts_match_peft_on_meta(model_name, rank):
    row = rank_report(lambda: build_model(model_name), [rank])[0]
    # PEFT's "all-linear" is for transformers models; on our GPTModel name the six linears
    targets = ["W_query", "W_key", "W_value", "out_proj", "layers.0", "layers.2"]
    targets = targets if model_name.startswith("gpt2") else "all-linear"
    theirs = peft.get_peft_model(build_model(model_name), peft.LoraConfig(r=rank, target_modules=targets))
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (row["trainable_params"], row["total_params"]) == (trainable, total)


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


@pytest.mark.parametrize("double_quant, closed_form", [(False, 589_888), (True, 542_020)])
def test_four_bit_memory_holds_the_quantization_state(double_quant, closed_form):
    """NF4 1024 x 1024, blocks of 64: 4 bits a weight, plus one absmax per block (fp32, or 8-bit
    with its own fp32 absmax per 256 blocks, code book and offset) and the 16-entry code book."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(1024, 1024, bias=False, compress_statistics=double_quant, quant_type="nf4")
    layer = layer.to("cpu")  # quantizes
    state = layer.weight.quant_state.as_dict(packed=False)  # bitsandbytes' own account of what it keeps
    reference = layer.weight.numel() + sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
    reference += 4 if double_quant else 0  # nested_offset, one fp32 that as_dict hands out as a float
    assert memory_estimate(layer).weights == reference == closed_form
    assert parameter_report(layer)[0].bytes == closed_form


def test_markdown_table():
    text = markdown_table([{"rank": 8, "trainable": 1327104, "pct": 1.05}])
    assert text.splitlines() == [
        "| rank | trainable | pct |",
        "|---:|---:|---:|",
        "| 8 | 1,327,104 | 1.0500 |",
    ]
    # one count of decimals per column: seconds 13.80 beside 8.47 (not 13.8 beside 8.4750), losses above 10 keep
    # four significant digits, and a figure that cannot be had shows as "-"
    rows = [{"seconds": 13.8, "loss": 12.3456, "se": float("nan")}, {"seconds": 8.47, "loss": 1.0, "se": 0.5}]
    assert markdown_table(rows).splitlines()[2:] == ["| 13.80 | 12.35 | - |", "| 8.47 | 1.00 | 0.5000 |"]
    # text columns (names, intervals) left-aligned, numbers right-aligned
    rows = [{"series": "lora", "rank": 1, "interval": "95.7 to 100.0"}, {"series": "dora", "rank": 4, "interval": ""}]
    assert markdown_table(rows).splitlines()[1] == "|:---|---:|:---|"


# The test's own account of each architecture: where its head lives and what may stay in "other".
HEADS = {"bert": "classifier", "bert-mlm": "cls", "gpt2": "lm_head", "llama": "lm_head", "t5": "lm_head",
         "bart": "lm_head", "vit": "classifier", "book-gpt": "out_head"}  # fmt: skip
OTHER_ALLOWED = {"bert": r"^bert\.pooler\."}
_ATT = re.compile(r"attn|attention|W_query|W_key|W_value|\.att\.", re.I)
_FF = re.compile(r"mlp|\.ff\.|intermediate|DenseReluDense|fc1|fc2|layer\.\d+\.output\.", re.I)


def _expected_group(name: str, module: torch.nn.Module, family: str) -> str:
    if "norm" in type(module).__name__.lower():
        return "norm"
    if isinstance(module, torch.nn.Embedding) or "embeddings." in name + ".":
        return "embedding"
    if name == HEADS[family] or name.startswith(HEADS[family] + "."):
        return "head"
    if _ATT.search(name):
        return "attention"
    if _FF.search(name):
        return "feed-forward"
    assert re.search(OTHER_ALLOWED.get(family, "^$"), name), f"{name} ({type(module).__name__}) fits no group"
    return "other"


def _report_model(name: str):
    import transformers as T

    from lora_lab import GPTModel

    enc = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    seq2seq = dict(vocab_size=50, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                   decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32)  # fmt: skip
    return {
        "bert": lambda: T.BertForSequenceClassification(T.BertConfig(**enc)),
        "bert-mlm": lambda: T.BertForMaskedLM(T.BertConfig(**enc)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2)),
        "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**enc, num_key_value_heads=1)),
        "t5": lambda: T.T5ForConditionalGeneration(
            T.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=1)
        ),
        "bart": lambda: T.BartForConditionalGeneration(T.BartConfig(**seq2seq)),
        "vit": lambda: T.ViTForImageClassification(
            T.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8)
        ),
        "book-gpt": lambda: GPTModel(
            dict(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
        ),  # fmt: skip
    }[name]()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_report_sorts_every_block(name):
    """Every linear of an attention or feed-forward block is sorted there (T5's SelfAttention,
    EncDecAttention and DenseReluDense, BART's encoder_attn, BERT-MLM's head): the report's
    groups equal the sums of the test's own per-architecture account."""
    with torch.device("meta"):
        model = _report_model(name)
    expected: dict[str, int] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param in module.parameters(recurse=False):
            if id(param) not in seen:  # tied tensors once, with their first owner
                seen.add(id(param))
                group = _expected_group(module_name, module, name)
                expected[group] = expected.get(group, 0) + param.numel()
    got = {r.group: r.parameters for r in parameter_report(model)}
    assert got == expected


@pytest.mark.parametrize("name", ["bert", "roberta", "llama"])
def test_rank_report_trains_a_classifier_head_as_peft_does(name):
    """PEFT with task_type SEQ_CLS trains the classification head whole (modules_to_save): the
    report counts it as trainable too (RoBERTa's classifier holds two linears)."""
    peft = pytest.importorskip("peft")
    import transformers as T

    small = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cls = {"bert": (T.BertConfig, T.BertForSequenceClassification),
           "roberta": (T.RobertaConfig, T.RobertaForSequenceClassification),
           "llama": (T.LlamaConfig, T.LlamaForSequenceClassification)}[name]  # fmt: skip

    def build():
        torch.manual_seed(0)
        return cls[1](cls[0](**small, pad_token_id=0))

    row = rank_report(build, [8])[0]
    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=8, target_modules="all-linear", task_type="SEQ_CLS"))
    assert row["trainable_params"] == theirs.get_nb_trainable_parameters()[0]


def test_openllama_3b_query_value_closed_form_and_peft():
    """q_proj and v_proj of the 26 layers, r=8: 26 * 2 * 8 * (3200 + 3200) = 2,662,400, as PEFT counts."""
    row = rank_report(lambda: build_model("openllama-3b"), [8], ["q_proj", "v_proj"], "openllama-3b")[0]
    theirs = peft.get_peft_model(build_model("openllama-3b"), peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    assert row["trainable_params"] == 26 * 2 * 8 * (3200 + 3200) == 2_662_400 == theirs.get_nb_trainable_parameters()[0]
    assert row["total_params"] == 3_426_473_600 + 2_662_400 and row["targets"] == "q_proj+v_proj"


@pytest.mark.parametrize("shape", [(1024, 1024), (100, 37), (3200, 8640)])
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_closed_form_is_what_bitsandbytes_stores(shape, double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(*shape, bias=False, compress_statistics=double_quant, quant_type="nf4").to("cpu")
    assert nf4_bytes(shape[0] * shape[1], double_quant=double_quant) == stored_bytes(layer, layer.weight)


def test_qlora_memory_is_that_of_a_really_quantized_model():
    """The report's QLoRA estimate (linears in NF4, the rest as the setting says) equals what a
    model quantized by bitsandbytes holds, byte for byte; full fine-tuning is 16 bytes a weight."""
    pytest.importorskip("bitsandbytes")
    from conftest import tiny_gpt

    from lora_lab.models import quantize_linears
    from lora_lab.targets import find_targets

    model = tiny_gpt(emb_dim=64, n_heads=4)
    quantizable = {id(model.get_submodule(n).weight) for n in find_targets(model, "all-linear")}
    inject_lora(model, "all-linear", rank=4)
    mark_only_lora_trainable(model)
    estimate = training_memory(model.to(torch.bfloat16), "qlora_nf4", quantizable)
    for lora in (m for m in model.modules() if type(m).__name__ == "LoRALayer"):
        lora.float()  # LoRA stays in fp32 over the bf16 rest
    real = tiny_gpt(emb_dim=64, n_heads=4)
    quantize_linears(real, "nf4", skip=("out_head",))
    real.to(torch.bfloat16)
    inject_lora(real, "all-linear", rank=4)
    mark_only_lora_trainable(real)
    assert estimate == memory_estimate(real).total
    base = count_parameters(tiny_gpt(emb_dim=64, n_heads=4)).total
    assert training_memory(model, "full_fp32") == 16 * base and training_memory(model, "full_bf16") == 8 * base


def test_per_gpu_memory_under_ddp_and_fsdp_is_the_closed_form():
    """DDP: one GPU holds what one device does. FSDP2: every tensor cut in rows over the GPUs (the last
    shard padded): ceil(rows / gpus) rows of each, in the setting's bytes per value."""
    from conftest import tiny_gpt

    from lora_lab.params import rank_report, training_memory
    from lora_lab.targets import find_targets

    model = tiny_gpt(0)
    linears = {id(model.get_submodule(n).weight) for n in find_targets(model, "all-linear")}  # QLoRA's 4-bit
    inject_lora(model, "all-linear", 4, 8.0)
    mark_only_lora_trainable(model)
    for gpus in (2, 3):
        assert training_memory(model, "lora_fp32", gpus=gpus, sharding="ddp") == training_memory(model, "lora_fp32")
        want = 0
        for p in {id(p): p for p in model.parameters()}.values():
            rows = p.shape[0]
            shard = -(-rows // gpus) * (p.numel() // rows)
            want += shard * (16 if p.requires_grad else 2)
        assert training_memory(model, "lora_bf16", gpus=gpus, sharding="fsdp") == want
        # QLoRA: a linear's 4-bit codes (ceil(n / 2) bytes, one uint8 column) cut in rows, its quantization
        # state (one 8-bit absmax per 64 values, and theirs) whole on every GPU
        want = 0
        for p in {id(p): p for p in model.parameters()}.values():
            rows = p.shape[0]
            if id(p) in linears:
                codes = -(-p.numel() // 2)
                want += nf4_bytes(p.numel()) - codes + -(-codes // gpus)
            else:
                want += -(-rows // gpus) * (p.numel() // rows) * (16 if p.requires_grad else 2)
        assert training_memory(model, "qlora_nf4", linears, gpus, "fsdp") == want
    row = rank_report(lambda: build_model("openllama-7b", "meta"), [8], gpus=8, sharding="fsdp")[0]
    # Llama 2 7B's shapes, all seven linears at r=8: 32 x (4 x 8 x (4096 + 4096) + 3 x 8 x (4096 + 11008))
    assert row["trainable_params"] == 32 * (4 * 8 * 8192 + 3 * 8 * 15104) == 19_988_480
    assert row["lora_bf16_per_gpu_mib"] < row["lora_bf16_mib"] / 7.9
    # gathered for a while: the root (embeddings and output head, 2 x 32000 x 4096, the final norm) and two
    # blocks (4 x 4096^2 attention + 3 x 4096 x 11008 MLP + 2 norms, LoRA's r=8 tensors), all in fp32
    block = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096 + 4 * 8 * 8192 + 3 * 8 * 15104
    assert row["lora_fp32_gathered_mib"] == round(4 * (2 * 32000 * 4096 + 4096 + 2 * block) / 2**20, 1)
    # --bf16: all gathered in bf16, LoRA cast too; QLoRA: the linears' 4-bit codes half a byte a value instead (the
    # root's head is not quantized)
    assert row["lora_bf16_gathered_mib"] == round(2 * (2 * 32000 * 4096 + 4096 + 2 * block) / 2**20, 1)
    block = (4 * 4096 * 4096 + 3 * 4096 * 11008) // 2 + 2 * 2 * 4096 + 2 * (4 * 8 * 8192 + 3 * 8 * 15104)
    assert row["qlora_nf4_gathered_mib"] == round((2 * (2 * 32000 * 4096 + 4096) + 2 * block) / 2**20, 1)
    linears = find_targets(build_model("openllama-7b", "meta"), "all-linear")
    assert len(linears) == 32 * 7

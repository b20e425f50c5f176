import pytest
import torch

from lora_lab import build_model, count_parameters
from lora_lab.models import MODELS, model_spec


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_builds_on_meta(name):
    model = build_model(name)
    assert all(p.is_meta for p in model.parameters())
    assert count_parameters(model).total > 1_000_000


def test_aliases_and_unknown_names():
    assert model_spec("gpt2-medium") is MODELS["gpt2-355m"]
    with pytest.raises(ValueError, match="unknown model 'gpt3'.*gpt2-124m"):
        model_spec("gpt3")


def test_local_hugging_face_config_directory(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100, architectures=["GPT2LMHeadModel"]).save_pretrained(
        tmp_path
    )
    model = build_model(str(tmp_path), device="cpu")
    assert not next(model.parameters()).is_meta
    assert model.config.n_layer == 2 and isinstance(model.lm_head, torch.nn.Linear)


def _config(kind: str, **kwargs):
    import transformers

    small = {
        "Bart": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100),
        "Marian": dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
                       decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100,
                       decoder_vocab_size=100, pad_token_id=99),
        "Bert": dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        "Roberta": dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64),
        "T5": dict(vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2),
    }[kind]  # fmt: skip
    return getattr(transformers, f"{kind}Config")(**small, **kwargs)


@pytest.mark.parametrize(
    "kind, architecture, expected",
    [
        ("Bart", "BartForConditionalGeneration", "BartForConditionalGeneration"),
        ("Marian", "MarianMTModel", "MarianMTModel"),
        ("Bert", "BertModel", "BertModel"),
        ("Bert", "BertForSequenceClassification", "BertForSequenceClassification"),
        ("Roberta", None, "RobertaModel"),  # no architectures: the bare model, never a causal-LM head
        ("Bart", None, "BartModel"),
        ("T5", "T5ForConditionalGeneration", "T5ForConditionalGeneration"),
    ],
)
def test_config_directory_builds_the_class_it_names(tmp_path, kind, architecture, expected):
    import transformers

    config = _config(kind, architectures=[architecture] if architecture else None)
    config.save_pretrained(tmp_path)
    model = build_model(str(tmp_path))
    assert type(model).__name__ == expected
    with torch.device("meta"):
        reference = getattr(transformers, expected)(config)
    assert count_parameters(model).total == reference.num_parameters()


def test_path_like_models_get_path_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory: ./missing/"):
        model_spec("./missing/")
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        model_spec(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=f"no config.json in {tmp_path}: put the model's Hugging Face config"):
        model_spec(str(tmp_path))


def test_building_on_meta_does_not_initialise_weights():
    import subprocess
    import sys

    code = (
        "import sys; from lora_lab import build_model, inject_lora; m = build_model('gpt2-124m'); "
        "inject_lora(m, 'all-linear'); print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"  # initialising meta tensors would import torch's compiler (~1.5 s)


def test_a_meta_build_leaves_weight_init_alone(tmp_path):
    """The first transformers model of a process built on meta must not leave later models
    uninitialised (transformers keeps the torch.nn.init functions it first sees)."""
    import subprocess
    import sys

    _config("Bert", architectures=["BertForSequenceClassification"]).save_pretrained(tmp_path)
    code = (
        "import torch; from lora_lab import build_model, GPTModel, GPT2_CONFIGS; "
        f"build_model({str(tmp_path)!r}); build_model('gpt2-124m'); build_model('minilm-l6'); "
        "from transformers import BertConfig, BertForSequenceClassification; "
        "m = BertForSequenceClassification(BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=1, "
        "num_attention_heads=2, intermediate_size=64)); "
        "print(round(m.bert.embeddings.word_embeddings.weight.std().item(), 3), m.classifier.bias.abs().max().item(), "
        "round(torch.nn.Linear(64, 64).weight.std().item(), 2))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["0.02", "0.0"]  # initializer_range 0.02, zero biases: transformers' own init ran
    assert 0.05 < float(out[2]) < 0.1  # torch's kaiming-uniform for a 64-wide linear: std 1/sqrt(3*64) = 0.072


def test_unknown_architecture_is_refused_and_config_dtype_kept(tmp_path):
    _config("Bert", architectures=["BertForMaskedLMv2"]).save_pretrained(tmp_path / "typo")
    with pytest.raises(ValueError, match=r"names architectures \['BertForMaskedLMv2'\], which transformers"):
        build_model(str(tmp_path / "typo"))
    _config("Bert", architectures=["BertModel"], dtype="bfloat16").save_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in build_model(str(tmp_path / "bf16")).parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_qlora_step_changes_only_lora(quantize):
    """GPTModel with its block linears in bitsandbytes 4-bit (or 8-bit): the base stays frozen and
    byte for byte the same through a training step; LoRA's A and B move; the output is the full-precision
    model's within quantization error."""
    pytest.importorskip("bitsandbytes")
    from conftest import tiny_gpt

    from lora_lab import inject_lora, mark_only_lora_trainable
    from lora_lab.models import quantize_linears

    reference = tiny_gpt(emb_dim=64, n_heads=4)
    model = tiny_gpt(emb_dim=64, n_heads=4)
    names = quantize_linears(model, quantize, skip=("out_head",))
    assert len(names) == 2 * 6 and all(type(model.get_submodule(n)).__name__.startswith("Linear") for n in names)
    assert type(model.out_head) is torch.nn.Linear
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = (model(ids) - reference(ids)).abs().mean() / reference(ids).abs().mean()
    assert error < (0.15 if quantize == "nf4" else 0.05), error
    inject_lora(model, "all-linear", rank=4, alpha=8)
    mark_only_lora_trainable(model)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # B leaves zero at the first step; A moves at the second
        model(ids).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
    assert changed and all(".lora.A" in k or ".lora.B" in k for k in changed), sorted(changed)[:5]
    assert len(changed) == 2 * len(names)


def test_unknown_quantization_is_refused():
    from lora_lab.models import load_pretrained, quantize_linears

    with pytest.raises(ValueError, match="unknown quantization 'fp4': use nf4 or int8"):
        load_pretrained("gpt2-124m", "causal-lm", quantize="fp4")
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_linears(torch.nn.Linear(2, 2), "int4")


def test_importing_bitsandbytes_through_lora_lab_leaves_out_its_kernels_notice():
    """bitsandbytes logs that the optional `kernels` package is missing when it is imported (on CPUs with
    AVX512-BF16); lora_lab's import of it does not pass that on."""
    import subprocess
    import sys

    pytest.importorskip("bitsandbytes")
    notice = "Failed to load CPU gemm_4bit_forward"
    plain = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True)
    if notice not in plain.stderr + plain.stdout:
        pytest.skip("this CPU's bitsandbytes prints no notice to leave out")
    calls = ["_bitsandbytes()", "bnb_config('nf4', [], torch.float32)"]
    for call in calls:
        code = f"import torch; from lora_lab.quantize import _bitsandbytes, bnb_config; {call}"
        ours = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert ours.returncode == 0 and notice not in ours.stderr + ours.stdout, ours.stderr[-1000:]


def test_a_loaded_model_names_its_source_as_given(tiny_bert_dir):
    """What a run's PEFT export writes as base_model_name_or_path: a local directory as the user gave it
    (a registered name becomes its hub id, tested with the packaged MiniLM in test_run)."""
    from lora_lab.models import load_pretrained

    given = str(tiny_bert_dir) + "/"
    assert load_pretrained(given, "classification").source == given

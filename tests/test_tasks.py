"""The loss of a step is one weighted mean over the whole step, and one loss definition is reported."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt
from torch import nn

from lora_lab import data as D
from lora_lab import inject_lora, mark_only_lora_trainable
from lora_lab.config import TrainConfig
from lora_lab.loop import TrainingError, evaluate, fit
from lora_lab.tasks import Task

CPU = torch.device("cpu")


def _char_tokenizer(max_length: int = 24) -> D.Tokenizer:
    return D.Tokenizer(encode=lambda t: [ord(c) % 40 + 1 for c in t], decode=lambda ids: "", pad_id=0, eos_id=45,
                       max_length=max_length)  # fmt: skip


def _classifier(seed: int = 0) -> nn.Module:
    model = tiny_gpt(seed).double()
    model.out_head = nn.Linear(16, 2).double()
    inject_lora(model, "all-linear", rank=4, alpha=8)
    mark_only_lora_trainable(model, train=["out_head"])
    return model


def _rows(n: int = 32) -> list[tuple[str, int]]:
    g = torch.Generator().manual_seed(3)
    rows = []
    for i in range(n):
        length = int(torch.randint(3, 11, (1,), generator=g))
        rows.append(("".join(chr(97 + int(k)) for k in torch.randint(0, 20, (length,), generator=g)), int(i % 4 == 0)))
    return rows


def _trained(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol)


def _fit_classifier(cfg: TrainConfig, rows) -> dict[str, torch.Tensor]:
    model = _classifier()
    tok = _char_tokenizer()
    task = cfg.make_task("gpt")
    torch.manual_seed(0)
    fit(model, rows, task.collate(tok), [], cfg, task, CPU)
    return _trained(model)


@pytest.mark.parametrize("weights", [None, [1.0, 3.0]])
def test_accumulation_equals_one_big_batch_with_class_weights(weights):
    """16 x 1 and 8 x 2 (and 4 x 4) take the same rows per step: the same adapter to 1e-6 in fp64. Before,
    each batch was a weighted mean over itself and the group averaged the means: 6.9e-2 apart with 1,3."""
    rows = _rows(32)
    base = TrainConfig(epochs=2, batch_size=16, grad_accum=1, lr=5e-2, warmup=0.0, class_weights=weights)
    big = _fit_classifier(base, rows)
    for batch, accum in [(8, 2), (4, 4)]:
        _assert_same(_fit_classifier(dataclasses.replace(base, batch_size=batch, grad_accum=accum), rows), big, 1e-6)


def test_class_weights_of_one_scale_train_as_none():
    """A weighted mean divides by the weights' sum: (2, 2) is no weighting at all."""
    rows = _rows(32)
    cfg = TrainConfig(epochs=1, batch_size=8, grad_accum=2, lr=5e-2, warmup=0.0)
    _assert_same(_fit_classifier(dataclasses.replace(cfg, class_weights=[2.0, 2.0]), rows),
                 _fit_classifier(cfg, rows), 1e-9)  # fmt: skip


def _instructions() -> list[dict[str, str]]:
    """Responses of very different lengths, so that batches score different numbers of tokens."""
    outputs = ["ok.", "a much longer answer, with many more tokens in it than the first.", "no.", "yes, sure.",
               "it depends on what you ask.", "x", "the longest response of all of them, by some way, here.",
               "fine."]  # fmt: skip
    return [{"instruction": f"Say {i}.", "input": "", "output": o} for i, o in enumerate(outputs)]


def test_causal_lm_accumulation_divides_by_the_tokens_of_the_whole_step():
    """Instruction tuning: 8 x 1 equals 4 x 2 and 2 x 4 to 1e-6 in fp64 although batches score
    different numbers of response tokens (before: 3.0e-2 apart)."""
    tok = _char_tokenizer(max_length=256)
    entries = _instructions()
    base = TrainConfig(dataset="instructions", epochs=2, batch_size=8, lr=2e-2, warmup=0.0)
    task = base.make_task("gpt")
    collate = task.collate(tok)
    counts = [int((b["labels"] != D.IGNORE_INDEX).sum()) for b in D.batches(entries, 2, collate, True, base.seed)]
    assert len(set(counts)) > 1  # the case this test is about

    def run(cfg):
        model = tiny_gpt(vocab_size=64, context_length=256).double()
        inject_lora(model, "all-linear", rank=2)
        mark_only_lora_trainable(model)
        fit(model, entries, collate, [], cfg, task, CPU)
        return _trained(model)

    big = run(base)
    for batch, accum in [(4, 2), (2, 4)]:
        _assert_same(run(dataclasses.replace(base, batch_size=batch, grad_accum=accum)), big, 1e-6)


def test_reported_losses_are_unweighted_cross_entropy():
    """With class weights, the validation loss in the history and `evaluate` are plain cross-entropy per
    example (the same definition as the initial and test losses), computed here by hand."""
    rows = _rows(24)
    cfg = TrainConfig(epochs=1, batch_size=8, lr=5e-2, warmup=0.0, class_weights=[1.0, 5.0])
    model = _classifier()
    task = cfg.make_task("gpt")
    collate = task.collate(_char_tokenizer())
    val = D.batches(rows[:12], 4, collate, shuffle=False)
    fitted = fit(model, rows, collate, val, cfg, task, CPU)
    model.eval()
    with torch.no_grad():
        by_hand = torch.cat([F.cross_entropy(task.logits(model, b), b["labels"], reduction="none") for b in val])
    assert fitted.history[-1]["val_loss"] == pytest.approx(float(by_hand.mean()), rel=1e-12)
    scored = evaluate(model, val, task, CPU)
    assert scored["loss"] == pytest.approx(float(by_hand.mean()), rel=1e-12)
    assert scored["loss_se"] == pytest.approx(float(by_hand.std() / len(by_hand) ** 0.5), rel=1e-9)
    logits, labels = torch.cat([task.logits(model, b) for b in val]).detach(), torch.cat([b["labels"] for b in val])
    weighted = F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 5.0]).double())
    assert abs(float(weighted) - scored["loss"]) > 1e-3  # the weighted mean is another number: not reported


def test_task_objective_is_the_weighted_sum_pytorch_means():
    """sum_i w_i l_i / sum_i w_i over a batch is F.cross_entropy(weight=w): the step divides by the weights."""
    task = Task("classification", "hf", class_weights=(1.0, 3.0, 0.5))
    logits, labels = torch.randn(7, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 1, 1, 0, 2])
    total, losses = task.objective(logits, labels)
    weight = task.weight({"labels": labels})
    torch.testing.assert_close(
        total / weight, F.cross_entropy(logits, labels, weight=torch.tensor([1.0, 3.0, 0.5]).double())
    )
    torch.testing.assert_close(losses, F.cross_entropy(logits, labels, reduction="none"))


def test_a_class_weight_of_zero_skips_with_the_right_reason():
    """Batches of zero-weight rows have nothing to learn: skipped, and the reason names the class weights
    (not --max-length); when nothing is left at all, training stops with that reason."""
    rows = [("abc", 0)] * 8 + [("abz", 1)] * 8
    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, warmup=0.0, class_weights=[0.0, 1.0])
    task = cfg.make_task("gpt")
    assert "class weight 0" in task.why_unlearnable(None)
    model = _classifier()
    with pytest.raises(TrainingError, match="every batch was skipped: its rows all have class weight 0"):
        fit(model, rows[:8], task.collate(_char_tokenizer()), [], cfg, task, CPU)
    fitted = fit(_classifier(), rows, task.collate(_char_tokenizer()), [], cfg, task, CPU)
    order = D.batches(rows, 8, task.collate(_char_tokenizer()), True, cfg.seed)  # the order fit draws
    assert fitted.steps == sum(bool(b["labels"].any()) for b in order)


def test_bad_class_weights_are_refused():
    with pytest.raises(ValueError, match="non-negative"):
        TrainConfig(class_weights=[1.0, -3.0])
    with pytest.raises(ValueError, match="instruction tuning has no classes"):
        TrainConfig(dataset="instructions", class_weights=[1.0, 2.0])


def test_low_precision_logits_are_scored_in_fp32():
    task = Task("causal-lm", "hf")
    logits = torch.randn(2, 3, 5).bfloat16()
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    losses, targets = task.losses(logits, labels)
    assert losses.dtype == torch.float32 and targets.tolist() == [1, 2, 3, 4]
    expected = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    torch.testing.assert_close(losses, expected[labels.flatten() != -100])


def test_deepcopy_of_a_task_is_equal():
    task = TrainConfig(class_weights=[1, 2]).make_task("gpt")
    assert copy.deepcopy(task) == task and task.class_weights == (1.0, 2.0)

"""--fsdp: two gloo processes on CPU train the model sharded with FSDP2 and give the adapter one process
gives when it takes the same rows per step (within 1e-6 in fp32), on our GPTModel, a Hugging Face BERT
and a Llama with grouped-query attention; the base is sharded (each process holds half of it) and saving
gathers LoRA and the head alone, never the base; the run loads in one process and exports to PEFT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_lab.cli import main
from lora_lab.files import read_safetensors

REPO = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str], module: bool = True) -> subprocess.CompletedProcess:
    from test_sweep import _free_port

    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           *(["-m", "lora_lab.cli"] if module else []), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def save_tiny_llama(folder: Path) -> Path:
    """A two-layer Llama (4 query heads, 2 key/value heads) with the letters tokenizer, saved as a Hugging
    Face checkpoint: `--model DIR` puts a classification head on it."""
    from conftest import save_tiny_bert
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    save_tiny_bert(folder)  # for its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for name in ("config.json", "model.safetensors"):
        (folder / name).unlink()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=31, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=32, pad_token_id=0)  # fmt: skip
    LlamaModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.mark.parametrize("model, variant", [("bert", ["--use-dora", "--init", "olora"]), ("llama", [])])
def test_fsdp_over_two_processes_equals_one_process(model, variant, tiny_bert_dir, tiny_llama_dir, letters_data,
                                                     tmp_path):  # fmt: skip
    """Plain LoRA on a Llama with GQA; DoRA (its magnitudes sharded too) over OLoRA's orthonormal start on BERT."""
    folder = tiny_bert_dir if model == "bert" else tiny_llama_dir
    common = ["--model", str(folder), "--dataset", f"csv:{letters_data}", "--rank", "4", "--epochs", "2",
              "--lr", "1e-2", "--max-length", "16", "--max-steps", "6", "--device", "cpu", *variant]  # fmt: skip
    done = _torchrun(["train", *common, "--batch-size", "4", "--fsdp", "--out", str(tmp_path / "fsdp")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert main(["train", *common, "--batch-size", "4", "--grad-accum", "2", "--out", str(tmp_path / "one")]) == 0
    fsdp, _ = read_safetensors(tmp_path / "fsdp" / "adapter.safetensors", "")
    one, _ = read_safetensors(tmp_path / "one" / "adapter.safetensors", "")
    assert fsdp.keys() == one.keys() and any("score" in k or "classifier" in k for k in one)  # the head too
    # OLoRA starts B A away from zero, so fp32's order of sums shows more: DDP differs from one process by 3e-6 here
    atol = 5e-6 if variant else 1e-6
    for name in one:
        torch.testing.assert_close(fsdp[name], one[name], rtol=0, atol=atol)
    assert sum(float(one[k].abs().sum()) for k in one if k.endswith("lora.B")) > 0  # LoRA trained
    metrics = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("fsdp", "one")]
    assert metrics[0]["steps"] == metrics[1]["steps"] == 6
    assert metrics[0]["trainable_params"] == metrics[1]["trainable_params"]
    assert metrics[0]["final_val_loss"] == pytest.approx(metrics[1]["final_val_loss"], abs=1e-6)
    norms = [[float(r.split(",")[4]) for r in (tmp_path / d / "steps.csv").read_text().splitlines()[1:]]
             for d in ("fsdp", "one")]  # fmt: skip
    assert norms[0] == pytest.approx(norms[1], rel=1e-5) and min(norms[1]) > 0  # the norm over all shards, clipped
    # the FSDP run, loaded in one process (no process group), gives the logits its PEFT export gives
    import peft
    from transformers import AutoModelForSequenceClassification

    from lora_lab.run import load_run

    cfg, loaded, _ = load_run(tmp_path / "fsdp")
    task = cfg.make_task(loaded.kind)
    batch = task.collate(loaded.tokenizer)([("a b z", 0), ("c d e f g", 1), ("z", 0)])
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    base.config.pad_token_id = base.config.pad_token_id or 0
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "fsdp" / "peft").eval()
    with torch.no_grad():
        ours = task.logits(loaded.model, batch)
        want = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert cfg.fsdp and ours.shape == (3, 2)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=0)


GPT_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
from conftest import tiny_gpt
from lora_lab.adapters import save_adapter
from lora_lab.config import TrainConfig
from lora_lab.distributed import whole_trainable
from lora_lab.inject import inject_lora, mark_only_lora_trainable
from lora_lab.loop import fit
from lora_lab.tasks import CAUSAL_LM, Task

sharded, quantize = sys.argv[1] == "fsdp", sys.argv[3]
if sharded:
    dist.init_process_group("gloo")
torch.manual_seed(0)
model = tiny_gpt(0)
if quantize == "nf4":  # QLoRA: the linears' weights as 4-bit codes, which FSDP shards as it shards the rest
    from lora_lab.quantize import quantize_linears
    quantize_linears(model, "nf4", ("out_head",))
inject_lora(model, "all-linear", 4, 8.0)
mark_only_lora_trainable(model)
rows = [torch.randint(0, 50, (8,)) for _ in range(16)]
def collate(batch):
    ids = torch.stack(list(batch))
    return {"input_ids": ids[:, :-1], "attention_mask": torch.ones_like(ids[:, :-1]), "labels": ids[:, 1:]}
cfg = TrainConfig(dataset="instructions", model="x", epochs=2, batch_size=2 if sharded else 2, grad_accum=1 if sharded
                  else 2, lr=1e-2, warmup=0.0, fsdp=sharded)
task = Task(CAUSAL_LM, "gpt")
from lora_lab.params import count_parameters
counted = count_parameters(model)
fit(model, rows, collate, [collate(rows[:4])], cfg, task, torch.device("cpu"), distributed=sharded)
assert count_parameters(model) == counted, (count_parameters(model), counted)  # a sharded 4-bit weight counts whole
rank = dist.get_rank() if sharded else 0
if sharded:
    base = model.trf_blocks[0].att.W_query.base.weight
    assert isinstance(base, DTensor) and base.to_local().shape[0] * 2 == base.shape[0], "the base is not sharded"
    assert base.dtype == (torch.uint8 if quantize == "nf4" else torch.float32)  # the 4-bit codes, never cast
    gathered = []
    real = DTensor.full_tensor
    def spy(self, *a, **k):
        gathered.append(tuple(self.shape))
        return real(self, *a, **k)
    DTensor.full_tensor = spy
    trainable = {tuple(p.shape) for p in model.parameters() if p.requires_grad}
    with whole_trainable(model):
        if rank == 0:
            save_adapter(model, sys.argv[2])
    DTensor.full_tensor = real
    frozen = {tuple(p.shape) for p in model.parameters() if not p.requires_grad} - trainable
    assert gathered and not set(gathered) & frozen, ("a frozen tensor was gathered", set(gathered) & frozen)
    dist.destroy_process_group()
else:
    save_adapter(model, sys.argv[2])
"""


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_fsdp_on_gptmodel_equals_one_process_and_gathers_only_lora_to_save(quantize, tmp_path):
    """Our GPTModel through the loop itself: sharded over two processes (the base halved on each: with
    QLoRA its 4-bit codes), the adapter equals one process's; saving gathers trainable tensors alone (a spy on
    DTensor.full_tensor)."""
    if quantize == "nf4":
        pytest.importorskip("bitsandbytes")
    script = tmp_path / "gpt_fsdp.py"
    script.write_text(GPT_SCRIPT)
    done = _torchrun([str(script), "fsdp", str(tmp_path / "fsdp.safetensors"), quantize], module=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"}
    one = subprocess.run([sys.executable, str(script), "one", str(tmp_path / "one.safetensors"), quantize], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    fsdp, _ = read_safetensors(tmp_path / "fsdp.safetensors", "")
    single, _ = read_safetensors(tmp_path / "one.safetensors", "")
    assert fsdp.keys() == single.keys() and len(single) == 24
    for name in single:
        torch.testing.assert_close(fsdp[name], single[name], rtol=0, atol=1e-6)


def test_fsdp_without_torchrun_or_with_what_it_does_not_take_yet_is_refused(tiny_bert_dir, letters_data, tmp_path,
                                                                            capsys):  # fmt: skip
    args = ["train", "--model", str(tiny_bert_dir), "--dataset", f"csv:{letters_data}", "--fsdp", "--out",
            str(tmp_path / "r")]  # fmt: skip
    assert main(args) == 2
    assert "--fsdp shards the model over torchrun's processes" in capsys.readouterr().err


RESUME_SCRIPT = """
import sys
from lora_lab import data as D, loop
from lora_lab.config import TrainConfig
from lora_lab.run import train

model, data, out, stop = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "stop"
cfg = TrainConfig(model=model, dataset=f"csv:{data}", rank=4, epochs=2, batch_size=4, lr=1e-2, max_length=16,
                  device="cpu", fsdp=True, keep="best")
scores = iter([(1.0,), (0.0,)])  # this process's first validation scores best: --keep best ends with epoch 1's
loop.validation_score = lambda task, val: next(scores)
real = D.batches
def stop_in_epoch_2(rows, batch_size, collate, shuffle, seed=0, bucket=False):
    if stop and shuffle and seed == cfg.seed + 1:
        raise KeyboardInterrupt
    return real(rows, batch_size, collate, shuffle, seed, bucket)
D.batches = stop_in_epoch_2
try:
    train(cfg, out)
except KeyboardInterrupt:
    print("stopped")
"""


def test_an_fsdp_run_stopped_mid_run_resumes_to_the_same_adapter(tiny_llama_dir, letters_data, tmp_path):
    """The checkpoint holds LoRA's tensors, the optimizer's state and --keep best's epoch gathered whole;
    resumed on as many processes, each takes its shard back, and the run ends where an uninterrupted one does."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    common = [str(tiny_llama_dir), str(letters_data)]
    for out, mode in (("whole", "go"), ("stopped", "stop")):
        done = _torchrun([str(script), *common, str(tmp_path / out), mode], module=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "stopped" / "checkpoint.pt").is_file() and not (tmp_path / "stopped" / "metrics.json").exists()
    epoch_1 = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["trainable"]
    done = _torchrun([str(script), *common, str(tmp_path / "stopped"), "go"], module=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for run in ("whole", "stopped"):  # --keep best: epoch 1's adapter, in the resumed run from the checkpoint
        assert json.loads((tmp_path / run / "metrics.json").read_text())["epoch_kept"] == 1
    # epoch 2 trained from the optimizer's restored shards as it trained on: the same losses, step by step
    histories = [[r.split(",") for r in (tmp_path / run / "steps.csv").read_text().splitlines()[1:]]
                 for run in ("whole", "stopped")]  # fmt: skip
    assert len(histories[0]) == len(histories[1]) > 4
    for whole_row, resumed_row in zip(*histories, strict=True):
        assert float(resumed_row[2]) == pytest.approx(float(whole_row[2]), abs=1e-6)  # the step's loss
    whole, _ = read_safetensors(tmp_path / "whole" / "adapter.safetensors", "")
    resumed, _ = read_safetensors(tmp_path / "stopped" / "adapter.safetensors", "")
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=1e-6)
        torch.testing.assert_close(whole[name], epoch_1[name], rtol=0, atol=0)  # each process its own rows back


def test_a_sweep_with_fsdp_trains_each_point_sharded_over_every_process(tiny_llama_dir, letters_data, tmp_path):
    """`lora-lab sweep --fsdp` under torchrun: each point on both processes together, sharded; a point equals
    the same point trained alone with `train --fsdp`. With --bf16 (the frozen base stored in bf16)."""
    out = tmp_path / "sweep"
    args = ["--model", str(tiny_llama_dir), "--dataset", f"csv:{letters_data}", "--epochs", "1", "--batch-size", "4",
            "--lr", "1e-2", "--max-length", "16", "--max-steps", "3", "--device", "cpu", "--fsdp",
            "--bf16"]  # fmt: skip
    done = _torchrun(["sweep", *args, "--ranks", "2", "--out", str(out)])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    from lora_lab.sweep import read_rows

    rows = read_rows(out)
    assert [int(r["rank"]) for r in rows] == [2] and (out / "summary.md").is_file()
    alone = _torchrun(["train", *args, "--rank", "2", "--alpha", "4", "--out", str(tmp_path / "alone")])
    assert alone.returncode == 0, alone.stderr[-3000:]
    point, _ = read_safetensors(out / rows[0]["run"] / "adapter.safetensors", "")
    single, _ = read_safetensors(tmp_path / "alone" / "adapter.safetensors", "")
    for name in single:
        torch.testing.assert_close(point[name], single[name], rtol=0, atol=0)
    assert json.loads((out / "sweep.json").read_text())["processes_per_point"] == 2


def test_fsdp_refuses_one_process_and_a_sweeps_points_it_cannot_take_before_any_trains(
    tiny_bert_dir, letters_data, tmp_path, monkeypatch, capsys
):
    common = ["--model", str(tiny_bert_dir), "--dataset", f"csv:{letters_data}", "--fsdp", "--device", "cpu"]
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun --nproc_per_node 1
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["train", *common, "--out", str(tmp_path / "r")]) == 2
    assert "--fsdp shards the model over 2 or more processes; this torchrun started 1" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the sweep checks every point before the first
    out = tmp_path / "sweep"
    assert main(["sweep", *common, "--ranks", "1", "--quantize", "int8", "--out", str(out)]) == 2
    assert "--fsdp shards a 4-bit base, not an 8-bit one: use --quantize nf4" in capsys.readouterr().err
    assert not out.exists()
    assert main(["train", *common, "--compile", "--out", str(tmp_path / "r")]) == 2
    assert "--fsdp does not take --compile yet" in capsys.readouterr().err

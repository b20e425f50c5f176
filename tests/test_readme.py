"""Every Python snippet in the README runs as written (offline: a tiny GPT-2 stands in the
Hugging Face cache under the name the README loads, and the BPE file comes from shared data)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_written(index, tmp_path, bpe_file):
    cache = tmp_path / "hub"
    snapshot = cache / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64)).save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "LORA_LAB_GPT2_BPE": str(bpe_file)}
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", SNIPPETS[index]], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = re.findall(r"^# (trainable params: .*)$", SNIPPETS[index], re.M)
    for line in expected:  # a printed result quoted in the snippet is what it prints
        assert line in proc.stdout

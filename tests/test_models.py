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

    GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100).save_pretrained(tmp_path)
    model = build_model(str(tmp_path), device="cpu")
    assert not next(model.parameters()).is_meta
    assert model.config.n_layer == 2 and isinstance(model.lm_head, torch.nn.Linear)

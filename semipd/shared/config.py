"""Model and engine configuration.

A model is a Hugging Face directory (config.json is read through transformers' config classes), a
GGUF file (its metadata read by transformers as it reads a GGUF's config) or a preset name that
builds the same kind of config with no files.
"""

import json
import os
import re
from dataclasses import dataclass, field

from semipd.shared.errors import UserError, first_line
from semipd.shared.gguf_file import is_gguf, transformers_source

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
SUPPORTED_ROPE_TYPES = {"default", "linear", "llama3"}
HUB_NAME = re.compile(r"[\w.-]+/[\w.-]+")  # owner/name, as the Hugging Face hub names models


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool
    eos_token_ids: list[int] = field(default_factory=list)

    @classmethod
    def from_hf(cls, hf) -> "ModelConfig":
        if hf.model_type not in SUPPORTED_ARCHITECTURES:
            raise UserError(f"unsupported architecture {hf.model_type!r}; "
                            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if getattr(hf, "mlp_bias", False):
            raise UserError("unsupported model: mlp_bias=True")
        if getattr(hf, "use_sliding_window", False):
            raise UserError("unsupported model: sliding-window attention")
        rope = _rope_parameters(hf)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise UserError(f"unsupported rope scaling {rope_type!r}; supported: "
                            f"{', '.join(sorted(SUPPORTED_ROPE_TYPES))}")
        eos = hf.eos_token_id
        return cls(
            model_type=hf.model_type,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads or hf.num_attention_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            rms_norm_eps=hf.rms_norm_eps,
            rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
            rope_scaling=None if rope_type == "default" else dict(rope, rope_type=rope_type),
            max_position=hf.max_position_embeddings,
            tie_word_embeddings=bool(hf.tie_word_embeddings),
            attention_bias=hf.model_type == "qwen2" or bool(getattr(hf, "attention_bias", False)),
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )


def _rope_parameters(hf) -> dict:
    # transformers 5 keeps everything under rope_parameters; 4.x used rope_theta + rope_scaling.
    params = getattr(hf, "rope_parameters", None)
    if params:
        return dict(params)
    return dict(getattr(hf, "rope_scaling", None) or {}, rope_theta=getattr(hf, "rope_theta", 10000.0))


def check_model(model: str) -> None:
    """UserError, saying what to pass instead, unless model names a preset, a GGUF file or a
    folder with a config.json. Only looks at names and files: it runs before anything heavy
    loads (torch, transformers, the weights), so a typo fails at once."""
    from semipd.shared.presets import PRESETS
    presets = f"a preset ({', '.join(PRESETS)})"
    if model in PRESETS:
        return
    if is_gguf(model):
        transformers_source(model)  # the file exists
    elif os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise UserError(f"{model}: no config.json (a Hugging Face model folder has one)")
    elif HUB_NAME.fullmatch(model):
        raise UserError(f"{model!r} is not a local folder; it looks like a Hugging Face hub name, and semipd "
                        f"does not download models. Download it first, e.g. `hf download {model} --local-dir "
                        f"DIR` (huggingface-cli download in older huggingface_hub), and pass --model DIR; "
                        f"or pass a GGUF file or {presets}")
    else:
        raise UserError(f"unknown model {model!r}: not a folder, a GGUF file or {presets}")


def load_hf_config(model: str):
    """The transformers config of a model directory, GGUF file or preset name, with clear errors."""
    from semipd.shared.presets import PRESETS
    check_model(model)
    if model in PRESETS:
        return PRESETS[model]()
    if is_gguf(model):
        return _gguf_config(model)
    path = os.path.join(model, "config.json")
    try:
        with open(path) as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable config ({first_line(e)})") from None
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UserError(f"unsupported architecture {model_type!r}; "
                        f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(model)
    except Exception as e:  # transformers raises many kinds for a bad file
        raise UserError(f"{path}: invalid config ({first_line(e)})") from None


def _gguf_config(path: str):
    """The config transformers reads from a GGUF's metadata; its architecture is checked by
    ModelConfig.from_hf, as transformers knows more architectures than the model here."""
    from transformers import AutoConfig
    folder, kwargs = transformers_source(path)
    try:
        return AutoConfig.from_pretrained(folder, **kwargs)
    except Exception as e:  # a corrupt file or an architecture transformers cannot read
        raise UserError(f"{path}: cannot read the GGUF file's config ({first_line(e)})") from None

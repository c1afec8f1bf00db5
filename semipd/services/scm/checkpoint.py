"""The SCM checkpoint layout, shared by training (writes it) and the monitor (reads it).

An SCM checkpoint is a Hugging Face folder: the Qwen2 backbone's config.json, safetensors with
the backbone's tensors under `model.` and the two heads under the names below (the layout of the
released SCM checkpoints), and tokenizer files. The token head is Linear(hidden, 2) with bias,
applied at every position; the response head is Linear(hidden, 2) without bias, applied at the
last response token. Class 1 is "harmful" for both.
"""

import json
import os

import torch

from semipd.shared.errors import UserError, first_line
from semipd.shared.safetensors_checkpoint import SafetensorsCheckpoint

BACKBONE_PREFIX = "model."
TOKEN_HEAD_WEIGHT = "token_classifier.weight"
TOKEN_HEAD_BIAS = "token_classifier.bias"
RESPONSE_HEAD_WEIGHT = "sequence_classifier.weight"
HEAD_NAMES = (TOKEN_HEAD_WEIGHT, TOKEN_HEAD_BIAS, RESPONSE_HEAD_WEIGHT)
NUM_LABELS = 2


def save_checkpoint(out_dir: str, backbone, heads: dict[str, torch.Tensor], config, tokenizer) -> None:
    """Write backbone (a transformers Qwen2Model or its state dict, names without `model.`),
    heads (HEAD_NAMES -> tensors), config (the backbone's transformers config) and tokenizer
    (anything with save_pretrained) to out_dir as one model.safetensors plus config/tokenizer."""
    from safetensors.torch import save_file
    state = backbone if isinstance(backbone, dict) else backbone.state_dict()
    if set(heads) != set(HEAD_NAMES):
        raise ValueError(f"heads must be exactly {HEAD_NAMES}, got {sorted(heads)}")
    # clone: safetensors refuses tensors that share storage, and wants them contiguous.
    tensors = {BACKBONE_PREFIX + k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    tensors |= {k: v.detach().to("cpu").contiguous().clone() for k, v in heads.items()}
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)


def load_heads(path: str) -> dict[str, torch.Tensor]:
    """The three head tensors (HEAD_NAMES) of the SCM checkpoint at path, in the stored dtype;
    UserError if path is not an SCM checkpoint (no Qwen2 config, no heads, wrong shapes)."""
    hidden = _qwen2_hidden_size(path)
    heads = {name: tensor for name, tensor in SafetensorsCheckpoint(path).tensors(lambda n: n in HEAD_NAMES)
             if tensor is not None}
    missing = [n for n in HEAD_NAMES if n not in heads]
    if missing:
        raise UserError(f"{path}: not an SCM checkpoint (no {', '.join(missing)})")
    expected = {TOKEN_HEAD_WEIGHT: [NUM_LABELS, hidden], TOKEN_HEAD_BIAS: [NUM_LABELS],
                RESPONSE_HEAD_WEIGHT: [NUM_LABELS, hidden]}
    for name, shape in expected.items():
        if list(heads[name].shape) != shape:
            raise UserError(f"{path}: {name} has shape {list(heads[name].shape)}, expected {shape}")
    return heads


def _qwen2_hidden_size(path: str) -> int:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise UserError(f"{path}: not an SCM checkpoint (no config.json)")
    try:
        with open(config) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{config}: unreadable config ({first_line(e)})") from None
    if cfg.get("model_type") != "qwen2" or not isinstance(cfg.get("hidden_size"), int):
        raise UserError(f"{path}: not an SCM checkpoint (backbone must be qwen2, "
                        f"config says {cfg.get('model_type')!r})")
    return cfg["hidden_size"]

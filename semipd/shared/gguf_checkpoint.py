"""A GGUF file's weights, dequantized tensor by tensor (through the gguf package) and given the
Hugging Face names and layout, as transformers converts them when it loads a GGUF."""

import re
from collections.abc import Callable, Iterator

import numpy as np
import torch
from gguf import GGUFReader, dequantize

from semipd.shared.config import ModelConfig
from semipd.shared.errors import UserError, first_line

# llama.cpp's tensor names (blk.N.*) -> Hugging Face's, for the Llama and Qwen2 architectures.
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
               "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
MODEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# llama.cpp stores Llama 3's rotary frequencies as a tensor; they are computed from the config,
# and transformers leaves this tensor out too.
SKIPPED = {"rope_freqs.weight"}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFCheckpoint:
    def __init__(self, path: str, cfg: ModelConfig):
        """Opens the file and checks that every tensor's type can be dequantized, so that a bad
        file is reported before any memory is allocated for the model."""
        self.path, self.cfg = path, cfg
        try:
            self.reader = GGUFReader(path)
        except Exception as e:  # the reader reports a corrupt file with several exception types
            raise UserError(f"{path}: corrupt or unreadable GGUF file ({first_line(e)})") from None
        self.num_tensors = len(self.reader.tensors)
        for t in {t.tensor_type: t for t in self.reader.tensors}.values():
            try:
                dequantize(t.data.reshape(-1, t.data.shape[-1])[:1], t.tensor_type)
            except NotImplementedError:
                raise UserError(f"{path}: tensor {t.name} has type {t.tensor_type.name}, "
                                "which the gguf package cannot dequantize") from None

    def tensors(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(Hugging Face name, float32 tensor in Hugging Face's layout) of every tensor; None
        for those not wanted, which are not dequantized."""
        for t in self.reader.tensors:
            name = self.hf_name(t.name)
            if name is None or not wanted(name):
                yield name or t.name, None
                continue
            try:
                weights = dequantize(t.data, t.tensor_type)
            except Exception as e:  # a truncated file fails here, with numpy's exception types
                raise UserError(f"{self.path}: corrupt tensor {t.name} ({first_line(e)})") from None
            if self.cfg.model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
                weights = _unpermute(weights, self.cfg.num_heads)
            elif self.cfg.model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
                weights = _unpermute(weights, self.cfg.num_kv_heads)
            # An F32 tensor comes as a read-only view of the mapped file: torch wants it writable.
            yield name, torch.from_numpy(np.require(weights, requirements=["C", "W"]))

    def hf_name(self, gguf_name: str) -> str | None:
        """The Hugging Face name of a GGUF tensor; None for those the model does without."""
        if gguf_name in SKIPPED:
            return None
        layer = LAYER_TENSOR.fullmatch(gguf_name)
        if layer and layer[2] in LAYER_NAMES:
            return f"model.layers.{layer[1]}.{LAYER_NAMES[layer[2]]}.{layer[3]}"
        stem, _, kind = gguf_name.rpartition(".")
        if stem in MODEL_NAMES:
            return f"{MODEL_NAMES[stem]}.{kind}"
        raise UserError(f"{self.path}: unexpected tensor {gguf_name}")


def _unpermute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Hugging Face's row order of a Llama query or key projection. llama.cpp's rotary embedding
    turns adjacent pairs of a head's dimensions, Hugging Face's the first half against the second,
    so the converter interleaves each head's two halves; this puts them back."""
    half = weights.shape[0] // num_heads // 2
    return weights.reshape(num_heads, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)

"""The streaming content monitor's model: a Qwen2-family backbone (semipd.shared.model.Transformer) and
two small heads on its final hidden states.

- token head: dropout then Linear(hidden, 2) with bias, at every response token; column 1 is
  P(harmful). Dropout is the identity at inference, so the head is one affine map.
- response head: Linear(hidden, 2) without bias, at the last response token.

A checkpoint is a Hugging Face folder: the backbone's config.json, its tensors under `model.` and
the heads under the names in services/scm/checkpoint.py (the layout of the released SCM
checkpoints), plus tokenizer files.
The backbone is built with tied word embeddings whatever the config says: the monitor never
computes LM logits, so its LM head neither costs memory nor has to be in the checkpoint.
Presets (MONITOR_PRESETS) give random weights for tests and benchmarks.
"""

from dataclasses import dataclass, replace

import torch
from transformers import Qwen2Config

from semipd.services.scm.checkpoint import RESPONSE_HEAD_WEIGHT, TOKEN_HEAD_BIAS, TOKEN_HEAD_WEIGHT
from semipd.shared.config import ModelConfig, load_hf_config
from semipd.shared.loader import load_model
from semipd.shared.model import Transformer
from semipd.shared.presets import qwen25_05b
from semipd.shared.tokenizer import load_tokenizer

def scm_tiny() -> Qwen2Config:
    return Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=256, eos_token_id=257)


MONITOR_PRESETS = {"scm-tiny": scm_tiny, "scm-qwen2.5-0.5b": qwen25_05b}


@dataclass
class Monitor:
    backbone: Transformer
    heads: dict[str, torch.Tensor]     # checkpoint tensor name -> float32 tensor
    tokenizer: object
    cfg: ModelConfig

    def token_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(harmful) [T] of each token from its final hidden state [T, hidden], in float32."""
        logits = torch.nn.functional.linear(hidden.float(), self.heads[TOKEN_HEAD_WEIGHT],
                                            self.heads[TOKEN_HEAD_BIAS])
        return logits.softmax(-1)[:, 1]

    def response_score(self, hidden: torch.Tensor) -> torch.Tensor:
        """P(harmful) of a whole response from its last token's hidden state [hidden] (or [B, hidden])."""
        return (hidden.float() @ self.heads[RESPONSE_HEAD_WEIGHT].T).softmax(-1)[..., 1]


def load_monitor(model: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
                 progress: bool = False) -> Monitor:
    """A monitor from a checkpoint folder or a preset name (random weights, byte tokenizer)."""
    hf = MONITOR_PRESETS[model]() if model in MONITOR_PRESETS else load_hf_config(model)
    cfg = replace(ModelConfig.from_hf(hf), tie_word_embeddings=True)
    h = cfg.hidden_size
    heads = {TOKEN_HEAD_WEIGHT: torch.empty(2, h, device=device), TOKEN_HEAD_BIAS: torch.empty(2, device=device),
             RESPONSE_HEAD_WEIGHT: torch.empty(2, h, device=device)}
    backbone = load_model(model, device, dtype, seed, progress, cfg=cfg, extra=heads)
    return Monitor(backbone, heads, load_tokenizer(model), cfg)

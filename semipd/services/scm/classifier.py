"""The SCM as a dense, trainable module (transformers' Qwen2Model plus the two heads) and its loss.

Training needs autograd over dense attention, which the serving runtime (inference-only, paged
KV) does not give, so training and one-pass evaluation use this module. Its parameters are named
`model.*` (the backbone) and `token_classifier.*` / `sequence_classifier.*` (the heads), so its
state dict *is* the checkpoint layout of services/scm/checkpoint.py.

Loss: w_tok * token CE (response tokens only) + w_resp * response CE (response head at the last
token) + w_logic * mean(-log(1 - c_resp + c_resp * max_i c_tok_i)), with c = P(harmful).
"""

import random

import torch
from torch import nn

from semipd.services.scm import checkpoint
from semipd.services.scm.fineharm import IGNORE, Example
from semipd.shared.errors import UserError, first_line


class ScmClassifier(nn.Module):
    """The SCM as one dense forward pass: token logits at every position, response logits at
    each sequence's last token."""

    def __init__(self, backbone):
        super().__init__()
        hidden = backbone.config.hidden_size
        self.model = backbone
        self.dropout = nn.Dropout(0.1)
        self.token_classifier = nn.Linear(hidden, checkpoint.NUM_LABELS)
        self.sequence_classifier = nn.Linear(hidden, checkpoint.NUM_LABELS, bias=False)

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        token_logits = self.token_classifier(self.dropout(hidden))
        last = attention_mask.sum(1) - 1  # right padding: the last real token
        response_logits = self.sequence_classifier(hidden[torch.arange(len(last)), last])
        return token_logits, response_logits

    def heads(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k in checkpoint.HEAD_NAMES}

    @classmethod
    def load(cls, path: str, device="cpu") -> "ScmClassifier":
        """An SCM checkpoint folder, in float32 (scores are compared in float32)."""
        heads = checkpoint.load_heads(path)  # validates the folder first
        net = cls(load_backbone(path))
        net.load_state_dict(heads, strict=False)  # strict=False: the backbone is already loaded
        return net.to(device).eval()


def load_backbone(path: str):
    from transformers import Qwen2Model
    from transformers.utils import logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    # Quiet: a causal-LM base has an lm_head and an SCM checkpoint has heads, both unused here.
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        return Qwen2Model.from_pretrained(path, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds for a bad folder
        raise UserError(f"{path}: cannot load the Qwen2 backbone ({first_line(e)})") from None
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def load_tokenizer(path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # missing or broken files raise assorted exception types
        raise UserError(f"{path}: cannot load tokenizer ({first_line(e)})") from None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU here")
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available() else
                        "cpu" if name == "auto" else name)


def logic_loss(token_probs: torch.Tensor, token_mask: torch.Tensor, response_probs: torch.Tensor):
    """Mean of -log(1 - c_resp + c_resp * max_i c_tok_i) over the batch: a response judged
    harmful must have a token judged harmful. token_probs/mask [B, T], response_probs [B]."""
    max_tok = token_probs.masked_fill(~token_mask, 0.0).amax(1)
    return -torch.log((1 - response_probs * (1 - max_tok)).clamp_min(1e-6)).mean()


def batches(examples: list[Example], size: int, device, rng: random.Random | None = None):
    """(input_ids, attention_mask, token_labels, response_labels) batches, right-padded;
    shuffled when rng is given."""
    order = list(range(len(examples)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), size):
        chunk = [examples[j] for j in order[i:i + size]]
        width = max(len(e.input_ids) for e in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
        for row, e in enumerate(chunk):
            n = len(e.input_ids)
            ids[row, :n], mask[row, :n] = torch.tensor(e.input_ids), 1
            labels[row, :n] = torch.tensor(e.token_labels)
        yield (ids.to(device), mask.to(device), labels.to(device),
               torch.tensor([e.label for e in chunk], device=device))


def scm_loss(net: ScmClassifier, batch, token_weight: float, response_weight: float,
             logic_weight: float) -> torch.Tensor:
    ids, mask, labels, response_labels = batch
    token_logits, response_logits = net(ids, mask)
    token_ce = nn.functional.cross_entropy(token_logits.flatten(0, 1), labels.flatten(),
                                           ignore_index=IGNORE)
    response_ce = nn.functional.cross_entropy(response_logits, response_labels)
    loss = token_weight * token_ce + response_weight * response_ce
    if logic_weight:
        c_tok = token_logits.softmax(-1)[..., 1]
        c_resp = response_logits.softmax(-1)[:, 1]
        loss = loss + logic_weight * logic_loss(c_tok, labels != IGNORE, c_resp)
    return loss



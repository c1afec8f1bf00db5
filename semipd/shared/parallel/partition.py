"""The part of a model that one tensor-parallel rank holds, and how each of its weights is cut
from the full tensor of a checkpoint (or of a preset's random weights).

Megatron's split, as vLLM and SGLang shard Llama and Qwen2:
- attention: rank r holds query heads [r * H / N, (r + 1) * H / N) and the KV heads they read.
  With at least as many KV heads as ranks those are split evenly too; with fewer, every rank
  holds the one KV head of its query heads (replicated on N / KV ranks), so a GQA group never
  spans two ranks and attention needs no communication. The KV pool of a rank holds its KV heads
  only; a page id means the same tokens on every rank.
- MLP: the intermediate dimension split evenly.
- vocabulary: the embedding's and the LM head's rows split evenly.
Column-parallel weights (qkv_proj, gate_up_proj, the embedding, the LM head) are cut by rows,
row-parallel ones (o_proj, down_proj) by columns; norms, and tensors outside the Transformer,
are held whole. Sizes that do not divide are refused: padding a vocabulary or replicating query
heads costs memory and code for models that real sizes (8, 4, 2) divide.
"""

from dataclasses import dataclass

import torch

from semipd.shared.config import ModelConfig
from semipd.shared.errors import UserError


@dataclass(frozen=True)
class Span:
    """The rank's part [start, start + size) of a dimension of `full` elements."""
    full: int
    start: int
    size: int

    def scaled(self, by: int) -> "Span":
        """The same part in units `by` times smaller (heads -> rows of head_dim each)."""
        return Span(self.full * by, self.start * by, self.size * by)


def _even(full: int, rank: int, size: int, what: str) -> Span:
    if full % size:
        raise UserError(f"tensor-parallel size {size} does not divide the model's {full} {what}")
    return Span(full, rank * (full // size), full // size)


@dataclass(frozen=True)
class Partition:
    """One rank's spans of the model's dimensions; a function of the config, rank and size
    alone, so a process outside the group (the controller) knows every rank's shapes."""
    heads: Span          # query heads
    kv_heads: Span
    intermediate: Span   # the MLP's columns
    vocab: Span
    head_dim: int

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int, size: int) -> "Partition":
        """Rank `rank` of `size`'s part; UserError where the model does not split in `size`."""
        heads = _even(cfg.num_heads, rank, size, "attention heads")
        if cfg.num_kv_heads >= size:
            kv_heads = _even(cfg.num_kv_heads, rank, size, "KV heads")
        elif size % cfg.num_kv_heads:
            raise UserError(f"tensor-parallel size {size} is neither a divisor nor a multiple of the "
                            f"model's {cfg.num_kv_heads} KV heads")
        else:
            kv_heads = Span(cfg.num_kv_heads, rank // (size // cfg.num_kv_heads), 1)
        return cls(heads, kv_heads, _even(cfg.intermediate_size, rank, size, "MLP columns"),
                   _even(cfg.vocab_size, rank, size, "vocabulary entries"), cfg.head_dim)

    def split(self, name: str) -> tuple[int, list[Span]] | None:
        """How parameter `name` (the Transformer's name) is cut: the dimension, and the rank's
        span of each block fused along it (qkv_proj: q, k, v; gate_up_proj: gate, up); None
        where every rank holds it whole."""
        q, kv = self.heads.scaled(self.head_dim), self.kv_heads.scaled(self.head_dim)
        if name.endswith((".qkv_proj.weight", ".qkv_proj.bias")):
            return 0, [q, kv, kv]
        if name.endswith(".o_proj.weight"):
            return 1, [q]
        if name.endswith(".gate_up_proj.weight"):
            return 0, [self.intermediate] * 2
        if name.endswith(".down_proj.weight"):
            return 1, [self.intermediate]
        if name in ("embed_tokens.weight", "lm_head.weight"):
            return 0, [self.vocab]
        return None

    def full_shape(self, name: str, shape: torch.Size, block: int | None = None) -> list[int]:
        """The whole shape of parameter `name`, or of its block `block` as a checkpoint stores it
        (a q_proj, a k_proj: block 0, 1 of qkv_proj), of which `shape` is the rank's part."""
        split = self.split(name)
        if split is None:
            return list(shape)
        dim, spans = split
        whole = sum(s.full for s in spans) if block is None else spans[block].full
        return [whole if d == dim else n for d, n in enumerate(shape)]

    def take(self, name: str, full: torch.Tensor) -> torch.Tensor:
        """The rank's part of the whole (fused) tensor of parameter `name`."""
        split = self.split(name)
        if split is None:
            return full
        dim, spans = split
        blocks = full.split([s.full for s in spans], dim)
        return torch.cat([b.narrow(dim, s.start, s.size) for b, s in zip(blocks, spans)], dim)

    def take_block(self, name: str, block: int, tensor: torch.Tensor) -> torch.Tensor:
        """The rank's part of block `block` of parameter `name` (0 where nothing is fused), whole
        as a checkpoint stores it; a view."""
        split = self.split(name)
        if split is None:
            return tensor
        dim, spans = split
        return tensor.narrow(dim, spans[block].start, spans[block].size)

"""The layers of a tensor-parallel model whose output needs the other ranks. A column-parallel
linear (qkv_proj, gate_up_proj) needs none: it is a plain nn.Linear over the rank's rows, whose
output stays split by heads or MLP columns until the row-parallel layer after it. At size 1
every layer here does exactly what its torch base class does."""

import torch
from torch import nn
from torch.nn import functional as F

from semipd.shared.parallel.group import TPGroup
from semipd.shared.parallel.partition import Span


class RowParallelLinear(nn.Linear):
    """o_proj and down_proj: the rank's columns of the weight times its part of the input,
    summed over the ranks. No bias: the models here have none on these layers."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup):
        super().__init__(in_features, out_features, bias=False)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class VocabParallelEmbedding(nn.Embedding):
    """The rank's rows of the embedding: each rank looks up the ids in its vocabulary span, zeros
    for the rest, and the sum over the ranks is every id's row (exactly: one rank adds it to zeros)."""

    def __init__(self, vocab: Span, dim: int, tp: TPGroup):
        super().__init__(vocab.size, dim)
        self.start, self.tp = vocab.start, tp

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(x.masked_fill(outside.unsqueeze(-1), 0.0))


class ParallelLMHead(nn.Linear):
    """The rank's rows of the LM head: the logits of its vocabulary span, gathered from every
    rank, so that each rank holds all the logits and samples as one GPU would."""

    def __init__(self, dim: int, vocab: Span, tp: TPGroup):
        super().__init__(dim, vocab.size, bias=False)
        self.tp = tp

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.tp.all_gather(super().forward(hidden))

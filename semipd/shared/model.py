"""Decoder-only transformer of the Llama and Qwen2 families over a paged KV cache.

Tokens of all sequences in a step are packed into one flat batch [T]; a Batch says where each
token's K/V goes (slot_mapping) and which cached tokens each query may see.

Built for a tensor-parallel group (shared/parallel/), a model holds its rank's part: its query
and KV heads, its MLP columns and vocabulary rows (parallel/partition.py), and its KV cache
holds its KV heads. Its forward pass gives every rank the same hidden states and logits.
"""

from dataclasses import dataclass

import torch
from torch import nn

from semipd.shared.attention import decode_attention, prefill_attention, store_kv
from semipd.shared.config import ModelConfig
from semipd.shared.ops import add_rms_norm, silu_and_mul
from semipd.shared.parallel.group import TPGroup
from semipd.shared.parallel.layers import ParallelLMHead, RowParallelLinear, VocabParallelEmbedding
from semipd.shared.parallel.partition import Partition
from semipd.shared.rope import RotaryEmbedding


@dataclass
class Batch:
    """Attention metadata of one forward pass (all tensors on the model's device)."""
    is_prefill: bool
    slot_mapping: torch.Tensor      # [T] cache slot of each new token, -1 to skip
    kv_lens: torch.Tensor           # [B] cached tokens per sequence, this step's included
    block_tables: torch.Tensor      # [B, max_pages]
    cu_seqlens_q: torch.Tensor | None = None  # [B+1], prefill only
    max_q_len: int = 1


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None):
        """(norm(x + residual), x + residual); residual None (the first layer) adds nothing."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    """The rank's heads: qkv_proj is column-parallel (its rows of q, k and v), o_proj row-parallel."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, part: Partition, tp: TPGroup):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = part.heads.size, part.kv_heads.size, cfg.head_dim
        self.q_size, self.kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = RowParallelLinear(self.q_size, cfg.hidden_size, tp)
        self.rope = rope
        self.k_cache = self.v_cache = None  # bound to this layer's slice of the KV pool

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: Batch) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, k = self.rope(positions, q, k)
        store_kv(k, v, self.k_cache, self.v_cache, batch.slot_mapping)
        if batch.is_prefill:
            o = prefill_attention(q, self.k_cache, self.v_cache, batch.cu_seqlens_q, batch.kv_lens,
                                  batch.block_tables, self.scale, batch.max_q_len)
        else:
            o = decode_attention(q, self.k_cache, self.v_cache, batch.kv_lens, batch.block_tables,
                                 self.scale)
        return self.o_proj(o.flatten(1))


class MLP(nn.Module):
    """The rank's MLP columns: gate_up_proj is column-parallel, down_proj row-parallel."""

    def __init__(self, cfg: ModelConfig, part: Partition, tp: TPGroup):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * part.intermediate.size, bias=False)
        self.down_proj = RowParallelLinear(part.intermediate.size, cfg.hidden_size, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, part: Partition, tp: TPGroup):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, rope, part, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, part, tp)

    def forward(self, positions, x, residual, batch):
        """The residual stream travels beside the sublayer output, so each norm fuses the add
        before it: returns (mlp output, residual), which the next norm sums."""
        x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, batch)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPGroup = TPGroup()):
        """Rank tp.rank's part of the model (the whole model at the default size 1)."""
        super().__init__()
        self.cfg = cfg
        self.partition = part = Partition.of(cfg, tp.rank, tp.size)
        rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
        self.embed_tokens = VocabParallelEmbedding(part.vocab, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rope, part, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(cfg.hidden_size, part.vocab, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def bind_kv_cache(self, k_pool: torch.Tensor, v_pool: torch.Tensor) -> None:
        for i, layer in enumerate(self.layers):
            layer.self_attn.k_cache, layer.self_attn.v_cache = k_pool[i], v_pool[i]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Final hidden states [T, hidden] of every token."""
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, batch)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] over the whole vocabulary, on every rank."""
        return self.lm_head(hidden).float()

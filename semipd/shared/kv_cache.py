"""The paged KV pool: one K and one V tensor [layers, pages, page_size, kv_heads, head_dim].

Each is a single plain allocation, so another process can map it whole (a CUDA IPC handle, or a
shared-memory segment on the CPU). Which pages belong to whom is the PageAllocator's business.
With tensor parallelism each rank has a pool of its KV heads (parallel/partition.py), all with
the same pages, so one allocator's page ids serve every rank.
"""

import torch

from semipd.shared.config import ModelConfig
from semipd.shared.errors import UserError
from semipd.shared.parallel.partition import Partition
from semipd.shared.prefill_graphs import MAX_GRAPH_TOKENS

GIB = 1 << 30


def rank_kv_heads(cfg: ModelConfig, tp_size: int) -> int:
    """KV heads in each rank's pool at tensor-parallel size tp_size (the same on every rank)."""
    return Partition.of(cfg, 0, tp_size).kv_heads.size


def page_bytes(cfg: ModelConfig, page_size: int, dtype: torch.dtype, tp_size: int = 1) -> int:
    """Bytes of K plus V for one page across all layers, in one rank's pool."""
    return 2 * cfg.num_layers * page_size * rank_kv_heads(cfg, tp_size) * cfg.head_dim * dtype.itemsize


def pages_for(num_tokens: int, page_size: int) -> int:
    return (num_tokens + page_size - 1) // page_size


def auto_num_pages(cfg: ModelConfig, page_size: int, dtype: torch.dtype, device: torch.device,
                   max_batched_tokens: int, max_num_seqs: int, max_model_len: int, tp_size: int = 1) -> int:
    """Pages that fit (in one rank's pool), but no more than max_num_seqs full-length sequences
    need. On CUDA the budget is 90% of the memory left after the weights, less room for
    activations and logits; on the CPU, 1 GiB."""
    per_page = page_bytes(cfg, page_size, dtype, tp_size)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # memory torch cached but does not use counts as free
        free, total = torch.cuda.mem_get_info(device)
        # eager steps, plus the prefill graphs' pool (shared/prefill_graphs.py)
        tokens = max_batched_tokens + min(max_batched_tokens, MAX_GRAPH_TOKENS)
        activations = tokens * (2 * cfg.intermediate_size + 4 * cfg.hidden_size) * dtype.itemsize
        logits = 2 * max_num_seqs * cfg.vocab_size * 4
        budget = free - 0.1 * total - activations - logits - GIB
    else:
        budget = GIB
    pages = min(int(budget // per_page), max_num_seqs * pages_for(max_model_len, page_size))
    if pages < pages_for(max_model_len, page_size):
        raise UserError(f"room for only {max(pages, 0)} KV pages of {per_page} bytes on {device}; "
                        f"one full-length sequence needs {pages_for(max_model_len, page_size)}")
    return pages


def allocate_kv_pool(cfg: ModelConfig, num_pages: int, page_size: int, dtype: torch.dtype,
                     device: torch.device, tp_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V pools of one rank (of tp_size) holding num_pages pages."""
    shape = (cfg.num_layers, num_pages, page_size, rank_kv_heads(cfg, tp_size), cfg.head_dim)
    return torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device)

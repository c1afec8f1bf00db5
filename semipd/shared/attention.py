"""Paged attention: the three operations the model needs, on any device.

Layout (one layer's view of the pool, see kv_cache.py):
    k_cache, v_cache: [num_pages, page_size, num_kv_heads, head_dim]
A token's slot is page * page_size + offset; block_tables[b, i] is the i-th page of sequence b.

On CUDA the Triton kernels in kernels/triton_attention.py run; elsewhere the plain torch code
below runs. Both compute the same function and are tested against a float64 reference.
"""

import torch
import torch.nn.functional as F


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Write k, v [N, Hkv, D] into the cache at slot_mapping [N]; a slot of -1 is skipped."""
    if k.is_cuda:
        from semipd.shared.kernels.triton_attention import store_kv as triton_store_kv
        return triton_store_kv(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      cu_seqlens_q: torch.Tensor, kv_lens: torch.Tensor, block_tables: torch.Tensor,
                      scale: float, max_q_len: int) -> torch.Tensor:
    """Causal attention for a ragged batch of query chunks whose K/V are already in the cache.

    q: [Tq, Hq, D] holds each sequence's new tokens back to back (cu_seqlens_q [B+1]).
    kv_lens [B] counts each sequence's cached tokens including this chunk, so the chunk's tokens
    sit at positions kv_len - q_len .. kv_len - 1 and attend to everything before them.
    """
    if q.is_cuda:
        from semipd.shared.kernels.triton_attention import prefill_attention as triton_prefill
        return triton_prefill(q, k_cache, v_cache, cu_seqlens_q, kv_lens, block_tables, scale, max_q_len)
    out = torch.empty_like(q)
    starts, lens = cu_seqlens_q.tolist(), kv_lens.tolist()
    for b, kv_len in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        k, v = _gather(k_cache, v_cache, block_tables[b], kv_len, q.shape[1])
        q_pos = torch.arange(kv_len - (q_end - q_start), kv_len, device=q.device)
        mask = torch.arange(kv_len, device=q.device)[None, :] <= q_pos[:, None]
        out[q_start:q_end] = F.scaled_dot_product_attention(
            q[q_start:q_end].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, scale=scale).transpose(0, 1)
    return out


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     kv_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence, q [B, Hq, D], over its kv_lens[b] cached tokens.
    A row with kv_len 0 (CUDA-graph padding) gives zeros."""
    if q.is_cuda:
        from semipd.shared.kernels.triton_attention import decode_attention as triton_decode
        return triton_decode(q, k_cache, v_cache, kv_lens, block_tables, scale)
    page_size = k_cache.shape[1]
    max_len = max(int(kv_lens.max()), 1)
    pos = torch.arange(max_len, device=q.device)
    pages = block_tables[:, pos // page_size].long()
    slots = pages * page_size + pos % page_size                       # [B, L]
    group = q.shape[1] // k_cache.shape[2]
    k = k_cache.view(-1, *k_cache.shape[2:])[slots].repeat_interleave(group, dim=2)  # [B, L, Hq, D]
    v = v_cache.view(-1, *v_cache.shape[2:])[slots].repeat_interleave(group, dim=2)
    valid = pos[None, :] < kv_lens[:, None]                            # [B, L]
    scores = torch.einsum("bhd,blhd->bhl", q.float(), k.float()) * scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)             # empty rows -> zeros
    v = v.float().masked_fill(~valid[:, :, None, None], 0.0)           # unwritten slots may hold NaN
    return torch.einsum("bhl,blhd->bhd", probs, v).to(q.dtype)


def _gather(k_cache, v_cache, block_table, kv_len, num_q_heads):
    """The first kv_len cached tokens of one sequence, with KV heads repeated for GQA."""
    page_size = k_cache.shape[1]
    pages = block_table[: (kv_len + page_size - 1) // page_size].long()
    k = k_cache[pages].flatten(0, 1)[:kv_len]
    v = v_cache[pages].flatten(0, 1)[:kv_len]
    group = num_q_heads // k.shape[1]
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)

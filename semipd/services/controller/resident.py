"""The controller's resident memory: weights, KV pool and page allocator, allocated once and
held for the controller's whole life, so that workers can die or be replaced without reloading.

With tensor parallelism of size N it holds one shard per rank: a weights arena (the layout of
rank r's model) and K and V arenas of rank r's KV heads, on GPU r on CUDA (in POSIX shared memory
on the CPU). The page allocator stays one: a page id names the same tokens on every rank."""

from dataclasses import dataclass

import torch

from semipd.shared import protocol
from semipd.shared.config import ModelConfig, load_hf_config
from semipd.shared.engine_config import EngineConfig
from semipd.shared.errors import UserError
from semipd.shared.kv_cache import auto_num_pages, page_bytes, rank_kv_heads
from semipd.shared.loader import build_model, load_ranks, weight_layout
from semipd.shared.page_allocator import PageAllocator
from semipd.shared.parallel.group import TPGroup
from semipd.shared.shared_memory import SharedArena
from semipd.shared.tokenizer import load_tokenizer


@dataclass
class Shard:
    """One rank's resident memory."""
    device: torch.device
    weights: SharedArena
    k_pool: SharedArena
    v_pool: SharedArena


class ResidentMemory:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        size = config.tp_size
        if self.device.type == "cuda" and torch.cuda.device_count() < size:
            raise UserError(f"tensor-parallel size {size} needs {size} GPUs, {torch.cuda.device_count()} found")
        cfg = self.model_config = ModelConfig.from_hf(load_hf_config(config.model))
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        self._owned = []  # released in close(), also when construction fails half-way
        self.shards: list[Shard] = []
        try:
            self.tokenizer = load_tokenizer(config.model)
            devices = [torch.device("cuda", r) if self.device.type == "cuda" else self.device for r in range(size)]
            weights = [self._own(SharedArena.create(self._weight_bytes(r), d)) for r, d in enumerate(devices)]
            load_ranks(config.model, devices, self.dtype, weights, config.seed, config.progress)
            # Sized once the weights are in place: what the fullest GPU has left.
            self.num_pages = config.num_pages or min(auto_num_pages(
                cfg, config.page_size, self.dtype, d, config.max_batched_tokens,
                config.max_num_seqs, self.max_model_len, size) for d in devices)
            self.kv_shape = [cfg.num_layers, self.num_pages, config.page_size, rank_kv_heads(cfg, size), cfg.head_dim]
            half = page_bytes(cfg, config.page_size, self.dtype, size) // 2 * self.num_pages
            self.shards = [Shard(d, w, self._own(SharedArena.create(half, d)), self._own(SharedArena.create(half, d)))
                           for d, w in zip(devices, weights)]
            self.allocator = self._own(PageAllocator.create(self.num_pages, config.page_size, config.prefix_cache))
        except BaseException:
            self.close()
            raise

    def _weight_bytes(self, rank: int) -> int:
        """The size of rank `rank`'s weights arena: the layout of its part of the model."""
        tp = TPGroup(rank, self.config.tp_size)
        return weight_layout(build_model(self.model_config, torch.device("meta"), self.dtype, tp=tp))[1]

    def _own(self, resource):
        self._owned.append(resource)
        return resource

    def worker_init(self, rank: int = 0) -> protocol.WorkerInit:
        """Rank `rank`'s WorkerInit, with no rendezvous yet (each group of a role gets its own)."""
        c, shard = self.config, self.shards[rank]
        return protocol.WorkerInit(
            model=c.model, device=str(shard.device), dtype=str(self.dtype).removeprefix("torch."),
            weights=shard.weights.handle, k_pool=shard.k_pool.handle, v_pool=shard.v_pool.handle,
            kv_shape=self.kv_shape, allocator=self.allocator.name, page_size=c.page_size,
            max_model_len=self.max_model_len, max_num_seqs=c.max_num_seqs,
            # graphs that capture the ranks' NCCL collectives are not built yet: eager at size > 1
            max_batched_tokens=c.max_batched_tokens, cuda_graphs=c.cuda_graphs and c.tp_size == 1,
            tp_rank=rank, tp_size=c.tp_size)

    def close(self) -> None:
        while self._owned:
            self._owned.pop().close()

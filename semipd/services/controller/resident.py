"""The controller's resident memory: weights, KV pool and page allocator, allocated once and
held for the controller's whole life, so that workers can die or be replaced without reloading."""

import torch

from semipd.shared import protocol
from semipd.shared.config import ModelConfig, load_hf_config
from semipd.shared.engine_config import EngineConfig
from semipd.shared.kv_cache import auto_num_pages, page_bytes
from semipd.shared.loader import build_model, load_model, weight_layout
from semipd.shared.page_allocator import PageAllocator
from semipd.shared.shared_memory import SharedArena
from semipd.shared.tokenizer import load_tokenizer


class ResidentMemory:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = config.torch_device()
        self.dtype = config.torch_dtype(self.device)
        cfg = self.model_config = ModelConfig.from_hf(load_hf_config(config.model))
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        _, nbytes = weight_layout(build_model(cfg, torch.device("meta"), self.dtype))
        self._owned = []  # released in close(), also when construction fails half-way
        try:
            self.weights = self._own(SharedArena.create(nbytes, self.device))
            load_model(config.model, self.device, self.dtype, config.seed, config.progress, arena=self.weights)
            self.tokenizer = load_tokenizer(config.model)
            self.num_pages = config.num_pages or auto_num_pages(
                cfg, config.page_size, self.dtype, self.device, config.max_batched_tokens,
                config.max_num_seqs, self.max_model_len)
            self.kv_shape = [cfg.num_layers, self.num_pages, config.page_size, cfg.num_kv_heads, cfg.head_dim]
            half = page_bytes(cfg, config.page_size, self.dtype) // 2 * self.num_pages
            self.k_pool = self._own(SharedArena.create(half, self.device))
            self.v_pool = self._own(SharedArena.create(half, self.device))
            self.allocator = self._own(PageAllocator.create(self.num_pages, config.page_size, config.prefix_cache))
        except BaseException:
            self.close()
            raise
        self.weight_bytes = nbytes

    def _own(self, resource):
        self._owned.append(resource)
        return resource

    def worker_init(self) -> protocol.WorkerInit:
        c = self.config
        return protocol.WorkerInit(
            model=c.model, device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            weights=self.weights.handle, k_pool=self.k_pool.handle, v_pool=self.v_pool.handle,
            kv_shape=self.kv_shape, allocator=self.allocator.name, page_size=c.page_size,
            max_model_len=self.max_model_len, max_num_seqs=c.max_num_seqs,
            max_batched_tokens=c.max_batched_tokens, cuda_graphs=c.cuda_graphs)

    def close(self) -> None:
        while self._owned:
            self._owned.pop().close()

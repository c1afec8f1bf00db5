"""Prefill steps replayed as CUDA graphs, one per token-count bucket.

Below a couple of thousand tokens a prefill step costs the host more than the GPU: about ten
launches a layer, each a Python call (docs/benchmarks.md, the prefill profile). A graph issues
them all in one launch. A step is padded up to the next bucket; its inputs go into static buffers
in the packed layout of shared/prefill_inputs.py, with room for `max_rows` sequences, so that the
attention kernel's grid depends on the bucket alone. Padding tokens belong to no sequence: they
store no K/V, attention leaves their rows alone, and every other op works row by row, so they
never touch a real token. Larger steps run eagerly, where the GPU, not the host, sets the pace.
"""

import torch

from semipd.shared.model import Batch, Transformer
from semipd.shared.prefill_inputs import InputLayout, PrefillInputs

MAX_GRAPH_TOKENS = 2048


def token_buckets(max_tokens: int) -> list[int]:
    """Powers of two to 256, then steps of 128 to 1024 and of 256 to MAX_GRAPH_TOKENS: padding
    stays under a quarter of a step past 256 tokens, where it starts to cost GPU time."""
    limit = min(max_tokens, MAX_GRAPH_TOKENS)
    sizes = [16, 32, 64, 128, 256, *range(384, 1025, 128), *range(1280, MAX_GRAPH_TOKENS + 1, 256)]
    return [s for s in sizes if s <= limit]


class PrefillGraphs:
    def __init__(self, model: Transformer, buckets: list[int], max_rows: int, max_pages: int):
        device = model.embed_tokens.weight.device
        self.model, self.buckets = model, sorted(buckets)
        self.layout = InputLayout(self.buckets[-1], max_rows)
        self.buffer = self.layout.pack([], 1, [], pin=False).to(device)  # all padding
        self.inputs: PrefillInputs = self.layout.views(self.buffer)
        self.block_tables = torch.zeros(max_rows, max_pages, dtype=torch.int32, device=device)
        self.out = torch.empty(self.buckets[-1], model.cfg.hidden_size,
                               dtype=model.embed_tokens.weight.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def bucket(self, num_tokens: int, num_rows: int) -> int | None:
        """The bucket a step of this size replays, None if it runs eagerly."""
        if num_rows > self.layout.rows:
            return None
        return next((b for b in self.buckets if b >= num_tokens), None)

    def upload(self, host: torch.Tensor, block_tables: torch.Tensor) -> PrefillInputs:
        """Copy a step's packed inputs (self.layout) and its block tables [B, W] in."""
        self.buffer.copy_(host, non_blocking=True)
        rows, width = block_tables.shape
        self.block_tables[:rows, :width].copy_(block_tables, non_blocking=True)
        return self.inputs

    def replay(self, bucket: int, num_tokens: int) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden] of the step uploaded last: a view of a static
        buffer, which the next replay overwrites."""
        self.graphs[bucket].replay()
        return self.out[:num_tokens]

    @torch.inference_mode()
    def capture(self, pool=None):
        """Capture every bucket, largest first, into one memory pool (shared with the decode
        graphs when given: one graph runs at a time). Returns the pool."""
        inp = self.inputs
        for size in reversed(self.buckets):
            batch = Batch(True, inp.slots[:size], inp.kv_lens, self.block_tables, inp.cu_seqlens, size)
            run = lambda: self.out[:size].copy_(self.model(inp.ids[:size], inp.positions[:size], batch))  # noqa: E731
            run()  # warm-up outside capture: cuBLAS picks its kernels for this shape
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                run()
            pool = graph.pool()
            self.graphs[size] = graph
            graph.replay()  # a graph's first launch uploads it
        return pool

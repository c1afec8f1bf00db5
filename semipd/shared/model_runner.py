"""Turns scheduled sequences into tensors, runs the model, samples.

A decode step returns the runner's head applied to the final hidden states: LM logits for the
served model, P(harmful) per token for a content monitor. On CUDA it replays CUDA graphs (head
included) captured for a ladder of batch sizes; a batch is padded up to the next captured size
with rows that write nowhere (slot -1) and attend to nothing (kv_len 0). Prefill steps (prompt
chunks, and unified's mixed steps) replay graphs captured per token-count bucket where one fits
(shared/prefill_graphs.py) and run eagerly where none does; either way their inputs reach the
device in one packed copy (shared/prefill_inputs.py).

On CUDA a new runner also runs the prefill, sampling and feed paths once on throwaway input and
launches each graph once, so that a worker called up by an SM switch does not pay for kernel
loading (CUDA loads a module when a kernel in it first runs), graph uploads and Triton's
first-launch work inside the switch (benchmarks/bench_first_step.py measures what is left).
"""

import itertools
import time
from typing import Callable

import torch

from semipd.shared.model import Batch, Transformer
from semipd.shared.prefill_graphs import PrefillGraphs, token_buckets
from semipd.shared.prefill_inputs import InputLayout, apply_feed, feed_rows, fill_in_flight
from semipd.shared.sampling import sample
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.sequence import Sequence

WARM_UP_SAMPLING = (SamplingParams(temperature=0.0), SamplingParams(temperature=1.0),
                    SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05))


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
    return sorted({min(s, max_num_seqs) for s in sizes})


class ModelRunner:
    def __init__(self, model: Transformer, page_size: int, max_model_len: int, max_num_seqs: int,
                 cuda_graphs: bool = True, head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 prefill_graph_tokens: int = 0):
        """cuda_graphs: capture decode steps; prefill_graph_tokens: capture prefill steps of up to
        this many tokens (shared/prefill_graphs.py), 0 for none. Both only on CUDA."""
        self.model = model
        self.head = head or model.compute_logits
        self.device = model.embed_tokens.weight.device
        self.page_size = page_size
        self.max_pages_per_seq = (max_model_len + page_size - 1) // page_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.prefill_graphs: PrefillGraphs | None = None
        # CUDA event pairs (a forward pass's start, its sampler's end) while a StepTimer reads
        # them; None: not timed, and no events are made (generate, benchmarks, the monitor)
        self.gpu_spans: list[tuple] | None = None
        self._forward_started = None
        self.setup_s: dict[str, float] = {}  # how long the warm-up and the graph capture took
        if self.device.type == "cuda":
            self._timed("warm_up", self._warm_up)
            pool = None
            if cuda_graphs:
                self._timed("cuda_graphs", lambda: self._capture(graph_batch_sizes(max_num_seqs)))
                pool = self.graph_pool
            if prefill_graph_tokens:
                self.prefill_graphs = PrefillGraphs(model, token_buckets(prefill_graph_tokens), max_num_seqs,
                                                    self.max_pages_per_seq)
                self._timed("prefill_graphs", lambda: self.prefill_graphs.capture(pool))

    def _timed(self, part: str, work: Callable[[], None]) -> None:
        began = time.perf_counter()
        work()
        self.wait()
        self.setup_s[part] = time.perf_counter() - began

    def wait(self) -> None:
        """Wait for every kernel this process has queued (on the CPU there is nothing to wait for)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _tensor(self, data, dtype=torch.int32) -> torch.Tensor:
        pinned = torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda")
        return pinned.to(self.device, non_blocking=True)

    def _block_tables(self, seqs: list[Sequence], width: int | None = None) -> torch.Tensor:
        """[B, width (default: the longest table)], zero-padded. Filled row by row in numpy:
        nested Python lists cost far more at decode batch sizes and full graph width."""
        host = torch.zeros(len(seqs), width or max(len(s.block_table) for s in seqs), dtype=torch.int32,
                           pin_memory=self.device.type == "cuda")
        table = host.numpy()  # a view: rows filled here are in the (pinned) tensor
        for row, s in zip(table, seqs):
            row[:len(s.block_table)] = s.block_table
        return host.to(self.device, non_blocking=True)

    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // self.page_size] * self.page_size + pos % self.page_size

    def _input_ids(self, ids: list[int], feed) -> torch.Tensor:
        """Token ids on the device. A token in flight stands as 0 in `ids` and comes from `feed`:
        (a step's sampled tokens on the device, and for each of the first ids its row there, -1
        where the id is known)."""
        out = self._tensor(ids, torch.int64)
        if feed is not None:
            fill_in_flight(out, feed[0], self._tensor(feed[1], torch.int64))
        return out

    @torch.inference_mode()
    def prefill_logits(self, chunks: list[tuple[Sequence, int]], feed=None) -> torch.Tensor:
        """Compute the chunks' K/V; logits [B, V] at each chunk's last token. A decode row is a
        chunk of one token (its newest, which may be in flight: see _input_ids)."""
        hidden, cu_seqlens = self._prefill(chunks, feed)
        return self.model.compute_logits(hidden[cu_seqlens[1:len(chunks) + 1] - 1])

    @torch.inference_mode()
    def prefill_hidden(self, chunks: list[tuple[Sequence, int]], feed=None) -> torch.Tensor:
        """Compute the chunks' K/V; final hidden states [T, hidden] of every chunk token, the
        chunks back to back (a content monitor scores each of them). Consume them before the
        next step: a replayed graph's output is a static buffer."""
        return self._prefill(chunks, feed)[0]

    def _prefill(self, chunks: list[tuple[Sequence, int]], feed) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, cu_seqlens on the device): replayed as a CUDA graph where a bucket
        fits the step, else eagerly at its exact size."""
        num_tokens, pin = sum(n for _, n in chunks), self.device.type == "cuda"
        tables = self._block_tables([s for s, _ in chunks])
        graphs = self.prefill_graphs
        bucket = graphs.bucket(num_tokens, len(chunks)) if graphs is not None else None
        if bucket is not None:
            inputs = graphs.upload(graphs.layout.pack(chunks, self.page_size, feed_rows(feed), pin), tables)
        else:
            layout = InputLayout(num_tokens, len(chunks))
            host = layout.pack(chunks, self.page_size, feed_rows(feed), pin)
            inputs = layout.views(host.to(self.device, non_blocking=True))
        apply_feed(inputs, feed)
        self._mark_forward()
        if bucket is not None:
            return graphs.replay(bucket, num_tokens), inputs.cu_seqlens
        batch = Batch(True, inputs.slots, inputs.kv_lens, tables, inputs.cu_seqlens, max(n for _, n in chunks))
        return self.model(inputs.ids, inputs.positions, batch), inputs.cu_seqlens

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], feed: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
        """One step for each sequence's newest token (one in flight from `feed`: see _input_ids);
        the head's output [B, ...]."""
        bs = len(seqs)
        ids = self._input_ids([0 if s.num_in_flight else s.token_ids[-1] for s in seqs], feed)
        positions = [s.num_tokens - 1 for s in seqs]
        slots = [self._slot(s, p) for s, p in zip(seqs, positions)]
        kv_lens = [s.num_tokens for s in seqs]
        graph_bs = next((g for g in sorted(self.graphs) if g >= bs), None)
        if graph_bs is None:
            batch = Batch(False, self._tensor(slots, torch.int64), self._tensor(kv_lens), self._block_tables(seqs))
            self._mark_forward()
            hidden = self.model(ids, self._tensor(positions, torch.int64), batch)
            return self.head(hidden)
        pad = graph_bs - bs
        g = self.graph_inputs
        g["ids"][:bs].copy_(ids)  # padding rows keep earlier (valid) ids: they write and read nothing
        g["positions"][:graph_bs].copy_(self._tensor(positions + [0] * pad, torch.int64))
        g["slots"][:graph_bs].copy_(self._tensor(slots + [-1] * pad, torch.int64))
        g["kv_lens"][:graph_bs].copy_(self._tensor(kv_lens + [0] * pad))
        g["block_tables"][:bs, :].copy_(self._block_tables(seqs, self.max_pages_per_seq))
        self._mark_forward()
        self.graphs[graph_bs].replay()
        return self.graph_out[:bs]

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
        return self.sample_on_device(seqs, logits).tolist()

    def sample_on_device(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """The next tokens [B] where the logits are, without waiting for the GPU."""
        p = [s.params for s in seqs]
        f32 = torch.float32
        tokens = sample(logits, self._tensor([0.0 if x.greedy else x.temperature for x in p], f32),
                        self._tensor([x.top_k for x in p]), self._tensor([x.top_p for x in p], f32),
                        self._tensor([x.min_p for x in p], f32), self._tensor([s.seed for s in seqs], torch.int64),
                        self._tensor([s.num_output for s in seqs], torch.int64),
                        [i for i, x in enumerate(p) if not x.greedy and (x.top_k > 0 or x.top_p < 1)])
        self.end_span()
        return tokens

    def end_span(self) -> None:
        """When timed, close the span of the forward pass last started: after its sampler, or
        after the forward itself where nothing is sampled (a long prompt's chunk)."""
        if self._forward_started is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.gpu_spans.append((self._forward_started, end))
            self._forward_started = None

    def _mark_forward(self) -> None:
        """When timed, an event where the forward pass's kernels start (its inputs already queued)."""
        if self.gpu_spans is not None:
            self._forward_started = torch.cuda.Event(enable_timing=True)
            self._forward_started.record()

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Prefill and sample on throwaway input. Slots -1 write no K/V; the reads of page 0 (which
        may belong to a live sequence) only feed logits that are thrown away."""
        for lens in ((16,), (7, 16, 1)):
            cu = list(itertools.accumulate(lens, initial=0))
            pages = [[0] * -(-max(lens) // self.page_size)] * len(lens)
            batch = Batch(True, self._tensor([-1] * cu[-1], torch.int64), self._tensor(list(lens)),
                          self._tensor(pages), self._tensor(cu), max(lens))
            positions = self._tensor([p for n in lens for p in range(n)], torch.int64)
            hidden = self.model(self._tensor([0] * cu[-1], torch.int64), positions, batch)
            logits = self.model.compute_logits(hidden[self._tensor(cu[1:], torch.int64) - 1])
            for params in WARM_UP_SAMPLING:  # greedy, plain sampling, the top-k/top-p/min-p path
                self.sample([Sequence(0, [0], params, seed=0) for _ in lens], logits)
        # token ids taken from the step in flight (the pipeline's feed): the first clamp loads
        # its kernels, which a switch's second step would otherwise pay
        self._input_ids([0, 0], (torch.zeros(1, dtype=torch.int64, device=self.device), [0, -1]))

    @torch.inference_mode()
    def _capture(self, sizes: list[int]) -> None:
        """Capture one graph per batch size, largest first, all sharing one memory pool."""
        max_bs, dev = max(sizes), self.device
        g = self.graph_inputs = {
            "ids": torch.zeros(max_bs, dtype=torch.int64, device=dev),
            "positions": torch.zeros(max_bs, dtype=torch.int64, device=dev),
            "slots": torch.full((max_bs,), -1, dtype=torch.int64, device=dev),
            "kv_lens": torch.zeros(max_bs, dtype=torch.int32, device=dev),
            "block_tables": torch.zeros(max_bs, self.max_pages_per_seq, dtype=torch.int32, device=dev),
        }
        pool = None
        for bs in sorted(sizes, reverse=True):
            batch = Batch(False, g["slots"][:bs], g["kv_lens"][:bs], g["block_tables"][:bs])
            forward = lambda: self.head(self.model(g["ids"][:bs], g["positions"][:bs], batch))  # noqa: E731
            if bs == max_bs:  # the largest size runs first: its output sizes the shared output buffer
                self.graph_out = torch.zeros_like(forward())
            run = lambda: self.graph_out[:bs].copy_(forward())  # noqa: E731
            run()  # warm-up outside capture: Triton compiles, cuBLAS picks its kernels
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                run()
            pool = self.graph_pool = graph.pool()
            self.graphs[bs] = graph
            graph.replay()  # a graph's first launch uploads it (the process's first costs most)

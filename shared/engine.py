"""The single-process engine: model, KV pool, both schedulers and the runner in one loop.

`semipd generate` runs on it; the serving processes reuse its parts (the schedulers, the runner)
each on its own side of the prefill/decode split.
"""

import itertools
from dataclasses import dataclass

import torch
from tqdm import tqdm

from shared.config import ModelConfig, load_hf_config
from shared.errors import UserError
from shared.kv_cache import allocate_kv_pool, auto_num_pages, pages_for
from shared.loader import load_model
from shared.model_runner import ModelRunner
from shared.page_allocator import PageAllocator
from shared.pipeline import StepPipeline
from shared.sampling_params import SamplingParams
from shared.scheduler import MixedScheduler, PrefillScheduler
from shared.sequence import Sequence
from shared.tokenizer import Detokenizer, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    model: str
    device: str = "auto"                # auto | cpu | cuda
    dtype: str = "auto"                 # auto (bfloat16 on CUDA, float32 on CPU) or a DTYPES key
    page_size: int = 16
    num_pages: int | None = None        # None: as many as fit (kv_cache.auto_num_pages)
    max_num_seqs: int = 256             # as vLLM
    max_batched_tokens: int = 8192
    max_model_len: int | None = None    # None: the model's max_position_embeddings
    cuda_graphs: bool = True
    seed: int = 0                       # for preset weights
    progress: bool = True

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, got {self.device!r}")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str


class Engine:
    def __init__(self, config: EngineConfig):
        if config.page_size < 1:
            raise UserError(f"page size must be positive, got {config.page_size}")
        self.config = config
        device = config.torch_device()
        dtype = config.torch_dtype(device)
        self.model_config = ModelConfig.from_hf(load_hf_config(config.model))
        self.model = load_model(config.model, device, dtype, config.seed, config.progress)
        self.tokenizer = load_tokenizer(config.model)
        cfg = self.model_config
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        num_pages = config.num_pages or auto_num_pages(
            cfg, config.page_size, dtype, device, config.max_batched_tokens, config.max_num_seqs,
            self.max_model_len)
        self.allocator = PageAllocator.create(num_pages)
        self.model.bind_kv_cache(*allocate_kv_pool(cfg, num_pages, config.page_size, dtype, device))
        self.runner = ModelRunner(self.model, config.page_size, self.max_model_len,
                                  config.max_num_seqs, config.cuda_graphs)
        self.sched = MixedScheduler(self.allocator, config.page_size, config.max_batched_tokens,
                                    config.max_num_seqs)
        self._ids = itertools.count()

    def close(self) -> None:
        self.allocator.close()

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        check_request(prompt_ids, params, self.model_config.vocab_size, self.max_model_len,
                      self.config.page_size, self.allocator.num_pages)

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 progress: bool = False) -> list[Completion]:
        """Run all prompts together to completion; outputs in prompt order."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        for ids, p in zip(prompts, params):
            self.check_request(ids, p)
        seqs = [Sequence(next(self._ids), ids, p, self.model_config.eos_token_ids)
                for ids, p in zip(prompts, params)]
        detoks = {s.seq_id: Detokenizer(self.tokenizer, s.params.stop) for s in seqs}
        for seq in seqs:
            self.sched.add(seq)
        bar = tqdm(total=len(seqs), desc="generating", disable=not progress)
        pipeline = StepPipeline(self.runner, self.allocator, lambda: self.sched.decode.running)
        unfinished = len(seqs)
        while unfinished:
            for seq, token in mixed_step(self.runner, self.sched, pipeline):
                if detoks[seq.seq_id].add([token])[1]:
                    if seq.finish_reason is None:
                        self.sched.drop({seq.seq_id})
                    seq.finish_reason = "stop"
                if seq.finish_reason is not None:
                    unfinished -= 1
                    bar.update(1)
        pipeline.drain()  # the step launched after the last finish, its tokens unused
        bar.close()
        for detok in detoks.values():
            detok.flush()
        return [Completion(s.output_ids, detoks[s.seq_id].text, s.finish_reason) for s in seqs]


def check_request(prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int,
                  page_size: int, num_pages: int) -> None:
    """Raise UserError if the request can never be served."""
    params.validate(vocab_size)
    if not prompt_ids:
        raise UserError("prompt is empty")
    bad = next((t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int)
                or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise UserError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab_size})")
    total = len(prompt_ids) + params.max_tokens
    if total > max_model_len:
        raise UserError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                        f"exceeds the context length {max_model_len}")
    if pages_for(total, page_size) > num_pages:
        raise UserError(f"request needs {pages_for(total, page_size)} KV pages; the pool has {num_pages}")


def prefill_step(runner: ModelRunner, sched: PrefillScheduler, allocator, chunks) -> list[Sequence]:
    """Run scheduled prompt chunks; sample a first token for each completed prompt and return
    those sequences (a sequence that is already finished has its pages freed)."""
    logits = runner.prefill_logits(chunks)
    done = {s.seq_id for s in sched.finish_chunks(chunks)}
    rows = [i for i, (s, _) in enumerate(chunks) if s.seq_id in done]
    ready = [chunks[i][0] for i in rows]
    if ready:
        for seq, token in zip(ready, runner.sample(ready, logits[rows])):
            seq.append(token)
            if seq.finish_reason is not None:
                allocator.free(seq.reset_cache())
    else:
        runner.end_span()
    return ready


def mixed_step(runner: ModelRunner, sched: MixedScheduler, pipeline: StepPipeline) -> list[tuple[Sequence, int]]:
    """Launch one forward pass over the decode batch (one token each) and the prompt chunks
    scheduled beside it, then read the step launched before: (sequence, new token) pairs, the
    finished sequences already out of the scheduler."""
    read, finish = [], sched.decode.finish
    scheduled = sched.schedule(preempt=pipeline.inflight is None)
    if scheduled is None:  # the pool is short: preempting needs every token known
        read = finish(pipeline.drain())
        scheduled = sched.schedule()
    batch, chunks = scheduled
    feed = pipeline.feed(batch)
    if chunks:
        logits = runner.prefill_logits([(s, 1) for s in batch] + chunks, feed)
        done = {s.seq_id for s in sched.prefill.finish_chunks(chunks)}
        rows = list(range(len(batch))) + [len(batch) + i for i, (s, _) in enumerate(chunks) if s.seq_id in done]
        ready = [chunks[i - len(batch)][0] for i in rows[len(batch):]]
        for seq in ready:
            sched.decode.add(seq)
        return read + finish(pipeline.launch(batch + ready, logits[rows]))
    if batch:
        return read + finish(pipeline.launch(batch, runner.decode(batch, feed)))  # the CUDA-graph path
    return read + finish(pipeline.drain())

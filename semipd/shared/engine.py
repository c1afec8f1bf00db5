"""The single-process engine behind `semipd generate`: model, KV pool, the mixed scheduler and
the runner in one loop. The serving processes build from the same parts, each on its own side of
the prefill/decode split; none of them imports this module."""

import itertools
from dataclasses import dataclass

from tqdm import tqdm

from semipd.shared.admission import check_request
from semipd.shared.config import ModelConfig, load_hf_config
from semipd.shared.engine_config import EngineConfig
from semipd.shared.errors import UserError
from semipd.shared.kv_cache import allocate_kv_pool, auto_num_pages
from semipd.shared.loader import load_model
from semipd.shared.model_runner import ModelRunner
from semipd.shared.page_allocator import PageAllocator
from semipd.shared.parallel.group import TPGroup
from semipd.shared.pipeline import StepPipeline
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.scheduler import MixedScheduler
from semipd.shared.sequence import Sequence
from semipd.shared.steps import mixed_step
from semipd.shared.tokenizer import Detokenizer, load_tokenizer



@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str


class Engine:
    def __init__(self, config: EngineConfig, tp: TPGroup = TPGroup()):
        """tp: this process's rank of a tensor-parallel group. Every rank runs an Engine on the
        same prompts: the schedule is a function of them, so the ranks take the same steps, each
        with its own allocator holding the same pages, and sample the same tokens."""
        if config.page_size < 1:
            raise UserError(f"page size must be positive, got {config.page_size}")
        self.config = config
        device = config.torch_device()
        dtype = config.torch_dtype(device)
        self.model_config = ModelConfig.from_hf(load_hf_config(config.model))
        self.model = load_model(config.model, device, dtype, config.seed, config.progress, tp=tp)
        self.tokenizer = load_tokenizer(config.model)
        cfg = self.model_config
        self.max_model_len = min(config.max_model_len or cfg.max_position, cfg.max_position)
        num_pages = config.num_pages or auto_num_pages(
            cfg, config.page_size, dtype, device, config.max_batched_tokens, config.max_num_seqs,
            self.max_model_len, tp.size)
        self.allocator = PageAllocator.create(num_pages, config.page_size, config.prefix_cache)
        self.model.bind_kv_cache(*allocate_kv_pool(cfg, num_pages, config.page_size, dtype, device, tp.size))
        graph_tokens = config.max_batched_tokens if config.cuda_graphs else 0
        self.runner = ModelRunner(self.model, config.page_size, self.max_model_len, config.max_num_seqs,
                                  config.cuda_graphs, prefill_graph_tokens=graph_tokens)
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

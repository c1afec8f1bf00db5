"""Scoring many response streams at once over the monitor's own paged KV cache.

A stream is one monitored request: a semipd.shared.sequence.Sequence holding the monitor's view of the
text (`prompt + "\\n\\n"`, then the response) whose K/V lives in pages of the monitor's pool.
Each step computes the not-yet-computed tokens of every stream together and scores the response
tokens among them with the token head. Streams with exactly one new token (the steady state: a
served decode step adds one token to each) go through the runner's decode step, a CUDA graph
with the token head inside on a GPU; the rest go through one ragged chunked prefill over each
stream's cached prefix (ModelRunner.prefill_hidden). A token is computed once, so its score never changes and
its cost does not grow with the length of the response before it (attention over the cache
aside).

The rule (the SCM paper's streaming rule): a stream fires once the cumulative number of its
response tokens with P(harmful) >= threshold reaches k. A stream that fires, fails or has
received its last token is dropped and its pages freed.

Streams opened with text are re-tokenized incrementally (retokenize.py); streams opened with
token ids take the served model's ids as they are (both sides use one tokenizer). Each response
token remembers how many served tokens had been generated when its text was complete, so
progress and verdicts are counted in the served model's tokens.
"""

import itertools
from dataclasses import dataclass, field

from semipd.services.scm.model import Monitor
from semipd.services.scm.retokenize import Retokenizer
from semipd.shared.kv_cache import allocate_kv_pool, pages_for
from semipd.shared.model_runner import ModelRunner
from semipd.shared.page_allocator import PageAllocator
from semipd.shared.sampling_params import SamplingParams
from semipd.shared.scheduler import grow
from semipd.shared.sequence import Sequence

SEPARATOR = "\n\n"


@dataclass
class Stream:
    seq: Sequence
    retok: Retokenizer | None          # None: the stream takes token ids
    served: list[int] = field(default_factory=list)  # per response token: served tokens covered
    flagged: int = 0                   # response tokens at or over the threshold so far
    upto: int = 0                      # served tokens appended so far
    last_upto: int | None = None       # set by the last append: served tokens in all


@dataclass
class Scored:
    """One stream's news from a step."""
    key: tuple
    upto: int                          # served tokens whose text is now scored
    verdict: dict | None = None
    error: str | None = None
    scores: list[float] = field(default_factory=list)  # of the response tokens scored in the step


class StreamMonitor:
    def __init__(self, monitor: Monitor, threshold: float, k: int, max_streams: int, num_pages: int,
                 page_size: int = 16, max_model_len: int = 4096, max_batched_tokens: int = 4096):
        cfg = monitor.cfg
        self.monitor, self.threshold, self.k, self.max_streams = monitor, threshold, k, max_streams
        self.page_size, self.max_batched_tokens = page_size, max_batched_tokens
        self.max_model_len = min(max_model_len, cfg.max_position)
        device, dtype = monitor.backbone.embed_tokens.weight.device, monitor.backbone.embed_tokens.weight.dtype
        self.allocator = PageAllocator.create(num_pages)
        monitor.backbone.bind_kv_cache(*allocate_kv_pool(cfg, num_pages, page_size, dtype, device))
        self.runner = ModelRunner(monitor.backbone, page_size, self.max_model_len, max_streams,
                                  head=monitor.token_scores, prefill_graph_tokens=max_batched_tokens)
        self.streams: dict[tuple, Stream] = {}
        self._seq_ids = 0

    def close(self) -> None:
        self.allocator.close()

    def open(self, key: tuple, prompt: str | None, prompt_ids: list[int] | None) -> None:
        """Start a stream; ValueError (with the reason) if it cannot be watched. An error drops
        the stream, so a second open of one drops the first too: which one later appends belong
        to cannot be known."""
        if key in self.streams:
            self.drop(key)
            raise ValueError(f"stream {key[-1]} was already open (both dropped)")
        if len(self.streams) >= self.max_streams:
            raise ValueError(f"the monitor is full ({self.max_streams} streams)")
        if (prompt is None) == (prompt_ids is None):
            raise ValueError("give exactly one of prompt and prompt_ids")
        tok = self.monitor.tokenizer
        if prompt is None:
            self._check_ids(prompt_ids)
            ids, retok = prompt_ids + tok.encode(SEPARATOR, special=False), None
        else:
            ids, retok = tok.encode(prompt + SEPARATOR), Retokenizer(lambda t: tok.encode(t, special=False))
        self._seq_ids += 1
        stream = Stream(Sequence(self._seq_ids, ids, SamplingParams()), retok)
        self._check_length(stream)
        self.streams[key] = stream

    def append(self, key: tuple, upto: int, text: str, token_ids: list[int], last: bool) -> None:
        """More response for a stream; ValueError if it is malformed or too long (the stream is
        then dropped). Unknown keys are ignored: the stream has already ended here."""
        stream = self.streams.get(key)
        if stream is None:
            return
        try:
            # progress is counted in served tokens: it never goes back, and a stream of ids
            # moves by one per id (the verdict's token index depends on it)
            if stream.last_upto is not None:
                raise ValueError("the stream has already had its last append")
            if upto < stream.upto:
                raise ValueError(f"upto went back from {stream.upto} to {upto}")
            if stream.retok is None:
                if text:
                    raise ValueError("this stream was opened with token ids: send token ids, not text")
                if upto - stream.upto != len(token_ids):
                    raise ValueError(f"upto moved by {upto - stream.upto} for {len(token_ids)} token ids")
                self._check_ids(token_ids)
                new = [(t, upto - len(token_ids) + i + 1) for i, t in enumerate(token_ids)]
            else:
                if token_ids:
                    raise ValueError("this stream was opened with text: send text, not token ids")
                new = stream.retok.add(text, upto) + (stream.retok.flush(upto) if last else [])
            for token, covered in new:
                stream.seq.token_ids.append(token)
                stream.served.append(covered)
            stream.upto = upto
            if last:
                stream.last_upto = upto
            self._check_length(stream)
        except ValueError:
            self.drop(key)
            raise

    def drop(self, key: tuple) -> None:
        stream = self.streams.pop(key, None)
        if stream is not None and stream.seq.block_table:
            self.allocator.free(stream.seq.reset_cache())

    def has_work(self) -> bool:
        return any(self._pending(s) or s.last_upto is not None for s in self.streams.values())

    def step(self) -> list[Scored]:
        """Compute and score every stream's new tokens (under the token budget) in one pass."""
        chunks, news, budget = [], [], self.max_batched_tokens
        for key, s in list(self.streams.items()):
            n = min(self._pending(s), budget)
            if n and not grow(s.seq, s.seq.num_cached + n, self.allocator, self.page_size):
                self.drop(key)
                news.append(Scored(key, 0, error="the monitor's KV cache is full"))
            elif n:
                chunks.append((key, s, n))
                budget -= n
        for key, s, n, scores in self._compute(chunks):
            news.append(self._score(key, s, n, scores))
        news = [x for x in news if x is not None]
        reported = {x.key for x in news}
        for key, s in list(self.streams.items()):  # ended, with nothing left to compute
            if s.last_upto is not None and not self._pending(s):
                self.drop(key)
                if key not in reported:
                    news.append(Scored(key, s.last_upto))
        return news

    def _compute(self, chunks: list[tuple]) -> list[tuple]:
        """(key, stream, n, the scores of its n new tokens) for each chunk."""
        single = [c for c in chunks if self._pending(c[1]) == 1]  # the last token: what decode computes
        ragged = [c for c in chunks if self._pending(c[1]) != 1]
        out = []
        if single:
            scores = self.runner.decode([s.seq for _, s, _ in single]).tolist()
            out += [(key, s, 1, [p]) for (key, s, _), p in zip(single, scores)]
        if ragged:
            scores = self.monitor.token_scores(self.runner.prefill_hidden([(s.seq, n) for _, s, n in ragged])).tolist()
            ends = list(itertools.accumulate((n for _, _, n in ragged), initial=0))
            out += [(key, s, n, scores[a:b]) for (key, s, n), a, b in zip(ragged, ends, ends[1:])]
        return out

    def _score(self, key: tuple, s: Stream, n: int, scores: list[float]) -> Scored | None:
        start, num_prompt = s.seq.num_cached, s.seq.num_prompt
        s.seq.num_cached += n
        first = max(start, num_prompt)
        response = scores[first - start:]
        for i, score in enumerate(response):
            if score >= self.threshold:
                s.flagged += 1
                if s.flagged == self.k:
                    self.drop(key)
                    index = first + i - num_prompt
                    return Scored(key, s.served[index], scores=response[:i + 1], verdict={
                        "token_index": s.served[index] - 1, "monitor_token_index": index,
                        "score": score, "threshold": self.threshold, "k": self.k})
        if not response:
            return None  # only prompt tokens this step
        done = s.last_upto is not None and not self._pending(s)
        return Scored(key, s.last_upto if done else s.served[start + n - 1 - num_prompt], scores=response)

    def _pending(self, s: Stream) -> int:
        return s.seq.num_tokens - s.seq.num_cached

    def _check_ids(self, ids: list[int]) -> None:
        vocab = self.monitor.cfg.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the monitor's vocabulary [0, {vocab})")

    def _check_length(self, s: Stream) -> None:
        if s.seq.num_tokens > self.max_model_len:
            raise ValueError(f"the monitored text ({s.seq.num_tokens} tokens) exceeds the monitor's "
                             f"context length {self.max_model_len}")


def auto_pages(max_streams: int, max_model_len: int, page_size: int) -> int:
    """Room for every stream at full length."""
    return max_streams * pages_for(max_model_len, page_size)


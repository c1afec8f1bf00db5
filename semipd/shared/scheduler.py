"""The two schedulers: prefill (a waiting queue, batches under a token budget) and decode
(continuous batching). They share only the page allocator, so each can live in its own process.
"""

from collections import deque

from semipd.shared.kv_cache import pages_for
from semipd.shared.sequence import Sequence


def grow(seq: Sequence, num_tokens: int, allocator, page_size: int) -> bool:
    """Give seq enough pages for num_tokens tokens; False (and nothing taken) if the pool is short."""
    need = pages_for(num_tokens, page_size) - len(seq.block_table)
    if need <= 0:
        return True
    pages = allocator.alloc(need, seq.seq_id)
    if pages is None:
        return False
    seq.block_table += pages
    return True


class PrefillScheduler:
    def __init__(self, allocator, page_size: int, max_batched_tokens: int, max_num_seqs: int):
        self.allocator, self.page_size = allocator, page_size
        self.max_batched_tokens, self.max_num_seqs = max_batched_tokens, max_num_seqs
        self.caching = allocator.caching
        self.waiting: deque[Sequence] = deque()
        # Per step not yet known to have completed: (sequence, its block table, tokens computed)
        self.uncached: list[list[tuple[Sequence, list[int], int]]] = []

    def add(self, seq: Sequence, front: bool = False) -> None:
        self.waiting.appendleft(seq) if front else self.waiting.append(seq)

    def schedule(self, budget: int | None = None, max_seqs: int | None = None,
                 settled: bool = True) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) pairs in queue order, with pages allocated, within
        budget tokens (default max_batched_tokens) and max_seqs sequences (max_num_seqs).
        settled: every step launched so far has completed (False: the last may still run).

        A prompt longer than the budget is split into chunks over several steps. A sequence that
        starts (or starts over) takes the longest cached prefix of its tokens and computes only
        the rest. If the pool is short, partly computed sequences behind the one at hand give
        their pages back first, so that at least the oldest request always progresses."""
        self.cache_computed(settled)
        batch, claimed = [], set()  # claimed: keys of the pages of the sequences in the batch
        budget = self.max_batched_tokens if budget is None else budget
        max_seqs = self.max_num_seqs if max_seqs is None else max_seqs
        for i, seq in enumerate(self.waiting):
            if budget <= 0 or len(batch) >= max_seqs:
                break
            prefix = self._prefix(seq, claimed)
            if prefix is None:
                continue
            start = len(prefix) * self.page_size if prefix else seq.num_cached
            chunk = min(seq.num_tokens - start, budget)
            while not self._grow(seq, start + chunk, prefix):
                if not self._release_one_after(i):
                    if not batch and seq.block_table:
                        # Hold nothing while waiting: decode may need these pages to progress.
                        self.allocator.free(seq.reset_cache())
                    return batch
            batch.append((seq, chunk))
            budget -= chunk
            if self.caching:
                claimed.update(seq.page_keys(self.page_size))  # those cached already match anyway
        return batch

    def _prefix(self, seq: Sequence, claimed: set[int]) -> list[int] | None:
        """The cached pages a starting sequence begins with ([] for one under way). None: it
        waits, for its next page is one that a sequence before it is computing now; so a prefix
        that several prompts share is computed once, and they start once it is cached."""
        if seq.block_table or not self.caching:
            return []
        keys = seq.page_keys(self.page_size)[:(seq.num_tokens - 1) // self.page_size]  # the last token is computed
        prefix = self.allocator.match(keys, seq.token_ids)
        return None if len(prefix) < len(keys) and keys[len(prefix)] in claimed else prefix

    def _grow(self, seq: Sequence, num_tokens: int, prefix: list[int]) -> bool:
        """Pages for num_tokens tokens; a starting sequence takes its cached prefix with them."""
        if seq.block_table:
            return grow(seq, num_tokens, self.allocator, self.page_size)
        need = pages_for(num_tokens, self.page_size) - len(prefix)
        keys = seq.page_keys(self.page_size)[:len(prefix)] if prefix else ()
        table = self.allocator.alloc(need, seq.seq_id, prefix, keys, prompt_tokens=seq.num_tokens)
        if table is None:
            return False
        # Another process may have evicted part of the prefix meanwhile: the chunk then starts
        # earlier, still within its pages.
        seq.block_table, seq.num_cached = table, (len(table) - need) * self.page_size
        return True

    def _release_one_after(self, index: int) -> bool:
        for seq in reversed(list(self.waiting)[index + 1:]):
            if seq.block_table:
                self.allocator.free(seq.reset_cache())
                return True
        return False

    def held(self) -> list[Sequence]:
        return list(self.waiting)

    def drop(self, seq_ids: set[int]) -> None:
        """Abort these sequences if queued here, freeing their pages."""
        for seq in [s for s in self.waiting if s.seq_id in seq_ids]:
            self.waiting.remove(seq)
            self.allocator.free(seq.reset_cache())

    def finish_chunks(self, batch: list[tuple[Sequence, int]]) -> list[Sequence]:
        """Record computed chunks; return (and dequeue) the sequences whose prompt is complete.
        Their full pages are cached once the step has completed (cache_computed)."""
        if self.caching:
            self.uncached.append([(seq, seq.block_table, seq.num_cached + chunk) for seq, chunk in batch])
        done = []
        for seq, chunk in batch:
            seq.num_cached += chunk
            if seq.num_cached == seq.num_tokens:
                done.append(seq)
        for seq in done:
            self.waiting.remove(seq)
        return done

    def cache_computed(self, settled: bool = True) -> None:
        """Cache the full pages that completed steps computed: every recorded step, or all but
        the newest while it may still run (settled False). A page is cached only once its K/V
        is written: a worker killed mid-step must not leave half-written pages in the cache. A
        sequence whose pages went back meanwhile (its block table replaced) is passed over."""
        steps, self.uncached = (self.uncached, []) if settled else (self.uncached[:-1], self.uncached[-1:])
        for seq, table, computed in (entry for step in steps for entry in step):
            if seq.block_table is table:
                self.allocator.publish(seq.seq_id, table,
                                       seq.page_keys(self.page_size)[:computed // self.page_size], seq.token_ids)


class DecodeScheduler:
    """`release` returns pages to the pool (default: at once; the decode worker defers it while
    a launched step may still write them). A sequence that leaves first caches its full pages
    (`retire`), so a later prompt that repeats its prompt and output, or its recomputation after
    a preemption, finds them."""

    def __init__(self, allocator, page_size: int, max_num_seqs: int, release=None):
        self.allocator, self.page_size, self.max_num_seqs = allocator, page_size, max_num_seqs
        self.release = release or allocator.free
        self.caching = allocator.caching
        self.running: list[Sequence] = []
        # Handed over with their newest token still in a retiring predecessor's step in flight:
        # held until the controller passes that step on (inherit), before anything else it sends
        self.inherited: dict[int, Sequence] = {}

    def add(self, seq: Sequence) -> None:
        if seq.num_in_flight:
            self.inherited[seq.seq_id] = seq
        else:
            self.running.append(seq)

    def inherit(self, step) -> None:
        """The predecessor's last step (a DecodeStep): the inherited sequences receive their
        newest tokens and run. Those it finished are gone (the predecessor freed their pages);
        it also carries those that ended on their way here (the controller frees their pages)."""
        for seq_id, token, finished in zip(step.seq_ids, step.tokens, step.finished):
            seq = self.inherited.pop(seq_id, None)
            if seq is not None and finished is None:
                seq.receive(token)
                self.running.append(seq)

    def schedule(self, preempt: bool = True) -> tuple[list[Sequence], list[Sequence]] | None:
        """(batch for this step, preempted sequences). Each sequence in the batch gets a page for
        its newest token; when the pool is short the youngest sequences are preempted: their
        pages are freed and they go back to prefill to be recomputed (with preempt False: None).
        A sequence whose last token is still being sampled (it reached max_tokens) sits out."""
        batch, preempted, i = [], [], 0
        while i < len(self.running) and len(batch) < self.max_num_seqs:
            seq = self.running[i]
            if seq.num_output >= seq.params.max_tokens:
                i += 1
            elif grow(seq, seq.num_tokens, self.allocator, self.page_size):
                batch.append(seq)
                i += 1
            elif not preempt:
                return None
            else:
                victim = self.running.pop()
                self.retire(victim)
                preempted.append(victim)
        return batch, preempted

    def held(self) -> list[Sequence]:
        return self.running + list(self.inherited.values())

    def drop(self, seq_ids: set[int]) -> None:
        """Abort these sequences if running here, freeing their pages."""
        self.remove([s for s in self.running if s.seq_id in seq_ids])

    def finish(self, read: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Drop the sequences that a step's (sequence, token) pairs finished; returns the pairs."""
        self.remove([s for s, _ in read if s.finish_reason is not None])
        return read

    def remove(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.running.remove(seq)
            self.retire(seq)

    def retire(self, seq: Sequence) -> None:
        """Cache the sequence's full pages whose K/V is complete, then let its pages go. A step
        in flight may still write its newest position, never one before it (whose steps were
        read); the block table's last page stays its own and goes with the rest."""
        if self.caching:
            complete = (seq.num_cached - 1) // self.page_size
            self.allocator.publish(seq.seq_id, seq.block_table, seq.page_keys(self.page_size)[:complete],
                                   seq.token_ids)
        self.release(seq.reset_cache())


class MixedScheduler:
    """Both phases in one process, as vLLM and SGLang schedule by default: each step every running
    sequence decodes one token and prompt chunks fill the rest of the token budget, all in one
    forward pass. `semipd generate` and the unified serving mode use it."""

    def __init__(self, allocator, page_size: int, max_batched_tokens: int, max_num_seqs: int):
        self.allocator = allocator
        self.prefill = PrefillScheduler(allocator, page_size, max_batched_tokens, max_num_seqs)
        self.decode = DecodeScheduler(allocator, page_size, max_num_seqs)

    def add(self, seq: Sequence) -> None:
        self.prefill.add(seq)

    def held(self) -> list[Sequence]:
        return self.decode.held() + self.prefill.held()

    def drop(self, seq_ids: set[int]) -> None:
        self.decode.drop(seq_ids)
        self.prefill.drop(seq_ids)

    def schedule(self, preempt: bool = True) -> tuple[list[Sequence], list[tuple[Sequence, int]]] | None:
        """(decode batch, prompt chunks). Preempted sequences rejoin the prompt queue first (with
        preempt False, a needed preemption returns None, as in DecodeScheduler)."""
        scheduled = self.decode.schedule(preempt)
        if scheduled is None:
            return None
        batch, preempted = scheduled
        for seq in preempted:
            self.prefill.add(seq, front=True)
        # A step is in flight exactly when preempting is not allowed.
        return batch, self.prefill.schedule(self.prefill.max_batched_tokens - len(batch),
                                            self.prefill.max_num_seqs - len(batch), settled=preempt)

"""One request's token state as the schedulers and the model runner see it."""

from semipd.shared.sampling_params import SamplingParams

PENDING = -1  # a token still being sampled on the GPU (see Sequence.fill)


class Sequence:
    """Invariant between steps: every token but the newest has its K/V in the cache
    (num_cached == num_tokens - 1) once prefill is done; before that num_cached counts the
    prompt tokens computed so far (chunked prefill, or recomputation after preemption)."""

    def __init__(self, seq_id: int, prompt_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int] = (), seed: int | None = None):
        self.seq_id = seq_id
        self.token_ids = list(prompt_ids)
        self.num_prompt = len(prompt_ids)
        self.params = params
        self.seed = params.resolved_seed() if seed is None else seed
        self.stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.block_table: list[int] = []
        self.num_cached = 0
        self.finish_reason: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.num_prompt

    def append(self, token: int) -> None:
        """Add a sampled token and decide whether the sequence is finished."""
        self.token_ids.append(token)
        self._check(len(self.token_ids) - 1)

    def fill(self, index: int, token: int) -> None:
        """The sampled token for the PENDING placeholder at `index` (a step launched before the
        previous one was read). Finishing here drops the placeholders after it."""
        self.token_ids[index] = token
        self._check(index)
        if self.finish_reason is not None:
            del self.token_ids[index + 1:]

    def _check(self, index: int) -> None:
        if self.token_ids[index] in self.stop_ids:
            self.finish_reason = "stop"
        elif index + 1 - self.num_prompt >= self.params.max_tokens:
            self.finish_reason = "length"

    def reset_cache(self) -> list[int]:
        """Forget the cached K/V (preemption); the caller frees the returned pages."""
        pages, self.block_table, self.num_cached = self.block_table, [], 0
        return pages

"""One request's token state as the schedulers and the model runner see it."""

from semipd.shared.prefix_cache import extend_keys
from semipd.shared.sampling_params import SamplingParams


class Sequence:
    """`token_ids` holds the tokens known on the host: the prompt, then each output once read.
    A step is launched before the one before it is read (shared/pipeline.py), so the newest token
    may still be on the device, held only by the step in flight (this process's, or for a
    sequence handed over, its predecessor's): `num_in_flight` counts such tokens, which follow
    `token_ids` (0 or 1 between steps).

    - num_tokens = len(token_ids) + num_in_flight: every token, known or in flight;
    - num_cached: the tokens whose K/V is in the cache or written by a step already launched;
    - between steps, once prefill is done, every token but the newest has its K/V
      (num_cached == num_tokens - 1), and the newest, known or in flight, is the next step's
      input. Before that num_cached counts the prompt tokens computed so far (chunked prefill,
      or recomputation after preemption)."""

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
        self.num_in_flight = 0
        self.finish_reason: str | None = None
        self._page_keys: list[int] = []

    def page_keys(self, page_size: int) -> list[int]:
        """The prefix cache's key of each full page of the known tokens (computed once each)."""
        return extend_keys(self._page_keys, self.token_ids, page_size)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + self.num_in_flight

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt:]

    @property
    def num_output(self) -> int:
        return self.num_tokens - self.num_prompt

    def append(self, token: int) -> None:
        """Add a sampled token and decide whether the sequence is finished."""
        self.token_ids.append(token)
        if token in self.stop_ids:
            self.finish_reason = "stop"
        elif len(self.token_ids) - self.num_prompt >= self.params.max_tokens:
            self.finish_reason = "length"

    def launched(self) -> None:
        """A step was launched on the newest token: it writes that token's K/V and samples the
        next one, in flight until read (`receive`) or thrown away (`forget_in_flight`)."""
        self.num_cached = self.num_tokens
        self.num_in_flight += 1

    def receive(self, token: int) -> None:
        """The oldest token in flight, read on the host (steps are read in launch order)."""
        self.num_in_flight -= 1
        self.append(token)

    def forget_in_flight(self) -> None:
        """The oldest token in flight is thrown away: the sequence ended before it was read."""
        self.num_in_flight -= 1

    def reset_cache(self) -> list[int]:
        """Forget the cached K/V (preemption); the caller frees the returned pages."""
        pages, self.block_table, self.num_cached = self.block_table, [], 0
        return pages

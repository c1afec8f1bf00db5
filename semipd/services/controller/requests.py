"""One client request as the controller tracks it: where its sequence is, its output so far
and its timings. Its text is made on the detokenizer thread (detokenizer.py)."""

import time
from dataclasses import asdict, dataclass, field

from semipd.shared import protocol
from semipd.shared.sampling_params import SamplingParams


@dataclass
class Request:
    client: bytes
    request_id: str
    seq_id: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    # The role whose worker holds the sequence (prefill, decode or unified), set when admitted;
    # None: no worker does (not yet admitted, or its worker has finished it)
    where: str | None = None
    output_ids: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    token_times: list[float] = field(default_factory=list)
    restarts: int = 0                  # times a worker died while holding it

    def state(self) -> protocol.SeqState:
        """The sequence as prefill should (re)compute it: every known token, no cache."""
        return protocol.SeqState(self.seq_id, self.prompt_ids + self.output_ids, len(self.prompt_ids),
                                 asdict(self.params), self.seed)

    def add_token(self, token: int) -> int:
        """Record a new token; returns its place in the output."""
        self.output_ids.append(token)
        self.token_times.append(time.monotonic())
        return len(self.output_ids) - 1

    def cut(self, index: int) -> None:
        """A stop string ended the output at token index: forget the tokens after it."""
        del self.output_ids[index + 1:], self.token_times[index + 1:]

    def final(self, reason: str, error: str | None = None, verdict: dict | None = None,
              error_kind: str | None = None) -> protocol.Final:
        times = self.token_times
        return protocol.Final(
            self.request_id, reason,
            prompt_tokens=len(self.prompt_ids), completion_tokens=len(self.output_ids),
            ttft_s=times[0] - self.arrival if times else None,
            itl_s=[b - a for a, b in zip(times, times[1:])], error=error, error_kind=error_kind, verdict=verdict)

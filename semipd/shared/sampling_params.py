"""A request's sampling parameters (no torch here: clients import this)."""

import math
import random
from dataclasses import dataclass, field

from semipd.shared.errors import UserError

# Temperatures below this sample greedily (vLLM draws the line at the same place): the noise then
# only decides near-exact ties, and far smaller ones overflow float32 when they divide the logits.
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0        # 0 (below GREEDY_BELOW) means greedy
    top_k: int = 0                  # 0 or -1: off
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None         # None: a random seed is drawn per request
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self, vocab_size: int) -> None:
        """Raise UserError naming the first bad field."""
        def number(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < lo or v > hi or (lo_open and v == lo):
                interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
                raise UserError(f"{name} must be a number in {interval}, got {v!r}")

        def integer(name, lo, hi):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise UserError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")

        number("temperature", 0.0, 100.0)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("min_p", 0.0, 1.0)
        integer("top_k", -1, vocab_size)
        integer("max_tokens", 1, 2**31 - 1)
        if self.seed is not None:
            integer("seed", 0, 2**63 - 1)
        if not isinstance(self.stop, list) or not all(isinstance(s, str) for s in self.stop):
            raise UserError(f"stop must be a list of strings, got {self.stop!r}")
        if not isinstance(self.stop_token_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size
                for t in self.stop_token_ids):
            raise UserError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {self.stop_token_ids!r}")
        if not isinstance(self.ignore_eos, bool):
            raise UserError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def resolved_seed(self) -> int:
        return random.getrandbits(63) if self.seed is None else self.seed

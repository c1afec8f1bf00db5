"""Workloads as phases sent back to back in one run, each with its own Poisson rate and lognormal
length means, so that a server meets a load that shifts (long prompts, then long answers) and a
dynamic split can be seen to follow it.

A phase spec is AMOUNT@RATE:IN/OUT, phases separated by commas: AMOUNT is a duration in seconds
(30s) or a request count (200req), RATE requests per second, IN and OUT the mean input and output
tokens. Within a phase the first request goes at its start, then exponential gaps; a duration
phase sends those that fall before its end, a count phase ends where its next request would have
gone. The next phase starts where the last one ended.

A rate given with a phased workload (--rate, or each of --rates) multiplies every phase's rate by
rate / the first phase's rate: the mix keeps its shape and its durations, the rate names the
first phase's load, and the spec's own rate runs it as written.
"""

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from semipd.cli.bench.prompts import PREFIX_GROUPS, SHARING, TURNS, prefix_len
from semipd.cli.bench.workload import (INPUT_MEAN, INPUT_RANGE, OUTPUT_MEAN, OUTPUT_RANGE, arrival_times,
                                       plan_lengths)
from semipd.shared.errors import UserError

# Presets that fix only the lengths (and what prompts share, prompts.py): --rate and --num-requests
# say how many and how fast.
SHAPES = {"sharegpt": (INPUT_MEAN, OUTPUT_MEAN), "prompt-heavy": (1900.0, 50.0),
          "shared-prefix": (100.0, 100.0), "multi-turn": (INPUT_MEAN, OUTPUT_MEAN)}
# Presets that are phase specs: long prompts, then short prompts with long answers, then again.
SCHEDULES = {"shifting": "30s@8:1900/40,30s@16:130/440,30s@8:1900/40"}
SPEC_HELP = "AMOUNT@RATE:IN/OUT,... where AMOUNT is 30s (seconds) or 200req (requests)"
USAGE = f"""\
Workloads (--workload): lognormal lengths around the means, Poisson arrivals.
  sharegpt (default)  mean {INPUT_MEAN:g} input / {OUTPUT_MEAN:g} output tokens; --num-requests at --rate
  prompt-heavy        mean {SHAPES['prompt-heavy'][0]:g} input / {SHAPES['prompt-heavy'][1]:g} output tokens; \
--num-requests at --rate
  shared-prefix       {PREFIX_GROUPS} prefixes of {prefix_len(None)} tokens (at most half the context), each
                      request one of them and a question of mean {SHAPES['shared-prefix'][0]:g} tokens; mean \
{SHAPES['shared-prefix'][1]:g} output
  multi-turn          conversations of {TURNS} turns, each turn's prompt the last one, its answer and a
                      question (sharegpt's lengths), sent once the answer before it has ended
  shifting            {SCHEDULES['shifting']}
  PHASES              phases back to back, each AMOUNT@RATE:IN/OUT: AMOUNT a duration (30s) or
                      a request count (200req), RATE req/s, IN/OUT mean input/output tokens, e.g.
                        --workload 20s@4:1900/40,100req@8:130/440
  With phases, a rate R (--rate, or each of --rates) multiplies every phase's rate by R / the
  first phase's rate, durations kept: --rates 8,16 runs shifting as written and at twice the load.

"""
_NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
_PHASE = re.compile(rf"{_NUMBER}(s|req)@{_NUMBER}:{_NUMBER}/{_NUMBER}")


@dataclass(frozen=True)
class Phase:
    rate: float                    # requests per second
    input_mean: float              # mean prompt tokens
    output_mean: float             # mean output tokens
    duration_s: float | None = None
    requests: int | None = None    # exactly one of duration_s and requests
    sharing: str | None = None     # what prompts share (prompts.SHARING), None: nothing

    def spec(self) -> str:
        amount = f"{self.requests}req" if self.requests is not None else f"{self.duration_s:g}s"
        return f"{amount}@{self.rate:g}:{self.input_mean:g}/{self.output_mean:g}"


def parse_phases(text: str) -> list[Phase]:
    """The phases of a spec (see the module docstring); a UserError says which phase is wrong."""
    parts = [part.strip() for part in text.split(",")]
    if not text.strip():
        raise UserError(f"a phase spec needs at least one phase: {SPEC_HELP}")
    phases = []
    for i, part in enumerate(parts, 1):
        match = _PHASE.fullmatch(part.replace(" ", ""))
        if match is None:
            raise UserError(f"phase {i} {part!r}: expected {SPEC_HELP}, e.g. 30s@8:1900/40")
        amount, unit, rate, input_mean, output_mean = match.groups()
        if unit == "req" and not amount.isdigit():
            raise UserError(f"phase {i} {part!r}: a request count is a whole number")
        if float(amount) <= 0 or float(rate) <= 0:
            raise UserError(f"phase {i} {part!r}: its {'duration' if unit == 's' else 'count'} and rate "
                            f"must be positive")
        for what, mean, (lo, hi) in (("input", input_mean, INPUT_RANGE), ("output", output_mean, OUTPUT_RANGE)):
            if not lo < float(mean) < hi:
                raise UserError(f"phase {i} {part!r}: the mean {what} length must lie strictly between "
                                f"{lo} and {hi} tokens")
        phases.append(Phase(float(rate), float(input_mean), float(output_mean),
                            duration_s=float(amount) if unit == "s" else None,
                            requests=int(amount) if unit == "req" else None))
    return phases


def is_phased(workload: str | None) -> bool:
    """Whether a --workload value is a phase spec or names one (else it names a shape)."""
    return workload is not None and workload not in SHAPES


def resolve(workload: str | None, rate: float | None, num_requests: int | None = None,
            input_mean: float | None = None, output_mean: float | None = None) -> list[Phase]:
    """The phases a --workload value sends at a rate: a shape is one phase of num_requests at the
    rate; a spec's rates are scaled so that its first phase runs at the rate (None: as written)."""
    if not is_phased(workload):
        shape_input, shape_output = SHAPES[workload or "sharegpt"]
        return [Phase(rate, input_mean or shape_input, output_mean or shape_output, requests=num_requests,
                      sharing=workload if workload in SHARING else None)]
    phases = parse_phases(SCHEDULES.get(workload, workload))
    if rate is None:
        return phases
    return [replace(p, rate=p.rate * rate / phases[0].rate) for p in phases]


def warmup(phases: list[Phase], n: int) -> list[Phase]:
    """At most about n requests spread over the phases' shapes: the first requests of each shape
    compile kernels for it, so a measured run starts warm."""
    each = math.ceil(n / len(phases))
    return [Phase(p.rate, p.input_mean, p.output_mean, requests=min(p.requests or each, each)) for p in phases]


def phase_arrivals(phase: Phase, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Send times from the phase's start (the first at 0) and the phase's length in seconds."""
    if phase.requests is not None:
        times = arrival_times(phase.rate, phase.requests + 1, rng)
        return times[:-1], float(times[-1])
    times = np.zeros(1)
    while times[-1] < phase.duration_s:
        gaps = rng.exponential(1.0 / phase.rate, max(16, math.ceil(phase.rate * phase.duration_s)))
        times = np.concatenate([times, times[-1] + np.cumsum(gaps)])
    return times[times < phase.duration_s], phase.duration_s


@dataclass
class Planned:
    phase: int          # index into the run's phases
    send_s: float       # from the start of the run
    input_len: int
    output_len: int


def plan(phases: list[Phase], rng: np.random.Generator, max_model_len: int | None = None,
         pool: list[tuple[int, int]] | None = None) -> tuple[list[Planned], list[dict]]:
    """Every request of the phases in send order, and each phase as sent: its spec, rate, means
    and span in the run (start_s, end_s). Lengths come from pool (a dataset) when given."""
    planned, sent, start = [], [], 0.0
    for i, phase in enumerate(phases):
        times, length = phase_arrivals(phase, rng)
        limit = max_model_len  # a shared prefix comes before the planned input
        if phase.sharing == "shared-prefix" and max_model_len is not None:
            limit -= prefix_len(max_model_len)
        lengths = plan_lengths(len(times), rng, pool, phase.input_mean, phase.output_mean, limit)
        planned += [Planned(i, start + t, n_in, n_out) for t, (n_in, n_out) in zip(times.tolist(), lengths)]
        sent.append({"spec": phase.spec(), "rate": phase.rate, "input_len_mean": phase.input_mean,
                     "output_len_mean": phase.output_mean, "start_s": start, "end_s": start + length})
        start += length
    return planned, sent

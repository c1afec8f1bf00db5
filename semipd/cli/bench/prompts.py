"""The token ids a bench run sends: random ids of each planned length, or prompts that share
prefixes, as the traffic a prefix cache serves (chat turns, shared system prompts, documents).

- shared-prefix: PREFIX_GROUPS prefixes of PREFIX_LEN random ids (at most half the server's
  context), each request one of them, drawn uniformly, then its own question of its planned
  input length;
- multi-turn: conversations of TURNS turns. Request j of a phase is a turn of conversation
  j mod C (C = the phase's requests / TURNS, rounded up), so turns of one conversation arrive
  C requests apart; a turn's prompt is the one before, its answer and a new question of its
  planned input length, and it is sent no earlier than the answer before it ends (a person
  reads before replying). Prompts are planned before anything is sent, with random ids of the
  answer's length in its place; a turn is sent as the turn before was sent, then the answer's
  own tokens where the backend streams token ids (semipd's does: the server finds the whole
  conversation cached) or the planned ids where it answers text (OpenAI's: the earlier prompts
  are cached, not the answers), then its question (next_turn). A conversation that would outgrow
  the context starts over.
"""

import math
from collections import Counter

import numpy as np

PREFIX_GROUPS, PREFIX_LEN, TURNS = 16, 2048, 4
SHARING = ("shared-prefix", "multi-turn")


def prefix_len(max_model_len: int | None) -> int:
    return PREFIX_LEN if max_model_len is None else min(PREFIX_LEN, max_model_len // 2)


def _ids(rng: np.random.Generator, n: int) -> list[int]:
    """n random ids below 256, which every vocabulary has (the package docstring says why)."""
    return rng.integers(0, 256, n).tolist()


def make_prompts(planned: list, phases: list, rng: np.random.Generator, ids: np.random.Generator,
                 max_model_len: int | None) -> tuple[list[list[int]], list[int | None]]:
    """Each planned request's (phases.Planned) prompt ids, and the request whose answer it waits
    for (its conversation's turn before; None: it goes at its planned time). rng draws which
    prefix each request shares, ids the token ids."""
    prompts, after = [], []
    prefixes = {}   # phase -> its shared prefixes
    talks = {}      # (phase, conversation) -> (ids so far, prompt and answer, the last turn's index)
    seen, counts = [0] * len(phases), Counter(p.phase for p in planned)
    for i, p in enumerate(planned):
        sharing, j = phases[p.phase].sharing, seen[p.phase]
        seen[p.phase] += 1
        question = _ids(ids, p.input_len)
        if sharing == "shared-prefix":
            if p.phase not in prefixes:
                prefixes[p.phase] = [_ids(ids, prefix_len(max_model_len)) for _ in range(PREFIX_GROUPS)]
            prompts.append(prefixes[p.phase][rng.integers(PREFIX_GROUPS)] + question)
            after.append(None)
        elif sharing == "multi-turn":
            key = (p.phase, j % math.ceil(counts[p.phase] / TURNS))
            history, last = talks.get(key, ([], None))
            if max_model_len is not None and len(history) + p.input_len + p.output_len > max_model_len:
                history, last = [], None
            prompts.append(history + question)
            after.append(last)
            talks[key] = (prompts[-1] + _ids(ids, p.output_len), i)
        else:
            prompts.append(question)
            after.append(None)
    return prompts, after


def next_turn(planned: list[int], before_planned: list[int], before_sent: list[int], before_output: int,
              answer: list[int] | None) -> list[int]:
    """A turn's prompt as sent: the turn before as it was sent, its answer (the planned stand-in
    if None) and the turn's question (what follows the stand-in in the planned prompt)."""
    end = len(before_planned) + before_output
    return before_sent + (planned[len(before_planned):end] if answer is None else answer) + planned[end:]

"""A prefill step's inputs, packed on the host into one int64 buffer for one copy to the device.

Layout for `tokens` token rows and `rows` sequences (chunks):
    ids, positions, slots [tokens] | feed_rows, kv_lens [rows] | cu_seqlens [rows + 1]
each part starting on 16 bytes (an even entry): Triton compiles a kernel once per pattern of its
pointers' 16-byte alignment, so parts that moved with the step's token count made a step of a
new parity compile the rope and attention kernels again, seconds on the GPU, mid-serving.
Entries past the step's own are padding that reads and writes nothing: slot -1 (no K/V stored),
feed row -1 (id known on the host), kv_len 0, and cu_seqlens held at the step's token count, so
padding sequences have no tokens. A CUDA graph captured for a bucket reads the same layout from
static buffers (shared/prefill_graphs.py); the eager path uploads it at the step's exact size.
"""

from dataclasses import dataclass

import torch

from semipd.shared.sequence import Sequence


@dataclass
class PrefillInputs:
    """Device views into one packed buffer."""
    ids: torch.Tensor         # [tokens] a token in flight stands as 0 until `feed` fills it
    positions: torch.Tensor   # [tokens]
    slots: torch.Tensor       # [tokens] cache slot of each token, -1: none
    feed_rows: torch.Tensor   # [rows] for the first ids: their row in the step in flight, -1: known
    kv_lens: torch.Tensor     # [rows] cached tokens per sequence, this chunk's included
    cu_seqlens: torch.Tensor  # [rows + 1] where each sequence's tokens start in the step


def _even(n: int) -> int:
    return n + n % 2


class InputLayout:
    def __init__(self, tokens: int, rows: int):
        self.tokens, self.rows = tokens, rows
        t, r = _even(tokens), _even(rows)
        # where ids, positions, slots, feed_rows, kv_lens and cu_seqlens start
        self.starts = (0, t, 2 * t, 3 * t, 3 * t + r, 3 * t + 2 * r)
        self.size = 3 * t + 2 * r + rows + 1

    def views(self, buf: torch.Tensor) -> PrefillInputs:
        lengths = (self.tokens,) * 3 + (self.rows,) * 2 + (self.rows + 1,)
        return PrefillInputs(*(buf[start:start + n] for start, n in zip(self.starts, lengths)))

    def pack(self, chunks: list[tuple[Sequence, int]], page_size: int, feed_rows: list[int],
             pin: bool) -> torch.Tensor:
        """The host buffer of a step: chunk (seq, n) covers seq's tokens num_cached .. +n."""
        ids, positions, slots, kv_lens, cu = [], [], [], [], [0]
        for seq, n in chunks:
            start, stop = seq.num_cached, seq.num_cached + n
            ids += seq.token_ids[start:stop]
            ids += [0] * (stop - len(seq.token_ids))  # a token in flight
            positions += range(start, stop)
            slots += _slots(seq.block_table, start, stop, page_size)
            kv_lens.append(stop)
            cu.append(cu[-1] + n)
        host = torch.zeros(self.size, dtype=torch.int64, pin_memory=pin)
        part = {name: view.numpy() for name, view in vars(self.views(host)).items()}
        n = len(ids)
        part["ids"][:n] = ids
        part["positions"][:n] = positions
        part["slots"][:] = -1
        part["slots"][:n] = slots
        part["feed_rows"][:] = -1
        part["feed_rows"][:len(feed_rows)] = feed_rows
        part["kv_lens"][:len(kv_lens)] = kv_lens
        part["cu_seqlens"][:] = n
        part["cu_seqlens"][:len(cu)] = cu
        return host


def _slots(block_table: list[int], start: int, stop: int, page_size: int) -> list[int]:
    """Cache slots of positions start .. stop - 1, a page at a time (not a token at a time)."""
    out = []
    for i in range(start // page_size, (stop - 1) // page_size + 1):
        base = block_table[i] * page_size
        out += range(base + max(start - i * page_size, 0), base + min(stop - i * page_size, page_size))
    return out


def apply_feed(inputs: PrefillInputs, feed: tuple[torch.Tensor, list[int]] | None) -> None:
    """Fill the ids of tokens in flight from the step that sampled them (feed: its tokens on the
    device and, per first id, the row there; the rows are already in inputs.feed_rows)."""
    if feed is not None:
        fill_in_flight(inputs.ids, feed[0], inputs.feed_rows[:len(feed[1])])


def fill_in_flight(ids: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor) -> None:
    """ids[i] = tokens[rows[i]] where rows[i] >= 0, for the first len(rows) ids, on the device."""
    head = ids[:len(rows)]
    head.copy_(torch.where(rows >= 0, tokens[rows.clamp(min=0)], head))


def feed_rows(feed: tuple[torch.Tensor, list[int]] | None) -> list[int]:
    return feed[1] if feed is not None else []

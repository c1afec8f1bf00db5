"""What names a cached page: a key chained over its tokens and every token before them, and the
shared index from keys to pages.

A full page of a prompt is keyed by hash((key of the page before it, its tokens...)), the first
page by hash((ROOT, its tokens...)), so two sequences share a page's key exactly when their tokens
agree up to that page's end (vLLM's block hashes). Python hashes a tuple of ints the same way in
every process (only str and bytes hashes are salted), so the prefill, decode and unified workers
and the controller compute the same keys. A key only finds a page: a match also compares the
page's stored tokens and its link to the page before (page_state.py), so a hash collision costs
a miss, never wrong K/V.

The index is an open-addressing table (linear probing, deletion by backward shift, no
tombstones) in the allocator's shared segment, at most half full, so every process that maps
the pool finds every cached page whoever computed it. Its entries are page ids; a page's key is
read from the pages' key array.
"""

import numpy as np

ROOT = 0x5E31_9D00   # the "key before" the first page of every sequence
EMPTY = -1


def extend_keys(keys: list[int], token_ids: list[int], page_size: int) -> list[int]:
    """Append the keys of the full pages of token_ids that keys does not cover yet; returns keys."""
    for start in range(len(keys) * page_size, len(token_ids) - page_size + 1, page_size):
        keys.append(hash((keys[-1] if keys else ROOT, *token_ids[start:start + page_size])))
    return keys


def index_capacity(num_pages: int) -> int:
    """Slots for num_pages keys: a power of two at least twice as many (probes stay short)."""
    return 1 << (2 * num_pages - 1).bit_length()


class PrefixIndex:
    """key -> cached page over shared arrays: `slots` (page ids, EMPTY) and `keys` (per page).
    The caller holds the allocator's lock around every call."""

    def __init__(self, slots: np.ndarray, keys: np.ndarray):
        self.slots, self.keys = slots, keys
        self.mask = slots.size - 1

    def find(self, key: int) -> int:
        """The page filed under key, or EMPTY."""
        i = key & self.mask
        while (page := int(self.slots[i])) != EMPTY:
            if int(self.keys[page]) == key:
                return page
            i = (i + 1) & self.mask
        return EMPTY

    def insert(self, page: int) -> None:
        """File page under keys[page] (which must not be filed yet)."""
        i = int(self.keys[page]) & self.mask
        while self.slots[i] != EMPTY:
            i = (i + 1) & self.mask
        self.slots[i] = page

    def remove(self, page: int) -> None:
        """Unfile page; its followers in the probe run move back so that none becomes unreachable.
        A page not found (a process was killed mid-update) is left alone."""
        i = int(self.keys[page]) & self.mask
        while (entry := int(self.slots[i])) != page:
            if entry == EMPTY:
                return
            i = (i + 1) & self.mask
        self.slots[i] = EMPTY
        j = i
        while (entry := int(self.slots[j := (j + 1) & self.mask])) != EMPTY:
            home = int(self.keys[entry]) & self.mask
            # entry may fill the hole at i unless its home lies cyclically in (i, j]
            if (home <= i < j) or (i < j < home) or (j < home <= i):
                self.slots[i], self.slots[j] = entry, EMPTY
                i = j

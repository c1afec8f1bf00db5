"""The KV page allocator shared by the prefill and decode processes (and the single-process engine),
with the prefix cache in it.

Both phases take and return pages of one KV pool concurrently, so "find free pages, take them, mark
them taken" must be one atomic step across processes (semi-PD's allocation hazard); so must every
change to a cached page's key or reference count. The state lives in one shared-memory segment
(its layout and every change to it: page_state.py), and each call here is one critical section.

The lock is flock() on a file beside the segment: the kernel drops it when its holder dies, even by
SIGKILL, so a crashed worker cannot wedge the pool. A frozen one could (stopped, or descheduled
for good inside a critical section): the controller, whose loop must never block, waits while
one critical section (the same holder, the same count of sections begun) lasts `stuck_after_s`,
then hands its holder's pid (H_HOLDER) to `on_stuck`, which kills it. A holder frozen between
taking the lock and writing its pid there is named by the kernel's table of locks instead.

Pages carry their owner so that the controller can reclaim a dead worker's requests with
free_owner(), and with free_owner(releasing(pid)) the pages it was still holding back for a step
in flight (shared/pipeline.py), whose requests are gone. The tag names the worker: while an old
decode worker finishes its last step beside its successor, the death of one must not free what
the other holds back. A sequence's hold on cached pages goes with its own pages, so the same calls
let go of it, exactly once.
"""

import fcntl
import math
import os
import threading
import time
from contextlib import contextmanager
from multiprocessing import shared_memory

import numpy as np

from semipd.shared.page_state import CACHED, FREE, H_HOLDER, H_TOP, PageState, releaser, releasing, segment_size
from semipd.shared.runtime import owned_name, runtime_dir
from semipd.shared.shared_memory import attach_segment, unlink_segment

__all__ = ["CACHED", "FREE", "PageAllocator", "releaser", "releasing"]


def _lock_path(name: str) -> str:
    return os.path.join(runtime_dir(), f"{name}.lock")


def _flock_holder(fd: int) -> int:
    """The pid that holds a flock() on fd's file, from /proc/locks (0 if none is listed there)."""
    st = os.fstat(fd)
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            # "1: FLOCK  ADVISORY  WRITE PID MAJOR:MINOR:INODE 0 EOF"; a waiter's has "->" after "1:"
            for fields in map(str.split, f):
                if fields[1:2] == ["FLOCK"] and fields[5:6] == [file]:
                    return int(fields[4])
    except (OSError, ValueError):
        pass
    return 0


class PageAllocator:
    def __init__(self, shm: shared_memory.SharedMemory, lock_fd: int, is_creator: bool):
        self._shm, self._lock_fd, self._is_creator = shm, lock_fd, is_creator
        self._pid = os.getpid()
        # flock() excludes other open files, not other threads sharing ours, hence the thread lock.
        self._thread_lock = threading.Lock()
        self._state = PageState(shm.buf)
        self._holder = np.ndarray((2,), np.int64, shm.buf, offset=8 * H_HOLDER)  # (pid, sections begun)
        self.num_pages, self.page_size = self._state.num_pages, self._state.page_size
        self.caching = self._state.caching
        self.stuck_after_s: float | None = None  # None: wait for the lock as long as it takes
        self.on_stuck = None                      # on_stuck(pid): the holder past stuck_after_s

    @classmethod
    def create(cls, num_pages: int, page_size: int = 16, caching: bool = True,
               name: str | None = None) -> "PageAllocator":
        """A new pool of num_pages free pages of page_size tokens, with a prefix cache unless
        caching is False. The creator unlinks the segment on close()."""
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        name = name or owned_name("pages")
        shm = shared_memory.SharedMemory(name, create=True, size=segment_size(num_pages, page_size))
        PageState.init(shm.buf, num_pages, page_size, caching)
        try:
            # Made last: attach() needs the lock file, so nobody sees a half-initialized pool.
            lock_fd = os.open(_lock_path(name), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            shm.close()
            shm.unlink()
            raise
        return cls(shm, lock_fd, True)

    @classmethod
    def attach(cls, name: str) -> "PageAllocator":
        """Open the pool that create() made (in any process) under this name."""
        shm = attach_segment(name)
        try:
            lock_fd = os.open(_lock_path(name), os.O_RDWR)
        except FileNotFoundError:
            shm.close()
            raise
        return cls(shm, lock_fd, False)

    @property
    def name(self) -> str:
        return self._shm.name

    def alloc(self, n: int, owner: int, prefix: list[int] = (), keys: list[int] = (),
              prompt_tokens: int = 0) -> list[int] | None:
        """n pages tagged with owner, or None (taking nothing) when fewer than n are free or held
        by nobody in the cache. With a cached prefix (from match(), with its keys) the result is
        the new block table: the prefix pages still cached, held by this sequence, then the n
        new ones. prompt_tokens: a prompt starts here, counted with its hit in cache_stats()."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if owner < 0:
            raise ValueError(f"owner must be a request id >= 0, got {owner}")
        with self._locked():
            return self._state.alloc(n, owner, list(prefix), list(keys), prompt_tokens)

    def free(self, pages: list[int]) -> None:
        """Return a sequence's pages to the pool (its cached prefix among them stays cached, let go
        of). A page that is already free raises ValueError; nothing changes."""
        pages = self._check_pages(pages)
        with self._locked():
            self._state.free(pages)

    def release_later(self, pages: list[int]) -> None:
        """Tag held pages releasing(this process): their request is gone, free() comes once they
        are safe. Cached pages among them stay held until then."""
        pages = self._check_pages(pages)
        with self._locked():
            self._state.release_later(pages, os.getpid())

    def free_owner(self, owner: int) -> int:
        """Free every page tagged with owner (the requests of a dead worker, or the pages it held
        back: releasing(pid)), letting go of their holds on cached pages; returns the count. Also
        restores the pool after a process was killed inside another call."""
        if owner in (FREE, CACHED):
            raise ValueError("free_owner needs an owner, not FREE or CACHED")
        with self._locked():
            return self._state.free_owner(owner)

    def match(self, keys: list[int], token_ids: list[int]) -> list[int]:
        """The cached pages of the longest prefix of these page keys (prefix_cache.extend_keys
        over token_ids); [] without a cache. Nothing is held until alloc() takes them."""
        with self._locked():
            return self._state.match(keys, token_ids)

    def publish(self, owner: int, block_table: list[int], keys: list[int], token_ids: list[int]) -> int:
        """Cache a sequence's computed full pages (keys: one per such page) after its cached
        prefix, except its block table's last page; returns how many were cached."""
        with self._locked():
            return self._state.publish(owner, block_table, keys, token_ids)

    def num_free(self) -> int:
        """Pages alloc() can hand out: free ones and cached ones that no sequence holds."""
        with self._locked():
            return self._state.num_free()

    def owners(self) -> dict[int, int]:
        """owner -> number of pages held (CACHED: pages in the cache), for stats and leak checks."""
        with self._locked():
            owner = self._state.owner
            ids, counts = np.unique(owner[owner != FREE], return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def cache_stats(self) -> dict:
        """Cached pages (those some sequence holds among them), prompt tokens started, those
        served from the cache, its hit rate and the pages evicted."""
        with self._locked():
            return self._state.cache_stats()

    def audit(self) -> list[str]:
        """What is inconsistent (empty when all is well): refs against the holds that define them,
        the free stack against the owner tags, the index against the cached pages."""
        with self._locked():
            st, problems = self._state, []
            wrong = np.flatnonzero(st.refs != st.true_refs())
            if wrong.size:
                problems.append(f"refs of pages {wrong.tolist()} are {st.refs[wrong].tolist()}, "
                                f"should be {st.true_refs()[wrong].tolist()}")
            top = int(st.header[H_TOP])
            if sorted(st.stack[:top].tolist()) != np.flatnonzero(st.owner == FREE).tolist():
                problems.append("the free stack does not list exactly the free pages")
            lost = [p for p in np.flatnonzero(st.owner == CACHED).tolist() if st.index.find(int(st.key[p])) != p]
            if lost:
                problems.append(f"cached pages {lost} are not in the index")
        return problems

    def close(self) -> None:
        """Detach. The creator also removes the segment and the lock file; attach() fails after."""
        shm, self._shm = self._shm, None
        if shm is None:
            return
        self._state = self._holder = None  # release the views over the buffer
        shm.close()
        os.close(self._lock_fd)
        if self._is_creator:
            os.unlink(_lock_path(shm.name))
            unlink_segment(shm)

    def __enter__(self) -> "PageAllocator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @contextmanager
    def _locked(self):
        if os.getpid() != self._pid:
            # A forked child shares our open lock file, so flock() would not exclude it.
            raise RuntimeError("PageAllocator inherited through fork; attach() by name in the child")
        with self._thread_lock:
            self._acquire()
            self._holder[:] = self._pid, self._holder[1] + 1
            try:
                yield
            finally:
                self._holder[0] = 0
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _acquire(self) -> None:
        if self.stuck_after_s is None:
            return fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        seen, since = None, time.monotonic()
        while True:
            try:
                return fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                now, section = time.monotonic(), (int(self._holder[0]), int(self._holder[1]))
                if section != seen:  # another critical section: its own time starts now
                    seen, since = section, now
                elif now - since > self.stuck_after_s:
                    holder = section[0] or self._unnamed_holder(section)
                    if holder:
                        self.on_stuck(holder)  # its death drops the lock
                    since = math.inf if holder else now  # told once per section; else look again later
                time.sleep(0.001)

    def _unnamed_holder(self, section: tuple[int, int]) -> int:
        """The lock's holder by the kernel's lock table, if the section is still the one that
        has lasted: a slow holder may have ended it since, and a healthy one taken the lock."""
        holder = _flock_holder(self._lock_fd)
        return holder if (int(self._holder[0]), int(self._holder[1])) == section else 0

    def _check_pages(self, pages: list[int]) -> np.ndarray:
        pages = np.asarray(pages, dtype=np.int64).reshape(-1)
        if pages.size and (pages.min() < 0 or pages.max() >= self.num_pages):
            raise ValueError(f"page ids must lie in [0, {self.num_pages}), got {pages.tolist()}")
        if len(set(pages.tolist())) != pages.size:
            raise ValueError(f"a page is listed twice in one free: {pages.tolist()}")
        return pages

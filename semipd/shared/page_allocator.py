"""The KV page allocator shared by the prefill and decode processes (and the single-process engine).

Both phases take and return pages of one KV pool concurrently, so "find free pages, take them, mark
them taken" must be one atomic step across processes (semi-PD's allocation hazard). State lives in
one shared-memory segment:

    header  int64[2]            num_pages, top (number of free pages)
    owner   int64[num_pages]    request id holding each page, -1 when free, releasing(pid) <= -2
                                when let go by worker pid, whose launched GPU step may still write it
    stack   int32[num_pages]    free page ids in stack[:top]; alloc pops from the top

The lock is flock() on a file beside the segment: the kernel drops it when its holder dies, even by
SIGKILL, so a crashed worker cannot wedge the pool. Pages carry their owner so that the controller
can reclaim a dead worker's requests with free_owner(), and with free_owner(releasing(pid)) the
pages it was still holding back for a step in flight (shared/pipeline.py), whose requests are
gone. The tag names the worker: while an old decode worker finishes its last step beside its
successor, the death of one must not free what the other holds back.
"""

import fcntl
import os
import threading
from contextlib import contextmanager
from multiprocessing import shared_memory

import numpy as np

from semipd.shared.runtime import owned_name, runtime_dir
from semipd.shared.shared_memory import attach_segment, unlink_segment

FREE = -1


def releasing(pid: int) -> int:
    """The owner tag of pages that process pid has let go of but may still write."""
    return -2 - pid


def releaser(owner: int) -> int | None:
    """The pid behind a releasing() tag; None for a request id."""
    return -2 - owner if owner <= -2 else None


def _lock_path(name: str) -> str:
    return os.path.join(runtime_dir(), f"{name}.lock")


def _views(shm: shared_memory.SharedMemory, num_pages: int) -> tuple[np.ndarray, ...]:
    """header, owner, stack: the segment's layout (see the top of this file)."""
    return (np.ndarray((2,), np.int64, shm.buf),
            np.ndarray((num_pages,), np.int64, shm.buf, offset=16),
            np.ndarray((num_pages,), np.int32, shm.buf, offset=16 + 8 * num_pages))


class PageAllocator:
    def __init__(self, shm: shared_memory.SharedMemory, lock_fd: int, is_creator: bool):
        self._shm, self._lock_fd, self._is_creator = shm, lock_fd, is_creator
        self._pid = os.getpid()
        # flock() excludes other open files, not other threads sharing ours, hence the thread lock.
        self._thread_lock = threading.Lock()
        self.num_pages = int(np.ndarray((1,), np.int64, shm.buf)[0])
        self._header, self._owner, self._stack = _views(shm, self.num_pages)

    @classmethod
    def create(cls, num_pages: int, name: str | None = None) -> "PageAllocator":
        """A new pool of num_pages free pages. The creator unlinks the segment on close()."""
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        name = name or owned_name("pages")
        shm = shared_memory.SharedMemory(name, create=True, size=16 + 12 * num_pages)
        header, owner, stack = _views(shm, num_pages)
        header[:] = num_pages, num_pages
        owner[:] = FREE
        stack[:] = np.arange(num_pages - 1, -1, -1)  # so that pages 0, 1, ... go first
        del header, owner, stack  # live views would make shm.close() fail
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

    def alloc(self, n: int, owner: int) -> list[int] | None:
        """n pages tagged with owner, or None (taking nothing) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        self._check_owner(owner)
        with self._locked():
            top = int(self._header[1])
            if n > top:
                return None
            pages = self._stack[top - n:top][::-1].copy()
            # Tag, then pop: a holder killed in between leaves the pages on the free stack.
            self._owner[pages] = owner
            self._header[1] = top - n
        return pages.tolist()

    def free(self, pages: list[int]) -> None:
        """Return pages to the pool. A page that is already free raises ValueError; nothing changes."""
        pages = self._check_pages(pages)
        with self._locked():
            already_free = pages[self._owner[pages] == FREE]
            if already_free.size:
                raise ValueError(f"double free of page(s) {already_free.tolist()}")
            top = int(self._header[1])
            self._stack[top:top + pages.size] = pages
            self._owner[pages] = FREE
            self._header[1] = top + pages.size

    def release_later(self, pages: list[int]) -> None:
        """Tag held pages releasing(this process): their request is gone, free() comes once they
        are safe."""
        pages = self._check_pages(pages)
        with self._locked():
            if (self._owner[pages] == FREE).any():
                raise ValueError(f"page(s) {pages[self._owner[pages] == FREE].tolist()} are free")
            self._owner[pages] = releasing(os.getpid())

    def free_owner(self, owner: int) -> int:
        """Free every page tagged with owner (the requests of a dead worker, or the pages it held
        back: releasing(pid)); returns the count.

        The owner tags are the truth: this rebuilds the free stack from them, which also restores
        the pool after a process was killed inside alloc() or free() (freeing its owners)."""
        if owner == FREE:
            raise ValueError("free_owner needs an owner, not FREE")
        with self._locked():
            held = self._owner == owner
            self._owner[held] = FREE
            free_pages = np.flatnonzero(self._owner == FREE)[::-1]
            self._stack[:free_pages.size] = free_pages
            self._header[1] = free_pages.size
        return int(held.sum())

    def num_free(self) -> int:
        with self._locked():
            return int(self._header[1])

    def owners(self) -> dict[int, int]:
        """owner -> number of pages held, for stats and leak checks."""
        with self._locked():
            ids, counts = np.unique(self._owner[self._owner != FREE], return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def close(self) -> None:
        """Detach. The creator also removes the segment and the lock file; attach() fails after."""
        shm, self._shm = self._shm, None
        if shm is None:
            return
        self._header = self._owner = self._stack = None  # release the views over the buffer
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
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _check_owner(self, owner: int) -> None:
        if owner < 0:
            raise ValueError(f"owner must be a request id >= 0, got {owner}")

    def _check_pages(self, pages: list[int]) -> np.ndarray:
        pages = np.asarray(pages, dtype=np.int64).reshape(-1)
        if pages.size and (pages.min() < 0 or pages.max() >= self.num_pages):
            raise ValueError(f"page ids must lie in [0, {self.num_pages}), got {pages.tolist()}")
        if len(set(pages.tolist())) != pages.size:
            raise ValueError(f"a page is listed twice in one free: {pages.tolist()}")
        return pages

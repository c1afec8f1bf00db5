"""PageAllocator: single-process semantics, then real processes sharing one pool (spawn, SIGKILL)."""

import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from semipd.shared.page_allocator import PageAllocator, _lock_path, releasing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def pool():
    allocator = PageAllocator.create(16)
    yield allocator
    name = allocator.name
    allocator.close()
    assert not os.path.exists(f"/dev/shm/{name}"), "segment leaked"
    assert not os.path.exists(_lock_path(name)), "lock file leaked"


def test_alloc_and_free(pool):
    assert pool.num_pages == 16 and pool.num_free() == 16
    first = pool.alloc(3, owner=1)
    assert first == [0, 1, 2]
    second = pool.alloc(4, owner=2)
    assert len(set(first + second)) == 7 and pool.num_free() == 9
    assert pool.alloc(0, owner=3) == []
    pool.free(first)
    assert pool.num_free() == 12 and pool.owners() == {2: 4}
    assert set(pool.alloc(12, owner=3)) | set(second) == set(range(16))


def test_alloc_is_all_or_nothing(pool):
    held = pool.alloc(10, owner=1)
    assert pool.alloc(7, owner=2) is None
    assert pool.num_free() == 6 and pool.owners() == {1: 10}
    rest = pool.alloc(6, owner=2)
    assert pool.alloc(1, owner=3) is None
    assert sorted(held + rest) == list(range(16))


def test_double_free_raises_and_changes_nothing(pool):
    pages = pool.alloc(4, owner=1)
    other = pool.alloc(2, owner=2)
    pool.free(pages[:2])
    with pytest.raises(ValueError, match="double free"):
        pool.free(pages)  # half of it is still held: that half must not be freed either
    with pytest.raises(ValueError, match="listed twice"):
        pool.free([other[0], other[0]])
    assert pool.num_free() == 12 and pool.owners() == {1: 2, 2: 2}
    pool.free(pages[2:] + other)
    assert pool.num_free() == 16 and pool.owners() == {}


def test_free_owner_reclaims_only_that_owner(pool):
    pool.alloc(3, owner=5)
    kept = pool.alloc(4, owner=6)
    pool.alloc(2, owner=5)
    assert pool.owners() == {5: 5, 6: 4}
    assert pool.free_owner(5) == 5
    assert pool.free_owner(5) == 0
    assert pool.owners() == {6: 4} and pool.num_free() == 12
    assert set(pool.alloc(12, owner=7)).isdisjoint(kept)


def test_pages_released_later_stay_taken_until_freed(pool):
    pages = pool.alloc(3, owner=5)
    pool.release_later(pages[:2])  # the request is gone; a launched step may still write them
    assert pool.owners() == {releasing(os.getpid()): 2, 5: 1} and pool.num_free() == 13
    assert pool.free_owner(5) == 1 and pool.num_free() == 14  # the request's id no longer finds them
    pool.free(pages[:2])  # the step is done
    assert pool.owners() == {} and pool.num_free() == 16
    pool.release_later(pool.alloc(2, owner=6))
    assert pool.free_owner(releasing(os.getpid())) == 2 and pool.num_free() == 16  # their worker died
    with pytest.raises(ValueError, match="free"):
        pool.release_later([0])


def test_invalid_arguments(pool):
    with pytest.raises(ValueError, match="negative number"):
        pool.alloc(-1, owner=1)
    with pytest.raises(ValueError, match="owner"):
        pool.alloc(1, owner=-1)
    with pytest.raises(ValueError, match="owner"):
        pool.free_owner(-1)  # FREE is no owner (releasing tags, <= -2, are)
    with pytest.raises(ValueError, match="must lie in"):
        pool.free([16])
    with pytest.raises(ValueError, match="must lie in"):
        pool.free([-1])
    with pytest.raises(ValueError, match="num_pages"):
        PageAllocator.create(0)
    assert pool.num_free() == 16


def test_copy_inherited_through_fork_refuses_to_run(pool):
    # The forked copy shares the parent's open lock file, which flock() would not exclude.
    pid = os.fork()
    if pid == 0:
        try:
            pool.alloc(1, owner=1)
        except RuntimeError:
            os._exit(0)
        os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pool.num_free() == 16


def test_attach_sees_the_same_pool_and_close_removes_it():
    with PageAllocator.create(8) as creator:
        name = creator.name
        with PageAllocator.attach(name) as attached:
            assert attached.num_pages == 8
            pages = attached.alloc(3, owner=4)
            assert creator.owners() == {4: 3}
        creator.free(pages)  # the attacher's close() left the pool in place
        assert creator.num_free() == 8
    assert not os.path.exists(f"/dev/shm/{name}") and not os.path.exists(_lock_path(name))
    with pytest.raises(FileNotFoundError):
        PageAllocator.attach(name)


def _run_python(script, *args):
    """Run script in a fresh interpreter; its stderr, which must stay empty, includes its resource
    tracker's (capture_output waits for the tracker too, since it holds stderr until it exits)."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_unrelated_attacher_does_not_destroy_the_pool(pool):
    # A process not started by multiprocessing has its own resource tracker, which would unlink the
    # segment when that process exits if attach() left the segment registered there.
    _run_python("""
        import sys
        from semipd.shared.page_allocator import PageAllocator
        with PageAllocator.attach(sys.argv[1]) as pool:
            pool.alloc(2, owner=7)
        """, pool.name)
    assert os.path.exists(f"/dev/shm/{pool.name}")
    assert pool.owners() == {7: 2}


def test_spawned_attacher_leaves_the_tracker_quiet():
    # A child started by multiprocessing shares its parent's resource tracker; its attach() must
    # neither unlink the pool when it exits nor make the creator's unlink look like a double one.
    _run_python("""
        import multiprocessing
        from semipd.shared.page_allocator import PageAllocator
        with PageAllocator.create(8) as pool:
            spawn = multiprocessing.get_context("spawn")
            child = spawn.Process(target=PageAllocator.attach, args=(pool.name,))
            child.start()
            child.join()
            assert child.exitcode == 0 and pool.alloc(8, owner=1) is not None
        """)


def _hammer(name, claims, worker, num_ops, seed, results):
    """Random allocs and frees; every page must come to this worker free and unclaimed.

    claims[page] is the worker that holds the page in this test's own bookkeeping, -1 when free.
    A page the allocator gives to both workers shows up as a claim by the other worker."""
    rng = random.Random(seed)
    claim = np.frombuffer(claims, dtype=np.int64)
    allocator = PageAllocator.attach(name)
    held, held_pages = {}, set()  # owner (one per allocation) -> pages; all pages held
    next_owner, failed_allocs = worker * 10**9, 0
    for _ in range(num_ops):
        if held and rng.random() < 0.5:
            owner = rng.choice(list(held))
            pages = held.pop(owner)
            assert (claim[pages] == worker).all(), f"worker {worker}: a held page was claimed by another"
            assert (allocator._state.owner[pages] == owner).all(), f"worker {worker}: a held page was retagged"
            held_pages.difference_update(pages)
            claim[pages] = -1  # before freeing: once freed, the other worker may get them at once
            if rng.random() < 0.1:
                assert allocator.free_owner(owner) == len(pages)
            else:
                allocator.free(pages)
        else:
            n = rng.randint(1, 16)
            pages = allocator.alloc(n, next_owner)
            if pages is None:
                failed_allocs += 1
                continue
            assert len(set(pages)) == n and held_pages.isdisjoint(pages), f"worker {worker}: got a held page"
            assert (allocator._state.owner[pages] == next_owner).all(), f"worker {worker}: page tagged for another"
            assert (claim[pages] == -1).all(), f"worker {worker}: page already held by the other worker"
            claim[pages] = worker
            held[next_owner] = pages
            held_pages.update(pages)
            next_owner += 1
    for owner, pages in held.items():
        claim[pages] = -1
        allocator.free(pages)
    allocator.close()
    results.put((worker, failed_allocs))


def test_two_processes_never_hold_the_same_page():
    num_pages, ops_per_worker = 128, 50_000  # 1e5 operations in all
    claims = SPAWN.Array("q", num_pages, lock=False)
    np.frombuffer(claims, dtype=np.int64)[:] = -1
    results = SPAWN.Queue()
    with PageAllocator.create(num_pages) as allocator:
        workers = [SPAWN.Process(target=_hammer, daemon=True,
                                 args=(allocator.name, claims, w, ops_per_worker, w, results))
                   for w in (1, 2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
            assert w.exitcode == 0, f"worker exited with {w.exitcode} (see its traceback above)"
        failed_allocs = dict(results.get(timeout=5) for _ in workers)
        assert allocator.num_free() == num_pages and allocator.owners() == {}
        assert (np.frombuffer(claims, dtype=np.int64) == -1).all()
        # The pool ran dry now and then, so the None path ran under contention too.
        assert all(count > 0 for count in failed_allocs.values()), failed_allocs


def _hold_lock(name, owner, locked):
    allocator = PageAllocator.attach(name)
    allocator.alloc(5, owner)
    with allocator._locked():
        locked.set()
        time.sleep(60)


def test_lock_holder_killed_does_not_deadlock():
    with PageAllocator.create(32) as allocator:
        locked = SPAWN.Event()
        holder = SPAWN.Process(target=_hold_lock, args=(allocator.name, 9, locked), daemon=True)
        holder.start()
        assert locked.wait(timeout=30)
        got = []
        waiter = threading.Thread(target=lambda: got.append(allocator.alloc(3, owner=1)), daemon=True)
        waiter.start()
        waiter.join(timeout=0.3)
        assert waiter.is_alive(), "alloc did not wait for the lock holder"
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=10)
        waiter.join(timeout=5)
        assert not waiter.is_alive(), "deadlock: the dead holder's lock was not released"
        assert len(got[0]) == 3
        assert allocator.owners() == {9: 5, 1: 3}
        assert allocator.free_owner(9) == 5
        allocator.free(got[0])
        assert allocator.num_free() == 32


class _DieOnTopUpdate(np.ndarray):
    """A header view that SIGKILLs its process when an operation publishes the new free count,
    i.e. after it has already changed the owner tags: the worst moment for a worker to die."""

    def __setitem__(self, index, value):
        os.kill(os.getpid(), signal.SIGKILL)


def _die_inside(name, owner, op):
    allocator = PageAllocator.attach(name)
    pages = allocator.alloc(5, owner)
    allocator._state.header = allocator._state.header.view(_DieOnTopUpdate)
    if op == "alloc":
        allocator.alloc(4, owner)
    else:
        allocator.free(pages[:2])


@pytest.mark.parametrize("op, tagged_at_death", [("alloc", 9), ("free", 3)])
def test_worker_killed_inside_an_operation_is_reclaimed(op, tagged_at_death):
    with PageAllocator.create(64) as allocator:
        worker = SPAWN.Process(target=_die_inside, args=(allocator.name, 7, op), daemon=True)
        worker.start()
        worker.join(timeout=30)
        assert worker.exitcode == -signal.SIGKILL
        assert allocator.free_owner(7) == tagged_at_death
        assert allocator.num_free() == 64 and allocator.owners() == {}
        everything = allocator.alloc(64, owner=1)
        assert sorted(everything) == list(range(64)), "a page is missing or on the free stack twice"
        allocator.free(everything)

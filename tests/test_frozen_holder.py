"""A process frozen inside one of the page allocator's critical sections (stopped, here) must not
wedge the controller: a waiter with stuck_after_s hands the holder's pid to on_stuck, whose kill
drops the lock, and only that one's: a healthy worker taking the lock over and over beside it,
which had queued behind the frozen one, is not named. Workers wait as long as it takes. A holder
frozen before it could write its pid into the segment is named too."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

from semipd.shared.page_allocator import PageAllocator, _lock_path
from tests.serving import ROOT

HOLD = """
    import sys
    from semipd.shared.page_allocator import PageAllocator, _lock_path
    pool = PageAllocator.attach(sys.argv[1])
    with pool._locked():  # inside a critical section, as a worker mid-alloc
        print("holding", flush=True)
        sys.stdin.read()  # until killed
    """
HOLD_UNNAMED = """
    import fcntl, sys
    with open(sys.argv[1]) as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the lock taken, the holder's pid not yet written
        print("holding", flush=True)
        sys.stdin.read()  # until killed
    """
BUSY = """
    import sys, time
    from semipd.shared.page_allocator import PageAllocator, _lock_path
    pool = PageAllocator.attach(sys.argv[1])
    print("started", flush=True)
    end = time.monotonic() + 3
    while time.monotonic() < end:  # short critical sections, one after another, for seconds
        pool.free(pool.alloc(1, owner=9))
    """


def test_a_frozen_holder_is_handed_to_on_stuck_and_the_wait_ends():
    with PageAllocator.create(8) as pool:
        pool.alloc(3, owner=5)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), pool.name], cwd=ROOT,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        busy = None
        try:
            assert child.stdout.readline() == "holding\n"
            os.kill(child.pid, signal.SIGSTOP)  # frozen with the lock held
            busy = subprocess.Popen([sys.executable, "-c", textwrap.dedent(BUSY), pool.name], cwd=ROOT,
                                    stdout=subprocess.PIPE, text=True)
            assert busy.stdout.readline() == "started\n"  # and now waits behind the frozen one
            stuck = []

            def kill(pid: int) -> None:
                stuck.append(pid)
                os.kill(pid, signal.SIGKILL)
            pool.stuck_after_s, pool.on_stuck = 1.0, kill
            began, free = time.monotonic(), []
            waiter = threading.Thread(target=lambda: free.append(pool.num_free()), daemon=True)
            waiter.start()
            waiter.join(10)  # it waits, names the holder, and goes on once that is dead
            # 4 if the busy one held its page just then
            assert free in ([4], [5]) and stuck == [child.pid] and time.monotonic() - began >= 1.0
            assert child.wait(10) == -signal.SIGKILL
            assert busy.wait(30) == 0 and stuck == [child.pid]  # the healthy one was never named
            assert pool.audit() == [] and pool.alloc(5, owner=6) is not None  # the state is whole
        finally:
            for proc in (child, busy):
                if proc is not None:
                    proc.kill()
                    proc.wait()


def test_a_holder_frozen_before_naming_itself_is_found_by_its_lock():
    with PageAllocator.create(8) as pool:
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD_UNNAMED), _lock_path(pool.name)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "holding\n"
            os.kill(child.pid, signal.SIGSTOP)
            stuck = []

            def kill(pid: int) -> None:
                stuck.append(pid)
                os.kill(pid, signal.SIGKILL)
            pool.stuck_after_s, pool.on_stuck = 1.0, kill
            free = []
            waiter = threading.Thread(target=lambda: free.append(pool.num_free()), daemon=True)
            waiter.start()
            waiter.join(10)  # without a name for the holder it would wait for good
            assert free == [8] and stuck == [child.pid]
            assert child.wait(10) == -signal.SIGKILL and pool.audit() == []
        finally:
            child.kill()
            child.wait()

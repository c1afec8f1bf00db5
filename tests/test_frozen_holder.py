"""A process frozen inside one of the page allocator's critical sections (stopped, here) must not
wedge the controller: a waiter with stuck_after_s hands the holder's pid to on_stuck, whose kill
drops the lock; a waiter without it waits, as workers do."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

from semipd.shared.page_allocator import PageAllocator
from tests.serving import ROOT

HOLD = """
    import sys
    from semipd.shared.page_allocator import PageAllocator
    pool = PageAllocator.attach(sys.argv[1])
    with pool._locked():  # inside a critical section, as a worker mid-alloc
        print("holding", flush=True)
        sys.stdin.read()  # until killed
    """


def test_a_frozen_holder_is_handed_to_on_stuck_and_the_wait_ends():
    with PageAllocator.create(8) as pool:
        pool.alloc(3, owner=5)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), pool.name], cwd=ROOT,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "holding\n"
            os.kill(child.pid, signal.SIGSTOP)  # frozen with the lock held
            stuck = []

            def kill(pid: int) -> None:
                stuck.append(pid)
                os.kill(pid, signal.SIGKILL)
            pool.stuck_after_s, pool.on_stuck = 0.3, kill
            began, free = time.monotonic(), []
            waiter = threading.Thread(target=lambda: free.append(pool.num_free()), daemon=True)
            waiter.start()
            waiter.join(10)  # it waits, names the holder, and goes on once that is dead
            assert free == [5] and stuck == [child.pid] and time.monotonic() - began >= 0.3
            assert child.wait(10) == -signal.SIGKILL
            assert pool.audit() == [] and pool.alloc(5, owner=6) is not None  # the state is whole
        finally:
            child.kill()
            child.wait()

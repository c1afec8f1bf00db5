"""Two `honcho start` / Ctrl-C cycles with the repository's Procfile leave nothing behind
(tests/honcho_cycles.py runs the twenty of issue 24's acceptance by hand)."""

import shutil

import pytest

from tests.honcho_cycles import cycle


@pytest.mark.skipif(shutil.which("honcho") is None, reason="needs honcho (a dependency of semipd)")
def test_honcho_start_and_ctrl_c_twice_leave_nothing():
    for _ in range(2):
        took, bad = cycle()
        assert not bad, bad

"""The test suite cleans up after itself (issue 24: `semipd-test-*` folders, some with sockets,
stayed in /tmp): a stopped server's folder goes at once, the rest at the end of the session
(conftest.py), which checks that none is left."""

import os

from tests.serving import Server


def test_a_stopped_server_leaves_no_folder_behind():
    server = Server("tiny")
    assert os.path.exists(server.address.removeprefix("ipc://"))
    assert server.stop() == 0
    assert not os.path.exists(server.folder)

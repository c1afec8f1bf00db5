"""What the two end-to-end serving test files share: a Llama test checkpoint, a server over it
(one per test module), and a workload of mixed lengths."""

import random

import pytest

from tests.conftest import make_checkpoint
from tests.serving import Server


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) of mixed lengths, page multiples and length 1 included."""
    rng = random.Random(seed)
    lens = [1, 16, 32, 48] + [rng.randint(2, 60) for _ in range(n - 4)]
    return [([rng.randrange(3, 300) for _ in range(n_)], rng.randint(1, 20)) for n_ in lens]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("serve-llama"))
    make_checkpoint(path, "llama")
    return path


@pytest.fixture(scope="module")
def server(model):
    s = Server(model)
    yield s
    assert s.stop() == 0

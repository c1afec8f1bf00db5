"""What the end-to-end serving test files share: a Llama test checkpoint, a server over it (one
per test module), a workload of mixed lengths, the in-process engine's greedy outputs for it, and a
raw client socket with raw requests."""

import random

import msgpack
import pytest
import zmq

from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.sampling_params import SamplingParams
from tests.conftest import make_checkpoint
from tests.serving import Server


def workload(n: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) of mixed lengths, page multiples and length 1 included."""
    rng = random.Random(seed)
    lens = [1, 16, 32, 48] + [rng.randint(2, 60) for _ in range(n - 4)]
    return [([rng.randrange(3, 300) for _ in range(n_)], rng.randint(1, 20)) for n_ in lens]


def engine_greedy(model: str, work: list[tuple[list[int], int]], **config) -> list[list[int]]:
    """Greedy outputs of the in-process engine (what `semipd generate` runs), one process."""
    engine = Engine(EngineConfig(model=model, device="cpu", progress=False, **config))
    try:
        outs = engine.generate([p for p, _ in work], [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True)
                                                       for _, m in work])
    finally:
        engine.close()
    return [o.token_ids for o in outs]


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


def raw_socket(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def generate(request_id="r", **fields) -> bytes:
    return msgpack.packb(["GenerateRequest", {"request_id": request_id, **fields}])

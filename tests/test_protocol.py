"""The one serializer: every message survives a round trip, nested messages included, and a
wrong type anywhere (an element of a list too) is one ProtocolError that names the field."""

import msgpack
import pytest

from semipd.shared import protocol


def state(seq_id: int, n: int) -> protocol.SeqState:
    return protocol.SeqState(seq_id, list(range(1000, 1000 + n)), n // 2, {"temperature": 0.5, "stop": ["x"]},
                             seed=7, block_table=[3, 9, 4], num_cached=n - 1)


MESSAGES = [
    protocol.HandedOver([state(1, 40), state(2, 1)]),
    protocol.PrefillDone([state(3, 5)], finished=[None]),
    protocol.DecodeStep([1, 2], [17, 18], ["stop", None]),
    protocol.Final("r", "content_filter", ttft_s=0.25, itl_s=[0.01, 0.5],
                   verdict={"token_index": 3, "score": 0.9}),
    protocol.ScmBatch(opens=[protocol.ScmOpen(4, prompt="hi"), protocol.ScmOpen(5, prompt_ids=[1, 2])],
                      appends=[protocol.ScmAppend(4, 2, text=" there", last=True)], closes=[6]),
    protocol.ScmScored([4, 5], [2, 0], [None, {"score": 0.7}], [None, "full"]),
    protocol.Shutdown(),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    assert protocol.decode(protocol.encode(msg)) == msg


def test_float_fields_take_integers_as_floats():
    data = msgpack.packb(["Final", {"request_id": "r", "finish_reason": "stop", "ttft_s": 1, "itl_s": [0, 1.5]}])
    final = protocol.decode(data)
    assert final.ttft_s == 1.0 and type(final.ttft_s) is float
    assert final.itl_s == [0.0, 1.5] and all(type(x) is float for x in final.itl_s)


@pytest.mark.parametrize("fields, message", [
    ({"seq_ids": [1, True], "tokens": [1, 2], "finished": [None, None]},
     "DecodeStep.seq_ids[]: expected int, got bool"),
    ({"seq_ids": [1, 2], "tokens": [1, 2.5], "finished": [None, None]}, "DecodeStep.tokens[]: expected int, got float"),
    ({"seq_ids": [1], "tokens": "7", "finished": [None]}, "DecodeStep.tokens: expected a list, got str"),
    ({"seq_ids": [1], "tokens": [7], "finished": [3]}, "DecodeStep.finished[]: expected str or null, got int"),
])
def test_wrong_types_name_the_field(fields, message):
    with pytest.raises(protocol.ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        protocol.decode(msgpack.packb(["DecodeStep", fields]))


def test_nested_message_is_checked_too():
    seq = {"seq_id": 1, "token_ids": [1, "2"], "num_prompt": 1, "params": {}, "seed": 0}
    with pytest.raises(protocol.ProtocolError, match=r"SeqState.token_ids\[\]: expected int, got str"):
        protocol.decode(msgpack.packb(["RunSeqs", {"seqs": [seq]}]))


def test_only_messages_and_plain_data_can_be_sent():
    with pytest.raises(TypeError, match="cannot send a set"):
        protocol.encode(protocol.Reply("r", True, data={"x": {1, 2}}))


def test_a_worker_link_carries_a_hand_over_past_the_client_bound(tmp_path):
    """Clients and the monitor stay bound to 16 MiB; a switch hands over everything a worker
    holds (here 20 MB of token ids), which the controller's own worker links must carry."""
    import zmq

    from semipd.shared.sockets import bind_router
    from semipd.services.worker import ControllerLink
    seqs = [protocol.SeqState(i, list(range(100_000, 140_000)), 20_000, {}, seed=1) for i in range(100)]
    assert len(protocol.encode(protocol.RunSeqs(seqs))) > protocol.MAX_MESSAGE_BYTES
    address = f"ipc://{tmp_path}/workers.sock"
    back = bind_router(zmq.Context.instance(), address, protocol.MAX_WORKER_MESSAGE_BYTES)
    link = ControllerLink(address, "decode")
    try:
        link.send(protocol.HandedOver(seqs, False))
        assert back.poll(30_000)
        worker, data = back.recv_multipart()
        assert protocol.decode(data, protocol.MAX_WORKER_MESSAGE_BYTES).seqs == seqs
        back.send_multipart([worker, protocol.encode(protocol.RunSeqs(seqs))])
        assert link.receive(30_000) == [protocol.RunSeqs(seqs)]
    finally:
        link.sock.close(linger=0)
        back.close()


def test_a_monitor_batch_over_the_bound_goes_as_several_in_order():
    """A burst of long prompts in one turn of the controller's loop: one message over the bound
    would make the monitor drop the connection, and every stream would go unmonitored."""
    batch = protocol.ScmBatch(opens=[protocol.ScmOpen(i, prompt="x" * (1000 + i)) for i in range(40)],
                              appends=[protocol.ScmAppend(i, 3, text="abc") for i in range(40)], closes=[7, 8])
    parts = [protocol.decode(data) for data in batch.encoded(max_bytes=8000)]
    assert len(parts) > 5 and all(len(protocol.encode(p)) <= 8000 for p in parts)
    items = [(kind, x) for p in parts for kind in ("opens", "appends", "closes") for x in getattr(p, kind)]
    assert items == [("opens", x) for x in batch.opens] + [("appends", x) for x in batch.appends] + \
        [("closes", x) for x in batch.closes]
    assert [protocol.decode(data) for data in batch.encoded()] == [batch]  # within the bound: one

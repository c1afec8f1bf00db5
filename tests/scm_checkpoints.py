"""Small SCM checkpoints for tests, written with transformers in the released layout, and a
Qwen2-style byte-level BPE tokenizer trained here (no downloads)."""

import random

import torch

from semipd.services.scm import checkpoint

# Qwen2's pre-tokenizer expression, as in its tokenizer.json.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = ["the", "harm", "ful", "don't", "It's", "123", "4.5", "(x)", "é", "日本語", "!!", "a.", "b,",
         "safe", "answer", "here", "is", "how", "to"]
GLUE = [" ", " ", "", "\n", "\n\n", "  ", "\t"]


def sample_text(rng: random.Random, words: int) -> str:
    """Text that starts with a word and mixes words, digits, punctuation and odd white space."""
    return "".join(rng.choice(WORDS) + rng.choice(GLUE) for _ in range(words)).rstrip() or "x"


def bpe_tokenizer(split: str = QWEN2_SPLIT, vocab_size: int = 400):
    """A transformers fast tokenizer: byte-level BPE trained on sample_text, split like Qwen2
    (or like GPT-2 with split=None)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    tok.train_from_iterator([sample_text(rng, 50) for _ in range(200)], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()), length=200)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def save_monitor(path, tokenizer=None, token_bias: tuple[float, float] | None = None, seed: int = 0):
    """A random tiny Qwen2 backbone plus heads saved in the SCM layout; returns (transformers
    Qwen2Model, heads) in float32. token_bias overrides the token head's bias (with its weight
    zeroed): (0, 30) flags every token, (30, 0) none."""
    from transformers import Qwen2Config, Qwen2Model
    tokenizer = tokenizer or bpe_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=max(len(tokenizer), 320), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True, initializer_range=0.1)
    backbone = Qwen2Model(cfg).eval()
    heads = {checkpoint.TOKEN_HEAD_WEIGHT: torch.randn(2, 64), checkpoint.TOKEN_HEAD_BIAS: torch.randn(2),
             checkpoint.RESPONSE_HEAD_WEIGHT: torch.randn(2, 64)}
    if token_bias is not None:
        heads[checkpoint.TOKEN_HEAD_WEIGHT].zero_()
        heads[checkpoint.TOKEN_HEAD_BIAS] = torch.tensor(token_bias)
    checkpoint.save_checkpoint(str(path), backbone, heads, cfg, tokenizer)
    return backbone, heads


@torch.inference_mode()
def one_pass(backbone, heads, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores [T] and the response score at the last token, from one dense pass of
    transformers' Qwen2Model over the whole text."""
    hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0]
    token = torch.nn.functional.linear(hidden, heads[checkpoint.TOKEN_HEAD_WEIGHT],
                                       heads[checkpoint.TOKEN_HEAD_BIAS]).softmax(-1)[:, 1]
    response = (hidden[-1] @ heads[checkpoint.RESPONSE_HEAD_WEIGHT].T).softmax(-1)[1]
    return token, response

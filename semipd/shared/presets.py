"""Built-in architectures with random weights (the usual "dummy load"), needing no files.

Shapes follow the published configs of the models they are named after; `tiny` is small enough
for CPU tests. Presets use the byte tokenizer (tokenizer.py), so their vocabularies start with
the 256 byte values. transformers is imported by the preset that is built, so that the names can
be checked before anything heavy loads.
"""


def tiny():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=256,
                       eos_token_id=257)


def qwen25_05b():
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643)


def llama3_8b():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                       tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


PRESETS = {"tiny": tiny, "qwen2.5-0.5b": qwen25_05b, "llama3-8b": llama3_8b}

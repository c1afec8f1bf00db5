"""GGUF model files, the single-file format llama.cpp keeps models in: weights (often quantized),
config and tokenizer, all in one. transformers reads a GGUF's config and tokenizer from the
file's folder and name, which is what this module turns a path into."""

import os

from semipd.shared.errors import UserError


def is_gguf(model: str) -> bool:
    """Whether --model names a GGUF file (rather than a folder or a preset)."""
    return model.lower().endswith(".gguf") and not os.path.isdir(model)


def transformers_source(path: str) -> tuple[str, dict]:
    """(folder, keyword arguments) for transformers' from_pretrained to read the GGUF at path."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such GGUF file")
    folder, name = os.path.split(os.path.abspath(path))
    return folder, {"gguf_file": name}

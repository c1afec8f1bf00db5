"""A Hugging Face checkpoint folder's weights: one model.safetensors or shards listed in
model.safetensors.index.json, read tensor by tensor under their Hugging Face names."""

import json
import os
from collections.abc import Callable, Iterator

import torch

from semipd.shared.errors import UserError, first_line


class SafetensorsCheckpoint:
    def __init__(self, path: str):
        """Every file's header is read here, so that a bad checkpoint is reported before any
        memory is allocated for the model."""
        from safetensors import safe_open
        self.path = path
        self.files = _listed_files(path)
        self.num_tensors = 0
        for file in self.files:
            try:
                with safe_open(file, framework="pt") as f:
                    self.num_tensors += len(f.keys())
            except Exception as e:  # safetensors reports corruption with several exception types
                raise UserError(f"{file}: corrupt or unreadable checkpoint ({first_line(e)})") from None

    def tensors(self, wanted: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(Hugging Face name, tensor) of every tensor in the files; None for those not wanted,
        which are not read."""
        from safetensors import safe_open
        for file in self.files:
            try:
                with safe_open(file, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name) if wanted(name) else None
            except Exception as e:  # safetensors reports corruption with several exception types
                raise UserError(f"{file}: corrupt or unreadable checkpoint ({first_line(e)})") from None


def _listed_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{index}: unreadable index ({first_line(e)})") from None
        files = [os.path.join(path, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise UserError(f"{path}: checkpoint shard missing: {os.path.basename(missing[0])}")
        return files
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json")

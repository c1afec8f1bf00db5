"""How an engine is set up: model, device, dtype, KV pool and batch limits. The controller, the
content monitor and the single-process engine all start from one."""

from dataclasses import dataclass

import torch

from semipd.shared.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}



@dataclass
class EngineConfig:
    model: str
    device: str = "auto"                # auto | cpu | cuda
    dtype: str = "auto"                 # auto (bfloat16 on CUDA, float32 on CPU) or a DTYPES key
    page_size: int = 16
    num_pages: int | None = None        # None: as many as fit (kv_cache.auto_num_pages)
    max_num_seqs: int = 256             # as vLLM
    max_batched_tokens: int = 8192
    max_model_len: int | None = None    # None: the model's max_position_embeddings
    cuda_graphs: bool = True
    prefix_cache: bool = True           # keep computed prompt pages for later prompts (as vLLM, SGLang)
    seed: int = 0                       # for preset weights
    tp_size: int = 1                    # tensor-parallel ranks per role (`semipd serve`; Engine takes a TPGroup)
    progress: bool = True

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available")
        if self.device not in ("cpu", "cuda"):
            raise UserError(f"device must be auto, cpu or cuda, got {self.device!r}")
        return torch.device(self.device)

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        if self.dtype not in DTYPES:
            raise UserError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]

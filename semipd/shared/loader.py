"""Build a Transformer and fill it: from a Hugging Face checkpoint or a GGUF file, or with random
weights. A tensor-parallel rank's model takes its part of every full tensor
(parallel/partition.py): the checkpoint's, or the preset's random ones, which are made whole from
the seed, as at size 1, and then cut, so that every rank's part is of the same weights."""

import math
import os

import torch
from tqdm import tqdm

from semipd.shared.config import ModelConfig, load_hf_config
from semipd.shared.errors import UserError
from semipd.shared.gguf_checkpoint import GGUFCheckpoint
from semipd.shared.gguf_file import is_gguf
from semipd.shared.model import Transformer
from semipd.shared.parallel.group import TPGroup
from semipd.shared.rope import RotaryEmbedding
from semipd.shared.safetensors_checkpoint import SafetensorsCheckpoint

# HF tensor name fragment -> (our fused parameter, shard index within it)
FUSED = {".q_proj.": (".qkv_proj.", 0), ".k_proj.": (".qkv_proj.", 1), ".v_proj.": (".qkv_proj.", 2),
         ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1)}


def load_model(model: str, device: torch.device, dtype: torch.dtype, seed: int = 0,
               progress: bool = True, arena=None, cfg: ModelConfig | None = None,
               extra: dict[str, torch.Tensor] | None = None, tp: TPGroup = TPGroup()) -> Transformer:
    """Build the model (rank tp.rank's part) and fill its weights from the checkpoint or randomly
    (presets). With an arena (shared_memory.SharedArena of weights_nbytes bytes) the weights live
    there. cfg, if given, replaces the model's own config; extra maps checkpoint tensor names
    outside the Transformer (a monitor's heads) to tensors that are filled the same way, whole."""
    cfg = cfg or ModelConfig.from_hf(load_hf_config(model))
    checkpoint = open_checkpoint(model, cfg)  # a bad file is reported before memory is allocated
    net = build_model(cfg, device, dtype, None if arena is None else arena.tensor, tp)
    _fill([net], [extra or {}], checkpoint, seed, progress)
    return net


def load_ranks(model: str, devices: list[torch.device], dtype: torch.dtype, arenas: list,
               seed: int = 0, progress: bool = True) -> None:
    """Fill the weights of every tensor-parallel rank, rank r's in arenas[r] on devices[r], in one
    pass: each checkpoint tensor is read once and cut for every rank."""
    cfg = ModelConfig.from_hf(load_hf_config(model))
    checkpoint = open_checkpoint(model, cfg)
    nets = [build_model(cfg, device, dtype, arena.tensor, TPGroup(rank, len(devices)))
            for rank, (device, arena) in enumerate(zip(devices, arenas))]
    _fill(nets, [{} for _ in nets], checkpoint, seed, progress)


def _fill(nets: list[Transformer], extras: list[dict], checkpoint, seed: int, progress: bool) -> None:
    """The ranks' parts of one model, from the checkpoint or (None) drawn from the seed."""
    if checkpoint is not None:
        _load_checkpoint(nets, checkpoint, progress, extras)
    else:
        _init_random(nets, seed, extras)


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                flat: torch.Tensor | None = None, tp: TPGroup = TPGroup()) -> Transformer:
    """A Transformer (rank tp.rank's part) whose parameters are views into one flat uint8 buffer
    (fresh if None): one plain allocation that another process can map. Contents are left as
    they are."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            net = Transformer(cfg, tp).eval().requires_grad_(False)
        with torch.device(device):  # the rotary tables are computed, not shared
            rope = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rope_scaling)
    finally:
        torch.set_default_dtype(previous)
    for layer in net.layers:
        layer.self_attn.rope = rope
    layout, nbytes = weight_layout(net)
    if flat is None:
        flat = torch.empty(nbytes, dtype=torch.uint8, device=device)
    if flat.numel() < nbytes:
        raise ValueError(f"weight buffer holds {flat.numel()} bytes, the model needs {nbytes}")
    for name, (offset, shape) in layout.items():
        module_name, _, attr = name.rpartition(".")
        view = flat[offset:offset + dtype.itemsize * math.prod(shape)].view(dtype).view(shape)
        setattr(net.get_submodule(module_name), attr, torch.nn.Parameter(view, requires_grad=False))
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.embed_tokens.weight
    return net


def weight_layout(net: Transformer) -> tuple[dict[str, tuple[int, list[int]]], int]:
    """name -> (byte offset, shape) of every distinct parameter, 256-byte aligned; total bytes."""
    layout, offset = {}, 0
    for name, p in net.named_parameters():
        layout[name] = (offset, list(p.shape))
        offset += (p.numel() * p.element_size() + 255) // 256 * 256
    return layout, offset


def open_checkpoint(model: str, cfg: ModelConfig):
    """The weights a model names: a GGUF file, a Hugging Face folder, or None for a preset."""
    if is_gguf(model):
        return GGUFCheckpoint(model, cfg)
    return SafetensorsCheckpoint(model) if os.path.isdir(model) else None


def _load_checkpoint(nets: list[Transformer], checkpoint, progress: bool, extras: list[dict]) -> None:
    ranks = [(dict(net.named_parameters()) | extra, net.partition,
              {".qkv_proj.": [net.layers[0].self_attn.q_size, *[net.layers[0].self_attn.kv_size] * 2],
               ".gate_up_proj.": [net.partition.intermediate.size] * 2})
             for net, extra in zip(nets, extras)]
    cfg = nets[0].cfg

    def wanted(hf_name: str) -> bool:
        target = _our_name(hf_name)[0]
        return target is not None and not (target == "lm_head.weight" and cfg.tie_word_embeddings)

    loaded: set[str] = set()
    bar = tqdm(total=checkpoint.num_tensors, unit="tensor", desc="loading weights", disable=not progress)
    for hf_name, tensor in checkpoint.tensors(wanted):
        bar.update(1)
        if tensor is None:
            continue
        target, shard = _our_name(hf_name)
        if target not in ranks[0][0]:
            raise UserError(f"{checkpoint.path}: unexpected tensor {hf_name}")
        for params, part, sizes in ranks:
            _copy_into(params[target], tensor, target, shard, sizes, part, hf_name, checkpoint.path)
        loaded.add(f"{target}#{shard}")
    bar.close()
    expected = {f"{name}#{i}" for name in ranks[0][0] for i in _shard_ids(name)}
    missing = sorted(expected - loaded)
    if missing:
        raise UserError(f"{checkpoint.path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[0].split('#')[0]}")


def _our_name(hf_name: str) -> tuple[str | None, int | None]:
    if "rotary_emb" in hf_name:
        return None, None
    name = hf_name.removeprefix("model.")
    for fragment, (fused, shard) in FUSED.items():
        if fragment in name:
            return name.replace(fragment, fused), shard
    return name, None


def _shard_ids(name: str) -> list[int | None]:
    return [0, 1, 2] if ".qkv_proj." in name else [0, 1] if ".gate_up_proj." in name else [None]


def _copy_into(param, tensor, target, shard, sizes, part, hf_name, where):
    """Copy the rank's part of checkpoint tensor `tensor` into parameter `target` (into its
    block `shard` where it is fused)."""
    if shard is not None:
        fused = next(k for k in sizes if k in target)
        start = sum(sizes[fused][:shard])
        param = param.narrow(0, start, sizes[fused][shard])
    block = shard or 0
    whole = part.full_shape(target, param.shape, block)
    if list(tensor.shape) != whole:
        raise UserError(f"{where}: {hf_name} has shape {list(tensor.shape)}, config implies {whole}")
    param.copy_(part.take_block(target, block, tensor))


def _init_random(nets: list[Transformer], seed: int, extras: list[dict]) -> None:
    """Small normal weights (std 0.02, norms at 1), made on the (first) target device,
    reproducible. Each tensor is drawn whole, as at size 1, and every rank takes its part: every
    rank, whatever the size, holds a part of the same model."""
    gen = torch.Generator(device=nets[0].embed_tokens.weight.device).manual_seed(seed)
    ranks = [dict([*net.named_parameters(), *extra.items()]) for net, extra in zip(nets, extras)]
    for name, p in ranks[0].items():
        if name.endswith("norm.weight"):
            for params in ranks:
                params[name].fill_(1.0)
            continue
        shape = nets[0].partition.full_shape(name, p.shape)
        whole = p if list(p.shape) == shape else p.new_empty(shape)
        whole.normal_(0.0, 0.02, generator=gen)
        for net, params in zip(nets, ranks):
            if params[name] is not whole:
                params[name].copy_(net.partition.take(name, whole))

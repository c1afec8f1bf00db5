"""Tensor parallelism, Megatron-style: the group a model's ranks run in (group.py), the part of
the model each rank holds and how its weights are cut from the full ones (partition.py), and the
layers whose outputs need the other ranks (layers.py)."""

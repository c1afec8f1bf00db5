"""The tensor-parallel group a model runs in: which rank of how many this process is, and the
torch.distributed process group its collectives go through.

Size 1 (the default) has no process group and runs no collective: a one-GPU model is the same
modules doing the same work as before tensor parallelism. A group of size N is the N processes
(one per GPU) that run one role's model together, over NCCL on CUDA and gloo on the CPU. A
process that builds or loads a rank's shard without running it (the controller, which will own
every rank's weights) gives the rank and size and no group.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: "dist.ProcessGroup | None" = None  # None: size 1, or a process that never runs the model

    def __post_init__(self):
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in a tensor-parallel group of {self.size}")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the ranks, in place: each rank's partial product of a row-parallel
        layer becomes the whole product."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x, concatenated along the last dimension in rank order, on every rank:
        each rank's slice of the logits becomes all of them, so that every rank samples the
        same tokens from the same logits and no token has to be sent between them."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

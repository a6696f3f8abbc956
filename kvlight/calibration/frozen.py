"""The frozen causal LM of a calibration: loaded once, kept out of the module tree, sharded with FSDP2 on demand."""

from __future__ import annotations

import torch

from kvlight.errors import ConfigError
from kvlight.models import decoder_blocks


def shard(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 ``fully_shard`` on every decoder block, then on the whole frozen model, over the data-parallel mesh.

    Each process then holds 1/N of the frozen weights on its device; a block's weights are gathered for its
    forward and freed after. Tensor parallelism is not supported (the cache code needs whole heads per rank).
    """
    from torch.distributed.fsdp import fully_shard

    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ConfigError(
            "kvlight shards the frozen model with FSDP only: set ModelParallelStrategy's tensor_parallel_size: 1 "
            "and data_parallel_size to the number of processes"
        )
    data_parallel = mesh["data_parallel"] if "data_parallel" in names else mesh
    for block in decoder_blocks(model):
        fully_shard(block, mesh=data_parallel)
    # The root too frees its gathered weights (embeddings, head) after each forward; with objective kl the backward
    # gathers them again (the frozen weights get no gradient, only the activations do).
    fully_shard(model, mesh=data_parallel, reshard_after_forward=True)
    return model


def same_forward_count(module, batches: int, what: str) -> None:
    """With a sharded model every process must run the same number of forward passes (FSDP gathers weights
    collectively in each); refuse a split that would leave one process waiting forever."""
    counts = module.all_gather(torch.tensor(batches, device=module.device)).flatten().tolist()
    if len(set(counts)) > 1:
        raise ConfigError(
            f"with a sharded model every process runs the same number of forward passes, but the {what} split "
            f"gives {counts} batches per process: make the number of windows a multiple of devices x batch_size"
        )

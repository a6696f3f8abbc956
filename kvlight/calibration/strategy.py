"""Lightning strategy for calibrating models too big for one GPU: FSDP2 over every process.

``FrozenModelFSDP`` is Lightning's ``ModelParallelStrategy`` with all processes in one data-parallel
(FSDP) group and no tensor parallelism, so a YAML needs no per-machine sizes. The sharding itself
happens in :meth:`kvlight.calibration.module.KVCalibrationModule.configure_model` (``fully_shard`` on each
decoder block of the frozen model). Everything a checkpoint holds (the compressor, its optimizer
state) is replicated and identical on every process, so checkpoints are saved and loaded like a
single-process run's: one file from rank 0 that a plain ``load_from_checkpoint`` reads, rather than
``torch.distributed.checkpoint`` state, which expects the sharded weights inside the module tree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy, Strategy


class FrozenModelFSDP(ModelParallelStrategy):
    """``ModelParallelStrategy(data_parallel_size=<all processes>, tensor_parallel_size=1)``.

    Args:
        **kwargs: passed on (``process_group_backend``, ``timeout``).
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        # Every process shards the frozen model (FSDP); known once the trainer has assigned the devices.
        self._data_parallel_size = self.num_processes * self.num_nodes
        self._tensor_parallel_size = 1
        super().setup_environment()

    # Checkpoints: the replicated compressor and optimizer, as a single-process strategy saves and loads them.
    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def lightning_module_state_dict(self) -> dict[str, Any]:
        return Strategy.lightning_module_state_dict(self)

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return Strategy.optimizer_state(self, optimizer)

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        Strategy.load_model_state_dict(self, checkpoint, strict=strict)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options=storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        return Strategy.load_checkpoint(self, checkpoint_path, weights_only=weights_only)

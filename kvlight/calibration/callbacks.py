"""The two steps that join the DataModule and the LightningModule, as Lightning callbacks the module brings along.

Neither the module nor the DataModule calls the other: these callbacks read what each holds and hand it over.

- :class:`AllocateWidths` (``setup`` of fit): when the module's options ask for widths (no config, no rank), measure
  the frozen model's sensitivity on the DataModule's calibration windows and install the allocated config.
- :class:`CaptureKV` (``on_fit_start``): capture-then-stream. Run the frozen model once over this process's
  calibration windows into checksummed shards (reused when intact), then give the DataModule its K/V stream and the
  module a :class:`Capture` (the rows its step search reads, the windows distillation reads, the query moments).

One more, about checkpoints rather than the data: :class:`SafeCheckpoints` (kvlight.calibration.checkpoints).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

from kvlight.analysis.bit_allocation import WHITENED, allocate_bits
from kvlight.analysis.sensitivity import measure_sensitivity
from kvlight.analysis.whitening import fisher_weights
from kvlight.calibration import checkpoints
from kvlight.calibration.capture import CapturePlan, capture_to_shards, load_query_moments
from kvlight.calibration.frozen import same_forward_count
from kvlight.calibration.shards import load_manifest, num_rows
from kvlight.config import RECOMMENDED
from kvlight.errors import ConfigError, KVLightError


@dataclass
class Capture:
    """What the capture hands the module.

    Attributes:
        directory: this process's shards.
        windows: this process's calibration windows ``[C, T]`` (distillation reads them).
        seq_len: tokens per window (the default score window of query-weighted keys).
        kv_batch_size: rows per batch of the K/V stream.
        query_moments: ``{"sums", "count"}`` of the capture's queries, or None when not measured.
        seconds: how long the capture took (0 when reused).
        seed: the run's seed (the DataModule's), which also draws the positions distillation compares.
    """

    directory: Path
    windows: torch.Tensor
    seq_len: int
    kv_batch_size: int
    query_moments: dict | None
    seconds: float
    seed: int = 0


def _datamodule(trainer):
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "stream_shards"):
        raise KVLightError("kvlight fit needs the KVCalibrationDataModule (data: in the YAML)")
    return datamodule


class SafeCheckpoints(pl.Callback):
    """Checkpoints written whole and read as plain data (``setup``, before Lightning restores ``ckpt_path``), a killed
    save's temp files removed (``on_fit_start``), and the final step always in ``last.ckpt`` (``on_train_end``)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        checkpoints.install(trainer.strategy)

    def on_fit_start(self, trainer, pl_module) -> None:
        # The checkpoint directories are resolved by now, and this fit is their one writer (rank 0 saves).
        if trainer.is_global_zero:
            for callback in trainer.checkpoint_callbacks:
                checkpoints.remove_stale_temporaries(getattr(callback, "dirpath", None))

    def on_train_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        if trainer.fast_dev_run:
            return
        # With every_n_train_steps, Lightning saves nothing at epoch ends, and at the end only when it never saved:
        # the steps after the last multiple of N would be missing from last.ckpt, and a resume would redo them.
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last:
                if callback._last_global_step_saved != trainer.global_step:
                    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


class AllocateWidths(pl.Callback):
    """Widths from the model's sensitivity, at the start of fit (before the optimizer sees the compressor).

    Rank 0 measures and allocates; every process installs the same config (broadcast), so DDP replicas agree.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not pl_module.allocation_pending:
            return
        if stage != "fit":
            raise ConfigError(
                "the widths are allocated during fit: run fit first (then validate its checkpoint) or pass the "
                "compression config kvlight analyze --strategy bits wrote"
            )
        if pl_module.sharded:
            raise ConfigError(
                "allocating widths needs the whole model on each process for its sensitivity pass; with FSDP run "
                "kvlight analyze --strategy bits first and pass its compression config"
            )
        options, start, config, metrics = pl_module.compression_options, time.perf_counter(), None, None
        weights = None
        if trainer.global_rank == 0:
            datamodule = _datamodule(trainer)
            windows = sensitivity_windows(datamodule.all_calibration_windows(), options)
            if len(windows) == 0:
                raise ConfigError("allocating widths needs calibration windows: raise --calibration-samples")
            model = pl_module.frozen.to(trainer.strategy.root_device)
            provisional = pl_module.compressor.config
            sinks = provisional.sink_tokens
            metrics = measure_sensitivity(
                model, pl_module.geometry, windows, 2, sink_tokens=sinks, progress=True,
                rope_blocks=provisional.rope_blocks(), seed=datamodule.hparams.seed,
            )  # fmt: skip
            target = options.target_memory_reduction
            target = RECOMMENDED["target_memory_reduction"] if target is None else target
            allocation = allocate_bits(metrics, target, options.weighting)
            sinks, recent = provisional.sink_tokens, provisional.recent_window
            whitened = options.weighting in WHITENED  # served by KVSplice heads fitted with the Fisher
            algo = "kvsplice" if whitened else provisional.algo_default
            config = allocation.to_config(algo, sinks, recent).to_dict()
            weights = fisher_weights(metrics) if whitened else None
        config, weights = trainer.strategy.broadcast((config, weights), src=0)
        pl_module.install_allocation(config, metrics, time.perf_counter() - start, weights)


def sensitivity_windows(windows: torch.Tensor, options) -> torch.Tensor:
    """The first ``options.sensitivity_samples`` windows ``[S, T']`` of the calibration windows ``[C, T]``, each
    window first cut into consecutive pieces of ``T' = options.sensitivity_seq_len`` tokens when it is longer (the
    tail shorter than T' is left out)."""
    length = options.sensitivity_seq_len
    if length is not None and windows.shape[1] > length:
        pieces = windows.shape[1] // length
        windows = windows[:, : pieces * length].reshape(-1, length)
    return windows[: options.sensitivity_samples]


class CaptureKV(pl.Callback):
    """Capture-then-stream (see the module docstring); under FSDP it also checks that every process runs the same
    number of forward passes, in the capture and in validation."""

    def on_fit_start(self, trainer, pl_module) -> None:
        datamodule = _datamodule(trainer)
        objective = pl_module.objective_options
        model = pl_module.frozen if pl_module.sharded else pl_module.frozen.to(pl_module.device)
        rope_blocks = pl_module.compressor.rope_blocks
        directory = datamodule.capture_path(pl_module.fingerprint, rope_blocks)
        windows = datamodule.calibration_windows()
        batch_size = pl_module.runtime_options.capture_batch_size
        queries = objective.key_objective == "query"
        reuse = True
        if pl_module.sharded:
            same_forward_count(pl_module, math.ceil(len(windows) / batch_size), "calibration")
            # A process that reuses its capture runs no forward: all reuse, or all capture again.
            intact = load_manifest(directory) is not None and (not queries or load_query_moments(directory) is not None)
            reuse = bool(pl_module.all_gather(torch.tensor(int(intact), device=pl_module.device)).min())
        start = time.perf_counter()
        plan = CapturePlan(
            # Each rank samples its share of the windows, so the ranks together keep max_samples_per_head rows,
            # as one process would: the result does not depend on the number of GPUs.
            capacity=math.ceil(datamodule.hparams.max_samples_per_head / trainer.world_size),
            batch_size=batch_size,
            seed=datamodule.hparams.seed,
            meta={
                "rank": trainer.global_rank,
                "world_size": trainer.world_size,
                "calibration_windows": datamodule.calibration_indices(),
            },
            reuse=reuse,
            queries=queries,
            rope_blocks=rope_blocks,
        )
        manifest = capture_to_shards(model, pl_module.geometry, windows, directory, plan)
        seconds = time.perf_counter() - start
        moments = load_query_moments(directory) if queries else None
        kv_batch_size = datamodule.hparams.kv_batch_size
        capture = Capture(
            directory, windows, datamodule.hparams.seq_len, kv_batch_size, moments, seconds, datamodule.hparams.seed
        )
        pl_module.use_capture(capture)
        # Every rank takes the same number of steps (DDP collectives must line up): enough for the rank with the
        # most rows to see each once in the statistics epoch; ranks with fewer get empty or cycled batches.
        most = int(pl_module.all_gather(torch.tensor(num_rows(manifest), device=pl_module.device)).max())
        datamodule.stream_shards(directory, max(1, math.ceil(most / kv_batch_size)), pl_module.stats_epochs)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        if pl_module.sharded and datamodule is not None and hasattr(datamodule, "eval_windows"):
            batches = math.ceil(len(datamodule.eval_windows()) / datamodule.hparams.batch_size)
            same_forward_count(pl_module, batches, "evaluation")

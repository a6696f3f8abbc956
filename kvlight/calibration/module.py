"""The LightningModule: a frozen causal LM plus the trainable compressor.

``fit`` captures K/V once (through the DataModule's shard cache), runs one statistics epoch
(PCA bases, KVSplice initialisation; float64 sums all-reduced across processes), then trains
the KVSplice heads with Adam on the reconstruction loss. ``validate`` measures baseline and
compressed perplexity, feeding each window in chunks through a :class:`CompressedCache` so
attention reads what the cache stores, and the exact bytes the cache holds.
The frozen model is kept outside the module tree: it never reaches the optimizer or a checkpoint.
"""

from __future__ import annotations

import math
import time

import lightning.pytorch as pl
import torch
from torchmetrics import SumMetric

from kvlight.analysis.bit_allocation import WEIGHTINGS, allocate_bits
from kvlight.calibration.capture import capture_to_shards, load_query_moments
from kvlight.calibration.distill import distillation_loss, latent_quantizers, warmup_cosine
from kvlight.calibration.objectives import KEY_OBJECTIVES, OBJECTIVES, VALUE_OBJECTIVES, resolve_config
from kvlight.calibration.perplexity import TokenPerplexity
from kvlight.calibration.shards import load_manifest, num_rows
from kvlight.compressors import KVCompressor
from kvlight.compressors.compressor import STEP_ROWS
from kvlight.compressors.registry import backend
from kvlight.compressors.weighting import output_weights, score_weight
from kvlight.config import RECOMMENDED, CompressionConfig
from kvlight.errors import CaptureError, ConfigError, KVLightError
from kvlight.hf import cache_kwargs
from kvlight.models import (
    DTYPES,
    decoder_blocks,
    geometry_of,
    load_model,
    model_fingerprint,
    output_projections,
    resolve_dtype,
    rotary_module,
)
from kvlight.serving.cache import CompressedCache, dynamic_cache_bytes
from kvlight.serving.positions import PositionTracker
from kvlight.serving.widths import direction_quantizers

#: Checkpoint key of the statistics sums when a checkpoint is taken inside the statistics epoch.
STATISTICS_KEY = "kvlight_statistics"


class KVCalibrationModule(pl.LightningModule):
    """Frozen HF causal LM + trainable KV compressor.

    Args:
        model: hub id, local directory, ``.gguf`` file, or None for the embedded default.
        compression_config: path to a compression config JSON (or its content); None: uniform ``rank``, or with no
            rank either, widths allocated at ``target_memory_reduction`` (default: kvlight.config.RECOMMENDED).
        compressor: ``pca`` or ``kvsplice`` for every head; None: each head's ``algo`` from the config.
        rank: uniform rank when no config is given.
        rank_k: uniform key rank when no config is given.
        rank_v: uniform value rank when no config is given.
        sink_tokens: override the config's exact first positions.
        recent_window: override the config's exact newest positions.
        latent_bits: override how latents are stored: 8, 4, 2 (integer codes) or "fp8".
        quant_group_size: override how many latent channels share one scale and zero point.
        lr: Adam learning rate for KVSplice heads.
        init: KVSplice initialisation, ``pca`` or ``random``.
        latent_affine: KVSplice latent scale and shift.
        eval_chunk: validation feeds each window in chunks of this many tokens through the compressed cache.
        capture_batch_size: windows per forward pass while capturing K/V.
        model_dtype: dtype the frozen model is loaded in (float32, bfloat16, float16, or auto: bfloat16 where it
            is native on the device, else float32; see kvlight.models.preferred_dtype).
        key_objective: "mse" or "query" (see :data:`KEY_OBJECTIVES`; "query" needs KVSplice key heads).
        score_window: with "query", the longest query-key distance the weights average RoPE over: the context length
            you serve (default: the calibration windows' seq_len).
        value_objective: "mse" or "output" (see :data:`VALUE_OBJECTIVES`; "output" needs KVSplice value heads).
        objective: "reconstruction" or "kl" (see :data:`OBJECTIVES`; "kl" needs KVSplice heads). With "kl" each
            training step after the statistics epoch runs the frozen model on ``distill_batch_size`` calibration
            windows, exactly and through the simulated cache (the streamed K/V batch is not used).
        distill_batch_size: calibration windows per step with ``objective="kl"``.
        target_memory_reduction: with no config or rank: at the start of ``fit``, measure the model's sensitivity
            on ``sensitivity_samples`` calibration windows (kvlight.sensitivity) and give every principal direction
            the width that minimises the predicted loss within ``1 - target`` of an fp16 cache's bytes at long
            context (kvlight.bit_allocation); None: the recommended 0.76. 4 sinks, no recent window unless overridden.
        bits_weighting: how the allocation weighs each direction's error (kvlight.bit_allocation.WEIGHTINGS).
        sensitivity_samples: calibration windows the sensitivity pass of ``target_memory_reduction`` measures.
    """

    def __init__(
        self,
        model: str | None = None,
        compression_config: str | dict | None = None,
        compressor: str | None = None,
        rank: int | None = None,
        rank_k: int | None = None,
        rank_v: int | None = None,
        sink_tokens: int | None = None,
        recent_window: int | None = None,
        latent_bits: int | str | None = None,
        quant_group_size: int | None = None,
        lr: float = 1e-3,
        init: str = "pca",
        latent_affine: bool = True,
        eval_chunk: int = 64,
        capture_batch_size: int = 4,
        model_dtype: str = "float32",
        key_objective: str = "mse",
        score_window: int | None = None,
        value_objective: str = "mse",
        objective: str = "reconstruction",
        distill_batch_size: int = 1,
        target_memory_reduction: float | None = None,
        bits_weighting: str = RECOMMENDED["bits_weighting"],
        sensitivity_samples: int = 16,
    ) -> None:
        super().__init__()
        if model_dtype not in (*DTYPES, "auto"):
            raise ConfigError(f"model_dtype {model_dtype!r} is not one of {', '.join(DTYPES)}, auto")
        if key_objective not in KEY_OBJECTIVES:
            raise ConfigError(f"key_objective {key_objective!r} must be one of {', '.join(KEY_OBJECTIVES)}")
        if value_objective not in VALUE_OBJECTIVES:
            raise ConfigError(f"value_objective {value_objective!r} must be one of {', '.join(VALUE_OBJECTIVES)}")
        if objective not in OBJECTIVES:
            raise ConfigError(f"objective {objective!r} must be one of {', '.join(OBJECTIVES)}")
        if distill_batch_size < 1:
            raise ConfigError(f"distill_batch_size must be at least 1, got {distill_batch_size}")
        if score_window is not None and score_window < 1:
            raise ConfigError(f"score_window must be a positive number of tokens, got {score_window}")
        if init not in ("pca", "random"):
            raise ConfigError(f"init {init!r} must be 'pca' or 'random'")
        if bits_weighting not in WEIGHTINGS:
            raise ConfigError(f"bits_weighting {bits_weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        if sensitivity_samples < 1:
            raise ConfigError(f"sensitivity_samples must be at least 1, got {sensitivity_samples}")
        self.save_hyperparameters()
        self.geometry = geometry_of(model)
        config = resolve_config(
            compression_config,
            self.geometry,
            rank,
            rank_k,
            rank_v,
            sink_tokens,
            recent_window,
            latent_bits,
            quant_group_size,
            target_memory_reduction,
        )
        #: True until fit's setup has replaced the placeholder config with the allocated widths.
        by_rank = rank is not None or rank_k is not None or rank_v is not None
        self.allocation_pending = compression_config is None and not by_rank
        self.allocation_metrics = None  # the sensitivity metrics the allocation used (kvlight.metrics_io.HeadMetrics)
        self._install(config)
        self._key_weights: torch.Tensor | None = None
        self._value_weights: torch.Tensor | None = None
        self._distill_windows: torch.Tensor | None = None
        self.automatic_optimization = False
        self.strict_loading = False
        self._frozen: torch.nn.Module | None = None
        self._fingerprint: str | None = None
        self._tracker: PositionTracker | None = None
        self.stats_epochs = 1
        self.ppl_baseline = TokenPerplexity()
        self.ppl_compressed = TokenPerplexity()
        self.bytes_compressed = SumMetric()
        self.bytes_dynamic = SumMetric()
        self.results: dict[str, float] = {}
        self.capture_seconds = 0.0
        self.allocation_seconds = 0.0
        self._saved_statistics: list[torch.Tensor] | None = None
        self._capture_dir = None

    def _install(self, config: CompressionConfig) -> None:
        """Build the compressor for ``config`` and check it against the objectives."""
        hp = self.hparams
        # The checkpoint carries the resolved config itself, so `validate --ckpt_path` needs no file.
        self.hparams["compression_config"] = config.to_dict()
        options = {"kvsplice": {"latent_affine": hp.latent_affine, "init": hp.init}}
        self.compressor = KVCompressor(config, self.geometry, algo=hp.compressor, options=options)
        key_objective, value_objective, objective = hp.key_objective, hp.value_objective, hp.objective
        weighted = {"k": key_objective == "query", "v": value_objective == "output"}
        for kind, name in (("k", "key_objective query"), ("v", "value_objective output")):
            algos = {
                self.compressor.codec(layer, kind).heads[h].algo
                for layer in range(self.geometry.num_layers)
                for h in range(self.geometry.num_kv_heads)
            }
            if weighted[kind] and any(not backend(algo).weighted_objectives for algo in algos - {"none"}):
                raise ConfigError(
                    f"{name} needs KVSplice {'key' if kind == 'k' else 'value'} heads (separate encoder and "
                    "decoder): use --compressor kvsplice"
                )
        if objective == "kl" and not self.compressor.trainable:
            raise ConfigError("objective kl trains KVSplice heads and this config has none: use --compressor kvsplice")

    # ------------------------------------------------------------------ the frozen model
    @property
    def model_dtype(self) -> torch.dtype:
        """The frozen model's dtype (``model_dtype``, with "auto" resolved for the device it runs on)."""
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        return resolve_dtype(self.hparams.model_dtype, device)

    @property
    def frozen(self) -> torch.nn.Module:
        if self._frozen is None:
            self.configure_model()
        return self._frozen

    @property
    def sharded(self) -> bool:
        """True under ``ModelParallelStrategy``: the frozen model's blocks are sharded across processes (FSDP2)."""
        return getattr(self, "_device_mesh", None) is not None

    def configure_model(self) -> None:
        if self._frozen is not None:
            return
        model = load_model(self.hparams.model, self.model_dtype)
        self.compressor.check_geometry(self.geometry)
        self._fingerprint = model_fingerprint(model, self.hparams.model)  # of the whole weights, before sharding
        if self.sharded:
            model = self._shard(model)
        else:
            model = model.to(self.device)
        # Not a submodule: no optimizer, no checkpoint, no DDP wrapping for the frozen weights (FSDP2 shards it
        # directly, above, so a model too big for one GPU is split across them).
        object.__setattr__(self, "_frozen", model)
        if self.geometry.rope:
            object.__setattr__(self, "_tracker", PositionTracker(model))

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2 ``fully_shard`` on every decoder block, then on the whole frozen model, over the data-parallel mesh.

        Each process then holds 1/N of the frozen weights on its device; a block's weights are gathered for its
        forward and freed after. Tensor parallelism is not supported (the cache code needs whole heads per rank).
        """
        from torch.distributed.fsdp import fully_shard

        mesh = self._device_mesh
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise ConfigError(
                "kvlight shards the frozen model with FSDP only: set ModelParallelStrategy's tensor_parallel_size: 1 "
                "and data_parallel_size to the number of processes"
            )
        data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        for block in decoder_blocks(model):
            fully_shard(block, mesh=data_parallel)
        # The root too frees its gathered weights (embeddings, head) after each forward; with objective kl the backward
        # gathers them again (the frozen weights get no gradient, only the activations do).
        fully_shard(model, mesh=data_parallel, reshard_after_forward=True)
        return model

    def _same_forward_count(self, batches: int, what: str) -> None:
        """With a sharded model every process must run the same number of forward passes (FSDP gathers weights
        collectively in each); refuse a split that would leave one process waiting forever."""
        counts = self.all_gather(torch.tensor(batches, device=self.device)).flatten().tolist()
        if len(set(counts)) > 1:
            raise ConfigError(
                f"with a sharded model every process runs the same number of forward passes, but the {what} split "
                f"gives {counts} batches per process: make the number of windows a multiple of devices x batch_size"
            )

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

        if self.allocation_pending and stage == "fit":
            self._allocate()
        elif self.allocation_pending:
            raise ConfigError(
                "target_memory_reduction allocates the widths during fit: run fit first (then validate its "
                "checkpoint) or pass the compression config kvlight analyze --strategy bits wrote"
            )
        # DDP refuses to wrap a module with nothing to train (every head PCA), and ModelParallelStrategy's checkpoint
        # maps optimizer state to the module's parameters. One inert registered parameter satisfies both; no loss
        # uses it and on_save_checkpoint keeps it out of checkpoints.
        parallel = isinstance(self.trainer.strategy, (DDPStrategy, ModelParallelStrategy))
        if stage == "fit" and parallel and not self.compressor.trainable:
            self._ddp_anchor = torch.nn.Parameter(torch.zeros(1))

    def _allocate(self) -> None:
        """Measure the frozen model's sensitivity on the first calibration windows and install the allocated widths.

        Rank 0 measures and allocates; every process installs the same config (broadcast), so DDP replicas agree.
        """
        from kvlight.analysis.sensitivity import measure_sensitivity

        if self.sharded:
            raise ConfigError(
                "target_memory_reduction needs the whole model on each process for its sensitivity pass; with FSDP "
                "run kvlight analyze --strategy bits first and pass its compression config"
            )
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "all_calibration_windows"):
            raise KVLightError("target_memory_reduction needs the KVCalibrationDataModule (data: in the YAML)")
        hp = self.hparams
        start = time.perf_counter()
        config_data = None
        if self.trainer.global_rank == 0:
            windows = datamodule.all_calibration_windows()[: hp.sensitivity_samples]
            if len(windows) == 0:
                raise ConfigError("target_memory_reduction needs calibration windows: raise --calibration-samples")
            model = self.frozen.to(self.trainer.strategy.root_device)
            current = self.compressor.config
            metrics = measure_sensitivity(
                model, self.geometry, windows, 2, sink_tokens=current.sink_tokens, progress=False
            )
            target = hp.target_memory_reduction
            target = RECOMMENDED["target_memory_reduction"] if target is None else target
            allocation = allocate_bits(metrics, target, hp.bits_weighting)
            config = allocation.to_config(current.algo_default, current.sink_tokens, current.recent_window)
            config_data = config.to_dict()
            self.allocation_metrics = metrics
        config_data = self.trainer.strategy.broadcast(config_data, src=0)
        self._install(CompressionConfig.from_dict(config_data).validate(*self._shape()))
        self.allocation_pending = False
        # The checkpoint then describes the allocated config alone, so `validate --ckpt_path` rebuilds it as is.
        self.hparams["target_memory_reduction"] = None
        self.allocation_seconds = time.perf_counter() - start

    def _shape(self) -> tuple[int, int, int]:
        return self.geometry.num_layers, self.geometry.num_kv_heads, self.geometry.head_dim

    def teardown(self, stage: str) -> None:
        if self._tracker is not None:
            self._tracker.close()
            object.__setattr__(self, "_tracker", None)
        object.__setattr__(self, "_frozen", None)

    # ------------------------------------------------------------------ fit
    def on_fit_start(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "set_kv_shards"):
            raise KVLightError("kvlight fit needs the KVCalibrationDataModule (data: in the YAML)")
        if not self.sharded:
            self.frozen.to(self.device)
        self.frozen  # noqa: B018 - loads the model (and its fingerprint) if configure_model has not run
        directory = datamodule.capture_path(self._fingerprint)
        self._capture_dir = directory
        windows = datamodule.calibration_windows()
        reuse = True
        if self.sharded:
            batch = self.hparams.capture_batch_size
            self._same_forward_count(math.ceil(len(windows) / batch), "calibration")
            # A process that reuses its capture runs no forward: all reuse, or all capture again.
            intact = load_manifest(directory) is not None and (
                self.hparams.key_objective != "query" or load_query_moments(directory) is not None
            )
            reuse = bool(self.all_gather(torch.tensor(int(intact), device=self.device)).min())
        start = time.perf_counter()
        manifest = capture_to_shards(
            self.frozen,
            self.geometry,
            windows,
            directory,
            # Each rank samples its share of the windows, so the ranks together keep max_samples_per_head rows,
            # as one process would: the result does not depend on the number of GPUs.
            capacity=math.ceil(datamodule.hparams.max_samples_per_head / self.trainer.world_size),
            batch_size=self.hparams.capture_batch_size,
            seed=datamodule.hparams.seed,
            meta={
                "rank": self.global_rank,
                "world_size": self.trainer.world_size,
                "calibration_windows": datamodule.calibration_indices(),
            },
            reuse=reuse,
            queries=self.hparams.key_objective == "query",
        )
        self.capture_seconds = time.perf_counter() - start
        if self.hparams.key_objective == "query":
            self._key_weights = self._score_weights(directory, self.hparams.score_window or datamodule.hparams.seq_len)
        if self.hparams.value_objective == "output":
            self._value_weights = self._output_weights()
        if self.hparams.objective == "kl":
            if len(windows) == 0:
                raise ConfigError(
                    "objective kl needs at least one calibration window per process: raise --calibration-samples"
                )
            # Every process runs one batch per step, so the forward counts match under sharding whatever its share.
            self._distill_windows = windows
        rows = torch.tensor(num_rows(manifest), device=self.device)
        # Every rank takes the same number of steps (DDP collectives must line up): enough for the rank with the
        # most rows to see each once in the statistics epoch; ranks with fewer get empty or cycled batches.
        most = int(self.all_gather(rows).max())
        num_batches = max(1, math.ceil(most / datamodule.hparams.kv_batch_size))
        datamodule.set_kv_shards(directory, num_batches, exact_epochs=self.stats_epochs)

    def _score_weights(self, directory, window: int) -> torch.Tensor:
        """``[L, H, D, D]`` score weights from the capture's query moments, summed over every process."""
        saved = load_query_moments(directory)
        if saved is None:
            raise CaptureError(f"the capture in {directory} has no query moments; delete it to capture again")
        sums = self.trainer.strategy.reduce(saved["sums"].to(self.device), reduce_op="sum")
        count = self.trainer.strategy.reduce(torch.tensor(float(saved["count"]), device=self.device), reduce_op="sum")
        rotary = rotary_module(self.frozen)
        inv_freq = None if rotary is None else rotary.inv_freq.detach().cpu()
        return score_weight((sums / count).cpu().double(), inv_freq, window=window)

    def _output_weights(self) -> torch.Tensor:
        """``[L, H, D, D]`` value weights from each block's attention output projection (weighting.output_weight)."""
        try:
            projections = output_projections(self.frozen)
        except KVLightError as exc:
            raise ConfigError(f"value_objective output: {exc}; use value_objective mse") from None
        return output_weights(projections, self.geometry.num_kv_heads, self.geometry.head_dim)

    def configure_optimizers(self):
        params = [p for p in self.compressor.parameters() if p.requires_grad]
        if not params:  # PCA only: a dummy optimizer keeps Lightning's manual loop happy
            anchor = getattr(self, "_ddp_anchor", None)
            params = [anchor if anchor is not None else torch.nn.Parameter(torch.zeros(1, device=self.device))]
        optimizer = torch.optim.Adam(params, lr=self.hparams.lr)
        if self.hparams.objective != "kl":
            return optimizer
        # Distillation warms up and decays over the fit's steps (trainer.max_steps; `kvlight calibrate` sets it).
        steps = int(min(self.trainer.estimated_stepping_batches, 10**9))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": warmup_cosine(optimizer, steps), "interval": "step"},
        }

    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(self.current_epoch)
        if self.current_epoch < self.stats_epochs:
            self._saved_statistics = None  # a new statistics epoch starts from zero
            self._begin_statistics()

    def _begin_statistics(self) -> None:
        """Start the float64 sums; after a mid-epoch resume, rank 0 starts from the checkpoint's (all ranks') sums."""
        self.compressor.begin_statistics(self.device)
        saved, self._saved_statistics = self._saved_statistics, None
        if saved is not None and self.global_rank == 0:
            for tensor, value in zip(self.compressor.statistics_tensors(), saved):
                tensor.copy_(value)

    def _finalize_statistics(self) -> None:
        for tensor in self.compressor.statistics_tensors():
            tensor.copy_(self.trainer.strategy.reduce(tensor, reduce_op="sum"))
        self.compressor.finalize_statistics(self._key_weights, self._value_weights)
        if self.compressor.has_widths:
            self._calibrate_steps()

    def _calibrate_steps(self) -> None:
        """The static steps of width codecs: one more read of (up to STEP_ROWS of) this process's captured rows, now
        that the bases are fitted; the error sums are added across processes, so every replica gets the same steps."""
        from kvlight.calibration.shards import KVShardStream

        if self._capture_dir is None:
            raise KVLightError("width codecs need the captured rows to fit their steps; fit through the DataModule")
        batch_size = self.trainer.datamodule.hparams.kv_batch_size
        rows = num_rows(load_manifest(self._capture_dir, verify=False))
        stream = KVShardStream(self._capture_dir, batch_size, max(1, math.ceil(rows / batch_size)), exact_epochs=1)
        self.compressor.begin_step_calibration(self.device)
        seen = 0
        for batch in stream:
            if seen >= STEP_ROWS:
                break
            take = STEP_ROWS - seen
            self.compressor.accumulate_steps(
                batch["keys"][:take].to(self.device), batch["values"][:take].to(self.device)
            )
            seen += min(take, batch["keys"].shape[0])
        for tensor in self.compressor.step_tensors():
            tensor.copy_(self.trainer.strategy.reduce(tensor, reduce_op="sum"))
        self.compressor.finalize_steps()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int):
        keys, values = batch["keys"], batch["values"]
        if self.current_epoch < self.stats_epochs:
            if not self.compressor.statistics_tensors():  # resumed mid-epoch: on_train_epoch_start was skipped
                self._begin_statistics()
            self.compressor.accumulate(keys, values)
            # Fitted at the epoch's last batch rather than in on_train_epoch_end, so the checkpoint saved after
            # this batch, and a validation run at the end of the epoch, already hold the fitted compressor.
            if batch_idx == self.trainer.num_training_batches - 1:
                self._finalize_statistics()
            return None
        if not self.compressor.trainable:
            return None
        optimizer = self.optimizers()
        if self.hparams.objective == "kl":
            loss = self._distillation_loss()
        else:
            quantizers = direction_quantizers(self.compressor, keys.dtype)  # width codecs train through their codes
            loss = self.compressor.reconstruction_loss(keys, values, self._key_weights, self._value_weights, quantizers)
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.sharded and self.trainer.world_size > 1:
            # No DDP wrapper under ModelParallelStrategy: average the (small) compressor's gradients by hand.
            for param in self.compressor.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= self.trainer.world_size
        optimizer.step()
        if self.hparams.objective == "kl":
            self.lr_schedulers().step()  # manual optimization: Lightning steps no scheduler itself
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=keys.shape[0])
        return loss.detach()

    def _distillation_loss(self) -> torch.Tensor:
        """KL of the frozen model's outputs with vs without compression on the next calibration windows.

        The windows cycle in order with the optimizer step count, so a resumed fit continues where it stopped.
        """
        if self._distill_windows is None:
            raise KVLightError("objective kl needs the calibration windows; fit through KVCalibrationDataModule")
        size = self.hparams.distill_batch_size
        batches = math.ceil(len(self._distill_windows) / size)
        index = self.global_step % batches
        input_ids = self._distill_windows[index * size : (index + 1) * size].to(self.device)
        quantizers = latent_quantizers(self.compressor, next(self.frozen.parameters()).dtype)
        return distillation_loss(self.frozen, self.compressor, input_ids, self._tracker, quantizers)

    def on_train_epoch_end(self) -> None:
        # Normally fitted at the last batch already; this covers an epoch cut short (max_steps, limit_train_batches).
        if self.current_epoch == self.stats_epochs - 1 and self.compressor.statistics_tensors():
            self._finalize_statistics()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"].pop("_ddp_anchor", None)
        sums = self.compressor.statistics_tensors()
        if sums:  # inside the statistics epoch: keep the sums so far, summed over ranks (every rank calls this)
            checkpoint[STATISTICS_KEY] = [self.trainer.strategy.reduce(t.clone(), reduce_op="sum").cpu() for t in sums]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._saved_statistics = checkpoint.get(STATISTICS_KEY)
        saved = (checkpoint.get("hyper_parameters") or {}).get("compression_config")
        if saved is not None and saved != self.hparams["compression_config"]:
            # A resumed fit allocated its widths again in setup; the checkpoint's allocation is the one it continues.
            self._install(CompressionConfig.from_dict(saved).validate(*self._shape()))
            self.hparams["target_memory_reduction"] = None

    # ------------------------------------------------------------------ validate
    def _chunked_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
        chunk = self.hparams.eval_chunk or input_ids.shape[1]
        logits = []
        for start in range(0, input_ids.shape[1], chunk):
            mask = None if attention_mask is None else attention_mask[:, : start + chunk]
            out = self.frozen(input_ids=input_ids[:, start : start + chunk], attention_mask=mask, **cache_kwargs(cache))
            logits.append(out.logits)
        return torch.cat(logits, dim=1)

    def on_validation_epoch_start(self) -> None:
        datamodule = self.trainer.datamodule
        if self.sharded and datamodule is not None and hasattr(datamodule, "eval_windows"):
            self._same_forward_count(
                math.ceil(len(datamodule.eval_windows()) / datamodule.hparams.batch_size), "evaluation"
            )

    def validation_step(self, batch, batch_idx: int) -> None:
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        attention_mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        baseline = self.frozen(input_ids=input_ids, attention_mask=attention_mask).logits
        self.ppl_baseline.update(baseline, input_ids, attention_mask)
        cache = CompressedCache(self.compressor, self._tracker)
        compressed = self._chunked_logits(input_ids, attention_mask, cache)
        self.ppl_compressed.update(compressed, input_ids, attention_mask)
        kv_dtype = cache.layers[0].dtype
        self.bytes_compressed.update(float(cache.stored_bytes()))
        self.bytes_dynamic.update(float(dynamic_cache_bytes(self.geometry, *input_ids.shape, kv_dtype)))

    def on_validation_epoch_end(self) -> None:
        baseline = float(self.ppl_baseline.compute())
        compressed = float(self.ppl_compressed.compute())
        stored, full = float(self.bytes_compressed.compute()), float(self.bytes_dynamic.compute())
        self.results = {
            "baseline_perplexity": baseline,
            "compressed_perplexity": compressed,
            "perplexity_degradation_pct": 100.0 * (compressed / baseline - 1.0),
            "memory_savings_pct": 100.0 * (1.0 - stored / full) if full else 0.0,
            "compressed_cache_bytes": stored,
            "dynamic_cache_bytes": full,
        }
        for name, value in self.results.items():
            self.log(f"val/{name}", value, prog_bar=name.endswith("perplexity"), sync_dist=False)
        for metric in (self.ppl_baseline, self.ppl_compressed, self.bytes_compressed, self.bytes_dynamic):
            metric.reset()

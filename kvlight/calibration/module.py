"""The LightningModule: a frozen causal LM plus the trainable compressor.

``fit`` (after its callbacks allocated widths where asked and captured K/V: kvlight.calibration.callbacks) runs one
statistics epoch over the captured rows (PCA bases, KVSplice initialisation; float64 sums all-reduced across
processes; width codecs then fit their static steps), then trains trainable heads with Adam on the reconstruction
loss or, with ``objective kl``, end to end. ``validate`` measures baseline and compressed perplexity, feeding each
window in chunks through a :class:`~kvlight.serving.cache.CompressedCache` so attention reads what the cache stores,
and the exact bytes the cache holds. The frozen model is kept outside the module tree: it never reaches the
optimizer or a checkpoint.
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from torchmetrics import SumMetric

from kvlight.analysis.bit_allocation import WHITENED
from kvlight.calibration.callbacks import AllocateWidths, Capture, CaptureKV, SafeCheckpoints
from kvlight.calibration.distill import (
    compressor_optimizer,
    distillation_loss,
    kept_positions,
    latent_quantizers,
    step_generator,
    warmup_cosine,
)
from kvlight.calibration.divergence import DivergedError, check_finite, first_bad_head
from kvlight.calibration.frozen import shard
from kvlight.calibration.objectives import (
    check_objectives,
    check_whitened,
    key_weights,
    reconstruction_loss,
    resolve_config,
    value_weights,
)
from kvlight.calibration.options import (
    DEFAULT_COMPRESSION,
    DEFAULT_OBJECTIVE,
    DEFAULT_RUNTIME,
    CompressionOptions,
    ObjectiveOptions,
    RuntimeOptions,
    as_dict,
    coerce,
)
from kvlight.calibration.perplexity import TokenPerplexity
from kvlight.calibration.shards import KVShardStream, load_manifest, num_rows
from kvlight.compressors.compressor import STEP_ROWS, KVCompressor
from kvlight.compressors.provenance import base_model_record
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError, KVLightError
from kvlight.hf import cache_kwargs
from kvlight.models import geometry_of, load_model, model_fingerprint, resolve_dtype
from kvlight.serving.cache import CompressedCache, default_cache_bytes, dynamic_cache_bytes
from kvlight.serving.positions import PositionTracker

#: Checkpoint key of the statistics sums when a checkpoint is taken inside the statistics epoch.
STATISTICS_KEY = "kvlight_statistics"
WIDENED_KEY = "kvlight_steps_widened"


class KVCalibrationModule(pl.LightningModule):
    """Frozen HF causal LM + trainable KV compressor.

    Args:
        model: hub id, local directory, ``.gguf`` file, or None for the embedded default.
        compression: what the cache stores (config, backend, ranks or widths, exact tokens; see the dataclass).
        objective: what the fit minimises after the statistics pass.
        runtime: how the frozen model runs (dtype, batch sizes).
        backend_options: settings per backend, e.g. ``{"kvsplice": {"init": "random", "latent_affine": false}}``
            (each backend's options dataclass, kvlight.compressors.registry).
    """

    def __init__(
        self,
        model: str | None = None,
        compression: CompressionOptions = DEFAULT_COMPRESSION,
        objective: ObjectiveOptions = DEFAULT_OBJECTIVE,
        runtime: RuntimeOptions = DEFAULT_RUNTIME,
        backend_options: dict[str, dict] | None = None,
    ) -> None:
        super().__init__()
        self.compression_options = coerce(CompressionOptions, compression)
        self.objective_options = coerce(ObjectiveOptions, objective)
        self.runtime_options = coerce(RuntimeOptions, runtime)
        self.backend_options = dict(backend_options or {})
        # Plain data only: `--ckpt_path` reloads hyperparameters with weights_only=True.
        hparams = {
            "model": model,
            "compression": as_dict(self.compression_options),
            "objective": as_dict(self.objective_options),
            "runtime": as_dict(self.runtime_options),
            "backend_options": self.backend_options,
        }
        self.save_hyperparameters(hparams)
        self.geometry = geometry_of(model)
        #: True until fit's setup (AllocateWidths) replaced the provisional config with the allocated widths.
        self.allocation_pending = self.compression_options.allocates
        self.allocation_metrics = None  # the sensitivity metrics an allocation used (kvlight.analysis.metrics_io)
        self.allocation_seconds = 0.0
        check_whitened(self.compression_options, self.objective_options)
        self._install(resolve_config(self.compression_options, self.geometry))
        self._key_weights: torch.Tensor | None = None
        self._value_weights: torch.Tensor | None = None
        self._capture: Capture | None = None
        self.automatic_optimization = False
        self.strict_loading = False
        self._frozen: torch.nn.Module | None = None
        self.fingerprint: str | None = None
        self._tracker: PositionTracker | None = None
        self.stats_epochs = 1
        self.ppl_baseline = TokenPerplexity()
        self.ppl_compressed = TokenPerplexity()
        self.bytes_compressed = SumMetric()
        self.bytes_dynamic = SumMetric()  # a full DynamicCache(): every layer keeps every token
        self.bytes_default = SumMetric()  # the model's default DynamicCache(config=...): sliding layers keep a window
        self.results: dict[str, float] = {}
        self._saved_statistics: list[torch.Tensor] | None = None
        #: whether the fit's final steps got their headroom (``step_headroom``; once per fit, resumes included).
        self._steps_widened = False

    def _install(self, config: CompressionConfig) -> None:
        """Build the compressor for ``config`` (checked against the objectives) and record the config."""
        # The checkpoint carries the resolved config itself, so `validate --ckpt_path` needs no file.
        self.hparams["compression"]["config"] = config.to_dict()
        algo = self.compression_options.compressor
        self.compressor = KVCompressor(config, self.geometry, algo=algo, options=self.backend_options)
        check_objectives(self.compressor, self.objective_options, self.trains)

    @property
    def trains(self) -> bool:
        """Whether fit trains after the statistics pass: the compressor has trainable heads, or will have once a
        pending allocation is installed (a ``fisher-white`` one installs KVSplice heads over a provisional PCA
        config, so the provisional compressor alone would say no)."""
        pending_white = self.allocation_pending and self.compression_options.weighting in WHITENED
        return self.compressor.trainable or pending_white

    def install_allocation(self, config: dict, metrics, seconds: float, fisher_weights=None) -> None:
        """Install allocated widths (kvlight.calibration.callbacks.AllocateWidths); the checkpoint then describes
        the allocated config alone, so ``validate --ckpt_path`` rebuilds it as it is.

        ``fisher_weights``: ``(key, value)`` ``[L, H, D, D]`` regularised Fishers of a "fisher-white" allocation
        (kvlight.analysis.whitening): the statistics pass fits the whitened basis with them and the reconstruction
        epochs weigh errors by them. None keeps the weights already installed.
        """
        self._install(CompressionConfig.from_dict(config).validate(*self._shape()))
        self.allocation_pending = False
        self.hparams["compression"]["target_memory_reduction"] = None
        self.allocation_metrics, self.allocation_seconds = metrics, seconds
        if fisher_weights is not None:
            self._key_weights, self._value_weights = fisher_weights

    def configure_callbacks(self):
        # Stateless, so the ones a fit attached serve a later validate on the same Trainer (returned again, Lightning
        # would replace them and say so on every `kvlight calibrate`).
        attached = {type(callback) for callback in self._trainer.callbacks} if self._trainer is not None else set()
        ours = (SafeCheckpoints(), AllocateWidths(), CaptureKV())
        return [callback for callback in ours if type(callback) not in attached]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's, reading the file as plain data only whatever ``weights_only`` says (a crafted checkpoint
        cannot run code) and refusing an unreadable or unsafe one with a one-line CheckpointError."""
        from kvlight.calibration.checkpoints import load_checkpoint_file

        kwargs.pop("weights_only", None)
        start = checkpoint_path.tell() if hasattr(checkpoint_path, "seek") else None  # a file object is read twice
        load_checkpoint_file(checkpoint_path, map_location or "cpu")  # refuses before Lightning unpickles anything
        if start is not None:
            checkpoint_path.seek(start)
        return super().load_from_checkpoint(
            checkpoint_path, map_location, hparams_file, strict, weights_only=True, **kwargs
        )

    def _shape(self) -> tuple[int, int, int]:
        return self.geometry.num_layers, self.geometry.num_kv_heads, self.geometry.head_dim

    @property
    def capture_seconds(self) -> float:
        return 0.0 if self._capture is None else self._capture.seconds

    # ------------------------------------------------------------------ the frozen model
    @property
    def model_dtype(self) -> torch.dtype:
        """The frozen model's dtype (``runtime.model_dtype``, "auto" resolved for the device it runs on)."""
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        return resolve_dtype(self.runtime_options.model_dtype, device)

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
        self.fingerprint = model_fingerprint(model, self.hparams.model)  # of the whole weights, before sharding
        self.compressor.base_model = base_model_record(model, self.hparams.model)  # saved in the compressor's JSON
        model = shard(model, self._device_mesh) if self.sharded else model.to(self.device)
        # Not a submodule: no optimizer, no checkpoint, no DDP wrapping for the frozen weights (FSDP2 shards it
        # directly, above, so a model too big for one GPU is split across them).
        object.__setattr__(self, "_frozen", model)
        if self.geometry.rope:
            object.__setattr__(self, "_tracker", PositionTracker(model))

    def setup(self, stage: str) -> None:
        from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy

        # DDP refuses to wrap a module with nothing to train (every head PCA), and ModelParallelStrategy's checkpoint
        # maps optimizer state to the module's parameters. One inert registered parameter satisfies both; no loss
        # uses it and on_save_checkpoint keeps it out of checkpoints.
        parallel = isinstance(self.trainer.strategy, (DDPStrategy, ModelParallelStrategy))
        if stage == "fit" and parallel and not self.compressor.trainable:
            self._ddp_anchor = torch.nn.Parameter(torch.zeros(1))

    def teardown(self, stage: str) -> None:
        if self._tracker is not None:
            self._tracker.close()
            object.__setattr__(self, "_tracker", None)
        object.__setattr__(self, "_frozen", None)

    # ------------------------------------------------------------------ fit
    def use_capture(self, capture: Capture) -> None:
        """What the capture (kvlight.calibration.callbacks.CaptureKV) hands over, and the weights built from it."""
        self._capture = capture
        objective = self.objective_options
        if objective.key_objective == "query":
            reduce = lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum")  # noqa: E731
            window = objective.score_window or capture.seq_len
            if capture.query_moments is None:
                raise KVLightError(f"the capture in {capture.directory} has no query moments; delete it to recapture")
            self._key_weights = key_weights(capture.query_moments, self.frozen, window, reduce)
        if objective.value_objective == "output":
            self._value_weights = value_weights(self.frozen, self.geometry)
        if objective.objective == "kl" and len(capture.windows) == 0:
            raise ConfigError(
                "objective kl needs at least one calibration window per process: raise --calibration-samples"
            )

    def configure_optimizers(self):
        optimizer = compressor_optimizer(self.compressor, self.objective_options.lr)
        if optimizer is None:  # PCA only: a dummy optimizer keeps Lightning's manual loop happy
            anchor = getattr(self, "_ddp_anchor", None)
            params = [anchor if anchor is not None else torch.nn.Parameter(torch.zeros(1, device=self.device))]
            optimizer = torch.optim.Adam(params, lr=self.objective_options.lr)
        if self.objective_options.objective != "kl":
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
        check_finite(self.compressor, "after the statistics pass", "raise --max-samples-per-head/--calibration-samples")

    def _calibrate_steps(self) -> None:
        """The static steps of width codecs: one more read of (up to STEP_ROWS of) this process's captured rows, now
        that the bases are fitted; the error sums are added across processes, so every replica gets the same steps."""
        if self._capture is None:
            raise KVLightError("width codecs need the captured rows to fit their steps; fit through the DataModule")
        directory, batch_size = self._capture.directory, self._capture.kv_batch_size
        rows = num_rows(load_manifest(directory, verify=False))
        stream = KVShardStream(directory, batch_size, max(1, math.ceil(rows / batch_size)), exact_epochs=1)
        self.compressor.begin_step_calibration(self.device)
        seen = 0
        for batch in stream:
            if seen >= STEP_ROWS:
                break
            take = STEP_ROWS - seen
            keys, values = batch["keys"][:take].to(self.device), batch["values"][:take].to(self.device)
            self.compressor.accumulate_steps(keys, values)
            seen += keys.shape[0]
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
                self._widen_if_last(batch_idx)
            return None
        if not self.compressor.trainable:
            return None
        optimizer = self.optimizers()
        kl = self.objective_options.objective == "kl"
        if kl:
            loss = self._distillation_loss()
        else:
            loss = reconstruction_loss(self.compressor, keys, values, self._key_weights, self._value_weights)
        optimizer.zero_grad()
        self.manual_backward(loss)
        if self.sharded and self.trainer.world_size > 1:
            # No DDP wrapper under ModelParallelStrategy: average the (small) compressor's gradients by hand.
            for param in self.compressor.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= self.trainer.world_size
        optimizer.step()
        lr = self.objective_options.lr
        check_finite(self.compressor, f"after optimizer step {self.global_step}", f"lower --lr (it is {lr:g})")
        if kl:
            self.lr_schedulers().step()  # manual optimization: Lightning steps no scheduler itself
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=keys.shape[0])
        self._widen_if_last(batch_idx)
        return loss.detach()

    def _widen_if_last(self, batch_idx: int) -> None:
        """After the fit's last step, widen the final static steps by ``step_headroom``
        (:meth:`KVCompressor.widen_steps`), so the checkpoint saved after this batch, the validation and the saved
        compressor all hold them. Why at the end and not in the step search: the reconstruction epochs train the
        steps on the squared error too, and in an experiment they trained a headroom of 1.3 given to the search
        away (the learned gains fell to about 1 / 1.3)."""
        trainer = self.trainer
        stepped_out = trainer.max_steps is not None and 0 < trainer.max_steps <= self.global_step
        last_epoch = trainer.max_epochs is not None and self.current_epoch == trainer.max_epochs - 1
        if stepped_out or (last_epoch and batch_idx == trainer.num_training_batches - 1):
            self._widen_steps()

    def _widen_steps(self) -> None:
        if self._steps_widened or not self.compressor.has_widths or self.compressor.statistics_tensors():
            return
        self.compressor.widen_steps(self.compression_options.step_headroom)
        self._steps_widened = True

    def on_train_end(self) -> None:
        # A fit cut short (max_time, an interrupt, limit_train_batches against max_epochs) still ends widened.
        self._widen_steps()

    def _distillation_loss(self) -> torch.Tensor:
        """KL of the frozen model's outputs with vs without compression on the next calibration windows.

        The windows cycle in order with the optimizer step count, so a resumed fit continues where it stopped.
        """
        if self._capture is None:
            raise KVLightError("objective kl needs the calibration windows; fit through KVCalibrationDataModule")
        windows, size = self._capture.windows, self.objective_options.distill_batch_size
        index = self.global_step % math.ceil(len(windows) / size)
        input_ids = windows[index * size : (index + 1) * size].to(self.device)
        quantizers = latent_quantizers(self.compressor, next(self.frozen.parameters()).dtype)
        share, generator = self.objective_options.distill_tokens, step_generator(self._capture.seed, self.global_step)
        positions = kept_positions(input_ids.shape[1], share, generator, self.device)
        return distillation_loss(
            self.frozen, self.compressor, input_ids, self._tracker, quantizers, positions=positions
        )

    def on_train_epoch_end(self) -> None:
        # Normally fitted at the last batch already; this covers an epoch cut short (max_steps, limit_train_batches).
        if self.current_epoch == self.stats_epochs - 1 and self.compressor.statistics_tensors():
            self._finalize_statistics()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"].pop("_ddp_anchor", None)
        checkpoint[WIDENED_KEY] = self._steps_widened
        sums = self.compressor.statistics_tensors()
        if sums:  # inside the statistics epoch: keep the sums so far, summed over ranks (every rank calls this)
            checkpoint[STATISTICS_KEY] = [self.trainer.strategy.reduce(t.clone(), reduce_op="sum").cpu() for t in sums]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._saved_statistics = checkpoint.get(STATISTICS_KEY)
        self._steps_widened = bool(checkpoint.get(WIDENED_KEY, False))
        saved = ((checkpoint.get("hyper_parameters") or {}).get("compression") or {}).get("config")
        if isinstance(saved, dict) and saved != self.hparams["compression"]["config"]:
            # A resumed fit allocated its widths again in setup; the checkpoint's allocation is the one it continues.
            self.install_allocation(saved, self.allocation_metrics, self.allocation_seconds)

    # ------------------------------------------------------------------ validate
    def _chunked_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, cache) -> torch.Tensor:
        chunk = self.runtime_options.eval_chunk
        logits = []
        for start in range(0, input_ids.shape[1], chunk):
            mask = None if attention_mask is None else attention_mask[:, : start + chunk]
            out = self.frozen(input_ids=input_ids[:, start : start + chunk], attention_mask=mask, **cache_kwargs(cache))
            logits.append(out.logits)
        return torch.cat(logits, dim=1)

    def validation_step(self, batch, batch_idx: int) -> None:
        input_ids = batch["input_ids"] if isinstance(batch, dict) else batch
        attention_mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        baseline = self.frozen(input_ids=input_ids, attention_mask=attention_mask).logits
        self.ppl_baseline.update(baseline, input_ids, attention_mask)
        cache = CompressedCache(self.compressor, self._tracker)
        compressed = self._chunked_logits(input_ids, attention_mask, cache)
        self.ppl_compressed.update(compressed, input_ids, attention_mask)
        kv_dtype = cache.layers[0].dtype
        self._kv_itemsize = torch.empty((), dtype=kv_dtype).element_size()
        self.bytes_compressed.update(float(cache.stored_bytes()))
        self.bytes_dynamic.update(float(dynamic_cache_bytes(self.geometry, *input_ids.shape, kv_dtype)))
        self.bytes_default.update(float(default_cache_bytes(self.geometry, *input_ids.shape, kv_dtype, cache.windows)))

    def on_validation_epoch_end(self) -> None:
        baseline = float(self.ppl_baseline.compute())
        compressed = float(self.ppl_compressed.compute())
        if not math.isfinite(compressed):  # weights that pass the fit's checks can still overflow in the cache
            where = first_bad_head(self.compressor) or "no head's weights are NaN, yet the compressed cache overflows"
            raise DivergedError(f"the compressed perplexity is {compressed} ({where}); refit with a lower --lr")
        stored, full = float(self.bytes_compressed.compute()), float(self.bytes_dynamic.compute())
        default = float(self.bytes_default.compute())
        # Savings are against what the user runs today, the model's default cache (for a model with sliding layers,
        # those keep only their window); beside it, against a full DynamicCache (equal for models without windows).
        self.results = {
            "baseline_perplexity": baseline,
            "compressed_perplexity": compressed,
            "perplexity_degradation_pct": 100.0 * (compressed / baseline - 1.0),
            "memory_savings_pct": 100.0 * (1.0 - stored / default) if default else 0.0,
            "compressed_cache_bytes": stored,
            "default_cache_bytes": default,
            "dynamic_cache_bytes": full,
            "memory_savings_vs_full_dynamic_pct": 100.0 * (1.0 - stored / full) if full else 0.0,
        }
        # What target_memory_reduction is measured against: an fp16 cache, whatever dtype the model runs in here.
        fp16 = full * 2 / getattr(self, "_kv_itemsize", 2)
        self.results["fp16_cache_bytes"] = fp16
        self.results["memory_savings_vs_fp16_pct"] = 100.0 * (1.0 - stored / fp16) if fp16 else 0.0
        for name, value in self.results.items():
            self.log(f"val/{name}", value, prog_bar=name.endswith("perplexity"), sync_dist=False)
        for metric in (
            self.ppl_baseline, self.ppl_compressed, self.bytes_compressed, self.bytes_dynamic, self.bytes_default
        ):  # fmt: skip
            metric.reset()

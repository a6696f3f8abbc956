"""``kvlight calibrate``: fit then validate in one go, the five result lines printed and every artefact written.

Its flags keep the upstream design's names (``--rank``, ``--calibration-samples``, ...) but declare nothing: each names options of
the LightningModule, the DataModule, the Trainer or :class:`CalibrateRun` (see kvlight.cli.flags), so ``kvlight
calibrate`` and ``kvlight fit`` share every type and default.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from kvlight.analysis.metrics_io import metrics_to_json
from kvlight.calibration.datamodule import KVCalibrationDataModule
from kvlight.calibration.module import KVCalibrationModule
from kvlight.calibration.windows import shard_for_rank
from kvlight.cli.flags import DATA_FLAGS, OneLineParser, add_flags, flags, named, parse, to_arguments
from kvlight.cli.preflight import check_hardware, trainer_errors
from kvlight.errors import ConfigError
from kvlight.files import atomic_torch_save, atomic_write_text
from kvlight.outputs import OutputSet


@dataclass(frozen=True)
class CalibrateRun:
    """What only ``kvlight calibrate`` has.

    Args:
        epochs: training epochs after the statistics pass (trainable backends; with objective kl: passes over the
            calibration windows).
        output_dir: where results, compressor, config, checkpoint and TensorBoard logs go (one set: staged beside
            it and renamed into place at the end, see kvlight.outputs).
        seed: seed of everything (row sampling, shuffling, random starts).
        overwrite: replace the previous run's files in a non-empty output_dir (refused without it).
    """

    epochs: int = 10
    output_dir: str = "compression_results"
    seed: int = 0
    overwrite: bool = False


FLAGS = DATA_FLAGS + flags(
    ("--compressor", "model.compression.compressor"),
    ("--config", "model.compression.config"),
    ("--target-memory-reduction", "model.compression.target_memory_reduction"),
    ("--bits-weighting", "model.compression.bits_weighting"),
    ("--sensitivity-samples", "model.compression.sensitivity_samples"),
    ("--rank", "model.compression.rank"),
    ("--rank-k", "model.compression.rank_k"),
    ("--rank-v", "model.compression.rank_v"),
    ("--latent-bits", "model.compression.latent_bits"),
    ("--quant-group-size", "model.compression.quant_group_size"),
    ("--sink-tokens", "model.compression.sink_tokens"),
    ("--recent-window", "model.compression.recent_window"),
    ("--key-rope-block", "model.compression.key_rope_block"),
    ("--batch-size", ("model.runtime.capture_batch_size", "data.batch_size")),
    ("--model-dtype", "model.runtime.model_dtype"),
    ("--max-samples-per-head", "data.max_samples_per_head"),
    ("--lr", "model.objective.lr"),
    ("--objective", "model.objective.objective"),
    ("--key-objective", "model.objective.key_objective"),
    ("--score-window", "model.objective.score_window"),
    ("--value-objective", "model.objective.value_objective"),
    ("--distill-batch-size", "model.objective.distill_batch_size"),
    ("--precision", "trainer.precision"),
    ("--accelerator", "trainer.accelerator"),
    ("--devices", "trainer.devices"),
    ("--epochs", "calibrate.epochs"),
    ("--seed", ("calibrate.seed", "data.seed")),
    ("--output-dir", "calibrate.output_dir"),
    ("--overwrite", "calibrate.overwrite", "true"),
)


OPTION_GROUPS = ("model.compression", "model.objective", "model.runtime")


def source_parser():
    """The jsonargparse parser of every class ``calibrate`` builds: the flags name its keys."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(exit_on_error=False, prog="kvlight calibrate")
    parser.add_lightning_class_args(KVCalibrationModule, "model", subclass_mode=False)
    parser.add_lightning_class_args(KVCalibrationDataModule, "data", subclass_mode=False)
    parser.add_class_arguments(Trainer, "trainer", instantiate=False, fail_untyped=False)
    parser.add_dataclass_arguments(CalibrateRun, "calibrate")
    parser.link_arguments("model.model", "data.model")  # the tokenizer must be the model's
    return parser


def main(argv: list[str]) -> int:
    """fit + validate; prints the five result lines of the upstream design's step 2 and writes results, compressor and checkpoint."""
    source = source_parser()
    cli = OneLineParser(prog="kvlight calibrate", description="fit + validate in one go (the upstream design's step 2)")
    add_flags(cli, FLAGS, source)
    config = parse(source, to_arguments(cli.parse_args(argv), FLAGS), FLAGS)
    run = CalibrateRun(**vars(config.calibrate))
    check_hardware(config.trainer.accelerator, config.trainer.devices, "--")  # before anything loads or is written
    # Everything is written into a staging directory and published at the end: a refused, failed or killed run
    # leaves the previous set (or nothing), never a mix (kvlight.outputs).
    outputs = OutputSet(Path(run.output_dir), run.overwrite)
    staging = outputs.stage()
    try:
        return _calibrate(source, config, run, staging, outputs)
    finally:
        outputs.close()


def _calibrate(source, config, run: CalibrateRun, output: Path, outputs: OutputSet) -> int:
    """main's work, every file written under ``output`` (the staging directory of ``outputs``)."""
    import lightning.pytorch as pl

    pl.seed_everything(run.seed, verbose=False)
    try:
        built = source.instantiate_classes(config)
    except ConfigError as exc:
        raise ConfigError(named(str(exc), FLAGS, OPTION_GROUPS)) from None
    module, data = built.model, built.data
    # Read the data before the Trainer exists: a bad source then fails with one line and writes no logs.
    data.setup("fit")
    with trainer_errors("--"):
        trainer = _trainer(vars(config.trainer), output)
    epochs = 1 + (run.epochs if module.trains else 0)
    trainer.fit_loop.max_epochs = epochs
    objective = module.objective_options
    if objective.objective == "kl":
        # An epoch of the K/V stream is as long as its row batches; distillation counts passes over the windows.
        per_process = len(shard_for_rank(data.hparams.calibration_samples, trainer.global_rank, trainer.world_size))
        trainer.fit_loop.max_epochs = -1
        trainer.fit_loop.epoch_loop.max_steps = run.epochs * math.ceil(per_process / objective.distill_batch_size)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    calibration_seconds = time.perf_counter() - start
    trainer.validate(module, datamodule=data, verbose=False)
    if trainer.global_rank != 0:
        return 0
    _write(module, data, config, output, calibration_seconds, outputs.directory)
    outputs.publish()
    return 0


def _trainer(settings: dict, output: Path):
    """The Trainer of the trainer flags (Lightning parses devices and precision itself), logging and checkpointing
    into ``output``; validation only when asked (after fit)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    fixed = {
        "logger": TensorBoardLogger(output, name="logs"),
        "callbacks": [ModelCheckpoint(dirpath=output / "checkpoints", save_last=True, save_top_k=0)],
        "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": None,
        "val_check_interval": 10**9,
        "use_distributed_sampler": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**settings, **fixed})


def _write(module, data, config, output: Path, calibration_seconds: float, shown: Path) -> None:
    """The results JSON, the compressor (``.pt`` and safetensors directory), its config, the five lines; written
    under ``output``, named as under ``shown`` (where they are published)."""
    algo = module.compression_options.compressor or module.compressor.config.algo_default
    objective = module.objective_options
    results = dict(module.results)
    results.update(
        {
            "calibration_time_s": calibration_seconds,
            "capture_time_s": module.capture_seconds,
            "compressor": algo,
            "model": module.hparams.model or "embedded:smollm2-135m-instruct",
            "calibration_dataset": data.hparams.dataset,
            "calibration_samples": data.hparams.calibration_samples,
            "eval_samples": data.hparams.eval_samples,
            "seq_len": data.hparams.seq_len,
            "eval_chunk": module.runtime_options.eval_chunk,
            "precision": str(config.trainer.precision),
            "model_dtype": str(module.model_dtype).removeprefix("torch."),
            "key_objective": objective.key_objective,
            "value_objective": objective.value_objective,
            "objective": objective.objective,
            "compression_config": module.compressor.config.to_dict(),
            "checkpoint": str(shown / "checkpoints" / "last.ckpt"),
        }
    )
    if module.allocation_metrics is not None:
        results["allocation_seconds"] = module.allocation_seconds
        atomic_write_text(output / "fim_metrics.json", metrics_to_json(module.allocation_metrics))
        compression = module.compressor.config
        reduction = compression.memory_reduction(compression.num_layers, compression.num_kv_heads, compression.d_head)
        weighting = module.compression_options.weighting
        print(
            f"Allocated widths:       {16 * (1 - reduction):.2f} bits per element ({weighting}, sensitivity "
            f"pass {module.allocation_seconds:.1f}s; metrics in {shown}/fim_metrics.json)"
        )
    atomic_torch_save(module.compressor.state_dict(), output / f"compressor_{algo}.pt")
    module.compressor.save_pretrained(output / f"compressor_{algo}")
    module.compressor.config.to_json(output / f"compression_config_{algo}.json")
    atomic_write_text(output / f"calibration_results_{algo}.json", json.dumps(results, indent=2) + "\n")
    print(f"Baseline perplexity:    {results['baseline_perplexity']:.2f}")
    print(f"Compressed perplexity:  {results['compressed_perplexity']:.2f}")
    print(f"Perplexity degradation: {results['perplexity_degradation_pct']:+.2f}%")
    versus = f"vs a {results['model_dtype']} DynamicCache"
    if results.get("default_cache_bytes", results["dynamic_cache_bytes"]) != results["dynamic_cache_bytes"]:
        # sliding layers: the model's default cache keeps only their window; savings are against it first
        versus = (
            f"vs the model's default {results['model_dtype']} cache, whose sliding layers keep their window; "
            f"{results['memory_savings_vs_full_dynamic_pct']:.1f}% vs a full DynamicCache"
        )
    if results["fp16_cache_bytes"] != results["dynamic_cache_bytes"]:
        versus += f"; {results['memory_savings_vs_fp16_pct']:.1f}% vs fp16"
    print(f"Memory savings:         {results['memory_savings_pct']:.1f}% ({versus})")
    print(f"Calibration time:       {calibration_seconds:.1f}s")
    print(f"Results saved to {shown}/calibration_results_{algo}.json and {shown}/compressor_{algo}.pt")

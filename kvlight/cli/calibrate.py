"""``kvlight calibrate``: fit then validate in one go, the result lines printed and every artefact written.

    kvlight calibrate                                   # the recommended widths at a KV budget of 0.24
    kvlight calibrate --kv-budget 0.125 --push-to-hub me/smollm2-kv-2bit

Its flags (``--rank``, ``--calibration-samples``, ...) declare nothing: each names options of the LightningModule,
the DataModule, the Trainer or :class:`CalibrateRun` (see kvlight.cli.flags), so ``kvlight calibrate`` and ``kvlight
fit`` share every type and default.
"""

from __future__ import annotations

import json
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kvlight.analysis.bit_allocation import WEIGHTINGS
from kvlight.analysis.metrics_io import metrics_to_json
from kvlight.calibration.datamodule import KVCalibrationDataModule
from kvlight.calibration.module import KVCalibrationModule
from kvlight.calibration.options import MODEL_DTYPES, OBJECTIVES
from kvlight.calibration.recipes import Applied, apply, recipe_for
from kvlight.calibration.timing import TimeEstimate, minutes
from kvlight.calibration.windows import shard_for_rank
from kvlight.cli.flags import (
    STORAGE_FLAGS,
    Flag,
    OneLineParser,
    add_flags,
    budget_flags,
    flags,
    given,
    named,
    parse,
    text_flags,
    to_arguments,
)
from kvlight.cli.preflight import check_hardware, check_repo_id, trainer_errors
from kvlight.compressors.registry import backend_names
from kvlight.config import RECOMMENDED
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
        push_to_hub: a Hugging Face repo id (``you/name``) to upload the compressor directory to, with a model card,
            once the run's files are written (needs a token: ``hf auth login`` or HF_TOKEN).
        time_budget: minutes the fit and validation may take: fewer calibration windows, then fewer passes, until
            the time estimate printed before the fit fits (None: the recipe's plan, however long).
    """

    epochs: int = 10
    output_dir: str = "compression_results"
    seed: int = 0
    overwrite: bool = False
    push_to_hub: str | None = None
    time_budget: float | None = None

    def __post_init__(self) -> None:
        budget = self.time_budget
        if budget is not None and (isinstance(budget, bool) or not math.isfinite(budget) or budget <= 0):
            raise ConfigError(f"--time-budget must be a positive number of minutes such as 30, got {budget!r}")
        if self.push_to_hub is not None:
            check_repo_id(self.push_to_hub)  # before anything loads: a typo must not cost the whole run


#: every flag, in its help section; the data flags are the calibration text, a training setting.
FLAGS = (
    flags(
        ("--model", "model.model"),
        ("--output-dir", "calibrate.output_dir"),
        ("--overwrite", "calibrate.overwrite", "true"),
        ("--seed", ("calibrate.seed", "data.seed")),
        ("--time-budget", "calibrate.time_budget"),
    )
    + (
        Flag("--push-to-hub", ("calibrate.push_to_hub",), metavar="REPO"),
        Flag(
            "--compression-config",
            ("model.compression.config",),
            metavar="PATH",
            help="a compression config JSON, as kvlight analyze or kvlight config uniform write it; none: the ranks "
            "below, or with no rank either, widths allocated at --kv-budget",
        ),
        Flag(
            "--compressor",
            ("model.compression.compressor",),
            choices=backend_names,
            shown="kvsplice",
            help="the backend of every head: the budget's recipe's (kvsplice at every budget; see "
            "kvlight.calibration.recipes); with a compression config or a rank, the config's own unless given",
        ),
        Flag("--config", ("model.compression.config",), alias_of="--compression-config"),
        *budget_flags("model.compression.target_memory_reduction", "0.24"),
        Flag(
            "--bits-weighting",
            ("model.compression.bits_weighting",),
            group="budget",
            choices=WEIGHTINGS,
            help="how the width allocation weighs a direction's error (none: fisher-white, or fisher-joint for a "
            "backend without separate encoder and decoder, such as pca)",
        ),
    )
    + flags(
        ("--sensitivity-samples", "model.compression.sensitivity_samples"),
        ("--sensitivity-seq-len", "model.compression.sensitivity_seq_len"),
        ("--rank", "model.compression.rank"),
        ("--rank-k", "model.compression.rank_k"),
        ("--rank-v", "model.compression.rank_v"),
        ("--latent-bits", "model.compression.latent_bits"),
        ("--quant-group-size", "model.compression.quant_group_size"),
        ("--step-headroom", "model.compression.step_headroom"),
        group="budget",
    )
    + STORAGE_FLAGS
    + text_flags("training")
    + flags(
        ("--epochs", "calibrate.epochs"),
        ("--lr", "model.objective.lr"),
        ("--max-samples-per-head", "data.max_samples_per_head"),
        ("--score-window", "model.objective.score_window"),
        ("--distill-batch-size", "model.objective.distill_batch_size"),
        ("--distill-tokens", "model.objective.distill_tokens"),
        group="training",
    )
    + (
        Flag("--objective", ("model.objective.objective",), group="training", choices=OBJECTIVES),
        Flag("--key-objective", ("model.objective.key_objective",), group="training", choices=("mse", "query")),
        Flag("--value-objective", ("model.objective.value_objective",), group="training", choices=("mse", "output")),
        Flag("--model-dtype", ("model.runtime.model_dtype",), group="hardware", choices=MODEL_DTYPES),
    )
    + flags(
        ("--batch-size", ("model.runtime.capture_batch_size", "data.batch_size")),
        ("--precision", "trainer.precision"),
        ("--accelerator", "trainer.accelerator"),
        ("--devices", "trainer.devices"),
        group="hardware",
    )
)


OPTION_GROUPS = ("model.compression", "model.objective", "model.runtime")


def arguments(argv: list[str]):
    """``(source parser, parsed options)`` of ``kvlight calibrate argv``, every flag checked that can be before
    anything loads."""
    source = source_parser()
    cli = OneLineParser(
        prog="kvlight calibrate",
        description="Calibrate a compressor for a model's KV cache at a KV budget, validate it, and write it "
        "(with no flags: the recommended widths on the embedded default model).",
    )
    add_flags(cli, FLAGS, source)
    typed = cli.parse_args(argv)
    budget = given(typed, FLAGS, "--kv-budget")
    fixed = [name for name in ("--compression-config", "--rank", "--rank-k", "--rank-v") if given(typed, FLAGS, name)]
    if budget and fixed:
        raise ConfigError(
            f"{budget} allocates a width per principal direction; it does not combine with {fixed[0]} (give one or "
            "the other)"
        )
    applied = None if fixed else _take_recipe(typed)
    config = parse(source, to_arguments(typed, FLAGS), FLAGS)
    return source, config, applied


def _budget(typed) -> float | None:
    """The KV budget of the parsed flags: ``--kv-budget``, its old spelling (``1 - R``), or the recommended one;
    None when the value given is no budget (parsing the flags then says so in one line)."""
    spelling = given(typed, FLAGS, "--kv-budget")
    if spelling is None:
        return round(1.0 - RECOMMENDED["target_memory_reduction"], 12)
    value = getattr(typed, next(flag for flag in FLAGS if flag.name == spelling).dest)
    try:
        budget = float(value) if spelling == "--kv-budget" else 1.0 - float(value)
    except ValueError:
        return None
    return round(budget, 12) if 0.0 < budget < 1.0 else None


def _take_recipe(typed) -> Applied | None:
    """Apply the recipe of the run's budget (kvlight.calibration.recipes) to the flags the user did not give."""
    budget = _budget(typed)
    if budget is None:
        return None
    by_name = {flag.name: flag for flag in FLAGS}
    given_values = {}
    for flag, _ in recipe_for(budget).flags():
        spelling = given(typed, FLAGS, flag)
        given_values[flag] = None if spelling is None else str(getattr(typed, by_name[spelling].dest))
    applied = apply(budget, given_values)
    for flag, value in applied.taken:
        setattr(typed, by_name[flag].dest, value)
    return applied


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
    """fit + validate; prints the result lines (the KV budget measured first) and writes results, compressor and
    checkpoint; with ``--push-to-hub``, uploads the compressor with a model card."""
    source, config, applied = arguments(argv)
    run = CalibrateRun(**vars(config.calibrate))
    if applied is not None:
        print(applied.summary())
        warning = applied.recipe.retrieval_warning(applied.budget)
        if warning is not None:
            print(warning, file=sys.stderr)
    check_hardware(config.trainer.accelerator, config.trainer.devices, "--")  # before anything loads or is written
    # Everything is written into a staging directory and published at the end: a refused, failed or killed run
    # leaves the previous set (or nothing), never a mix (kvlight.outputs).
    outputs = OutputSet(Path(run.output_dir), run.overwrite)
    staging = outputs.stage()
    try:
        code = _calibrate(source, config, run, staging, outputs, shlex.join(["kvlight", "calibrate", *argv]))
    finally:
        outputs.close()
    return code


def _calibrate(source, config, run: CalibrateRun, output: Path, outputs: OutputSet, command: str) -> int:
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
    timing = TimeEstimate(None if run.time_budget is None else 60.0 * run.time_budget)
    with trainer_errors("--"):
        trainer = _trainer(vars(config.trainer), output, [timing])
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
    results = _write(module, data, config, output, calibration_seconds, outputs.directory, timing, start)
    algo = results["compressor"]
    if run.push_to_hub is not None:  # the card travels with the directory, and stays in the published set
        from kvlight.compressors.card import CARD_NAME, model_card

        card = model_card(results, module.compressor, command, run.push_to_hub)
        atomic_write_text(output / f"compressor_{algo}" / CARD_NAME, card)
    outputs.publish()
    if run.push_to_hub is not None:
        from kvlight.compressors.hub import push_directory

        url = push_directory(outputs.directory / f"compressor_{algo}", run.push_to_hub)
        print(f"Pushed {outputs.directory}/compressor_{algo} to {url}")
    return 0


def _trainer(settings: dict, output: Path, callbacks: list):
    """The Trainer of the trainer flags (Lightning parses devices and precision itself), logging and checkpointing
    into ``output``, with ``callbacks`` besides the checkpoint's; validation only when asked (after fit)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    fixed = {
        "logger": TensorBoardLogger(output, name="logs"),
        "callbacks": [*callbacks, ModelCheckpoint(dirpath=output / "checkpoints", save_last=True, save_top_k=0)],
        "num_sanity_val_steps": 0,
        "check_val_every_n_epoch": None,
        "val_check_interval": 10**9,
        "use_distributed_sampler": False,
        "enable_model_summary": False,
    }
    return pl.Trainer(**{**settings, **fixed})


def _write(module, data, config, output: Path, calibration_seconds: float, shown: Path, timing, start) -> dict:
    """The results JSON, the compressor (``.pt`` and safetensors directory), its config, the result lines; written
    under ``output``, named as under ``shown`` (where they are published). ``timing``: the run's
    :class:`TimeEstimate`; ``start``: when the fit started (perf_counter). Returns the results."""
    took = time.perf_counter() - start
    fit_phases = module.allocation_seconds + module.capture_seconds
    measured = {
        "setup": timing.probe_seconds,
        "sensitivity": module.allocation_seconds,
        "capture": module.capture_seconds,
        "fit": calibration_seconds - fit_phases - timing.probe_seconds,
        "validation": took - calibration_seconds,
    }
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
            "estimated_seconds": timing.estimated,
            "time_probe": None if timing.speed is None else asdict(timing.speed),
            "phase_seconds": measured,
            "fit_and_validate_seconds": took,
        }
    )
    # The budget as --kv-budget counts it: the bytes the cache kept, as a fraction of an fp16 DynamicCache's.
    fp16 = results["fp16_cache_bytes"]
    results["kv_budget"] = results["compressed_cache_bytes"] / fp16 if fp16 else 0.0
    print(f"KV budget:              {100 * results['kv_budget']:.1f}% of an fp16 DynamicCache's bytes (measured)")
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
    if timing.estimated is not None:
        print(
            f"Time taken:             {minutes(took - timing.probe_seconds)} after the time estimate, which said "
            f"{minutes(sum(timing.estimated.values()))} (loading and timing the model took "
            f"{minutes(timing.probe_seconds)} before it)"
        )
    print(f"Results saved to {shown}/calibration_results_{algo}.json and {shown}/compressor_{algo}.pt")
    return results

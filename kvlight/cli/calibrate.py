"""``kvlight calibrate``: fit then validate in one go, the results printed and written."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from kvlight.files import atomic_torch_save, atomic_write_text, ensure_writable


def _process_count(devices: str, accelerator: str) -> int:
    """How many processes ``pl.Trainer(devices=..., accelerator=...)`` starts (for step counts set before it)."""
    text = str(devices).strip()
    if text.isdigit():
        return max(1, int(text))
    if text.lstrip("[").rstrip("]").replace(",", "").replace(" ", "").isdigit():  # "0,1" or "[0, 1]"
        return len([part for part in text.strip("[]").split(",") if part.strip()])
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():  # "auto" / "-1": every GPU
        return torch.cuda.device_count()
    return 1


def calibrate(args: argparse.Namespace) -> int:
    """fit + validate; prints the seed's five lines and writes results, compressor and checkpoint."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from kvlight.calibration.datamodule import KVCalibrationDataModule
    from kvlight.calibration.module import KVCalibrationModule

    output = ensure_writable(Path(args.output_dir))
    pl.seed_everything(args.seed, verbose=False)
    module = KVCalibrationModule(
        model=args.model,
        compression_config=args.config,
        compressor=args.compressor,
        rank=args.rank,
        rank_k=args.rank_k,
        rank_v=args.rank_v,
        sink_tokens=args.sink_tokens,
        recent_window=args.recent_window,
        latent_bits=args.latent_bits,
        quant_group_size=args.quant_group_size,
        lr=args.lr,
        capture_batch_size=args.batch_size,
        model_dtype=args.model_dtype,
        key_objective=args.key_objective,
        score_window=args.score_window,
        value_objective=args.value_objective,
        objective=args.objective,
        distill_batch_size=args.distill_batch_size,
        target_memory_reduction=args.target_memory_reduction,
        bits_weighting=args.bits_weighting,
    )
    data = KVCalibrationDataModule(
        model=args.model,
        dataset=args.calibration_dataset,
        dataset_config=args.dataset_config,
        split=args.split,
        text_field=args.text_field,
        seq_len=args.seq_len,
        calibration_samples=args.calibration_samples,
        eval_samples=args.eval_samples,
        batch_size=args.batch_size,
        max_samples_per_head=args.max_samples_per_head,
        seed=args.seed,
    )
    # Read the data before the Trainer exists: a bad source then fails with one line and writes no logs.
    data.setup("fit")
    epochs = 1 + (args.epochs if module.compressor.trainable else 0)
    max_steps = -1
    if args.objective == "kl":
        # An epoch of the K/V stream is as long as its row batches; distillation counts passes over the windows.
        per_process = math.ceil(args.calibration_samples / _process_count(args.devices, args.accelerator))
        max_steps, epochs = args.epochs * math.ceil(per_process / args.distill_batch_size), -1
    checkpoint = ModelCheckpoint(dirpath=output / "checkpoints", save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        max_epochs=epochs,
        max_steps=max_steps,
        precision=args.precision,
        accelerator=args.accelerator,
        devices=int(args.devices) if str(args.devices).isdigit() else args.devices,
        logger=TensorBoardLogger(output, name="logs"),
        callbacks=[checkpoint],
        num_sanity_val_steps=0,
        check_val_every_n_epoch=None,
        val_check_interval=10**9,
        use_distributed_sampler=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    calibration_seconds = time.perf_counter() - start
    trainer.validate(module, datamodule=data, verbose=False)
    if trainer.global_rank != 0:
        return 0
    results = dict(module.results)
    algo = args.compressor
    results.update(
        {
            "calibration_time_s": calibration_seconds,
            "capture_time_s": module.capture_seconds,
            "compressor": algo,
            "model": args.model or "embedded:smollm2-135m-instruct",
            "calibration_dataset": args.calibration_dataset,
            "calibration_samples": args.calibration_samples,
            "eval_samples": args.eval_samples,
            "seq_len": args.seq_len,
            "eval_chunk": module.hparams.eval_chunk,
            "precision": args.precision,
            "model_dtype": str(module.model_dtype).removeprefix("torch."),
            "key_objective": args.key_objective,
            "value_objective": args.value_objective,
            "objective": args.objective,
            "compression_config": module.compressor.config.to_dict(),
            "checkpoint": str(output / "checkpoints" / "last.ckpt"),
        }
    )
    if module.allocation_metrics is not None:
        from kvlight.analysis.metrics_io import metrics_to_json

        results["allocation_seconds"] = module.allocation_seconds
        atomic_write_text(output / "fim_metrics.json", metrics_to_json(module.allocation_metrics))
        config = module.compressor.config
        reduction = config.memory_reduction(config.num_layers, config.num_kv_heads, config.d_head)
        print(
            f"Allocated widths:       {16 * (1 - reduction):.2f} bits per element ({args.bits_weighting}, sensitivity "
            f"pass {module.allocation_seconds:.1f}s; metrics in {output}/fim_metrics.json)"
        )
    atomic_torch_save(module.compressor.state_dict(), output / f"compressor_{algo}.pt")
    module.compressor.save_pretrained(output / f"compressor_{algo}")
    module.compressor.config.to_json(output / f"compression_config_{algo}.json")
    atomic_write_text(output / f"calibration_results_{algo}.json", json.dumps(results, indent=2) + "\n")
    print(f"Baseline perplexity:    {results['baseline_perplexity']:.2f}")
    print(f"Compressed perplexity:  {results['compressed_perplexity']:.2f}")
    print(f"Perplexity degradation: {results['perplexity_degradation_pct']:+.2f}%")
    print(f"Memory savings:         {results['memory_savings_pct']:.1f}% (vs a {results['model_dtype']} DynamicCache)")
    print(f"Calibration time:       {calibration_seconds:.1f}s")
    print(f"Results saved to {output}/calibration_results_{algo}.json and {output}/compressor_{algo}.pt")
    return 0

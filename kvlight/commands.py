"""The one-shot commands: ``calibrate`` (the seed's Step 2) and ``config uniform``.

``calibrate`` is ``fit`` then ``validate`` with the seed's flag names, printing the seed's five
lines and writing the results JSON, the compressor ``state_dict`` and the Lightning checkpoint.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from kvlight.bit_allocation import WEIGHTINGS
from kvlight.config import RECOMMENDED, CompressionConfig, atomic_write_bytes, atomic_write_text
from kvlight.errors import KVLightError, OutputError


def ensure_writable(directory: Path) -> Path:
    """Create ``directory`` and prove it is writable, before any expensive work starts."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".kvlight-probe-"):
            pass
    except OSError as exc:
        raise OutputError(f"cannot write to output directory {str(directory)!r}: {exc.strerror or exc}") from None
    return directory


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through a temp file renamed into place."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _latent_bits(value: str) -> int | str:
    if value == "fp8":
        return value
    if value in ("2", "4", "8"):
        return int(value)
    raise argparse.ArgumentTypeError(f"must be 8, 4, 2 or fp8, got {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvlight", description="Post-hoc KV-cache compression for HF causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{fit,validate,analyze,calibrate,config}")
    sub.add_parser("fit", help="calibrate a compressor (LightningCLI; see 'kvlight fit --help')")
    sub.add_parser("validate", help="baseline vs compressed perplexity (LightningCLI; 'kvlight validate --help')")
    from kvlight.analyze import add_analyze_parser

    add_analyze_parser(sub)

    cal = sub.add_parser("calibrate", help="fit + validate in one go; prints the seed's five result lines")
    cal.add_argument("--model", default=None, help="hub id, local dir or .gguf file (default: embedded SmolLM2-135M)")
    cal.add_argument("--compressor", choices=["kvsplice", "pca"], default="kvsplice")
    cal.add_argument(
        "--config", default=None, help="compression config JSON (default: widths at --target-memory-reduction)"
    )
    cal.add_argument(
        "--target-memory-reduction",
        type=float,
        default=None,
        help="with no --config/--rank: measure the model's sensitivity, give every principal direction its width "
        "within 1 - R of an fp16 cache's bytes at long context (0.875: 2 bits per element), then calibrate "
        f"(default {RECOMMENDED['target_memory_reduction']}, the recommended configuration)",
    )
    cal.add_argument(
        "--bits-weighting",
        choices=WEIGHTINGS,
        default=RECOMMENDED["bits_weighting"],
        help="with --target-memory-reduction: what a direction's error costs (kvlight analyze --help)",
    )
    cal.add_argument("--rank", type=_positive, default=None, help="uniform K and V rank when no --config")
    cal.add_argument("--rank-k", type=_positive, default=None, help="uniform key rank when no --config")
    cal.add_argument("--rank-v", type=_positive, default=None, help="uniform value rank when no --config")
    cal.add_argument(
        "--latent-bits", type=_latent_bits, default=None, help="store latents as 8, 4, 2 or fp8 (overrides config)"
    )
    cal.add_argument(
        "--quant-group-size", type=_positive, default=None, help="latent channels per scale/zero (overrides config)"
    )
    cal.add_argument("--sink-tokens", type=int, default=None, help="first positions kept exact (overrides config)")
    cal.add_argument("--recent-window", type=int, default=None, help="newest positions kept exact (overrides config)")
    cal.add_argument(
        "--calibration-dataset", default="builtin", help="'builtin', a local text/jsonl/parquet file, or a hub dataset"
    )
    cal.add_argument("--dataset-config", default=None, help="hub dataset config, e.g. wikitext-2-raw-v1")
    cal.add_argument("--split", default="train")
    cal.add_argument("--text-field", default="text")
    cal.add_argument("--calibration-samples", type=_positive, default=32, help="calibration windows")
    cal.add_argument("--eval-samples", type=_positive, default=8, help="evaluation windows")
    cal.add_argument("--seq-len", type=_positive, default=512, help="tokens per window")
    cal.add_argument("--batch-size", type=_positive, default=4, help="windows per forward pass")
    cal.add_argument(
        "--epochs", type=_positive, default=10, help="KVSplice training epochs (after the statistics pass)"
    )
    cal.add_argument("--lr", type=float, default=1e-3)
    cal.add_argument(
        "--key-objective",
        choices=["mse", "query"],
        default="mse",
        help="fit keys by plain error or by the error attention scores see (query; KVSplice only)",
    )
    cal.add_argument(
        "--score-window",
        type=_positive,
        default=None,
        help="with --key-objective query: the context length served (default: --seq-len)",
    )
    cal.add_argument(
        "--value-objective",
        choices=["mse", "output"],
        default="mse",
        help="fit values by plain error or by the error after the output projection (output; KVSplice only)",
    )
    cal.add_argument(
        "--objective",
        choices=["reconstruction", "kl"],
        default="reconstruction",
        help="what the epochs after the statistics pass minimise: reconstruction error of captured K/V, or the KL "
        "between the model's outputs with and without compression (kl: each epoch is one pass over the calibration "
        "windows; KVSplice only)",
    )
    cal.add_argument(
        "--distill-batch-size", type=_positive, default=1, help="with --objective kl: calibration windows per step"
    )
    cal.add_argument("--max-samples-per-head", type=_positive, default=10_000)
    cal.add_argument(
        "--model-dtype",
        choices=["auto", "bfloat16", "float32", "float16"],
        default="auto",
        help="dtype of the frozen model and its K/V; auto: bfloat16 where it is native (GPUs, CPUs with AVX512-BF16 "
        "or AMX: ~3x faster, same perplexity), else float32 (emulated bf16 is ~5x slower)",
    )
    cal.add_argument("--precision", default="32-true", help="Lightning precision of the compressor, e.g. bf16-mixed")
    cal.add_argument("--accelerator", default="auto")
    cal.add_argument("--devices", default="1")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--output-dir", default="compression_results")

    cfg = sub.add_parser("config", help="write a compression config")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    uni = cfg_sub.add_parser("uniform", help="one rank for every layer and KV head")
    uni.add_argument("--model", default=None, help="model whose geometry the config is for (default: embedded)")
    uni.add_argument("--rank", type=_positive, default=None)
    uni.add_argument("--rank-k", type=_positive, default=None)
    uni.add_argument("--rank-v", type=_positive, default=None)
    uni.add_argument("--algo", choices=["kvsplice", "pca"], default="kvsplice")
    uni.add_argument("--sink-tokens", type=int, default=0)
    uni.add_argument("--recent-window", type=int, default=0)
    uni.add_argument("-o", "--output", required=True, help="where to write the JSON")
    return parser


def run_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "calibrate":
        return calibrate(args)
    if args.command == "analyze":
        from kvlight.analyze import run_analyze

        return run_analyze(args)
    if args.command == "config":
        return write_uniform_config(args)
    raise KVLightError(f"unknown command {args.command!r}")  # argparse rejects these first


def write_uniform_config(args: argparse.Namespace) -> int:
    from kvlight.models import geometry_of

    geometry = geometry_of(args.model)
    if args.rank is None and (args.rank_k is None or args.rank_v is None):
        raise KVLightError("config uniform needs --rank, or both --rank-k and --rank-v")
    config = CompressionConfig.uniform(
        geometry.num_layers,
        geometry.num_kv_heads,
        geometry.head_dim,
        rank=args.rank,
        rank_k=args.rank_k,
        rank_v=args.rank_v,
        algo=args.algo,
        sink_tokens=args.sink_tokens,
        recent_window=args.recent_window,
    )
    config.validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    output = Path(args.output)
    ensure_writable(output.parent if str(output.parent) else Path("."))
    config.to_json(output)
    reduction = config.memory_reduction(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    print(
        f"wrote {output}: {geometry.num_layers} layers x {geometry.num_kv_heads} KV heads, latent memory reduction {100 * reduction:.1f}%"
    )
    return 0


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

    from kvlight.data import KVCalibrationDataModule
    from kvlight.module import KVCalibrationModule

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
        from kvlight.metrics_io import metrics_to_json

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

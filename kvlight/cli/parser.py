"""The command line's parser and dispatch for the one-shot commands."""

from __future__ import annotations

import argparse

from kvlight.analysis.bit_allocation import WEIGHTINGS
from kvlight.cli.calibrate import calibrate
from kvlight.cli.config_command import write_uniform_config
from kvlight.compressors.registry import backend_names
from kvlight.config import RECOMMENDED
from kvlight.errors import KVLightError


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
    from kvlight.cli.analyze import add_analyze_parser

    add_analyze_parser(sub)

    cal = sub.add_parser("calibrate", help="fit + validate in one go; prints the seed's five result lines")
    cal.add_argument("--model", default=None, help="hub id, local dir or .gguf file (default: embedded SmolLM2-135M)")
    cal.add_argument("--compressor", choices=backend_names(), default="kvsplice")
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
    uni.add_argument("--algo", choices=backend_names(), default="kvsplice")
    uni.add_argument("--sink-tokens", type=int, default=0)
    uni.add_argument("--recent-window", type=int, default=0)
    uni.add_argument("-o", "--output", required=True, help="where to write the JSON")
    return parser


def run_command(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "calibrate":
        return calibrate(args)
    if args.command == "analyze":
        from kvlight.cli.analyze import run_analyze

        return run_analyze(args)
    if args.command == "config":
        return write_uniform_config(args)
    raise KVLightError(f"unknown command {args.command!r}")  # argparse rejects these first

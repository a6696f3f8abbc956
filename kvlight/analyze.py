"""``kvlight analyze``: sensitivity metrics -> per-head ranks -> compression config (the seed's Step 1).

    kvlight analyze --calibration-samples 16 --generate-compression-config \\
        --strategy budget --target-memory-reduction 0.5 --output-dir analysis

Metrics come from the frozen model itself (:mod:`kvlight.sensitivity`), or from a file
(``--metrics-file``) or a W&B project (``--entity/--project``, the seed's path) via
:mod:`kvlight.metrics_io`; ranks come from :mod:`kvlight.allocate`. Written into ``--output-dir``:
``fim_metrics.json`` and ``fim_metrics.csv`` (the raw metrics) and, with
``--generate-compression-config``, the config (``--compression-config-output``, relative to the
output directory as in the seed), ``<config>_summary.txt`` and ``<config>_ranks.png``. Every input is
checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

from kvlight.allocate import STRATEGIES, TierThresholds, allocate, budget_units, check_rank_step, check_target
from kvlight.config import atomic_write_text
from kvlight.errors import ConfigError
from kvlight.metrics_io import HeadMetrics, fetch_wandb_metrics, metrics_to_csv, metrics_to_json, read_metrics_file
from kvlight.models import EMBEDDED_DEFAULT, KVGeometry, geometry_of, kv_geometry, load_model
from kvlight.report import heatmap_png, summary_text

METRICS_JSON, METRICS_CSV = "fim_metrics.json", "fim_metrics.csv"


def add_analyze_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``analyze`` on the CLI's subparsers."""
    p = sub.add_parser("analyze", help="per-head sensitivity metrics -> per-head ranks -> compression config")
    p.add_argument("--model", default=None, help="hub id, local dir or .gguf file (default: embedded SmolLM2-135M)")
    p.add_argument(
        "--calibration-dataset", default="builtin", help="'builtin', a local text/jsonl/parquet file, or a hub dataset"
    )
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--text-field", default="text")
    p.add_argument("--calibration-samples", type=_positive, default=16, help="windows measured (calibrate's)")
    p.add_argument(
        "--eval-samples", type=_non_negative, default=8, help="leading windows skipped (calibrate's eval set)"
    )
    p.add_argument("--seq-len", type=_positive, default=512, help="tokens per window")
    p.add_argument("--batch-size", type=_positive, default=2, help="windows per forward/backward pass")
    p.add_argument(
        "--attention-tokens", type=_positive, default=256, help="prefix over which the attention Fisher is taken"
    )
    p.add_argument(
        "--sink-tokens",
        type=_non_negative,
        default=0,
        help="first positions the cache keeps exact (left out of the loss)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled labels")
    src = p.add_argument_group("imported metrics (instead of measuring)")
    src.add_argument("--metrics-file", default=None, help="CSV or JSON with layer, head, trace, cond (eigmax optional)")
    src.add_argument("--entity", default=None, help="W&B entity (needs the wandb package and network)")
    src.add_argument("--project", default=None, help="W&B project")
    src.add_argument("--run-name", default=None, help="the run to use when the metrics hold several")
    out = p.add_argument_group("compression config")
    out.add_argument("--generate-compression-config", action="store_true", help="write config, summary and heatmap")
    out.add_argument("--compression-config-output", default="compression_config.json", help="relative to --output-dir")
    out.add_argument("--strategy", choices=STRATEGIES, default="budget")
    out.add_argument("--target-memory-reduction", type=float, default=0.5, help="share of KV memory to save, in (0, 1)")
    out.add_argument("--rank-step", type=int, default=None, help="ranks are multiples of this (default head_dim/16)")
    out.add_argument("--algo", choices=["kvsplice", "pca"], default="kvsplice", help="backend written into the config")
    defaults = TierThresholds()
    for name in ("trace_critical", "trace_moderate", "cond_excellent", "cond_good"):
        out.add_argument(
            f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name), help="tiers threshold"
        )
    p.add_argument("--output-dir", default=".")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {value}")
    return number


def calibration_windows(
    model: str | None,
    dataset: str = "builtin",
    calibration_samples: int = 16,
    eval_samples: int = 8,
    seq_len: int = 512,
    dataset_config: str | None = None,
    split: str = "train",
    text_field: str = "text",
):
    """calibrate's calibration windows ``[N, seq_len]``: the ``N`` windows after the ``eval_samples`` first."""
    from kvlight.data import eval_and_calibration_windows, iter_texts
    from kvlight.models import load_tokenizer

    _, windows = eval_and_calibration_windows(
        lambda: iter_texts(dataset, dataset_config, split, text_field),
        load_tokenizer(model),
        seq_len,
        eval_samples,
        calibration_samples,
        source_name=f"dataset '{dataset}'",
    )
    return windows


def measure_model(
    model: str | None = None,
    dataset: str = "builtin",
    calibration_samples: int = 16,
    eval_samples: int = 8,
    seq_len: int = 512,
    batch_size: int = 2,
    attention_tokens: int = 256,
    sink_tokens: int = 0,
    seed: int = 0,
    progress: bool = True,
) -> HeadMetrics:
    """Load ``model`` and measure every metric on calibrate's calibration windows of ``dataset``."""
    _check_lengths(seq_len, sink_tokens)
    windows = calibration_windows(model, dataset, calibration_samples, eval_samples, seq_len)
    return _measure(
        load_model(model), model, dataset, windows, batch_size, attention_tokens, sink_tokens, seed, progress
    )


def _measure(
    network, model, dataset, windows, batch_size, attention_tokens, sink_tokens, seed, progress
) -> HeadMetrics:
    from kvlight.sensitivity import measure_sensitivity

    geometry = kv_geometry(network)
    metrics = measure_sensitivity(network, geometry, windows, batch_size, attention_tokens, sink_tokens, seed, progress)
    metrics.info.update({"model": model or EMBEDDED_DEFAULT, "dataset": dataset})
    return metrics


def _check_lengths(seq_len: int, sink_tokens: int) -> None:
    if seq_len < 2 or sink_tokens >= seq_len - 1:
        raise ConfigError(f"--seq-len {seq_len} must exceed --sink-tokens {sink_tokens} + 1 (and be at least 2)")


def run_analyze(args: argparse.Namespace) -> int:
    """The ``analyze`` command: check every input, measure or import, allocate, then write everything."""
    target = check_target(args.target_memory_reduction)
    if args.metrics_file and (args.entity or args.project):
        raise ConfigError("pass either --metrics-file or --entity/--project, not both")
    if bool(args.entity) != bool(args.project):
        raise ConfigError("the W&B path needs both --entity and --project")
    geometry = geometry_of(args.model)
    step = check_rank_step(args.rank_step or max(1, geometry.head_dim // 16), geometry.head_dim)
    generate = args.generate_compression_config
    if generate and args.strategy in ("budget", "uniform"):
        budget_units(geometry, target, step)  # an impossible budget fails before the long pass
    thresholds = TierThresholds(args.trace_critical, args.trace_moderate, args.cond_excellent, args.cond_good)
    output = Path(args.output_dir)
    config_path = output / args.compression_config_output
    metrics: HeadMetrics | None = None
    if args.metrics_file:
        metrics = read_metrics_file(args.metrics_file, geometry, args.run_name)
        source = f"metrics: imported from {args.metrics_file}"
    elif args.entity:
        metrics = fetch_wandb_metrics(args.entity, args.project, geometry, args.run_name)
        source = f"metrics: imported from W&B {args.entity}/{args.project}"
    else:  # load what the pass needs first: a bad model or text fails before anything is created
        _check_lengths(args.seq_len, args.sink_tokens)
        windows = calibration_windows(
            args.model,
            args.calibration_dataset,
            args.calibration_samples,
            args.eval_samples,
            args.seq_len,
            args.dataset_config,
            args.split,
            args.text_field,
        )
        network = load_model(args.model)
        source = (
            f"metrics: measured on {windows.shape[0]} windows x {args.seq_len} tokens of {args.calibration_dataset!r}"
            f" after {args.eval_samples} skipped (labels sampled from the model, seed {args.seed}); "
            f"attention Fisher over the first {min(args.attention_tokens, args.seq_len)} tokens"
        )
    if metrics is not None and generate and args.strategy == "budget":
        allocate("budget", metrics, geometry, target, step, thresholds)  # fails now if the curves are missing
    _check_writable(output, config_path if generate else None)
    if metrics is None:
        progress = not args.no_progress
        metrics = _measure(
            network,
            args.model,
            args.calibration_dataset,
            windows,
            args.batch_size,
            args.attention_tokens,
            args.sink_tokens,
            args.seed,
            progress,
        )
    files: dict[Path, str | bytes] = {
        output / METRICS_JSON: metrics_to_json(metrics),
        output / METRICS_CSV: metrics_to_csv(metrics),
    }
    allocation = None
    if generate:
        allocation = allocate(args.strategy, metrics, geometry, target, step, thresholds)
        config = allocation.to_config(args.algo, args.sink_tokens)
        header = [f"model: {args.model or EMBEDDED_DEFAULT} ({_describe(geometry)})", source, f"rank step: {step}"]
        files[config_path] = json.dumps(config.to_dict(), indent=2) + "\n"
        files[config_path.with_name(config_path.stem + "_summary.txt")] = summary_text(allocation, metrics, header)
        files[config_path.with_name(config_path.stem + "_ranks.png")] = heatmap_png(allocation)
    for path, content in files.items():
        _atomic_write(path, content)
        print(f"wrote {path}")
    if allocation is not None:
        line = f"{args.strategy}: total KV memory reduction {100 * allocation.memory_reduction():.2f}%"
        if metrics.has_sensitivity:
            loss = metrics.predicted_loss(allocation.rank_k, allocation.rank_v)
            line += f", predicted loss increase {loss:.4f} nats/token (perplexity x{math.exp(loss):.3f})"
        print(line)
    return 0


def _describe(geometry: KVGeometry) -> str:
    rope = ", RoPE (keys measured pre-RoPE)" if geometry.rope else ""
    return f"{geometry.num_layers} layers x {geometry.num_kv_heads} KV heads, head_dim {geometry.head_dim}{rope}"


def _check_writable(output: Path, config_path: Path | None) -> None:
    """Fail before the long pass if an output location cannot be written (creates the directories)."""
    from kvlight.commands import ensure_writable

    ensure_writable(output)
    if config_path is not None:
        ensure_writable(config_path.parent)


def _atomic_write(path: Path, content: str | bytes) -> None:
    if isinstance(content, str):
        atomic_write_text(path, content)
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

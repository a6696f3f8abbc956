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
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvlight.analysis.bit_allocation import WEIGHTINGS, allocate_bits, check_bits_target
from kvlight.analysis.metrics_io import (
    HeadMetrics,
    fetch_wandb_metrics,
    metrics_to_csv,
    metrics_to_json,
    read_metrics_file,
)
from kvlight.analysis.rank_allocation import (
    STRATEGIES,
    TierThresholds,
    allocate,
    budget_units,
    check_rank_step,
    check_target,
)
from kvlight.analysis.report import bits_heatmap_png, bits_summary_text, heatmap_png, summary_text
from kvlight.compressors.registry import backend_names
from kvlight.config import RECOMMENDED
from kvlight.errors import ConfigError
from kvlight.files import atomic_write_bytes, atomic_write_text
from kvlight.geometry import KVGeometry, kv_geometry
from kvlight.models import EMBEDDED_DEFAULT, geometry_of, load_model

METRICS_JSON, METRICS_CSV = "fim_metrics.json", "fim_metrics.csv"
_DESCRIPTION = """\
Measure, per layer and KV head, on calibrate's calibration windows:
  - the seed's attention-Fisher metrics trace, eigmax and cond of F = mean_i(diag(p_i) - p_i p_i^T)
    (query heads averaged into their KV head); F 1 = 0 always, so cond = eigmax / the smallest eigenvalue
    orthogonal to the all-ones vector (the seed's eigmax / |eigmin| divided by that zero);
  - the diagonal Fisher of the loss w.r.t. each head's K (pre-RoPE) and V in its principal directions,
    giving the predicted loss increase (second-order KL, nats/token) of every rank;
  - the share of K and V energy kept at every rank.
  - per principal direction and width (0, 1, 2, 3, 4, 5, 6, 8, 16 bits), the measured quantisation error.
Strategies: bits (a width per principal direction minimising the predicted loss within
--target-memory-reduction of an fp16 cache: 0.875 stores 2 bits per element; always writes the config),
budget (K/V ranks minimising the predicted loss at exactly --target-memory-reduction),
tiers (the seed's rules and thresholds, ranks scaled to head_dim), uniform (one rank everywhere)."""


def add_analyze_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``analyze`` on the CLI's subparsers."""
    p = sub.add_parser(
        "analyze",
        help="per-head sensitivity metrics -> per-head ranks -> compression config",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    out.add_argument("--strategy", choices=("bits", *STRATEGIES), default="budget")
    out.add_argument("--target-memory-reduction", type=float, default=0.5, help="share of KV memory to save, in (0, 1)")
    out.add_argument(
        "--bits-weighting",
        choices=WEIGHTINGS,
        default=RECOMMENDED["bits_weighting"],
        help="with --strategy bits: what a direction's error costs: fisher-joint (each row's error times its squared "
        "loss gradient), fisher (the diagonal Fisher times the mean error), mse, query (query / output-projection "
        "energy), or uniform widths",
    )
    out.add_argument(
        "--recent-window", type=_non_negative, default=0, help="newest positions the cache keeps exact (config)"
    )
    out.add_argument("--rank-step", type=int, default=None, help="ranks are multiples of this (default head_dim/16)")
    out.add_argument("--algo", choices=backend_names(), default="kvsplice", help="backend written into the config")
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
    from kvlight.calibration.texts import iter_texts
    from kvlight.calibration.windows import eval_and_calibration_windows
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
    from kvlight.analysis.sensitivity import measure_sensitivity

    _check_lengths(seq_len, sink_tokens)
    windows = calibration_windows(model, dataset, calibration_samples, eval_samples, seq_len)
    network = load_model(model)
    metrics = measure_sensitivity(
        network, kv_geometry(network), windows, batch_size, attention_tokens, sink_tokens, seed, progress
    )
    metrics.info.update({"model": model or EMBEDDED_DEFAULT, "dataset": dataset, "skipped_windows": eval_samples})
    return metrics


def _check_lengths(seq_len: int, sink_tokens: int) -> None:
    if seq_len < 2 or sink_tokens >= seq_len - 1:
        raise ConfigError(f"--seq-len {seq_len} must exceed --sink-tokens {sink_tokens} + 1 (and be at least 2)")


@dataclass(frozen=True)
class _Plan:
    """What the command will do, fixed by the cheap checks that run before anything is loaded."""

    target: float
    geometry: KVGeometry
    step: int
    thresholds: TierThresholds
    output: Path
    config_path: Path | None  # None without --generate-compression-config


def run_analyze(args: argparse.Namespace) -> int:
    """The ``analyze`` command: check every input, load or import, measure, allocate, then write everything."""
    plan = _plan(args)
    metrics, source, measure = _metrics_source(args, plan)
    _check_writable(plan)
    if metrics is None:
        metrics = measure()
    allocation = None
    files: dict[Path, str | bytes] = {
        plan.output / METRICS_JSON: metrics_to_json(metrics),
        plan.output / METRICS_CSV: metrics_to_csv(metrics),
    }
    model = f"model: {args.model or EMBEDDED_DEFAULT} ({_describe(plan.geometry)})"
    if plan.config_path is not None and args.strategy == "bits":
        allocation = allocate_bits(metrics, plan.target, args.bits_weighting)
        config = allocation.to_config(args.algo, args.sink_tokens, args.recent_window)
        files[plan.config_path] = config.to_json_text()
        files[_beside(plan.config_path, "_summary.txt")] = bits_summary_text(allocation, metrics, [model, source])
        files[_beside(plan.config_path, "_bits.png")] = bits_heatmap_png(allocation)
    elif plan.config_path is not None:
        allocation = allocate(args.strategy, metrics, plan.geometry, plan.target, plan.step, plan.thresholds)
        config = allocation.to_config(args.algo, args.sink_tokens)
        config.recent_window = args.recent_window
        files[plan.config_path] = config.to_json_text()
        files[_beside(plan.config_path, "_summary.txt")] = summary_text(
            allocation, metrics, [model, source, f"rank step: {plan.step}"]
        )
        files[_beside(plan.config_path, "_ranks.png")] = heatmap_png(allocation)
    for path, content in files.items():
        _atomic_write(path, content)
        print(f"wrote {path}")
    if allocation is not None and args.strategy == "bits":
        line = (
            f"bits ({args.bits_weighting}): {allocation.bits_per_element():.3f} bits per element (K "
            f"{allocation.bits_per_element('k'):.2f} / V {allocation.bits_per_element('v'):.2f}), "
            f"{100 * allocation.memory_reduction():.2f}% less than an fp16 cache at long context"
        )
        loss = allocation.predicted_loss(metrics)
        if loss is not None:
            line += f", predicted loss increase {loss:.4f} nats/token (perplexity x{math.exp(loss):.3f})"
        print(line)
    elif allocation is not None:
        line = f"{args.strategy}: total KV memory reduction {100 * allocation.memory_reduction():.2f}%"
        if metrics.has_sensitivity:
            loss = metrics.predicted_loss(allocation.rank_k, allocation.rank_v)
            line += f", predicted loss increase {loss:.4f} nats/token (perplexity x{math.exp(loss):.3f})"
        print(line)
    return 0


def _plan(args: argparse.Namespace) -> _Plan:
    """Flag combinations, target, rank step and budget feasibility: everything checkable from the model config."""
    geometry = geometry_of(args.model)
    if args.strategy == "bits":
        target = check_bits_target(args.target_memory_reduction, geometry)
        args.generate_compression_config = True  # the widths exist only to be written into a config
    else:
        target = check_target(args.target_memory_reduction)
    if args.metrics_file and (args.entity or args.project):
        raise ConfigError("pass either --metrics-file or --entity/--project, not both")
    if bool(args.entity) != bool(args.project):
        raise ConfigError("the W&B path needs both --entity and --project")
    step = check_rank_step(args.rank_step or max(1, geometry.head_dim // 16), geometry.head_dim)
    generate = args.generate_compression_config
    if generate and args.strategy in ("budget", "uniform"):
        budget_units(geometry, target, step)  # an impossible budget fails before the long pass
    thresholds = TierThresholds(args.trace_critical, args.trace_moderate, args.cond_excellent, args.cond_good)
    output = Path(args.output_dir)
    return _Plan(
        target, geometry, step, thresholds, output, output / args.compression_config_output if generate else None
    )


def _metrics_source(args: argparse.Namespace, plan: _Plan) -> tuple[HeadMetrics | None, str, Callable[[], HeadMetrics]]:
    """``(imported metrics or None, where they come from, a function that measures them)``.

    Measuring loads the text and the model here, so that a bad source fails before anything is created.
    """
    if args.metrics_file or args.entity:
        if args.metrics_file:
            metrics = read_metrics_file(args.metrics_file, plan.geometry, args.run_name)
            source = f"metrics: imported from {args.metrics_file}"
        else:
            metrics = fetch_wandb_metrics(args.entity, args.project, plan.geometry, args.run_name)
            source = f"metrics: imported from W&B {args.entity}/{args.project}"
        if plan.config_path is not None and args.strategy == "budget":
            allocate("budget", metrics, plan.geometry, plan.target, plan.step)  # fails now if the curves are missing
        if args.strategy == "bits":
            allocate_bits(metrics, plan.target, args.bits_weighting)  # likewise
        return metrics, source, lambda: metrics
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

    def measure() -> HeadMetrics:
        from kvlight.analysis.sensitivity import measure_sensitivity

        metrics = measure_sensitivity(
            network,
            plan.geometry,
            windows,
            args.batch_size,
            args.attention_tokens,
            args.sink_tokens,
            args.seed,
            progress=not args.no_progress,
        )
        info = {"model": args.model or EMBEDDED_DEFAULT, "dataset": args.calibration_dataset}
        metrics.info.update({**info, "skipped_windows": args.eval_samples})
        return metrics

    return None, source, measure


def _beside(path: Path, suffix: str) -> Path:
    """``dir/compression_config.json`` -> ``dir/compression_config<suffix>`` (the seed's summary naming)."""
    return path.with_name(path.stem + suffix)


def _describe(geometry: KVGeometry) -> str:
    rope = ", RoPE (keys measured pre-RoPE)" if geometry.rope else ""
    return f"{geometry.num_layers} layers x {geometry.num_kv_heads} KV heads, head_dim {geometry.head_dim}{rope}"


def _check_writable(plan: _Plan) -> None:
    """Fail before the long pass if an output location cannot be written (creates the directories)."""
    from kvlight.files import ensure_writable

    ensure_writable(plan.output)
    if plan.config_path is not None:
        ensure_writable(plan.config_path.parent)


def _atomic_write(path: Path, content: str | bytes) -> None:
    if isinstance(content, str):
        atomic_write_text(path, content)
    else:
        atomic_write_bytes(path, content)

"""``kvlight analyze``: sensitivity metrics -> per-head ranks -> compression config (the upstream design's step 1).

    kvlight analyze --strategy bits --kv-budget 0.125 --output-dir analysis
    kvlight analyze --generate-compression-config --strategy budget --kv-budget 0.5 --output-dir analysis

Metrics come from the frozen model itself (:mod:`kvlight.analysis.sensitivity`), or from a file
(``--metrics-file``) or a W&B project (``--entity/--project``, the upstream design's path) via
:mod:`kvlight.analysis.metrics_io`; ranks come from :mod:`kvlight.analysis.rank_allocation`. Written into ``--output-dir``:
``fim_metrics.json`` and ``fim_metrics.csv`` (the raw metrics) and, with
``--generate-compression-config``, the config (``--compression-config-output``, relative to the
output directory as in the upstream design), ``<config>_summary.txt`` and ``<config>_ranks.png``. Every input is
checked before anything is written.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvlight.analysis.bit_allocation import WEIGHTINGS, WHITENED, allocate_bits, check_bits_target
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
from kvlight.analysis.sensitivity import measure_sensitivity
from kvlight.calibration.datamodule import KVCalibrationDataModule
from kvlight.calibration.module import KVCalibrationModule
from kvlight.calibration.options import CompressionOptions, RuntimeOptions
from kvlight.cli.flags import (
    KV_BUDGET_HELP,
    STORAGE_FLAGS,
    Flag,
    OneLineParser,
    add_flags,
    budget_flags,
    build,
    flags,
    parse,
    text_flags,
    to_arguments,
)
from kvlight.compressors.registry import backend_names
from kvlight.config import RECOMMENDED
from kvlight.errors import ConfigError
from kvlight.files import atomic_write_bytes, atomic_write_text, ensure_writable
from kvlight.geometry import KVGeometry, kv_geometry
from kvlight.models import EMBEDDED_DEFAULT, geometry_of, load_model

METRICS_JSON, METRICS_CSV = "fim_metrics.json", "fim_metrics.csv"
_DESCRIPTION = """\
Measure, per layer and KV head, on calibrate's calibration windows:
  - the upstream design's attention-Fisher metrics trace, eigmax and cond of F = mean_i(diag(p_i) - p_i p_i^T)
    (query heads averaged into their KV head); F 1 = 0 always, so cond = eigmax / the smallest eigenvalue
    orthogonal to the all-ones vector (the upstream design's eigmax / |eigmin| divided by that zero);
  - the diagonal Fisher of the loss w.r.t. each head's K (as --key-rope-block codes it: by default relative to
    the RoPE of blocks of 16 tokens; 1: pre-RoPE) and V in its principal directions,
    giving the predicted loss increase (second-order KL, nats/token) of every rank;
  - the share of K and V energy kept at every rank.
  - per principal direction and width (0, 1, 2, 3, 4, 5, 6, 8, 16 bits), the measured quantisation error.
Strategies: bits (a width per principal direction minimising the predicted loss within
--kv-budget of an fp16 cache's bytes: 0.125 stores 2 bits per element; always writes the config),
budget (K/V ranks minimising the predicted loss at exactly --kv-budget),
tiers (the upstream design's rules and thresholds, ranks scaled to head_dim), uniform (one rank everywhere)."""


@dataclass(frozen=True)
class AnalyzeOptions:
    """What only ``kvlight analyze`` has.

    Args:
        strategy: bits (a width per principal direction, as calibrate allocates them; always writes the config),
            or ranks: budget, tiers or uniform.
        generate_compression_config: write the config, its summary and a heatmap beside the metrics.
        compression_config_output: the config's file name, relative to output_dir.
        rank_step: rank strategies: ranks are multiples of this (None: head_dim / 16).
        compressor: the backend the config names for every head.
        attention_tokens: prefix over which the attention Fisher is taken.
        seed: seed of the labels sampled from the model (the Fisher's one-sample estimates).
        metrics_file: import metrics from this CSV or JSON instead of measuring.
        entity: import them from this W&B entity (needs the wandb package and network).
        project: ... and this W&B project.
        run_name: the run to use when the imported metrics hold several.
        trace_critical: tiers threshold (the upstream design's).
        trace_moderate: tiers threshold (the upstream design's).
        cond_excellent: tiers threshold (the upstream design's).
        cond_good: tiers threshold (the upstream design's).
        output_dir: where the metrics (and config) are written.
        progress: show progress bars.
    """

    strategy: str = "bits"
    generate_compression_config: bool = False
    compression_config_output: str = "compression_config.json"
    rank_step: int | None = None
    compressor: str = "kvsplice"
    attention_tokens: int = 256
    seed: int = 0
    metrics_file: str | None = None
    entity: str | None = None
    project: str | None = None
    run_name: str | None = None
    trace_critical: float = TierThresholds.trace_critical
    trace_moderate: float = TierThresholds.trace_moderate
    cond_excellent: float = TierThresholds.cond_excellent
    cond_good: float = TierThresholds.cond_good
    output_dir: str = "."
    progress: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in ("bits", *STRATEGIES):
            raise ConfigError(f"--strategy {self.strategy!r} must be one of bits, {', '.join(STRATEGIES)}")
        if self.compressor not in backend_names():
            known = ", ".join(backend_names())
            raise ConfigError(f"--compressor {self.compressor!r} is not a known backend (known: {known})")
        if self.attention_tokens < 1:
            raise ConfigError(f"--attention-tokens must be a positive integer, got {self.attention_tokens}")


_BUDGET_HELP = f"{KV_BUDGET_HELP}; rank strategies keep exactly that fraction (default 0.5 for them)"
#: every flag, in its help section.
FLAGS = (
    flags(
        ("--model", "model.model"),
        ("--output-dir", "analyze.output_dir"),
        ("--generate-compression-config", "analyze.generate_compression_config", "true"),
        ("--compression-config-output", "analyze.compression_config_output"),
    )
    + (
        Flag("--no-progress", ("analyze.progress",), "false", help="hide the progress bars."),
        Flag("--strategy", ("analyze.strategy",), choices=("bits", *STRATEGIES)),
        Flag("--compressor", ("analyze.compressor",), choices=backend_names),
        Flag("--algo", ("analyze.compressor",), alias_of="--compressor"),
        *budget_flags("model.compression.target_memory_reduction", "0.24", _BUDGET_HELP),
        Flag(
            "--bits-weighting",
            ("model.compression.bits_weighting",),
            group="budget",
            choices=WEIGHTINGS,
            help="how the bits strategy weighs a direction's error (none: fisher-joint; the whitened ones need "
            "kvlight calibrate, which fits the basis they index)",
        ),
    )  # fmt: skip
    + flags(("--rank-step", "analyze.rank_step"), group="budget")
    + STORAGE_FLAGS
    + text_flags("measurement")
    + flags(
        ("--sensitivity-samples", "model.compression.sensitivity_samples"),
        ("--attention-tokens", "analyze.attention_tokens"),
        ("--seed", "analyze.seed"),
        group="measurement",
    )
    + flags(
        ("--metrics-file", "analyze.metrics_file"),
        ("--entity", "analyze.entity"),
        ("--project", "analyze.project"),
        ("--run-name", "analyze.run_name"),
        group="imported metrics (instead of measuring)",
    )
    + flags(
        *((f"--{name.replace('_', '-')}", f"analyze.{name}") for name in TierThresholds.__dataclass_fields__),
        group="tiers strategy",
    )
    + flags(("--batch-size", "model.runtime.capture_batch_size"), group="hardware")
)


def source_parser():
    """The jsonargparse parser of the options ``analyze`` reads (the flags name its keys)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False, prog="kvlight analyze")
    parser.add_class_arguments(KVCalibrationModule, "model", instantiate=False)
    parser.add_class_arguments(KVCalibrationDataModule, "data", instantiate=False)
    parser.add_dataclass_arguments(AnalyzeOptions, "analyze")
    return parser


def main(argv: list[str]) -> int:
    """Parse ``kvlight analyze``'s flags and run it (:func:`run_analyze`)."""
    return run_analyze(arguments(argv))


def arguments(argv: list[str]) -> argparse.Namespace:
    """The options of ``kvlight analyze argv``, as the flat namespace :func:`run_analyze` reads."""
    source = source_parser()
    cli = OneLineParser(
        prog="kvlight analyze", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flags(cli, FLAGS, source)
    return _arguments(parse(source, to_arguments(cli.parse_args(argv), FLAGS), FLAGS))


def _arguments(config) -> argparse.Namespace:
    """The parsed options, checked by their dataclasses, as the flat namespace :func:`run_analyze` reads."""
    analyze = build(AnalyzeOptions, config.analyze, FLAGS, "analyze")
    compression = build(CompressionOptions, config.model.compression, FLAGS, "model.compression")
    runtime = build(RuntimeOptions, config.model.runtime, FLAGS, "model.runtime")
    data = config.data
    bits = analyze.strategy == "bits"
    target = compression.target_memory_reduction
    if target is None:  # the recommended widths, or the upstream design's half of the cache for ranks
        target = RECOMMENDED["target_memory_reduction"] if bits else 0.5
    sinks = compression.sink_tokens
    sinks = RECOMMENDED["sink_tokens"] if sinks is None else sinks  # ranks too: a rank config keeps the sinks
    recent = compression.recent_window
    recent = RECOMMENDED["recent_window"] if recent is None else recent
    return argparse.Namespace(
        **vars(analyze),
        model=config.model.model,
        calibration_dataset=data.dataset,
        dataset_config=data.dataset_config,
        split=data.split,
        text_field=data.text_field,
        calibration_samples=data.calibration_samples,
        eval_samples=data.eval_samples,
        seq_len=data.seq_len,
        sensitivity_samples=compression.sensitivity_samples,
        batch_size=runtime.capture_batch_size,
        sink_tokens=sinks,
        recent_window=recent,
        key_rope_block=compression.key_rope_block or RECOMMENDED["key_rope_block"],
        target_memory_reduction=target,
        bits_weighting=compression.bits_weighting or RECOMMENDED["principal_bits_weighting"],
        no_progress=not analyze.progress,
    )


def calibration_windows(model: str | None, data: dict | None = None, samples: int | None = None):
    """calibrate's calibration windows ``[N, seq_len]`` (a KVCalibrationDataModule with the options ``data``), the
    first ``samples`` of them."""
    module = KVCalibrationDataModule(model=model, **(data or {}))
    module.setup()
    windows = module.all_calibration_windows()
    return windows if samples is None else windows[:samples]


def measure_model(model: str | None = None, data: dict | None = None, sensitivity: dict | None = None) -> HeadMetrics:
    """Load ``model`` and measure every metric on calibrate's calibration windows (``data``: DataModule options;
    ``sensitivity``: keyword arguments of :func:`kvlight.analysis.sensitivity.measure_sensitivity` and ``samples``)."""
    sensitivity = dict(sensitivity or {})
    samples = sensitivity.pop("samples", CompressionOptions().sensitivity_samples)
    windows = calibration_windows(model, data, samples)
    _check_lengths(windows.shape[1], sensitivity.get("sink_tokens", 0))
    network = load_model(model)
    metrics = measure_sensitivity(network, kv_geometry(network), windows, **sensitivity)
    metrics.info.update({"model": model or EMBEDDED_DEFAULT, "dataset": (data or {}).get("dataset", "builtin")})
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
    model = (
        f"model: {args.model or EMBEDDED_DEFAULT} ({_describe(plan.geometry, metrics.info.get('key_rope_block', 1))})"
    )
    if plan.config_path is not None and args.strategy == "bits":
        allocation = allocate_bits(metrics, plan.target, args.bits_weighting)
        config = allocation.to_config(args.compressor, args.sink_tokens, args.recent_window)
        files[plan.config_path] = config.to_json_text()
        files[_beside(plan.config_path, "_summary.txt")] = bits_summary_text(allocation, metrics, [model, source])
        files[_beside(plan.config_path, "_bits.png")] = bits_heatmap_png(allocation)
    elif plan.config_path is not None:
        allocation = allocate(args.strategy, metrics, plan.geometry, plan.target, plan.step, plan.thresholds)
        config = allocation.to_config(args.compressor, args.sink_tokens)
        config.recent_window = args.recent_window
        config.key_rope_block = metrics.info.get("key_rope_block", 1)  # how the metrics measured the keys
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
    if args.strategy == "bits" and args.bits_weighting in WHITENED:
        raise ConfigError(
            f"--bits-weighting {args.bits_weighting} widths index a basis fitted from the Fisher matrices of the "
            f"sensitivity pass, which a compression config cannot carry: run kvlight calibrate --bits-weighting "
            f"{args.bits_weighting} (it measures, allocates and fits in one command)"
        )
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
    data = {
        "dataset": args.calibration_dataset,
        "dataset_config": args.dataset_config,
        "split": args.split,
        "text_field": args.text_field,
        "calibration_samples": args.calibration_samples,
        "eval_samples": args.eval_samples,
        "seq_len": args.seq_len,
    }
    windows = calibration_windows(args.model, data, args.sensitivity_samples)
    network = load_model(args.model)
    source = (
        f"metrics: measured on {windows.shape[0]} windows x {args.seq_len} tokens of {args.calibration_dataset!r}"
        f" after {args.eval_samples} skipped (labels sampled from the model, seed {args.seed}); "
        f"attention Fisher over the first {min(args.attention_tokens, args.seq_len)} tokens"
    )

    def measure() -> HeadMetrics:
        metrics = measure_sensitivity(
            network,
            plan.geometry,
            windows,
            args.batch_size,
            args.attention_tokens,
            args.sink_tokens,
            args.seed,
            progress=not args.no_progress,
            rope_blocks=(args.key_rope_block,) * plan.geometry.num_layers,
        )
        info = {"model": args.model or EMBEDDED_DEFAULT, "dataset": args.calibration_dataset}
        metrics.info.update({**info, "skipped_windows": args.eval_samples})
        return metrics

    return None, source, measure


def _beside(path: Path, suffix: str) -> Path:
    """``dir/compression_config.json`` -> ``dir/compression_config<suffix>`` (the upstream design's summary naming)."""
    return path.with_name(path.stem + suffix)


def _describe(geometry: KVGeometry, block: int | list[int] = 1) -> str:
    where = "pre-RoPE" if block == 1 else f"relative to RoPE blocks of {block} tokens"
    rope = f", RoPE (keys measured {where})" if geometry.rope else ""
    return f"{geometry.num_layers} layers x {geometry.num_kv_heads} KV heads, head_dim {geometry.head_dim}{rope}"


def _check_writable(plan: _Plan) -> None:
    """Fail before the long pass if an output location cannot be written (creates the directories)."""
    ensure_writable(plan.output)
    if plan.config_path is not None:
        ensure_writable(plan.config_path.parent)


def _atomic_write(path: Path, content: str | bytes) -> None:
    if isinstance(content, str):
        atomic_write_text(path, content)
    else:
        atomic_write_bytes(path, content)

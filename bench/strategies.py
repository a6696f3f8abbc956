"""Rank strategies at equal KV memory: ``uniform`` vs ``budget`` vs the seed's ``tiers``, on the embedded default.

    python bench/strategies.py                      # 25-30 min measured on a shared (loaded) 2-core CPU
    python bench/strategies.py --calibration-samples 16 --eval-samples 8 --targets 0.5 0.75

One ``kvlight analyze`` pass measures the metrics on calibrate's calibration windows; configs for every
strategy and target come from ``kvlight analyze --metrics-file`` (so the measurement is shared); each is
calibrated with ``kvlight calibrate --compressor pca --config`` (one K/V capture, reused by every row) and
validated by calibrate's protocol: windows of 512 tokens fed in chunks of 64 through the compressed cache.
Rows: ``uniform`` and ``budget`` at each target; ``tiers`` with the seed's thresholds on kvlight's
non-degenerate ``cond``, and on the seed's own degenerate ``cond`` (``eigmax / (|eigmin| + 1e-8)`` with
``eigmin = 0``, i.e. ``eigmax * 1e8``) to show what the seed's rule did. ``tiers`` has no target: its
actual reduction is reported. Writes ``bench/results/strategies.md`` and ``strategies.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from kvlight.analysis.metrics_io import metrics_to_json, read_metrics_file  # noqa: E402
from kvlight.cli import main as kvlight  # noqa: E402
from kvlight.config import CompressionConfig  # noqa: E402
from kvlight.files import atomic_write_text  # noqa: E402
from kvlight.models import geometry_of  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def run(argv: list[str]) -> None:
    print("$ kvlight " + shlex.join(argv), flush=True)
    code = kvlight(argv)
    if code:
        raise SystemExit(f"kvlight {argv[0]} failed with exit code {code}")


def config_ranks(config: CompressionConfig, geometry) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[L, H]`` K ranks, V ranks (head_dim where exact) and the uncompressed mask of a config."""
    shape = (geometry.num_layers, geometry.num_kv_heads)
    specs = [spec for _, _, spec in config.heads(*shape, geometry.head_dim)]
    exact = np.array([not spec.enabled for spec in specs]).reshape(shape)
    rank_k = np.where(exact, geometry.head_dim, np.array([spec.rank_k for spec in specs]).reshape(shape))
    rank_v = np.where(exact, geometry.head_dim, np.array([spec.rank_v for spec in specs]).reshape(shape))
    return rank_k, rank_v, exact


def calibrate(config: Path, work: Path, args: argparse.Namespace) -> dict:
    out = work / config.stem
    run(
        [
            "calibrate", "--compressor", "pca", "--compression-config", str(config), "--output-dir", str(out), "--overwrite",
            "--calibration-samples", str(args.calibration_samples), "--eval-samples", str(args.eval_samples),
            "--seq-len", "512", "--sink-tokens", str(args.sink_tokens), "--model-dtype", args.model_dtype,
        ]
    )  # fmt: skip
    return json.loads((out / "calibration_results_pca.json").read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-samples", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--sink-tokens", type=int, default=0, help="first positions kept exact (analysis and cache)")
    parser.add_argument("--model-dtype", default="float32", help="frozen model dtype in calibrate (analysis: float32)")
    parser.add_argument("--rerender", action="store_true", help="only rewrite the markdown from the results JSON")
    parser.add_argument("--work-dir", default=None, help="where configs and calibrations go (default: a temp dir)")
    args = parser.parse_args()
    if args.rerender:
        return rerender()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kvlight-bench-strategies-"))
    command = "python bench/strategies.py " + shlex.join(sys.argv[1:])
    started, load_before = time.perf_counter(), os.getloadavg()
    window = ["--calibration-samples", str(args.calibration_samples), "--eval-samples", str(args.eval_samples)]

    # 1. One measurement, shared by every config.
    sinks = ["--sink-tokens", str(args.sink_tokens)]
    run(
        [
            "analyze",
            "--strategy",
            "budget",
            *window,
            *sinks,
            "--seq-len",
            "512",
            "--output-dir",
            str(work / "analysis"),
            "--no-progress",
        ]
    )
    measure_s = time.perf_counter() - started
    metrics_file = work / "analysis" / "fim_metrics.json"
    geometry = geometry_of(None)
    metrics = read_metrics_file(metrics_file, geometry)
    seed_metrics = read_metrics_file(metrics_file, geometry)
    seed_metrics.cond = metrics.eigmax * 1e8  # the seed's eigmax / (|eigmin| + 1e-8) with eigmin = 0 (F 1 = 0)
    seed_file = work / "analysis" / "fim_metrics_seed_cond.json"
    atomic_write_text(seed_file, metrics_to_json(seed_metrics))

    # 2. Configs.
    configs: list[tuple[str, float | None, Path]] = []
    for target in args.targets:
        for strategy in ("uniform", "budget"):
            name = f"{strategy}_{round(100 * target)}"
            configs.append((strategy, target, work / f"{name}.json"))
            run(["analyze", "--metrics-file", str(metrics_file), "--generate-compression-config", "--strategy",
                 strategy, "--kv-budget", str(round(1 - target, 6)), "--compression-config-output", f"{name}.json",
                 "--compressor", "pca", *sinks, "--output-dir", str(work)])  # fmt: skip
    for label, source in (("tiers", metrics_file), ("tiers-seed-cond", seed_file)):
        configs.append((label, None, work / f"{label}.json"))
        run(["analyze", "--metrics-file", str(source), "--generate-compression-config", "--strategy", "tiers",
             "--compression-config-output", f"{label}.json", "--compressor", "pca", *sinks, "--output-dir", str(work)])  # fmt: skip

    # 3. Calibrate + validate each.
    rows = []
    for strategy, target, path in configs:
        config = CompressionConfig.from_json(path)
        results = calibrate(path, work, args)
        rank_k, rank_v, exact = config_ranks(config, geometry)
        predicted = metrics.predicted_loss(rank_k, rank_v)
        rows.append(
            {
                "strategy": strategy,
                "target": target,
                "memory_reduction": config.memory_reduction(
                    geometry.num_layers, geometry.num_kv_heads, geometry.head_dim
                ),
                "cache_bytes_saved_pct": results["memory_savings_pct"],
                "mean_rank_k": float(rank_k.mean()),
                "mean_rank_v": float(rank_v.mean()),
                "uncompressed_heads": int(exact.sum()),
                "predicted_nll_increase": predicted,
                "baseline_perplexity": results["baseline_perplexity"],
                "compressed_perplexity": results["compressed_perplexity"],
                "perplexity_change_pct": results["perplexity_degradation_pct"],
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    elapsed = time.perf_counter() - started
    report = {
        "command": command,
        "machine": machine(),
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],
        "model": "embedded:smollm2-135m-instruct (30 layers x 3 KV heads, head_dim 64)",
        "protocol": {
            "calibration": f"{args.calibration_samples} windows x 512 tokens of the built-in corpus (after the eval windows)",
            "evaluation": f"{args.eval_samples} windows x 512 tokens, fed in chunks of 64 through the compressed cache",
            "compressor": f"pca, one K/V capture shared by every row; sink_tokens {args.sink_tokens}, recent_window 0, "
            f"frozen model {args.model_dtype}",
            "analysis": "kvlight analyze on the calibration windows (labels sampled from the model, seed 0)",
        },
        "targets": args.targets,
        "measure_seconds": measure_s,
        "total_seconds": elapsed,
        "rows": rows,
    }
    stem = "strategies" if args.sink_tokens == 0 else f"strategies_sink{args.sink_tokens}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / f"{stem}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(RESULTS / f"{stem}.md", markdown(report))
    print((RESULTS / f"{stem}.md").read_text())
    return 0


def markdown(report: dict) -> str:
    rows, targets = report["rows"], report["targets"]
    baseline = rows[0]["baseline_perplexity"]
    lines = [
        "# Rank strategies at equal KV memory (embedded default, PCA)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']}; load average {report['load_average_before_after'][0]:.1f} before, "
        f"{report['load_average_before_after'][1]:.1f} after (a shared machine: run time is not a benchmark)  ",
        f"Run time: {report['total_seconds'] / 60:.1f} min (analysis pass {report['measure_seconds']:.0f} s)  ",
        f"Protocol: calibration {report['protocol']['calibration']}; evaluation {report['protocol']['evaluation']}; "
        f"{report['protocol']['compressor']}; analysis: {report['protocol']['analysis']}.  ",
        f"Baseline perplexity (no compression): {baseline:.3f}",
        "",
        "| target | strategy | KV memory reduction | mean rank K / V | uncompressed heads "
        "| predicted dNLL (nats) | perplexity | change |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = [[r for r in rows if r["target"] == target] for target in targets]
    groups.append([r for r in rows if r["target"] is None])
    for group in groups:
        for r in group:
            label = "none (seed rules)" if r["target"] is None else f"{100 * r['target']:.0f} %"
            lines.append(
                f"| {label} | {r['strategy']} | {100 * r['memory_reduction']:.2f} % | "
                f"{r['mean_rank_k']:.1f} / {r['mean_rank_v']:.1f} | {r['uncompressed_heads']} | "
                f"{r['predicted_nll_increase']:.3f} | {r['compressed_perplexity']:.3f} | "
                f"{r['perplexity_change_pct']:+.1f} % |"
            )
    lines += [
        "",
        "`tiers` uses the seed's thresholds on kvlight's `cond` (all-ones null direction left out); "
        "`tiers-seed-cond` uses them on the seed's own degenerate `cond = eigmax / (|eigmin| + 1e-8)` with "
        "`eigmin = 0`, i.e. what the seed's rule did. Predicted dNLL is `kvlight analyze`'s second-order estimate "
        "(summed over heads) that `budget` minimises.",
        "",
        *findings(rows, targets),
        "",
    ]
    return "\n".join(lines)


def findings(rows: list[dict], targets: list[float]) -> list[str]:
    out = ["Findings:", ""]
    for target in targets:
        by = {r["strategy"]: r for r in rows if r["target"] == target}
        if {"budget", "uniform"} <= set(by):
            b, u = by["budget"], by["uniform"]
            verdict = "lower" if b["compressed_perplexity"] < u["compressed_perplexity"] else "NOT lower"
            out.append(
                f"- At {100 * target:.0f} %: budget perplexity {b['compressed_perplexity']:.3f} is {verdict} than "
                f"uniform {u['compressed_perplexity']:.3f} "
                f"({100 * (b['compressed_perplexity'] / u['compressed_perplexity'] - 1):+.1f} %); predicted "
                f"{b['predicted_nll_increase']:.3f} vs {u['predicted_nll_increase']:.3f} nats, measured "
                f"{math.log(b['compressed_perplexity'] / b['baseline_perplexity']):.3f} vs "
                f"{math.log(u['compressed_perplexity'] / u['baseline_perplexity']):.3f}."
            )
    for r in (r for r in rows if r["target"] is None):
        nearest = min(targets, key=lambda t: abs(t - r["memory_reduction"]))
        u = next((x for x in rows if x["strategy"] == "uniform" and x["target"] == nearest), None)
        if u is None:
            continue
        change = r["compressed_perplexity"] / u["compressed_perplexity"] - 1
        saves = "less" if r["memory_reduction"] < u["memory_reduction"] else "more"
        if abs(change) < 0.01:
            verdict = "a tie in perplexity (within 1 %), so no gain from the rules"
        else:
            verdict = "it loses to uniform" if change > 0 else "it beats uniform"
        out.append(
            f"- {r['strategy']} saves {100 * r['memory_reduction']:.2f} % ({saves} than uniform at {100 * nearest:.0f} %) "
            f"with perplexity {r['compressed_perplexity']:.3f} vs uniform's {u['compressed_perplexity']:.3f} "
            f"({100 * change:+.2f} %): {verdict}."
        )
    return out


def rerender() -> int:
    """Rewrite every results markdown from its JSON (after a format change)."""
    for path in sorted(RESULTS.glob("strategies*.json")):
        atomic_write_text(path.with_suffix(".md"), markdown(json.loads(path.read_text())))
        print(f"wrote {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

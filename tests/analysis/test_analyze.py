"""kvlight analyze: attention-Fisher metrics, K/V sensitivity, the three strategies, metrics import and export,
the command (files written, config accepted by calibrate) and bad input (one line, exit 2, nothing written)."""

import csv
import io
import itertools
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_error_line

from kvlight.analysis.metrics_io import CURVES, HeadMetrics, metrics_to_csv, metrics_to_json, read_metrics_file
from kvlight.analysis.rank_allocation import TierThresholds, _min_cost_exact, budget, tiers, uniform
from kvlight.analysis.sensitivity import AttentionFisher, attention_fisher_metrics
from kvlight.cli import main
from kvlight.compressors.compressor import KVCompressor
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError, MetricsError
from kvlight.geometry import KVGeometry, kv_geometry
from kvlight.models import geometry_of

OUTPUTS = ("fim_metrics.json", "fim_metrics.csv", "cfg.json", "cfg_summary.txt", "cfg_ranks.png")


def random_rows(generator: torch.Generator, *shape: int, causal: bool = False) -> torch.Tensor:
    """Attention-like probability rows ``[..., T, T]`` (softmax of random scores, optionally causal)."""
    scores = torch.randn(*shape, generator=generator, dtype=torch.float64) * 2
    if causal:
        size = shape[-1]
        scores = scores.masked_fill(torch.ones(size, size, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1)


def reference_fisher(rows: torch.Tensor) -> torch.Tensor:
    """``mean_i(diag(p_i) - p_i p_i^T)`` over every leading dim and row, the seed's definition, by brute force."""
    flat = rows.reshape(-1, rows.shape[-1])
    return torch.stack([torch.diag(p) - torch.outer(p, p) for p in flat]).mean(0)


def reference_metrics(fisher: torch.Tensor) -> tuple[float, float, float]:
    """trace, eigmax, and the condition number on the complement of the all-ones vector, via an explicit basis."""
    size = fisher.shape[-1]
    ones = torch.ones(size, 1, dtype=torch.float64) / math.sqrt(size)
    basis = torch.linalg.qr(torch.cat([ones, torch.randn(size, size - 1, dtype=torch.float64)], 1))[0][:, 1:]
    eigenvalues = torch.linalg.eigvalsh(basis.T @ fisher @ basis)
    return float(fisher.trace()), float(eigenvalues[-1]), float(eigenvalues[-1] / eigenvalues[0])


# ---------------------------------------------------------------------- 1. attention Fisher
@pytest.mark.parametrize("size", [2, 5, 24])
def test_attention_fisher_metrics_leave_out_the_all_ones_null_direction(size):
    fisher = reference_fisher(random_rows(torch.Generator().manual_seed(size), 3, size, size))
    trace, eigmax, cond = attention_fisher_metrics(fisher)

    assert (float(trace), float(eigmax), float(cond)) == pytest.approx(reference_metrics(fisher), rel=1e-8)
    eigenvalues = torch.linalg.eigvalsh(fisher)
    assert abs(float(eigenvalues[0])) < 1e-12  # F 1 = 0: the seed divided by this
    seed_cond = float(eigenvalues[-1] / (eigenvalues[0].abs() + 1e-8))
    assert seed_cond > 1e5 * float(cond)


def test_attention_fisher_averages_query_heads_into_their_kv_head_over_a_prefix():
    generator = torch.Generator().manual_seed(0)
    probs = random_rows(generator, 2, 4, 10, 10, causal=True)  # [B, H_q=4, T, T], 2 KV heads (GQA groups of 2)
    accumulator = AttentionFisher(num_layers=1, num_kv_heads=2, tokens=6)
    accumulator.add(0, probs[:1].float())
    accumulator.add(0, probs[1:].float())
    trace, eigmax, cond = accumulator.metrics()

    for kv_head in range(2):
        group = probs[:, 2 * kv_head : 2 * kv_head + 2, :6, :6]  # causal: the 6-token prefix is exact
        expected = reference_metrics(reference_fisher(group))
        got = (float(trace[0, kv_head]), float(eigmax[0, kv_head]), float(cond[0, kv_head]))
        assert got == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------- 2. K/V sensitivity on tiny models
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_measured_metrics_are_consistent(arch, analyze_metrics_files, tiny_models):
    geometry = kv_geometry(tiny_models[arch])
    metrics = read_metrics_file(analyze_metrics_files[arch], geometry)
    dim = geometry.head_dim

    assert metrics.has_sensitivity and metrics.info["windows"] == 8 and metrics.info["seq_len"] == 32
    for kind in "kv":
        loss, eig = metrics.curves[f"loss_{kind}"], metrics.curves[f"eig_{kind}"]
        assert loss.shape == (geometry.num_layers, geometry.num_kv_heads, dim + 1)
        assert (loss[..., -1] == 0).all() and (loss >= 0).all()
        assert (np.diff(loss, axis=-1) <= 1e-15).all()  # dropping more directions never predicts less loss
        assert (np.diff(eig, axis=-1) <= 1e-12).all() and (eig >= 0).all()
        energy = metrics.energy(kind)
        assert np.allclose(energy[..., 0], 0) and np.allclose(energy[..., -1], 1)
        assert (metrics.curves[f"fisher_{kind}"] >= 0).all()
    assert ((0 < metrics.trace) & (metrics.trace < 1)).all()
    assert (metrics.eigmax <= metrics.trace + 1e-12).all()
    assert (np.isfinite(metrics.cond) & (metrics.cond >= 1)).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("rank", [4, 8])
def test_predicted_loss_tracks_the_measured_kl_of_truncating_one_head(
    arch, layer, rank, tiny_model_paths, tiny_models, analyze_metrics_files
):
    """The curve predicts KL(p_model || p_truncated) per token to second order: within a factor 3 here."""
    from kvlight.analysis.sensitivity import principal_statistics
    from kvlight.cli.analyze import calibration_windows
    from kvlight.hf import cache_kwargs
    from kvlight.serving.capture_cache import CaptureCache
    from kvlight.serving.positions import PositionTracker

    model, head = tiny_models[arch], 0
    geometry = kv_geometry(model)
    metrics = read_metrics_file(analyze_metrics_files[arch], geometry)
    windows = calibration_windows(tiny_model_paths[arch], {"calibration_samples": 8, "eval_samples": 8, "seq_len": 32})
    means, bases, _ = principal_statistics(model, geometry, windows, 4, progress=False)
    mean, basis = means[(layer, "v")][head].float(), bases[(layer, "v")][head][:, :rank].float()

    def truncate(index, keys, values):
        if index != layer:
            return None
        values = values.clone()
        values[:, head] = (values[:, head] - mean) @ basis @ basis.T + mean
        return keys, values

    tracker = PositionTracker(model) if geometry.rope else None
    try:
        with torch.no_grad():
            reference = model(input_ids=windows).logits[:, :-1].float().log_softmax(-1)
            cache = CaptureCache(geometry.num_layers, truncate, tracker)
            truncated = model(input_ids=windows, **cache_kwargs(cache)).logits[:, :-1].float().log_softmax(-1)
    finally:
        if tracker is not None:
            tracker.close()
    kl = float((reference.exp() * (reference - truncated)).sum(-1).mean())
    predicted = metrics.curves["loss_v"][layer, head, rank]
    assert kl > 1e-6
    assert 1 / 3 < predicted / kl < 3, (predicted, kl)


# ---------------------------------------------------------------------- 3. strategies
def synthetic_metrics(loss_k: np.ndarray, loss_v: np.ndarray) -> HeadMetrics:
    """Metrics with given loss curves ``[L, H, D + 1]`` (other curves consistent placeholders)."""
    layers, heads, width = loss_k.shape
    geometry = KVGeometry("llama", layers, heads, width - 1, rope=True)
    flat = np.ones((layers, heads, width - 1))
    curves = {"eig_k": flat, "eig_v": flat, "fisher_k": flat, "fisher_v": flat, "loss_k": loss_k, "loss_v": loss_v}
    scalars = np.full((layers, heads), 0.5)
    return HeadMetrics(geometry, scalars, scalars.copy(), scalars.copy(), curves)


def decreasing_curves(generator: np.random.Generator, layers: int, heads: int, dim: int) -> np.ndarray:
    """Random non-increasing curves ending at 0, ``[L, H, D + 1]``."""
    drops = generator.exponential(size=(layers, heads, dim)) * generator.exponential(size=(layers, heads, 1))
    tail = np.cumsum(drops[..., ::-1], axis=-1)[..., ::-1]
    return np.concatenate([tail, np.zeros((layers, heads, 1))], axis=-1)


@pytest.mark.parametrize(("target", "step"), [(0.5, 1), (0.75, 1), (0.3, 2), (0.6, 4), (0.9, 1), (0.123, 2)])
def test_budget_meets_the_target_within_one_rank_step(target, step):
    generator = np.random.default_rng(int(1000 * target) + step)
    metrics = synthetic_metrics(*(decreasing_curves(generator, 3, 2, 16) for _ in range(2)))
    allocation = budget(metrics, target, step)

    total = 2 * 3 * 2 * 16
    kept = int(allocation.rank_k.sum() + allocation.rank_v.sum())
    assert kept == math.floor((1 - target) * total / step) * step
    assert target <= allocation.memory_reduction() < target + step / total
    for ranks in (allocation.rank_k, allocation.rank_v):
        assert ((ranks % step == 0) & (ranks >= step) & (ranks <= 16)).all()


def test_budget_is_the_exact_optimum():
    generator = np.random.default_rng(7)
    metrics = synthetic_metrics(*(decreasing_curves(generator, 1, 2, 4) for _ in range(2)))
    allocation = budget(metrics, 0.5, 1)  # 8 of 16 numbers kept over 4 items

    options = [r for r in itertools.product(range(1, 5), repeat=4) if sum(r) == 8]
    best = min(metrics.predicted_loss(np.array([r[:2]]), np.array([r[2:]])) for r in options)
    assert metrics.predicted_loss(allocation.rank_k, allocation.rank_v) == pytest.approx(best)
    costs = np.random.default_rng(1).random((5, 3))
    brute = min(sum(costs[j, c[j]] for j in range(5)) for c in itertools.product(range(3), repeat=5) if sum(c) + 5 == 9)
    picked = _min_cost_exact(costs, 9)
    assert (picked + 1).sum() == 9 and costs[np.arange(5), picked].sum() == pytest.approx(brute)


def test_budget_follows_sensitivity_and_leaves_the_costliest_head_uncompressed():
    dim = 8
    ramp = np.linspace(1.0, 0.0, dim + 1)  # every dropped direction costs the same
    loss_k = np.tile(ramp * 1e-3, (2, 2, 1))  # keys: cheap to compress
    loss_v = np.tile(ramp, (2, 2, 1))
    loss_v[1, 1] = ramp * 1e4  # one value head that must stay exact
    loss_k[1, 1] = ramp * 1e4
    allocation = budget(synthetic_metrics(loss_k, loss_v), 0.4, 1)

    assert allocation.rank_k[1, 1] == allocation.rank_v[1, 1] == dim
    assert allocation.uncompressed()[1, 1] and allocation.uncompressed().sum() == 1
    others = ~allocation.uncompressed()
    assert (allocation.rank_v[others] > allocation.rank_k[others]).all()
    config = allocation.to_config("pca")
    assert config.per_layer_head[(1, 1)]["enabled"] is False
    assert config.memory_reduction(2, 2, dim) == pytest.approx(allocation.memory_reduction())


TIER_CASES = {
    # (trace, cond) -> (tier, rank at head_dim 64); the seed's rules in order
    "critical": ((0.96, 1e8), ("critical", 64)),
    "excellent": ((0.85, 2e7), ("excellent", 8)),
    "high_cond_but_diffuse": ((0.92, 2e7), ("good", 16)),
    "good": ((0.50, 5e6), ("good", 16)),
    "moderate": ((0.50, 1e3), ("moderate", 32)),
    "trace_at_threshold": ((0.95, 1e3), ("moderate", 32)),
}


@pytest.mark.parametrize(("head_dim", "scale"), [(64, 1), (128, 2), (32, 0.5)])
def test_tiers_apply_the_seed_rules_scaled_to_head_dim(head_dim, scale):
    cases = list(TIER_CASES.values())
    geometry = KVGeometry("gpt2", len(cases), 1, head_dim, rope=False)
    trace = np.array([[c[0][0]] for c in cases])
    cond = np.array([[c[0][1]] for c in cases])
    allocation = tiers(HeadMetrics(geometry, trace, trace.copy(), cond))

    for layer, (_, (tier, rank)) in enumerate(cases):
        expected = head_dim if tier == "critical" else int(rank * scale)
        assert allocation.tier[layer, 0] == tier
        assert allocation.rank_k[layer, 0] == allocation.rank_v[layer, 0] == expected
    assert allocation.to_config().per_layer_head[(0, 0)] == {"enabled": False, "rank": head_dim}


def test_tier_thresholds_are_overridable():
    geometry = KVGeometry("gpt2", 1, 1, 64, rope=False)
    metrics = HeadMetrics(geometry, np.array([[0.5]]), np.array([[0.1]]), np.array([[300.0]]))
    assert tiers(metrics).tier[0, 0] == "moderate"
    assert tiers(metrics, TierThresholds(cond_good=100.0)).tier[0, 0] == "good"
    assert tiers(metrics, TierThresholds(trace_critical=0.4)).tier[0, 0] == "critical"


@pytest.mark.parametrize(("target", "step", "rank"), [(0.5, 1, 32), (0.75, 4, 16), (0.6, 4, 24), (0.3, 1, 44)])
def test_uniform_is_the_largest_rank_meeting_the_target(target, step, rank):
    allocation = uniform(KVGeometry("llama", 3, 2, 64, rope=True), target, step)
    assert (allocation.rank_k == rank).all() and (allocation.rank_v == rank).all()
    assert allocation.memory_reduction() >= target


def test_allocations_write_configs_that_build_a_compressor():
    generator = np.random.default_rng(3)
    metrics = synthetic_metrics(*(decreasing_curves(generator, 2, 3, 16) for _ in range(2)))
    for allocation in (budget(metrics, 0.6, 2), tiers(metrics), uniform(metrics.geometry, 0.5)):
        config = CompressionConfig.from_dict(json.loads(json.dumps(allocation.to_config("pca").to_dict())))
        assert config.memory_reduction(2, 3, 16) == pytest.approx(allocation.memory_reduction())
        compressor = KVCompressor(config)
        assert [sum(dims) for dims in compressor.latent_dims()] == [
            int(allocation.rank_k[layer].sum() + allocation.rank_v[layer].sum()) for layer in range(2)
        ]


# ---------------------------------------------------------------------- 4. metrics files in and out
def _wide_rows(metrics: HeadMetrics) -> list[dict]:
    """One ``{layer, head, trace, eigmax, cond}`` dict of plain floats per head."""
    shape = (metrics.geometry.num_layers, metrics.geometry.num_kv_heads)
    return [
        {
            "layer": layer,
            "head": head,
            **{name: float(getattr(metrics, name)[layer, head]) for name in ("trace", "eigmax", "cond")},
        }
        for layer, head in np.ndindex(*shape)
    ]


def _tall_csv(metrics: HeadMetrics, runs=("run-a",)) -> str:
    lines = ["run_name,layer,head,metric,value", "run-a,global,all,trace_global_mean,0.5"]
    for run in runs:
        for row in _wide_rows(metrics):
            for name in ("trace", "eigmax", "cond"):
                lines.append(f"{run},layer{row['layer']},head{row['head']},{name},{row[name]!r}")
    return "\n".join(lines) + "\n"


def _seed_wandb_json(metrics: HeadMetrics) -> str:
    summary = {"fisher/trace_global_mean": 0.5, "train/loss": 3.0}
    for row in _wide_rows(metrics):
        for name in ("trace", "eigmax", "cond"):
            summary[f"fisher/layer{row['layer']}/head{row['head']}/{name}"] = row[name]
    return json.dumps([{"run_info": {"display_name": "baseline"}, "summary_metrics": summary}])


IMPORT_FORMATS = {
    "kvlight_json": ("json", metrics_to_json, True),
    "kvlight_csv": ("csv", metrics_to_csv, False),
    "seed_tall_csv": ("csv", _tall_csv, False),
    "seed_wandb_json": ("json", _seed_wandb_json, False),
    "wide_rows_json": ("json", lambda m: json.dumps(_wide_rows(m)), False),
}


@pytest.mark.parametrize("name", list(IMPORT_FORMATS))
def test_metrics_import_formats(name, analyze_metrics_files, tiny_models, tmp_path):
    geometry = kv_geometry(tiny_models["llama"])
    source = read_metrics_file(analyze_metrics_files["llama"], geometry)
    suffix, render, has_curves = IMPORT_FORMATS[name]
    path = tmp_path / f"metrics.{suffix}"
    path.write_text(render(source))

    imported = read_metrics_file(path, geometry)
    for metric in ("trace", "eigmax", "cond"):
        np.testing.assert_allclose(getattr(imported, metric), getattr(source, metric), rtol=1e-5)
    assert imported.has_sensitivity == has_curves
    if has_curves:
        for curve in CURVES:
            np.testing.assert_allclose(imported.curves[curve], source.curves[curve], rtol=1e-12)


def test_metrics_csv_has_the_seed_columns_and_one_row_per_head(analyze_metrics_files, tiny_models):
    geometry = kv_geometry(tiny_models["gpt2"])
    rows = list(csv.DictReader(io.StringIO(metrics_to_csv(read_metrics_file(analyze_metrics_files["gpt2"], geometry)))))
    assert len(rows) == geometry.num_layers * geometry.num_kv_heads
    assert {"layer", "head", "trace", "eigmax", "cond", "k_fisher", "v_energy_r8", "k_loss_r4"} <= set(rows[0])


# ---------------------------------------------------------------------- 5. the command
def analyze_args(model: str, output: Path, *extra: str) -> list[str]:
    return ["analyze", "--model", model, "--output-dir", str(output), "--compression-config-output", "cfg.json",
            "--strategy", "budget", *extra]  # fmt: skip


TINY_MEASURE = ["--calibration-samples", "4", "--eval-samples", "2", "--seq-len", "32", "--attention-tokens", "16"]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_analyze_measures_and_writes_every_output(arch, tiny_model_paths, tmp_path, capfd):
    output = tmp_path / "out"
    argv = analyze_args(tiny_model_paths[arch], output, *TINY_MEASURE, "--generate-compression-config")
    assert main([*argv, "--target-memory-reduction", "0.5", "--algo", "pca"]) == 0
    captured = capfd.readouterr()

    geometry = geometry_of(tiny_model_paths[arch])
    assert sorted(p.name for p in output.iterdir()) == sorted(OUTPUTS)
    assert "K/V sensitivity" in captured.err  # a progress bar for the long pass
    assert "total KV memory reduction 50.00%" in captured.out and "predicted loss increase" in captured.out
    config = CompressionConfig.from_json(output / "cfg.json").validate(geometry.num_layers, geometry.num_kv_heads, 16)
    assert config.memory_reduction(geometry.num_layers, geometry.num_kv_heads, 16) == 0.5
    assert config.algo_default == "pca" and len(config.per_layer_head) == geometry.num_layers * geometry.num_kv_heads
    summary = (output / "cfg_summary.txt").read_text()
    assert "total KV memory reduction: 50.00%" in summary and "orthogonal to the all-ones vector" in summary
    table = [line.split() for line in summary.splitlines() if line.split()[:1] in (["0"], ["1"])]
    assert [(int(row[0]), int(row[1])) for row in table] == [
        (layer, head) for layer in range(geometry.num_layers) for head in range(geometry.num_kv_heads)
    ]
    assert (output / "cfg_ranks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = read_metrics_file(output / "fim_metrics.json", geometry)
    assert metrics.has_sensitivity and metrics.info["windows"] == 4


@pytest.mark.parametrize("strategy", ["budget", "tiers", "uniform"])
@pytest.mark.parametrize("target", [0.5, 0.75])
def test_analyze_strategies_from_a_metrics_file(
    strategy, target, analyze_metrics_files, tiny_llama_path, tmp_path, capfd
):
    output = tmp_path / "out"
    argv = analyze_args(tiny_llama_path, output, "--metrics-file", str(analyze_metrics_files["llama"]))
    assert (
        main([*argv, "--generate-compression-config", "--strategy", strategy, "--target-memory-reduction", str(target)])
        == 0
    )
    capfd.readouterr()

    geometry = geometry_of(tiny_llama_path)
    config = CompressionConfig.from_json(output / "cfg.json").validate(geometry.num_layers, geometry.num_kv_heads, 16)
    reduction = config.memory_reduction(geometry.num_layers, geometry.num_kv_heads, 16)
    if strategy == "tiers":  # the seed's rules ignore the target; here every head is "moderate": rank 8 of 16
        assert reduction == 0.5 and "target memory reduction: none" in (output / "cfg_summary.txt").read_text()
    else:
        assert reduction == target
    assert sorted(p.name for p in output.iterdir()) == sorted(OUTPUTS)


def test_generated_config_calibrates(analyze_metrics_files, tiny_llama_path, tmp_path, kvlight_cache, capfd):
    config = tmp_path / "analysis" / "cfg.json"
    argv = analyze_args(tiny_llama_path, tmp_path / "analysis", "--metrics-file", str(analyze_metrics_files["llama"]))
    assert main([*argv, "--generate-compression-config", "--target-memory-reduction", "0.75"]) == 0
    calibrate = ["calibrate", "--model", tiny_llama_path, "--compressor", "pca", "--config", str(config),
                 "--calibration-samples", "4", "--eval-samples", "2", "--seq-len", "32", "--accelerator", "cpu",
                 "--output-dir", str(tmp_path / "cal")]  # fmt: skip
    assert main(calibrate) == 0
    capfd.readouterr()
    results = json.loads((tmp_path / "cal" / "calibration_results_pca.json").read_text())
    assert results["compression_config"]["global"]["target_memory_reduction"] == 0.75
    assert math.isfinite(results["compressed_perplexity"])


# ---------------------------------------------------------------------- 6. bad input
def _rewrite(analyze_metrics_files, edit):
    def make(tmp: Path, tiny_models) -> str:
        geometry = kv_geometry(tiny_models["llama"])
        rows = _wide_rows(read_metrics_file(analyze_metrics_files["llama"], geometry))
        text = edit(rows)
        path = tmp / ("metrics.csv" if isinstance(text, list) else "metrics.json")
        if isinstance(text, list):
            columns = list(text[0])
            path.write_text(
                "\n".join([",".join(columns), *(",".join(str(r.get(c, "")) for c in columns) for r in text)])
            )
        else:
            path.write_text(text)
        return str(path)

    return make


def _drop(rows, column):
    return [{k: v for k, v in row.items() if k != column} for row in rows]


def _set(rows, index, **values):
    rows[index].update(values)
    return rows


BAD_METRICS = {
    "missing_column": (lambda rows: _drop(rows, "cond"), ["lacks column(s) cond"]),
    "unknown_layer": (lambda rows: _set(rows, 0, layer=7), ["layer 7 does not exist", "0..1"]),
    "unknown_head": (lambda rows: _set(rows, 1, head="head9"), ["head 9 does not exist", "0..1"]),
    "nan_value": (lambda rows: _set(rows, 2, trace=float("nan")), ["trace of layer 1 head 0", "finite"]),
    "not_a_number": (lambda rows: _set(rows, 2, cond="high"), ["cond of layer 1 head 0", "not a number"]),
    "duplicate_head": (lambda rows: _set(rows, 1, head=0), ["twice"]),
    "missing_head": (lambda rows: rows[:-1], ["no row for layer 1 head 1"]),
    "not_json": (lambda rows: "{not json", ["not valid JSON"]),
}


def assert_nothing_written(output: Path) -> None:
    assert not output.exists(), sorted(str(p) for p in output.rglob("*"))


@pytest.mark.parametrize("case", list(BAD_METRICS))
def test_bad_metrics_file_is_one_line_exit_2(
    case, analyze_metrics_files, tiny_models, tiny_llama_path, tmp_path, capfd
):
    edit, fragments = BAD_METRICS[case]
    metrics_file = _rewrite(analyze_metrics_files, edit)(tmp_path, tiny_models)
    output = tmp_path / "out"
    argv = analyze_args(tiny_llama_path, output, "--metrics-file", metrics_file, "--generate-compression-config")
    assert main([*argv, "--strategy", "tiers"]) == 2
    line = one_error_line(capfd.readouterr().err)
    for fragment in fragments:
        assert fragment in line
    assert metrics_file in line
    assert_nothing_written(output)
    with pytest.raises(MetricsError):
        read_metrics_file(metrics_file, kv_geometry(tiny_models["llama"]))


def test_seed_csv_with_several_runs_needs_run_name(
    analyze_metrics_files, tiny_models, tiny_llama_path, tmp_path, capfd
):
    geometry = kv_geometry(tiny_models["llama"])
    path = tmp_path / "fim.csv"
    path.write_text(_tall_csv(read_metrics_file(analyze_metrics_files["llama"], geometry), runs=("run-a", "run-b")))
    output = tmp_path / "out"
    assert main([*analyze_args(tiny_llama_path, output, "--metrics-file", str(path)), "--generate-compression-config",
                 "--strategy", "tiers"]) == 2  # fmt: skip
    assert "pick one with --run-name" in one_error_line(capfd.readouterr().err)
    assert_nothing_written(output)
    assert read_metrics_file(path, geometry, run_name="run-b").trace.shape == (2, 2)


BAD_ARGS = {
    "target_zero": (["--target-memory-reduction", "0"], ["strictly between 0 and 1"]),
    "target_one": (["--target-memory-reduction", "1"], ["strictly between 0 and 1"]),
    "target_above": (["--target-memory-reduction", "1.5"], ["strictly between 0 and 1"]),
    "target_negative": (["--target-memory-reduction", "-0.2"], ["strictly between 0 and 1"]),
    "target_nan": (["--target-memory-reduction", "nan"], ["strictly between 0 and 1"]),
    "budget_unreachable": (["--target-memory-reduction", "0.95"], ["cannot be met", "rank 1"]),
    "budget_unreachable_step": (["--target-memory-reduction", "0.8", "--rank-step", "4"], ["cannot be met"]),
    "rank_step": (["--rank-step", "3"], ["divisor of the head_dim 16"]),
    "entity_alone": (["--entity", "me"], ["both --entity and --project"]),
    "two_sources": (["--entity", "me", "--project", "p", "--metrics-file", "m.csv"], ["either --metrics-file"]),
    "wandb_missing": (["--entity", "me", "--project", "p"], ["pip install wandb", "--metrics-file"]),
    "budget_without_curves": (["--metrics-file", "{csv}"], ["budget needs the K/V loss curves"]),
    "seq_len_too_short": (["--seq-len", "4", "--sink-tokens", "4"], ["--seq-len 4"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_arguments_are_one_line_exit_2(
    case, analyze_metrics_files, tiny_models, tiny_llama_path, tmp_path, capfd, monkeypatch
):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ImportError
    extra, fragments = BAD_ARGS[case]
    csv_file = tmp_path / "m.csv"
    geometry = kv_geometry(tiny_models["llama"])
    csv_file.write_text(metrics_to_csv(read_metrics_file(analyze_metrics_files["llama"], geometry)))
    extra = [arg.replace("{csv}", str(csv_file)) for arg in extra]
    output = tmp_path / "out"
    assert main([*analyze_args(tiny_llama_path, output, "--generate-compression-config"), *extra]) == 2
    line = one_error_line(capfd.readouterr().err)
    for fragment in fragments:
        assert fragment in line
    assert_nothing_written(output)


def test_bad_target_is_a_config_error():
    with pytest.raises(ConfigError):
        uniform(KVGeometry("gpt2", 1, 1, 8, rope=False), 1.0)
    with pytest.raises(ConfigError, match="budget needs"):
        budget(HeadMetrics(KVGeometry("gpt2", 1, 1, 8, rope=False), *(np.zeros((1, 1)),) * 3), 0.5)


def fake_wandb(runs: list | Exception) -> types.ModuleType:
    """A stand-in ``wandb`` module whose ``Api().runs(path)`` returns ``runs`` (or raises them)."""

    class Api:
        def __init__(self, timeout=None):
            self.timeout = timeout

        def runs(self, path):
            if isinstance(runs, Exception):
                raise runs
            return runs

    return types.SimpleNamespace(Api=Api)


def test_wandb_path_reads_the_seed_summary_keys(
    analyze_metrics_files, tiny_models, tiny_llama_path, tmp_path, monkeypatch, capfd
):
    source = read_metrics_file(analyze_metrics_files["llama"], kv_geometry(tiny_models["llama"]))
    summary = {
        f"fisher/layer{r['layer']}/head{r['head']}/{name}": r[name]
        for r in _wide_rows(source)
        for name in ("trace", "cond")
    }
    run = types.SimpleNamespace(display_name="baseline", name="run-1", summary={**summary, "train/loss": 2.0})
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb([run]))
    output = tmp_path / "out"
    argv = analyze_args(tiny_llama_path, output, "--entity", "me", "--project", "fim", "--generate-compression-config")
    assert main([*argv, "--strategy", "tiers"]) == 0
    capfd.readouterr()
    assert "imported from W&B me/fim" in (output / "cfg_summary.txt").read_text()
    np.testing.assert_allclose(
        read_metrics_file(output / "fim_metrics.json", source.geometry).cond, source.cond, rtol=1e-12
    )


def test_unreachable_wandb_is_one_line_pointing_to_metrics_file(tiny_llama_path, tmp_path, monkeypatch, capfd):
    monkeypatch.setitem(
        sys.modules, "wandb", fake_wandb(ConnectionError("Max retries exceeded\nwith url: api.wandb.ai"))
    )
    output = tmp_path / "out"
    argv = analyze_args(tiny_llama_path, output, "--entity", "me", "--project", "fim", "--generate-compression-config")
    assert main([*argv, "--strategy", "tiers"]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert "W&B project me/fim" in line and "Max retries exceeded" in line and "--metrics-file" in line
    assert_nothing_written(output)

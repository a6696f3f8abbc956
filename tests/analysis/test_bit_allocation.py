"""The bits allocator (kvlight.bit_allocation) and the commands around it.

What must hold: the allocation meets the byte budget to within one step, packing padding included; a larger
budget never predicts a larger loss; the Fisher allocation predicts less loss than the MSE and uniform ones it is
compared with; ``kvlight analyze --strategy bits`` writes a config ``kvlight calibrate`` takes; ``kvlight calibrate
--target-memory-reduction`` measures, allocates and calibrates in one command; KL distillation trains through mixed
widths; and bad input is one line, exit 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import HEAD_DIM, chunked_logits, one_error_line, tiny_calibrate_args

from kvlight.analysis.bit_allocation import allocate_bits, fp16_bytes_per_token, uniform_bits
from kvlight.analysis.metrics_io import HeadMetrics, read_metrics_file
from kvlight.cli import main
from kvlight.compressors.compressor import KVCompressor
from kvlight.compressors.widths import WIDTHS
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError
from kvlight.geometry import KVGeometry, kv_geometry
from kvlight.models import geometry_of
from kvlight.serving.cache import CompressedCache
from kvlight.serving.positions import PositionTracker

TARGETS = (0.5, 0.75, 0.8125, 0.875, 0.90625, 0.9375)


def synthetic_metrics(layers: int = 3, heads: int = 2, dim: int = 16, seed: int = 0) -> HeadMetrics:
    """Metrics with the shape analyze measures: decaying spectra, Fisher weights spread over layers, and distortions
    that fall ~4x per bit (a Gaussian-like quantizer), with noise."""
    rng = np.random.default_rng(seed)
    geometry = KVGeometry("llama", layers, heads, dim, True)
    curves = {}
    bits = np.array([w if w < 16 else 30 for w in WIDTHS], dtype=np.float64)
    for kind in "kv":
        eig = np.sort(rng.lognormal(0, 1.5, (layers, heads, dim)), axis=-1)[..., ::-1]
        fisher = rng.lognormal(0, 1.0, (layers, heads, dim)) * rng.lognormal(0, 2.0, (layers, 1, 1))
        noise = rng.uniform(0.8, 1.2, (layers, heads, dim, len(WIDTHS)))
        curves[f"eig_{kind}"] = eig
        curves[f"fisher_{kind}"] = fisher
        curves[f"loss_{kind}"] = np.zeros((layers, heads, dim + 1))
        dist = eig[..., None] * 4.0 ** (-bits) * noise
        dist[..., -1] = 0.0
        curves[f"dist_{kind}"] = np.minimum.accumulate(dist, axis=-1)
        # Gradient-weighted errors: the Fisher times the error, with a row-level correlation the product misses.
        correlation = rng.uniform(0.5, 2.0, (layers, heads, dim, 1))
        curves[f"jdist_{kind}"] = np.minimum.accumulate(fisher[..., None] * curves[f"dist_{kind}"] * correlation, -1)
    nan = np.full((layers, heads), np.nan)
    return HeadMetrics(geometry, nan, nan, nan, curves)


def fisher_loss(metrics: HeadMetrics, allocation) -> float:
    return allocation.predicted_loss(metrics)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("weighting", ["fisher", "fisher-joint", "mse", "uniform"])
def test_allocation_meets_the_budget_to_within_one_step(target, weighting):
    metrics = synthetic_metrics()
    allocation = allocate_bits(metrics, target, weighting)
    allowed = fp16_bytes_per_token(metrics.geometry) * (1 - target)
    used = allocation.bytes_per_token()
    assert used <= allowed
    # One step is at most 8 bits (8 -> 16) plus the byte of padding it can open in a field array.
    slack = 2 if weighting != "uniform" else 1 + 2 * HEAD_DIM * metrics.geometry.num_kv_heads // 8
    assert allowed - used <= slack, (allowed, used)
    assert allocation.memory_reduction() >= target
    assert set(np.unique(allocation.widths["k"])) <= set(WIDTHS)


@pytest.mark.parametrize("weighting", ["fisher", "fisher-joint", "mse"])
def test_a_larger_budget_never_predicts_a_larger_loss(weighting):
    metrics = synthetic_metrics(seed=1)
    curves = metrics.curves
    tables = {
        "fisher": lambda kind: 0.5 * curves[f"fisher_{kind}"][..., None] * curves[f"dist_{kind}"],
        "fisher-joint": lambda kind: 0.5 * curves[f"jdist_{kind}"],
        "mse": lambda kind: curves[f"dist_{kind}"],
    }[weighting]

    def objective(allocation) -> float:
        total = 0.0
        for kind in "kv":
            index = np.searchsorted(np.array(WIDTHS), allocation.widths[kind])[..., None]
            total += float(np.take_along_axis(tables(kind), index, -1)[..., 0].sum())
        return total

    targets = np.linspace(0.97, 0.05, 60)  # budgets rising
    losses = [objective(allocate_bits(metrics, float(t), weighting)) for t in targets]
    assert all(later <= earlier for earlier, later in zip(losses, losses[1:])), losses
    assert losses[-1] < 1e-3 * losses[0]


@pytest.mark.parametrize("target", TARGETS[1:])
def test_fisher_allocation_predicts_less_loss_than_the_baselines(target):
    metrics = synthetic_metrics(seed=2)
    fisher = fisher_loss(metrics, allocate_bits(metrics, target, "fisher"))
    assert fisher < fisher_loss(metrics, allocate_bits(metrics, target, "mse"))
    assert fisher < fisher_loss(metrics, uniform_bits(metrics.geometry, target))


@pytest.mark.parametrize(
    "target,expected", [(0.75, {4: 16}), (0.8125, {3: 16}), (0.90625, {2: 8, 1: 8}), (0.96875, {1: 8, 0: 8})]
)
def test_uniform_widths_are_the_same_for_every_head(target, expected):
    allocation = uniform_bits(KVGeometry("llama", 2, 2, HEAD_DIM, True), target)
    for kind in "kv":
        rows = allocation.widths[kind].reshape(-1, HEAD_DIM)
        assert (rows == rows[0]).all()
        values, counts = np.unique(rows[0], return_counts=True)
        assert dict(zip(values.tolist(), counts.tolist())) == expected


@pytest.mark.parametrize("target", [0.0, 1.0, -0.5, 1.5, float("nan"), float("inf")])
def test_bad_targets_are_one_line_errors(target):
    with pytest.raises(ConfigError) as error:
        allocate_bits(synthetic_metrics(), target)
    assert "strictly between 0 and 1" in str(error.value) and "\n" not in str(error.value)


def test_metrics_without_distortions_are_refused():
    metrics = synthetic_metrics()
    del metrics.curves["dist_k"], metrics.curves["dist_v"]
    with pytest.raises(ConfigError, match="per-width distortions"):
        allocate_bits(metrics, 0.875)
    with pytest.raises(ConfigError, match="query"):
        allocate_bits(synthetic_metrics(), 0.875, "query")


def test_config_of_an_allocation_lists_every_head_and_its_reduction():
    metrics = synthetic_metrics()
    allocation = allocate_bits(metrics, 0.875)
    config = allocation.to_config("pca", sink_tokens=4, recent_window=16)
    geometry = metrics.geometry
    again = CompressionConfig.from_dict(json.loads(config.to_json_text()))
    assert again.to_dict() == config.to_dict()
    assert config.target_memory_reduction == pytest.approx(allocation.memory_reduction(), abs=1e-6)
    assert config.memory_reduction(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == pytest.approx(
        1 - allocation.bits_per_element() / 16
    )
    spec = config.head(2, 1, HEAD_DIM)
    assert list(spec.bits_k) == allocation.widths["k"][2, 1].tolist()


# ---------------------------------------------------------------------- measured on the tiny models
def kl_of(model, compressor, ids) -> float:
    from kvlight.calibration.distill import token_kl

    geometry = kv_geometry(model)
    tracker = PositionTracker(model) if geometry.rope else None
    try:
        with torch.no_grad():
            exact = model(input_ids=ids).logits
            return float(token_kl(exact, chunked_logits(model, ids, CompressedCache(compressor, tracker), chunk=8)))
    finally:
        if tracker is not None:
            tracker.close()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_measured_metrics_carry_distortions_and_divergence_rises_with_the_target(
    arch, analyze_metrics_files, tiny_model_paths, tiny_models, tiny_rows, tiny_windows
):
    geometry = geometry_of(tiny_model_paths[arch])
    metrics = read_metrics_file(analyze_metrics_files[arch], geometry)
    assert metrics.has_distortion
    assert metrics.curves["dist_k"].shape == (geometry.num_layers, geometry.num_kv_heads, HEAD_DIM, len(WIDTHS))
    assert (np.diff(metrics.curves["dist_k"], axis=-1) <= 0).all()  # more bits never measure worse
    assert "qweight_k" in metrics.curves  # queries are read where attention reads them: GPT-2's fused c_attn too
    keys, values = tiny_rows[arch]["calib"]
    divergences = []
    for target in (0.5, 0.75, 0.875, 0.96875):
        config = allocate_bits(metrics, target).to_config("pca")
        compressor = KVCompressor(config, geometry)
        compressor.fit_statistics([{"keys": keys, "values": values}])
        divergences.append(kl_of(tiny_models[arch], compressor, tiny_windows["eval"]))
    assert divergences == sorted(divergences), divergences


def test_kl_distillation_trains_through_mixed_widths(tiny_models, tiny_rows, tiny_windows, analyze_metrics_files):
    from kvlight.calibration.distill import distill, distillation_loss, latent_quantizers

    model = tiny_models["llama"]
    geometry = kv_geometry(model)
    metrics = read_metrics_file(analyze_metrics_files["llama"], geometry)
    config = allocate_bits(metrics, 0.875).to_config("kvsplice")
    compressor = KVCompressor(config, geometry, options={"kvsplice": {"latent_affine": False}})
    keys, values = tiny_rows["llama"]["calib"]
    compressor.fit_statistics([{"keys": keys, "values": values}])
    before_steps = {k: v.clone() for k, v in compressor.state_dict().items() if k.endswith("code_step")}
    tracker = PositionTracker(model)
    try:
        quantizers = latent_quantizers(compressor, torch.float32)
        assert quantizers is not None and len(quantizers) == 2 * geometry.num_layers

        def heldout() -> float:
            with torch.no_grad():
                return float(distillation_loss(model, compressor, tiny_windows["eval"], tracker, quantizers))

        before = heldout()
        losses = distill(model, compressor, tiny_windows["calib"], tracker, steps=30, lr=3e-3, batch_size=8)
        quantizers = latent_quantizers(compressor, torch.float32)
        after = heldout()
    finally:
        tracker.close()
    assert losses[-1] < losses[0]
    assert 0 < after < 0.9 * before, (before, after)
    # The static steps are fixed during training: the projections learn around them.
    for name, step in before_steps.items():
        assert torch.equal(compressor.state_dict()[name], step)


# ---------------------------------------------------------------------- the commands
def test_analyze_strategy_bits_writes_a_config_calibrate_takes(
    analyze_metrics_files, tiny_llama_path, tmp_path, capsys, kvlight_cache
):
    output = tmp_path / "analysis"
    argv = ["analyze", "--model", tiny_llama_path, "--metrics-file", str(analyze_metrics_files["llama"])]
    code = main([*argv, "--strategy", "bits", "--target-memory-reduction", "0.875", "--output-dir", str(output),
                 "--sink-tokens", "1", "--recent-window", "2", "--algo", "pca"])  # fmt: skip
    stdout = capsys.readouterr().out
    assert code == 0
    assert "bits (fisher-joint): " in stdout and "predicted loss increase" in stdout
    for name in ("compression_config.json", "compression_config_summary.txt", "compression_config_bits.png"):
        assert (output / name).stat().st_size > 0, name
    config = CompressionConfig.from_json(output / "compression_config.json")
    geometry = geometry_of(tiny_llama_path)
    config.validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    assert config.uses_widths("k") and config.uses_widths("v")
    assert (config.sink_tokens, config.recent_window) == (1, 2)
    assert config.target_memory_reduction >= 0.875
    summary = (output / "compression_config_summary.txt").read_text()
    assert "bits per element" in summary and "dNLL" in summary

    results = tmp_path / "results"
    code = main(
        tiny_calibrate_args(
            tiny_llama_path, results, "--compressor", "pca", "--config", str(output / "compression_config.json")
        )
    )
    assert code == 0
    saved = json.loads((results / "calibration_results_pca.json").read_text())
    assert tuple(saved["compression_config"]["per_layer_head"]["0/0"]["bits_k"]) == config.head(0, 0, HEAD_DIM).bits_k
    assert saved["compression_config"] == json.loads((output / "compression_config.json").read_text())


def test_calibrate_with_a_target_measures_allocates_and_calibrates(tiny_llama_path, tmp_path, capsys, kvlight_cache):
    output = tmp_path / "out"
    extra = ["--compressor", "pca", "--target-memory-reduction", "0.75", "--sink-tokens", "1", "--recent-window", "2"]
    code = main(tiny_calibrate_args(tiny_llama_path, output, *extra, "--model-dtype", "bfloat16"))
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "Allocated widths:" in stdout
    results = json.loads((output / "calibration_results_pca.json").read_text())
    config = CompressionConfig.from_dict(results["compression_config"])
    geometry = geometry_of(tiny_llama_path)
    assert config.uses_widths("k") and config.uses_widths("v")
    assert (config.sink_tokens, config.recent_window) == (1, 2)
    reduction = config.memory_reduction(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    assert 0.75 <= reduction < 0.78  # within a step and the packing padding of a 2-layer model
    assert (output / "fim_metrics.json").stat().st_size > 0
    # The checkpoint describes the allocated config alone: validate rebuilds it without measuring again.
    from kvlight.calibration.module import KVCalibrationModule

    module = KVCalibrationModule.load_from_checkpoint(output / "checkpoints" / "last.ckpt")
    assert module.hparams.compression["target_memory_reduction"] is None and not module.allocation_pending
    assert module.compressor.config.to_dict() == config.to_dict()
    # Exact tokens aside, the cache stores what the allocation promised (against a 16-bit cache: the model is bf16).
    saved = results["memory_savings_pct"]
    assert 100 * reduction - 25 < saved < 100 * reduction  # 3 of 32 tokens exact, plus positions


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--target-memory-reduction", "0.75", "--rank", "8"], "does not combine with --rank (give one or the other)"),
        (["--target-memory-reduction", "1.5"], "strictly between 0 and 1"),
        (["--target-memory-reduction", "nan"], "strictly between 0 and 1"),
    ],
)
def test_calibrate_bad_target_is_one_line_exit_2(extra, message, tiny_llama_path, tmp_path, capfd, kvlight_cache):
    output = tmp_path / "out"
    code = main(tiny_calibrate_args(tiny_llama_path, output, *extra))
    assert code == 2
    assert message in one_error_line(capfd.readouterr().err)
    assert not any(p.is_file() for p in output.rglob("*")) if output.exists() else True


def test_analyze_bits_without_distortions_is_one_line_exit_2(tiny_llama_path, tmp_path, capfd):
    csv_file = tmp_path / "m.csv"
    geometry = geometry_of(tiny_llama_path)
    lines = ["layer,head,trace,cond"] + [
        f"{layer},{head},0.5,10" for layer in range(geometry.num_layers) for head in range(geometry.num_kv_heads)
    ]
    csv_file.write_text("\n".join(lines) + "\n")
    code = main(["analyze", "--model", tiny_llama_path, "--metrics-file", str(csv_file), "--strategy", "bits",
                 "--target-memory-reduction", "0.875", "--output-dir", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    assert "per-width distortions" in one_error_line(capfd.readouterr().err)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

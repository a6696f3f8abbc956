"""The Fisher-whitened basis (kvlight.analysis.whitening) and the "fisher-white" bits weighting.

What must hold: with a white Fisher the whitened transform is PCA; the sensitivity pass measures each head's Fisher
matrix consistently with its diagonal in the principal basis; the whitened coordinates' tables survive a metrics
file; on the tiny models widths in the whitened basis lose less than widths in the principal basis at the same
bytes; ``kvlight calibrate --bits-weighting fisher-white`` fits KVSplice heads in that basis; and what cannot serve
it (PCA heads, a config file from analyze, metrics without the matrices) is refused in one line, exit 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import HEAD_DIM, one_error_line, tiny_calibrate_args

from kvlight.analysis.bit_allocation import allocate_bits
from kvlight.analysis.metrics_io import HeadMetrics, metrics_from_json_data, metrics_to_json, read_metrics_file
from kvlight.analysis.whitening import (
    WHITEN_EPS,
    fisher_weights,
    regularised_fisher,
    whitened_transform,
)
from kvlight.cli import main
from kvlight.compressors.compressor import KVCompressor
from kvlight.compressors.widths import WIDTHS
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError
from kvlight.geometry import kv_geometry
from kvlight.models import geometry_of


def random_covariance(dim: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factor = torch.randn(dim, dim, generator=generator, dtype=torch.float64)
    scales = torch.logspace(0, -3, dim, dtype=torch.float64)
    return factor @ torch.diag(scales) @ factor.T


@pytest.mark.parametrize("scale", [1e-6, 1.0, 1e4])
def test_a_white_fisher_gives_the_principal_basis(scale):
    covariance = random_covariance(12, 0)
    encoder, decoder, std = whitened_transform(covariance, scale * torch.eye(12, dtype=torch.float64))
    eigenvalues, vectors = torch.linalg.eigh(covariance)
    # The same directions by descending variance (up to sign), an orthonormal decoder, the principal stds.
    assert torch.allclose(encoder.abs(), vectors.flip(-1).T.abs(), atol=1e-9)
    assert torch.allclose(decoder, encoder.T, atol=1e-9)
    assert torch.allclose(std**2, eigenvalues.flip(-1), rtol=1e-6)


def test_the_regularised_fisher_is_symmetric_positive_definite_of_trace_d():
    generator = torch.Generator().manual_seed(1)
    grads = torch.randn(3, 5, 8, generator=generator, dtype=torch.float64)  # rank 5 < 8: G singular
    gram = torch.einsum("hnd,hne->hde", grads, grads)
    weight = regularised_fisher(gram)
    assert torch.equal(weight, weight.transpose(-1, -2))
    eigenvalues = torch.linalg.eigvalsh(weight)
    assert (eigenvalues.min(-1).values >= WHITEN_EPS / (1 + WHITEN_EPS) * (1 - 1e-9)).all()  # the ridge
    assert torch.allclose(weight.diagonal(dim1=-2, dim2=-1).sum(-1), torch.full((3,), 8.0, dtype=torch.float64))
    # A scaled Fisher gives the same weight: the closed form does not depend on the gradients' units.
    assert torch.allclose(regularised_fisher(1e-6 * gram), weight)
    assert torch.equal(regularised_fisher(torch.zeros(2, 4, 4)), torch.eye(4, dtype=torch.float64).expand(2, 4, 4))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_measured_fisher_matrices_agree_with_the_principal_fisher(arch, analyze_metrics_files, tiny_model_paths):
    geometry = geometry_of(tiny_model_paths[arch])
    metrics = read_metrics_file(analyze_metrics_files[arch], geometry)
    shape = (geometry.num_layers, geometry.num_kv_heads, HEAD_DIM)
    for kind in "kv":
        gram = metrics.curves[f"fgram_{kind}"]
        assert gram.shape == (*shape, HEAD_DIM)
        assert np.allclose(gram, np.swapaxes(gram, -1, -2))
        assert (np.linalg.eigvalsh(gram) > -1e-9 * np.abs(gram).max()).all()  # PSD
        assert metrics.curves[f"wdist_{kind}"].shape == (*shape, len(WIDTHS))
        assert (np.diff(metrics.curves[f"wdist_{kind}"], axis=-1) <= 0).all()  # more bits never measure worse
        assert (metrics.curves[f"wfisher_{kind}"] > 0).all()
        # Both are sums over the same rows and gradients: the diagonal of G in the principal basis is fisher_*.
        # (The principal basis is not stored; the trace is basis-free.)
        trace = np.trace(gram, axis1=-2, axis2=-1)
        assert np.allclose(trace, metrics.curves[f"fisher_{kind}"].sum(-1), rtol=1e-6)
    assert metrics.info["whiten_eps"] == WHITEN_EPS


def test_whitened_tables_survive_a_metrics_file(analyze_metrics_files, tiny_model_paths):
    geometry = geometry_of(tiny_model_paths["llama"])
    metrics = read_metrics_file(analyze_metrics_files["llama"], geometry)
    again = metrics_from_json_data(json.loads(metrics_to_json(metrics)), geometry, "memory")
    for name in ("fgram_k", "fgram_v", "wdist_k", "wdist_v", "wfisher_k", "wfisher_v"):
        assert np.array_equal(again.curves[name], metrics.curves[name]), name
    # A matrix of the wrong size is refused in one line, naming it.
    data = json.loads(metrics_to_json(metrics))
    data["heads"][0]["fgram_k"] = data["heads"][0]["fgram_k"][:-1]
    with pytest.raises(Exception, match=f"fgram_k of layer 0 head 0 must be {HEAD_DIM} lists of {HEAD_DIM} numbers"):
        metrics_from_json_data(data, geometry, "memory")


def fit_white(model, metrics, rows, target: float) -> KVCompressor:
    geometry = kv_geometry(model)
    compressor = KVCompressor(allocate_bits(metrics, target, "fisher-white").to_config("kvsplice"), geometry)
    keys, values = rows
    compressor.fit_statistics([{"keys": keys, "values": values}], *fisher_weights(metrics))
    return compressor


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_whitened_basis_loses_less_than_the_principal_one(
    arch, analyze_metrics_files, tiny_model_paths, tiny_models, tiny_rows, tiny_windows
):
    from test_bit_allocation import kl_of

    model, geometry = tiny_models[arch], geometry_of(tiny_model_paths[arch])
    metrics = read_metrics_file(analyze_metrics_files[arch], geometry)
    keys, values = tiny_rows[arch]["calib"]
    white, principal = [], []
    for target in (0.75, 0.875, 0.9375):
        white.append(kl_of(model, fit_white(model, metrics, (keys, values), target), tiny_windows["eval"]))
        compressor = KVCompressor(allocate_bits(metrics, target, "fisher").to_config("pca"), geometry)
        compressor.fit_statistics([{"keys": keys, "values": values}])
        principal.append(kl_of(model, compressor, tiny_windows["eval"]))
    assert white == sorted(white), white  # fewer bytes, more divergence
    assert sum(white) < sum(principal), (white, principal)


def test_the_whitened_allocation_needs_kvsplice_and_the_matrices(analyze_metrics_files, tiny_model_paths):
    geometry = geometry_of(tiny_model_paths["llama"])
    metrics = read_metrics_file(analyze_metrics_files["llama"], geometry)
    allocation = allocate_bits(metrics, 0.875, "fisher-white")
    with pytest.raises(ConfigError, match="only KVSplice heads serve"):
        allocation.to_config("pca")
    bare = HeadMetrics(
        geometry,
        metrics.trace,
        metrics.eigmax,
        metrics.cond,
        {k: v for k, v in metrics.curves.items() if not k.startswith(("fgram", "wdist", "wfisher"))},
    )
    with pytest.raises(ConfigError, match="whitened distortions"):
        allocate_bits(bare, 0.875, "fisher-white")
    with pytest.raises(ConfigError, match="Fisher matrices"):
        fisher_weights(bare)


# ---------------------------------------------------------------------- the commands
def test_calibrate_fisher_white_fits_kvsplice_heads_in_the_whitened_basis(
    tiny_llama_path, tmp_path, capsys, kvlight_cache
):
    output = tmp_path / "out"
    extra = ["--target-memory-reduction", "0.8125", "--bits-weighting", "fisher-white", "--model-dtype", "float32"]
    code = main(tiny_calibrate_args(tiny_llama_path, output, *extra))
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "fisher-white" in stdout
    results = json.loads((output / "calibration_results_kvsplice.json").read_text())
    config = CompressionConfig.from_dict(results["compression_config"])
    geometry = geometry_of(tiny_llama_path)
    heads = config.heads(geometry.num_layers, geometry.num_kv_heads, HEAD_DIM)
    assert config.uses_widths("k") and {spec.algo for _, _, spec in heads} == {"kvsplice"}
    # The fitted heads are the whitened transform of the calibration statistics, not PCA: their decoders are not
    # orthonormal, and the metrics the allocation used hold the Fisher they were fitted with.
    from kvlight.calibration.module import KVCalibrationModule

    module = KVCalibrationModule.load_from_checkpoint(output / "checkpoints" / "last.ckpt")
    # ... and trained after the statistics epoch (the provisional config before the allocation is PCA, which once
    # made calibrate stop after the statistics epoch).
    checkpoint = torch.load(output / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["epoch"] >= 1 and checkpoint["global_step"] > 0, (checkpoint["epoch"], checkpoint["global_step"])
    head = module.compressor.codec(0, "k").heads[0]
    gram = head.expand.detach().double().T @ head.expand.detach().double()
    assert not torch.allclose(gram, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-3)
    metrics = json.loads((output / "fim_metrics.json").read_text())
    assert "fgram_k" in metrics["heads"][0]
    assert results["baseline_perplexity"] <= results["compressed_perplexity"] < 10 * results["baseline_perplexity"]


@pytest.mark.parametrize(
    "command,extra,message",
    [
        ("calibrate", ["--compressor", "pca"], "only KVSplice heads serve, not pca"),
        ("calibrate", ["--key-objective", "query"], "does not combine with --key-objective query"),
        ("analyze", ["--strategy", "bits"], "run kvlight calibrate --bits-weighting fisher-white"),
    ],
)
def test_what_cannot_serve_a_whitened_allocation_is_one_line_exit_2(
    command, extra, message, tiny_llama_path, tmp_path, capfd, kvlight_cache
):
    output = tmp_path / "out"
    weighting = ["--bits-weighting", "fisher-white"]
    if command == "calibrate":
        argv = tiny_calibrate_args(tiny_llama_path, output, *weighting, *extra)
    else:
        argv = ["analyze", "--model", tiny_llama_path, "--output-dir", str(output), *weighting, *extra]
    assert main(argv) == 2
    assert message in one_error_line(capfd.readouterr().err)
    assert not output.exists() or not any(p.is_file() for p in output.rglob("*"))

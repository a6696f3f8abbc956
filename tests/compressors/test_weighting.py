"""Query-weighted keys (kvlight.compressors.weighting): the closed form minimises the score error attention sees.

On the tiny Llama (GQA + RoPE): the RoPE matrix is the model's own rotation, identity weights give PCA, the capture
pass measures the queries the model really forms, and on held-out rows the weighted projection has a lower
query-weighted error than PCA at the price of a higher plain MSE.
"""

import json

import pytest
import torch
from helpers import HEAD_DIM

from kvlight.analysis.queries import QueryMoments
from kvlight.calibration.capture import capture_kv
from kvlight.calibration.options import grouped
from kvlight.compressors.base import principal_basis
from kvlight.compressors.compressor import KVCompressor
from kvlight.compressors.weighting import rope_rotation, score_weight, weighted_projection
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError
from kvlight.geometry import kv_geometry
from kvlight.models import decoder_blocks, rotary_module
from kvlight.serving.positions import PositionTracker


@pytest.fixture(scope="module")
def llama_queries(tiny_models, tiny_windows):
    """(rows {"keys", "values"} [N, L, H, D], E[q q^T] [L, H, D, D]) from one capture pass over the calibration windows."""
    model = tiny_models["llama"]
    geometry = kv_geometry(model)
    queries = QueryMoments(geometry)
    windows = tiny_windows["calib"]
    reservoir = capture_kv(
        model, geometry, [windows[i : i + 4] for i in range(0, 16, 4)], 100_000, queries=queries, progress=False
    )
    keys, values = reservoir.rows()
    return {"keys": keys, "values": values}, queries.mean()


@pytest.mark.parametrize("position", [0, 1, 7, 31])
def test_rope_rotation_is_the_models_rotation(position, tiny_models):
    model = tiny_models["llama"]
    tracker = PositionTracker(model)
    try:
        keys = torch.randn(1, 1, 1, HEAD_DIM, generator=torch.Generator().manual_seed(position))
        expected = tracker.rotate(keys, torch.tensor([[position]]))[0, 0, 0].double()
    finally:
        tracker.close()
    got = rope_rotation(position, rotary_module(model).inv_freq) @ keys[0, 0, 0].double()
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rank", [1, 4, 12])
def test_identity_weight_gives_pca(rank):
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(500, HEAD_DIM, generator=generator, dtype=torch.float64) * torch.linspace(
        3, 0.1, HEAD_DIM, dtype=torch.float64
    )
    covariance = torch.cov(x.T)
    encoder, decoder, std = weighted_projection(covariance, torch.eye(HEAD_DIM, dtype=torch.float64), rank)
    basis = principal_basis(covariance, rank)
    torch.testing.assert_close(decoder @ decoder.T, basis @ basis.T, atol=1e-9, rtol=0)  # same subspace
    torch.testing.assert_close(encoder, decoder.T, atol=1e-9, rtol=0)  # orthonormal: encode = decode^T
    torch.testing.assert_close(std**2, torch.linalg.eigvalsh(covariance).flip(0)[:rank], atol=1e-9, rtol=1e-9)


def test_capture_pass_measures_the_models_queries(tiny_models, tiny_windows, llama_queries):
    model = tiny_models["llama"]
    _, moments = llama_queries
    block = decoder_blocks(model)[0]
    with torch.no_grad():
        # The first block's input is the token embedding (output_hidden_states would leave capture hooks on the
        # shared model in transformers 5).
        hidden = model.get_input_embeddings()(tiny_windows["calib"])
        q = block.self_attn.q_proj(block.input_layernorm(hidden)).double()
    geometry = kv_geometry(model)
    q = q.reshape(-1, geometry.num_kv_heads, q.shape[-1] // (geometry.num_kv_heads * HEAD_DIM), HEAD_DIM)
    expected = torch.einsum("nhgd,nhge->hde", q, q) / (q.shape[0] * q.shape[2])
    torch.testing.assert_close(moments[0], expected, rtol=1e-6, atol=1e-8)


def test_weighted_keys_trade_plain_error_for_score_error(tiny_models, tiny_rows, llama_queries):
    rows, moments = llama_queries
    weights = score_weight(moments, rotary_module(tiny_models["llama"]).inv_freq, window=32)
    heldout = tiny_rows["llama"]["heldout"][0].double()  # keys [N, L, H, D]
    rank, score_gain, mse_cost = 4, 0.0, 0.0
    for layer in range(heldout.shape[1]):
        for head in range(heldout.shape[2]):
            train = rows["keys"][:, layer, head].double()
            mean, covariance = train.mean(0), torch.cov(train.T)
            x = heldout[:, layer, head] - mean
            basis = principal_basis(covariance, rank)
            pca_error = x - x @ basis @ basis.T
            encoder, decoder, _ = weighted_projection(covariance, weights[layer, head], rank)
            weighted_error = x - x @ encoder.T @ decoder.T
            score = lambda e: torch.einsum("nd,de,ne->", e, weights[layer, head], e) / len(e)  # noqa: E731
            score_gain += float(score(pca_error) - score(weighted_error))
            mse_cost += float((weighted_error**2).sum() - (pca_error**2).sum()) / len(x)
    assert score_gain > 0 and mse_cost > 0


def test_score_weight_options():
    moments = torch.eye(HEAD_DIM, dtype=torch.float64)[None] * 2
    assert torch.equal(score_weight(moments, None), moments)  # no RoPE: the query moments themselves
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))
    torch.testing.assert_close(score_weight(moments, inv_freq, window=16), moments)  # isotropic queries stay so
    with pytest.raises(ValueError, match="weighting must be one of"):
        score_weight(moments, inv_freq, weighting="far")


@pytest.mark.parametrize("algo", ["pca", "kvsplice"])
def test_compressor_starts_keys_from_the_weighted_form(algo, tiny_models, llama_queries):
    rows, moments = llama_queries
    geometry = kv_geometry(tiny_models["llama"])
    weights = score_weight(moments, rotary_module(tiny_models["llama"]).inv_freq, window=32)
    config = CompressionConfig.uniform(
        geometry.num_layers, geometry.num_kv_heads, HEAD_DIM, rank_k=4, rank_v=8, algo=algo
    )
    compressor = KVCompressor(config, geometry, algo=algo)
    if algo == "pca":
        with pytest.raises(ConfigError, match="query-weighted keys need KVSplice heads"):
            compressor.fit_statistics([rows], key_weights=weights)
        return
    compressor.fit_statistics([rows], key_weights=weights)
    plain = KVCompressor(config, geometry, algo=algo)
    plain.fit_statistics([rows])
    keys = rows["keys"][:, 1, 0].double()
    encoder, decoder, std = weighted_projection(torch.cov(keys.T), weights[1, 0], 4)
    head = compressor.codec(1, "k").heads[0]
    torch.testing.assert_close(head.compress.double(), encoder, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.expand.double(), decoder, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(head.latent_std.double(), std, atol=1e-4, rtol=1e-3)
    for name, value in plain.codec(1, "v").state_dict().items():  # values keep the plain fit
        assert torch.equal(compressor.codec(1, "v").state_dict()[name], value), name


def test_calibrate_with_query_weighted_keys(tmp_path, tiny_llama_path, tiny_rows, kvlight_cache, capsys):
    """``kvlight calibrate --key-objective query``: queries measured in the capture pass, keys fitted by the score
    error: lower query-weighted held-out error than the plain fit of the same run settings, plain MSE higher."""
    from helpers import tiny_calibrate_args

    from kvlight.calibration.module import KVCalibrationModule
    from kvlight.cli import main

    fitted = {}
    for objective in ("mse", "query"):
        output = tmp_path / objective
        extra = [
            "--compressor",
            "kvsplice",
            "--rank-k",
            "4",
            "--rank-v",
            "8",
            "--epochs",
            "2",
            "--key-objective",
            objective,
        ]
        extra += ["--latent-bits", "4", "--quant-group-size", "4", "--score-window", "64"]
        assert main(tiny_calibrate_args(tiny_llama_path, output, *extra)) == 0
        results = json.loads((output / "calibration_results_kvsplice.json").read_text())
        assert results["key_objective"] == objective
        assert results["compression_config"]["global"]["quant_group_size"] == 4
        fitted[objective] = KVCalibrationModule.load_from_checkpoint(output / "checkpoints" / "last.ckpt").compressor
    capsys.readouterr()
    captures = list(kvlight_cache.rglob("query_moments.pt"))
    assert len(captures) == 1  # the query run measured queries next to its shards (the mse run did not)

    keys, values = tiny_rows["llama"]["heldout"]
    saved = torch.load(captures[0], weights_only=True)
    from kvlight.models import load_model

    model = load_model(tiny_llama_path)
    weights = score_weight(saved["sums"] / saved["count"], rotary_module(model).inv_freq, window=64)
    with torch.no_grad():
        score = {
            k: float(c.reconstruction_loss(keys, torch.zeros_like(values), weights.float())) for k, c in fitted.items()
        }
        plain = {k: float(c.reconstruction_loss(keys, torch.zeros_like(values))) for k, c in fitted.items()}
    assert score["query"] < score["mse"] and plain["query"] > plain["mse"], (score, plain)


def test_query_objective_needs_kvsplice(tiny_llama_path):
    from kvlight.calibration.module import KVCalibrationModule

    with pytest.raises(ConfigError, match="key_objective query needs KVSplice"):
        KVCalibrationModule(model=tiny_llama_path, **grouped(compressor="pca", rank=4, key_objective="query"))
    with pytest.raises(ConfigError, match="must be one of"):
        KVCalibrationModule(model=tiny_llama_path, **grouped(compressor="kvsplice", rank=4, key_objective="cosine"))
    with pytest.raises(ConfigError, match="score_window must be a positive"):
        KVCalibrationModule(
            model=tiny_llama_path, **grouped(compressor="kvsplice", rank=4, key_objective="query", score_window=0)
        )

"""Keys coded relative to the RoPE of their block (``key_rope_block``): the capture, the config, calibration end to end.

A key of slot ``t`` is stored rotated back by the angle of slot ``t - t % B`` (1: by its own, pre-RoPE). Every pass
that sees keys (capture, sensitivity, distillation, the cache) must agree on that, or the fitted basis would not be
the basis of what the cache stores.
"""

import json

import pytest
import torch
from helpers import one_error_line, tiny_calibrate_args

from kvlight.calibration.capture import capture_kv
from kvlight.cli import main
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError
from kvlight.geometry import kv_geometry


def _rows(model, windows, block):
    geometry = kv_geometry(model)
    blocks = (block,) * geometry.num_layers
    reservoir = capture_kv(model, geometry, [windows], capacity=100_000, progress=False, seed=0, rope_blocks=blocks)
    return reservoir.rows()


@pytest.mark.parametrize("block", [2, 4, 16])
def test_a_blocks_first_key_is_its_pre_rope_key_and_the_others_are_turned(block, tiny_models, tiny_windows):
    """Captured one window at a time (rows in token order), the first key of each block is the pre-RoPE key, the
    others the pre-RoPE key turned by their distance to the block's first token; values are untouched."""
    model, window = tiny_models["llama"], tiny_windows["eval"][:1]
    pre_keys, pre_values = _rows(model, window, 1)
    keys, values = _rows(model, window, block)
    starts = torch.arange(window.shape[1]) % block == 0
    torch.testing.assert_close(keys[starts], pre_keys[starts], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(keys[~starts], pre_keys[~starts], atol=1e-3)
    torch.testing.assert_close(keys.norm(dim=-1), pre_keys.norm(dim=-1), atol=1e-4, rtol=1e-4)  # a rotation
    assert torch.equal(values, pre_values)


def test_gpt2_keys_are_the_same_whatever_the_block(tiny_models, tiny_windows):
    """Without RoPE there is nothing to turn: every block codes the keys attention reads."""
    model, window = tiny_models["gpt2"], tiny_windows["eval"][:1]
    assert torch.equal(_rows(model, window, 1)[0], _rows(model, window, 4)[0])


@pytest.mark.parametrize(
    "value,error",
    [(0, "key_rope_block"), (-3, "key_rope_block"), ("16", "key_rope_block"), (True, "key_rope_block"),
     ([16, 0], "key_rope_block"), ([], "key_rope_block")],
)  # fmt: skip
def test_bad_key_rope_blocks_are_one_line_config_errors(value, error):
    with pytest.raises(ConfigError, match=error):
        CompressionConfig.from_dict({"global": {"key_rope_block": value}})


def test_key_rope_block_round_trips_and_lists_one_per_layer():
    config = CompressionConfig.from_dict({"global": {"key_rope_block": [16, 16]}})
    assert config.key_rope_block == 16  # one number where every layer agrees
    assert config.rope_blocks(2) == (16, 16)
    mixed = CompressionConfig.from_dict({"global": {"key_rope_block": [1, 16], "num_layers": 2}})
    assert mixed.rope_blocks() == (1, 16)
    assert CompressionConfig.from_dict(mixed.to_dict()).rope_blocks() == (1, 16)
    assert "key_rope_block" not in CompressionConfig().to_dict()["global"]  # the default stays out of the JSON
    with pytest.raises(ConfigError, match="lists 2 layers but the model has 3"):
        CompressionConfig.from_dict({"global": {"key_rope_block": [1, 16]}}).validate(3, 2, 16)


@pytest.mark.parametrize("block", [1, 4])
def test_full_rank_calibration_in_rope_blocks_reproduces_the_model(
    block, tmp_path, tiny_llama_path, kvlight_cache, capsys
):
    """``kvlight calibrate --key-rope-block`` at full rank: the capture, the fit and the served cache agree on the
    keys, so the compressed perplexity is the model's; the compressor's config records the block."""
    out = tmp_path / "out"
    args = tiny_calibrate_args(tiny_llama_path, out, "--compressor", "pca", "--rank", "16", "--sink-tokens", "0")
    assert main([*args, "--key-rope-block", str(block), "--model-dtype", "float32"]) == 0
    results = json.loads((out / "calibration_results_pca.json").read_text())
    assert results["compressed_perplexity"] == pytest.approx(results["baseline_perplexity"], rel=1e-5)
    config = json.loads((out / "compression_config_pca.json").read_text())
    assert config["global"].get("key_rope_block", 1) == block
    saved = json.loads((out / "compressor_pca" / "compressor_config.json").read_text())
    assert saved["compression_config"]["global"].get("key_rope_block", 1) == block


def test_allocated_widths_in_rope_blocks_keep_the_block(tmp_path, tiny_llama_path, kvlight_cache, capsys):
    """The default allocation measures the model's sensitivity with keys coded as the cache will code them, and the
    allocated config keeps the block; the cache holds the bytes asked for."""
    out = tmp_path / "out"
    args = tiny_calibrate_args(tiny_llama_path, out, "--compressor", "pca", "--sensitivity-samples", "2")
    assert main([*args, "--key-rope-block", "4", "--target-memory-reduction", "0.75"]) == 0
    config = json.loads((out / "compression_config_pca.json").read_text())
    assert config["global"]["key_rope_block"] == 4
    metrics = json.loads((out / "fim_metrics.json").read_text())
    assert metrics["info"]["key_rope_block"] == 4
    results = json.loads((out / "calibration_results_pca.json").read_text())
    assert results["memory_savings_vs_fp16_pct"] > 60  # widths at 25 % of fp16 plus the exact sinks of 32 tokens
    assert results["compressed_perplexity"] < 1.2 * results["baseline_perplexity"]


@pytest.mark.parametrize("value", ["0", "-1", "sixteen", "1.5"])
def test_bad_key_rope_block_flag_is_one_line_exit_2(value, tmp_path, tiny_llama_path, kvlight_cache, capfd):
    out = tmp_path / "out"
    assert main([*tiny_calibrate_args(tiny_llama_path, out), "--key-rope-block", value]) == 2
    assert "key-rope-block" in one_error_line(capfd.readouterr().err).replace("_", "-")
    assert not out.exists()


#: (extra flags, backend written, weighting printed, key block): the recommended default is Fisher-whitened widths
#: (KVSplice heads) with keys in RoPE blocks of 16; PCA cannot serve a whitened basis and gets joint-Fisher widths in
#: the same blocks; explicit flags win.
DEFAULTS = [
    ([], "kvsplice", "fisher-white", 16),
    (["--compressor", "pca"], "pca", "fisher-joint", 16),
    (["--compressor", "pca", "--bits-weighting", "fisher", "--key-rope-block", "1"], "pca", "fisher", 1),
]


@pytest.mark.parametrize("extra,algo,weighting,block", DEFAULTS, ids=["default", "pca", "explicit"])
def test_the_default_allocation_is_the_recommended_one_its_backend_serves(
    extra, algo, weighting, block, tmp_path, tiny_llama_path, kvlight_cache, capsys
):
    out = tmp_path / "out"
    args = tiny_calibrate_args(tiny_llama_path, out, "--sensitivity-samples", "2", "--epochs", "1", *extra)
    assert main([*args, "--model-dtype", "float32"]) == 0
    assert f"bits per element ({weighting}," in capsys.readouterr().out
    config = json.loads((out / f"compression_config_{algo}.json").read_text())
    assert config["global"].get("key_rope_block", 1) == block
    results = json.loads((out / f"calibration_results_{algo}.json").read_text())
    assert results["compressed_perplexity"] < 1.2 * results["baseline_perplexity"]

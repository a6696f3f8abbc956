"""Compression configs: every mistake is a one-line ConfigError naming its key (API and CLI), valid configs
round-trip, and ``kvlight config uniform`` writes a config the rest of kvlight accepts."""

import json

import pytest
from helpers import HEAD_DIM, one_error_line

from kvlight.cli import main
from kvlight.compressors.compressor import KVCompressor
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError
from kvlight.models import geometry_of

# The tiny Llama: 2 layers, 2 KV heads, head_dim 16.
GOOD_HEAD = {"enabled": True, "rank": 8, "algo": "pca", "d_k": 16, "d_v": 16}


def config_with(head_key="0/0", head=None, **glob):
    return {
        "global": {"target_memory_reduction": 0.5, "d_head": 16, "algo_default": "pca", **glob},
        "per_layer_head": {head_key: GOOD_HEAD if head is None else head},
    }


#: case -> (config JSON text, fragments the one-line message must contain). Parsing and geometry checks alike.
BAD_CONFIGS = {
    "rank_zero": (config_with(head={"rank": 0}), ['"0/0"', "rank"]),
    "rank_above_head_dim": (config_with(head={"rank": HEAD_DIM + 1}), ['"0/0"', "rank", "1..16"]),
    "rank_k_above_head_dim": (config_with(head={"rank_k": 40, "rank_v": 4}), ['"0/0"', "rank_k"]),
    "rank_v_negative": (config_with(head={"rank_v": -3}), ['"0/0"', "rank_v"]),
    "rank_not_int": (config_with(head={"rank": 4.5}), ['"0/0"', "rank"]),
    "rank_bool": (config_with(head={"rank": True}), ['"0/0"', "rank"]),
    "unknown_head_algo": (config_with(head={"algo": "svd"}), ['"0/0"', "algo", "svd"]),
    "unknown_default_algo": (config_with(algo_default="svd"), ["global.algo_default", "svd"]),
    "layer_out_of_range": (config_with(head_key="2/0"), ['"2/0"', "layer 2"]),
    "head_out_of_range": (config_with(head_key="1/2"), ['"1/2"', "head 2"]),
    "d_head_not_the_models": (config_with(d_head=64), ["global.d_head", "64", "16"]),
    "d_k_not_the_models": (config_with(head={"rank": 4, "d_k": 32}), ['"0/0"', "d_k"]),
    "num_layers_not_the_models": (config_with(num_layers=30), ["global.num_layers"]),
    "malformed_key_dash": (config_with(head_key="0-1"), ["per_layer_head key", "0-1"]),
    "malformed_key_three_parts": (config_with(head_key="0/1/2"), ["per_layer_head key", "0/1/2"]),
    "malformed_key_name": (config_with(head_key="layer0/head0"), ["per_layer_head key", "layer0/head0"]),
    "unknown_head_key": (config_with(head={"rank": 4, "ranks": 4}), ['"0/0"', "ranks"]),
    "unknown_global_key": (config_with(rank=4), ["global.rank"]),
    "unknown_top_level_key": ({"global": {}, "per_layer_head": {}, "extra": 1}, ["extra"]),
    "enabled_not_bool": (config_with(head={"enabled": "yes"}), ['"0/0"', "enabled"]),
    "reduction_out_of_range": (config_with(target_memory_reduction=1.5), ["global.target_memory_reduction"]),
    "reduction_not_number": (config_with(target_memory_reduction="half"), ["global.target_memory_reduction"]),
    "sink_negative": (config_with(sink_tokens=-1), ["global.sink_tokens"]),
    "head_not_object": (config_with(head=8), ['"0/0"']),
    "global_not_object": ({"global": [1, 2]}, ["'global'"]),
    "per_layer_head_not_object": ({"global": {}, "per_layer_head": ["0/0"]}, ["'per_layer_head'"]),
    "not_an_object": ([1, 2, 3], ["JSON object"]),
}
BAD_JSON = {
    "truncated_json": ('{"global": {"d_head": 16', ["not valid JSON"]),
    "empty_file": ("", ["not valid JSON"]),
    "not_utf8": (b"\xff\xfe\x00garbage", ["not UTF-8"]),
}
ALL_BAD = [pytest.param(case) for case in [*BAD_CONFIGS, *BAD_JSON]]


def _write(tmp_path, content) -> str:
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content)
    else:
        path.write_text(json.dumps(content))
    return str(path)


def _load_and_validate(path):
    return CompressionConfig.from_json(path).validate(num_layers=2, num_kv_heads=2, head_dim=HEAD_DIM)


@pytest.mark.parametrize("case", ALL_BAD)
def test_bad_config_is_a_config_error_naming_the_key(case, tmp_path):
    content, fragments = {**BAD_CONFIGS, **BAD_JSON}[case]
    with pytest.raises(ConfigError) as error:
        _load_and_validate(_write(tmp_path, content))
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize(
    "case",
    ["rank_above_head_dim", "unknown_head_algo", "layer_out_of_range", "d_head_not_the_models", "truncated_json"],
)
def test_bad_config_through_calibrate_is_one_line_exit_2(case, tmp_path, tiny_llama_path, kvlight_cache, capfd):
    content, fragments = {**BAD_CONFIGS, **BAD_JSON}[case]
    output = tmp_path / "out"
    argv = ["calibrate", "--model", tiny_llama_path, "--compression-config", _write(tmp_path, content),
            "--output-dir", str(output)]  # fmt: skip
    assert main(argv) == 2
    line = one_error_line(capfd.readouterr().err)
    for fragment in fragments:
        assert fragment in line
    assert not [p for p in output.rglob("*") if p.is_file()]
    assert not kvlight_cache.exists()


def test_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read compression config"):
        CompressionConfig.from_json(tmp_path / "nope.json")


# ---------------------------------------------------------------------- valid configs
ROUND_TRIP = {
    "seed_schema": {
        "global": {"target_memory_reduction": 0.5, "d_head": 16, "algo_default": "kvsplice"},
        "per_layer_head": {"0/0": {"enabled": True, "rank": 12, "algo": "pca", "d_k": 16, "d_v": 16}},
    },
    "split_ranks_and_disabled": {
        "global": {"target_memory_reduction": 0.75, "algo_default": "pca", "sink_tokens": 4, "recent_window": 8},
        "per_layer_head": {"1/1": {"rank_k": 3, "rank_v": 9}, "0/1": {"enabled": False}},
    },
}


@pytest.mark.parametrize("case", list(ROUND_TRIP))
def test_config_round_trips_through_json(case, tmp_path):
    config = CompressionConfig.from_dict(ROUND_TRIP[case]).validate(2, 2, HEAD_DIM)
    config.to_json(tmp_path / "c.json")
    again = CompressionConfig.from_json(tmp_path / "c.json")
    assert again.to_dict() == config.to_dict()
    assert list(again.heads(2, 2, HEAD_DIM)) == list(config.heads(2, 2, HEAD_DIM))


def test_unlisted_heads_take_the_global_default():
    config = CompressionConfig.from_dict(ROUND_TRIP["split_ranks_and_disabled"]).validate(2, 2, HEAD_DIM)
    default = config.head(0, 0)
    assert (default.enabled, default.algo, default.rank_k, default.rank_v) == (True, "pca", 4, 4)  # 16 * (1 - 0.75)
    assert not config.head(0, 1).enabled
    assert (config.head(1, 1).rank_k, config.head(1, 1).rank_v) == (3, 9)
    # Latent numbers kept: heads (0,0), (1,0) at 4+4, (1,1) at 3+9, (0,1) exact at 32; of 4 heads x 32.
    assert config.memory_reduction(2, 2, HEAD_DIM) == pytest.approx(1 - (8 + 8 + 12 + 32) / 128)


@pytest.mark.parametrize("rank_k,rank_v", [(8, 8), (4, 12), (16, 16), (1, 1)])
def test_uniform_memory_reduction(rank_k, rank_v):
    config = CompressionConfig.uniform(2, 2, HEAD_DIM, rank_k=rank_k, rank_v=rank_v)
    assert config.memory_reduction(2, 2, HEAD_DIM) == pytest.approx(1 - (rank_k + rank_v) / (2 * HEAD_DIM))


# ---------------------------------------------------------------------- kvlight config uniform
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_config_uniform_writes_a_valid_config(arch, tmp_path, tiny_model_paths, capsys):
    path = tmp_path / "sub" / "cfg.json"
    model = tiny_model_paths[arch]
    assert main(["config", "uniform", "--model", model, "--rank", "8", "-o", str(path)]) == 0
    assert "50.0%" in capsys.readouterr().out

    written = json.loads(path.read_text())
    geometry = geometry_of(model)
    config = CompressionConfig.from_json(path)
    assert config.to_dict() == written
    assert (config.num_layers, config.num_kv_heads, config.d_head) == (
        geometry.num_layers,
        geometry.num_kv_heads,
        geometry.head_dim,
    )
    assert len(written["per_layer_head"]) == geometry.num_layers * geometry.num_kv_heads
    assert all(entry["rank"] == 8 for entry in written["per_layer_head"].values())
    # A compressor can be built from the file alone, and it fits the model.
    KVCompressor(config).check_geometry(geometry)


def test_config_uniform_rank_beyond_head_dim_is_one_line_exit_2(tmp_path, tiny_llama_path, capfd):
    path = tmp_path / "cfg.json"
    assert main(["config", "uniform", "--model", tiny_llama_path, "--rank", "17", "-o", str(path)]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert "17" in line and "1..16" in line
    assert not path.exists()


@pytest.mark.parametrize("flag", [["--rank", "0"], ["--rank", "-4"], ["--rank", "four"]])
def test_config_uniform_non_positive_rank_is_rejected_by_the_parser(flag, tmp_path, tiny_llama_path, capfd):
    path = tmp_path / "cfg.json"
    assert main(["config", "uniform", "--model", tiny_llama_path, *flag, "-o", str(path)]) == 2
    assert one_error_line(capfd.readouterr().err).startswith("kvlight: error: --rank")
    assert not path.exists()


def test_config_uniform_needs_a_rank(tmp_path, tiny_llama_path, capfd):
    assert main(["config", "uniform", "--model", tiny_llama_path, "--rank-k", "4", "-o", str(tmp_path / "c.json")]) == 2
    assert "--rank" in one_error_line(capfd.readouterr().err)

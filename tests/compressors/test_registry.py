"""The backend registry: a new backend is one file plus its registration, and everything that offers a choice reads
the registry. Proven with a toy backend registered here only: it validates in configs, builds, fits, serves
through the cache (plain and fast paths), saves and loads, and is offered by the command line."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from helpers import ARCHS, HEAD_DIM, chunked_logits

from kvlight.compressors.base import HeadProjection
from kvlight.compressors.compressor import KVCompressor, load_compressor
from kvlight.compressors.registry import backend, backend_names, register_backend, unregister_backend
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError
from kvlight.geometry import kv_geometry
from kvlight.hf import dynamic_cache
from kvlight.serving.cache import CompressedCache
from kvlight.serving.positions import PositionTracker
from kvlight.serving.wrapper import CompressedKVModelWrapper


@dataclass(frozen=True)
class ToyOptions:
    """Args:
    scale: latents are the leading coordinates of ``(x - mean)`` times this."""

    scale: float = 1.0


class ToyProjection(HeadProjection):
    """Keeps the first ``rank`` coordinates of ``x - mean`` (no rotation at all), scaled."""

    def __init__(self, head_dim: int, rank: int, scale: float = 1.0) -> None:
        super().__init__(head_dim, rank)
        self.scale = scale

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype))[..., : self.rank] * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(z / self.scale, (0, self.head_dim - self.rank))
        return padded + self.mean.to(z.dtype)

    def init_from_statistics(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        self.mean.copy_(mean.to(self.mean.dtype))
        self.latent_std.copy_(
            covariance.diagonal()[: self.rank].clamp_min(1e-12).sqrt().to(self.latent_std.dtype) * self.scale
        )


@pytest.fixture
def toy():
    register_backend("toy", ToyProjection, ToyOptions, trainable=False, weighted_objectives=False)
    yield backend("toy")
    unregister_backend("toy")


def toy_config(geometry, rank: int) -> CompressionConfig:
    return CompressionConfig.uniform(
        geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=rank, algo="toy", sink_tokens=1
    )


def test_the_built_in_backends_are_registered():
    assert {"pca", "kvsplice"} <= set(backend_names())
    assert backend("kvsplice").trainable and not backend("pca").trainable
    with pytest.raises(ConfigError, match="is not a known backend"):
        backend("svd")


def test_an_unregistered_backend_is_refused_where_configs_name_it():
    with pytest.raises(ConfigError, match="'toy' is not a known algo"):
        CompressionConfig.from_dict({"global": {"algo_default": "toy"}})


def test_bad_options_are_one_line_errors(toy):
    with pytest.raises(ConfigError, match="has no option 'shift'"):
        toy.make_options({"shift": 1.0})
    assert toy.make_options({"scale": 2.0}) == ToyOptions(2.0)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_registered_backend_serves_like_a_built_in_one(arch, toy, tiny_models, tiny_rows, tiny_windows, tmp_path):
    model = tiny_models[arch]
    geometry = kv_geometry(model)
    keys, values = tiny_rows[arch]["calib"]
    ids = tiny_windows["eval"][:3]
    tracker = PositionTracker(model) if geometry.rope else None
    try:
        full = KVCompressor(toy_config(geometry, HEAD_DIM), geometry, options={"toy": {"scale": 2.0}})
        full.fit_statistics([{"keys": keys, "values": values}])
        with torch.no_grad():
            exact = chunked_logits(model, ids, dynamic_cache(), chunk=8)
            kept = chunked_logits(model, ids, CompressedCache(full, tracker), chunk=8)
        torch.testing.assert_close(kept, exact, atol=1e-4, rtol=1e-4)  # every coordinate kept: lossless

        low = KVCompressor(toy_config(geometry, 5), geometry)
        low.fit_statistics([{"keys": keys, "values": values}])
        assert low.codec(0, "k").heads[0].algo == "toy"
        low.save_pretrained(tmp_path / "toy")
        loaded = load_compressor(tmp_path / "toy", geometry)
        assert loaded.options_dict() == {} and loaded.codec(1, "v").heads[1].algo == "toy"
        assert all(torch.equal(a, b) for a, b in zip(low.state_dict().values(), loaded.state_dict().values()))
    finally:
        if tracker is not None:
            tracker.close()
    tokens = []
    for fast in (False, True):
        wrapper = CompressedKVModelWrapper(model, low, fast_decode=fast)
        try:
            tokens.append(wrapper.generate(input_ids=ids[:, :20], max_new_tokens=6, do_sample=False, pad_token_id=0))
        finally:
            wrapper.close()
    assert torch.equal(tokens[0], tokens[1])


def test_the_command_line_offers_a_registered_backend(toy, tiny_llama_path, tmp_path, capsys):
    from kvlight.cli import main

    assert (
        main(
            [
                "config",
                "uniform",
                "--model",
                tiny_llama_path,
                "--rank",
                "8",
                "--algo",
                "toy",
                "-o",
                str(tmp_path / "c.json"),
            ]
        )
        == 0
    )
    assert CompressionConfig.from_json(tmp_path / "c.json").algo_default == "toy"

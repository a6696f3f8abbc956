"""Compressors: reconstruction error vs rank, KVSplice training, serialisation (state_dict, save_pretrained),
geometry checks and damaged artefacts. Rows are real pre-RoPE K/V captured from the tiny models."""

import json

import pytest
import torch
from helpers import ARCH_BACKEND, ARCHS, HEAD_DIM

from kvlight.compressors.artefacts import CONFIG_NAME, WEIGHTS_NAME
from kvlight.compressors.compressor import KVCompressor, KVSpliceCompressor, PCACompressor, load_compressor
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError, GeometryMismatchError, KVLightError
from kvlight.geometry import KVGeometry, kv_geometry

RANKS = [1, 2, 4, 8, 12, 16]
COMPRESSOR_CLASSES = {"pca": PCACompressor, "kvsplice": KVSpliceCompressor}


def heldout_loss(compressor, rows) -> float:
    with torch.no_grad():
        return float(compressor.reconstruction_loss(*rows["heldout"]))


# ---------------------------------------------------------------------- 2. error vs rank
@pytest.mark.parametrize("arch", ARCHS)
def test_pca_heldout_error_falls_monotonically_with_rank(arch, tiny_rows, fitted_compressor):
    errors = [heldout_loss(fitted_compressor(arch, "pca", rank=rank), tiny_rows[arch]) for rank in RANKS]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > 0.05  # the data has real spread: rank 1 loses a lot
    assert errors[-1] < 1e-10  # full rank: a rotation, nothing lost


@pytest.mark.parametrize("rank", [1, 4, 12])
@pytest.mark.parametrize("arch", ARCHS)
def test_pca_error_is_the_discarded_variance(arch, rank, tiny_rows, fitted_compressor):
    """On its own calibration rows PCA is optimal: the error is the sum of the smallest eigenvalues."""
    keys, values = tiny_rows[arch]["calib"]
    expected = 0.0
    for rows in (keys, values):
        for layer in range(rows.shape[1]):
            x = rows[:, layer].double()  # [N, H, D]
            centred = x - x.mean(dim=0)
            covariance = torch.einsum("nhd,nhe->hde", centred, centred) / x.shape[0]
            eigenvalues = torch.linalg.eigvalsh(covariance)  # ascending, [H, D]
            expected += float(eigenvalues[:, : HEAD_DIM - rank].sum(dim=-1).mean()) / HEAD_DIM
    expected /= keys.shape[1]
    with torch.no_grad():
        got = float(fitted_compressor(arch, "pca", rank=rank).reconstruction_loss(keys, values))
    assert got == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("rank", [2, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_kvsplice_pca_init_equals_pca(arch, rank, tiny_rows, fitted_compressor):
    """Initialised from the same statistics, KVSplice starts exactly at the PCA solution."""
    pca, splice = fitted_compressor(arch, "pca", rank=rank), fitted_compressor(arch, "kvsplice", rank=rank)
    x = tiny_rows[arch]["heldout"][0][:, 0].unsqueeze(0).transpose(1, 2)  # [1, H, N, D]
    with torch.no_grad():
        torch.testing.assert_close(
            splice.codec(0, "k").reconstruct(x), pca.codec(0, "k").reconstruct(x), atol=1e-5, rtol=0
        )
    assert heldout_loss(splice, tiny_rows[arch]) == pytest.approx(heldout_loss(pca, tiny_rows[arch]), rel=1e-4)


# ---------------------------------------------------------------------- 3. KVSplice learns
def train(compressor, rows, steps=120, lr=1e-2, batch=256):
    keys, values = rows["calib"]
    optimizer = torch.optim.Adam([p for p in compressor.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(0, keys.shape[0], (batch,), generator=generator)
        loss = compressor.reconstruction_loss(keys[index], values[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def isotropic_like(rows: torch.Tensor) -> torch.Tensor:
    """Gaussian noise with the rows' per-coordinate mean and std: statistics that give a meaningless basis."""
    generator = torch.Generator().manual_seed(1)
    return torch.randn(rows.shape, generator=generator) * rows.std(dim=0) + rows.mean(dim=0)


@pytest.mark.parametrize("start", ["random", "pca_of_noise"])
@pytest.mark.parametrize("arch", ARCHS)
def test_kvsplice_loss_falls_during_fit(arch, start, tiny_models, tiny_rows, fitted_compressor):
    geometry = kv_geometry(tiny_models[arch])
    config = CompressionConfig.uniform(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=4)
    torch.manual_seed(0)
    compressor = KVSpliceCompressor(config, geometry, init="random" if start == "random" else "pca")
    keys, values = tiny_rows[arch]["calib"]
    if start == "random":  # N(0, 0.02) weights; the statistics pass only sets the mean
        compressor.fit_statistics([{"keys": keys, "values": values}])
    else:  # a PCA start that is not MSE-optimal for the real rows
        compressor.fit_statistics([{"keys": isotropic_like(keys), "values": isotropic_like(values)}])
    assert compressor.trainable

    before = heldout_loss(compressor, tiny_rows[arch])
    train(compressor, tiny_rows[arch])
    after = heldout_loss(compressor, tiny_rows[arch])
    optimum = heldout_loss(fitted_compressor(arch, "pca", rank=4), tiny_rows[arch])

    assert after < 0.5 * before, (before, after)
    assert after < 1.25 * optimum, (after, optimum)  # close to the best a rank-4 linear map can do


def test_pca_has_nothing_to_train(fitted_compressor):
    assert not fitted_compressor("llama", "pca", rank=4).trainable
    assert fitted_compressor("llama", "kvsplice", rank=4).trainable


# ---------------------------------------------------------------------- 4. serialisation
def outputs(compressor, rows):
    """Every layer's K and V latents and reconstructions for the held-out rows."""
    keys, values = rows["heldout"]
    result = []
    with torch.no_grad():
        for layer in range(compressor.num_layers):
            for kind, data in (("k", keys), ("v", values)):
                x = data[:, layer].unsqueeze(0).transpose(1, 2)
                z = compressor.encode(layer, kind, x)
                result += [z, compressor.decode(layer, kind, z)]
    return result


def assert_same_outputs(a, b):
    for left, right in zip(a, b, strict=True):
        assert torch.equal(left, right)


def trained(arch, algo, rows, fitted_compressor, rank=6):
    """A fitted compressor whose KVSplice weights moved away from the PCA start (so a lost tensor would show)."""
    compressor = fitted_compressor(arch, algo, rank=rank)
    if compressor.trainable:
        train(compressor, rows, steps=10)
    return compressor


@pytest.mark.parametrize("arch,algo", ARCH_BACKEND)
def test_state_dict_round_trip_into_compressor_built_from_config_json(
    arch, algo, tmp_path, tiny_rows, fitted_compressor
):
    """The seed's Step 3: ``Compressor(CompressionConfig.from_json(cfg))`` + ``load_state_dict(torch.load(pt))``."""
    compressor = trained(arch, algo, tiny_rows[arch], fitted_compressor)
    compressor.config.to_json(tmp_path / "config.json")
    torch.save(compressor.state_dict(), tmp_path / "compressor.pt")

    fresh = COMPRESSOR_CLASSES[algo](CompressionConfig.from_json(tmp_path / "config.json"))
    assert not all(
        torch.equal(a, b) for a, b in zip(outputs(fresh, tiny_rows[arch]), outputs(compressor, tiny_rows[arch]))
    )
    fresh.load_state_dict(torch.load(tmp_path / "compressor.pt"))

    assert fresh.state_dict().keys() == compressor.state_dict().keys()
    assert_same_outputs(outputs(fresh, tiny_rows[arch]), outputs(compressor, tiny_rows[arch]))


@pytest.mark.parametrize("arch,algo", ARCH_BACKEND)
def test_save_pretrained_round_trip(arch, algo, tmp_path, tiny_models, tiny_rows, fitted_compressor):
    compressor = trained(arch, algo, tiny_rows[arch], fitted_compressor)
    compressor.save_pretrained(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    geometry = kv_geometry(tiny_models[arch])
    loaded = load_compressor(tmp_path / "c", geometry=geometry)

    assert loaded.geometry == geometry
    assert loaded.config.to_dict() == compressor.config.to_dict()
    # load_compressor returns the base class; every projection has the saved backend.
    assert [type(p) for p in list(loaded.modules())[1:]] == [type(p) for p in list(compressor.modules())[1:]]
    assert_same_outputs(outputs(loaded, tiny_rows[arch]), outputs(compressor, tiny_rows[arch]))


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_backends_and_ranks_round_trip(arch, tmp_path, tiny_models, tiny_rows):
    """Per-head algo, separate K/V ranks and a disabled head survive save_pretrained/load_compressor."""
    geometry = kv_geometry(tiny_models[arch])
    config = CompressionConfig.from_dict(
        {
            "global": {"target_memory_reduction": 0.75, "algo_default": "pca"},
            "per_layer_head": {
                "0/0": {"algo": "kvsplice", "rank_k": 3, "rank_v": 9},
                "0/1": {"enabled": False},
                "1/1": {"rank": 5, "algo": "pca"},
            },
        }
    )
    compressor = KVCompressor(config, geometry)
    compressor.fit_statistics([{"keys": tiny_rows[arch]["calib"][0], "values": tiny_rows[arch]["calib"][1]}])
    assert compressor.latent_dims()[0][0] == 3 + HEAD_DIM + 4 * (geometry.num_kv_heads - 2)
    compressor.save_pretrained(tmp_path / "c")
    loaded = load_compressor(tmp_path / "c", geometry=geometry)
    assert loaded.latent_dims() == compressor.latent_dims()
    assert_same_outputs(outputs(loaded, tiny_rows[arch]), outputs(compressor, tiny_rows[arch]))


def _other_geometries(geometry: KVGeometry):
    return {
        "more_layers": KVGeometry(
            geometry.model_type, geometry.num_layers + 1, geometry.num_kv_heads, geometry.head_dim, geometry.rope
        ),
        "fewer_heads": KVGeometry(geometry.model_type, geometry.num_layers, 1, geometry.head_dim, geometry.rope),
        "other_head_dim": KVGeometry(
            geometry.model_type, geometry.num_layers, geometry.num_kv_heads, 32, geometry.rope
        ),
        "rope_flipped": KVGeometry(
            geometry.model_type, geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, not geometry.rope
        ),
    }


@pytest.mark.parametrize("change", ["more_layers", "fewer_heads", "other_head_dim", "rope_flipped"])
@pytest.mark.parametrize("arch", ARCHS)
def test_loading_onto_another_geometry_raises(arch, change, tmp_path, tiny_models, fitted_compressor):
    compressor = fitted_compressor(arch, "pca", rank=4)
    compressor.save_pretrained(tmp_path / "c")
    other = _other_geometries(kv_geometry(tiny_models[arch]))[change]
    with pytest.raises(GeometryMismatchError) as error:
        load_compressor(tmp_path / "c", geometry=other)
    assert "\n" not in str(error.value) and "calibrate" in str(error.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_wrapping_another_model_raises(arch, tiny_models, fitted_compressor):
    from kvlight.serving.wrapper import CompressedKVModelWrapper

    other = tiny_models["gpt2" if arch == "llama" else "llama"]
    with pytest.raises(GeometryMismatchError):
        CompressedKVModelWrapper(other, fitted_compressor(arch, "pca", rank=4))
    assert not any(m._forward_pre_hooks for m in other.modules())  # nothing was attached before the refusal


def _damage(directory, how):
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    described = json.loads(config.read_text())
    if how == "missing_dir":
        return directory.parent / "nowhere"
    if how == "missing_config":
        config.unlink()
    elif how == "missing_weights":
        weights.unlink()
    elif how == "config_not_json":
        config.write_text("{ this is not json")
    elif how == "config_not_a_compressor":
        config.write_text(json.dumps({"hello": "world"}))
    elif how == "bad_compression_config":
        described["compression_config"]["per_layer_head"]["0/0"]["algo"] = "svd"
        config.write_text(json.dumps(described))
    elif how == "malformed_geometry":
        described["geometry"] = {"num_layers": 2}
        config.write_text(json.dumps(described))
    elif how == "truncated_weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif how == "garbage_weights":
        weights.write_bytes(b"\x00" * 64)
    elif how == "weights_of_another_rank":
        described["compression_config"]["per_layer_head"]["0/0"]["rank"] = 3
        config.write_text(json.dumps(described))
    else:
        raise ValueError(how)
    return directory


DAMAGE = [
    "missing_dir",
    "missing_config",
    "missing_weights",
    "config_not_json",
    "config_not_a_compressor",
    "bad_compression_config",
    "malformed_geometry",
    "truncated_weights",
    "garbage_weights",
    "weights_of_another_rank",
]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_compressor_directory_raises_kvlight_error(how, tmp_path, fitted_compressor):
    fitted_compressor("llama", "kvsplice", rank=4).save_pretrained(tmp_path / "c")
    directory = _damage(tmp_path / "c", how)
    with pytest.raises(KVLightError) as error:
        load_compressor(directory)
    message = str(error.value)
    assert message and "\n" not in message
    if how == "bad_compression_config":
        assert isinstance(error.value, ConfigError) and "algo" in message


def test_config_without_geometry_cannot_build_a_compressor():
    with pytest.raises(ConfigError, match="num_layers"):
        PCACompressor(CompressionConfig.from_dict({"global": {"d_head": 16}}))

"""Hostile input: random and malformed compression configs, compressor files and metrics files, written by hand or
by a bug, thrown at the loaders (hypothesis). Each one loads correctly or fails with kvlight's own error type and a
one-line message; nothing crashes with another exception, hangs (a per-example deadline) or writes a file. Also:
a compressor refuses a model of another geometry, and NaN/inf in captured K/V stops the fit naming layer and head.
"""

import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import one_error_line
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from kvlight.analysis.metrics_io import CURVES, HeadMetrics, metrics_to_csv, metrics_to_json, read_metrics_file
from kvlight.compressors.compressor import KVCompressor, PCACompressor, load_compressor
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError, KVLightError, MetricsError
from kvlight.geometry import KVGeometry

GEOMETRY = KVGeometry("llama", num_layers=2, num_kv_heads=2, head_dim=16, rope=True)
# Bounded examples and a deadline generous enough for a busy shared machine, yet far below a hang.
HOSTILE = settings(
    max_examples=150,
    deadline=5000,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# ---------------------------------------------------------------------- strategies
# Strings a hand-edited file plausibly holds: head keys with odd digits, algo names, layer labels, numbers as text.
TRICKY = [
    "0/1",
    "1/0",
    "٣/1",
    "²/0",
    "-1/0",
    " 1/ 1",
    "1/2/3",
    "fp8",
    "pca",
    "kvsplice",
    "none",
    "layer0",
    "1e3",
    "nan",
]
KEYS = st.text(max_size=10) | st.sampled_from(TRICKY)
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | KEYS
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw, document):
    """``document`` (parsed JSON) with a few random edits: a value replaced, a key dropped or added."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        parent, key = _random_slot(draw, document)
        if parent is None:
            return draw(JSON_VALUES)
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            parent[key] = draw(JSON_VALUES)
        elif action == "drop":
            del parent[key]
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=10))] = draw(JSON_VALUES)
        else:
            parent.insert(key, draw(JSON_VALUES))
    return document


def _random_slot(draw, node):
    """A (container, key) pair 1 to 4 levels inside ``node`` (deep slots are where hand edits go); (None, None)
    when ``node`` is not a non-empty container."""
    parent, key = None, None
    for _ in range(draw(st.integers(1, 4))):
        if not isinstance(node, (dict, list)) or not node:
            break
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, draw(st.sampled_from(keys))
        node = node[key]
    return parent, key


@st.composite
def damaged_text(draw, text: str):
    """``text`` cut short, with lines dropped, duplicated or replaced by noise, or characters flipped."""
    lines = text.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["cut", "drop", "noise", "flip", "duplicate"]))
        index = draw(st.integers(0, max(0, len(lines) - 1)))
        if action == "cut":
            joined = "".join(lines)
            lines = [joined[: draw(st.integers(0, len(joined)))]]
        elif action == "drop" and lines:
            del lines[index]
        elif action == "noise":
            lines.insert(index, draw(st.text(max_size=40)) + "\n")
        elif action == "duplicate" and lines:
            lines.insert(index, lines[index])
        elif lines:
            line = lines[index]
            at = draw(st.integers(0, max(0, len(line) - 1)))
            lines[index] = line[:at] + draw(st.characters()) + line[at + 1 :]
    return "".join(lines)


def raw_bytes() -> st.SearchStrategy[bytes]:
    return st.binary(max_size=300) | st.sampled_from([b"", b"\xff\xfe\x00", b"\x00" * 64, b"[" * 50 + b"]" * 50])


#: Nesting deeper than Python's JSON parser recurses (kept out of hypothesis: its failure reports would be huge).
DEEP = {"arrays": "[" * 100_000 + "]" * 100_000, "objects": '{"a":' * 50_000 + "1" + "}" * 50_000}


# ---------------------------------------------------------------------- checks
def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*")}


def _event(label: str) -> None:
    """Tally outcomes in ``--hypothesis-show-statistics`` (outside a hypothesis test there is nothing to tally)."""
    if currently_in_test_context():
        event(label)


def expect_load_or_own_error(load, error_type: type[KVLightError], watched: Path):
    """Run ``load()``; success or ``error_type`` with a one-line message; nothing under ``watched`` written."""
    before = snapshot(watched)
    try:
        result = load()
        _event("loaded")
    except error_type as error:
        message = str(error)
        assert message and "\n" not in message, repr(message)
        _event(f"{type(error).__name__}: {message[:60]}")
        result = None
    # Anything else (TypeError, KeyError, RecursionError, ...) propagates and fails the example.
    assert snapshot(watched) == before, "a loader wrote files"
    return result


@pytest.fixture(autouse=True)
def _no_cache_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLIGHT_CACHE", str(tmp_path / "never-created"))
    yield
    assert not (tmp_path / "never-created").exists()


def valid_config() -> dict:
    config = CompressionConfig.uniform(2, 2, 16, rank_k=8, rank_v=16, algo="pca", sink_tokens=4, latent_bits=4)
    config.per_layer_head[(1, 1)] = {"enabled": False}
    return config.to_dict()


# ---------------------------------------------------------------------- compression configs
def _config_pipeline(data) -> CompressionConfig:
    """Parse, check against the model, build a compressor: each stage loads or raises ConfigError."""
    config = CompressionConfig.from_dict(data)
    config.validate(GEOMETRY.num_layers, GEOMETRY.num_kv_heads, GEOMETRY.head_dim)
    compressor = KVCompressor(config, GEOMETRY)
    assert len(compressor.latent_dims()) == GEOMETRY.num_layers
    return config


def _round_trips(config: CompressionConfig | None) -> bool:
    """A config that loaded survives to_dict -> from_dict unchanged (None: it was refused, nothing to check)."""
    return config is None or CompressionConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()


@HOSTILE
@given(data=JSON_VALUES | mutated(valid_config()))
def test_random_config_dicts_load_or_raise_config_error(data, tmp_path):
    loaded = expect_load_or_own_error(lambda: _config_pipeline(data), ConfigError, tmp_path)
    assert _round_trips(loaded)


@HOSTILE
@given(content=raw_bytes() | damaged_text(json.dumps(valid_config(), indent=2)).map(str.encode))
def test_random_config_files_load_or_raise_config_error(content, tmp_path):
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        path = Path(directory) / "config.json"
        path.write_bytes(content)
        # Parsed from the file, then through the same pipeline as a dict (to_dict round trip included).
        load = lambda: _config_pipeline(CompressionConfig.from_json(path).to_dict())  # noqa: E731
        loaded = expect_load_or_own_error(load, ConfigError, Path(directory))
        assert _round_trips(loaded)


#: Pathological files for every loader: nesting deeper than Python's parser recurses, a CSV field beyond the csv
#: module's limit. (Kept out of hypothesis: its failure reports would print them whole.)
PATHOLOGICAL = {
    **{f"config-{name}": ("config", "config.json", text) for name, text in DEEP.items()},
    **{f"compressor-{name}": ("compressor", "compressor_config.json", text) for name, text in DEEP.items()},
    **{f"metrics-{name}": ("metrics", "metrics.json", text) for name, text in DEEP.items()},
    "metrics-huge-csv-field": ("metrics", "metrics.csv", "layer,head,trace,cond\n0,0," + "9" * 200_000 + ",1\n"),
}
LOADERS = {
    "config": (lambda path: CompressionConfig.from_json(path), ConfigError),
    "compressor": (lambda path: load_compressor(path.parent, GEOMETRY), KVLightError),
    "metrics": (lambda path: read_metrics_file(path, GEOMETRY), MetricsError),
}


@pytest.mark.parametrize("case", list(PATHOLOGICAL))
def test_pathological_files_raise_the_loaders_own_error(case, tmp_path):
    loader, name, text = PATHOLOGICAL[case]
    path = tmp_path / name
    path.write_text(text)
    load, error_type = LOADERS[loader]
    assert expect_load_or_own_error(lambda: load(path), error_type, tmp_path) is None  # refused, own error type


# ---------------------------------------------------------------------- compressor directories
@pytest.fixture(scope="module")
def saved_compressor(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    compressor = PCACompressor(CompressionConfig.from_dict(valid_config()), GEOMETRY)
    keys = torch.randn(64, 2, 2, 16)
    compressor.fit_statistics([{"keys": keys, "values": keys.flip(-1)}])
    directory = tmp_path_factory.mktemp("compressor")
    compressor.save_pretrained(directory)
    return directory


def _flip(blob: bytes, positions: list[int]) -> bytes:
    data = bytearray(blob)
    for position in positions:
        if data:
            data[position % len(data)] ^= 0xFF
    return bytes(data)


@HOSTILE
@given(
    description=st.sampled_from(["keep", "missing", "random", "mutated", "mutated-geometry"]),
    weights=st.none() | raw_bytes() | st.lists(st.integers(0, 10**6), min_size=1, max_size=3) | st.just("keep"),
    data=st.data(),
)
def test_random_compressor_directories_load_or_raise(description, weights, data, saved_compressor, tmp_path):
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        directory = Path(directory)
        described = json.loads((saved_compressor / "compressor_config.json").read_text())
        if description == "random":
            described = data.draw(JSON_VALUES)
        elif description == "mutated":
            described = data.draw(mutated(described))
        elif description == "mutated-geometry":
            described["geometry"] = data.draw(mutated(described["geometry"]))
        if description != "missing":
            (directory / "compressor_config.json").write_text(json.dumps(described))
        blob = (saved_compressor / "compressor.safetensors").read_bytes()
        if isinstance(weights, list):  # bytes flipped at these offsets (header or tensor data)
            blob = _flip(blob, weights)
        elif isinstance(weights, bytes):
            blob = weights
        if weights is not None:
            (directory / "compressor.safetensors").write_bytes(blob)
        loaded = expect_load_or_own_error(lambda: load_compressor(directory, GEOMETRY), KVLightError, directory)
        if loaded is not None:  # what loads is usable: finite weights, this geometry
            assert all(torch.isfinite(t).all() for t in loaded.state_dict().values())
            loaded.check_geometry(GEOMETRY)


#: Hand edits of the saved geometry and flags: each is refused with KVLightError, never a TypeError.
BAD_DESCRIPTIONS = {
    "float-layers": ("geometry", {"num_layers": 2.0}),
    "string-layers": ("geometry", {"num_layers": "2"}),
    "list-head-dim": ("geometry", {"head_dim": []}),
    "zero-kv-heads": ("geometry", {"num_kv_heads": 0}),
    "bool-layers": ("geometry", {"num_layers": True}),
    "string-rope": ("geometry", {"rope": "yes"}),
    "numeric-model-type": ("geometry", {"model_type": 5}),
    "more-layers-than-config": ("geometry", {"num_layers": 3}),
    "geometry-a-list": ("geometry", []),
    "geometry-a-string": ("geometry", "llama"),
    "latent-affine-a-string": ("latent_affine", "no"),
}


@pytest.mark.parametrize("case", list(BAD_DESCRIPTIONS))
def test_hand_edited_compressor_description_is_refused(case, saved_compressor, tmp_path):
    field, value = BAD_DESCRIPTIONS[case]
    described = json.loads((saved_compressor / "compressor_config.json").read_text())
    described[field] = {**described[field], **value} if isinstance(value, dict) else value
    (tmp_path / "compressor_config.json").write_text(json.dumps(described))
    (tmp_path / "compressor.safetensors").write_bytes((saved_compressor / "compressor.safetensors").read_bytes())
    with pytest.raises(KVLightError) as refused:
        load_compressor(tmp_path, GEOMETRY)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_compressor_weights_with_nan_or_inf_are_refused(value, saved_compressor, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(saved_compressor / "compressor.safetensors")
    state["layers.1.v.heads.0.basis"][3, 2] = value
    save_file(state, tmp_path / "compressor.safetensors")
    (tmp_path / "compressor_config.json").write_text((saved_compressor / "compressor_config.json").read_text())
    with pytest.raises(KVLightError, match=r"layers\.1\.v\.heads\.0\.basis holds NaN or inf"):
        load_compressor(tmp_path, GEOMETRY)


def test_unchanged_compressor_directory_loads(saved_compressor):
    assert load_compressor(saved_compressor, GEOMETRY) is not None


# ---------------------------------------------------------------------- metrics files
@pytest.fixture(scope="module")
def metrics_texts() -> dict[str, str]:
    rng = np.random.default_rng(0)
    shape = (GEOMETRY.num_layers, GEOMETRY.num_kv_heads)
    curves = {name: rng.random(shape + (16 + name.startswith("loss"),)) for name in CURVES}
    metrics = HeadMetrics(GEOMETRY, rng.random(shape), rng.random(shape), 1 + rng.random(shape), curves, {"model": "x"})
    return {".json": metrics_to_json(metrics), ".csv": metrics_to_csv(metrics)}


@HOSTILE
@given(suffix=st.sampled_from([".json", ".csv", ".txt"]), data=st.data())
def test_random_metrics_files_load_or_raise_metrics_error(suffix, data, metrics_texts, tmp_path):
    valid = metrics_texts.get(suffix, metrics_texts[".csv"])
    content = data.draw(
        raw_bytes()
        | damaged_text(valid).map(str.encode)
        | mutated(json.loads(metrics_texts[".json"])).map(lambda d: json.dumps(d).encode())
    )
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        path = Path(directory) / f"metrics{suffix}"
        path.write_bytes(content)
        loaded = expect_load_or_own_error(lambda: read_metrics_file(path, GEOMETRY), MetricsError, Path(directory))
        if loaded is not None:
            assert loaded.trace.shape == (2, 2) and np.isfinite(loaded.trace).all()


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_unchanged_metrics_files_load(suffix, metrics_texts, tmp_path):
    path = tmp_path / f"metrics{suffix}"
    path.write_text(metrics_texts[suffix])
    assert read_metrics_file(path, GEOMETRY).trace.shape == (2, 2)


# ---------------------------------------------------------------------- another model's geometry
OTHER_GEOMETRIES = {
    "more-layers": KVGeometry("llama", 3, 2, 16, True),
    "fewer-kv-heads": KVGeometry("llama", 2, 1, 16, True),
    "wider-heads": KVGeometry("llama", 2, 2, 32, True),
    "no-rope": KVGeometry("gpt2", 2, 2, 16, False),
}


@pytest.mark.parametrize("other", list(OTHER_GEOMETRIES))
def test_compressor_refuses_another_geometry(other, saved_compressor):
    with pytest.raises(KVLightError) as refused:
        load_compressor(saved_compressor, OTHER_GEOMETRIES[other])
    assert "\n" not in str(refused.value) and "calibrate a compressor for this model" in str(refused.value)


def test_checkpoint_refuses_another_model(tiny_llama_path, tiny_gpt2_path, tmp_path, kvlight_cache, monkeypatch):
    # A checkpoint fitted on the tiny Llama, validated with GPT-2 named instead (same layers and head_dim, no RoPE,
    # 4 KV heads instead of 2): one line on stderr, exit 2.
    from run_helpers import cli_args

    from kvlight.cli import main

    monkeypatch.setattr("sys.argv", ["kvlight"])
    pca = str(Path(__file__).resolve().parents[2] / "configs" / "smollm2_pca.yaml")
    data = ["--data.seq_len", "32", "--data.calibration_samples", "2", "--data.eval_samples", "2"]
    assert main(["fit", *cli_args(pca, tiny_llama_path, tmp_path, *data)]) == 0
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(KVLightError) as refused:
        from kvlight.calibration.module import KVCalibrationModule

        KVCalibrationModule.load_from_checkpoint(checkpoint, model=tiny_gpt2_path)
    assert "\n" not in str(refused.value)


# ---------------------------------------------------------------------- NaN / inf in captured K/V
def _poisoned_model(source: str, target: Path, layer: int, kind: str, head: int, value: float) -> str:
    """A copy of the tiny Llama whose ``kind`` projection of one KV head in one layer outputs ``value``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source)
    projection = getattr(model.model.layers[layer].self_attn, f"{kind}_proj")
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        projection.weight[head * head_dim : (head + 1) * head_dim] = value
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return str(target)


POISON = {"nan-in-K-layer1-head1": (1, "k", 1, float("nan")), "inf-in-V-layer0-head1": (0, "v", 1, float("inf"))}


@pytest.mark.parametrize("case", list(POISON))
def test_non_finite_kv_stops_the_fit_naming_layer_and_head(
    case, tiny_llama_path, tmp_path, kvlight_cache, capfd, monkeypatch
):
    from run_helpers import cli_args

    from kvlight.cli import main

    layer, kind, head, value = POISON[case]
    model = _poisoned_model(tiny_llama_path, tmp_path / "poisoned", layer, kind, head, value)
    monkeypatch.setattr("sys.argv", ["kvlight"])
    capfd.readouterr()
    pca = str(Path(__file__).resolve().parents[2] / "configs" / "smollm2_pca.yaml")
    data = ["--data.seq_len", "32", "--data.calibration_samples", "2", "--data.eval_samples", "2"]
    assert main(["fit", *cli_args(pca, model, tmp_path / "run", *data)]) == 2
    # Progress bars (loading weights, capture) share stderr; the error is one line of its own after them.
    err = capfd.readouterr().err
    errors = [segment for segment in re.split(r"[\r\n]+", err) if "kvlight: error:" in segment]
    assert len(errors) == 1 and "Traceback" not in err, err
    line = one_error_line(errors[0].strip())
    assert f"{kind.upper()} of layer {layer}, KV head {head}" in line and "NaN or inf" in line
    assert not list((tmp_path / "run").rglob("*.ckpt"))  # nothing fitted, nothing saved


def test_non_finite_rows_in_a_capture_stop_the_statistics_naming_layer_and_head():
    # Rows that reach the statistics some other way (a hand-made capture): the fit still names layer and head.
    compressor = PCACompressor(CompressionConfig.from_dict(valid_config()), GEOMETRY)
    keys = torch.randn(32, 2, 2, 16)
    values = keys.clone()
    values[3, 1, 0, 5] = float("inf")
    with pytest.raises(KVLightError, match="V of layer 1, KV head 0 contains NaN or inf"):
        compressor.fit_statistics([{"keys": keys, "values": values}])


def test_hostile_tests_never_touch_the_working_directory():
    assert not any(name.startswith("compressor") for name in os.listdir("."))

"""Calibration and analysis for the served families: queries, output projections, weighted fits, the CLI.

Tiny random models of the families of tests/serving/test_families.py (same builders). For each: the pre-RoPE
queries kvlight measures, rotated with the modeling file's own ``apply_rotary_pos_emb``, reproduce the attention
probabilities the model computes (eager attention); the output projections are ``[hidden, H_q * D]`` and are the
modules attention feeds; a query-weighted / output-weighted compressor fits, orders by rank and serves; the
sensitivity pass runs. One non-Llama model goes through ``kvlight analyze`` and ``kvlight calibrate`` end to end.
"""

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))

from test_families import FAMILIES, _config, _model  # noqa: E402

from kvlight.analysis.queries import QueryCapture, QueryMoments, key_rotation, score_weights  # noqa: E402
from kvlight.analysis.sensitivity import measure_sensitivity  # noqa: E402
from kvlight.calibration.capture import capture_kv  # noqa: E402
from kvlight.compressors.compressor import KVCompressor  # noqa: E402
from kvlight.compressors.weighting import output_weights, rope_rotation, score_weight  # noqa: E402
from kvlight.config import CompressionConfig  # noqa: E402
from kvlight.geometry import kv_geometry  # noqa: E402
from kvlight.hf import cache_kwargs  # noqa: E402
from kvlight.models import output_projections  # noqa: E402
from kvlight.serving.capture_cache import CaptureCache  # noqa: E402
from kvlight.serving.positions import PositionTracker  # noqa: E402
from kvlight.serving.wrapper import CompressedKVModelWrapper  # noqa: E402

BUILDERS = dict(FAMILIES)
#: Gemma 3: one rotary module, a rope base per layer type (sliding / full), QK-norm, query_pre_attn_scalar scaling;
#: the window is longer than the windows here, so the plain causal mask below is the model's.
BUILDERS["gemma3"] = lambda: _config(
    "gemma3_text", head_dim=16, sliding_window=64, layer_types=["sliding_attention", "full_attention"],
    query_pre_attn_scalar=16,
)  # fmt: skip
#: (family, the parameter name of its attention output projection in block 0)
CASES = [
    ("llama", "model.layers.0.self_attn.o_proj.weight"),
    ("gpt2", "transformer.h.0.attn.c_proj.weight"),
    ("qwen3", "model.layers.0.self_attn.o_proj.weight"),  # QK-norm
    ("olmo2", "model.layers.0.self_attn.o_proj.weight"),  # QK-norm over all heads
    ("cohere-qk-norm", "model.layers.0.self_attn.o_proj.weight"),  # interleaved pairs, QK-norm
    ("gpt_neox", "gpt_neox.layers.0.attention.dense.weight"),  # fused query_key_value, partial rotary
    ("phi", "model.layers.0.self_attn.dense.weight"),  # partial rotary split in the attention
    ("persimmon", "model.layers.0.self_attn.dense.weight"),  # fused, QK layernorm, partial rotary
    ("glm", "model.layers.0.self_attn.o_proj.weight"),  # partial and interleaved
    ("stablelm", "model.layers.0.self_attn.o_proj.weight"),
    ("phi3-longrope", "model.layers.0.self_attn.o_proj.weight"),  # attention scaling in the tables
    ("smollm3", "model.layers.0.self_attn.o_proj.weight"),  # a NoPE layer
    ("opt", "model.decoder.layers.0.self_attn.out_proj.weight"),  # queries pre-scaled, learned positions
    ("gemma3", "model.layers.0.self_attn.o_proj.weight"),  # rope base per layer type
]
IDS = [family for family, _ in CASES]
SEQ = 12


def _windows(count: int = 2, length: int = SEQ, seed: int = 2) -> torch.Tensor:
    from conftest import TINY_VOCAB

    return torch.randint(3, TINY_VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def _modeling_rotation(tracker, keys: torch.Tensor, positions: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """The model's own rotation of ``keys [B, H, T, D]`` in ``layer`` (its layer type's tables): its file's
    apply_rotary_pos_emb on the whole head, or (Phi, Persimmon, StableLM split the head in their attention) on the
    rotary channels with the rest passed through (as tests/serving/test_families.py, per layer)."""
    from kvlight.hf import rotary_function

    apply_rotary = rotary_function(tracker.rotary)
    cos, sin = tracker.cos_sin(positions, layer)
    try:
        return apply_rotary(keys, keys, cos, sin)[1]
    except RuntimeError:
        width = cos.shape[-1]
        return torch.cat([apply_rotary(keys[..., :width], keys[..., :width], cos, sin)[1], keys[..., width:]], -1)


def _attention_probabilities(model, windows: torch.Tensor):
    """``(pre-RoPE queries, scalings, pre-RoPE keys, attentions)`` per layer of one eager forward of ``windows``."""
    geometry = kv_geometry(model)
    queries, scalings, keys = {}, {}, {}

    def keep_query(layer, q, scaling):
        queries[layer], scalings[layer] = q.clone(), scaling

    def keep_keys(layer, k, v):
        keys[layer] = k.detach().clone()

    model.set_attn_implementation("eager")
    tracker = PositionTracker(model) if geometry.rope else None
    capture = QueryCapture(model, keep_query)
    try:
        with torch.no_grad():
            out = model(
                input_ids=windows,
                output_attentions=True,
                **cache_kwargs(CaptureCache(geometry.num_layers, keep_keys, tracker)),
            )
    finally:
        capture.remove()
        if tracker is not None:
            tracker.close()
    return queries, scalings, keys, out.attentions


@pytest.mark.parametrize("family,projection", CASES, ids=IDS)
def test_measured_queries_are_the_queries_attention_uses(family, projection):
    """softmax(rotate(q) . rotate(k) * scaling) with the modeling file's rotation = the model's attention."""
    model = _model(BUILDERS[family])
    windows = _windows()
    queries, scalings, keys, attentions = _attention_probabilities(model, windows)
    assert model.config._attn_implementation == "eager"  # restored after the capture
    positions = torch.arange(SEQ)[None]
    tracker = PositionTracker(model) if kv_geometry(model).rope else None
    try:
        for layer, expected in enumerate(attentions):
            q, k = queries[layer].float(), keys[layer].float()
            if tracker is not None and tracker.rotates(layer):
                q, k = (_modeling_rotation(tracker, t, positions, layer) for t in (q, k))
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # transformers' repeat_kv
            scaling = scalings[layer] if scalings[layer] is not None else q.shape[-1] ** -0.5
            scores = (q @ k.transpose(-1, -2)) * scaling
            causal = torch.ones(SEQ, SEQ, dtype=torch.bool).tril()
            got = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=0)
    finally:
        if tracker is not None:
            tracker.close()


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3"])
def test_query_capture_changes_nothing_and_nested_captures_count_once(family):
    """The capture's attention function returns the original's outputs and is switched back on remove; two captures
    of one model each see every query once."""
    model = _model(BUILDERS[family])
    windows = _windows()
    with torch.no_grad():
        expected = model(input_ids=windows).logits
    geometry = kv_geometry(model)
    outer, inner = QueryMoments(geometry), QueryMoments(geometry)
    handles = outer.attach(model) + inner.attach(model)
    try:
        with torch.no_grad():
            got = model(input_ids=windows).logits
    finally:
        for handle in reversed(handles):
            handle.remove()
    assert torch.equal(got, expected)
    assert model.config._attn_implementation == "sdpa"
    groups = model.config.num_attention_heads // geometry.num_kv_heads
    assert outer.count == inner.count == windows.numel() * groups
    torch.testing.assert_close(outer.sums, inner.sums, atol=0, rtol=0)


@pytest.mark.parametrize("family,projection", CASES, ids=IDS)
def test_output_projections_are_the_attention_outputs(family, projection):
    model = _model(BUILDERS[family])
    config = model.config
    weights = output_projections(model)
    geometry = kv_geometry(model)
    assert len(weights) == geometry.num_layers
    for weight in weights:
        assert tuple(weight.shape) == (config.hidden_size, config.num_attention_heads * geometry.head_dim)
    named = dict(model.named_parameters())[projection]
    assert weights[0].data_ptr() == named.data_ptr()


def test_output_projection_of_wide_heads():
    """H_q * D != hidden (Qwen3 with head_dim 32): the projection is [hidden, H_q * D], the q_proj is not taken."""
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(_config("qwen3", head_dim=32)).eval()
    assert [tuple(w.shape) for w in output_projections(model)] == [(64, 128)] * 2


@pytest.mark.parametrize("family", ["cohere", "glm", "gpt_neox", "phi3-longrope", "llama-yarn", "gemma3"])
def test_key_rotation_is_the_models_rotation(family):
    """rope_rotation with the model's layout, frequencies and scale rotates keys as the model does."""
    model = _model(BUILDERS[family])
    rotation = key_rotation(model)
    tracker = PositionTracker(model)
    try:
        keys = torch.randn(1, 1, 1, kv_geometry(model).head_dim, generator=torch.Generator().manual_seed(0))
        for layer, position in itertools.product(range(kv_geometry(model).num_layers), (0, 1, 5, 11)):
            expected = _modeling_rotation(tracker, keys, torch.tensor([[position]]), layer)[0, 0, 0].double()
            matrix = rope_rotation(position, rotation.frequencies[layer], rotation.layout)
            gain = torch.ones(matrix.shape[0], dtype=torch.float64)
            scale = rotation.scale[layer]
            pairs = scale.repeat_interleave(2) if rotation.layout.interleaved else scale.repeat(2)
            gain[: rotation.layout.rotary_dim] = pairs  # both channels of a pair
            torch.testing.assert_close(gain * (matrix @ keys[0, 0, 0].double()), expected, atol=1e-5, rtol=0)
    finally:
        tracker.close()


def test_partial_inv_freq_without_layout_is_the_leading_half_split():
    """score_weight given only inv_freq of a partial rotary (GPT-NeoX: 4 of 16 channels) rotates those channels."""
    moments = torch.eye(16, dtype=torch.float64) + 0.1
    inv_freq = torch.tensor([1.0, 0.01], dtype=torch.float64)
    weight = score_weight(moments, inv_freq, window=8)
    torch.testing.assert_close(weight[4:, 4:], moments[4:, 4:])  # the pass-through channels are untouched
    assert weight.shape == (16, 16)


def _rows_and_moments(model, windows: torch.Tensor):
    geometry = kv_geometry(model)
    queries = QueryMoments(geometry)
    reservoir = capture_kv(model, geometry, [windows[:2], windows[2:]], 100_000, progress=False, queries=queries)
    keys, values = reservoir.rows()
    return keys, values, queries


def _weighted_compressor(model, rank: int, key_weights, value_weights, rows) -> KVCompressor:
    geometry = kv_geometry(model)
    config = CompressionConfig.uniform(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=rank)
    compressor = KVCompressor(config, geometry, algo="kvsplice")
    compressor.fit_statistics([rows], key_weights=key_weights, value_weights=value_weights)
    return compressor


@pytest.mark.parametrize("family,projection", CASES, ids=IDS)
def test_weighted_compressor_fits_orders_by_rank_and_serves(family, projection):
    model = _model(BUILDERS[family])
    geometry = kv_geometry(model)
    windows = _windows(4, 24)
    keys, values, queries = _rows_and_moments(model, windows)
    assert keys.shape[1:] == (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    assert queries.count == 4 * 24 * (model.config.num_attention_heads // geometry.num_kv_heads)
    key_w = score_weights(model, queries.mean(), window=24)
    value_w = output_weights(output_projections(model), geometry.num_kv_heads, geometry.head_dim)
    assert torch.isfinite(key_w).all() and torch.isfinite(value_w).all()
    rows = {"keys": keys, "values": values}
    losses = {}
    for rank in (4, 12):
        compressor = _weighted_compressor(model, rank, key_w, value_w, rows)
        with torch.no_grad():
            losses[rank] = float(compressor.reconstruction_loss(keys, values, key_w, value_w))
    assert losses[4] > losses[12] > 0
    wrapper = CompressedKVModelWrapper(model, compressor, fast_decode=True)
    try:
        prompt = windows[:2, :8]
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
            past_key_values=wrapper.new_cache(), pad_token_id=0,
        )  # fmt: skip
    finally:
        wrapper.close()
    assert out.shape == (2, 12)


@pytest.mark.parametrize("family,projection", CASES, ids=IDS)
def test_sensitivity_pass_runs(family, projection):
    model = _model(BUILDERS[family])
    geometry = kv_geometry(model)
    metrics = measure_sensitivity(model, geometry, _windows(2, 16), batch_size=2, attention_tokens=16, progress=False)
    for name in ("fisher_k", "fisher_v", "eig_k", "eig_v"):
        curve = torch.as_tensor(metrics.curves[name])
        assert curve.shape[:2] == (geometry.num_layers, geometry.num_kv_heads) and torch.isfinite(curve).all()


# ---------------------------------------------------------------------- the CLI end to end on a non-Llama model
@pytest.fixture(scope="module")
def tiny_phi_path(tmp_path_factory, tiny_tokenizer):
    """A Phi model (partial rotary split in the attention, self_attn.dense) with the tiny tokenizer.

    (GPT-NeoX would fail in kvlight.compressors.provenance, which knows only k_proj/v_proj and GPT-2's c_attn.)"""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config(
        "phi", bos_token_id=tiny_tokenizer.eos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id, pad_token_id=tiny_tokenizer.eos_token_id,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("phi") / "phi"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def test_analyze_and_calibrate_a_phi_model(tiny_phi_path, tmp_path, kvlight_cache, monkeypatch):
    from helpers import tiny_calibrate_args

    from kvlight.cli import main

    monkeypatch.setattr(sys, "argv", ["kvlight"])
    analysis = tmp_path / "analysis"
    measure = ["--calibration-samples", "4", "--eval-samples", "2", "--seq-len", "32", "--attention-tokens", "16"]
    argv = ["analyze", "--model", tiny_phi_path, "--output-dir", str(analysis), "--strategy", "budget", *measure]
    assert main([*argv, "--generate-compression-config", "--target-memory-reduction", "0.5", "--algo", "pca"]) == 0
    assert (analysis / "fim_metrics.json").is_file()
    assert json.loads((analysis / "compression_config.json").read_text())
    output = tmp_path / "out"
    extra = ("--compressor", "kvsplice", "--rank-k", "8", "--rank-v", "8", "--key-objective", "query",
             "--value-objective", "output", "--epochs", "1")  # fmt: skip
    assert main(tiny_calibrate_args(tiny_phi_path, output, *extra)) == 0
    results = json.loads((output / "calibration_results_kvsplice.json").read_text())
    assert results and (output / "compressor_kvsplice.pt").is_file()

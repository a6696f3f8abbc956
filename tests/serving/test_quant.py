"""Quantized latents: the stored bytes are exactly what the accounting says, and precision orders the error."""

from __future__ import annotations

import math

import pytest
import torch

from kvlight.hf import dynamic_cache
from kvlight.serving.cache import CompressedCache
from kvlight.serving.positions import PositionTracker
from kvlight.serving.quant import LatentQuantizer
from tests.helpers import HEAD_DIM, chunked_logits, held_tensors, nbytes

#: bits -> (bytes per latent value as packed codes, has per-group scale and zero)
BITS = {8: (1.0, True), 4: (0.5, True), 2: (0.25, True), "fp8": (1.0, False)}


@pytest.mark.parametrize("bits", list(BITS))
@pytest.mark.parametrize("width,group", [(40, 32), (48, 16), (7, 64)])
def test_quantizer_bytes_match_formula(bits, width, group):
    torch.manual_seed(0)
    z = torch.randn(3, 11, width) * torch.linspace(4, 0.1, width)
    quantizer = LatentQuantizer(bits, group, torch.linspace(4, 0.1, width))
    stored = quantizer.quantize(z)
    per_value, scaled = BITS[bits]
    groups = math.ceil(width / group)
    expected = 3 * 11 * (math.ceil(width * per_value) + (4 * groups if scaled else 0))
    assert nbytes(stored.tensors()) == expected
    assert quantizer.dequantize(stored, torch.float32).shape == z.shape


def test_error_falls_as_bits_rise():
    torch.manual_seed(0)
    scale = torch.linspace(4, 0.1, 64)
    z = torch.randn(2, 50, 64) * scale
    errors = []
    for bits in (2, 4, 8):
        quantizer = LatentQuantizer(bits, 32, scale)
        errors.append(((quantizer.dequantize(quantizer.quantize(z), torch.float32) - z) ** 2).mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-3 * (z**2).mean().item()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("bits", [8, 4, 2, "fp8"])
def test_cache_accounting_with_quantized_latents(arch, bits, tiny_models, tiny_windows, fitted_compressor):
    model = tiny_models[arch]
    compressor = fitted_compressor(arch, "pca", rank=8, latent_bits=bits, sink_tokens=2, recent_window=5)
    tracker = PositionTracker(model) if arch == "llama" else None
    try:
        cache = CompressedCache(compressor, tracker)
        input_ids = tiny_windows["eval"][:2]
        chunked_logits(model, input_ids, cache, chunk=8)
        # Walk what each layer holds, leaving out the back-reference to the cache and the per-model static
        # channel scales of the quantizers (part of the compressor's weights, not of the per-token storage).
        held = []
        for layer in cache.layers:
            shared = {"positions", "scratch", "codecs", "settings", "handoff"}  # the cache's, counted once
            fields = {k: v for k, v in vars(layer).items() if k not in shared}
            for store in (layer.latent_k, layer.latent_v):
                fields[id(store)] = {k: v for k, v in vars(store).items() if k != "quantizer"}
            fields.pop("latent_k"), fields.pop("latent_v")
            held += held_tensors(fields)
        positions = [] if tracker is None else [cache.position_log.positions]
        assert cache.allocated_bytes() == nbytes(held) + nbytes(positions)
        per_value, scaled = BITS[bits]
        batch, compressed = input_ids.shape[0], input_ids.shape[1] - 2 - 5
        layers, heads = compressor.num_layers, compressor.num_kv_heads
        width = heads * 8  # latent channels per layer and kind
        latent = 2 * layers * batch * compressed * (math.ceil(width * per_value) + (4 if scaled else 0))
        exact = 2 * layers * batch * heads * (2 + 5) * HEAD_DIM * 4  # float32 tiny models
        assert cache.stored_bytes() == latent + exact + nbytes(positions)
    finally:
        if tracker is not None:
            tracker.close()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logit_error_orders_by_precision(arch, tiny_models, tiny_windows, fitted_compressor):
    """At full rank the only loss is quantization: int8 ~ exact, int4 worse, int2 worst."""
    model = tiny_models[arch]
    input_ids = tiny_windows["eval"][:2]
    reference = chunked_logits(model, input_ids, dynamic_cache(), chunk=8)
    tracker = PositionTracker(model) if arch == "llama" else None
    errors = {}
    try:
        for bits in (8, 4, 2):
            compressor = fitted_compressor(arch, "pca", latent_bits=bits)
            logits = chunked_logits(model, input_ids, CompressedCache(compressor, tracker), chunk=8)
            errors[bits] = (logits - reference).abs().mean().item()
    finally:
        if tracker is not None:
            tracker.close()
    assert errors[8] < errors[4] < errors[2]
    assert errors[8] < 0.02 * reference.abs().mean().item()

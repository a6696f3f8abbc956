"""Bits per principal direction (kvlight.widths): packed codes, static steps, and the cache that stores them.

What must hold: every width packs and unpacks exactly; the bytes held are the bytes counted; the straight-through
fake quantizer gives the stored values (and learned steps their LSQ gradient); widths of only 16 and 0 are PCA at
that rank, bit for bit; 8 bits everywhere costs (almost) nothing; fitted steps beat the Gaussian rule on heavy-tailed latents; configs with
widths round-trip through JSON and save_pretrained, and bad widths are one-line errors naming the key.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import ARCHS, HEAD_DIM, chunked_logits, held_tensors, mixed_widths, nbytes

from kvlight.calibration.options import CompressionOptions
from kvlight.compressors.compressor import KVCompressor, load_compressor
from kvlight.compressors.statistics import STEP_MULTIPLIERS, check_headroom, grid_errors, levels_of, step_offset
from kvlight.compressors.widths import WIDTHS
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError
from kvlight.geometry import kv_geometry
from kvlight.serving.cache import CacheSettings, CompressedCache
from kvlight.serving.positions import PositionTracker
from kvlight.serving.widths import (
    FIELDS,
    DirectionQuantizer,
    direction_quantizer,
    head_layout,
    padded_bytes_per_token,
)


def quantizer_for(widths: list[int], seed: int = 0, exact_dtype=torch.float32):
    torch.manual_seed(seed)
    widths_t = torch.tensor(widths)
    sigma = torch.rand(len(widths)) + 0.5
    center = torch.randn(len(widths))
    step, offset = step_offset(center, sigma, widths_t)
    return DirectionQuantizer(widths_t, step, offset, exact_dtype), center, sigma


# ---------------------------------------------------------------------- packing
@pytest.mark.parametrize("width", [w for w in WIDTHS if 0 < w < 16])
def test_every_code_of_every_width_survives_packing(width):
    channels = 13  # not a multiple of any packing factor: the last byte of each field is partial
    quantizer, _, _ = quantizer_for([width] * channels)
    codes = torch.randint(0, 2**width, (2, 5, channels), dtype=torch.uint8)
    z = quantizer.offset + quantizer.step * codes.float()  # exactly on the grid
    packed = quantizer.quantize(z)
    assert torch.equal(quantizer.codes(z), codes)
    torch.testing.assert_close(quantizer.dequantize(packed, torch.float32), z, rtol=0, atol=1e-5)
    expected = sum(math.ceil(channels * size / 8) for size, _ in FIELDS[width])
    assert nbytes(packed.tensors()) == 2 * 5 * expected == 2 * 5 * quantizer.bytes_per_token()


#: width tables whose fields take every size, shifted and not, with exact and dropped channels between them
PACK_CASES = {
    "every-width": [16, 8, 6, 5, 4, 3, 2, 1, 0] * 3,
    "one-width-per-byte-boundary": [3] * 11 + [1] * 5,
    "wide-only": [8, 8, 16, 6],
    "narrow-only": [1, 2, 1, 2, 1],
}


@pytest.mark.parametrize("case", PACK_CASES)
@pytest.mark.parametrize("rows", [(1, 16), (3, 1), (2, 400)], ids=["decode-flush", "batch", "prefill"])
def test_both_packings_give_the_same_bytes(case, rows):
    """A decode step's flush packs bit by bit, a prefill field by field: byte for byte the same codes."""
    widths = PACK_CASES[case]
    quantizer, _, _ = quantizer_for(widths)
    levels = (2 ** torch.tensor(widths)[quantizer.coded_index] - 1).clamp_min(1)
    codes = (torch.rand(*rows, len(quantizer.coded_index)) * (levels + 1)).floor().clamp_max(levels).to(torch.uint8)
    by_fields, by_bits = quantizer._pack_fields(codes), quantizer._pack_by_bits(codes)
    assert by_fields.dtype == by_bits.dtype == torch.uint8
    assert torch.equal(by_fields, by_bits)
    z = quantizer.offset + quantizer.step * torch.zeros(*rows, len(widths))
    z[..., quantizer.coded_index] += quantizer.step[quantizer.coded_index] * codes.float()
    assert torch.equal(quantizer.quantize(z).codes, by_fields)  # whichever path quantize takes for this size


def test_mixed_widths_bytes_match_the_formula_and_values_round_trip():
    widths = [16, 8, 6, 5, 4, 3, 2, 1, 0] * 3
    quantizer, center, sigma = quantizer_for(widths)
    z = center + sigma * torch.randn(4, 7, len(widths))
    packed = quantizer.quantize(z)
    assert nbytes(packed.tensors()) == 4 * 7 * quantizer.bytes_per_token()
    assert quantizer.bytes_per_token() == padded_bytes_per_token([widths], exact_itemsize=4)
    restored = quantizer.dequantize(packed, torch.float32)
    widths_t = torch.tensor(widths)
    exact, dropped = widths_t == 16, widths_t == 0
    assert torch.equal(restored[..., exact], z[..., exact])
    assert torch.equal(restored[..., dropped], center[dropped].expand(4, 7, -1))
    coded = ~(exact | dropped)
    error = (restored - z)[..., coded].abs()
    levels = 2.0 ** widths_t[coded].float() - 1
    inside = (z[..., coded] >= quantizer.offset[coded]) & (
        z[..., coded] <= quantizer.offset[coded] + quantizer.step[coded] * levels
    )
    assert (error[inside] <= quantizer.step[coded].expand_as(error)[inside] / 2 + 1e-5).all()


@pytest.mark.parametrize(
    "splits, widths",
    [
        ([5, 5, 5], [16, 8, 6, 0, 1] + [5, 4, 3, 2, 0] + [0, 0, 16, 3, 3]),  # heads with 4, 4 and 3 stored channels
        ([4, 4], [2, 2, 2, 2] + [16, 16, 0, 0]),  # no field above shift 0; a head of exact channels only
        ([3, 3], [0, 0, 0] + [4, 1, 8]),  # a head with nothing stored: all padding
    ],
)
def test_the_per_head_operand_holds_each_heads_codes_in_order(splits, widths):
    """The fast path's operand: row j of head h is the code (or exact value) of that head's j-th stored channel."""
    quantizer, center, sigma = quantizer_for(widths)
    z = center + sigma * torch.randn(2, 9, len(widths))
    packed = quantizer.quantize(z)
    layout = head_layout(quantizer, splits)
    operand = layout.operand(packed, torch.float32)  # [B, H, n, r_max]
    codes = torch.zeros(2, 9, len(widths))
    codes[..., quantizer.coded_index] = quantizer.codes(z).float()
    codes[..., quantizer.exact_index] = z[..., quantizer.exact_index]
    start = 0
    for h, rank in enumerate(splits):
        stored = [c for c in range(start, start + rank) if widths[c] > 0]
        assert layout.channel[h, : len(stored)].tolist() == stored
        assert torch.equal(operand[:, h, :, : len(stored)], codes[..., stored])
        assert not operand[:, h, :, len(stored) :].any()  # padding rows read zero
        start += rank


def test_fake_quantize_gives_the_stored_values_and_passes_gradients_inside_the_grid():
    widths = [16, 8, 4, 3, 1, 0, 0]
    quantizer, center, sigma = quantizer_for(widths, exact_dtype=torch.bfloat16)
    z = (center + 2 * sigma * torch.randn(3, 9, len(widths))).requires_grad_(True)  # wide: some codes clip
    fake = quantizer.fake_quantize(z)
    stored = quantizer.dequantize(quantizer.quantize(z.detach()), torch.float32)
    torch.testing.assert_close(fake.detach(), stored, rtol=0, atol=1e-6)
    fake.sum().backward()
    widths_t = torch.tensor(widths)
    scaled = (z.detach() - quantizer.offset) / quantizer._safe_step
    inside = (scaled.round() >= 0) & (scaled.round() <= quantizer.levels)  # where rounding stays in the grid
    coded = (widths_t > 0) & (widths_t < 16)
    expected = torch.where(widths_t == 16, 1.0, torch.where(coded, inside.float(), 0.0))
    assert (inside | ~coded).logical_not().any()  # the test clips something
    assert torch.equal(z.grad, expected)


def test_fake_quantize_gives_learned_steps_the_lsq_gradient():
    """With live steps, d(z_hat)/d(step) is code - (z - offset) / step inside the grid and the code where it clips;
    d(z_hat)/d(offset) is 0 inside and 1 where it clips."""
    widths = [4, 2, 1, 16, 0]
    quantizer, center, sigma = quantizer_for(widths)
    step = quantizer.step.clone().requires_grad_(True)
    offset = quantizer.offset.clone().requires_grad_(True)
    z = center + 2 * sigma * torch.randn(50, len(widths))
    fake = quantizer.fake_quantize(z, step, offset)
    torch.testing.assert_close(fake, quantizer.fake_quantize(z), rtol=0, atol=1e-6)
    fake.sum().backward()
    scaled = (z - quantizer.offset) / quantizer._safe_step
    code = scaled.round().clamp_min(0).minimum(quantizer.levels)
    inside = (scaled.round() >= 0) & (scaled.round() <= quantizer.levels)
    coded = torch.tensor([True, True, True, False, False])
    expected_step = torch.where(inside, code - scaled, code).sum(0)
    expected_offset = (~inside).float().sum(0)
    torch.testing.assert_close(step.grad[coded], expected_step[coded], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(offset.grad[coded], expected_offset[coded])
    assert not step.grad[~coded].any()


def test_fitted_steps_beat_the_gaussian_rule_on_heavy_tailed_latents():
    torch.manual_seed(0)
    z = torch.distributions.Laplace(0.0, 1.0).sample((4000, 6))
    sigma, center = z.std(0), torch.zeros(6)
    gaussian = STEP_MULTIPLIERS.index(1.0)
    for width, gain in ((3, 0.95), (4, 0.8), (8, 0.5)):  # Laplace tails: the Gaussian step clips them
        errors = grid_errors(z, center, sigma, width)  # [C, G]
        assert (errors.min(-1).values < gain * errors[:, gaussian]).all(), width


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("headroom", [1.3, 2.0])
def test_widen_steps_widens_every_coded_step_around_its_centre(arch, headroom, tiny_models, tiny_rows):
    geometry = kv_geometry(tiny_models[arch])
    keys, values = tiny_rows[arch]["calib"]
    rows = [{"keys": keys, "values": values}]
    fitted = {}
    for factor in (1.0, headroom):
        compressor = KVCompressor(widths_config(geometry), geometry)
        compressor.fit_statistics(rows)
        compressor.widen_steps(factor)
        fitted[factor] = compressor
    for key in fitted[1.0].width_codecs():
        plain, wide = fitted[1.0].codec(*key), fitted[headroom].codec(*key)
        (step, offset), (wide_step, wide_offset) = plain.quantizer_steps(), wide.quantizer_steps()
        levels = levels_of(plain.widths)
        coded = levels > 0
        torch.testing.assert_close(wide_step[coded], headroom * step[coded])
        # the grid stays centred where the search centred it; exact and dropped channels are untouched
        torch.testing.assert_close(wide_offset + wide_step * levels / 2, offset + step * levels / 2)
        assert torch.equal(wide_step[~coded], step[~coded]) and torch.equal(wide_offset[~coded], offset[~coded])


def test_headroom_cuts_the_error_of_latents_wider_than_the_calibration_rows():
    """What the headroom is for: the least-error steps of the calibration rows clip text whose latents reach
    further; widened steps trade more rounding error on the calibration rows for much less clipping there."""
    torch.manual_seed(0)
    widths = torch.tensor([2] * 8)
    calibration, wider = torch.randn(4000, 8), 1.6 * torch.randn(4000, 8)
    center, sigma = torch.zeros(8), calibration.std(0)

    def error(z, headroom):
        step, offset = step_offset(center, sigma, widths, headroom)
        quantizer = DirectionQuantizer(widths, step, offset, torch.float32)
        return (quantizer.dequantize(quantizer.quantize(z), torch.float32) - z).pow(2).mean().item()

    assert error(wider, 1.3) < 0.9 * error(wider, 1.0)
    assert error(calibration, 1.3) < 1.3 * error(calibration, 1.0)  # 2 bits, Gaussian: about 1.25x


@pytest.mark.parametrize("headroom", [0.9, 0.0, -1.0, 4.5, float("nan"), float("inf"), True, "1.3"])
def test_a_bad_step_headroom_is_a_one_line_error(headroom):
    with pytest.raises(ConfigError, match="step_headroom must be a number from 1") as error:
        check_headroom(headroom)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="step_headroom"):
        CompressionOptions(step_headroom=headroom)


# ---------------------------------------------------------------------- config
def widths_config(geometry, bits=mixed_widths, **extra) -> CompressionConfig:
    config = CompressionConfig.uniform(
        geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=geometry.head_dim, algo="pca", **extra
    )
    for (layer, head), entry in config.per_layer_head.items():
        entry.pop("rank_k"), entry.pop("rank_v")
        entry["bits_k"], entry["bits_v"] = bits(layer, head)
    return CompressionConfig.from_dict(config.to_dict())


BAD_WIDTHS = {
    "width-7": (lambda e: e.update(bits_k=[7] * HEAD_DIM), 'per_layer_head["0/0"].bits_k holds width 7'),
    "not-a-list": (lambda e: e.update(bits_v=4), 'per_layer_head["0/0"].bits_v must be a list'),
    "bool": (lambda e: e.update(bits_k=[True] * HEAD_DIM), "holds width True"),
    "short": (lambda e: e.update(bits_k=[4] * 5), 'per_layer_head["0/0"].bits_k has 5 widths but'),
    "with-rank": (lambda e: e.update(rank=8), 'per_layer_head["0/0"] has both bits_k and rank'),
    "with-rank-v": (lambda e: e.update(rank_v=8), "has both bits_v and rank_v"),
}


@pytest.mark.parametrize("case", list(BAD_WIDTHS))
def test_bad_widths_are_one_line_errors_naming_the_key(case, tiny_models):
    geometry = kv_geometry(tiny_models["llama"])
    data = widths_config(geometry).to_dict()
    mutate, message = BAD_WIDTHS[case]
    mutate(data["per_layer_head"]["0/0"])
    with pytest.raises(ConfigError) as error:
        CompressionConfig.from_dict(data).validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_widths_for_some_heads_only_are_refused(tiny_models):
    geometry = kv_geometry(tiny_models["llama"])
    data = widths_config(geometry).to_dict()
    data["per_layer_head"]["1/0"] = {"rank": 8}
    with pytest.raises(ConfigError, match=r'per_layer_head\["1/0"\] lacks bits_k'):
        CompressionConfig.from_dict(data).validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)


@pytest.mark.parametrize("arch", ARCHS)
def test_widths_round_trip_through_json_and_save_pretrained(arch, tiny_models, tiny_rows, tmp_path):
    geometry = kv_geometry(tiny_models[arch])
    config = widths_config(geometry, sink_tokens=1, recent_window=2)
    config.to_json(tmp_path / "cfg.json")
    again = CompressionConfig.from_json(tmp_path / "cfg.json")
    assert again.to_dict() == config.to_dict()
    assert again.head(0, 0, HEAD_DIM).bits_k == tuple(mixed_widths(0, 0)[0])
    assert len((tmp_path / "cfg.json").read_text().splitlines()) < 30  # one line per head, not per width

    compressor = KVCompressor(again, geometry)
    keys, values = tiny_rows[arch]["calib"]
    compressor.fit_statistics([{"keys": keys, "values": values}])
    compressor.save_pretrained(tmp_path / "saved")
    loaded = load_compressor(tmp_path / "saved", geometry)
    assert loaded.config.to_dict() == compressor.config.to_dict()
    for (name, tensor), (other, loaded_tensor) in zip(compressor.state_dict().items(), loaded.state_dict().items()):
        assert name == other and torch.equal(tensor, loaded_tensor)
    assert any(name.endswith("code_step") for name in loaded.state_dict())


# ---------------------------------------------------------------------- the cache
def cache_for(model, compressor):
    geometry = kv_geometry(model)
    tracker = PositionTracker(model) if geometry.rope else None
    return CompressedCache(compressor, tracker), tracker


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return math.exp(-logp.gather(-1, ids[:, 1:, None]).mean().item())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rank", [5, 11])
def test_widths_of_16_and_0_are_pca_at_that_rank_exactly(arch, rank, tiny_models, tiny_windows, tiny_rows):
    model = tiny_models[arch]
    geometry = kv_geometry(model)
    keys, values = tiny_rows[arch]["calib"]
    rows = [{"keys": keys, "values": values}]
    head = [16] * rank + [0] * (HEAD_DIM - rank)
    widths = KVCompressor(widths_config(geometry, bits=lambda layer, h: (head, head), sink_tokens=1), geometry)
    pca = KVCompressor(
        CompressionConfig.uniform(
            geometry.num_layers, geometry.num_kv_heads, HEAD_DIM, rank=rank, algo="pca", sink_tokens=1
        ),
        geometry,
    )
    widths.fit_statistics(rows)
    pca.fit_statistics(rows)
    ids = tiny_windows["eval"][:4]
    outputs = []
    for compressor in (widths, pca):
        cache, tracker = cache_for(model, compressor)
        with torch.no_grad():
            outputs.append((chunked_logits(model, ids, cache, chunk=8), cache.stored_bytes()))
        if tracker is not None:
            tracker.close()
    assert torch.equal(outputs[0][0], outputs[1][0])
    assert outputs[0][1] == outputs[1][1]


@pytest.mark.parametrize("arch", ARCHS)
def test_bytes_held_are_the_bytes_counted(arch, tiny_models, tiny_windows, fitted_compressor):
    model = tiny_models[arch]
    compressor = fitted_compressor(arch, "pca", bits=mixed_widths, sink_tokens=2, recent_window=3)
    cache, tracker = cache_for(model, compressor)
    ids = tiny_windows["eval"][:3]
    with torch.no_grad():
        chunked_logits(model, ids, cache, chunk=5)
    if tracker is not None:
        tracker.close()
    held = [t for layer in cache.layers for t in held_tensors(layer) if t.numel()]
    assert cache.stored_bytes() == sum(layer_bytes(layer) for layer in cache.layers) + position_bytes(cache)
    # What is held beyond the counted tensors is buffer slack only (LatentStore grows in chunks).
    assert nbytes(held) >= sum(layer_bytes(layer) for layer in cache.layers)
    compressed = cache.layers[0].num_compressed
    per_token = sum(
        direction_quantizer(codec, torch.float32).bytes_per_token()
        for codec in (compressor.codec(0, "k"), compressor.codec(0, "v"))
    )
    latent = sum(nbytes(store.tensors()) for store in (cache.layers[0].latent_k, cache.layers[0].latent_v))
    assert latent == 3 * compressed * per_token


def layer_bytes(layer) -> int:
    return nbytes(layer.stored_tensors())


def position_bytes(cache) -> int:
    positions = cache.position_log.positions
    return 0 if positions is None else nbytes([positions])


@pytest.mark.parametrize("arch", ARCHS)
def test_eight_bits_everywhere_costs_under_half_a_percent(arch, tiny_models, tiny_windows, fitted_compressor):
    model = tiny_models[arch]
    compressor = fitted_compressor(arch, "pca", bits=lambda layer, head: ([8] * HEAD_DIM, [8] * HEAD_DIM))
    ids = tiny_windows["eval"]
    with torch.no_grad():
        base = perplexity(model(input_ids=ids).logits, ids)
        cache, tracker = cache_for(model, compressor)
        compressed = perplexity(chunked_logits(model, ids, cache, chunk=8), ids)
    if tracker is not None:
        tracker.close()
    assert abs(compressed / base - 1) < 0.005, (base, compressed)


@pytest.mark.parametrize("arch", ARCHS)
def test_divergence_rises_as_widths_fall(arch, tiny_models, tiny_windows, fitted_compressor):
    """KL to the exact model's predictions (the tiny models barely use attention, so perplexity alone is noise)."""
    from kvlight.calibration.distill import token_kl

    model = tiny_models[arch]
    ids = tiny_windows["eval"]
    with torch.no_grad():
        exact = model(input_ids=ids).logits
    results = []
    for width in (8, 4, 2, 1, 0):
        compressor = fitted_compressor(arch, "pca", bits=lambda layer, head, w=width: ([w] * HEAD_DIM, [w] * HEAD_DIM))
        cache, tracker = cache_for(model, compressor)
        with torch.no_grad():
            results.append(float(token_kl(exact, chunked_logits(model, ids, cache, chunk=8))))
        if tracker is not None:
            tracker.close()
    assert results == sorted(results) and results[0] < 0.01 * results[-1], results


@pytest.mark.parametrize("arch", ARCHS)
def test_a_float32_model_can_store_its_cache_in_bfloat16(arch, tiny_models, tiny_windows, fitted_compressor):
    """``storage_dtype``: exact tokens and exact channels in 16 bits (what a 16-bit deployment holds), attention still
    reads float32; fast decode still gives the plain path's tokens."""
    from kvlight.serving.wrapper import CompressedKVModelWrapper

    model = tiny_models[arch]
    compressor = fitted_compressor(arch, "pca", bits=mixed_widths, sink_tokens=2, recent_window=3)
    ids = tiny_windows["eval"][:3]
    outputs = {}
    for storage in (None, torch.bfloat16):
        tracker = PositionTracker(model) if kv_geometry(model).rope else None
        cache = CompressedCache(compressor, tracker, settings=CacheSettings(storage_dtype=storage))
        with torch.no_grad():
            outputs[storage] = (chunked_logits(model, ids, cache, chunk=5), cache)
        if tracker is not None:
            tracker.close()
    (full_logits, full_cache), (half_logits, half_cache) = outputs[None], outputs[torch.bfloat16]
    assert full_logits.dtype == half_logits.dtype == torch.float32
    layer = half_cache.layers[0]
    assert layer.sink_k.dtype == layer.keys.dtype == torch.bfloat16
    exact = sum(nbytes([getattr(full_cache.layers[0], n)]) for n in ("sink_k", "sink_v", "keys", "values"))
    assert full_cache.stored_bytes() - half_cache.stored_bytes() >= len(half_cache.layers) * exact // 2
    torch.testing.assert_close(half_logits, full_logits, atol=0.05, rtol=0.05)
    tokens = []
    for fast in (False, True):
        wrapper = CompressedKVModelWrapper(model, compressor, fast_decode=fast, storage_dtype=torch.bfloat16)
        try:
            tokens.append(wrapper.generate(input_ids=ids[:, :20], max_new_tokens=8, do_sample=False, pad_token_id=0))
        finally:
            wrapper.close()
    assert torch.equal(tokens[0], tokens[1])


@pytest.mark.parametrize("rows", ["captured", "heavy-tailed"])
def test_fit_statistics_fits_the_static_steps_on_the_rows(rows, tiny_models, tiny_rows):
    """fit_statistics runs the step search after the moments: on the rows, the fitted steps reconstruct the coded
    latents at least as well as the Gaussian rule they start from (reset_steps), and much better on heavy tails."""
    geometry = kv_geometry(tiny_models["llama"])
    keys, values = tiny_rows["llama"]["calib"]
    if rows == "heavy-tailed":  # independent Laplace coordinates of decaying scale: the PCA latents are Laplace too
        torch.manual_seed(0)
        scale = torch.linspace(3.0, 0.1, HEAD_DIM)
        laplace = lambda t: torch.distributions.Laplace(0.0, 1.0).sample(t.shape) * scale  # noqa: E731
        keys, values = laplace(keys), laplace(values)
    compressor = KVCompressor(widths_config(geometry), geometry)
    compressor.fit_statistics([{"keys": keys, "values": values}])
    fitted = {k: v.clone() for k, v in compressor.state_dict().items() if k.endswith("code_step")}

    def error() -> float:
        total = 0.0
        for layer in range(geometry.num_layers):
            for kind, data in (("k", keys), ("v", values)):
                codec = compressor.codec(layer, kind)
                z = codec.encode(data[:, layer].unsqueeze(2).transpose(0, 2))
                quantizer = direction_quantizer(codec, torch.float32)
                coded = quantizer.coded_index
                restored = quantizer.dequantize(quantizer.quantize(z), torch.float32)
                total += float(((restored - z)[..., coded] ** 2).sum())
        return total

    with torch.no_grad():
        after = error()
        compressor.reset_steps()
        before = error()
    assert any(not torch.equal(compressor.state_dict()[name], step) for name, step in fitted.items())
    assert after <= before * (0.95 if rows == "heavy-tailed" else 1.0), (before, after)

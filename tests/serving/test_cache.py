"""The compressed cache against DynamicCache: full-rank equivalence, exact sink/recent tokens, byte accounting,
pre-RoPE keys. Every case runs on the tiny Llama (GQA + RoPE) and the tiny GPT-2 (learned positions)."""

import pytest
import torch
from helpers import ARCH_BACKEND, ARCHS, HEAD_DIM, chunked_logits, held_tensors, nbytes
from transformers import DynamicCache

from kvlight.calibration.capture import capture_kv
from kvlight.geometry import kv_geometry
from kvlight.serving.cache import CacheSettings, CompressedCache, dynamic_cache_bytes
from kvlight.serving.latents import LatentStore
from kvlight.serving.positions import PositionTracker
from kvlight.serving.wrapper import CompressedKVModelWrapper

ATOL = 1e-4


@pytest.fixture
def wrap(tiny_models):
    """``wrap(arch, compressor)`` -> CompressedKVModelWrapper, closed after the test."""
    made = []

    def make(arch, compressor):
        wrapper = CompressedKVModelWrapper(tiny_models[arch], compressor)
        made.append(wrapper)
        return wrapper

    yield make
    for wrapper in made:
        wrapper.close()


def assert_fitted(compressor):
    """The statistics pass really ran: bases and means are not the unfitted defaults (identity, zero)."""
    projection = compressor.codec(0, "k").heads[0]
    assert projection.mean.abs().max() > 1e-3
    basis = projection.basis if hasattr(projection, "basis") else projection.expand
    assert (basis - torch.eye(HEAD_DIM)[:, : projection.rank]).abs().max() > 0.1


# ---------------------------------------------------------------------- 1. full rank == DynamicCache
@pytest.mark.parametrize("chunk", [None, 8, 5], ids=["single", "chunks8", "chunks5"])
@pytest.mark.parametrize("arch,algo", ARCH_BACKEND)
def test_full_rank_logits_equal_dynamic_cache(arch, algo, chunk, tiny_models, tiny_windows, fitted_compressor, wrap):
    model = tiny_models[arch]
    compressor = fitted_compressor(arch, algo)
    assert_fitted(compressor)
    wrapper = wrap(arch, compressor)
    input_ids = tiny_windows["eval"][:3]  # batch of 3 windows of 32 tokens
    chunk = chunk or input_ids.shape[1]

    expected = chunked_logits(model, input_ids, DynamicCache(), chunk)
    cache = wrapper.new_cache()
    got = chunked_logits(model, input_ids, cache, chunk)

    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # Not vacuous: every token went through the latents (no exact window by default).
    assert all(layer.num_compressed == input_ids.shape[1] for layer in cache.layers)
    assert cache.get_seq_length() == input_ids.shape[1]


@pytest.mark.parametrize("arch,algo", ARCH_BACKEND)
def test_full_rank_wrapper_forward_equals_model(arch, algo, tiny_models, tiny_windows, fitted_compressor, wrap):
    model = tiny_models[arch]
    wrapper = wrap(arch, fitted_compressor(arch, algo))
    input_ids = tiny_windows["eval"][:2]
    torch.testing.assert_close(
        wrapper(input_ids=input_ids).logits, model(input_ids=input_ids).logits, atol=ATOL, rtol=0
    )


PROMPTS = {1: ["The future of AI is"], 2: ["The future of AI is", "Keys and values of every previous token"]}
DECODING = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 0, "temperature": 1.0},
    "beam": {"do_sample": False, "num_beams": 3},
}


@pytest.mark.parametrize("decoding", list(DECODING))
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("arch,algo", ARCH_BACKEND)
def test_full_rank_generate_equals_model_generate(
    arch, algo, batch, decoding, tiny_models, tiny_tokenizer, fitted_compressor, wrap
):
    model = tiny_models[arch]
    wrapper = wrap(arch, fitted_compressor(arch, algo))
    tiny_tokenizer.padding_side = "left"
    inputs = tiny_tokenizer(PROMPTS[batch], return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=20, pad_token_id=tiny_tokenizer.eos_token_id, **DECODING[decoding])

    torch.manual_seed(1234)
    expected = model.generate(**inputs, **kwargs)
    torch.manual_seed(1234)
    cache = wrapper.new_cache()
    got = wrapper.generate(**inputs, past_key_values=cache, **kwargs)

    assert torch.equal(got, expected)
    assert got.shape[1] > inputs["input_ids"].shape[1]
    # The compressed cache served the whole generation: the prompt went to latents at once, decode steps in blocks
    # of compress_block (the rest waits exact in the window, counted as exact).
    layer = cache.layers[0]
    assert layer.num_compressed >= inputs["input_ids"].shape[1]
    assert layer.num_compressed + layer.keys.shape[2] == got.shape[1] - 1
    assert layer.keys.shape[2] < cache.compress_block


@pytest.mark.parametrize("arch,algo", ARCH_BACKEND)
def test_sampling_same_seed_same_tokens_and_new_cache_per_call(arch, algo, tiny_models, fitted_compressor, wrap):
    wrapper = wrap(arch, fitted_compressor(arch, algo))
    input_ids = torch.tensor([[5, 17, 42, 99, 3]])
    kwargs = dict(max_new_tokens=15, do_sample=True, top_k=0, pad_token_id=0)
    torch.manual_seed(7)
    first = wrapper.generate(input_ids=input_ids, **kwargs)
    torch.manual_seed(7)
    second = wrapper.generate(input_ids=input_ids, **kwargs)  # a fresh cache: nothing leaks from the first call
    assert torch.equal(first, second)


def test_low_rank_changes_logits(tiny_models, tiny_windows, fitted_compressor, wrap):
    """Control for the equivalence tests: a lossy compressor must move the logits (the cache is really used)."""
    model = tiny_models["llama"]
    wrapper = wrap("llama", fitted_compressor("llama", "pca", rank=2))
    input_ids = tiny_windows["eval"][:2]
    diff = (wrapper(input_ids=input_ids).logits - model(input_ids=input_ids).logits).abs().max()
    assert diff > 1e-2


@pytest.mark.parametrize("arch", ARCHS)
def test_crop_then_continue_equals_dynamic_cache(arch, tiny_models, tiny_windows, fitted_compressor, wrap):
    model = tiny_models[arch]
    wrapper = wrap(arch, fitted_compressor(arch, "pca"))
    prefix, draft, accepted = (
        tiny_windows["eval"][:1, :20],
        tiny_windows["eval"][1:2, :5],
        tiny_windows["eval"][2:3, :4],
    )
    outputs = []
    for cache in (DynamicCache(), wrapper.new_cache()):
        model(input_ids=prefix, past_key_values=cache, use_cache=True)
        model(input_ids=draft, past_key_values=cache, use_cache=True)
        cache.crop(-5)  # reject the 5 draft tokens, as transformers' assisted decoding does
        assert cache.get_seq_length() == 20
        outputs.append(model(input_ids=accepted, past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(outputs[1], outputs[0], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- 8. exact sink / recent tokens
@pytest.mark.parametrize("sink,recent", [(32, 0), (0, 32), (12, 20), (40, 40)])
@pytest.mark.parametrize("arch,algo", ARCH_BACKEND)
def test_all_exact_config_equals_dynamic_cache(arch, algo, sink, recent, tiny_models, tiny_windows, fitted_compressor):
    """rank 2 everywhere, but sink + recent cover the whole sequence: nothing is compressed, logits identical."""
    model = tiny_models[arch]
    compressor = fitted_compressor(arch, algo, rank=2)
    tracker = PositionTracker(model) if kv_geometry(model).rope else None
    try:
        cache = CompressedCache(compressor, tracker, settings=CacheSettings(sink_tokens=sink, recent_window=recent))
        input_ids = tiny_windows["eval"][:2]
        got = chunked_logits(model, input_ids, cache, 8)
    finally:
        if tracker is not None:
            tracker.close()
    expected = chunked_logits(model, input_ids, DynamicCache(), 8)
    assert all(layer.num_compressed == 0 for layer in cache.layers)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_disabled_heads_are_stored_exactly(arch, tiny_models, tiny_windows, fitted_compressor, wrap):
    """``enabled: false`` on every head: identity projections, logits equal DynamicCache's."""
    from kvlight.compressors.compressor import KVCompressor
    from kvlight.config import CompressionConfig

    geometry = kv_geometry(tiny_models[arch])
    config = CompressionConfig.uniform(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=2)
    for entry in config.per_layer_head.values():
        entry["enabled"] = False
    compressor = KVCompressor(config, geometry)
    assert config.memory_reduction(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim) == 0.0
    wrapper = wrap(arch, compressor)
    input_ids = tiny_windows["eval"][:2]
    got = chunked_logits(tiny_models[arch], input_ids, wrapper.new_cache(), 8)
    expected = chunked_logits(tiny_models[arch], input_ids, DynamicCache(), 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def record_updates(cache):
    """Wrap every layer's ``update``: per layer, the K/V fed in (all calls, concatenated) and the K/V returned by
    the last call (what attention reads)."""
    fed, returned = {}, {}
    for index, layer in enumerate(cache.layers):
        original = layer.update

        def update(key_states, value_states, *args, _original=original, _index=index, **kwargs):
            old = fed.get(_index)
            fed[_index] = (
                (key_states, value_states)
                if old is None
                else (torch.cat([old[0], key_states], dim=2), torch.cat([old[1], value_states], dim=2))
            )
            keys, values = _original(key_states, value_states, *args, **kwargs)
            returned[_index] = (keys.clone(), values.clone())
            return keys, values

        layer.update = update
    return fed, returned


@pytest.mark.parametrize("sink,recent", [(4, 0), (0, 6), (3, 5)])
@pytest.mark.parametrize("arch,algo", ARCH_BACKEND)
def test_sink_and_recent_tokens_are_bit_exact(arch, algo, sink, recent, tiny_models, tiny_windows, fitted_compressor):
    model = tiny_models[arch]
    compressor = fitted_compressor(arch, algo, rank=2)
    tracker = PositionTracker(model) if kv_geometry(model).rope else None
    input_ids = tiny_windows["eval"][:2]
    try:
        cache = CompressedCache(compressor, tracker, settings=CacheSettings(sink_tokens=sink, recent_window=recent))
        fed, returned = record_updates(cache)
        chunked_logits(model, input_ids, cache, 8)
    finally:
        if tracker is not None:
            tracker.close()
    reference = DynamicCache()
    chunked_logits(model, input_ids, reference, 8)

    total = input_ids.shape[1]
    middle = slice(sink, total - recent)
    for index, layer in enumerate(cache.layers):
        assert layer.num_compressed == total - sink - recent
        exact_reference = (reference.layers[index].keys, reference.layers[index].values)
        for got, given, dynamic in zip(returned[index], fed[index], exact_reference):  # keys, values [B, H, T, D]
            assert got.shape == given.shape == dynamic.shape
            # What attention reads at sink and recent positions is bit-for-bit what the model stored there.
            assert torch.equal(got[:, :, :sink], given[:, :, :sink])
            assert torch.equal(got[:, :, total - recent :], given[:, :, total - recent :])
            # Sinks see only sinks (causal), so they also equal DynamicCache's in every layer.
            assert torch.equal(got[:, :, :sink], dynamic[:, :, :sink])
            # The middle went through rank-2 latents: not exact.
            assert not torch.allclose(got[:, :, middle], given[:, :, middle], atol=1e-3)


# ---------------------------------------------------------------------- 8. byte accounting
BYTE_CASES = [(4, 4, 0, 0), (4, 8, 0, 0), (16, 16, 0, 0), (2, 6, 4, 8)]


@pytest.mark.parametrize("rank_k,rank_v,sink,recent", BYTE_CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_stored_bytes_counts_what_is_held(
    arch, rank_k, rank_v, sink, recent, tiny_models, tiny_windows, fitted_compressor
):
    model = tiny_models[arch]
    geometry = kv_geometry(model)
    compressor = fitted_compressor(arch, "pca", rank_k=rank_k, rank_v=rank_v, sink_tokens=sink, recent_window=recent)
    tracker = PositionTracker(model) if geometry.rope else None
    input_ids = tiny_windows["eval"][:3]
    batch, total = input_ids.shape
    try:
        cache = CompressedCache(compressor, tracker)
        chunked_logits(model, input_ids, cache, 8)
    finally:
        if tracker is not None:
            tracker.close()

    # (a) every tensor the cache holds, found by walking its layers (not through stored_tensors()).
    held = []
    for layer in cache.layers:
        # The collaborators a layer is built with belong to the cache (positions are counted once, below).
        shared = {"positions", "scratch", "codecs", "settings", "handoff"}
        held += held_tensors({k: v for k, v in vars(layer).items() if k not in shared})
    positions = cache.position_log.positions
    held_total = nbytes(held) + (0 if positions is None else nbytes([positions]))
    assert cache.allocated_bytes() == held_total
    # Latent buffers grow in chunks: the slack beyond the stored tokens is under one chunk per layer and kind.
    per_token_latents = geometry.num_kv_heads * (rank_k + rank_v) * 4 * batch
    slack = cache.allocated_bytes() - cache.stored_bytes()
    assert 0 <= slack < geometry.num_layers * LatentStore.GROW * per_token_latents

    # (b) the formula: latent dims x tokens x itemsize + exact tokens + positions.
    itemsize = 4  # float32 K/V
    compressed = total - sink - recent
    latent = geometry.num_layers * batch * compressed * geometry.num_kv_heads * (rank_k + rank_v) * itemsize
    exact = 2 * geometry.num_layers * batch * geometry.num_kv_heads * (sink + recent) * geometry.head_dim * itemsize
    position_bytes = batch * total * 4 if geometry.rope else 0  # int32 positions, RoPE models only
    assert cache.stored_bytes() == latent + exact + position_bytes

    # (c) memory saving of a uniform config = 1 - (rank_k + rank_v) / (2 head_dim), plus the small positions overhead.
    full = dynamic_cache_bytes(geometry, batch, total, torch.float32)
    saving = 1 - cache.stored_bytes() / full
    if sink == recent == 0:
        expected = 1 - (rank_k + rank_v) / (2 * geometry.head_dim)
        assert saving == pytest.approx(expected - position_bytes / full, abs=1e-12)
        assert position_bytes / full < 0.01
        reduction = compressor.config.memory_reduction(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
        assert reduction == pytest.approx(expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_dynamic_cache_bytes_matches_a_real_dynamic_cache(arch, tiny_models, tiny_windows):
    cache = DynamicCache()
    input_ids = tiny_windows["eval"][:2]
    tiny_models[arch](input_ids=input_ids, past_key_values=cache, use_cache=True)
    held = nbytes([t for layer in cache.layers for t in (layer.keys, layer.values)])
    assert dynamic_cache_bytes(kv_geometry(tiny_models[arch]), *input_ids.shape, torch.float32) == held


# ---------------------------------------------------------------------- 9. pre-RoPE keys
def _yarn_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("variant", ["tiny_llama", "yarn_scaled"])
def test_unrotate_inverts_rotate(variant, tiny_models):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_models["llama"] if variant == "tiny_llama" else _yarn_llama()
    tracker = PositionTracker(model)
    try:
        generator = torch.Generator().manual_seed(0)
        keys = torch.randn(2, 2, 12, HEAD_DIM, generator=generator) * 3
        positions = torch.stack([torch.arange(12), torch.arange(100, 112)])
        rotated = tracker.rotate(keys, positions)
        torch.testing.assert_close(tracker.unrotate(rotated, positions), keys, atol=1e-5, rtol=0)
        # rotate() is the model's own RoPE (including any attention scaling).
        cos, sin = tracker.rotary(keys, position_ids=positions)
        reference, _ = apply_rotary_pos_emb(keys, keys, cos, sin)
        torch.testing.assert_close(rotated, reference, atol=1e-6, rtol=0)
    finally:
        tracker.close()
    if variant == "yarn_scaled":
        assert tracker.rotary.attention_scaling != 1.0  # the s^2 term of unrotate is exercised


def _projection_hooks(model, arch):
    """Forward hooks recording each layer's pre-RoPE K and V projections as ``[B, T, H, D]``."""
    from kvlight.geometry import kv_geometry

    geometry = kv_geometry(model)
    heads, dim = geometry.num_kv_heads, geometry.head_dim
    recorded, handles = {}, []
    for index, block in enumerate(model.model.layers if arch == "llama" else model.transformer.h):
        if arch == "llama":
            attention = block.self_attn
            for name, module in (("k", attention.k_proj), ("v", attention.v_proj)):
                handles.append(
                    module.register_forward_hook(
                        lambda m, i, out, key=(index, name): recorded.__setitem__(key, out.unflatten(-1, (heads, dim)))
                    )
                )
        else:

            def split(m, i, out, index=index):
                _, k, v = out.split(heads * dim, dim=-1)
                recorded[(index, "k")] = k.unflatten(-1, (heads, dim))
                recorded[(index, "v")] = v.unflatten(-1, (heads, dim))

            handles.append(block.attn.c_attn.register_forward_hook(split))
    return recorded, handles


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_rows_are_the_projection_outputs(arch, tiny_models, tiny_windows):
    """capture_kv stores keys as k_proj produced them (pre-RoPE) and values as v_proj did, token by token."""
    model = tiny_models[arch]
    geometry = kv_geometry(model)
    windows = tiny_windows["eval"][:2]
    recorded, handles = _projection_hooks(model, arch)
    try:
        reservoir = capture_kv(model, geometry, [windows], capacity=10_000, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    keys, values = reservoir.rows()  # [B*T, L, H, D] in token order while the reservoir fills
    assert keys.shape == (windows.numel(), geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    for layer in range(geometry.num_layers):
        torch.testing.assert_close(keys[:, layer], recorded[(layer, "k")].flatten(0, 1), atol=1e-5, rtol=0)
        torch.testing.assert_close(values[:, layer], recorded[(layer, "v")].flatten(0, 1), atol=1e-6, rtol=0)


def test_compressed_keys_are_pre_rope(tiny_models, tiny_windows, fitted_compressor, wrap):
    """The cache's latents encode k_proj outputs: decoding them gives the pre-RoPE keys (full rank)."""
    model = tiny_models["llama"]
    wrapper = wrap("llama", fitted_compressor("llama", "pca"))
    recorded, handles = _projection_hooks(model, "llama")
    cache = wrapper.new_cache()
    try:
        chunked_logits(model, tiny_windows["eval"][:2], cache, 8)
    finally:
        for handle in handles:
            handle.remove()
    layer = cache.layers[1]
    decoded = wrapper.compressor.decode(
        1, "k", layer.latent_k.read(torch.float32) if hasattr(layer.latent_k, "read") else layer.latent_k
    )
    # recorded holds the last chunk only: compare the last 8 positions.
    torch.testing.assert_close(decoded[:, :, -8:], recorded[(1, "k")].transpose(1, 2), atol=1e-4, rtol=0)


@pytest.mark.parametrize("offsets", [(0, 0), (0, 37), (5, 200)], ids=["same", "row_offset", "both_offset"])
def test_low_rank_keys_are_compressed_pre_rope_at_the_positions_used(
    offsets, tiny_models, tiny_windows, fitted_compressor, wrap
):
    """At rank 4 the keys attention reads are RoPE(PCA_reconstruct(k_proj output)) at the model's own position ids.

    Full-rank tests cannot see wrong positions (unrotate and rotate cancel); a lossy basis fitted on pre-RoPE keys
    can. Rows get different explicit position ids, as left padding gives them, and the window is fed in chunks.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_models["llama"]
    wrapper = wrap("llama", fitted_compressor("llama", "pca", rank=4))
    input_ids = tiny_windows["eval"][:2, :24]
    positions = torch.tensor(offsets).unsqueeze(1) + torch.arange(24)
    pre_rope = {0: [], 1: []}
    handles = [
        layer.self_attn.k_proj.register_forward_hook(lambda m, i, out, index=index: pre_rope[index].append(out))
        for index, layer in enumerate(model.model.layers)
    ]
    cache = wrapper.new_cache()
    _, returned = record_updates(cache)
    try:
        for start in range(0, 24, 8):
            chunk = slice(start, start + 8)
            model(
                input_ids=input_ids[:, chunk], position_ids=positions[:, chunk], past_key_values=cache, use_cache=True
            )
    finally:
        for handle in handles:
            handle.remove()
    cos, sin = model.model.rotary_emb(input_ids.float(), position_ids=positions)
    for index in (0, 1):
        keys = torch.cat(pre_rope[index], dim=1).unflatten(-1, (2, HEAD_DIM)).transpose(1, 2)  # [B, H, T, D]
        reconstructed = wrapper.compressor.codec(index, "k").reconstruct(keys)
        expected, _ = apply_rotary_pos_emb(reconstructed, reconstructed, cos, sin)
        torch.testing.assert_close(returned[index][0], expected, atol=1e-4, rtol=0)
        assert (reconstructed - keys).abs().max() > 1e-2  # rank 4 is lossy: positions matter

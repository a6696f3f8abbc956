"""Model families: rotary handling derived from the model (partial, interleaved, scaled, QK-norm, NoPE layers).

One table of (family id, config builder) of tiny random models (hidden 64, 2 layers, GQA where the family has it).
Each family must give, at full rank, the same greedy tokens and logits as ``DynamicCache`` on the fast and the plain
decode path; the dynamic-rope cases generate past ``max_position_embeddings`` (16), where the rotary frequencies
grow after the first keys were cached. The sliding-window cases (window 8) are compared with the model's own default
cache, ``DynamicCache(config=...)``, which keeps only the window on sliding layers; Gemma 2 soft-caps its attention
logits, Gemma 3 rotates sliding and global layers with different rope parameters.
"""

import copy

import pytest
import torch
from conftest import TINY_VOCAB
from transformers import AutoConfig, AutoModelForCausalLM

from kvlight.calibration.capture import capture_kv
from kvlight.compressors.compressor import KVCompressor
from kvlight.config import CompressionConfig
from kvlight.errors import ModelLoadError
from kvlight.geometry import kv_geometry
from kvlight.hf import default_cache
from kvlight.models import check_architecture
from kvlight.serving.cache import CacheSettings, CompressedCache
from kvlight.serving.wrapper import CompressedKVModelWrapper

ATOL = 1e-4
WINDOW = 8  # sliding window of the sliding cases: the 12-token prompt already crosses it
PROMPT, NEW_TOKENS = 12, 12  # 24 tokens: past max_position_embeddings=16 of the dynamic-rope cases
SHARPEN = 8.0  # q/k weights x 8: attention scores of a few units, so positions change the logits


def _config(model_type: str, **overrides):
    """A tiny config of ``model_type``: hidden 64, 2 layers, 4 query heads over 2 KV heads (head_dim 16)."""
    base = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    base.update(overrides)
    return AutoConfig.for_model(model_type, **base)


def _rope(rope_type: str, **parameters) -> dict:
    return {"rope_parameters": {"rope_type": rope_type, "rope_theta": 10000.0, **parameters}}


def _longrope(rotary_half: int) -> dict:
    return _rope(
        "longrope",
        short_factor=[1.0] * rotary_half,
        long_factor=[1.0 + 0.5 * i for i in range(rotary_half)],
        original_max_position_embeddings=16,
    )


#: (family id, config builder): every family kvlight serves, at full rank equal to DynamicCache.
FAMILIES = [
    ("llama", lambda: _config("llama")),
    ("llama-linear", lambda: _config("llama", **_rope("linear", factor=2.0))),
    (
        "llama-llama3",
        lambda: _config(
            "llama",
            **_rope(
                "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
            ),
        ),
    ),  # fmt: skip
    ("llama-dynamic", lambda: _config("llama", max_position_embeddings=16, **_rope("dynamic", factor=2.0))),
    ("llama-yarn", lambda: _config("llama", **_rope("yarn", factor=4.0, original_max_position_embeddings=16))),
    ("llama-longrope", lambda: _config("llama", max_position_embeddings=64, **_longrope(8))),
    ("mistral", lambda: _config("mistral", head_dim=16)),
    ("qwen2", lambda: _config("qwen2")),
    ("qwen3", lambda: _config("qwen3", head_dim=16)),
    (
        "qwen3_moe",
        lambda: _config("qwen3_moe", head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    ),  # fmt: skip
    ("phi3", lambda: _config("phi3")),
    ("phi3-longrope", lambda: _config("phi3", max_position_embeddings=64, **_longrope(8))),
    ("olmo2", lambda: _config("olmo2")),
    ("olmo", lambda: _config("olmo")),
    ("gpt_neox", lambda: _config("gpt_neox", num_key_value_heads=None)),  # rotary_pct 0.25: 4 of 16 channels turn
    ("cohere", lambda: _config("cohere")),  # interleaved pairs
    ("cohere-qk-norm", lambda: _config("cohere", use_qk_norm=True)),
    ("granite", lambda: _config("granite")),
    ("stablelm", lambda: _config("stablelm")),  # partial rotary in the attention
    ("starcoder2", lambda: _config("starcoder2")),
    ("gemma", lambda: _config("gemma", head_dim=16)),
    # Gemma 2: eager attention (it has no sdpa), layer 0 sliding and layer 1 global, soft-capping 1.0 that matters.
    (
        "gemma2",
        lambda: _config(
            "gemma2", head_dim=16, sliding_window=WINDOW, attn_logit_softcapping=1.0, query_pre_attn_scalar=32
        ),
    ),  # fmt: skip
    # Gemma 3 text: five sliding layers per global one, QK-norm, one KV head, a rope per layer type.
    (
        "gemma3_text",
        lambda: _config(
            "gemma3_text",
            head_dim=16,
            num_hidden_layers=6,
            num_key_value_heads=1,
            sliding_window=WINDOW,
            query_pre_attn_scalar=32,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
        ),
    ),  # fmt: skip
    ("mistral-sliding", lambda: _config("mistral", head_dim=16, sliding_window=WINDOW)),  # every layer slides
    # Qwen2 with sliding layers from max_window_layers on: layer 0 global, layer 1 sliding.
    (
        "qwen2-sliding",
        lambda: _config("qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),  # fmt: skip
    ("helium", lambda: _config("helium", head_dim=16)),  # interleaved
    ("glm", lambda: _config("glm", head_dim=16)),  # partial and interleaved
    ("glm4", lambda: _config("glm4", head_dim=16)),
    ("smollm3", lambda: _config("smollm3", no_rope_layers=[1, 0])),  # layer 1 is NoPE
    ("phi", lambda: _config("phi")),
    ("persimmon", lambda: _config("persimmon", num_key_value_heads=None)),
    (
        "opt",
        lambda: AutoConfig.for_model(
            "opt",
            vocab_size=TINY_VOCAB,
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=512,
            pad_token_id=0,
        ),  # learned positions (offset by 2), separate k_proj / v_proj
    ),  # fmt: skip
    (
        "gpt2",
        lambda: AutoConfig.for_model(
            "gpt2", vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512, pad_token_id=0
        ),
    ),  # fmt: skip
]


def _model(build):
    """A random model whose attention is sharp: at the default init (std 0.02) scores are ~0 and attention is nearly
    uniform, so wrong rotations would not show in the logits; q/k projections scaled up make every key matter."""
    torch.manual_seed(0)
    config = build()
    # sdpa where the family has it; eager for those without (Gemma 2: sdpa cannot soft-cap).
    supports_sdpa = AutoModelForCausalLM._model_mapping[type(config)]._supports_sdpa
    config._attn_implementation = "sdpa" if supports_sdpa else "eager"
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part in name for part in ("q_proj", "k_proj", "query_key_value", "c_attn")) and parameter.dim() == 2:
                parameter.mul_(SHARPEN)
    return model


def _full_rank(model, windows: torch.Tensor, rope_block: int = 1, **config) -> KVCompressor:
    """A PCA compressor fitted on ``model``'s own keys (pre-RoPE, or relative to RoPE blocks of ``rope_block``
    tokens) and values (statistics pass)."""
    geometry = kv_geometry(model)
    cfg = CompressionConfig.uniform(
        geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=config.pop("rank", geometry.head_dim),
        **config,
    )  # fmt: skip
    cfg.key_rope_block = rope_block
    blocks = (rope_block,) * geometry.num_layers
    reservoir = capture_kv(model, geometry, [windows], capacity=100_000, progress=False, rope_blocks=blocks)
    keys, values = reservoir.rows()
    compressor = KVCompressor(cfg, geometry, algo="pca")
    compressor.fit_statistics([{"keys": keys, "values": values}])
    return compressor


def _generate(model, prompts: torch.Tensor, cache_or_wrapper):
    kwargs = dict(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    if isinstance(cache_or_wrapper, CompressedKVModelWrapper):  # every decoded token compressed as it arrives
        wrapper = cache_or_wrapper
        settings = CacheSettings(compress_block=1)
        cache_or_wrapper = CompressedCache(wrapper.compressor, wrapper.tracker, fast=wrapper.fast, settings=settings)
    out = model.generate(past_key_values=cache_or_wrapper, **kwargs)
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, TINY_VOCAB, (2, PROMPT), generator=generator)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("family,build", FAMILIES, ids=[family for family, _ in FAMILIES])
def test_full_rank_generation_equals_dynamic_cache(family, build, fast, prompts):
    model = _model(build)
    windows = torch.randint(3, TINY_VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    compressor = _full_rank(model, windows)
    expected_tokens, expected_logits = _generate(model, prompts, default_cache(model.config))
    wrapper = CompressedKVModelWrapper(model, compressor, fast_decode=fast)
    try:
        tokens, logits = _generate(model, prompts, wrapper)
    finally:
        wrapper.close()
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("family,build", FAMILIES, ids=[family for family, _ in FAMILIES])
def test_keys_in_rope_blocks_at_full_rank_equal_dynamic_cache(family, build, fast, prompts):
    """Keys coded relative to the RoPE of blocks of 4 tokens (decode: each query rotated and projected once per
    block, scored in latent space) give DynamicCache's tokens and logits at full rank in every family: partial and
    interleaved rotary, per-type tables, sliding windows, dynamic rope, NoPE layers."""
    model = _model(build)
    windows = torch.randint(3, TINY_VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    compressor = _full_rank(model, windows, rope_block=4)
    expected_tokens, expected_logits = _generate(model, prompts, default_cache(model.config))
    wrapper = CompressedKVModelWrapper(model, compressor, fast_decode=fast)
    try:
        tokens, logits = _generate(model, prompts, wrapper)
    finally:
        wrapper.close()
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)


def test_dynamic_rope_keeps_the_tables_keys_arrived_with(prompts):
    """Past max_position_embeddings dynamic NTK grows its frequencies; old keys stay as they were rotated."""
    model = _model(dict(FAMILIES)["llama-dynamic"])
    assert prompts.shape[1] + NEW_TOKENS > model.config.max_position_embeddings
    windows = torch.randint(3, TINY_VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    wrapper = CompressedKVModelWrapper(model, _full_rank(model, windows), fast_decode=False)
    try:
        cache = wrapper.new_cache()
        model(input_ids=prompts, past_key_values=cache, use_cache=True)
        log = cache.position_log
        assert log.tables is not None and log.tables[0].shape[1] == PROMPT
        held = cache.stored_bytes()
        assert held >= sum(t.numel() * t.element_size() for t in log.tables)  # the tables are counted
    finally:
        wrapper.close()


def test_dynamic_rope_cache_saved_past_its_original_length_continues_the_same(prompts, tmp_path):
    """The arrival tables are saved with the cache (they cannot be recomputed once the frequencies grew): a cache
    saved past max_position_embeddings and loaded again continues with the tokens of the cache it was saved from."""
    model = _model(dict(FAMILIES)["llama-dynamic"])
    windows = torch.randint(3, TINY_VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    wrapper = CompressedKVModelWrapper(model, _full_rank(model, windows, rank=10), fast_decode=False)
    try:
        cache = wrapper.new_cache()
        first = torch.cat([prompts, prompts[:, :8]], dim=1)  # 20 tokens: past the original 16
        with torch.no_grad():  # two forwards: the first 12 keys arrive with the original frequencies, 8 with grown
            model(input_ids=first[:, :PROMPT], past_key_values=cache, use_cache=True)
            model(input_ids=first[:, PROMPT:], past_key_values=cache, use_cache=True)
        cache.save(tmp_path / "dynamic.kvcache")
        loaded = wrapper.load_cache(tmp_path / "dynamic.kvcache")
        assert all(torch.equal(a, b) for a, b in zip(loaded.position_log.tables, cache.position_log.tables))
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        longer = torch.cat([first, prompts[:, :1]], dim=1)
        # Dynamic NTK's rotary module is stateful (its frequencies only grow until a short forward resets them): a
        # first generation brings it to the state both compared generations start from.
        model.generate(
            input_ids=longer, attention_mask=torch.ones_like(longer), past_key_values=copy.deepcopy(cache), **kwargs
        )
        expected = model.generate(
            input_ids=longer, attention_mask=torch.ones_like(longer), past_key_values=cache, **kwargs
        )
        got = model.generate(input_ids=longer, attention_mask=torch.ones_like(longer), past_key_values=loaded, **kwargs)
        assert torch.equal(got, expected)
    finally:
        wrapper.close()


#: (id, config builder, fragment of the one-line refusal)
REFUSED = [
    (
        "deepseek_v3-mla",
        lambda: AutoConfig.for_model(
            "deepseek_v3", vocab_size=64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, kv_lora_rank=16
        ),
        "latent",
    ),  # fmt: skip
    ("t5-encoder-decoder", lambda: AutoConfig.for_model("t5"), "encoder-decoder"),
    ("mamba-no-kv-cache", lambda: AutoConfig.for_model("mamba"), "K/V"),
    ("bloom-alibi", lambda: AutoConfig.for_model("bloom", hidden_size=64, n_layer=2, n_head=4), "position"),
]


@pytest.mark.parametrize("case,build,fragment", REFUSED, ids=[case for case, _, _ in REFUSED])
def test_unsupported_architectures_are_refused_in_one_line(case, build, fragment):
    with pytest.raises(ModelLoadError) as caught:
        check_architecture(build(), case)
    message = str(caught.value)
    assert fragment in message and "\n" not in message


def _modeling_rotation(tracker, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The model's own rotation of ``keys [B, H, T, D]``: its file's apply_rotary_pos_emb on the whole head, or (Phi,
    Persimmon, StableLM: their attention splits the head) on the rotary channels with the rest passed through."""
    from kvlight.hf import rotary_function

    apply_rotary = rotary_function(tracker.rotary)
    cos, sin = tracker.cos_sin(positions)
    try:
        return apply_rotary(keys, keys, cos, sin)[1]
    except RuntimeError:
        width = cos.shape[-1]
        return torch.cat([apply_rotary(keys[..., :width], keys[..., :width], cos, sin)[1], keys[..., width:]], -1)


ROPE_FAMILIES = [(family, build) for family, build in FAMILIES if family not in ("gpt2", "opt")]


@pytest.mark.parametrize("family,build", ROPE_FAMILIES, ids=[family for family, _ in ROPE_FAMILIES])
def test_rotation_is_the_models_own(family, build):
    """Full rank cannot see a wrong layout (unrotate and rotate cancel): the rotation itself must be the model's."""
    from kvlight.serving.positions import PositionTracker

    model = _model(build)
    tracker = PositionTracker(model)
    try:
        keys = torch.randn(2, 2, 12, kv_geometry(model).head_dim, generator=torch.Generator().manual_seed(0))
        positions = torch.stack([torch.arange(12), torch.arange(3, 15)])
        rotated = tracker.rotate(keys, positions)
        torch.testing.assert_close(rotated, _modeling_rotation(tracker, keys, positions), atol=1e-5, rtol=0)
        torch.testing.assert_close(tracker.unrotate(rotated, positions), keys, atol=1e-5, rtol=0)
    finally:
        tracker.close()


# ---------------------------------------------------------------------- soft-capping, rope per layer type, windows
SLIDING = ["gemma2", "gemma3_text", "mistral-sliding", "qwen2-sliding"]


def _mixed_widths(model, windows: torch.Tensor) -> KVCompressor:
    """A compressor of mixed widths per principal direction (helpers.mixed_widths: 0 to 16 bits) fitted on
    ``model``'s own K/V, like a Fisher allocation's."""
    from helpers import mixed_widths

    geometry = kv_geometry(model)
    config = CompressionConfig.uniform(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=16)
    for (layer, head), entry in config.per_layer_head.items():
        entry.pop("rank_k"), entry.pop("rank_v")
        entry["bits_k"], entry["bits_v"] = mixed_widths(layer, head)
    reservoir = capture_kv(model, geometry, [windows], capacity=100_000, progress=False)
    keys, values = reservoir.rows()
    compressor = KVCompressor(CompressionConfig.from_dict(config.to_dict()), geometry, algo="pca")
    compressor.fit_statistics([{"keys": keys, "values": values}])
    return compressor


def _wrapped_generation(family: str, fast: bool, prompts, settings: CacheSettings, rank: int | str | None = None):
    """Greedy generation of ``family``'s tiny model with the model's default cache and with a compressed cache of
    ``settings`` (full rank unless ``rank``; "widths": mixed widths): ``(expected_tokens, expected_logits, tokens,
    logits, cache)``."""
    model = _model(dict(FAMILIES)[family])
    windows = torch.randint(3, TINY_VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    if rank == "widths":
        compressor = _mixed_widths(model, windows)
    else:
        compressor = _full_rank(model, windows, **({} if rank is None else {"rank": rank}))
    expected_tokens, expected_logits = _generate(model, prompts, default_cache(model.config))
    wrapper = CompressedKVModelWrapper(model, compressor, fast_decode=fast)
    try:
        cache = CompressedCache(wrapper.compressor, wrapper.tracker, fast=wrapper.fast, settings=settings)
        tokens, logits = _generate(model, prompts, cache)
    finally:
        wrapper.close()
    return expected_tokens, expected_logits, tokens, logits, cache


def test_gemma2_fast_path_fails_without_the_softcap(prompts, monkeypatch):
    """The soft-capping case is a real check: with the cap skipped in the fast path the logits move well past ATOL
    (the plain path runs the model's own eager attention, which caps)."""
    from kvlight.serving import attention

    assert _model(dict(FAMILIES)["gemma2"]).config.attn_logit_softcapping == 1.0
    monkeypatch.setattr(attention, "apply_softcap", lambda scores, softcap: scores)
    expected_tokens, expected_logits, tokens, logits, _ = _wrapped_generation(
        "gemma2", True, prompts, CacheSettings(compress_block=1)
    )
    assert (logits - expected_logits).abs().max() > 10 * ATOL


#: (recent_window, compress_block) of the window tests: every token compressed as it arrives; an exact recent window
#: wider than the sliding window (tokens leave exact); a narrow one flushed in blocks (tokens leave from both).
WINDOW_SETTINGS = [(0, 1), (WINDOW + 2, 1), (2, 4)]


@pytest.mark.parametrize("recent,block", WINDOW_SETTINGS, ids=[f"recent{r}-block{b}" for r, b in WINDOW_SETTINGS])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("family", SLIDING)
def test_sliding_layers_keep_their_window_and_count_its_bytes(family, fast, recent, block, prompts):
    """Every layer keeps what the default cache keeps (sliding: the last window - 1 tokens, none compressed once out),
    generation is the default cache's, and the bytes counted are those of the tokens held."""
    settings = CacheSettings(recent_window=recent, compress_block=block)
    expected_tokens, expected_logits, tokens, logits, cache = _wrapped_generation(family, fast, prompts, settings)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, atol=ATOL, rtol=0)
    length = PROMPT + NEW_TOKENS - 1  # the last token is generated, not fed back
    model_windows = cache.tracker.windows if cache.tracker is not None else None
    assert model_windows == cache.windows and any(w == WINDOW for w in cache.windows)
    batch, itemsize = prompts.shape[0], 4  # float32
    latent_bytes = exact_bytes = 0
    for layer in cache.layers:
        held = layer.sink_k.shape[2] + layer.num_compressed + layer.keys.shape[2]
        assert layer.length == length
        assert held == (length if layer.window is None else WINDOW - 1)
        assert layer.offset == length - held
        per_token = batch * layer.keys.shape[1] * layer.keys.shape[3] * itemsize
        exact_bytes += 2 * (layer.sink_k.shape[2] + layer.keys.shape[2]) * per_token
        latent_bytes += 2 * layer.num_compressed * per_token  # full rank, unquantized latents: head_dim per head
    positions = batch * length * 4  # int32, every token's position (shared by the layers)
    assert cache.stored_bytes() == exact_bytes + latent_bytes + positions


#: (id, rank or "widths", latent_bits) of the lossy codecs whose stored latents leave sliding windows.
LOSSY = [("rank6", 6, None), ("rank6-int8", 6, 8), ("widths", "widths", None)]


@pytest.mark.parametrize("codec,rank,bits", LOSSY, ids=[case for case, _, _ in LOSSY])
@pytest.mark.parametrize("family", ["gemma3_text", "mistral-sliding"])
def test_sliding_fast_and_plain_paths_agree_below_full_rank(family, codec, rank, bits, prompts):
    """Below full rank the two decode paths read the same stored codes: their logits agree (tokens leave sliding
    windows from the latents here, plain, quantized or packed mixed-width codes)."""
    settings = CacheSettings(recent_window=2, compress_block=1, latent_bits=bits)
    _, _, fast_tokens, fast_logits, cache = _wrapped_generation(family, True, prompts, settings, rank=rank)
    _, _, plain_tokens, plain_logits, _ = _wrapped_generation(family, False, prompts, settings, rank=rank)
    assert max(layer.offset for layer in cache.layers) > 0
    assert torch.equal(fast_tokens, plain_tokens)
    torch.testing.assert_close(fast_logits, plain_logits, atol=ATOL, rtol=0)


def test_gemma3_layers_rotate_with_their_own_types_tables(prompts):
    """Gemma 3's sliding and global layers rotate with different rope parameters: the tracker records each type's
    observed tables, and recomputes each layer's with the layer_type the model passes for it."""
    from kvlight.serving.positions import PositionTracker

    model = _model(dict(FAMILIES)["gemma3_text"])
    types = model.config.layer_types
    sliding, full = types.index("sliding_attention"), types.index("full_attention")
    tracker = PositionTracker(model)
    try:
        assert tracker.layer_types == types
        with torch.no_grad():
            model(input_ids=prompts)
        positions = torch.arange(PROMPT)[None]
        rotary = tracker.rotary
        for layer_idx in (sliding, full):
            own = rotary(torch.empty(0), positions, types[layer_idx])  # what the model rotates that layer with
            recomputed = tracker.cos_sin(positions, layer_idx)
            torch.testing.assert_close(recomputed, tuple(t.float() for t in own), atol=0, rtol=0)
            observed = tracker.observed(prompts.shape[0], layer_idx)
            pair = tracker.pair_tables(positions, layer_idx)
            torch.testing.assert_close(observed, tuple(t.unsqueeze(1) for t in pair), atol=1e-6, rtol=0)
        assert not torch.allclose(tracker.cos_sin(positions, sliding)[0], tracker.cos_sin(positions, full)[0])
    finally:
        tracker.close()


def test_gemma3_cache_stores_each_layers_own_pre_rope_keys(prompts):
    """Full rank cannot show a wrong layer type (unrotate and rotate with the same wrong table cancel): the keys a
    compressed cache stores must be the model's own pre-RoPE keys (after QK-norm) on sliding and global layers, and a
    capture-time ``observed()`` without a layer reads the running layer's type."""
    model = _model(dict(FAMILIES)["gemma3_text"])
    types = model.config.layer_types
    pre_rope, during = {}, {}
    windows = torch.randint(3, TINY_VOCAB, (4, 24), generator=torch.Generator().manual_seed(2))
    wrapper = CompressedKVModelWrapper(model, _full_rank(model, windows), fast_decode=False)

    def keep(index):
        def hook(module, args, output):
            pre_rope[index] = output.detach()
            during[index] = wrapper.tracker.observed(output.shape[0])  # no layer given: the running block's type

        return hook

    blocks = model.model.layers
    handles = [blocks[i].self_attn.k_norm.register_forward_hook(keep(i)) for i in range(len(blocks))]
    try:
        cache = wrapper.new_cache()
        with torch.no_grad():
            model(input_ids=prompts[:, : WINDOW - 2], past_key_values=cache, use_cache=True)  # inside the window
        for index, layer in enumerate(cache.layers):
            assert layer.num_compressed == WINDOW - 2  # no sinks or recent window: every token compressed
            stored = layer.codecs["k"].decode(layer.latent_k.read(torch.float32))
            torch.testing.assert_close(stored, pre_rope[index], atol=1e-4, rtol=0)
            own = wrapper.tracker.observed(prompts.shape[0], index)
            assert all(torch.equal(a, b) for a, b in zip(during[index], own, strict=True)), types[index]
    finally:
        for handle in handles:
            handle.remove()
        wrapper.close()


@pytest.mark.parametrize("family", SLIDING + ["llama"])
def test_default_cache_bytes_match_a_real_default_cache(family, prompts):
    """default_cache_bytes is what DynamicCache(config=...) holds after the same tokens (a prefill, then decode
    steps); on the sliding families it is below the full DynamicCache's dynamic_cache_bytes."""
    from helpers import nbytes

    from kvlight.hf import default_cache_windows
    from kvlight.serving.cache import default_cache_bytes, dynamic_cache_bytes

    model = _model(dict(FAMILIES)[family])
    cache = default_cache(model.config)
    geometry, windows = kv_geometry(model), default_cache_windows(model.config)
    with torch.no_grad():
        out = model(input_ids=prompts, past_key_values=cache, use_cache=True)
        for _ in range(3):
            out = model(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)
    total = PROMPT + 3
    held = nbytes([t for layer in cache.layers for t in (layer.keys, layer.values)])
    assert default_cache_bytes(geometry, prompts.shape[0], total, torch.float32, windows) == held
    full = dynamic_cache_bytes(geometry, prompts.shape[0], total, torch.float32)
    assert (held < full) == (family != "llama")

"""The Python API a user meets first: ``kvlight.compress`` / ``kvlight.from_pretrained``, the wrapper as a context
manager, the refusal of a second wrap, the warning of an attention implementation the fast decode path cannot take
over, a geometry refusal that names both models, and a config value the modeling code ignores (GPT-NeoX's
``num_key_value_heads``). Every case builds its own tiny model with random weights (shared fixtures stay untouched):
a full-rank PCA compressor reconstructs K/V exactly, so wrapped generation must equal the model's own."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig

import kvlight
from kvlight.compressors.compressor import KVCompressor
from kvlight.compressors.provenance import base_model_record
from kvlight.config import CompressionConfig
from kvlight.errors import AlreadyWrappedError, GeometryMismatchError, KVLightError
from kvlight.geometry import kv_geometry
from kvlight.serving.wrapper import CompressedKVModelWrapper

VOCAB = 64
SMALL = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
#: tiny configs: GQA + RoPE, learned positions, and GPT-NeoX given a num_key_value_heads its attention ignores.
CONFIGS = {
    "llama": lambda: LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **SMALL
    ),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **SMALL),
    "gpt_neox-kv2": lambda: GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **SMALL
    ),
}
GREEDY = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}


def tiny(arch: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=attn).eval()


def full_rank(model) -> KVCompressor:
    """A full-rank PCA compressor (identity basis, zero mean): every token goes through the latents, losslessly."""
    geometry = kv_geometry(model)
    config = CompressionConfig.uniform(
        geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=geometry.head_dim
    )
    return KVCompressor(config, geometry, algo="pca")


def prompt() -> torch.Tensor:
    return torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))


def state(model) -> tuple:
    """What a wrapper may change on a model: its attention implementation and every hook of every module."""
    hooks = tuple((name, len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules())
    return model.config._attn_implementation, hooks


# ---------------------------------------------------------------------- kvlight.compress, kvlight.from_pretrained
@pytest.mark.parametrize("source", ["object", "directory", "from_pretrained"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_compress_and_from_pretrained_generate_as_the_model(arch, source, tmp_path):
    model = tiny(arch)
    compressor = full_rank(model)
    compressor.save_pretrained(tmp_path / "c")
    expected = model.generate(prompt(), **GREEDY)
    if source == "object":
        wrapped = kvlight.compress(model, compressor)
    elif source == "directory":
        wrapped = kvlight.compress(model, tmp_path / "c")
    else:
        wrapped = kvlight.from_pretrained(model, str(tmp_path / "c"), fast_decode=False)
    with wrapped:
        assert isinstance(wrapped, CompressedKVModelWrapper)
        assert wrapped.fast is None if source == "from_pretrained" else wrapped.fast is not None  # kwargs reach it
        cache = wrapped.new_cache()
        got = wrapped.generate(prompt(), past_key_values=cache, **GREEDY)
        assert cache.layers[0].num_compressed > 0  # not vacuous: tokens went through the latents
    assert torch.equal(got, expected)


def test_import_kvlight_stays_light():
    code = "import sys, kvlight; assert {'compress', 'from_pretrained'} <= set(dir(kvlight)); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------- the context manager
@pytest.mark.parametrize("fast_decode", [True, False], ids=["fast", "plain"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_with_block_restores_the_model(arch, fast_decode):
    model = tiny(arch)
    before = state(model)
    expected = model.generate(prompt(), **GREEDY)
    with kvlight.compress(model, full_rank(model), fast_decode=fast_decode) as wrapped:
        assert state(model) != before or (arch == "gpt2" and not fast_decode)  # it did attach something
        assert torch.equal(wrapped.generate(prompt(), **GREEDY), expected)
    assert state(model) == before
    assert torch.equal(model.generate(prompt(), **GREEDY), expected)
    with kvlight.compress(model, full_rank(model), fast_decode=fast_decode) as again:  # a new wrap works
        assert torch.equal(again.generate(prompt(), **GREEDY), expected)
    assert state(model) == before


def test_a_with_block_restores_the_model_when_its_body_raises():
    model = tiny("llama")
    before = state(model)
    with pytest.raises(RuntimeError, match="body"), kvlight.compress(model, full_rank(model)):
        raise RuntimeError("body")
    assert state(model) == before


# ---------------------------------------------------------------------- a second wrap
@pytest.mark.parametrize("first_fast,second_fast", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_second_wrap_says_what_to_do(arch, first_fast, second_fast):
    model = tiny(arch)
    first = CompressedKVModelWrapper(model, full_rank(model), fast_decode=first_fast)
    during = state(model)
    try:
        try:
            CompressedKVModelWrapper(model, full_rank(model), fast_decode=second_fast)
        except KVLightError as exc:  # what a user catches
            caught = exc
        assert isinstance(caught, AlreadyWrappedError)
        message = str(caught)
        assert "\n" not in message and ".close()" in message and "with kvlight.compress" in message
        assert state(model) == during  # the refusal attached nothing
        assert first.generate(prompt(), **GREEDY).shape == (2, 16)  # the first wrapper still serves
    finally:
        first.close()
    CompressedKVModelWrapper(model, full_rank(model), fast_decode=second_fast).close()  # closed: a new wrap works


def test_a_refused_wrap_leaves_the_model_as_it_was():
    """A wrap refused after the attention was switched (here: by the position tracker) switches it back."""
    model = tiny("llama")
    before = state(model)
    model.model.rotary_emb = None  # no rotary module for the tracker to hook: refused after LatentAttention ran
    with pytest.raises(ValueError, match="no rotary embedding"):
        CompressedKVModelWrapper(model, full_rank(model))
    assert model.config._attn_implementation == before[0]


# ---------------------------------------------------------------------- attention implementations
@pytest.mark.parametrize("implementation", ["flash_attention_2", "flex_attention"])
def test_an_implementation_without_fast_decode_warns_once_in_one_line(implementation):
    model = tiny("llama")
    model.config._attn_implementation = implementation  # by name only: flash-attn cannot run here
    with pytest.warns(UserWarning) as caught:
        wrapper = CompressedKVModelWrapper(model, full_rank(model))
    try:
        messages = [str(w.message) for w in caught if "kvlight" in str(w.message)]
        assert len(messages) == 1, messages
        assert "\n" not in messages[0] and implementation in messages[0]
        assert 'attn_implementation="sdpa"' in messages[0] and "slow" in messages[0]
        assert not wrapper.fast.active  # the plain reconstruction path serves it
        assert model.config._attn_implementation == implementation
    finally:
        wrapper.close()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_implementations_with_fast_decode_do_not_warn(implementation):
    model = tiny("llama", attn=implementation)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with kvlight.compress(model, full_rank(model)) as wrapped:
            assert wrapped.fast.active


# ---------------------------------------------------------------------- geometry refusals name both models
@pytest.mark.parametrize("recorded", [True, False], ids=["base-model-recorded", "model-type-only"])
def test_a_geometry_refusal_names_the_fitted_and_the_given_model(recorded, tmp_path):
    llama, gpt2 = tiny("llama"), tiny("gpt2")
    gpt2.config.name_or_path = "org/tiny-gpt2"
    compressor = full_rank(llama)
    if recorded:
        compressor.base_model = base_model_record(llama, "org/tiny-llama")
    compressor.save_pretrained(tmp_path / "c")
    for attempt in (
        lambda: CompressedKVModelWrapper(gpt2, compressor),
        lambda: kvlight.from_pretrained(gpt2, tmp_path / "c"),
    ):
        with pytest.raises(GeometryMismatchError) as caught:
            attempt()
        message = str(caught.value)
        assert "\n" not in message and "calibrate" in message
        assert f"fitted to {'org/tiny-llama' if recorded else 'llama'} (2 layers x 2 KV heads" in message
        assert "the model given, org/tiny-gpt2, has 2 x 4 x 8" in message
    assert state(gpt2)[0] == "sdpa"  # refused before anything was attached


# ---------------------------------------------------------------------- a config value the modeling code ignores
def test_gpt_neox_kv_heads_are_the_attention_heads_it_really_uses():
    """GPT-NeoX projects one K/V head per query head whatever num_key_value_heads says: the geometry follows the
    attention, so capture and serving work."""
    from kvlight.calibration.capture import capture_kv

    model = tiny("gpt_neox-kv2")
    assert model.config.num_key_value_heads == 2  # the config keeps the value; the attention ignores it
    geometry = kv_geometry(model)
    assert (geometry.num_kv_heads, geometry.head_dim, geometry.rope) == (4, 8, True)
    batches = [prompt()]
    reservoir = capture_kv(model, geometry, batches, capacity=1000, progress=False, rope_blocks=(1, 1))
    keys, values = reservoir.rows()
    assert keys.shape[1:] == values.shape[1:] == (2, 4, 8)
    expected = model.generate(prompt(), **GREEDY)
    with kvlight.compress(model, full_rank(model)) as wrapped:
        got = wrapped.generate(prompt(), **GREEDY)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

"""Serving as a transformers user does it (issue 15): prefix caches copied per request, caches built by hand,
pipelines, one wrapped model shared by threads, and a compressor refused on a model it was not fitted to.

Each case failed before: a deep-copied cache raised in ``unrotate`` (its copied position tracker was hooked to
nothing) and copied the whole model; a hand-built cache on a RoPE model generated garbage silently; ``pipeline``
raised on ``wrapped.device``; two threads raised "did not see this forward's position ids"; any compressor loaded
onto any model of its shape.
"""

from __future__ import annotations

import copy
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import ARCHS

from kvlight.compressors.compressor import KVCompressor, load_compressor
from kvlight.compressors.provenance import base_model_record
from kvlight.errors import CacheError, ModelMismatchError
from kvlight.hf import dynamic_cache
from kvlight.serving.cache import CompressedCache
from kvlight.serving.wrapper import CompressedKVModelWrapper

SYSTEM = "You are a careful assistant. Answer briefly."
REQUESTS = [" What is a key?", " Name a value.", " Why cache tokens?"]


@pytest.fixture
def wrap(tiny_models):
    """``wrap(arch, compressor, **kwargs)`` -> CompressedKVModelWrapper, closed after the test."""
    made = []

    def make(arch, compressor, **kwargs):
        made.append(CompressedKVModelWrapper(tiny_models[arch], compressor, **kwargs))
        return made[-1]

    yield make
    for wrapper in made:
        wrapper.close()


def low_rank(fitted_compressor, arch):
    """A lossy PCA compressor (rank 6 of 16, few exact tokens), so compressed tokens really change the logits."""
    return fitted_compressor(arch, "pca", rank=6, sink_tokens=1, recent_window=2)


def encode(tokenizer, text: str) -> dict:
    return tokenizer(text, return_tensors="pt")


def greedy(generate, tokenizer, text: str, cache=None, tokens: int = 12) -> torch.Tensor:
    kwargs = dict(max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    if cache is not None:
        kwargs["past_key_values"] = cache
    return generate(**encode(tokenizer, text), **kwargs)


# ---------------------------------------------------------------------- 1. prefix caches: copy.deepcopy per request
@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_recipe_matches_dynamic_cache_at_full_rank(
    arch, tiny_models, tiny_tokenizer, fitted_compressor, wrap
):
    """transformers' recipe (prefill the shared prefix once, deepcopy the cache per request) gives DynamicCache's
    tokens at full rank, request after request."""
    model = tiny_models[arch]
    wrapper = wrap(arch, fitted_compressor(arch, "pca"))
    reference, compressed = dynamic_cache(), wrapper.new_cache()
    with torch.no_grad():
        model(**encode(tiny_tokenizer, SYSTEM), past_key_values=reference, use_cache=True)
        wrapper(**encode(tiny_tokenizer, SYSTEM), past_key_values=compressed)
    for request in REQUESTS:
        expected = greedy(model.generate, tiny_tokenizer, SYSTEM + request, copy.deepcopy(reference))
        got = greedy(wrapper.generate, tiny_tokenizer, SYSTEM + request, copy.deepcopy(compressed))
        assert torch.equal(got, expected), request


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_copies_are_independent_and_equal_to_a_fresh_prefill(
    arch, tiny_tokenizer, fitted_compressor, wrap
):
    """Lossy cache: each copy continues exactly as the uncopied cache would, and using a copy leaves the prefix
    cache untouched (its stored tensors, length and positions)."""
    wrapper = wrap(arch, low_rank(fitted_compressor, arch))

    def prefix():
        cache = wrapper.new_cache()
        with torch.no_grad():
            wrapper(**encode(tiny_tokenizer, SYSTEM), past_key_values=cache)
        return cache

    shared = prefix()
    before = [t.clone() for layer in shared.layers for t in layer.stored_tensors()]
    assert shared.layers[0].num_compressed > 0
    for request in REQUESTS:
        expected = greedy(wrapper.generate, tiny_tokenizer, SYSTEM + request, prefix())  # its own prefill
        got = greedy(wrapper.generate, tiny_tokenizer, SYSTEM + request, copy.deepcopy(shared))
        assert torch.equal(got, expected), request
    after = [t for layer in shared.layers for t in layer.stored_tensors()]
    assert all(torch.equal(a, b) for a, b in zip(before, after)) and len(before) == len(after)
    assert shared.get_seq_length() == encode(tiny_tokenizer, SYSTEM)["input_ids"].shape[1]


@pytest.mark.parametrize("arch", ARCHS)
def test_a_copy_holds_only_the_stored_tokens(arch, tiny_tokenizer, fitted_compressor, wrap):
    """The copy shares the compressor, tracker and fast path (so it stays hooked to the model), and the tensors it
    copies are the cache's own (buffers with their slack, positions): not the model's 10x larger weights."""
    wrapper = wrap(arch, low_rank(fitted_compressor, arch))
    cache = wrapper.new_cache()
    with torch.no_grad():
        wrapper(**encode(tiny_tokenizer, SYSTEM), past_key_values=cache)
    memo: dict = {}
    copied = copy.deepcopy(cache, memo)
    assert copied.compressor is cache.compressor and copied.tracker is cache.tracker and copied.fast is cache.fast
    assert copied.layers[0].codecs is cache.layers[0].codecs and copied.scratch is not cache.scratch
    new_tensors = [v for k, v in memo.items() if isinstance(v, torch.Tensor) and k != id(v)]
    copied_bytes = sum(t.numel() * t.element_size() for t in new_tensors)
    model_bytes = sum(p.numel() * p.element_size() for p in wrapper.model.parameters())
    assert 0 < copied_bytes <= cache.allocated_bytes() < model_bytes
    assert copied.stored_bytes() == cache.stored_bytes()


# ---------------------------------------------------------------------- 2. a cache built by hand
def test_hand_built_cache_on_a_rope_model_is_refused(fitted_compressor):
    with pytest.raises(CacheError, match=r"needs the positions.*new_cache\(\)") as caught:
        CompressedCache(fitted_compressor("llama", "pca"))
    assert "\n" not in str(caught.value)


def test_hand_built_cache_without_a_fitted_geometry_is_refused(fitted_compressor):
    fitted = fitted_compressor("gpt2", "pca")
    unknown = KVCompressor(fitted.config, algo="pca")  # the seed's PCACompressor(config): no geometry recorded
    with pytest.raises(CacheError, match="cannot tell is free of RoPE"):
        CompressedCache(unknown)
    assert CompressedCache(unknown, tracker=None).tracker is None  # said explicitly: learned positions


def test_hand_built_cache_on_learned_positions_works(tiny_models, tiny_tokenizer, fitted_compressor):
    """GPT-2 has no positions to undo: ``generate(past_key_values=CompressedCache(compressor))`` on the bare model
    gives DynamicCache's tokens at full rank."""
    model = tiny_models["gpt2"]
    expected = greedy(model.generate, tiny_tokenizer, SYSTEM)
    got = greedy(model.generate, tiny_tokenizer, SYSTEM, CompressedCache(fitted_compressor("gpt2", "pca")))
    assert torch.equal(got, expected)


# ---------------------------------------------------------------------- 3. pipelines
@pytest.mark.parametrize("arch", ARCHS)
def test_wrapper_passes_for_the_model(arch, tiny_models, fitted_compressor, wrap):
    model = tiny_models[arch]
    wrapper = wrap(arch, fitted_compressor(arch, "pca"))
    assert wrapper.device == model.device and wrapper.dtype == model.dtype
    assert wrapper.config is model.config and wrapper.generation_config is model.generation_config
    assert wrapper.can_generate() and wrapper.main_input_name == model.main_input_name
    with pytest.raises(AttributeError):
        wrapper.no_such_attribute  # noqa: B018


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("build", ["method", "transformers"])
def test_text_generation_pipeline_generates_with_the_compressed_cache(
    arch, build, tiny_models, tiny_tokenizer, fitted_compressor, wrap
):
    """The pipeline's text is what the wrapper generates (lossy: not what the bare model generates)."""
    from transformers import pipeline

    wrapper = wrap(arch, low_rank(fitted_compressor, arch))
    if build == "method":
        pipe = wrapper.pipeline(tokenizer=tiny_tokenizer)
    else:
        pipe = pipeline("text-generation", model=wrapper, tokenizer=tiny_tokenizer)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.eos_token_id)
    text = pipe(SYSTEM, **kwargs)[0]["generated_text"]
    ids = wrapper.generate(**encode(tiny_tokenizer, SYSTEM), **kwargs)
    bare = tiny_models[arch].generate(**encode(tiny_tokenizer, SYSTEM), **kwargs)
    assert text == tiny_tokenizer.decode(ids[0], skip_special_tokens=True)
    assert not torch.equal(ids, bare)  # the compressed cache served the pipeline


# ---------------------------------------------------------------------- 4. threads
def test_one_wrapped_model_shared_by_two_threads(tiny_tokenizer, fitted_compressor, wrap):
    """12 generations on 2 threads give each prompt's single-threaded tokens; a prefix cache built on the main
    thread continues on the workers (positions are per forward and per thread, observations unique)."""
    wrapper = wrap("llama", low_rank(fitted_compressor, "llama"))
    prompts = [f"{SYSTEM} {word}" for word in ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")] * 2
    expected = [greedy(wrapper.generate, tiny_tokenizer, p, tokens=16) for p in prompts]
    shared = wrapper.new_cache()
    with torch.no_grad():
        wrapper(**encode(tiny_tokenizer, SYSTEM), past_key_values=shared)
    from_prefix = [greedy(wrapper.generate, tiny_tokenizer, SYSTEM + r, copy.deepcopy(shared)) for r in REQUESTS]

    with ThreadPoolExecutor(max_workers=2) as pool:
        got = list(pool.map(lambda p: greedy(wrapper.generate, tiny_tokenizer, p, tokens=16), prompts))
        continued = list(
            pool.map(lambda r: greedy(wrapper.generate, tiny_tokenizer, SYSTEM + r, copy.deepcopy(shared)), REQUESTS)
        )
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(torch.equal(a, b) for a, b in zip(continued, from_prefix))


# ---------------------------------------------------------------------- 5. the model a compressor was fitted to
def perturbed(model, scale: float):
    """A copy of ``model`` whose every K projection weight is scaled by ``1 + scale`` (a same-shape other model)."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in other.named_parameters():
            if "k_proj" in name or "c_attn" in name:
                parameter.mul_(1 + scale)
    return other


@pytest.mark.parametrize("arch", ARCHS)
def test_base_model_is_recorded_and_checked(arch, tmp_path, tiny_models, fitted_compressor):
    model = tiny_models[arch]
    compressor = fitted_compressor(arch, "pca")
    compressor.base_model = base_model_record(model, f"tiny-{arch}")
    compressor.save_pretrained(tmp_path)
    loaded = load_compressor(tmp_path)
    assert loaded.base_model == compressor.base_model and loaded.base_model["name"] == f"tiny-{arch}"
    assert loaded.fingerprint() == compressor.fingerprint()

    CompressedKVModelWrapper(model, loaded).close()  # the model it was fitted to
    CompressedKVModelWrapper(copy.deepcopy(model).to(torch.bfloat16), loaded).close()  # the same, rounded to bf16
    other = perturbed(model, 0.05)
    with pytest.raises(ModelMismatchError, match=rf"fitted to tiny-{arch} .*allow_model_mismatch=True") as caught:
        CompressedKVModelWrapper(other, loaded)
    assert "\n" not in str(caught.value)
    with pytest.warns(UserWarning, match="served anyway"):
        CompressedKVModelWrapper(other, loaded, allow_model_mismatch=True).close()


def test_compressor_without_a_record_is_not_checked(tiny_models, fitted_compressor):
    compressor = fitted_compressor("llama", "pca")
    assert compressor.base_model is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompressedKVModelWrapper(perturbed(tiny_models["llama"], 0.5), compressor).close()


@pytest.mark.parametrize(
    "record,message",
    [
        ({"name": "m", "kv_probe": "abc"}, "malformed base_model"),
        ({"name": 3, "kv_probe": [[1.0]]}, "malformed base_model"),
        ({"name": "m", "kv_probe": [[True]]}, "malformed base_model"),
        ([1, 2], "malformed base_model"),
    ],
)
def test_malformed_base_model_record_is_one_line(record, message, tmp_path, fitted_compressor):
    import json

    compressor = fitted_compressor("gpt2", "pca")
    compressor.save_pretrained(tmp_path)
    described = json.loads((tmp_path / "compressor_config.json").read_text())
    described["base_model"] = record
    (tmp_path / "compressor_config.json").write_text(json.dumps(described))
    with pytest.raises(Exception, match=message) as caught:
        load_compressor(tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_wrapped_model_can_still_be_deep_copied(arch, tiny_models, tiny_tokenizer, fitted_compressor, wrap):
    """The position hooks ride along with ``copy.deepcopy(model)`` (an EMA copy, a second replica): the copy is made,
    generates the bare model's tokens, and closing the wrapper leaves the copy alone."""
    model = tiny_models[arch]
    expected = greedy(model.generate, tiny_tokenizer, SYSTEM)
    wrapper = wrap(arch, fitted_compressor(arch, "pca"))
    replica = copy.deepcopy(wrapper.model)
    wrapper.close()
    assert torch.equal(greedy(replica.generate, tiny_tokenizer, SYSTEM), expected)
    assert torch.equal(greedy(model.generate, tiny_tokenizer, SYSTEM), expected)

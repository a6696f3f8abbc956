"""Decode through the fast paths (kvlight.attention: latents read in place) gives the plain path's tokens.

The plain path reconstructs every cached K/V each step and hands them to the model's own attention; the fast
path never rebuilds the history: values (and keys coded after RoPE, or without RoPE) are read in latent space,
keys coded before RoPE are decoded into one shared workspace, or, for width codes on the CPU, rebuilt and rotated
inside the native kernels (kvlight.serving.kernels). Every case runs on the tiny Llama (GQA + RoPE) and the tiny
GPT-2, with keys coded before and after RoPE, and width cases with the kernels and with the torch code.
"""

import pytest
import torch
from helpers import ARCHS, BACKENDS, mixed_widths

from kvlight.serving import kernels
from kvlight.serving.layer import CompressedLayer
from kvlight.serving.wrapper import CompressedKVModelWrapper

#: How keys are coded (key_rope_block): before RoPE (rebuilt and rotated each step), or relative to the RoPE of blocks
#: of 4 tokens (scored in latent space, each query rotated and projected once per block).
ROPE_BLOCKS = (1, 4)

NEW_TOKENS = 12

#: (id, compressor kwargs): full rank; low rank + int4 + exact tokens; unequal ranks with a disabled head + int8; ...
CASES = [
    ("full-rank", {}),
    ("r8-int4-sinks-recent", {"rank": 8, "latent_bits": 4, "sink_tokens": 2, "recent_window": 4}),
    (
        "unequal-int8",
        {
            "rank_k": 6,
            "rank_v": 10,
            "latent_bits": 8,
            "recent_window": 3,
            "heads": {(0, 1): {"rank_k": 3}, (1, 0): {"enabled": False}},
        },
    ),
    ("r12-fp8", {"rank": 12, "latent_bits": "fp8", "sink_tokens": 1}),
    # One quantization group per head and token: the codes are read without dequantizing (scales folded in).
    (
        "r8-int4-group-per-head",
        {"rank": 8, "latent_bits": 4, "quant_group_size": 8, "sink_tokens": 1, "recent_window": 2},
    ),
    ("full-int2-group-per-head", {"latent_bits": 2, "quant_group_size": 16}),
    # Static mixed-width codes (kvlight.widths): every width 0..16, per-direction steps folded into the decoder.
    ("mixed-widths", {"bits": mixed_widths, "sink_tokens": 1, "recent_window": 2}),
]


def generate(model, compressor, prompts, fast):
    wrapper = CompressedKVModelWrapper(model, compressor, fast_decode=fast)
    try:
        out = wrapper.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=0,
        )
    finally:
        wrapper.close()
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(name)`` -> a dict whose ``n`` counts calls of ``CompressedLayer.<name>``."""

    def install(name):
        counter = {"n": 0}
        original = getattr(CompressedLayer, name)

        def counted(self, *args, **kwargs):
            counter["n"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(CompressedLayer, name, counted)
        return counter

    return install


@pytest.fixture(params=["kernels", "torch"])
def packed_reader(request, monkeypatch):
    """Width codes read by the native kernels (where they build here) or by the torch code of the fast path."""
    if request.param == "kernels":
        if kernels.library() is None:
            pytest.skip("the native decode kernels cannot be built here (no C compiler)")
    else:
        monkeypatch.setattr(kernels, "enabled_for", lambda tensor: False)
    return request.param


@pytest.mark.parametrize("algo", BACKENDS)
@pytest.mark.parametrize("case", [c[1] for c in CASES], ids=[c[0] for c in CASES])
@pytest.mark.parametrize("rope_block", ROPE_BLOCKS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fast_decode_gives_the_plain_paths_tokens(
    arch, rope_block, case, algo, tiny_models, tiny_windows, fitted_compressor, count_calls
):
    if arch == "gpt2" and rope_block != 1:
        pytest.skip("GPT-2 has no RoPE: its keys are coded as attention reads them whatever the block")
    model = tiny_models[arch]
    compressor = fitted_compressor(arch, algo, rope_block=rope_block, **case)
    prompts = tiny_windows["eval"][:3, :20]
    attends = count_calls("attend")

    plain_tokens, plain_logits = generate(model, compressor, prompts, fast=False)
    assert attends["n"] == 0
    fast_tokens, fast_logits = generate(model, compressor, prompts, fast=True)

    # Every decode step of every layer went through the fast path (the first token comes from the prefill).
    assert attends["n"] == compressor.num_layers * (NEW_TOKENS - 1)
    assert torch.equal(fast_tokens, plain_tokens)
    torch.testing.assert_close(fast_logits, plain_logits, atol=2e-4, rtol=1e-4)


#: width cases of the native kernel: every width (exact width-16 channels read from their own buffer), and only coded
#: widths.
WIDTH_CASES = {
    "mixed-widths": {"bits": mixed_widths, "sink_tokens": 1, "recent_window": 2},
    "coded-widths": {"bits": lambda layer, head: [[min(w, 8) for w in b] for b in mixed_widths(layer, head)]},
}


@pytest.mark.parametrize("case", list(WIDTH_CASES.values()), ids=list(WIDTH_CASES))
@pytest.mark.parametrize("rope_block", ROPE_BLOCKS)
def test_packed_readers_give_the_plain_paths_tokens(
    rope_block, case, packed_reader, tiny_models, tiny_windows, fitted_compressor, monkeypatch
):
    """Width codes on the CPU: the native kernel (keys in latent space or rebuilt in registers, values mixed in
    latent space) and the torch code both give the plain path's tokens and logits, the kernel with 2 threads (its
    token chunks split)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the kernel's split; torch itself stays at 1
    compressor = fitted_compressor("llama", "pca", rope_block=rope_block, **case)
    calls = {"n": 0}
    original = kernels.attend

    def counted(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(kernels, "attend", counted)
    prompts = tiny_windows["eval"][:3, :20]
    plain_tokens, plain_logits = generate(tiny_models["llama"], compressor, prompts, fast=False)
    fast_tokens, fast_logits = generate(tiny_models["llama"], compressor, prompts, fast=True)
    assert torch.equal(fast_tokens, plain_tokens)
    torch.testing.assert_close(fast_logits, plain_logits, atol=2e-4, rtol=1e-4)
    expected = 0 if packed_reader == "torch" else compressor.num_layers * (NEW_TOKENS - 1)  # every layer, every step
    assert calls["n"] == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_steps_never_rebuild_the_history(arch, tiny_models, tiny_windows, fitted_compressor, count_calls):
    compressor = fitted_compressor(arch, "pca", rank=8, latent_bits=4, sink_tokens=2, recent_window=4)
    rebuilds = count_calls("_reconstruct")
    prompts = tiny_windows["eval"][:2, :20]
    generate(tiny_models[arch], compressor, prompts, fast=True)
    assert rebuilds["n"] == compressor.num_layers  # the prefill only
    generate(tiny_models[arch], compressor, prompts, fast=False)
    assert rebuilds["n"] == compressor.num_layers * (1 + NEW_TOKENS)  # the plain path: every step


@pytest.mark.parametrize("arch", ARCHS)
def test_latents_are_written_in_place(arch, tiny_models, tiny_windows, fitted_compressor):
    """Decode steps fill the preallocated latent buffers: no new allocation until a buffer is full."""
    model = tiny_models[arch]
    wrapper = CompressedKVModelWrapper(model, fitted_compressor(arch, "pca", rank=8, latent_bits=4))
    try:
        cache = wrapper.new_cache()
        ids = tiny_windows["eval"][:2, :20]
        wrapper(input_ids=ids, past_key_values=cache)
        store = cache.layers[0].latent_k
        pointers = {store._buffers[0].data_ptr()}
        for _ in range(40):
            wrapper(input_ids=ids[:, -1:], past_key_values=cache)
            pointers.add(store._buffers[0].data_ptr())
        assert cache.compress_block == 16
        assert store.length == 20 + 32 and store.capacity == store.GROW  # two flushes of 16 tokens, one allocation
        assert len(pointers) == 1
    finally:
        wrapper.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_close_restores_the_attention_implementation(arch, tiny_models, tiny_windows, fitted_compressor):
    model = tiny_models[arch]
    original = model.config._attn_implementation
    ids = tiny_windows["eval"][:2, :16]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        wrapper = CompressedKVModelWrapper(model, fitted_compressor(arch, "pca", rank=8))
        assert model.config._attn_implementation == "kvlight_" + original
        during = model(input_ids=ids).logits  # no compressed cache: the original attention function, unchanged
        wrapper.close()
        after = model(input_ids=ids).logits
    assert model.config._attn_implementation == original
    assert torch.equal(before, during) and torch.equal(before, after)
    with pytest.raises(ValueError, match="already served"):
        first = CompressedKVModelWrapper(model, fitted_compressor(arch, "pca", rank=8))
        try:
            CompressedKVModelWrapper(model, fitted_compressor(arch, "pca", rank=8))
        finally:
            first.close()
    assert model.config._attn_implementation == original


@pytest.mark.parametrize("group,dequantized", [(8, False), (16, True)], ids=["group-per-head", "groups-span-heads"])
def test_codes_are_read_without_dequantizing_when_a_group_is_one_head(
    group, dequantized, tiny_models, tiny_windows, fitted_compressor, monkeypatch
):
    from kvlight.serving.quant import LatentQuantizer

    calls = {"n": 0}
    original = LatentQuantizer.dequantize_fast

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LatentQuantizer, "dequantize_fast", counted)
    compressor = fitted_compressor("llama", "pca", rank=8, latent_bits=4, quant_group_size=group)
    generate(tiny_models["llama"], compressor, tiny_windows["eval"][:2, :20], fast=True)
    assert (calls["n"] > 0) == dequantized

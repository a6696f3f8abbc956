"""Rank order on a tiny trained model of every served family: fewer dimensions kept, more of the model's output lost.

Each family of tests/serving/test_families.py is built tiny, trained briefly on the built-in corpus (so its keys and
values have a decaying spectrum and its outputs mean something), calibrated with PCA on later windows, and served
through ``CompressedKVModelWrapper`` on held-out windows fed in chunks. The KL between the exact model's next-token
distributions and the served ones is ~0 at full rank and rises as the rank falls.
"""

import sys
from pathlib import Path

import pytest
import torch
from conftest import _pretrain
from helpers import chunked_logits
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "serving"))

from test_families import FAMILIES  # noqa: E402

from kvlight.calibration.capture import capture_kv  # noqa: E402
from kvlight.compressors.compressor import KVCompressor  # noqa: E402
from kvlight.config import CompressionConfig  # noqa: E402
from kvlight.geometry import kv_geometry  # noqa: E402
from kvlight.hf import default_cache  # noqa: E402
from kvlight.serving.wrapper import CompressedKVModelWrapper  # noqa: E402

RANKS = (16, 8, 2)  # head_dim 16 in every family here: full, half, an eighth
CHUNK = 8


def _trained(build, windows: torch.Tensor):
    torch.manual_seed(0)
    config = build()
    supports_sdpa = AutoModelForCausalLM._model_mapping[type(config)]._supports_sdpa
    config._attn_implementation = "sdpa" if supports_sdpa else "eager"  # Gemma 2 soft-caps: eager only
    if hasattr(config, "logit_scale"):  # Cohere's 0.0625 leaves a 40-step model's outputs near uniform: KL ~1e-8
        config.logit_scale = 1.0
    model = AutoModelForCausalLM.from_config(config)
    _pretrain(model, windows, steps=40)
    return model.requires_grad_(False)


def _kl(exact: torch.Tensor, served: torch.Tensor) -> float:
    """Mean per-token ``KL(p_exact || p_served)`` of logits ``[B, T, V]``."""
    log_p, log_q = exact.float().log_softmax(-1), served.float().log_softmax(-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@pytest.mark.parametrize("family,build", FAMILIES, ids=[family for family, _ in FAMILIES])
def test_served_kl_rises_as_rank_falls(family, build, tiny_windows):
    model = _trained(build, tiny_windows["train"])
    geometry = kv_geometry(model)
    assert geometry.head_dim == RANKS[0]
    keys, values = capture_kv(model, geometry, [tiny_windows["calib"]], capacity=100_000, progress=False).rows()
    evaluation = tiny_windows["eval"]
    with torch.no_grad():
        exact = chunked_logits(model, evaluation, default_cache(model.config), CHUNK)
        divergence = {}
        for rank in RANKS:
            config = CompressionConfig.uniform(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=rank)
            compressor = KVCompressor(config, geometry, algo="pca")
            compressor.fit_statistics([{"keys": keys, "values": values}])
            wrapper = CompressedKVModelWrapper(model, compressor)
            try:
                divergence[rank] = _kl(exact, chunked_logits(model, evaluation, wrapper.new_cache(), CHUNK))
            finally:
                wrapper.close()
    assert divergence[16] < 1e-6, divergence
    assert divergence[16] < divergence[8] < divergence[2], divergence

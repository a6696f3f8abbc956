"""The KV geometry of a causal LM: what a compressor must agree with, read from the model's config."""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import asdict, dataclass

from torch import nn

from kvlight.errors import ModelLoadError

#: what the refusal of an architecture adds: which models kvlight does serve.
SERVED = (
    "kvlight supports decoder-only LMs with softmax attention over rotary or learned positions "
    "(e.g. llama, mistral, qwen3, phi3, gpt_neox, cohere, gemma2, gemma3_text, gpt2)"
)
#: layer types whose cache is a plain per-token K/V (a sliding layer keeps its window, as transformers' cache does).
_ATTENTION_LAYERS = {"full_attention", "sliding_attention"}


@dataclass(frozen=True)
class KVGeometry:
    """What a KV compressor must agree with: the shape of every layer's K and V.

    Keys and values reach the cache as ``[batch, num_kv_heads, seq, head_dim]`` in each of ``num_layers``.
    """

    model_type: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    rope: bool

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> KVGeometry:
        return cls(**{k: data[k] for k in ("model_type", "num_layers", "num_kv_heads", "head_dim", "rope")})


def kv_geometry(model: nn.Module) -> KVGeometry:
    """The KV geometry of a model (or of anything with a ``.config``), read from its config by structure, not by a
    list of names; what kvlight cannot reproduce raises :class:`ModelLoadError` with one line saying why."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    reason = unsupported_reason(config)
    if reason is not None:
        raise ModelLoadError(f"model type {model_type!r} is not supported: {reason}; {SERVED}")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = (getattr(config, "num_key_value_heads", None) if reads_kv_heads(config) else None) or heads
    if getattr(config, "multi_query", False) is True:  # GPT-BigCode: one K/V head shared by every query head
        kv_heads = 1
    return KVGeometry(model_type, config.num_hidden_layers, kv_heads, head_dim, rope=has_rope(config))


def reads_kv_heads(config) -> bool:
    """Whether ``config.num_key_value_heads`` is what the model's attention uses (grouped-query attention).

    A config keeps any keyword it is built with, so ``GPTNeoXConfig(num_key_value_heads=2)`` holds a value that
    GPT-NeoX's attention never reads: it projects one K/V head per query head. A value counts when the config class
    declares the field (or maps or computes it), or when the family's modeling file reads it (composite configs whose
    text part declares it); otherwise every attention head has its own K/V head. A config without a modeling file
    to read (remote code) keeps the value.
    """
    kind = type(config)
    declared = any(
        "num_key_value_heads" in getattr(klass, "__annotations__", {})
        or isinstance(klass.__dict__.get("num_key_value_heads"), property)
        for klass in kind.__mro__
    )
    return declared or "num_key_value_heads" in getattr(kind, "attribute_map", {}) or _modeling_reads(kind.__module__)


@functools.cache
def _modeling_reads(config_module: str) -> bool:
    """Whether the modeling file beside ``config_module`` (``...configuration_x`` -> ``...modeling_x``) mentions
    ``num_key_value_heads``; True when there is none to read."""
    if ".configuration_" not in config_module:
        return True
    try:
        source = inspect.getsource(importlib.import_module(config_module.replace(".configuration_", ".modeling_")))
    except (ImportError, OSError, TypeError):
        return True
    return "num_key_value_heads" in source


def has_rope(config) -> bool:
    """True when the config describes rotary position embeddings (transformers 5 configs carry ``rope_parameters``)."""
    return getattr(config, "rope_parameters", None) is not None


def unsupported_reason(config) -> str | None:
    """Why kvlight cannot serve a model of this config (one clause), or None."""
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model; kvlight compresses the self-attention cache of decoder-only LMs"
    if getattr(config, "kv_lora_rank", None):
        return "its multi-head latent attention (MLA) already caches a compressed latent, not per-head K/V"
    others = set(getattr(config, "layer_types", None) or []) - _ATTENTION_LAYERS
    if others:
        return f"layers of type {', '.join(sorted(others))} keep no per-token K/V cache kvlight can compress"
    if any(getattr(config, name, None) is None for name in ("num_attention_heads", "hidden_size", "num_hidden_layers")):
        return "its config names no attention heads, hidden size and layers: no KV cache kvlight understands"
    if getattr(config, "alibi", False):
        return "ALiBi biases attention by distance inside the attention function, which kvlight's decode path skips"
    # Soft-capped logits (Gemma 2) are capped by the decode attention as the model's own attention function does
    # (its softcap argument), and a rotary embedding per layer type (Gemma 3) is observed per type.
    return None

"""Every name that depends on the transformers version (tested: 5.20-5.23; see pyproject.toml).

What moves between releases lives here and nowhere else: the keyword a model takes its cache under (``past_key_values``
up to 5.23, ``cache`` from 5.24), the cache base classes kvlight's caches subclass, how a custom attention function and
its mask function are registered, how a model's attention implementation is read and switched, the eager attention
function of a modeling file, and how a rotary module is called for ``(cos, sin)``.
"""

from __future__ import annotations

import sys

from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

__all__ = [
    "CACHE_KWARG",
    "Cache",
    "DynamicCache",
    "DynamicLayer",
    "attention_implementation",
    "cache_kwargs",
    "dynamic_cache",
    "original_attention",
    "register_attention",
    "rotary_cos_sin",
    "set_attention",
]

#: keyword under which a model's forward takes a cache, for the pinned transformers range.
CACHE_KWARG = "past_key_values"


def cache_kwargs(cache: Cache | None) -> dict:
    """``{CACHE_KWARG: cache, 'use_cache': ...}`` for ``model(...)`` / ``model.generate(...)``."""
    return {CACHE_KWARG: cache, "use_cache": cache is not None}


def dynamic_cache() -> DynamicCache:
    """A plain uncompressed cache, the reference everything is compared against."""
    return DynamicCache()


def attention_implementation(model: nn.Module) -> str:
    """The attention implementation a model runs (``sdpa``, ``eager``, ...)."""
    return getattr(model.config, "_attn_implementation", None) or "eager"


def set_attention(model: nn.Module, name: str) -> None:
    """Switch a model to the attention implementation registered as ``name``."""
    model.set_attn_implementation(name)


def register_attention(name: str, forward, mask_of: str) -> None:
    """Register an attention function as ``name``, with the mask function of implementation ``mask_of`` (without a
    mask function of its own transformers would silently drop the mask)."""
    AttentionInterface.register(name, forward)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask_of])


def original_attention(name: str, module: nn.Module):
    """The attention function of implementation ``name`` for ``module`` (each modeling file has its own eager one)."""
    if name == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[name]


def rotary_cos_sin(rotary: nn.Module, probe, position_ids):
    """``(cos, sin)`` of a model's rotary module for ``position_ids`` (``probe`` gives their dtype and device)."""
    return rotary(probe, position_ids=position_ids)

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
    "pipeline_for",
    "register_attention",
    "rope_layers",
    "rotary_cos_sin",
    "rotary_function",
    "rotary_is_dynamic",
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


def rotary_function(rotary: nn.Module):
    """The ``apply_rotary_pos_emb(q, k, cos, sin)`` of the modeling file that defines ``rotary`` (None if it has none):
    it knows the file's layout (half-split or interleaved) and partial rotary."""
    return getattr(sys.modules[type(rotary).__module__], "apply_rotary_pos_emb", None)


def rotary_is_dynamic(rotary: nn.Module) -> bool:
    """True when ``rotary``'s frequencies change with the sequence length (transformers' ``dynamic_rope_update``:
    ``dynamic`` NTK and ``longrope``), so a position's ``(cos, sin)`` depends on when its token arrived."""
    rope_type = getattr(rotary, "rope_type", "default")
    return isinstance(rope_type, str) and ("dynamic" in rope_type or rope_type == "longrope")


def rope_layers(blocks) -> list[bool]:
    """Per decoder block, whether its attention rotates keys (SmolLM3's NoPE layers set ``self_attn.use_rope``)."""
    return [bool(getattr(getattr(block, "self_attn", None), "use_rope", True)) for block in blocks]


def pipeline_for(model: nn.Module, task: str, **kwargs):
    """``transformers.pipeline(task, model=model, **kwargs)`` for a model-like object that is not a
    ``PreTrainedModel`` subclass (kvlight's wrapper), without the error transformers logs for a class name missing from
    its task mapping: the check is by name only, and the pipeline runs the object's ``generate``/``forward``."""
    import logging

    from transformers import pipeline

    checker = logging.getLogger("transformers.pipelines.base")
    level = checker.level
    checker.setLevel(logging.CRITICAL)
    try:
        return pipeline(task, model=model, **kwargs)
    finally:
        checker.setLevel(level)

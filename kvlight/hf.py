"""Every name that depends on the transformers version (tested: 5.20-5.23)."""

from __future__ import annotations

from transformers.cache_utils import Cache, DynamicCache

#: keyword under which a model's forward takes a cache, for the pinned transformers range.
CACHE_KWARG = "past_key_values"


def cache_kwargs(cache: Cache | None) -> dict:
    """``{CACHE_KWARG: cache, 'use_cache': ...}`` for ``model(...)`` / ``model.generate(...)``."""
    return {CACHE_KWARG: cache, "use_cache": cache is not None}


def dynamic_cache() -> DynamicCache:
    """A plain uncompressed cache, the reference everything is compared against."""
    return DynamicCache()

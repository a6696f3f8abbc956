"""Serve a frozen model with a compressed KV cache: the seed's Step 3.

``CompressedKVModelWrapper(model, compressor)`` behaves like the model for ``forward`` and
``generate``, passing a fresh :class:`CompressedCache` whenever the caller gives none. The only
thing it attaches to the model is the position-observing pre-hook of :class:`PositionTracker`
(RoPE models); :meth:`close` removes it.
"""

from __future__ import annotations

import torch
from torch import nn

from kvlight.cache import CACHE_KWARG, CompressedCache, PositionTracker
from kvlight.compressors import KVCompressor
from kvlight.models import kv_geometry


class CompressedKVModelWrapper(nn.Module):
    """A causal LM whose KV cache stores the compressor's latents.

    Args:
        model: a Hugging Face causal LM of the geometry the compressor was fitted to.
        compressor: a fitted :class:`KVCompressor` (PCA, KVSplice or mixed).
        latent_dtype: dtype to store latents in (default: the model's K/V dtype).
    """

    def __init__(self, model: nn.Module, compressor: KVCompressor, latent_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.geometry = kv_geometry(model)
        compressor.check_geometry(self.geometry)
        self.model = model
        self.compressor = compressor.to(device=next(model.parameters()).device)
        self.latent_dtype = latent_dtype
        self.tracker = PositionTracker(model) if self.geometry.rope else None

    def new_cache(self) -> CompressedCache:
        """An empty compressed cache bound to this model's positions."""
        return CompressedCache(self.compressor, self.tracker, latent_dtype=self.latent_dtype)

    def _with_cache(self, kwargs: dict) -> dict:
        if kwargs.get(CACHE_KWARG) is None and kwargs.get("use_cache", True):
            kwargs[CACHE_KWARG] = self.new_cache()
            kwargs["use_cache"] = True
        return kwargs

    def forward(self, *args, **kwargs):
        """``model(...)`` with a compressed cache (a new one unless ``past_key_values`` is given)."""
        return self.model(*args, **self._with_cache(kwargs))

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """``model.generate(...)`` with a compressed cache; greedy, sampling and batches all work."""
        return self.model.generate(*args, **self._with_cache(kwargs))

    def close(self) -> None:
        """Detach from the model (remove the position hook)."""
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None

"""Serve a frozen model with a compressed KV cache: the upstream design's step 3.

``CompressedKVModelWrapper(model, compressor)`` behaves like the model for ``forward`` and
``generate``, passing a fresh :class:`CompressedCache` whenever the caller gives none. What it changes on the model
(the position-observing hooks of :class:`PositionTracker` on RoPE models, the attention implementation with fast
decode) lasts until :meth:`~CompressedKVModelWrapper.close`, which a ``with`` block calls on exit::

    with kvlight.compress(model, "out/compressor_pca") as wrapped:
        wrapped.generate(**inputs, max_new_tokens=50)

:func:`from_pretrained` and :func:`compress` (``kvlight.from_pretrained``, ``kvlight.compress``) load the compressor
from a directory or a hub repo id, its geometry checked against the model's.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import nn

from kvlight.compressors.compressor import KVCompressor
from kvlight.compressors.provenance import check_base_model
from kvlight.errors import AlreadyWrappedError
from kvlight.geometry import kv_geometry
from kvlight.hf import CACHE_KWARG, pipeline_for
from kvlight.serving.attention import ALREADY_WRAPPED, LatentAttention
from kvlight.serving.cache import CacheSettings, CompressedCache
from kvlight.serving.positions import PositionTracker


def positions_from_mask(attention_mask: torch.Tensor | None, new_tokens: int | None) -> torch.Tensor | None:
    """Position ids ``[B, new_tokens]`` of the newest tokens counted over real tokens only, or None when the
    mask pads nothing (the model's own ``arange`` is then right).

    ``attention_mask`` covers the cached and the new tokens, ``[B, past + new_tokens]``; leading pads get 0 like
    in ``generate``, trailing pads repeat the last real position (both are masked out of attention).
    """
    if attention_mask is None or new_tokens is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
        return None
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    return positions[:, -new_tokens:]


def _new_tokens(args: tuple, kwargs: dict) -> int | None:
    tokens = kwargs.get("input_ids", args[0] if args else None)
    if tokens is None:
        tokens = kwargs.get("inputs_embeds")
    return None if tokens is None else int(tokens.shape[1])


#: the open wrapper of each wrapped model (weak both ways: neither is kept alive by being wrapped).
_OPEN: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def _model_name(model: nn.Module) -> str | None:
    """The name a model was loaded under (its ``name_or_path``), None where it has none (built from a config)."""
    name = getattr(getattr(model, "config", None), "name_or_path", None)
    return str(name) if name else None


class CompressedKVModelWrapper(nn.Module):
    """A causal LM whose KV cache stores the compressor's latents.

    A context manager: ``with CompressedKVModelWrapper(model, compressor) as wrapped:`` (or ``kvlight.compress``)
    restores the model on exit. A model is served by one open wrapper at a time; wrapping it again before
    :meth:`close` raises :class:`~kvlight.errors.AlreadyWrappedError`.

    Args:
        model: a Hugging Face causal LM of the geometry the compressor was fitted to.
        compressor: a fitted :class:`KVCompressor` (PCA, KVSplice or mixed).
        latent_dtype: dtype to store latents in (default: ``storage_dtype``).
        storage_dtype: dtype the cache keeps exact tokens and unquantized latents in (default: the K/V dtype), e.g.
            bfloat16 for a float32 model.
        fast_decode: decode steps attend to the stored latents in place (kvlight.serving.attention) instead of
            reconstructing the whole history; False keeps the plain reconstruction path. Switching the model to
            kvlight's attention function (sdpa or eager models only) lasts until :meth:`close`.
        allow_model_mismatch: serve a compressor whose JSON records another base model than ``model`` (its K/V
            projection weights differ by more than rounding) with a warning; by default that is refused
            (:class:`~kvlight.errors.ModelMismatchError`).
    """

    def __init__(
        self,
        model: nn.Module,
        compressor: KVCompressor,
        latent_dtype: torch.dtype | None = None,
        fast_decode: bool = True,
        storage_dtype: torch.dtype | None = None,
        allow_model_mismatch: bool = False,
    ) -> None:
        super().__init__()
        self.fast = self.tracker = None
        open_wrapper = _OPEN.get(model)
        if open_wrapper is not None and open_wrapper() is not None:
            raise AlreadyWrappedError(ALREADY_WRAPPED)
        self.geometry = kv_geometry(model)
        compressor.check_geometry(self.geometry, _model_name(model))
        check_base_model(compressor.base_model, model, allow_mismatch=allow_model_mismatch)
        self.model = model
        self.compressor = compressor.to(device=next(model.parameters()).device)
        self.latent_dtype = latent_dtype
        self.storage_dtype = storage_dtype
        try:
            self.fast = LatentAttention(model) if fast_decode else None  # first: it refuses a model already switched
            self.tracker = PositionTracker(model) if self.geometry.rope else None
        except BaseException:
            self.close()  # a refusal leaves the model as it was
            raise
        _OPEN[model] = weakref.ref(self)

    def __getattr__(self, name: str):
        """Whatever this wrapper does not define is the model's (``device``, ``dtype``, ``config``,
        ``generation_config``, ``can_generate``, ...), so transformers code that expects a model, such as
        ``pipeline("text-generation", model=wrapped, tokenizer=...)``, takes the wrapper for one."""
        try:
            return super().__getattr__(name)  # parameters, buffers and submodules (``model``, ``compressor``)
        except AttributeError:
            model = self.__dict__["_modules"].get("model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)

    def new_cache(self) -> CompressedCache:
        """An empty compressed cache bound to this model's positions."""
        settings = CacheSettings(latent_dtype=self.latent_dtype, storage_dtype=self.storage_dtype)
        return CompressedCache(self.compressor, self.tracker, fast=self.fast, settings=settings)

    def pipeline(self, task: str = "text-generation", **kwargs):
        """A transformers pipeline that generates with the compressed cache, e.g.
        ``wrapped.pipeline(tokenizer=tokenizer)("Hello", max_new_tokens=20)``; ``kwargs`` go to
        ``transformers.pipeline`` (tokenizer, device, ...). ``pipeline(task, model=wrapped)`` works too, with an
        error line logged by transformers for the wrapper's class name."""
        return pipeline_for(self, task, **kwargs)

    def load_cache(self, path) -> CompressedCache:
        """A cache restored from what :meth:`CompressedCache.save` wrote, bound to this model; generation continues
        from it with the same tokens as from the cache it was saved from. A truncated file, or one saved with another
        compressor, is refused with one line (kvlight.serving.persist)."""
        from kvlight.serving.persist import load_cache

        return load_cache(path, self.new_cache())

    def _with_cache(self, kwargs: dict) -> dict:
        if kwargs.get(CACHE_KWARG) is None and kwargs.get("use_cache", True):
            kwargs[CACHE_KWARG] = self.new_cache()
            kwargs["use_cache"] = True
        return kwargs

    def forward(self, *args, **kwargs):
        """``model(...)`` with a compressed cache (a new one unless ``past_key_values`` is given).

        With a padded ``attention_mask`` and no ``position_ids``, positions are counted over the real tokens (as
        ``generate`` does), so a left-padded row gets the positions, and the logits, it gets alone.
        """
        kwargs = self._with_cache(kwargs)
        if kwargs.get("position_ids") is None:
            position_ids = positions_from_mask(kwargs.get("attention_mask"), _new_tokens(args, kwargs))
            if position_ids is not None:
                kwargs["position_ids"] = position_ids
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """``model.generate(...)`` with a compressed cache; greedy, sampling and batches all work."""
        return self.model.generate(*args, **self._with_cache(kwargs))

    def close(self) -> None:
        """Detach from the model: remove the position hooks and restore its attention implementation. Closing twice
        does nothing; the model can then be wrapped again."""
        if self.fast is not None:
            self.fast.close()
            self.fast = None
        if self.tracker is not None:
            self.tracker.close()
            self.tracker = None
        model = self.__dict__["_modules"].get("model")
        if model is not None:
            open_wrapper = _OPEN.get(model)
            if open_wrapper is not None and open_wrapper() in (self, None):
                del _OPEN[model]

    def __enter__(self) -> CompressedKVModelWrapper:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def compress(
    model: nn.Module, compressor_or_path: KVCompressor | str | os.PathLike, **wrapper_kwargs
) -> CompressedKVModelWrapper:
    """Serve ``model`` with a compressed KV cache: ``compressor_or_path`` is a fitted :class:`KVCompressor`, the
    directory ``save_pretrained`` wrote, or a Hugging Face Hub repo id (:func:`from_pretrained`).

    ``wrapper_kwargs`` go to :class:`CompressedKVModelWrapper` (``fast_decode``, ``storage_dtype``, ...). Use it as
    a context manager to restore the model afterwards: ``with kvlight.compress(model, path) as wrapped: ...``.
    """
    if isinstance(compressor_or_path, KVCompressor):
        return CompressedKVModelWrapper(model, compressor_or_path, **wrapper_kwargs)
    return from_pretrained(model, compressor_or_path, **wrapper_kwargs)


def from_pretrained(
    model: nn.Module,
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    **wrapper_kwargs,
) -> CompressedKVModelWrapper:
    """``model`` wrapped with the compressor of a local directory or a hub repo id
    (:meth:`KVCompressor.from_pretrained`; ``revision``, ``token``, ``cache_dir`` and ``local_files_only`` are for the
    download). The geometry is read from the model and checked against the one the compressor was fitted to;
    ``wrapper_kwargs`` go to :class:`CompressedKVModelWrapper`."""
    compressor = KVCompressor.from_pretrained(  # the wrapper checks the geometry, naming both models
        path_or_repo_id,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    return CompressedKVModelWrapper(model, compressor, **wrapper_kwargs)

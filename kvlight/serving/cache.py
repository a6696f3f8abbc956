"""The transformers ``Cache`` that stores latents and hands attention reconstructed K/V.

Layout of one :class:`~kvlight.serving.layer.CompressedLayer`, in sequence order::

    [ sink tokens (exact) | compressed tokens (latents) | recent tokens (exact) ]

A sliding layer (the model's ``sliding_window`` on that layer, as transformers' default cache reads it) keeps only
its window, as ``DynamicSlidingWindowLayer`` does: ``[ compressed | recent ]`` over the last ``window - 1`` tokens,
older ones dropped, no sinks.
New tokens enter the recent window; tokens pushed out of it are compressed once (keys of RoPE
models are rotated back, with the tables of the positions the model actually used, to pre-RoPE or to their RoPE
block's start as the compressor's ``key_rope_block`` says, then encoded).
``update()`` returns every position, the compressed ones reconstructed, so attention always reads
what the cache stores; on one-token decode steps under an open :class:`~kvlight.serving.attention.LatentAttention`
it instead offers the layer to kvlight's attention function (:class:`~kvlight.serving.attention.DecodeHandoff`),
which reads the stored latents in place. Nothing here patches the model: positions are observed by a forward
pre-hook that :class:`~kvlight.serving.positions.PositionTracker` registers on the model's rotary module, and
removes. The transformers names these classes use come from kvlight.hf.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvlight.compressors.compressor import KVCompressor
from kvlight.errors import CacheError
from kvlight.geometry import KVGeometry
from kvlight.hf import Cache, default_cache_windows
from kvlight.serving import attention
from kvlight.serving.layer import CompressedLayer, LayerSettings
from kvlight.serving.positions import PositionLog, PositionTracker
from kvlight.serving.scratch import DecodeScratch


def dynamic_cache_bytes(geometry: KVGeometry, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes a full ``DynamicCache()`` of ``dtype`` (every layer keeps every token) holds for ``batch`` sequences of
    ``seq_len`` tokens."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * geometry.num_layers * batch * geometry.num_kv_heads * seq_len * geometry.head_dim * itemsize


def default_cache_bytes(
    geometry: KVGeometry, batch: int, seq_len: int, dtype: torch.dtype, windows: Sequence[int | None] | None
) -> int:
    """Bytes the cache transformers uses for this model by default, ``DynamicCache(config=model.config)``, holds
    after ``batch`` sequences of ``seq_len`` tokens: a sliding layer (``windows[i]``, see
    :func:`kvlight.hf.default_cache_windows`) keeps the last ``window - 1`` tokens (its ``DynamicSlidingWindowLayer``),
    a full layer (None) every token. ``windows`` None: every layer is full (:func:`dynamic_cache_bytes`)."""
    if windows is None:
        return dynamic_cache_bytes(geometry, batch, seq_len, dtype)
    if len(windows) != geometry.num_layers:
        raise ValueError(f"{len(windows)} layer windows for a model of {geometry.num_layers} layers")
    itemsize = torch.empty((), dtype=dtype).element_size()
    tokens = sum(seq_len if window is None else min(seq_len, window - 1) for window in windows)
    return 2 * batch * geometry.num_kv_heads * tokens * geometry.head_dim * itemsize


def _model_windows(tracker: PositionTracker | None, fast: attention.LatentAttention | None) -> list[int | None] | None:
    """Each layer's sliding window in the model's default cache, read from the model the tracker or the fast path
    serves (None when neither knows the model: every layer keeps every token)."""
    if tracker is not None:
        return tracker.windows
    if fast is not None:
        return default_cache_windows(fast.model.config)
    return None


@dataclass(frozen=True)
class CacheSettings:
    """How a compressed cache stores tokens; None takes the compressor's config.

    Args:
        sink_tokens: first positions kept exact.
        recent_window: newest positions kept exact.
        latent_bits: rank codecs: 8, 4, 2 or "fp8" to store latents quantized (width codecs have their own widths).
        compress_block: during one-token decode steps, the recent window is flushed to ``recent_window`` tokens every
            ``compress_block`` steps (it holds up to ``recent_window + compress_block - 1`` exact tokens, counted in
            the bytes); 1 compresses each token as it leaves. Longer inputs always leave ``recent_window`` exact.
        latent_dtype: dtype unquantized latents are stored in (default: ``storage_dtype``).
        storage_dtype: dtype exact tokens (sinks, recent window) and unquantized latents are kept in (default: the K/V
            dtype); e.g. bfloat16 for a float32 model, as a 16-bit deployment stores them. Attention reads the K/V
            dtype whatever the storage.
    """

    sink_tokens: int | None = None
    recent_window: int | None = None
    latent_bits: int | str | None = None
    compress_block: int = 16
    latent_dtype: torch.dtype | None = None
    storage_dtype: torch.dtype | None = None

    def resolve(self, config) -> LayerSettings:
        """The settings of every layer: these, the compressor's ``config`` where these say None."""
        if self.compress_block < 1:
            raise ValueError(f"compress_block must be >= 1, got {self.compress_block}")
        pick = lambda mine, theirs: theirs if mine is None else mine  # noqa: E731
        return LayerSettings(
            sink_tokens=pick(self.sink_tokens, config.sink_tokens),
            recent_window=pick(self.recent_window, config.recent_window),
            compress_block=self.compress_block,
            latent_bits=pick(self.latent_bits, config.latent_bits),
            quant_group_size=config.quant_group_size,
            latent_dtype=self.latent_dtype,
            storage_dtype=self.storage_dtype,
        )


#: ``CompressedCache(compressor)`` without a tracker argument (a cache built by hand).
_NO_TRACKER = object()


def _default_tracker(compressor: KVCompressor) -> None:
    """None where a cache built without a tracker is right (a compressor fitted to a model without RoPE); else the
    one-line refusal that says how to build one."""
    geometry = compressor.geometry
    if geometry is not None and not geometry.rope:
        return None
    what = "a RoPE model" if geometry is not None else "a model it cannot tell is free of RoPE (no fitted geometry)"
    raise CacheError(
        f"CompressedCache(compressor) alone cannot serve {what}: it needs the positions each key was rotated with; "
        "build it with CompressedKVModelWrapper(model, compressor).new_cache(), or pass "
        "tracker=PositionTracker(model) (or tracker=None for learned positions)"
    )


class CompressedCache(Cache):
    """A ``Cache`` whose layers keep latents (plus exact sink and recent tokens).

    Build it with :meth:`CompressedKVModelWrapper.new_cache <kvlight.serving.wrapper.CompressedKVModelWrapper.new_cache>`:
    a RoPE model's cache must know the positions the model rotated each key with, and the wrapper's tracker observes
    them. ``copy.deepcopy(cache)`` (the transformers prefix-cache recipe) copies only the stored tokens; the copy
    shares the compressor, the position tracker and the fast path, so it serves the same model.

    Args:
        compressor: the fitted compressor (its geometry must match the model's).
        tracker: the model's :class:`PositionTracker` for RoPE models, None for learned positions (GPT-2). Left out,
            it is None for a compressor fitted to a model without RoPE, and a RoPE (or unknown) compressor is refused:
            without positions the keys cannot be un-rotated, and generation would be garbage.
        fast: the model's open :class:`~kvlight.serving.attention.LatentAttention`; while it is active, decode steps
            attend to the stored latents in place. None: every step returns reconstructed K/V (the plain path).
        settings: how tokens are stored (:class:`CacheSettings`; default: the compressor's config).
        windows: per layer, the sliding window whose tokens it keeps (None: every token), as transformers' default
            cache keeps them (:func:`kvlight.hf.default_cache_windows`); default: read from the model of ``tracker``
            or ``fast``. A sliding layer keeps the last ``window - 1`` tokens, drops (never compresses) older ones and
            keeps no sinks.
    """

    def __init__(
        self,
        compressor: KVCompressor,
        tracker: PositionTracker | None = _NO_TRACKER,
        fast: attention.LatentAttention | None = None,
        settings: CacheSettings | None = None,
        windows: Sequence[int | None] | None = None,
    ) -> None:
        if tracker is _NO_TRACKER:
            tracker = _default_tracker(compressor)
        self.compressor = compressor
        self.fast = fast
        self.tracker = tracker
        self.settings = (settings or CacheSettings()).resolve(compressor.config)
        windows = list(windows) if windows is not None else _model_windows(tracker, fast)
        self.windows = windows if windows is not None else [None] * compressor.num_layers
        if len(self.windows) != compressor.num_layers:
            raise CacheError(f"{len(self.windows)} layer windows for a compressor of {compressor.num_layers} layers")
        # Sinks of a sliding layer leave its window like any token: it keeps none.
        sliding_settings = dataclasses.replace(self.settings, sink_tokens=0)
        self.position_log = PositionLog(tracker)
        self.scratch = DecodeScratch()
        handoff = None if fast is None else fast.handoff
        rope_blocks = compressor.rope_blocks
        layers = [
            CompressedLayer(
                index,
                self.settings if window is None else sliding_settings,
                {kind: compressor.codec(index, kind) for kind in ("k", "v")},
                self.position_log,
                self.scratch,
                handoff,
                window=window,
                rope_block=rope_blocks[index],
            )
            for index, window in enumerate(self.windows)
        ]
        super().__init__(layers=layers)

    @property
    def sink_tokens(self) -> int:
        return self.settings.sink_tokens

    @property
    def recent_window(self) -> int:
        return self.settings.recent_window

    @property
    def compress_block(self) -> int:
        return self.settings.compress_block

    @torch.no_grad()
    def ingest(self, layers, position_ids: torch.Tensor | None = None) -> None:
        """Store K/V that were computed elsewhere (e.g. an uncompressed prefill), as if the model had fed them.

        Args:
            layers: per layer ``(keys, values)``, each ``[B, H, T, D]`` as attention saw them (keys post-RoPE), e.g.
                ``[(layer.keys, layer.values) for layer in dynamic_cache.layers]``.
            position_ids: ``[B, T]`` the positions those keys were rotated with (default ``0..T-1``); ignored for
                models without RoPE.
        """
        layers = list(layers)
        if len(layers) != len(self.layers):
            raise ValueError(f"ingest got {len(layers)} layers, the compressor has {len(self.layers)}")
        batch, _, tokens, _ = layers[0][0].shape
        if self.tracker is not None:
            if position_ids is None:
                start = self.get_seq_length()
                position_ids = torch.arange(start, start + tokens, device=layers[0][0].device).expand(batch, -1)
            self.position_log.extend(position_ids)
        for index, (keys, values) in enumerate(layers):
            self.layers[index].update(keys, values)

    def stored_bytes(self) -> int:
        """Exact bytes held for the cached tokens: every layer's tensors plus the shared positions (and, for dynamic
        rope types, the rotation tables each token arrived with: PositionLog.tables)."""
        total = sum(t.numel() * t.element_size() for layer in self.layers for t in layer.stored_tensors())
        return total + sum(t.numel() * t.element_size() for t in self.position_log.stored_tensors())

    def allocated_bytes(self) -> int:
        """Bytes held for the cached tokens including buffer slack (at most ``LatentStore.GROW - 1`` tokens per store)."""
        total = sum(layer.allocated_bytes() for layer in self.layers)
        return total + sum(t.numel() * t.element_size() for t in self.position_log.stored_tensors())

    def scratch_bytes(self) -> int:
        """Bytes of decode scratch shared by all layers: the key workspace, the rotation table, the decoders."""
        tensors = self.scratch.tensors() + self.position_log.table_tensors()
        return sum(t.numel() * t.element_size() for t in tensors)

    def __deepcopy__(self, memo: dict) -> CompressedCache:
        """A copy holding copies of the stored tokens and positions only (``copy.deepcopy``, e.g. of a prefix cache
        per request): the compressor, its codecs and quantizers, the position tracker and the fast path belong to the
        model and are shared, and the copy gets its own decode scratch."""
        shared = [self.compressor, self.tracker, self.fast]
        for layer in self.layers:
            shared += [layer.codecs, *layer.codecs.values(), layer.handoff]
            shared += [store.quantizer for store in (layer.latent_k, layer.latent_v) if store is not None]
        for obj in shared:
            if obj is not None:
                memo[id(obj)] = obj
        memo[id(self.scratch)] = DecodeScratch()
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            setattr(copied, name, copy.deepcopy(value, memo))
        return copied

    def save(self, path, entropy: str | None = None) -> None:
        """Write exactly what this cache stores (codes, scales, exact tokens, positions) to ``path``: safetensors plus
        a small JSON naming the compressor's fingerprint, atomically. ``entropy="zstd"`` adds lossless entropy coding
        of the stored tensors. :meth:`~kvlight.serving.wrapper.CompressedKVModelWrapper.load_cache` reads it back (kvlight.serving.persist)."""
        from kvlight.serving.persist import save_cache

        save_cache(self, path, entropy=entropy)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.position_log.truncate(self.layers[0].length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.position_log.select(lambda t: t.index_select(0, beam_idx.to(t.device)))

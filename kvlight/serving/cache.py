"""The transformers ``Cache`` that stores latents and hands attention reconstructed K/V.

Every call into transformers' cache API lives in this module (tested range: transformers
5.20-5.23, where the model argument is ``past_key_values``; 5.24 renames it ``cache``).

Layout of one :class:`CompressedLayer`, in sequence order::

    [ sink tokens (exact) | compressed tokens (latents) | recent tokens (exact) ]

New tokens enter the recent window; tokens pushed out of it are compressed once (keys of RoPE
models are rotated back to pre-RoPE with the positions the model actually used, then encoded).
``update()`` returns every position, the compressed ones reconstructed, so attention always reads
what the cache stores; on one-token decode steps under an open :class:`~kvlight.attention.LatentAttention`
it instead hands the layer to kvlight's attention function, which reads the stored latents in place
(:meth:`CompressedLayer.attend`). Nothing here patches the model: positions are observed by a forward
pre-hook that :class:`PositionTracker` registers on the model's rotary module, and removes.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from kvlight.compressors import KVCompressor
from kvlight.geometry import KVGeometry
from kvlight.serving import attention
from kvlight.serving.layer import CompressedLayer
from kvlight.serving.positions import PositionLog, PositionTracker
from kvlight.serving.quant import LatentQuantizer, codec_quantizer
from kvlight.serving.widths import DirectionQuantizer, direction_quantizer


def dynamic_cache_bytes(geometry: KVGeometry, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes a ``DynamicCache`` of ``dtype`` holds for ``batch`` sequences of ``seq_len`` tokens."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * geometry.num_layers * batch * geometry.num_kv_heads * seq_len * geometry.head_dim * itemsize


class CompressedCache(Cache):
    """A ``Cache`` whose layers keep latents (plus exact sink and recent tokens).

    Args:
        compressor: the fitted compressor (its geometry must match the model's).
        tracker: the model's :class:`PositionTracker` for RoPE models, None for learned positions (GPT-2).
        sink_tokens: first positions kept exact (None: the compressor's config).
        recent_window: newest positions kept exact (None: the compressor's config).
        latent_dtype: dtype latents are stored in (default: ``storage_dtype``).
        storage_dtype: dtype exact tokens (sinks, recent window) and unquantized latents are kept in (default: the K/V
            dtype); e.g. bfloat16 for a float32 model, as a 16-bit deployment stores them. Attention reads the K/V
            dtype whatever the storage.
        latent_bits: 8, 4, 2 or "fp8" to store latents quantized (None: the compressor's config).
        compress_block: during one-token decode steps, the recent window is flushed to ``recent_window`` tokens every
            ``compress_block`` steps (it holds up to ``recent_window + compress_block - 1`` exact tokens, counted in
            the bytes); 1 compresses each token as it leaves. Longer inputs always leave ``recent_window`` exact.
        fast: the model's open :class:`~kvlight.attention.LatentAttention`; while it is active, decode steps attend
            to the stored latents in place. None: every step returns reconstructed K/V (the plain path).
    """

    def __init__(
        self,
        compressor: KVCompressor,
        tracker: PositionTracker | None = None,
        sink_tokens: int | None = None,
        recent_window: int | None = None,
        latent_dtype: torch.dtype | None = None,
        latent_bits: int | str | None = None,
        fast: attention.LatentAttention | None = None,
        compress_block: int = 16,
        storage_dtype: torch.dtype | None = None,
    ) -> None:
        if compress_block < 1:
            raise ValueError(f"compress_block must be >= 1, got {compress_block}")
        self.compress_block = compress_block
        self.compressor = compressor
        self.fast = fast
        self._decoders: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._gathers: dict[tuple[int, str], torch.Tensor] = {}
        self._workspace: torch.Tensor | None = None
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self.latent_bits = compressor.config.latent_bits if latent_bits is None else latent_bits
        self.quant_group_size = compressor.config.quant_group_size
        self.tracker = tracker
        self.sink_tokens = compressor.config.sink_tokens if sink_tokens is None else sink_tokens
        self.recent_window = compressor.config.recent_window if recent_window is None else recent_window
        self.latent_dtype = latent_dtype
        self.storage_dtype = storage_dtype
        self.position_log = PositionLog(tracker)
        super().__init__(layers=[CompressedLayer(i, self) for i in range(compressor.num_layers)])

    def quantizer(self, codec, dtype: torch.dtype) -> LatentQuantizer | DirectionQuantizer | None:
        """How one layer codec's latents (of ``dtype``) are stored: static mixed-width codes when its heads have
        widths, else per-token group quantization (``latent_bits``), else None (latents in ``dtype``)."""
        if codec.has_widths:
            return direction_quantizer(codec, dtype)
        return codec_quantizer(self.latent_bits, self.quant_group_size, codec)

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

    def decoder(self, layer: int, kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer codec's affine decoder ``(A [H, r_max, D], c [H, D])`` in ``dtype``, channel scale folded in."""
        key = (layer, kind, dtype)
        if key not in self._decoders:
            codec = self.compressor.codec(layer, kind)
            if codec.has_widths:
                store = self.layers[layer].latent_k if kind == "k" else self.layers[layer].latent_v
                weight, bias, _ = attention.width_decoder(codec, store.quantizer)
                self._decoders[key] = (weight.to(dtype), bias.to(dtype))
            else:
                scale = None if self.latent_bits is None else codec.latent_std.detach().float()
                self._decoders[key] = attention.stacked_decoder(codec, scale, dtype)
        return self._decoders[key]

    def width_gather(self, layer: int, kind: str, quantizer: DirectionQuantizer) -> torch.Tensor:
        """``[H * r_max]`` indices that lay a width codec's virtual codes out per head (see attention.width_decoder)."""
        key = (layer, kind)
        if key not in self._gathers:
            self._gathers[key] = attention.width_decoder(self.compressor.codec(layer, kind), quantizer)[2]
        return self._gathers[key]

    def workspace(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat scratch buffer of at least ``numel`` elements, shared by all layers (grown in 256-token steps)."""
        if self._workspace is None or self._workspace.numel() < numel or self._workspace.dtype != dtype:
            device = self.layers[0].keys.device
            self._workspace = torch.empty(int(numel * 1.05) + 4096, dtype=dtype, device=device)
        return self._workspace

    def compressed_rope(self, first: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin) [B|1, 1, count, D]`` for the compressed tokens at sequence slots ``first:first+count``.

        Shared by every layer and extended only by the newly compressed tokens (the rotary module is not asked again
        for the whole history each step). One row serves the batch when all rows have the same positions.
        """
        have = 0 if self._rope is None else self._rope[1].shape[2]
        if self._rope is None or self._rope[0] != first or have > count or self._rope[1].dtype != dtype:
            self._rope, have = None, 0
        if have < count:
            positions = self.position_log.slice(first + have, first + count)
            if bool((positions == positions[:1]).all()):
                positions = positions[:1]
            cos, sin = (t.unsqueeze(1).to(dtype) for t in self.tracker.cos_sin(positions))
            if self._rope is not None:
                old_cos, old_sin = self._rope[1], self._rope[2]
                if old_cos.shape[0] != cos.shape[0]:
                    old_cos, old_sin = (t.expand(cos.shape[0], -1, -1, -1) for t in (old_cos, old_sin))
                    cos, sin = cos.expand(old_cos.shape[0], -1, -1, -1), sin.expand(old_cos.shape[0], -1, -1, -1)
                cos, sin = torch.cat([old_cos, cos], dim=2), torch.cat([old_sin, sin], dim=2)
            self._rope = (first, cos, sin)
        return self._rope[1], self._rope[2]

    def forget_rope(self) -> None:
        """Drop the rotation table (after a crop, a batch selection, or a reset); appends only extend it."""
        self._rope = None

    def stored_bytes(self) -> int:
        """Exact bytes held for the cached tokens: every layer's tensors plus the shared positions."""
        total = sum(t.numel() * t.element_size() for layer in self.layers for t in layer.stored_tensors())
        positions = self.position_log.positions
        return total + (0 if positions is None else positions.numel() * positions.element_size())

    def allocated_bytes(self) -> int:
        """Bytes held for the cached tokens including buffer slack (at most ``LatentStore.GROW - 1`` tokens per store)."""
        positions = self.position_log.positions
        total = sum(layer.allocated_bytes() for layer in self.layers)
        return total + (0 if positions is None else positions.numel() * positions.element_size())

    def scratch_bytes(self) -> int:
        """Bytes of decode scratch shared by all layers: the key workspace, the rotation table, the decoders."""
        tensors = [] if self._workspace is None else [self._workspace]
        tensors += [] if self._rope is None else list(self._rope[1:])
        tensors += [t for pair in self._decoders.values() for t in pair] + list(self._gathers.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        positions = self.position_log.positions
        if positions is not None:
            self.position_log.positions = positions[:, : self.layers[0].length]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.position_log.positions is not None:
            self.position_log.positions = self.position_log.positions.index_select(0, beam_idx)

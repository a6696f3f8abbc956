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

from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from kvlight import attention
from kvlight.compressors import KVCompressor
from kvlight.models import KVGeometry, rotary_module
from kvlight.quant import LatentQuantizer, QuantizedLatents, codec_quantizer
from kvlight.widths import DirectionQuantizer, PackedCodes

#: keyword under which a model's forward takes a cache, for the pinned transformers range.
CACHE_KWARG = "past_key_values"


def cache_kwargs(cache: Cache | None) -> dict:
    """``{CACHE_KWARG: cache, 'use_cache': ...}`` for ``model(...)`` / ``model.generate(...)``."""
    return {CACHE_KWARG: cache, "use_cache": cache is not None}


def dynamic_cache() -> DynamicCache:
    """A plain uncompressed cache, the reference everything is compared against."""
    return DynamicCache()


def dynamic_cache_bytes(geometry: KVGeometry, batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Bytes a ``DynamicCache`` of ``dtype`` holds for ``batch`` sequences of ``seq_len`` tokens."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * geometry.num_layers * batch * geometry.num_kv_heads * seq_len * geometry.head_dim * itemsize


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class PositionTracker:
    """Observes the position ids each forward of a RoPE model really uses, and rotates keys with them.

    A forward pre-hook on the model's rotary-embedding module records ``position_ids`` (``[B|1, T]``)
    before any attention layer runs. :meth:`close` removes the hook.
    """

    def __init__(self, model: nn.Module) -> None:
        self.rotary = rotary_module(model)
        if self.rotary is None:
            raise ValueError(f"{type(model).__name__} has no rotary embedding module to track positions on")
        self.current: torch.Tensor | None = None
        self.step = 0
        self._internal = False
        self._handle = self.rotary.register_forward_pre_hook(self._observe, with_kwargs=True)

    def _observe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._internal:
            return None
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if position_ids is not None:
            self.current = position_ids.detach()
            self.step += 1
        return None

    def close(self) -> None:
        self._handle.remove()

    def cos_sin(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own ``(cos, sin)``, ``[B|1, T, D]`` float32, for ``position_ids [B|1, T]``."""
        probe = torch.empty(0, dtype=torch.float32, device=position_ids.device)
        self._internal = True
        try:
            cos, sin = self.rotary(probe, position_ids=position_ids)
        finally:
            self._internal = False
        return cos.float(), sin.float()

    def unrotate(self, keys: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Post-RoPE ``keys [B, H, T, D]`` -> pre-RoPE (the ``k_proj`` output), exactly.

        RoPE applies ``s * R(theta)``; its inverse is ``R(-theta) / s^2`` and ``cos^2 + sin^2 = s^2``.
        """
        cos, sin = (t.unsqueeze(1) for t in self.cos_sin(position_ids))
        k = keys.float()
        return ((k * cos - _rotate_half(k) * sin) / (cos * cos + sin * sin)).to(keys.dtype)

    def rotate(self, keys: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE ``keys [B, H, T, D]`` -> post-RoPE, as the model's attention applies it."""
        cos, sin = (t.unsqueeze(1).to(keys.dtype) for t in self.cos_sin(position_ids))
        return keys * cos + _rotate_half(keys) * sin


class _PositionLog:
    """Positions of every token a cache holds, ``[B, N]`` int32, appended once per forward."""

    def __init__(self, tracker: PositionTracker | None) -> None:
        self.tracker = tracker
        self.positions: torch.Tensor | None = None
        self._step = -1

    def observe(self, batch: int, new_tokens: int, device: torch.device) -> None:
        if self.tracker is None or self.tracker.step == self._step:
            return
        current = self.tracker.current
        if current is None or current.shape[-1] != new_tokens:
            raise RuntimeError(
                "the compressed cache did not see this forward's position ids; build it through "
                "CompressedKVModelWrapper (or PositionTracker) for the same model"
            )
        current = current.to(device=device, dtype=torch.int32).expand(batch, -1)
        self.positions = current if self.positions is None else torch.cat([self.positions, current], dim=1)
        self._step = self.tracker.step

    def slice(self, start: int, stop: int) -> torch.Tensor:
        return self.positions[:, start:stop].long()

    def extend(self, position_ids: torch.Tensor) -> None:
        """Append ``position_ids [B, T]`` given directly (see CompressedCache.ingest), for this step's updates."""
        position_ids = position_ids.to(torch.int32)
        self.positions = position_ids if self.positions is None else torch.cat([self.positions, position_ids], dim=1)
        self._step = None if self.tracker is None else self.tracker.step


class LatentStore:
    """The latents of one layer and kind, ``[B, T, R]``, in the K/V dtype, quantized with per-token group scales
    (:class:`~kvlight.quant.LatentQuantizer`) or as static mixed-width codes (:class:`~kvlight.widths.DirectionQuantizer`).

    Stored in buffers preallocated in chunks of :attr:`GROW` tokens and filled in place, so a decode
    step writes one token instead of copying the whole history (at most ``GROW - 1`` tokens of slack).
    """

    #: tokens added to the buffers whenever they are full.
    GROW = 256

    def __init__(
        self, quantizer: LatentQuantizer | DirectionQuantizer | None, template: torch.Tensor, width: int
    ) -> None:
        self.quantizer = quantizer
        self.widths = isinstance(quantizer, DirectionQuantizer)
        self.length = 0
        self._buffers = self._encode(template.new_zeros(template.shape[0], 0, width))

    def _encode(self, z: torch.Tensor) -> list[torch.Tensor | None]:
        """``z [B, T, R]`` -> the tensors stored for it: ``[latents]``, ``[codes, scale, zero]`` or
        ``[field arrays..., exact channels]``."""
        if self.quantizer is None:
            return [z]
        q = self.quantizer.quantize(z)
        if self.widths:
            return q.tensors()
        return [q.codes, q.scale, q.zero]

    @property
    def capacity(self) -> int:
        return self._buffers[0].shape[1]

    @property
    def data(self) -> torch.Tensor | QuantizedLatents | PackedCodes:
        """The stored latents of the ``length`` tokens (views of the buffers)."""
        parts = [None if b is None else b[:, : self.length] for b in self._buffers]
        if self.quantizer is None:
            return parts[0]
        return PackedCodes(parts[:-1], parts[-1]) if self.widths else QuantizedLatents(*parts)

    def append(self, z: torch.Tensor) -> None:
        """Store new latents ``z [B, T, R]`` after the existing ones (no copy of the history unless full)."""
        new = self._encode(z)
        count = z.shape[1]
        if self.length + count > self.capacity:
            capacity = -(-(self.length + count) // self.GROW) * self.GROW
            grown = []
            for buffer in self._buffers:
                if buffer is None:
                    grown.append(None)
                    continue
                bigger = buffer.new_zeros(buffer.shape[0], capacity, *buffer.shape[2:])
                bigger[:, : self.length] = buffer[:, : self.length]
                grown.append(bigger)
            self._buffers = grown
        for buffer, part in zip(self._buffers, new):
            if buffer is not None:
                buffer[:, self.length : self.length + count] = part
        self.length += count

    def read(self, dtype: torch.dtype, channel_scaled: bool = True) -> torch.Tensor:
        """All stored latents ``[B, T, R]`` in ``dtype`` (``channel_scaled=False``: see LatentQuantizer.dequantize)."""
        if self.quantizer is None:
            return self.data.to(dtype)
        if self.widths:
            return self.quantizer.dequantize(self.data, dtype)
        return self.quantizer.dequantize(self.data, dtype, channel_scaled=channel_scaled)

    def tensors(self) -> list[torch.Tensor]:
        """The stored tensors of the ``length`` tokens (what the byte accounting counts)."""
        data = self.data
        return [data] if self.quantizer is None else data.tensors()

    def allocated_bytes(self) -> int:
        """Bytes of the buffers, slack included."""
        return sum(b.numel() * b.element_size() for b in self._buffers if b is not None)

    def truncate(self, count: int) -> None:
        """Keep the first ``count`` tokens."""
        self.length = min(count, self.length)

    def select(self, fn) -> None:
        """Apply a batch selection ``fn`` to the stored tensors (the result is exactly sized)."""
        self._buffers = [None if b is None else fn(b[:, : self.length]).contiguous() for b in self._buffers]


class CompressedLayer(DynamicLayer):
    """One layer's cache: exact sinks, latents, exact recent window; ``update`` returns reconstructed K/V."""

    def __init__(self, layer_idx: int, owner: CompressedCache) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.owner = owner
        self.length = 0
        self.decode_steps = 0  # one-token updates since the last longer input (see update)
        self.latent_k: LatentStore | None = None
        self.latent_v: LatentStore | None = None
        self.sink_k = self.sink_v = None
        # Left padding: a row's first sink_tokens *positions* can sit past the sink slots and be compressed; their
        # exact K/V are kept here, indexed by position, with the slot each occupies (-1: none). See _keep_row_sinks.
        self.row_sink_k = self.row_sink_v = self.row_sink_slot = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        batch, heads, _, dim = key_states.shape
        #: dtype the exact tokens are kept in (the K/V dtype unless the cache's storage_dtype says otherwise).
        self.store_dtype = self.owner.storage_dtype or key_states.dtype
        empty = key_states.new_zeros(batch, heads, 0, dim, dtype=self.store_dtype)
        self.keys, self.values = empty, empty.clone()  # the exact recent window
        self.sink_k, self.sink_v = empty.clone(), empty.clone()
        latent_dtype = self.owner.latent_dtype or self.store_dtype
        template = key_states.new_zeros(batch, 0, 0, dtype=latent_dtype)
        stores = []
        for kind in ("k", "v"):
            codec = self.owner.compressor.codec(self.layer_idx, kind)
            stores.append(LatentStore(self.owner.quantizer(codec, latent_dtype), template, codec.latent_dim))
        self.latent_k, self.latent_v = stores

    def get_seq_length(self) -> int:
        # Every token counts, wherever it is stored: positions and masks derive from this.
        return self.length

    @property
    def num_compressed(self) -> int:
        return 0 if self.latent_k is None else self.latent_k.length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new ``[B, H, T, D]`` K/V; return K/V ``[B, H, N, D]`` for all N cached positions."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        owner = self.owner
        owner.position_log.observe(key_states.shape[0], key_states.shape[2], key_states.device)
        start = self.length
        self.length += key_states.shape[2]
        stored_k, stored_v = key_states.to(self.store_dtype), value_states.to(self.store_dtype)
        # 1. The first sink_tokens positions of the sequence stay exact.
        n_sink = max(0, min(owner.sink_tokens - start, key_states.shape[2]))
        if n_sink:
            self.sink_k = torch.cat([self.sink_k, stored_k[:, :, :n_sink]], dim=2)
            self.sink_v = torch.cat([self.sink_v, stored_v[:, :, :n_sink]], dim=2)
        # 2. The rest joins the recent window; what overflows it is compressed once.
        self.keys = torch.cat([self.keys, stored_k[:, :, n_sink:]], dim=2)
        self.values = torch.cat([self.values, stored_v[:, :, n_sink:]], dim=2)
        overflow = self.keys.shape[2] - owner.recent_window
        # Decode steps compress in blocks: every compress_block one-token steps (counted from the last longer input)
        # the window is flushed to recent_window, so the encoder runs once per block instead of once per token. The
        # flush depends on the step count, not on how full the window is, so a left-padded row is flushed at the same
        # steps as the same row alone.
        self.decode_steps = self.decode_steps + 1 if key_states.shape[2] == 1 else 0
        if overflow > 0 and self.decode_steps % owner.compress_block == 0:
            first = self.sink_k.shape[2] + self.num_compressed  # sequence index of the oldest recent token
            self._compress(self.keys[:, :, :overflow], self.values[:, :, :overflow], first)
            self.keys, self.values = self.keys[:, :, overflow:], self.values[:, :, overflow:]
        if owner.fast is not None and owner.fast.active and key_states.shape[2] == 1 and self.row_sink_slot is None:
            # Decode step: attention reads the stored latents in place (kvlight.attention), not the returned tensors.
            attention.hand_over(key_states, self)
            return key_states, value_states
        keys, values = self._reconstruct()
        exact = lambda t: t.to(self.dtype)  # noqa: E731 - what attention reads is in the K/V dtype
        return (
            torch.cat([exact(self.sink_k), keys, exact(self.keys)], dim=2),
            torch.cat([exact(self.sink_v), values, exact(self.values)], dim=2),
        )

    def attend(self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
        """Attention of one decode step over everything this layer stores, without rebuilding the history.

        ``query [B, Hq, 1, D]`` (post-RoPE), ``mask [B|1, 1, 1, N]`` or None -> output ``[B, 1, Hq, D]``.
        Values (and keys of models without RoPE) are read in latent space; pre-RoPE keys are reconstructed into
        the cache's shared workspace and rotated in place.
        """
        owner = self.owner
        batch, q_heads, _, dim = query.shape
        heads = self.keys.shape[1]
        dtype = query.dtype
        q = query.reshape(batch, heads, q_heads // heads, dim)  # [B, H, G, D]
        n = self.num_compressed
        sink_k, sink_v = self.sink_k.to(dtype), self.sink_v.to(dtype)
        recent_k, recent_v = self.keys.to(dtype), self.values.to(dtype)
        scores = [q @ sink_k.transpose(-1, -2)]
        if n:
            k_weight, k_bias = owner.decoder(self.layer_idx, "k", dtype)
            z_k, k_scale, k_zero = self._latent_operand(self.latent_k, "k", dtype)
            if owner.tracker is None:
                scores.append(attention.latent_scores(q, z_k, k_weight, k_bias, k_scale, k_zero))
            else:
                workspace = owner.workspace(z_k.numel() // z_k.shape[-1] * dim, dtype)
                keys = attention.decode_into(workspace, z_k, k_weight, k_bias, k_scale, k_zero)
                cos, sin = owner.compressed_rope(self.sink_k.shape[2], n, dtype)
                scores.append(q @ attention.rotate_in_place(keys, cos, sin).transpose(-1, -2))
        scores.append(q @ recent_k.transpose(-1, -2))
        scores = attention.apply_mask(torch.cat(scores, dim=-1).float() * scaling, mask)
        probs = torch.softmax(scores, dim=-1).to(dtype)  # [B, H, G, N]
        n_sink = sink_k.shape[2]
        out = probs[..., :n_sink] @ sink_v + probs[..., n_sink + n :] @ recent_v
        if n:
            v_weight, v_bias = owner.decoder(self.layer_idx, "v", dtype)
            z_v, v_scale, v_zero = self._latent_operand(self.latent_v, "v", dtype)
            out = out + attention.latent_values(probs[..., n_sink : n_sink + n], z_v, v_weight, v_bias, v_scale, v_zero)
        return out.reshape(batch, q_heads, 1, dim).transpose(1, 2)

    def _latent_operand(self, store: LatentStore, kind: str, dtype: torch.dtype):
        """Stored latents as the decode path reads them: ``(z [B, H, n, r], scale, zero)``.

        When every head's rank equals the quantization group (one group per head and token), ``z`` are the integer
        codes and ``scale``/``zero`` ``[B, H, n, 1]`` their group's parameters, left for the attention math to fold
        in; otherwise ``z`` is dequantized (without the channel scale, which the decoder weights carry).
        """
        splits = self._splits(kind)
        quantizer = store.quantizer
        if quantizer is None:
            return attention.latents_per_head(store.data.to(dtype), splits), None, None
        if store.widths:  # static codes: the decoder carries steps and offsets, attention reads the integer codes
            gather = self.owner.width_gather(self.layer_idx, kind, quantizer)
            codes = quantizer.virtual_codes(store.data, dtype, pad=1)  # [B, n, V + 1], the last column zero
            batch, tokens = codes.shape[:2]
            return codes.index_select(-1, gather).view(batch, tokens, len(splits), -1).transpose(1, 2), None, None
        data = store.data
        if quantizer.bits != "fp8" and set(splits) == {quantizer.group_size}:
            codes = attention.latents_per_head(quantizer.codes_as(data.codes, dtype), splits)
            scale, zero = (t.to(dtype).transpose(1, 2).unsqueeze(-1) for t in (data.scale, data.zero))
            return codes, scale, zero
        return attention.latents_per_head(quantizer.dequantize_fast(data, dtype), splits), None, None

    def _splits(self, kind: str) -> list[int]:
        return self.owner.compressor.codec(self.layer_idx, kind).splits

    def _compress(self, keys: torch.Tensor, values: torch.Tensor, first: int) -> None:
        owner = self.owner
        keys, values = keys.to(self.dtype), values.to(self.dtype)  # encoded in the K/V dtype, whatever they wait in
        if owner.tracker is not None:
            positions = owner.position_log.slice(first, first + keys.shape[2])
            self._keep_row_sinks(keys, values, positions, first)
            keys = owner.tracker.unrotate(keys, positions)
        dtype = owner.latent_dtype or self.store_dtype
        self.latent_k.append(owner.compressor.encode(self.layer_idx, "k", keys).to(dtype))
        self.latent_v.append(owner.compressor.encode(self.layer_idx, "v", values).to(dtype))

    def _keep_row_sinks(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, first: int) -> None:
        """Keep exact the tokens about to be compressed whose position id is below ``sink_tokens``.

        Without padding those tokens are the sink slots and never get here. With left padding a row's real tokens
        start later (HF gives them positions 0, 1, ... from the attention mask), so they would be compressed where
        the same row generated alone keeps them exact. Pads precede the real token of the same position, so the
        latest token per position wins.
        """
        sinks = self.owner.sink_tokens
        early = positions < sinks  # [B, n]
        if not early.any():
            return
        if self.row_sink_k is None:
            batch, heads, _, dim = keys.shape
            self.row_sink_k = keys.new_zeros(batch, heads, sinks, dim, dtype=self.store_dtype)
            self.row_sink_v = values.new_zeros(batch, heads, sinks, dim, dtype=self.store_dtype)
            self.row_sink_slot = torch.full((batch, sinks), -1, dtype=torch.long, device=keys.device)
        order = torch.arange(1, positions.shape[1] + 1, device=positions.device)
        for position in positions[early].unique().tolist():
            hit = positions == position
            rows = hit.any(dim=1).nonzero().squeeze(1)
            latest = (hit * order).argmax(dim=1)[rows]  # the last token of each row at this position
            self.row_sink_k[rows, :, position] = keys[rows, :, latest].to(self.store_dtype)
            self.row_sink_v[rows, :, position] = values[rows, :, latest].to(self.store_dtype)
            self.row_sink_slot[rows, position] = first + latest

    def _reconstruct(self) -> tuple[torch.Tensor, torch.Tensor]:
        owner = self.owner
        keys = owner.compressor.decode(self.layer_idx, "k", self.latent_k.read(self.dtype))
        values = owner.compressor.decode(self.layer_idx, "v", self.latent_v.read(self.dtype))
        if owner.tracker is not None and self.num_compressed:
            first = self.sink_k.shape[2]
            keys = owner.tracker.rotate(keys, owner.position_log.slice(first, first + self.num_compressed))
        if self.row_sink_slot is not None:  # the exact copies of each row's sink positions replace their latents
            rows, position = (self.row_sink_slot >= 0).nonzero(as_tuple=True)
            column = self.row_sink_slot[rows, position] - self.sink_k.shape[2]
            keys, values = keys.clone(), values.clone()
            keys[rows, :, column] = self.row_sink_k[rows, :, position].to(keys.dtype)
            values[rows, :, column] = self.row_sink_v[rows, :, position].to(values.dtype)
        return keys, values

    _EXACT = ("sink_k", "sink_v", "keys", "values")
    _ROW_SINKS = ("row_sink_k", "row_sink_v", "row_sink_slot")

    def stored_tensors(self) -> list[torch.Tensor]:
        """Every tensor this layer keeps for its tokens."""
        if not self.is_initialized:
            return []
        exact = [getattr(self, name) for name in self._EXACT]
        row_sinks = [getattr(self, name) for name in self._ROW_SINKS if getattr(self, name) is not None]
        return exact + row_sinks + self.latent_k.tensors() + self.latent_v.tensors()

    def allocated_bytes(self) -> int:
        """Bytes this layer holds, the latent buffers' unused slack included."""
        if not self.is_initialized:
            return 0
        exact = [getattr(self, name) for name in self._EXACT + self._ROW_SINKS if getattr(self, name) is not None]
        return (
            sum(t.numel() * t.element_size() for t in exact)
            + self.latent_k.allocated_bytes()
            + self.latent_v.allocated_bytes()
        )

    def _select(self, fn) -> None:
        if not self.is_initialized:
            return
        self.owner.forget_rope()
        for name in self._EXACT + self._ROW_SINKS:
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))
        self.latent_k.select(fn)
        self.latent_v.select(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest ``-tokens_to_remove`` tokens (assisted generation rolls rejected tokens back)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        if not self.is_initialized or tokens_to_remove == 0:
            return
        keep = max(0, self.length + tokens_to_remove)
        self.owner.forget_rope()
        n_sink = min(self.sink_k.shape[2], keep)
        n_compressed = min(self.num_compressed, keep - n_sink)
        n_recent = keep - n_sink - n_compressed
        self.sink_k, self.sink_v = self.sink_k[:, :, :n_sink], self.sink_v[:, :, :n_sink]
        self.latent_k.truncate(n_compressed)
        self.latent_v.truncate(n_compressed)
        self.keys, self.values = self.keys[:, :, :n_recent], self.values[:, :, :n_recent]
        self.length = keep
        if self.row_sink_slot is not None:  # exact copies of tokens no longer compressed are dropped
            self.row_sink_slot[self.row_sink_slot >= n_sink + n_compressed] = -1

    def reset(self) -> None:
        super().reset()
        self.owner.forget_rope()
        self.length = 0
        self.decode_steps = 0
        self.latent_k = self.latent_v = self.sink_k = self.sink_v = None
        self.row_sink_k = self.row_sink_v = self.row_sink_slot = None


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
        self.position_log = _PositionLog(tracker)
        super().__init__(layers=[CompressedLayer(i, self) for i in range(compressor.num_layers)])

    def quantizer(self, codec, dtype: torch.dtype) -> LatentQuantizer | DirectionQuantizer | None:
        """How one layer codec's latents (of ``dtype``) are stored: static mixed-width codes when its heads have
        widths, else per-token group quantization (``latent_bits``), else None (latents in ``dtype``)."""
        if codec.has_widths:
            return codec.direction_quantizer(dtype)
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


class CaptureLayer(DynamicLayer):
    """One forward, no past: hands pre-RoPE K/V to a callback, which may return replacements.

    The callback gets ``(layer, keys_pre_rope, values)``, each ``[B, H, T, D]``. Returning None
    leaves the forward untouched (capture); returning ``(keys_pre_rope, values)`` makes attention use
    those instead (keys rotated again), e.g. with a zero perturbation that requires grad, to measure
    the loss's sensitivity to each head's K and V.
    """

    def __init__(self, layer_idx: int, owner: CaptureCache) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.owner = owner
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.length:
            raise RuntimeError("a CaptureCache serves exactly one forward pass")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length = key_states.shape[2]
        tracker = self.owner.tracker
        positions = None if tracker is None else tracker.current.expand(key_states.shape[0], -1)
        keys = key_states if tracker is None else tracker.unrotate(key_states, positions)
        replaced = self.owner.sink(self.layer_idx, keys, value_states)
        if replaced is None:
            return key_states, value_states
        keys, values = replaced
        return (keys if tracker is None else tracker.rotate(keys, positions)), values


class CaptureCache(Cache):
    """A one-forward cache that reports every layer's pre-RoPE keys and values ``[B, H, T, D]`` to ``sink``."""

    def __init__(
        self,
        num_layers: int,
        sink: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None],
        tracker: PositionTracker | None = None,
    ) -> None:
        self.sink = sink
        self.tracker = tracker
        super().__init__(layers=[CaptureLayer(i, self) for i in range(num_layers)])

"""One layer of the compressed cache: exact sinks, latents, an exact recent window (a sliding layer: its window only).

A layer is built with everything it uses, and reads nothing else: its :class:`LayerSettings`, the key and value
codecs of its layer, the cache's :class:`~kvlight.serving.positions.PositionLog` (positions of every cached token
and their rotation table, shared by the layers), the cache's :class:`~kvlight.serving.scratch.DecodeScratch`
(workspace and decoders shared by the layers) and, on the fast path, the model's
:class:`~kvlight.serving.attention.DecodeHandoff`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlight.hf import DynamicLayer
from kvlight.serving import attention, kernels
from kvlight.serving.latents import LatentStore, store_quantizer
from kvlight.serving.positions import PositionLog
from kvlight.serving.scratch import DecodeScratch


def _kernel_exact(tokens: torch.Tensor) -> torch.Tensor:
    """Exact tokens as the native kernel reads them: float32 or bfloat16, contiguous (a copy only otherwise)."""
    if tokens.dtype in (torch.float32, torch.bfloat16) and tokens.is_contiguous():
        return tokens
    return tokens.float().contiguous()


@dataclass(frozen=True)
class LayerSettings:
    """How a layer stores its tokens (every field resolved: see kvlight.serving.cache.CacheSettings).

    Attributes:
        sink_tokens: first positions kept exact.
        recent_window: newest positions kept exact.
        compress_block: one-token steps between flushes of the recent window (see CompressedLayer.update).
        latent_bits: rank codecs: 8, 4, 2, "fp8" or None (latents in ``latent_dtype``).
        quant_group_size: rank codecs: latent channels per scale and zero point.
        latent_dtype: dtype of unquantized latents (None: ``storage_dtype``).
        storage_dtype: dtype of the exact tokens (None: the K/V dtype).
    """

    sink_tokens: int
    recent_window: int
    compress_block: int
    latent_bits: int | str | None
    quant_group_size: int
    latent_dtype: torch.dtype | None
    storage_dtype: torch.dtype | None


class CompressedLayer(DynamicLayer):
    """One layer's cache: exact sinks, latents, exact recent window; ``update`` returns reconstructed K/V.

    A sliding layer (``window``: the model's ``sliding_window`` for this layer) keeps what transformers'
    ``DynamicSlidingWindowLayer`` keeps, the last ``window - 1`` tokens between forwards, and reports the same mask
    sizes: tokens leaving its window are dropped (never compressed), ``offset`` counts them (the sequence index
    of its first held token), and it keeps no sinks (they leave the window like any token). During one forward it
    holds what attention reads; the drop follows the step's attention.
    """

    def __init__(
        self,
        layer_idx: int,
        settings: LayerSettings,
        codecs: dict,
        positions: PositionLog,
        scratch: DecodeScratch,
        handoff: attention.DecodeHandoff | None = None,
        window: int | None = None,
        rope_block: int = 1,
    ) -> None:
        super().__init__()
        self.window = window
        self.is_sliding = window is not None  # read by transformers' masks (Cache.is_sliding)
        self.offset = 0  # tokens a sliding window dropped from the front
        self._leaving = 0  # tokens to drop once this step's attention has read them (fast decode steps)
        self.layer_idx = layer_idx
        self.settings = settings
        self.codecs = codecs  # {"k": LayerCodec, "v": LayerCodec} of this layer
        self.positions = positions
        #: how keys are coded (the compressor's ``key_rope_block`` for this layer): 1, before RoPE (each key unrotated
        #: on the way in, rebuilt and rotated on the way out); B > 1, rotated back by their block start's angle
        #: (decode rotates and projects each query once per block, then scores in latent space); 0 for a layer that
        #: does not rotate (keys as attention reads them, scored in latent space).
        self.key_block = rope_block if positions.rotates(layer_idx) else 0
        self.scratch = scratch
        self.handoff = handoff
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
        self.store_dtype = self.settings.storage_dtype or key_states.dtype
        empty = key_states.new_zeros(batch, heads, 0, dim, dtype=self.store_dtype)
        self.keys, self.values = empty, empty.clone()  # the exact recent window
        self.sink_k, self.sink_v = empty.clone(), empty.clone()
        latent_dtype = self.settings.latent_dtype or self.store_dtype
        template = key_states.new_zeros(batch, 0, 0, dtype=latent_dtype)
        stores = []
        for kind in ("k", "v"):
            codec = self.codecs[kind]
            stores.append(LatentStore(store_quantizer(codec, self.settings, latent_dtype), template, codec.latent_dim))
        self.latent_k, self.latent_v = stores

    def get_seq_length(self) -> int:
        # Every token counts, wherever it is stored: positions and masks derive from this.
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)`` of the mask for ``query_length`` new tokens: every token for a full layer; for
        a sliding one the held ``window - 1`` (or fewer) plus the new, exactly as ``DynamicSlidingWindowLayer``."""
        if self.window is None:
            return super().get_mask_sizes(query_length)
        offset = max(self.length - self.window + 1, 0)
        if self.length >= self.window:
            return self.window - 1 + query_length, offset
        return self.length + query_length, offset

    def get_max_length(self) -> int:
        return -1 if self.window is None else self.window

    def _held(self) -> int:
        """Tokens this layer holds now (sink slot, compressed, recent)."""
        return self.sink_k.shape[2] + self.num_compressed + self.keys.shape[2]

    @property
    def num_compressed(self) -> int:
        return 0 if self.latent_k is None else self.latent_k.length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Store new ``[B, H, T, D]`` K/V; return K/V ``[B, H, N, D]`` for all N cached positions."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        settings = self.settings
        self.positions.observe(key_states.shape[0], key_states.shape[2], key_states.device)
        if self.window is not None:
            return self._update_sliding(key_states, value_states)
        start = self.length
        self.length += key_states.shape[2]
        stored_k, stored_v = key_states.to(self.store_dtype), value_states.to(self.store_dtype)
        # 1. The first sink_tokens positions of the sequence stay exact.
        n_sink = max(0, min(settings.sink_tokens - start, key_states.shape[2]))
        if n_sink:
            self.sink_k = torch.cat([self.sink_k, stored_k[:, :, :n_sink]], dim=2)
            self.sink_v = torch.cat([self.sink_v, stored_v[:, :, :n_sink]], dim=2)
        # 2. The rest joins the recent window; what overflows it is compressed once.
        self.keys = torch.cat([self.keys, stored_k[:, :, n_sink:]], dim=2)
        self.values = torch.cat([self.values, stored_v[:, :, n_sink:]], dim=2)
        self.decode_steps = self.decode_steps + 1 if key_states.shape[2] == 1 else 0
        self._flush()
        handoff = self.handoff
        if handoff is not None and handoff.active and key_states.shape[2] == 1 and self.row_sink_slot is None:
            # Decode step: attention reads the stored latents in place (kvlight.serving.attention), not the returned tensors.
            handoff.offer(key_states, self)
            return key_states, value_states
        keys, values = self._reconstruct()
        exact = lambda t: t.to(self.dtype)  # noqa: E731 - what attention reads is in the K/V dtype
        return (
            torch.cat([exact(self.sink_k), keys, exact(self.keys)], dim=2),
            torch.cat([exact(self.sink_v), values, exact(self.values)], dim=2),
        )

    def _flush(self) -> None:
        """Compress what overflows the recent window, when this step is a flush step.

        Decode steps compress in blocks: every compress_block one-token steps (counted from the last longer input)
        the window is flushed to recent_window, so the encoder runs once per block instead of once per token. The
        flush depends on the step count, not on how full the window is, so a left-padded row is flushed at the same
        steps as the same row alone.
        """
        overflow = self.keys.shape[2] - self.settings.recent_window
        if overflow > 0 and self.decode_steps % self.settings.compress_block == 0:
            first = self.offset + self.sink_k.shape[2] + self.num_compressed  # sequence index of the oldest recent
            self._compress(self.keys[:, :, :overflow], self.values[:, :, :overflow], first)
            self.keys, self.values = self.keys[:, :, overflow:], self.values[:, :, overflow:]

    def _update_sliding(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """:meth:`update` of a sliding layer: new ``[B, H, T, D]`` K/V join the recent window; what this step's
        attention reads is the held tokens and the new ones (``kv_length`` of :meth:`get_mask_sizes`); afterwards the
        layer holds the last ``window - 1``. Tokens leaving are dropped before the flush, so none is compressed."""
        self._finish_window()  # a drop a fast step left behind (normally attend did it)
        tokens = key_states.shape[2]
        self.length += tokens
        self.keys = torch.cat([self.keys, key_states.to(self.store_dtype)], dim=2)
        self.values = torch.cat([self.values, value_states.to(self.store_dtype)], dim=2)
        leaving = max(0, self._held() - (self.window - 1))
        self.decode_steps = self.decode_steps + 1 if tokens == 1 else 0
        handoff = self.handoff
        if handoff is not None and handoff.active and tokens == 1:
            # At most one token leaves per decode step. Without compressed tokens it is the oldest exact one: it moves
            # to the (otherwise empty) sink slot in front, so the flush below compresses only tokens that stay.
            exact_leaving = leaving - self.num_compressed
            if exact_leaving > 0:
                self.sink_k, self.keys = self.keys[:, :, :exact_leaving], self.keys[:, :, exact_leaving:]
                self.sink_v, self.values = self.values[:, :, :exact_leaving], self.values[:, :, exact_leaving:]
            self._flush()
            self._leaving = leaving  # dropped by attend, once it has read them
            handoff.offer(key_states, self)
            return key_states, value_states
        gone_k, gone_v = self._front(leaving)  # as attention reads them now; then they are dropped
        self._discard_front(leaving)
        self._flush()
        keys, values = self._reconstruct()
        exact = lambda t: t.to(self.dtype)  # noqa: E731 - what attention reads is in the K/V dtype
        return (
            torch.cat([gone_k, exact(self.sink_k), keys, exact(self.keys)], dim=2),
            torch.cat([gone_v, exact(self.sink_v), values, exact(self.values)], dim=2),
        )

    def _front(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``count`` held tokens as attention reads them, K and V ``[B, H, count, D]`` in the K/V dtype."""
        exact = lambda t: t[:, :, :count].to(self.dtype)  # noqa: E731
        if count <= self.sink_k.shape[2]:
            return exact(self.sink_k), exact(self.sink_v)
        keys, values = self._reconstruct()
        keys = torch.cat([self.sink_k.to(self.dtype), keys, self.keys.to(self.dtype)], dim=2)
        values = torch.cat([self.sink_v.to(self.dtype), values, self.values.to(self.dtype)], dim=2)
        return keys[:, :, :count], values[:, :, :count]

    def _discard_front(self, count: int) -> None:
        """Drop the first ``count`` held tokens (sink slot, then latents, then recent): they left the window."""
        if count <= 0:
            return
        self.offset += count
        take = min(count, self.sink_k.shape[2])
        self.sink_k, self.sink_v = self.sink_k[:, :, take:], self.sink_v[:, :, take:]
        count -= take
        take = min(count, self.num_compressed)
        if take:
            for store in (self.latent_k, self.latent_v):  # exactly sized: the bytes held are the window's
                store.restore([t[:, take:] for t in store.tensors()], store.length - take)
        count -= take
        self.keys, self.values = self.keys[:, :, count:], self.values[:, :, count:]

    def _finish_window(self) -> None:
        """Drop the tokens a fast decode step left for after its attention."""
        if self._leaving:
            self._discard_front(self._leaving)
            self._leaving = 0

    def attend(
        self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None = None
    ) -> torch.Tensor:
        """Attention of one decode step over everything this layer stores, without rebuilding the history.

        ``query [B, Hq, 1, D]`` (post-RoPE), ``mask [B|1, 1, 1, N]`` or None -> output ``[B, 1, Hq, D]``.
        Values, keys of models without RoPE and keys coded relative to their RoPE block (each query rotated and
        projected once per block) are read in latent space; pre-RoPE keys are reconstructed into the cache's shared
        workspace and rotated in place (width codes on the CPU: all of it in one native call, kvlight.serving.kernels).
        ``softcap`` (Gemma 2's attention logit soft-capping) caps the scaled scores as ``tanh(s / cap) * cap`` before the mask, as the model's eager attention does. A sliding
        layer drops the tokens that left its window once they are read.
        """
        out = self._attend(query, mask, scaling, softcap)
        self._finish_window()
        return out

    def _attend(
        self, query: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None
    ) -> torch.Tensor:
        """:meth:`attend` before the window's drop."""
        batch, q_heads, _, dim = query.shape
        heads = self.keys.shape[1]
        dtype = query.dtype
        q = query.reshape(batch, heads, q_heads // heads, dim)  # [B, H, G, D]
        n = self.num_compressed
        if n and self._reads_packed(query):
            return self._attend_packed(q, mask, scaling, softcap).reshape(batch, q_heads, 1, dim).transpose(1, 2)
        sink_k, sink_v = self.sink_k.to(dtype), self.sink_v.to(dtype)
        recent_k, recent_v = self.keys.to(dtype), self.values.to(dtype)
        scores = [q @ sink_k.transpose(-1, -2)]
        if n:
            k_weight, k_bias = self.scratch.decoder(
                self.layer_idx, "k", self.codecs["k"], self.latent_k.quantizer, dtype
            )
            z_k, k_scale, k_zero = self._latent_operand(self.latent_k, "k", dtype)
            if self.key_block == 0:
                scores.append(attention.latent_scores(q, z_k, k_weight, k_bias, k_scale, k_zero))
            elif self.key_block > 1:
                first = self.offset + self.sink_k.shape[2]
                cos, sin = self.positions.block_rope(first, n, self.key_block, self.layer_idx)
                layout, block = self.positions.tracker.layout, self.key_block
                scores.append(
                    attention.block_scores(
                        q, z_k, k_weight, k_bias, (cos, sin), layout, first % block, block, k_scale, k_zero
                    )
                )
            else:
                workspace = self.scratch.workspace(z_k.numel() // z_k.shape[-1] * dim, dtype, query.device)
                keys = attention.decode_into(workspace, z_k, k_weight, k_bias, k_scale, k_zero)
                cos, sin = self.positions.compressed_rope(
                    self.offset + self.sink_k.shape[2],
                    n,
                    dtype,
                    channel_major=attention.is_channel_major(keys),
                    layer_idx=self.layer_idx,
                    sliding=self.is_sliding,
                )
                keys = attention.rotate_in_place(keys, cos, sin, self.positions.tracker.layout)
                scores.append(q @ keys.transpose(-1, -2))
        scores.append(q @ recent_k.transpose(-1, -2))
        scores = attention.apply_softcap(torch.cat(scores, dim=-1).float() * scaling, softcap)
        scores = attention.apply_mask(scores, mask)
        probs = torch.softmax(scores, dim=-1).to(dtype)  # [B, H, G, N]
        n_sink = sink_k.shape[2]
        out = probs[..., :n_sink] @ sink_v + probs[..., n_sink + n :] @ recent_v
        if n:
            v_weight, v_bias = self.scratch.decoder(
                self.layer_idx, "v", self.codecs["v"], self.latent_v.quantizer, dtype
            )
            z_v, v_scale, v_zero = self._latent_operand(self.latent_v, "v", dtype)
            out = out + attention.latent_values(probs[..., n_sink : n_sink + n], z_v, v_weight, v_bias, v_scale, v_zero)
        return out.reshape(batch, q_heads, 1, dim).transpose(1, 2)

    def _reads_packed(self, query: torch.Tensor) -> bool:
        """Whether this step's attention is the native kernel's (kvlight.serving.kernels.attend): keys and values
        stored as width codes (exact width-16 channels in float32 or bfloat16), on the CPU, the kernels built, and for
        rotated keys a head width the kernel takes (:func:`kvlight.serving.kernels.takes_heads`)."""
        if not (self.latent_k.widths and self.latent_v.widths and kernels.enabled_for(query)):
            return False
        exact_dtypes = {self.latent_k.quantizer.exact_dtype, self.latent_v.quantizer.exact_dtype}
        if not exact_dtypes <= {torch.float32, torch.bfloat16}:
            return False
        return kernels.takes_heads(query.shape[-1], self.key_block)

    def _attend_packed(
        self, q: torch.Tensor, mask: torch.Tensor | None, scaling: float, softcap: float | None
    ) -> torch.Tensor:
        """:meth:`_attend` in one native call (kvlight.serving.kernels.attend): ``q [B, H, G, D]`` -> ``[B, H, G, D]``.

        The packed codes are read where they lie; keys coded before RoPE are rebuilt and rotated with the rotation
        tables of the compressed tokens (pair-major, one row when every batch row has the same positions).
        """
        batch, heads, groups, _ = q.shape
        n, n_sink = self.num_compressed, self.sink_k.shape[2]
        sink = (_kernel_exact(self.sink_k), _kernel_exact(self.sink_v))
        recent = (_kernel_exact(self.keys), _kernel_exact(self.values))
        keys = self.scratch.operands(self.layer_idx, "k", self.codecs["k"], self.latent_k.quantizer)
        values = self.scratch.operands(self.layer_idx, "v", self.codecs["v"], self.latent_v.quantizer)
        rope = None
        first = self.offset + n_sink
        if self.key_block == 1:  # per token: rebuild and rotate
            cos, sin = self.positions.compressed_rope(
                first, n, torch.float32, channel_major=True, layer_idx=self.layer_idx, sliding=self.is_sliding
            )
            cos, sin = (t.transpose(-1, -2).flatten(0, 1) for t in (cos, sin))  # [R, P, n], contiguous
        elif self.key_block > 1:  # per block: rotate and project the queries
            cos, sin = self.positions.block_rope_rows(first, n, self.key_block, self.layer_idx)  # [R, blocks, P]
        if self.key_block:
            layout = self.positions.tracker.layout
            rope = kernels.Rope(layout.pair_channels, cos, sin, self.key_block, first % self.key_block)
        total = n_sink + n + self.keys.shape[2]
        floats = kernels.scratch_floats(
            batch, heads, groups, total, keys.weight.shape[1], values.weight.shape[1], torch.get_num_threads()
        )
        out = kernels.attend(
            (q.float() * scaling).contiguous(), sink, recent, self.latent_k.data.tensors(), keys,
            self.latent_v.data.tensors(), values, attention.additive_mask(mask, total), softcap,
            self.scratch.kernel_buffer(floats), rope,
        )  # fmt: skip
        return out.to(q.dtype)

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
            layout = self.scratch.layout(self.layer_idx, kind, self.codecs[kind], quantizer)
            return layout.operand(store.data, dtype), None, None
        data = store.data
        if quantizer.bits != "fp8" and set(splits) == {quantizer.group_size}:
            codes = attention.latents_per_head(quantizer.codes_as(data.codes, dtype), splits)
            scale, zero = (t.to(dtype).transpose(1, 2).unsqueeze(-1) for t in (data.scale, data.zero))
            return codes, scale, zero
        return attention.latents_per_head(quantizer.dequantize_fast(data, dtype), splits), None, None

    def _splits(self, kind: str) -> list[int]:
        return self.codecs[kind].splits

    def _compress(self, keys: torch.Tensor, values: torch.Tensor, first: int) -> None:
        keys, values = keys.to(self.dtype), values.to(self.dtype)  # encoded in the K/V dtype, whatever they wait in
        tracker = self.positions.tracker
        if tracker is not None:
            positions = self.positions.slice(first, first + keys.shape[2])
            self._keep_row_sinks(keys, values, positions, first)
            if self.key_block:  # with the tables these keys arrived with (their block start's)
                keys = self.positions.unrotate(keys, first, self.layer_idx, self.key_block)
        dtype = self.settings.latent_dtype or self.store_dtype
        self.latent_k.append(self.codecs["k"].encode(keys).to(dtype))
        self.latent_v.append(self.codecs["v"].encode(values).to(dtype))

    def _keep_row_sinks(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, first: int) -> None:
        """Keep exact the tokens about to be compressed whose position id is below ``sink_tokens``.

        Without padding those tokens are the sink slots and never get here. With left padding a row's real tokens
        start later (HF gives them positions 0, 1, ... from the attention mask), so they would be compressed where
        the same row generated alone keeps them exact. Pads precede the real token of the same position, so the
        latest token per position wins.
        """
        sinks = self.settings.sink_tokens
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
        keys = self.codecs["k"].decode(self.latent_k.read(self.dtype))
        values = self.codecs["v"].decode(self.latent_v.read(self.dtype))
        if self.key_block and self.num_compressed:
            keys = self.positions.rotate(keys, self.offset + self.sink_k.shape[2], self.layer_idx, self.key_block)
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
        self.positions.forget_rope()
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
        if self.offset or self._leaving:  # as DynamicSlidingWindowLayer: the dropped tokens cannot come back
            raise RuntimeError(f"layer {self.layer_idx} is past its sliding window ({self.window}): it cannot crop")
        keep = max(0, self.length + tokens_to_remove)
        self.positions.forget_rope()
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
        self.positions.forget_rope()
        self.length = 0
        self.decode_steps = 0
        self.offset = self._leaving = 0
        self.latent_k = self.latent_v = self.sink_k = self.sink_v = None
        self.row_sink_k = self.row_sink_v = self.row_sink_slot = None

    def export_state(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (exact ``sink_k/sink_v/keys/values [B, H, n, D]``, row sinks when kept, and
        ``latent_k.<i>`` / ``latent_v.<i>``: :meth:`LatentStore.tensors`), for :meth:`import_state`."""
        state = {name: getattr(self, name) for name in self._EXACT + self._ROW_SINKS if getattr(self, name) is not None}
        for kind, store in (("k", self.latent_k), ("v", self.latent_v)):
            state.update({f"latent_{kind}.{i}": t for i, t in enumerate(store.tensors())})
        return state

    def import_state(self, state: dict[str, torch.Tensor], length: int, decode_steps: int) -> None:
        """Hold what :meth:`export_state` returned, for a layer of ``length`` tokens ``decode_steps`` one-token
        updates after its last longer input. The layer must be initialized (``lazy_initialization`` with empty K/V of
        the batch, heads, head_dim and dtype); raises ValueError when a tensor's shape or dtype does not fit it."""
        sinks = self.settings.sink_tokens
        batch, heads, _, dim = self.keys.shape
        known = set(self._EXACT) | set(self._ROW_SINKS)
        latent = {name for name in state if name.startswith(("latent_k.", "latent_v."))}
        if not set(self._EXACT) <= set(state) or not set(state) - latent <= known:
            raise ValueError(f"tensors {sorted(state)} are not those of a layer")
        exact = {name: state[name] for name in self._EXACT}
        for name, tensor in exact.items():
            if tensor.dim() != 4 or list(tensor.shape[:2]) + [tensor.shape[3]] != [batch, heads, dim]:
                raise ValueError(f"{name} {list(tensor.shape)}, expected [{batch}, {heads}, n, {dim}]")
            if tensor.dtype != self.store_dtype:
                raise ValueError(f"{name} is {tensor.dtype}, expected {self.store_dtype}")
        n_sink, n_recent = exact["sink_k"].shape[2], exact["keys"].shape[2]
        if exact["sink_v"].shape[2] != n_sink or exact["values"].shape[2] != n_recent or n_sink > sinks:
            raise ValueError(f"sink ({n_sink}) and recent ({n_recent}) K and V do not pair up (<= {sinks} sinks)")
        # A sliding layer holds the last window - 1 tokens between forwards; the others were dropped.
        held = length if self.window is None else min(length, self.window - 1)
        compressed = held - n_sink - n_recent
        if compressed < 0:
            raise ValueError(f"{n_sink} sink and {n_recent} recent tokens exceed the length {length}")
        for kind, store in (("k", self.latent_k), ("v", self.latent_v)):
            parts = sorted((int(n.split(".")[1]), t) for n, t in state.items() if n.startswith(f"latent_{kind}."))
            store.restore([t for _, t in parts], compressed)
        rows = [state.get(name) for name in self._ROW_SINKS]
        if any(t is not None for t in rows):
            row_k, row_v, slot = rows
            want = [batch, heads, sinks, dim]
            if row_k is None or row_v is None or slot is None or [list(row_k.shape), list(row_v.shape)] != [want] * 2:
                raise ValueError(f"row sinks must be two [B, H, {sinks}, D] tensors and their slots")
            if list(slot.shape) != [batch, sinks] or slot.dtype != torch.long or row_k.dtype != self.store_dtype:
                raise ValueError(f"row sink slots {list(slot.shape)} {slot.dtype}, expected [{batch}, {sinks}] int64")
            if bool(((slot < -1) | (slot >= n_sink + compressed)).any()):
                raise ValueError("row sink slots point outside the compressed tokens")
            self.row_sink_k, self.row_sink_v, self.row_sink_slot = row_k, row_v, slot
        for name, tensor in exact.items():
            setattr(self, name, tensor)
        self.length, self.decode_steps = length, decode_steps
        self.offset, self._leaving = length - held, 0
        self.positions.forget_rope()

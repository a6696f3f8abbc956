"""The queries each KV head serves: pre-RoPE queries as attention really uses them, for every family.

Queries are taken where the attention function receives them (:class:`QueryCapture`): after every projection, split,
norm (QK-norm: Qwen3, OLMo 2, Cohere) and rotation the modeling file applies, whatever its module names (fused
``query_key_value``, ``q_proj``, ``c_attn``). Rotated queries are then unrotated exactly with the tables of the same
forward (:class:`kvlight.serving.positions.PositionTracker`), so ``rotate(pre-RoPE query)`` is what attention used.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kvlight.geometry import KVGeometry, has_rope
from kvlight.hf import attention_implementation, original_attention, register_attention, set_attention
from kvlight.models import decoder_blocks, rotary_module

#: prefix of the attention implementations that observe queries (``kvlight_queries_sdpa`` wraps ``sdpa``).
_PREFIX = "kvlight_queries_"
#: the open captures; one registered function per wrapped implementation serves them all.
_OPEN: weakref.WeakSet[QueryCapture] = weakref.WeakSet()
_REGISTER = threading.Lock()


def _observing_forward(original: str):
    """An attention function that hands ``query [B, H_q, T, D]`` to the capture owning ``module``, then runs the
    original implementation unchanged (same arguments, same outputs). Only captures that switched the model to this
    very function observe: two captures of one model (nested wrappers) each see every query once."""
    name = _PREFIX + original

    def forward(module, query, key, value, attention_mask, *args, **kwargs):
        for capture in list(_OPEN):
            if capture.name == name and capture.owns(module):
                capture.observe(module, query, kwargs.get("scaling"))
        return original_attention(original, module)(module, query, key, value, attention_mask, *args, **kwargs)

    forward.__name__ = f"{_PREFIX}{original}_attention_forward"
    return forward


class QueryCapture:
    """Hands every layer's pre-RoPE queries ``[B, H_q, T, D]`` to ``sink(layer, queries, scaling)`` until
    :meth:`remove`.

    The model is switched to an attention implementation that wraps its own (``kvlight_queries_<original>``); its
    outputs are the original's. ``scaling`` is what the modeling file passes the attention function (None: the
    default ``D ** -0.5``). Queries of rotating layers are unrotated with the rotary tables this forward observed.
    """

    def __init__(self, model: nn.Module, sink: Callable[[int, torch.Tensor, float | None], None]) -> None:
        self.model, self.sink = model, sink
        self._owner = {id(m): layer for layer, block in enumerate(decoder_blocks(model)) for m in block.modules()}
        self._tracker = None
        if has_rope(model.config) and rotary_module(model) is not None:
            from kvlight.serving.positions import PositionTracker  # serving imports models: import when used

            self._tracker = PositionTracker(model)
        self.original = attention_implementation(model)
        self.name = _PREFIX + self.original
        with _REGISTER:
            register_attention(self.name, _observing_forward(self.original), mask_of=self.original)
        set_attention(model, self.name)
        _OPEN.add(self)

    def owns(self, module: nn.Module) -> bool:
        return id(module) in self._owner

    def observe(self, module: nn.Module, query: torch.Tensor, scaling: float | None) -> None:
        layer = self._owner[id(module)]
        query = query.detach()
        tracker = self._tracker
        if tracker is not None and tracker.rotates(layer):
            cos, sin = tracker.observed(query.shape[0], layer)  # [B|1, 1, T, D_rot/2]: this forward's, this layer's
            query = tracker.layout.unrotate(query, cos, sin)
        self.sink(layer, query, scaling)

    def remove(self) -> None:
        """Restore the model's attention implementation and remove the position hooks (idempotent)."""
        if self in _OPEN:
            _OPEN.discard(self)
            set_attention(self.model, self.original)
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None


class QueryMoments:
    """Float64 sums of pre-RoPE query outer products per layer and KV head, ``[L, H, D, D]``.

    Queries are those attention receives (:class:`QueryCapture`), unrotated. The query heads that share a KV head
    are pooled: they all read its keys (query head ``h`` reads KV head ``h // (H_q / H_kv)``, transformers'
    ``repeat_kv``). :meth:`attach` hooks the model for the duration of a capture pass; :meth:`mean` gives
    ``E[q q^T]`` (the input of :func:`kvlight.compressors.weighting.score_weight`, see :func:`score_weights`).
    """

    def __init__(self, geometry: KVGeometry) -> None:
        self.geometry = geometry
        shape = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, geometry.head_dim)
        self.sums = torch.zeros(shape, dtype=torch.float64)
        self.count = 0

    def attach(self, model: nn.Module) -> list:
        """Start measuring on ``model``; returns handles whose ``remove()`` stops it (as forward hooks do)."""
        return [QueryCapture(model, self.add)]

    def add(self, layer: int, queries: torch.Tensor, scaling: float | None = None) -> None:
        """Add pre-RoPE ``queries [B, H_q, T, D]`` of ``layer``."""
        heads, dim = self.geometry.num_kv_heads, self.geometry.head_dim
        batch, query_heads, tokens, _ = queries.shape
        if query_heads % heads or queries.shape[-1] != dim:
            raise ValueError(f"queries {tuple(queries.shape)} do not split over {heads} KV heads of {dim} channels")
        q = queries.to(torch.float64).reshape(batch, heads, query_heads // heads, tokens, dim)
        self.sums[layer] += torch.einsum("bhgtd,bhgte->hde", q, q).cpu()
        if layer == 0:
            self.count += batch * tokens * (query_heads // heads)

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no queries were observed")
        return self.sums / self.count


# ---------------------------------------------------------------------- score weights of a model
@dataclass(frozen=True)
class KeyRotation:
    """How a model rotates keys, for :func:`kvlight.compressors.weighting.score_weight`.

    Attributes:
        layout: the :class:`~kvlight.serving.positions.RotaryLayout` (rotary channels, pairing).
        frequencies: ``[L, D_rot/2]`` float64, pair ``i`` of layer ``l`` turns by ``d * frequencies[l, i]`` at
            distance ``d`` (rows differ where the rope base differs per layer type, Gemma 3).
        scale: ``[L, D_rot/2]`` float64, the attention scaling each pair's tables carry (1 for most rope types).
        rotates: per layer, whether it rotates at all (NoPE layers do not).
    """

    layout: object
    frequencies: torch.Tensor
    scale: torch.Tensor
    rotates: tuple[bool, ...]


def key_rotation(model: nn.Module) -> KeyRotation | None:
    """The :class:`KeyRotation` of ``model`` read off its own rotary module (None without RoPE).

    Frequencies are the angle the model's pair table turns by from position 0 to 1, snapped to the module's
    ``inv_freq`` where one matches (float64 exactness: the table is float32); the tables also give the scale.
    """
    if not has_rope(model.config) or rotary_module(model) is None:
        return None
    from kvlight.serving.positions import PositionTracker

    tracker = PositionTracker(model)
    frequencies, scales = [], []
    try:
        positions = torch.arange(2, device=next(model.parameters()).device)[None]
        layers = range(len(decoder_blocks(model)))
        for layer in layers:
            cos, sin = (t[0].double().cpu() for t in tracker.pair_tables(positions, layer))  # [2, D_rot/2]
            angle = torch.atan2(sin[1], cos[1]) - torch.atan2(sin[0], cos[0])  # mod 2 pi
            frequencies.append(_snap(angle, rotary_module(model)))
            scales.append((cos[0] ** 2 + sin[0] ** 2).sqrt())
        rotates = tuple(tracker.rotates(layer) for layer in layers)
        layout = tracker.layout
    finally:
        tracker.close()
    return KeyRotation(layout, torch.stack(frequencies), torch.stack(scales), rotates)


def _snap(angle: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    """``angle [n]`` (mod 2 pi) replaced by the matching entry of the rotary module's ``inv_freq`` buffers (one per
    layer type for Gemma 3) where one is within 1e-4."""
    buffers = [b for name, b in rotary.named_buffers() if "inv_freq" in name and b.numel() and b.is_floating_point()]
    if not buffers:
        return angle
    candidates = torch.cat([b.detach().double().cpu().flatten() for b in buffers])
    gap = torch.remainder(angle[:, None] - candidates[None, :] + torch.pi, 2 * torch.pi) - torch.pi  # [n, F]
    best = gap.abs().argmin(dim=1)
    close = gap.abs().gather(1, best[:, None])[:, 0] < 1e-4
    return torch.where(close, candidates[best], angle)


def score_weights(model: nn.Module, query_moments: torch.Tensor, window: int, weighting: str = "near") -> torch.Tensor:
    """``W [L, H, D, D]`` of :func:`kvlight.compressors.weighting.score_weight` for ``query_moments [L, H, D, D]``
    (``E[q q^T]`` of pre-RoPE queries), with the model's own rotary layout, frequencies and scale per layer."""
    from kvlight.compressors.weighting import score_weight

    moments = query_moments.double().cpu()
    rotation = key_rotation(model)
    if rotation is None:
        return score_weight(moments, None)
    out = torch.empty_like(moments)
    for layer in range(moments.shape[0]):
        if layer < len(rotation.rotates) and not rotation.rotates[layer]:
            out[layer] = score_weight(moments[layer], None)
            continue
        out[layer] = score_weight(
            moments[layer],
            rotation.frequencies[layer],
            window,
            weighting,
            layout=rotation.layout,
            scale=rotation.scale[layer],
        )
    return out

"""A one-forward cache that hands every layer's pre-RoPE K/V to a callback (capture, sensitivity, distillation)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvlight.hf import Cache, DynamicLayer
from kvlight.serving.positions import PositionTracker


class CaptureLayer(DynamicLayer):
    """One forward, no past: hands pre-RoPE K/V to a callback, which may return replacements.

    The callback gets ``(layer, keys_pre_rope, values)``, each ``[B, H, T, D]``. Returning None
    leaves the forward untouched (capture); returning ``(keys_pre_rope, values)`` makes attention use
    those instead (keys rotated again), e.g. with a zero perturbation that requires grad, to measure
    the loss's sensitivity to each head's K and V.
    """

    def __init__(self, layer_idx: int, sink: Callable, tracker: PositionTracker | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.sink = sink
        self.tracker = tracker
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.length:
            raise RuntimeError("a CaptureCache serves exactly one forward pass")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length = key_states.shape[2]
        tracker = self.tracker
        rotates = tracker is not None and tracker.rotates(self.layer_idx)
        # This forward's own tables (observed on the rotary module): exact whatever the rope scaling.
        cos, sin = tracker.observed(key_states.shape[0]) if rotates else (None, None)
        keys = tracker.layout.unrotate(key_states, cos, sin) if rotates else key_states
        replaced = self.sink(self.layer_idx, keys, value_states)
        if replaced is None:
            return key_states, value_states
        keys, values = replaced
        return (tracker.layout.rotate(keys, cos, sin) if rotates else keys), values


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
        super().__init__(layers=[CaptureLayer(i, sink, tracker) for i in range(num_layers)])

"""A one-forward cache that hands every layer's K/V to a callback (capture, sensitivity, distillation), keys coded as
the compressor codes them: rotated back by the RoPE angle of the first token of their block of ``key_rope_block``
tokens (1: every key by its own, i.e. pre-RoPE keys)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kvlight.hf import Cache, DynamicLayer
from kvlight.serving.positions import PositionTracker, block_starts


class CaptureLayer(DynamicLayer):
    """One forward, no past: hands K/V to a callback, which may return replacements.

    The callback gets ``(layer, keys, values)``, each ``[B, H, T, D]``, keys rotated back by this forward's own
    rotation of the first token of their block of ``block`` tokens (1: pre-RoPE keys; a layer that does not rotate:
    as attention reads them). Returning None leaves the forward untouched (capture); returning ``(keys, values)``
    makes attention use those instead (keys rotated again), e.g. with a zero perturbation that requires grad, to
    measure the loss's sensitivity to each head's K and V.
    """

    def __init__(self, layer_idx: int, sink: Callable, tracker: PositionTracker | None, block: int = 1) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.sink = sink
        self.tracker = tracker
        self.block = block
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
        cos = sin = None
        if rotates:  # this forward's own tables (observed on the rotary module): exact whatever the rope scaling
            cos, sin = tracker.observed(key_states.shape[0])
            if self.block > 1:  # each key's block start's angle
                index = block_starts(0, self.length, self.block, cos.device)
                cos, sin = cos[:, :, index], sin[:, :, index]
        keys = tracker.layout.unrotate(key_states, cos, sin) if rotates else key_states
        replaced = self.sink(self.layer_idx, keys, value_states)
        if replaced is None:
            return key_states, value_states
        keys, values = replaced
        return (tracker.layout.rotate(keys, cos, sin) if rotates else keys), values


class CaptureCache(Cache):
    """A one-forward cache that reports every layer's keys and values ``[B, H, T, D]`` to ``sink``, keys coded with
    the RoPE block ``rope_blocks`` gives each layer (empty: 1 everywhere, pre-RoPE keys)."""

    def __init__(
        self,
        num_layers: int,
        sink: Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None],
        tracker: PositionTracker | None = None,
        rope_blocks: Sequence[int] = (),
    ) -> None:
        self.sink = sink
        self.tracker = tracker
        rope_blocks = tuple(rope_blocks) or (1,) * num_layers
        if len(rope_blocks) != num_layers:
            raise ValueError(f"rope_blocks names {len(rope_blocks)} layers, the model has {num_layers}")
        super().__init__(layers=[CaptureLayer(i, sink, tracker, rope_blocks[i]) for i in range(num_layers)])

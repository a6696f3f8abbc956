"""Positions: which position ids the model really used, and RoPE applied and undone with them."""

from __future__ import annotations

import torch
from torch import nn

from kvlight.hf import rotary_cos_sin
from kvlight.models import rotary_module


def rotate_half(x: torch.Tensor) -> torch.Tensor:
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
            cos, sin = rotary_cos_sin(self.rotary, probe, position_ids)
        finally:
            self._internal = False
        return cos.float(), sin.float()

    def unrotate(self, keys: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Post-RoPE ``keys [B, H, T, D]`` -> pre-RoPE (the ``k_proj`` output), exactly.

        RoPE applies ``s * R(theta)``; its inverse is ``R(-theta) / s^2`` and ``cos^2 + sin^2 = s^2``.
        """
        cos, sin = (t.unsqueeze(1) for t in self.cos_sin(position_ids))
        k = keys.float()
        return ((k * cos - rotate_half(k) * sin) / (cos * cos + sin * sin)).to(keys.dtype)

    def rotate(self, keys: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE ``keys [B, H, T, D]`` -> post-RoPE, as the model's attention applies it."""
        cos, sin = (t.unsqueeze(1).to(keys.dtype) for t in self.cos_sin(position_ids))
        return keys * cos + rotate_half(keys) * sin


class PositionLog:
    """Positions of every token a cache holds, ``[B, N]`` int32, appended once per forward, and the rotation table of
    its compressed tokens. One per cache, shared by its layers (they all hold the same tokens)."""

    def __init__(self, tracker: PositionTracker | None) -> None:
        self.tracker = tracker
        self.positions: torch.Tensor | None = None
        self._step = -1
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._rope_channel_major: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

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

    def compressed_rope(
        self, first: int, count: int, dtype: torch.dtype, channel_major: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin) [B|1, 1, count, D]`` for the compressed tokens at sequence slots ``first:first+count``.

        Shared by every layer and extended only by the newly compressed tokens (the rotary module is not asked again
        for the whole history each step). One row serves the batch when all rows have the same positions.
        ``channel_major``: the same values as transposed views of contiguous ``[B|1, 1, D, count]`` tables (made once
        per table, for keys decoded channel-major; see attention.decode_into).
        """
        cos, sin = self._compressed_rope(first, count, dtype)
        if not channel_major:
            return cos, sin
        key = (first, count, dtype, cos.data_ptr(), cos.shape[0])
        if self._rope_channel_major is None or self._rope_channel_major[0] != key:
            cos_t, sin_t = (t.transpose(-1, -2).contiguous() for t in (cos, sin))
            self._rope_channel_major = (key, cos_t, sin_t)
        return tuple(t.transpose(-1, -2) for t in self._rope_channel_major[1:])

    def _compressed_rope(self, first: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The token-major table of :meth:`compressed_rope`, extended in place of rebuilt."""
        have = 0 if self._rope is None else self._rope[1].shape[2]
        if self._rope is None or self._rope[0] != first or have > count or self._rope[1].dtype != dtype:
            self._rope, have = None, 0
        if have < count:
            positions = self.slice(first + have, first + count)
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
        self._rope_channel_major = None

    def table_tensors(self) -> list[torch.Tensor]:
        """The rotation table's tensors (decode scratch, not stored tokens)."""
        tables = [] if self._rope is None else list(self._rope[1:])
        return tables + ([] if self._rope_channel_major is None else list(self._rope_channel_major[1:]))

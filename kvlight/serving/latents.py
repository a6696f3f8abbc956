"""The stored latents of one layer and kind, in buffers grown in chunks and filled in place."""

from __future__ import annotations

import torch

from kvlight.serving.quant import LatentQuantizer, QuantizedLatents, codec_quantizer
from kvlight.serving.widths import DirectionQuantizer, PackedCodes, direction_quantizer


class LatentStore:
    """The latents of one layer and kind, ``[B, T, R]``, in the K/V dtype, quantized with per-token group scales
    (:class:`~kvlight.serving.quant.LatentQuantizer`) or as static mixed-width codes (:class:`~kvlight.serving.widths.DirectionQuantizer`).

    Stored in buffers preallocated in chunks of :attr:`GROW` tokens and filled in place, so a decode
    step writes one token instead of copying the whole history (at most ``GROW - 1`` tokens of slack).
    Packed width codes and their exact channels are held token-minor (``[B, n_bytes, capacity]`` in memory, seen as
    ``[B, T, n_bytes]``): unpacking gathers whole byte columns, one contiguous run of tokens each, instead of single
    bytes per token, and the decode kernel reads an exact channel's tokens as one run too.
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
        #: per buffer: held token-minor (see the class docstring).
        self._token_minor = [self.widths] * len(self._buffers)

    def _encode(self, z: torch.Tensor) -> list[torch.Tensor | None]:
        """``z [B, T, R]`` -> the tensors stored for it: ``[latents]``, ``[codes, scale, zero]`` or
        ``[packed codes, exact channels]``."""
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
        return PackedCodes(*parts) if self.widths else QuantizedLatents(*parts)

    def append(self, z: torch.Tensor) -> None:
        """Store new latents ``z [B, T, R]`` after the existing ones (no copy of the history unless full)."""
        new = self._encode(z)
        count = z.shape[1]
        if self.length + count > self.capacity:
            capacity = -(-(self.length + count) // self.GROW) * self.GROW
            grown = []
            for buffer, minor in zip(self._buffers, self._token_minor):
                if buffer is None:
                    grown.append(None)
                    continue
                bigger = self._empty(buffer, capacity, minor)
                bigger[:, : self.length] = buffer[:, : self.length]
                grown.append(bigger)
            self._buffers = grown
        for buffer, part in zip(self._buffers, new):
            if buffer is not None:
                buffer[:, self.length : self.length + count] = part
        self.length += count

    @staticmethod
    def _empty(like: torch.Tensor, tokens: int, token_minor: bool) -> torch.Tensor:
        """Zeros ``[B, tokens, *rest]`` of ``like``'s dtype and device, token-minor in memory if asked."""
        batch, rest = like.shape[0], like.shape[2:]
        if token_minor:  # [B, n_bytes, tokens] in memory
            return like.new_zeros(batch, *rest, tokens).transpose(1, 2)
        return like.new_zeros(batch, tokens, *rest)

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
        selected = []
        for buffer, minor in zip(self._buffers, self._token_minor):
            if buffer is None:
                selected.append(None)
                continue
            chosen = fn(buffer[:, : self.length])
            out = self._empty(chosen, chosen.shape[1], minor)
            out.copy_(chosen)
            selected.append(out)
        self._buffers = selected

    def restore(self, tensors: list[torch.Tensor], length: int) -> None:
        """Hold ``tensors`` (what :meth:`tensors` returned for ``length`` tokens, e.g. read back from disk) as the
        stored latents, in buffers laid out as :meth:`append` would have grown them. Raises ValueError when their
        number, batch, trailing shape or dtype differ from what this store holds."""
        expected = [b for b in self._buffers if b is not None]
        if len(tensors) != len(expected):
            raise ValueError(f"latent store holds {len(expected)} tensors, got {len(tensors)}")
        capacity = -(-length // self.GROW) * self.GROW
        restored = []
        tensors = iter(tensors)
        for buffer, minor in zip(self._buffers, self._token_minor):
            if buffer is None:
                restored.append(None)
                continue
            tensor = next(tensors)
            want = [buffer.shape[0], length, *buffer.shape[2:]]
            if list(tensor.shape) != want or tensor.dtype != buffer.dtype:
                raise ValueError(f"latent tensor {list(tensor.shape)} {tensor.dtype}, expected {want} {buffer.dtype}")
            out = self._empty(buffer, capacity, minor)
            out[:, :length] = tensor.to(buffer.device)
            restored.append(out)
        self._buffers = restored
        self.length = length


def store_quantizer(codec, settings, dtype: torch.dtype) -> LatentQuantizer | DirectionQuantizer | None:
    """How one layer codec's latents (of ``dtype``) are stored: static mixed-width codes when its heads have
    widths, else per-token group quantization (``settings.latent_bits``), else None (latents in ``dtype``)."""
    if codec.has_widths:
        return direction_quantizer(codec, dtype)
    return codec_quantizer(settings.latent_bits, settings.quant_group_size, codec)

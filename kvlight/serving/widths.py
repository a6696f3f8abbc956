"""Bits per principal direction: static per-direction integer codes of mixed widths, packed by width.

Every latent channel ``i`` of a layer codec (one direction of one head's PCA or KVSplice basis) has a
width ``b_i`` in :data:`~kvlight.compressors.widths.WIDTHS`:

- ``0``: not stored; it decodes as its calibration centre (rank truncation is the special case);
- ``1..8``: the code of a uniform quantizer with ``2^b`` levels around the channel's centre,
  ``z_hat = offset + step * code`` with ``code = clamp(round((z - offset) / step), 0, 2^b - 1)``; ``step``
  and ``offset`` are static (fitted once on calibration rows), so nothing but the codes is stored per token;
- ``16``: stored exactly, in the K/V dtype.

Packing: a code of width ``b`` is split into fields of 1, 2, 4 or 8 bits (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2)
and the fields of one size from every channel of the layer are packed together, ``8 / f`` per byte. A
layer then costs ``sum_f ceil(n_f * f / 8)`` bytes per token plus its exact channels: under one byte of
padding per field size. Unpacking writes each field array as one contiguous block of "virtual channels";
each virtual channel is one field of one logical channel, decoded with scale ``step * 2^shift``, so the
static affine map folds into a decoder's weights (the fast decode path reads the unpacked codes directly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvlight.compressors.statistics import levels_of
from kvlight.compressors.widths import EXACT

#: fields ``(size, shift)`` each width is packed as: bits ``[shift, shift + size)`` of the code.
FIELDS = {
    1: ((1, 0),),
    2: ((2, 0),),
    3: ((2, 1), (1, 0)),
    4: ((4, 0),),
    5: ((4, 1), (1, 0)),
    6: ((4, 2), (2, 0)),
    8: ((8, 0),),
}

FIELD_SIZES = (8, 4, 2, 1)


@dataclass
class PackedCodes:
    """What a width-coded store holds for ``[B, T]`` tokens: one uint8 array per field size, the exact channels."""

    fields: list[torch.Tensor]  # uint8 [B, T, ceil(n_f * f / 8)], in DirectionQuantizer.plan order
    exact: torch.Tensor  # [B, T, n_exact] in the K/V dtype (n_exact may be 0)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.fields, self.exact]


def pack_codes(codes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 codes ``[..., n]`` of ``size`` bits -> bytes ``[..., ceil(n * size / 8)]``.

    Slot ``i`` of every byte holds codes ``[i * S, (i + 1) * S)`` (``S`` bytes per token), so unpacking writes
    contiguous blocks instead of interleaving.
    """
    per_byte = 8 // size
    if per_byte == 1:
        return codes.contiguous()
    pad = (-codes.shape[-1]) % per_byte
    codes = torch.nn.functional.pad(codes, (0, pad))
    slot = codes.shape[-1] // per_byte
    packed = codes[..., :slot].clone()
    for i in range(1, per_byte):
        packed |= codes[..., i * slot : (i + 1) * slot] << (i * size)
    return packed


def unpack_into(out: torch.Tensor, packed: torch.Tensor, size: int, count: int) -> None:
    """Write the ``count`` codes of ``packed`` (see :func:`pack_codes`) into ``out [..., count]`` (any dtype)."""
    per_byte = 8 // size
    if per_byte == 1:
        out.copy_(packed[..., :count])
        return
    slot = packed.shape[-1]
    mask = 2**size - 1
    for i in range(per_byte):
        take = min(slot, count - i * slot)
        if take <= 0:
            break
        part = packed[..., :take] if i == 0 else packed[..., :take] >> (i * size)
        out[..., i * slot : i * slot + take] = part if i == per_byte - 1 else part & mask


class DirectionQuantizer:
    """Static mixed-width codes for the ``R`` latent channels of one layer codec (see the module docstring).

    Args:
        widths: ``[R]`` int widths from :data:`~kvlight.compressors.widths.WIDTHS`.
        step, offset: ``[R]`` static quantizer parameters (see :func:`~kvlight.compressors.statistics.step_offset`).
        exact_dtype: dtype of the width-16 channels (the K/V dtype).
    """

    def __init__(
        self,
        widths: torch.Tensor,
        step: torch.Tensor,
        offset: torch.Tensor,
        exact_dtype: torch.dtype = torch.float16,
    ) -> None:
        device = step.device
        self.widths = widths.to(device=device, dtype=torch.long)
        self.width = int(self.widths.numel())
        self.exact_dtype = exact_dtype
        coded = (self.widths > 0) & (self.widths < EXACT)
        self.coded_index = coded.nonzero().squeeze(1)
        self.exact_index = (self.widths == EXACT).nonzero().squeeze(1)
        self.step = step.detach().float().to(device)
        self.offset = offset.detach().float().to(device)
        self.levels = levels_of(self.widths)
        # Per channel, for quantize and fake_quantize: safe steps (1 where unused) and the dequantized constant.
        self._coded_mask, self._exact_mask = coded, self.widths == EXACT
        self._safe_step = torch.where(coded, self.step, torch.ones_like(self.step))
        self._constant = torch.where(self._exact_mask, torch.zeros_like(self.offset), self.offset)
        coded_widths = self.widths[self.coded_index].tolist()
        self.plan: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (field size, positions in coded, shifts)
        channels, scales = [], []
        for size in FIELD_SIZES:
            positions, shifts = [], []
            for j, width in enumerate(coded_widths):
                for field, shift in FIELDS[width]:
                    if field == size:
                        positions.append(j)
                        shifts.append(shift)
            if positions:
                positions_t = torch.tensor(positions, dtype=torch.long, device=device)
                shifts_t = torch.tensor(shifts, dtype=torch.uint8, device=device)
                self.plan.append((size, positions_t, shifts_t))
                logical = self.coded_index[positions_t]
                channels.append(logical)
                scales.append(self.step[logical] * (2.0 ** shifts_t.float()))
        channels.append(self.exact_index)
        scales.append(torch.ones(self.exact_index.numel(), device=device))
        #: logical channel and scale of every virtual channel (unpacked field), in unpacking order.
        self.virtual_channel = torch.cat(channels)
        self.virtual_scale = torch.cat(scales)

    @property
    def num_virtual(self) -> int:
        return int(self.virtual_channel.numel())

    def bytes_per_token(self) -> int:
        """Stored bytes per token: packed fields plus exact channels."""
        fields = sum(math.ceil(len(positions) * size / 8) for size, positions, _ in self.plan)
        itemsize = torch.empty((), dtype=self.exact_dtype).element_size()
        return fields + int(self.exact_index.numel()) * itemsize

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Integer codes ``[..., n_coded]`` (uint8) of the coded channels of ``z [..., R]``."""
        zc = z[..., self.coded_index].float()
        offset, step = self.offset[self.coded_index], self.step[self.coded_index]
        code = torch.round((zc - offset) / step).clamp_min(0.0)
        return torch.minimum(code, self.levels[self.coded_index]).to(torch.uint8)

    def quantize(self, z: torch.Tensor) -> PackedCodes:
        """``z [B, T, R]`` -> :class:`PackedCodes`."""
        codes = self.codes(z)
        fields = []
        for size, positions, shifts in self.plan:
            part = codes[..., positions]
            if bool(shifts.any()):
                part = part >> shifts
            fields.append(pack_codes(part & (2**size - 1), size))
        # Always a tensor (maybe of 0 channels), so the packed form knows its batch and token counts.
        return PackedCodes(fields, z[..., self.exact_index].to(self.exact_dtype))

    def virtual_codes(self, packed: PackedCodes, dtype: torch.dtype, pad: int = 0) -> torch.Tensor:
        """Unpacked fields and exact channels ``[B, T, V + pad]`` in ``dtype``, virtual-channel order; the ``pad``
        trailing columns are zero (the fast path gathers its zero padding from them)."""
        template = packed.exact
        out = torch.empty(*template.shape[:-1], self.num_virtual + pad, dtype=dtype, device=template.device)
        start = 0
        for (size, positions, _), array in zip(self.plan, packed.fields):
            count = positions.numel()
            unpack_into(out[..., start : start + count], array, size, count)
            start += count
        out[..., start : start + packed.exact.shape[-1]] = packed.exact
        start += packed.exact.shape[-1]
        if pad:
            out[..., start:].zero_()
        return out

    def dequantize(self, packed: PackedCodes, dtype: torch.dtype) -> torch.Tensor:
        """:class:`PackedCodes` -> ``z_hat [B, T, R]`` in ``dtype`` (computed in float32)."""
        virtual = self.virtual_codes(packed, torch.float32)
        out = self._constant.expand(*virtual.shape[:-1], self.width).clone()
        out.index_add_(-1, self.virtual_channel, virtual * self.virtual_scale)
        return out.to(dtype)

    def fake_quantize(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., R]`` (float) -> the values :meth:`dequantize` would return, with a straight-through gradient for
        coded and exact channels (rounding passes as the identity); dropped channels are constants (no gradient)."""
        code = torch.minimum(torch.round((z.detach() - self.offset) / self._safe_step).clamp_min(0.0), self.levels)
        coded = z + (self.offset + self._safe_step * code - z).detach()
        exact = z + (z.detach().to(self.exact_dtype).to(z.dtype) - z.detach())
        constant = self._constant.to(z.dtype).expand_as(z)
        return torch.where(self._coded_mask, coded, torch.where(self._exact_mask, exact, constant))


def padded_bytes_per_token(widths: list[list[int]], exact_itemsize: int = 2) -> int:
    """Bytes per token of codecs with these widths (one list of channel widths per layer codec)."""
    total = 0
    for codec in widths:
        counts = dict.fromkeys(FIELD_SIZES, 0)
        for width in codec:
            if width == EXACT:
                total += exact_itemsize
            elif width:
                for size, _ in FIELDS[width]:
                    counts[size] += 1
        total += sum(math.ceil(n * size / 8) for size, n in counts.items())
    return total


def direction_quantizer(codec, exact_dtype: torch.dtype = torch.float16) -> DirectionQuantizer:
    """The static mixed-width quantizer of one layer codec's latents (its heads' widths, steps and offsets)."""
    return DirectionQuantizer(codec.widths, codec.code_step, codec.code_offset, exact_dtype)


def direction_quantizers(compressor, exact_dtype: torch.dtype = torch.float16) -> dict:
    """``{(layer, kind): DirectionQuantizer}`` of a compressor's width codecs (a snapshot of their current steps)."""
    return {key: direction_quantizer(compressor.codec(*key), exact_dtype) for key in compressor.width_codecs()}

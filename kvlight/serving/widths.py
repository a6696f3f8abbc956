"""Bits per principal direction: static per-direction integer codes of mixed widths, packed by width.

Every latent channel ``i`` of a layer codec (one direction of one head's PCA or KVSplice basis) has a
width ``b_i`` in :data:`~kvlight.compressors.widths.WIDTHS`:

- ``0``: not stored; it decodes as its calibration centre (rank truncation is the special case);
- ``1..8``: the code of a uniform quantizer with ``2^b`` levels around the channel's centre,
  ``z_hat = offset + step * code`` with ``code = clamp(round((z - offset) / step), 0, 2^b - 1)``; ``step``
  and ``offset`` are static (fitted once on calibration rows), so nothing but the codes is stored per token;
- ``16``: stored exactly, in the K/V dtype.

Packing: a code of width ``b`` is split into fields of 1, 2, 4 or 8 bits (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2)
and the fields of one size from every channel of the layer are packed together, ``8 / f`` per byte, the arrays
of every size side by side in one ``uint8 [B, T, n_bytes]`` tensor. A layer then costs ``sum_f ceil(n_f * f / 8)``
bytes per token plus its exact channels: under one byte of padding per field size. Unpacking is table-driven
(:class:`UnpackTable`): one gather of bytes per field, a shift and a mask, so codes land in whatever order the
reader wants, e.g. straight into the fast decode path's per-head layout (:class:`HeadLayout`), where the static
affine map ``offset + step * code`` is folded into the decoder's weights.
"""

from __future__ import annotations

import functools
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
#: at most this many code rows (batch x tokens) are packed bit by bit (:meth:`DirectionQuantizer._pack_by_bits`: a
#: decode step's flush of 16 tokens); more, such as a prefill, field by field, which holds no ``[rows, bits]`` tensor.
BIT_PACK_ROWS = 512


@dataclass
class PackedCodes:
    """What a width-coded store holds for ``[B, T]`` tokens: the packed fields, the exact channels."""

    codes: torch.Tensor  # uint8 [B, T, n_bytes]: the field arrays of every size side by side, in plan order
    exact: torch.Tensor  # [B, T, n_exact] in the K/V dtype (n_exact may be 0)

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.exact]


def pack_codes(codes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 codes ``[..., n]`` of ``size`` bits -> bytes ``[..., ceil(n * size / 8)]``.

    Code ``k`` lies in byte ``k % S`` at bit ``(k // S) * size`` (``S`` bytes per token): see :func:`field_location`.
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


def field_location(k: int, count: int, size: int) -> tuple[int, int]:
    """``(byte, bit)`` of code ``k`` of the ``count`` codes :func:`pack_codes` packed at ``size`` bits."""
    slot = math.ceil(count * size / 8)
    return k % slot, (k // slot) * size


@dataclass(frozen=True)
class UnpackTable:
    """How to read ``S`` integer codes out of packed bytes ``P [..., T, n_bytes]`` in a handful of whole-array ops.

    Every code of width ``b`` has one field at shift 0 (``lo``) and, for widths 3, 5 and 6, one more above it
    (``hi``): ``code = ((P[byte_hi] >> bit_hi) & mask_hi) << shift_hi | (P[byte_lo] >> bit_lo) & mask_lo``.
    A slot with mask 0 reads as 0 (padding, or a channel stored elsewhere). Bit, mask and shift tables are
    ``[S, 1]``, to broadcast over tokens.
    """

    byte_lo: torch.Tensor  # long [S]
    bit_lo: torch.Tensor  # uint8 [S, 1]
    mask_lo: torch.Tensor  # uint8 [S, 1]
    hi: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None  # byte, bit, mask, shift; None: no hi

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``P [B, T, n_bytes]`` (uint8) -> codes ``[B, S, T]`` (uint8), channel-major: each slot's codes are one
        contiguous run of tokens, gathered as whole byte columns (fast when ``P`` is held token-minor)."""
        columns = packed.transpose(-1, -2)  # [B, n_bytes, T]
        codes = columns.index_select(-2, self.byte_lo)
        codes.bitwise_right_shift_(self.bit_lo).bitwise_and_(self.mask_lo)
        if self.hi is not None:
            byte, bit, mask, shift = self.hi
            high = columns.index_select(-2, byte)
            codes.bitwise_or_(high.bitwise_right_shift_(bit).bitwise_and_(mask).bitwise_left_shift_(shift))
        return codes

    def tensors(self) -> list[torch.Tensor]:
        return [self.byte_lo, self.bit_lo, self.mask_lo, *(self.hi or ())]


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
        #: per field size, the coded channels (positions in coded_index) with a field of that size, and its shift.
        self.plan: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        #: per coded channel, its fields as ``(byte, bit, size, shift)`` in the packed bytes.
        self._fields: list[list[tuple[int, int, int, int]]] = [[] for _ in coded_widths]
        self.n_bytes = 0
        for size in FIELD_SIZES:
            members = [(j, shift) for j, width in enumerate(coded_widths) for f, shift in FIELDS[width] if f == size]
            if not members:
                continue
            for k, (j, shift) in enumerate(members):
                byte, bit = field_location(k, len(members), size)
                self._fields[j].append((self.n_bytes + byte, bit, size, shift))
            self.n_bytes += math.ceil(len(members) * size / 8)
            positions = torch.tensor([j for j, _ in members], dtype=torch.long, device=device)
            shifts = torch.tensor([shift for _, shift in members], dtype=torch.uint8, device=device)
            self.plan.append((size, positions, shifts))
        #: per plan entry, whether any of its fields sits above bit 0 (known once, not asked on every block).
        self._shifted = [bool(shifts.any()) for _, _, shifts in self.plan]
        #: the codes of every coded channel, in coded_index order.
        self.coded_table = self.unpack_table(list(range(len(coded_widths))))

    def unpack_table(self, slots: list[int | None]) -> UnpackTable:
        """The :class:`UnpackTable` that reads coded channel ``slots[s]`` (a position in ``coded_index``; None: 0)
        into slot ``s``."""
        lo, hi = [], []
        for j in slots:
            fields = [] if j is None else self._fields[j]
            low = [(byte, bit, 2**size - 1) for byte, bit, size, shift in fields if shift == 0]
            high = [(byte, bit, 2**size - 1, shift) for byte, bit, size, shift in fields if shift > 0]
            lo.append(low[0] if low else (0, 0, 0))
            hi.append(high[0] if high else (0, 0, 0, 0))
        device = self.step.device
        as_bytes = lambda values: torch.tensor(values, dtype=torch.uint8, device=device).view(-1, 1)  # noqa: E731
        byte_lo, bit_lo, mask_lo = zip(*lo) if lo else ((), (), ())
        high = None
        if any(mask for _, _, mask, _ in hi):
            byte, bit, mask, shift = zip(*hi)
            high = (torch.tensor(byte, dtype=torch.long, device=device), as_bytes(bit), as_bytes(mask), as_bytes(shift))
        return UnpackTable(
            torch.tensor(byte_lo, dtype=torch.long, device=device), as_bytes(bit_lo), as_bytes(mask_lo), high
        )

    def bytes_per_token(self) -> int:
        """Stored bytes per token: packed fields plus exact channels."""
        itemsize = torch.empty((), dtype=self.exact_dtype).element_size()
        return self.n_bytes + int(self.exact_index.numel()) * itemsize

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Integer codes ``[..., n_coded]`` (uint8) of the coded channels of ``z [..., R]``."""
        offset, step, levels = self._coded_grid
        code = torch.round((z[..., self.coded_index].float() - offset) / step).clamp_min_(0.0)
        return torch.minimum(code, levels).to(torch.uint8)

    @functools.cached_property
    def _coded_grid(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(offset, step, levels)`` of the coded channels, gathered once (every compressed block reads them)."""
        index = self.coded_index
        return self.offset[index], self.step[index], self.levels[index]

    def quantize(self, z: torch.Tensor) -> PackedCodes:
        """``z [B, T, R]`` -> :class:`PackedCodes`."""
        codes = self.codes(z)
        rows = codes.numel() // codes.shape[-1] if codes.shape[-1] else 0
        packed = self._pack_by_bits(codes) if 0 < rows <= BIT_PACK_ROWS else self._pack_fields(codes)
        # Always a tensor (maybe of 0 channels), so the packed form knows its batch and token counts.
        return PackedCodes(packed, z[..., self.exact_index].to(self.exact_dtype))

    def _pack_fields(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes ``[..., n_coded]`` -> packed bytes ``[..., n_bytes]``, field size by field size."""
        fields = []
        for (size, positions, shifts), shifted in zip(self.plan, self._shifted):
            part = codes[..., positions]
            if shifted:
                part = part >> shifts
            fields.append(pack_codes(part & (2**size - 1), size))
        return torch.cat(fields, dim=-1) if fields else codes.new_zeros(*codes.shape[:-1], 0)

    def _pack_by_bits(self, codes: torch.Tensor) -> torch.Tensor:
        """:meth:`_pack_fields` in five operations, for the few tokens a decode step compresses (there, the
        field-by-field path's two dozen small operations cost more than the arithmetic): every stored bit of every
        code moved to its place in :attr:`_bit_places` and added into its byte."""
        channel, shift, byte, bit = self._bit_places
        bits = (codes.index_select(-1, channel) >> shift) & 1  # [..., stored bits]
        packed = torch.zeros(*codes.shape[:-1], self.n_bytes, dtype=torch.uint8, device=codes.device)
        return packed.index_add_(-1, byte, bits << bit)

    @functools.cached_property
    def _bit_places(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per stored code bit ``[S]``: its coded channel and bit in the code, its byte and bit in the packed form
        (from ``self._fields``). Adding the bits of a byte is their OR: no two code bits share a packed bit, so no sum
        carries (each byte sums to at most 255)."""
        places = [
            (j, shift + i, byte, bit + i)
            for j, fields in enumerate(self._fields)
            for byte, bit, size, shift in fields
            for i in range(size)
        ]
        channel, shift, byte, bit = zip(*places) if places else ((), (), (), ())
        device = self.step.device
        return (
            torch.tensor(channel, dtype=torch.long, device=device),
            torch.tensor(shift, dtype=torch.uint8, device=device),
            torch.tensor(byte, dtype=torch.long, device=device),
            torch.tensor(bit, dtype=torch.uint8, device=device),
        )

    def dequantize(self, packed: PackedCodes, dtype: torch.dtype) -> torch.Tensor:
        """:class:`PackedCodes` -> ``z_hat [B, T, R]`` in ``dtype`` (computed in float32)."""
        tokens = packed.exact.shape[:-1]
        out = self._constant.expand(*tokens, self.width).clone()
        if self.coded_index.numel():
            codes = self.coded_table.unpack(packed.codes).transpose(-1, -2).float()  # [B, T, n_coded]
            out[..., self.coded_index] = self.offset[self.coded_index] + self.step[self.coded_index] * codes
        out[..., self.exact_index] = packed.exact.float()
        return out.to(dtype)

    def fake_quantize(
        self, z: torch.Tensor, step: torch.Tensor | None = None, offset: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``z [..., R]`` (float) -> the values :meth:`dequantize` would return, differentiably.

        Rounding passes the gradient as the identity (straight-through) and clipping stops it (a latent beyond the
        grid moves nothing), exact channels pass it through, dropped channels are constants. ``step`` and
        ``offset`` (``[R]``, e.g. a codec's :meth:`~kvlight.compressors.base.LayerCodec.quantizer_steps`) replace
        the snapshot's and get the gradient of learned step sizes (LSQ): ``code - (z - offset) / step`` in the grid.
        """
        step = self._safe_step if step is None else torch.where(self._coded_mask, step, torch.ones_like(step))
        offset = self.offset if offset is None else offset
        scaled = (z - offset) / step
        code = scaled + (torch.round(scaled) - scaled).detach()
        code = code.clamp(torch.zeros_like(self.levels), self.levels)  # bounds inclusive: a code on them still learns
        coded = offset + step * code
        exact = z + (z.detach().to(self.exact_dtype).to(z.dtype) - z.detach())
        constant = self._constant.to(z.dtype).expand_as(z)
        return torch.where(self._coded_mask, coded, torch.where(self._exact_mask, exact, constant))


@dataclass(frozen=True)
class HeadLayout:
    """Where each head's stored channels land in the fast path's per-head operand ``[B, H, n, r_max]``.

    ``channel [H, r_max]``: the logical channel of each row (-1: padding, reads 0); ``table`` reads the codes of the
    coded rows (flattened ``h * r_max + j``); ``exact_slots [n_exact]``: the flat row of each exact channel, in
    ``exact_index`` order.
    """

    channel: torch.Tensor
    table: UnpackTable
    exact_slots: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [self.channel, *self.table.tensors(), self.exact_slots]

    def operand(self, packed: PackedCodes, dtype: torch.dtype) -> torch.Tensor:
        """Stored codes and exact channels per head, ``[B, H, n, r_max]`` in ``dtype`` (integer codes, unscaled).

        Channel-major: the result is the transposed view of a contiguous ``[B, H, r_max, n]`` tensor, which is how
        the codes come out of the table (a transposing copy would cost more than the matmuls that read it).
        """
        heads, r_max = self.channel.shape
        codes = self.table.unpack(packed.codes)  # [B, H * r_max, n] uint8
        batch, tokens = codes.shape[0], codes.shape[-1]
        out = codes.view(batch, heads, r_max, tokens).to(dtype)
        if self.exact_slots.numel():  # exact channels read 0 from the table; their values go in by (head, row)
            head, row = self.exact_slots // r_max, self.exact_slots % r_max
            out[:, head, row, :] = packed.exact.to(dtype).transpose(1, 2)  # [B, n_exact, n]
        return out.transpose(-1, -2)


def head_layout(quantizer: DirectionQuantizer, splits: list[int]) -> HeadLayout:
    """The :class:`HeadLayout` of a quantizer whose ``R`` channels are the heads' latents side by side (``splits``)."""
    starts = [sum(splits[:h]) for h in range(len(splits))]
    widths = quantizer.widths.tolist()
    coded_position = {c: j for j, c in enumerate(quantizer.coded_index.tolist())}
    exact_position = {c: e for e, c in enumerate(quantizer.exact_index.tolist())}
    rows = [[c for c in range(start, start + rank) if widths[c] > 0] for start, rank in zip(starts, splits)]
    r_max = max(1, max(len(r) for r in rows))
    channel = torch.full((len(splits), r_max), -1, dtype=torch.long)
    slots: list[int | None] = []
    exact_slots = [0] * len(exact_position)
    for h, members in enumerate(rows):
        channel[h, : len(members)] = torch.tensor(members, dtype=torch.long)
        for j in range(r_max):
            c = members[j] if j < len(members) else None
            slots.append(coded_position.get(c))
            if c in exact_position:
                exact_slots[exact_position[c]] = h * r_max + j
    device = quantizer.step.device
    return HeadLayout(
        channel.to(device),
        quantizer.unpack_table(slots),
        torch.tensor(exact_slots, dtype=torch.long, device=device),
    )


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

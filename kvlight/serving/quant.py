"""Low-precision storage of latents: integer codes with per-token group scales, or fp8.

Latents are first divided by a static per-channel scale (each latent direction's calibration
std), so every channel spans a similar range: per-token groups then behave like KIVI's
per-channel key quantization without buffering tokens. Codes are packed into bytes, and
``nbytes`` counts every stored tensor (codes, scales, zero points).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 4, 8, "fp8")


@dataclass
class QuantizedLatents:
    """Latents of ``tokens`` positions, ``[B, T, R]`` before packing."""

    codes: torch.Tensor  # uint8 [B, T, ceil(R * bits / 8)] or float8 [B, T, R]
    scale: torch.Tensor | None  # float16 [B, T, G]
    zero: torch.Tensor | None  # float16 [B, T, G]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.scale, self.zero) if t is not None]


class LatentQuantizer:
    """Asymmetric min-max quantization in groups of ``group_size`` channels per token (or fp8 e4m3).

    Args:
        bits: 2, 4, 8 or ``"fp8"``.
        group_size: channels sharing one scale and zero point.
        channel_scale: ``[R]`` static per-channel scale (latents are divided by it before quantizing).
    """

    def __init__(self, bits: int | str, group_size: int, channel_scale: torch.Tensor) -> None:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"latent bits must be one of {SUPPORTED_BITS}, got {bits!r}")
        self.bits = bits
        self.group_size = group_size
        self.channel_scale = channel_scale.float()
        self.width = channel_scale.shape[0]

    def quantize(self, z: torch.Tensor) -> QuantizedLatents:
        """``z [B, T, R]`` -> packed codes (+ per-token group scales)."""
        x = z.float() / self.channel_scale.to(z.device)
        if self.bits == "fp8":
            return QuantizedLatents(x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn), None, None)
        groups = self._grouped(x)  # [B, T, G, g]
        low = groups.amin(dim=-1, keepdim=True)
        high = groups.amax(dim=-1, keepdim=True)
        levels = 2**self.bits - 1
        scale = ((high - low) / levels).clamp_min(1e-8)
        # Scales and zero points are stored in fp16; quantize against the stored values so decode matches.
        scale, low = scale.half().float(), low.half().float()
        codes = torch.clamp(torch.round((groups - low) / scale), 0, levels).to(torch.uint8)
        codes = codes.flatten(-2)[..., : self.width]
        return QuantizedLatents(self._pack(codes), scale.squeeze(-1).half(), low.squeeze(-1).half())

    def dequantize(self, q: QuantizedLatents, dtype: torch.dtype, channel_scaled: bool = True) -> torch.Tensor:
        """Packed latents -> ``[B, T, R]`` in ``dtype`` (computed in float32).

        With ``channel_scaled=False`` the static per-channel scale is left out (the caller folds
        ``channel_scale`` into its own weights, saving one pass over the latents).
        """
        if self.bits == "fp8":
            x = q.codes.float()
        else:
            codes = self._grouped_codes(self.codes_as(q.codes, torch.float32))
            x = (codes * q.scale.float().unsqueeze(-1) + q.zero.float().unsqueeze(-1)).flatten(-2)[..., : self.width]
        if channel_scaled:
            x = x * self.channel_scale.to(x.device)
        return x.to(dtype)

    def dequantize_fast(self, q: QuantizedLatents, dtype: torch.dtype) -> torch.Tensor:
        """Like ``dequantize(..., channel_scaled=False)`` but computed in ``dtype`` in place (decode path)."""
        if self.bits == "fp8":
            return q.codes.to(dtype)
        codes = self.codes_as(q.codes, dtype)
        grouped = self._grouped_codes(codes)
        grouped.mul_(q.scale.to(dtype).unsqueeze(-1)).add_(q.zero.to(dtype).unsqueeze(-1))
        return grouped.flatten(-2)[..., : self.width]

    def codes_as(self, packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Integer codes ``[B, T, R]`` unpacked straight into ``dtype`` (one pass; no intermediate uint8 copy)."""
        per_byte = 8 // self.bits
        if per_byte == 1:
            return packed.to(dtype)
        slot = packed.shape[-1]
        out = torch.empty(*packed.shape[:-1], slot * per_byte, dtype=dtype, device=packed.device)
        mask = 2**self.bits - 1
        for i in range(per_byte):
            part = packed if i == 0 else packed >> (i * self.bits)
            out[..., i * slot : (i + 1) * slot] = part if i == per_byte - 1 else part & mask
        return out[..., : self.width]

    def _grouped_codes(self, codes: torch.Tensor) -> torch.Tensor:
        pad = (-self.width) % self.group_size
        if pad:
            codes = torch.nn.functional.pad(codes, (0, pad))
        return codes.unflatten(-1, (-1, self.group_size))

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        pad = (-self.width) % self.group_size
        if pad:  # repeat the last channel so padding never widens a group's range
            x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], pad)], dim=-1)
        return x.unflatten(-1, (-1, self.group_size))

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes ``[..., R]`` -> bytes ``[..., ceil(R / k)]`` with ``k = 8 // bits`` codes per byte.

        Slot ``i`` of every byte holds channels ``[i * S, (i + 1) * S)`` (``S`` bytes per token), so unpacking
        writes contiguous blocks of channels instead of interleaving them.
        """
        per_byte = 8 // self.bits
        if per_byte == 1:
            return codes
        pad = (-codes.shape[-1]) % per_byte
        codes = torch.nn.functional.pad(codes, (0, pad))
        slot = codes.shape[-1] // per_byte
        packed = codes[..., :slot].clone()
        for i in range(1, per_byte):
            packed |= codes[..., i * slot : (i + 1) * slot] << (i * self.bits)
        return packed

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Bytes -> uint8 codes ``[..., R]`` (the inverse of :meth:`_pack`)."""
        return self.codes_as(packed, torch.uint8) if 8 // self.bits > 1 else packed


def codec_quantizer(bits: int | str | None, group_size: int, codec) -> LatentQuantizer | None:
    """How one layer codec's latents are stored: None (unquantized) or a quantizer whose static per-channel scales are
    the codec's calibration std (``codec.latent_std``, ``[R]``). The cache and the distillation share it."""
    return None if bits is None else LatentQuantizer(bits, group_size, codec.latent_std.detach())

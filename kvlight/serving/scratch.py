"""What the layers of one compressed cache share on the fast decode path: a key workspace, the decoders, and the native
kernel's operands and buffer."""

from __future__ import annotations

import torch

from kvlight.serving import attention, kernels
from kvlight.serving.widths import HeadLayout


class DecodeScratch:
    """Per cache: one flat workspace the layers decode pre-RoPE keys into (one layer at a time), every codec's
    affine decoder in the attention dtype (built once, static scales folded in), and for the native kernel its
    operands per codec and one float32 buffer."""

    def __init__(self) -> None:
        self._workspace: torch.Tensor | None = None
        self._decoders: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}
        self._layouts: dict[tuple[int, str], HeadLayout] = {}
        self._operands: dict[tuple[int, str], kernels.KindOperands] = {}
        self._kernel_buffer: torch.Tensor | None = None

    def workspace(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat buffer of at least ``numel`` elements (grown with 5 % slack)."""
        buffer = self._workspace
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype or buffer.device != device:
            self._workspace = torch.empty(int(numel * 1.05) + 4096, dtype=dtype, device=device)
        return self._workspace

    def decoder(self, layer: int, kind: str, codec, quantizer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The codec's affine decoder ``(A [H, r_max, D], c [H, D])`` in ``dtype`` for latents stored by
        ``quantizer``: static widths (kvlight.serving.widths), per-token groups (channel scale folded in) or none."""
        key = (layer, kind, dtype)
        if key not in self._decoders:
            if codec.has_widths:
                weight, bias, _ = attention.width_decoder(codec, quantizer)
                self._decoders[key] = (weight.to(dtype), bias.to(dtype))
            else:
                scale = None if quantizer is None else codec.latent_std.detach().float()
                self._decoders[key] = attention.stacked_decoder(codec, scale, dtype)
        return self._decoders[key]

    def layout(self, layer: int, kind: str, codec, quantizer) -> HeadLayout:
        """How a width codec's stored codes are laid out per head for attention (attention.width_decoder)."""
        key = (layer, kind)
        if key not in self._layouts:
            self._layouts[key] = attention.width_decoder(codec, quantizer)[2]
        return self._layouts[key]

    def operands(self, layer: int, kind: str, codec, quantizer) -> kernels.KindOperands:
        """What the native kernel reads of a width codec besides its codes: the layout's slot table and the float32
        decoder (kvlight.serving.kernels)."""
        key = (layer, kind)
        if key not in self._operands:
            layout = self.layout(layer, kind, codec, quantizer)
            table = kernels.SlotTable.of(layout.table, layout.exact_slots)
            self._operands[key] = kernels.KindOperands(
                table, *self.decoder(layer, kind, codec, quantizer, torch.float32)
            )
        return self._operands[key]

    def kernel_buffer(self, numel: int) -> torch.Tensor:
        """A float32 CPU buffer of at least ``numel`` elements for the native kernel's score rows and partial sums
        (grown with 5 % slack, reused by every layer and step)."""
        buffer = self._kernel_buffer
        if buffer is None or buffer.numel() < numel:
            self._kernel_buffer = torch.empty(int(numel * 1.05) + 4096, dtype=torch.float32)
        return self._kernel_buffer

    def tensors(self) -> list[torch.Tensor]:
        """Everything held (for the byte count of scratch)."""
        held = [] if self._workspace is None else [self._workspace]
        decoders = [t for pair in self._decoders.values() for t in pair]
        held += [] if self._kernel_buffer is None else [self._kernel_buffer]
        tables = [t for operands in self._operands.values() for t in operands.table.tensors()]
        return held + decoders + [t for layout in self._layouts.values() for t in layout.tensors()] + tables

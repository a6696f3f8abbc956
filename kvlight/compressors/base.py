"""The plug-in interface: one projection per (layer, KV head, K or V), grouped per layer.

A projection maps a head's rows ``x [N, D]`` to latents ``z [N, r]`` and back. Each backend is a
:class:`HeadProjection` subclass in its own file, registered by its name with
:func:`kvlight.compressors.registry.register_backend`. :class:`LayerCodec` runs the projections of every head of one layer on the
cache's ``[B, H, T, D]`` tensors; :class:`~kvlight.compressors.compressor.KVCompressor` holds one codec per layer and kind.
Plain PyTorch: nothing here imports Lightning or transformers.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from kvlight.compressors.statistics import levels_of, step_offset
from kvlight.compressors.widths import EXACT, check_widths

#: the learned corrections of static steps a head that ``learns_steps`` holds (see HeadProjection.set_widths).
STEP_CORRECTIONS = ("code_log_gain", "code_shift")


class HeadProjection(nn.Module):
    """Compress one head's K or V rows to ``rank`` dims and expand them back.

    Subclasses define :meth:`encode`, :meth:`decode` and :meth:`init_from_statistics`.
    """

    #: the backend's registered name (kvlight.compressors.registry sets it).
    algo: ClassVar[str] = ""

    def __init__(self, head_dim: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= head_dim:
            raise ValueError(f"rank {rank} outside 1..{head_dim}")
        self.head_dim = head_dim
        self.rank = rank
        self.register_buffer("mean", torch.zeros(head_dim))
        # Calibration std of each latent channel: the static per-channel scale of quantized latents.
        self.register_buffer("latent_std", torch.ones(rank))

    #: per-direction widths (kvlight.serving.widths) when the head stores static mixed-width codes, else None.
    widths: tuple[int, ...] | None = None
    #: whether training corrects the calibrated static steps (trainable backends; see :meth:`set_widths`).
    learns_steps: ClassVar[bool] = False

    def set_widths(self, widths: tuple[int, ...]) -> None:
        """Store this head's ``rank`` latent channels with these widths (static codes, see kvlight.serving.widths).

        Registers the static quantizer parameters ``code_step`` and ``code_offset`` (``[r]``, saved with the
        weights); until calibrated they are the Gaussian-optimal steps for ``latent_std`` around zero.

        Heads that learn (``learns_steps``) also get ``code_log_gain`` and ``code_shift`` (``[r]`` parameters, zero
        after every step calibration): training scales each coded channel's step by ``exp(gain)`` around its centre
        and moves the grid by ``shift`` calibrated steps, learning the steps with the projections (LSQ, Esser et
        al. 2020). Why: the projections drift in training while calibrated steps stay put (re-fitting the steps
        after a KL distillation alone gained 0.4 points of perplexity at 12.5 % of fp16 bytes), and the
        straight-through gradient of a fixed grid says nothing about the trade between rounding and clipping.
        """
        self.widths = check_widths(list(widths), "widths", self.rank)
        step, offset = step_offset(torch.zeros(self.rank), torch.ones(self.rank), torch.tensor(self.widths))
        self.register_buffer("code_step", step)
        self.register_buffer("code_offset", offset)
        if self.learns_steps:
            self.code_log_gain = nn.Parameter(torch.zeros(self.rank))
            self.code_shift = nn.Parameter(torch.zeros(self.rank))
            # Derived from the widths once, not on every training forward: which channels are coded, and half
            # their level count (a step's span around the centre is step * levels / 2).
            widths_t = torch.tensor(self.widths)
            self.register_buffer("_coded", (widths_t > 0) & (widths_t < EXACT), persistent=False)
            self.register_buffer("_half_levels", levels_of(widths_t) / 2, persistent=False)

    def quantizer_steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(step, offset)`` ``[r]`` the static codes use: the calibrated ones with the learned corrections (see
        :meth:`set_widths`), differentiable with respect to those."""
        if not hasattr(self, "code_log_gain"):
            return self.code_step, self.code_offset
        gain = torch.exp(self.code_log_gain)
        half_span = self.code_step * self._half_levels  # centre - offset
        step = torch.where(self._coded, self.code_step * gain, self.code_step)
        offset = self.code_offset + half_span * (1 - gain) + self.code_shift * self.code_step
        return step, torch.where(self._coded, offset, self.code_offset)

    def set_steps(self, step: torch.Tensor, offset: torch.Tensor) -> None:
        """Write calibrated static ``step`` / ``offset`` (``[r]``) and clear the learned corrections."""
        with torch.no_grad():
            self.code_step.copy_(step.to(self.code_step))
            self.code_offset.copy_(offset.to(self.code_offset))
            if hasattr(self, "code_log_gain"):
                self.code_log_gain.zero_()
                self.code_shift.zero_()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Artefacts saved before heads learned their steps hold no corrections: theirs are zero.
        for name in STEP_CORRECTIONS:
            if hasattr(self, name) and prefix + name not in state_dict:
                state_dict[prefix + name] = torch.zeros(self.rank)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def latent_center(self) -> torch.Tensor:
        """``[r]`` the latent of the calibration mean (every backend encodes affinely: the mean of its latents)."""
        with torch.no_grad():
            return self.encode(self.mean[None].float()).squeeze(0).float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., D] -> z [..., r]``."""
        raise NotImplementedError  # abstract

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., r] -> x_hat [..., D]``."""
        raise NotImplementedError  # abstract

    def init_from_statistics(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """Set the projection from the centred second moments of the calibration rows.

        Args:
            mean: ``[D]`` float64 mean of the rows.
            covariance: ``[D, D]`` float64 centred covariance.
        """
        raise NotImplementedError  # abstract


class IdentityProjection(HeadProjection):
    """A disabled head: the latent is the row itself, so it passes through exactly."""

    algo = "none"

    def __init__(self, head_dim: int, rank: int | None = None) -> None:
        super().__init__(head_dim, head_dim)

    def latent_center(self) -> torch.Tensor:
        return self.mean.float()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def init_from_statistics(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        # The latent is the raw row (not centred): its scale is the root mean square per channel.
        std = (covariance.diagonal() + mean * mean).clamp_min(0).sqrt()
        self.latent_std.copy_(std.clamp_min(float(std.max()) * 1e-6 + 1e-12).to(self.latent_std.dtype))


def latent_std_of(basis: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Std of each latent channel ``basis[:, i]^T x`` under ``covariance`` (``[D, r]``, ``[D, D]`` -> ``[r]``).

    Floored at 1e-6 of the largest so that a degenerate direction never divides by zero.
    """
    variance = torch.einsum("dr,de,er->r", basis.double(), covariance.double(), basis.double()).clamp_min(0)
    std = variance.sqrt()
    return std.clamp_min(float(std.max()) * 1e-6 + 1e-12)


def principal_basis(covariance: torch.Tensor, rank: int) -> torch.Tensor:
    """Top-``rank`` eigenvectors of a symmetric ``[D, D]`` matrix as columns ``[D, rank]`` (descending).

    Signs are fixed (largest-magnitude entry of each column positive) so that two fits of the same
    statistics give the same basis, not one up to sign.
    """
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
    basis = eigenvectors[:, eigenvalues.argsort(descending=True)[:rank]]
    pivot = basis.abs().argmax(dim=0)
    signs = torch.sign(basis[pivot, torch.arange(rank)])
    signs[signs == 0] = 1
    return basis * signs


class LayerCodec(nn.Module):
    """The projections of every KV head of one layer for K or for V.

    The latent of a layer is the concatenation of its heads' latents: ``[B, T, sum_h r_h]``.
    """

    def __init__(self, projections: list[HeadProjection]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(projections)
        self.splits = [p.rank for p in projections]

    @property
    def latent_dim(self) -> int:
        """``sum_h r_h``: stored numbers per token for this layer and kind."""
        return sum(self.splits)

    @property
    def latent_std(self) -> torch.Tensor:
        """``[sum_h r_h]`` calibration std of every latent channel (static scales for quantized storage)."""
        return torch.cat([p.latent_std for p in self.heads])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H, T, D] -> z [B, T, sum_h r_h]``."""
        return torch.cat([proj.encode(x[:, h]) for h, proj in enumerate(self.heads)], dim=-1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, T, sum_h r_h] -> x_hat [B, H, T, D]``."""
        parts = torch.split(z, self.splits, dim=-1)
        return torch.stack([proj.decode(part) for proj, part in zip(self.heads, parts)], dim=1)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H, T, D] -> x_hat [B, H, T, D]``."""
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ per-direction widths
    @property
    def has_widths(self) -> bool:
        """True when every head stores static mixed-width codes (kvlight.serving.widths)."""
        return all(p.widths is not None for p in self.heads)

    @property
    def widths(self) -> torch.Tensor:
        """``[sum_h r_h]`` the width of every latent channel."""
        return torch.tensor([w for p in self.heads for w in p.widths], dtype=torch.long)

    def quantizer_steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(step, offset)`` ``[sum_h r_h]`` of every latent channel (width codecs), learned corrections included;
        differentiable with respect to those (training), detach for storage."""
        steps, offsets = zip(*(p.quantizer_steps() for p in self.heads))
        return torch.cat(steps), torch.cat(offsets)

    @property
    def code_step(self) -> torch.Tensor:
        """``[sum_h r_h]`` the static steps of every latent channel (width codecs), as stored codes use them."""
        return self.quantizer_steps()[0].detach()

    @property
    def code_offset(self) -> torch.Tensor:
        """``[sum_h r_h]`` the static offsets of every latent channel (width codecs), as stored codes use them."""
        return self.quantizer_steps()[1].detach()

    def latent_center(self) -> torch.Tensor:
        """``[sum_h r_h]`` the latent of each head's calibration mean."""
        return torch.cat([p.latent_center() for p in self.heads])

    def set_steps(self, step: torch.Tensor, offset: torch.Tensor) -> None:
        """Write calibrated ``code_step`` / ``code_offset`` (``[sum_h r_h]``) back into the heads."""
        for p, s, o in zip(self.heads, torch.split(step, self.splits), torch.split(offset, self.splits)):
            p.set_steps(s, o)


def random_init_(weight: torch.Tensor, std: float = 0.02) -> None:
    """The upstream design's initialisation of learned projections: N(0, 0.02)."""
    with torch.no_grad():
        weight.normal_(0.0, std)


def inverse_softplus(value: float) -> float:
    """``p`` such that ``softplus(p) == value``."""
    return value + math.log(-math.expm1(-value))

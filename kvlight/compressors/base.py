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

from kvlight.compressors.statistics import step_offset
from kvlight.compressors.widths import check_widths


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

    def set_widths(self, widths: tuple[int, ...]) -> None:
        """Store this head's ``rank`` latent channels with these widths (static codes, see kvlight.serving.widths).

        Registers the static quantizer parameters ``code_step`` and ``code_offset`` (``[r]``, saved with the
        weights); until calibrated they are the Gaussian-optimal steps for ``latent_std`` around zero.
        """
        self.widths = check_widths(list(widths), "widths", self.rank)
        step, offset = step_offset(torch.zeros(self.rank), torch.ones(self.rank), torch.tensor(self.widths))
        self.register_buffer("code_step", step)
        self.register_buffer("code_offset", offset)

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

    @property
    def code_step(self) -> torch.Tensor:
        """``[sum_h r_h]`` the static steps of every latent channel (width codecs)."""
        return torch.cat([p.code_step for p in self.heads])

    @property
    def code_offset(self) -> torch.Tensor:
        """``[sum_h r_h]`` the static offsets of every latent channel (width codecs)."""
        return torch.cat([p.code_offset for p in self.heads])

    def latent_center(self) -> torch.Tensor:
        """``[sum_h r_h]`` the latent of each head's calibration mean."""
        return torch.cat([p.latent_center() for p in self.heads])

    def set_steps(self, step: torch.Tensor, offset: torch.Tensor) -> None:
        """Write calibrated ``code_step`` / ``code_offset`` (``[sum_h r_h]``) back into the heads."""
        for p, s, o in zip(self.heads, torch.split(step, self.splits), torch.split(offset, self.splits)):
            p.code_step.copy_(s.to(p.code_step))
            p.code_offset.copy_(o.to(p.code_offset))


def random_init_(weight: torch.Tensor, std: float = 0.02) -> None:
    """The upstream design's initialisation of learned projections: N(0, 0.02)."""
    with torch.no_grad():
        weight.normal_(0.0, std)


def inverse_softplus(value: float) -> float:
    """``p`` such that ``softplus(p) == value``."""
    return value + math.log(-math.expm1(-value))

"""PCA backend: a centred orthonormal basis per head, fitted from float64 statistics, no optimizer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvlight.compressors.base import HeadProjection, latent_std_of, principal_basis
from kvlight.compressors.registry import register_backend


@dataclass(frozen=True)
class PCAOptions:
    """PCA has no settings: its basis is the eigendecomposition of the calibration covariance."""


class PCAProjection(HeadProjection):
    """``z = (x - mean) @ U``, ``x_hat = z @ U^T + mean`` with ``U [D, r]`` the top-r eigenvectors."""

    def __init__(self, head_dim: int, rank: int) -> None:
        super().__init__(head_dim, rank)
        # Until fitted, the leading coordinate axes: a valid (if poor) orthonormal basis.
        self.register_buffer("basis", torch.eye(head_dim)[:, :rank].contiguous())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., D] -> z [..., r]``."""
        return (x - self.mean.to(x.dtype)) @ self.basis.to(x.dtype)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., r] -> x_hat [..., D]``."""
        return z @ self.basis.to(z.dtype).T + self.mean.to(z.dtype)

    def init_from_statistics(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        self.mean.copy_(mean.to(self.mean.dtype))
        basis = principal_basis(covariance, self.rank)
        self.basis.copy_(basis.to(self.basis.dtype))
        self.latent_std.copy_(latent_std_of(basis, covariance).to(self.latent_std.dtype))


register_backend("pca", PCAProjection, PCAOptions, trainable=False, weighted_objectives=False)

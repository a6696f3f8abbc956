"""KVSplice backend: learned linear compress/expand per head, with the upstream design's optional latent scale/shift.

``z = softplus(s) * ((x - mean) @ W_c^T) + b`` and ``x_hat = z @ W_e^T + mean``. Trained with Adam
on ``||K - K_hat||^2 + ||V - V_hat||^2``. Initialised from the PCA solution by default: with that
loss a linear autoencoder cannot beat PCA, so the PCA start is already optimal for plain MSE, and
training matters for other objectives and for low-precision latents (where scale/shift help).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvlight.compressors.base import HeadProjection, inverse_softplus, latent_std_of, principal_basis, random_init_
from kvlight.compressors.registry import register_backend
from kvlight.compressors.weighting import weighted_projection

INITS = ("pca", "random")


@dataclass(frozen=True)
class KVSpliceOptions:
    """KVSplice's settings.

    Attributes:
        latent_affine: the upstream design's learned latent scale and shift (between encoder and decoder: they matter once
            latents are stored at low precision, where they act as learned quantization steps).
        init: ``"pca"`` (start from the PCA solution) or ``"random"`` (the upstream design's N(0, 0.02)).
    """

    latent_affine: bool = True
    init: str = "pca"

    def __post_init__(self) -> None:
        if not isinstance(self.latent_affine, bool):
            raise ValueError(f"latent_affine must be true or false, got {self.latent_affine!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be 'pca' or 'random', got {self.init!r}")


class KVSpliceProjection(HeadProjection):
    """Learned ``compress [r, D]`` and ``expand [D, r]`` with an optional latent affine map."""

    learns_steps = True  # the static steps of mixed-width codes train with the projections

    def __init__(self, head_dim: int, rank: int, latent_affine: bool = True, init: str = "pca") -> None:
        super().__init__(head_dim, rank)
        KVSpliceOptions(latent_affine, init)  # checks them
        self.init = init
        self.compress = nn.Parameter(torch.empty(rank, head_dim))
        self.expand = nn.Parameter(torch.empty(head_dim, rank))
        random_init_(self.compress)
        random_init_(self.expand)
        self.latent_affine = latent_affine
        if latent_affine:
            self.latent_scale = nn.Parameter(torch.full((rank,), inverse_softplus(1.0)))
            self.latent_shift = nn.Parameter(torch.zeros(rank))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., D] -> z [..., r]``."""
        z = (x - self.mean.to(x.dtype)) @ self.compress.to(x.dtype).T
        if self.latent_affine:
            z = z * F.softplus(self.latent_scale).to(x.dtype) + self.latent_shift.to(x.dtype)
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., r] -> x_hat [..., D]``."""
        return z @ self.expand.to(z.dtype).T + self.mean.to(z.dtype)

    def init_from_statistics(
        self, mean: torch.Tensor, covariance: torch.Tensor, score_weight: torch.Tensor | None = None
    ) -> None:
        """Centre on the data mean; with ``init='pca'`` also start from the PCA basis (scale 1, shift 0).

        With ``score_weight`` ``W [D, D]`` (see kvlight.compressors.weighting: query-weighted for keys,
        output-projected for values) start instead from the closed-form minimiser of ``E[e^T W e]``.
        """
        with torch.no_grad():
            self.mean.copy_(mean.to(self.mean.dtype))
            if score_weight is not None:
                encoder, decoder, std = weighted_projection(covariance, score_weight, self.rank)
                self.compress.copy_(encoder.to(self.compress.dtype))
                self.expand.copy_(decoder.to(self.expand.dtype))
                self.latent_std.copy_(std.to(self.latent_std.dtype))
                if self.latent_affine:
                    self.latent_scale.fill_(inverse_softplus(1.0))
                    self.latent_shift.zero_()
                return
            if self.init == "pca":
                basis = principal_basis(covariance, self.rank).to(self.compress.dtype)
                self.latent_std.copy_(latent_std_of(basis, covariance).to(self.latent_std.dtype))
                self.compress.copy_(basis.T)
                self.expand.copy_(basis)
                if self.latent_affine:
                    self.latent_scale.fill_(inverse_softplus(1.0))
                    self.latent_shift.zero_()


register_backend("kvsplice", KVSpliceProjection, KVSpliceOptions, trainable=True, weighted_objectives=True)

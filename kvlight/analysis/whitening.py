"""A basis per head in which the model's Fisher is (nearly) white: the "fisher-white" bits weighting.

The principal (PCA) basis orders a head's directions by variance, but the loss reads a K (or V) error ``e`` through
the Fisher ``G = E[g g^T]`` (``g`` the loss gradient of a row, :mod:`kvlight.analysis.sensitivity`): the predicted
loss increase is ``1/2 e^T G e``. Coding each PCA coordinate independently ignores ``G``'s off-diagonal part. The
transform that minimises ``E[e^T W e]`` at any rank is the closed form of :func:`kvlight.compressors.weighting.
weighted_projection` with ``W`` the Fisher: whiten with ``S = W^(1/2)``, take the principal directions ``V`` of
``S C S`` (``C`` the row covariance), encode ``z = V^T S (x - mean)`` and decode ``x_hat = S^-1 V z + mean``.

``W = G + eps * tr(G) / D * I`` (:data:`WHITEN_EPS` ``= 0.3``, scaled to trace ``D``): the Fisher is estimated
from one sampled label per token, so its small eigenvalues are noise, and the ridge keeps the decoder ``S^-1`` from
amplifying coding error along them. Measured on the embedded default (8 x 512-token windows, the protocol of
``shared/anchors/bitalloc.py``, widths allocated by the Fisher of each basis): ppl +1.28 / +18.98 / +112.6 % at
4 / 2 / 1 bits per element in the PCA basis, +1.23 / +13.54 / +81.4 % in this one with ``eps = 0.3`` (``eps =
1e-3``: +2.00 / +14.89 / +84.3 %; ``3e-2``: +1.85 / +15.42 / +83.2 %); most of the gain comes from the keys.

Each whitened coordinate ``z_i`` then gets, like a principal one, a measured distortion ``D_i(b)`` at every width
(:class:`kvlight.analysis.distortion.DistortionMeter`, on the sensitivity pass's rows) and a weight: its Fisher
``f_i = d_i^T G d_i`` (``d_i`` the decoder column, the direction a unit error of ``z_i`` moves the row), so the
allocator prices ``f_i D_i(b) / 2`` (:mod:`kvlight.analysis.bit_allocation`). Serving needs separate encoder and
decoder: KVSplice heads fitted with these ``W`` (:meth:`kvlight.compressors.compressor.KVCompressor.fit_statistics`
with ``key_weights`` / ``value_weights`` from :func:`fisher_weights`), whose latents come in the same order.
"""

from __future__ import annotations

import numpy as np
import torch

from kvlight.analysis.distortion import DistortionMeter
from kvlight.compressors.weighting import weighted_projection
from kvlight.errors import ConfigError

#: the ridge of the whitened Fisher, as a fraction of its mean eigenvalue (best of 1e-3, 3e-2 and 0.3, measured).
WHITEN_EPS = 0.3
KINDS = ("k", "v")


def regularised_fisher(gram: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """``W ~ G + eps * tr(G) / D * I`` for Fishers ``G [..., D, D]`` (float64), scaled to trace ``D``; an all-zero
    ``G`` gives ``I``.

    The scale changes nothing the closed form computes (encoder times ``c^1/2``, decoder times ``c^-1/2``, steps
    along), but it keeps the encoder's entries O(1) like a PCA basis: Adam's steps are absolute, and on an encoder
    scaled by the Fisher's own ``sqrt(G) ~ 1e-3`` they were large enough that KL distillation diverged (measured on
    the embedded default at 12.5 % of fp16 bytes: KL 0.119 -> 0.163 over 48 steps before the scaling).
    """
    gram = gram.double()
    gram = 0.5 * (gram + gram.transpose(-1, -2))  # summed in float64, but keep it exactly symmetric
    dim = gram.shape[-1]
    mean = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    eye = torch.eye(dim, dtype=torch.float64)
    positive = mean > 0
    normalised = torch.where(positive, gram / torch.where(positive, mean, torch.ones_like(mean)), eye)  # trace D
    return (normalised + eps * eye) / (1.0 + eps)


def whitened_transform(
    covariance: torch.Tensor, gram: torch.Tensor, eps: float = WHITEN_EPS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(encoder [D, D], decoder [D, D], std [D])`` of one head: what a KVSplice head fitted with
    :func:`regularised_fisher` ``(gram)`` as its weight computes (latents by descending variance ``std**2``)."""
    dim = covariance.shape[-1]
    return weighted_projection(covariance, regularised_fisher(gram, eps), dim)


def fisher_weights(metrics) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_weights, value_weights)``, each ``[L, H, D, D]`` float64: the regularised Fishers of every head's K and
    V, for ``KVCompressor.fit_statistics`` (the KVSplice fit that serves a "fisher-white" allocation)."""
    if "fgram_k" not in metrics.curves:
        raise ConfigError(
            "--bits-weighting fisher-white needs the K/V Fisher matrices (fgram_k/fgram_v), which these metrics lack; "
            "measure them with kvlight analyze (without --metrics-file) or use --bits-weighting fisher-joint"
        )
    eps = float(metrics.info.get("whiten_eps", WHITEN_EPS))
    return tuple(regularised_fisher(torch.from_numpy(np.asarray(metrics.curves[f"fgram_{k}"])), eps) for k in KINDS)


class WhitenedSample:
    """What the sensitivity pass keeps to price the whitened coordinates: the Fisher ``G`` of every head (all rows)
    and an even sample of centred rows with their gradients (the distortions are measured on it once ``G`` is known).

    Args:
        rows_per_batch: rows kept per batch and (layer, kind), as :class:`DistortionMeter` samples them.
    """

    def __init__(self, rows_per_batch: int = 256) -> None:
        self.rows_per_batch = rows_per_batch
        self.gram: dict = {}  # (layer, kind) -> [H, D, D] float64 sums
        self.rows: dict = {}  # (layer, kind) -> list of [n, H, D] float32
        self.grads: dict = {}

    def add(self, key: tuple[int, str], centred: torch.Tensor, grads: torch.Tensor) -> None:
        """``centred, grads [B, H, T, D]`` (float64): one batch's rows minus the mean, and their loss gradients."""
        gram = torch.einsum("bhtd,bhte->hde", grads, grads).cpu()
        self.gram[key] = self.gram.get(key, 0) + gram
        flat = centred.permute(0, 2, 1, 3).reshape(-1, centred.shape[1], centred.shape[3])  # [N, H, D]
        flat_grads = grads.permute(0, 2, 1, 3).reshape(flat.shape)
        if flat.shape[0] > self.rows_per_batch:  # the rows DistortionMeter samples
            index = torch.linspace(0, flat.shape[0] - 1, self.rows_per_batch, device=flat.device).round().long()
            flat, flat_grads = flat[index], flat_grads[index]
        self.rows.setdefault(key, []).append(flat.float().cpu())
        self.grads.setdefault(key, []).append(flat_grads.float().cpu())

    def curves(self, covariances: dict, predicted: int, num_layers: int, eps: float = WHITEN_EPS) -> dict:
        """``fgram_* [L, H, D, D]`` (Fisher per predicted token), ``wfisher_* [L, H, D]`` and ``wdist_* [L, H, D,
        len(WIDTHS)]`` of the whitened coordinates, for ``kind`` in K and V."""
        out: dict = {}
        for kind in KINDS:
            grams, weights, tables = [], [], []
            for layer in range(num_layers):
                key = (layer, kind)
                gram = self.gram[key] / max(predicted, 1)  # [H, D, D]
                rows, grads = torch.cat(self.rows[key]).double(), torch.cat(self.grads[key]).double()  # [N, H, D]
                heads = [whitened_transform(covariances[key][h], gram[h], eps) for h in range(gram.shape[0])]
                encoder = torch.stack([e for e, _, _ in heads])  # [H, D, D]: latent i of head h is encoder[h, i] . x
                decoder = torch.stack([d for _, d, _ in heads])  # [H, D, D]: its decoder column decoder[h, :, i]
                std = torch.stack([s for _, _, s in heads])  # [H, D]
                coords = torch.einsum("nhd,hid->nhi", rows, encoder)
                latent_grads = torch.einsum("nhd,hdi->nhi", grads, decoder)  # dLoss/dz = decoder^T g
                meter = DistortionMeter({key: std**2}, rows_per_batch=coords.shape[0])
                meter.add(key, coords.permute(1, 0, 2)[None], latent_grads.permute(1, 0, 2)[None])
                grams.append(gram)
                weights.append(torch.einsum("hdi,hde,hei->hi", decoder, gram, decoder))
                tables.append(meter.distortion(key, tuple(std.shape))[0])
            out[f"fgram_{kind}"] = torch.stack(grams).numpy()
            out[f"wfisher_{kind}"] = torch.stack(weights).numpy()
            out[f"wdist_{kind}"] = torch.stack(tables).numpy()
        return out

"""What each principal direction loses at each width: measured distortion and the weights that price it.

For the bits allocator (:mod:`kvlight.analysis.bit_allocation`) every direction ``u_i`` of every head's K (pre-RoPE) or V
needs ``D_i(b)``, the mean squared quantisation error of its coordinate ``c = u_i . (x - mean)`` at each width ``b``
of :data:`kvlight.compressors.widths.WIDTHS`, measured on calibration rows with the quantizer the cache will use (the step of
least error among :data:`kvlight.compressors.statistics.STEP_MULTIPLIERS`, as :meth:`kvlight.compressors.compressor.KVCompressor.calibrate_steps` picks it):
``D_i(0) = E[c^2]`` (the direction dropped), ``D_i(16) = 0`` (kept exactly).

Beside ``D_i(b)`` it keeps ``J_i(b) = E[g_i^2 e_i(b)^2]``, the same errors weighted row by row by the squared loss
gradient ``g_i = dLoss/dc`` (the Fisher's one-sample estimate, :mod:`kvlight.analysis.sensitivity`): ``J_i(b) / 2`` predicts the
loss increase without assuming that a row's error and its gradient are independent (the allocator's "fisher-joint").

It also gives the "query" weights, the closed-form alternative to the Fisher: the energy the model's queries
put on a key direction (``u_i^T W u_i``, ``W`` the RoPE-averaged score weight of
:mod:`kvlight.compressors.weighting`) and the energy the output projection gives a value direction
(``u_i^T M u_i``).
"""

from __future__ import annotations

import torch

from kvlight.compressors.statistics import grid_errors
from kvlight.compressors.widths import CODED_WIDTHS, EXACT, WIDTHS


class DistortionMeter:
    """Running sums of the quantisation error of every principal coordinate at every width, per layer and kind.

    Args:
        variances: ``{(layer, kind): [H, D]}`` the principal variances (the coordinate stds' squares).
        rows_per_batch: coordinates measured per call (an even subsample of the batch's rows): the cost is
            ``len(WIDTHS) x len(STEP_MULTIPLIERS)`` quantisations of each.
    """

    def __init__(self, variances: dict, rows_per_batch: int = 256) -> None:
        self.sigma = {key: value.double().clamp_min(0).sqrt() for key, value in variances.items()}
        self.rows_per_batch = rows_per_batch
        self.grid = {key: {} for key in variances}  # width -> [H * D, G]
        self.joint = {key: {} for key in variances}  # width -> [H * D, G], gradient-weighted
        self.energy = {key: torch.zeros_like(value, dtype=torch.float64).flatten() for key, value in variances.items()}
        self.joint_energy = {key: torch.zeros_like(value) for key, value in self.energy.items()}
        self.count = {key: 0 for key in variances}

    def add(self, key: tuple[int, str], coords: torch.Tensor, gradients: torch.Tensor) -> None:
        """``coords, gradients [B, H, T, D]``: centred coordinates in each head's principal basis and the loss
        gradients with respect to them."""
        flat = coords.detach().permute(0, 2, 1, 3).reshape(-1, coords.shape[1] * coords.shape[3])  # [N, H*D]
        weight = gradients.detach().permute(0, 2, 1, 3).reshape(flat.shape) ** 2
        if flat.shape[0] > self.rows_per_batch:
            index = torch.linspace(0, flat.shape[0] - 1, self.rows_per_batch, device=flat.device).round().long()
            flat, weight = flat[index], weight[index]
        flat, weight = flat.float(), weight.float()
        sigma = self.sigma[key].flatten().to(flat.device)
        center = torch.zeros_like(sigma)
        for width in CODED_WIDTHS:
            errors, joint = grid_errors(flat, center, sigma, width, weights=weight)
            self.grid[key][width] = self.grid[key].get(width, 0) + errors.cpu()
            self.joint[key][width] = self.joint[key].get(width, 0) + joint.cpu()
        self.energy[key] += (flat.double() ** 2).sum(0).cpu()
        self.joint_energy[key] += (flat.double() ** 2 * weight.double()).sum(0).cpu()
        self.count[key] += flat.shape[0]

    def distortion(self, key: tuple[int, str], shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(D, J)``, each ``[H, D, len(WIDTHS)]`` (float64): the mean squared error per direction and width at the
        step of least error, and the mean gradient-weighted squared error at that same step."""
        count = max(self.count[key], 1)
        plain, joint = [], []
        for width in WIDTHS:
            if width == 0:
                plain.append(self.energy[key] / count)
                joint.append(self.joint_energy[key] / count)
            elif width == EXACT:
                plain.append(torch.zeros_like(self.energy[key]))
                joint.append(torch.zeros_like(self.energy[key]))
            else:
                best = self.grid[key][width].argmin(dim=-1, keepdim=True)  # the step the compressor will pick
                plain.append(self.grid[key][width].gather(-1, best).squeeze(-1) / count)
                joint.append(self.joint[key][width].gather(-1, best).squeeze(-1) / count)
        # More bits never lose: a coarser width can measure better than a finer one only by search noise.
        tables = [torch.stack(columns, dim=-1).reshape(*shape, len(WIDTHS)) for columns in (plain, joint)]
        return tuple(torch.cummin(table, dim=-1).values for table in tables)


def direction_energy(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``diag(U^T W U)``: the weight ``W [H, D, D]`` puts on each principal direction (columns of ``U [H, D, D]``)."""
    return torch.einsum("hdi,hde,hei->hi", basis.double(), weight.double(), basis.double())

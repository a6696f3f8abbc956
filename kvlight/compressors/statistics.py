"""What a fit measures on captured rows: float64 moments, and the static steps of width codecs."""

from __future__ import annotations

import torch

from kvlight.compressors.widths import EXACT
from kvlight.errors import ConfigError


class RunningMoments:
    """Float64 sums of rows per head, for means and covariances that add up across batches and ranks.

    Shapes: ``count`` scalar, ``total [H, D]``, ``outer [H, D, D]``.
    """

    def __init__(self, num_heads: int, head_dim: int, device: torch.device | str = "cpu") -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(num_heads, head_dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(num_heads, head_dim, head_dim, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor) -> None:
        """rows ``[N, H, D]`` (any float dtype; accumulated in float64 whatever the training precision)."""
        rows = rows.detach().to(self.total.device, torch.float64)
        self.count += rows.shape[0]
        self.total += rows.sum(0)
        self.outer += torch.einsum("nhd,nhe->hde", rows, rows)

    def tensors(self) -> list[torch.Tensor]:
        """The sums, for an all-reduce across processes."""
        return [self.count, self.total, self.outer]

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean [H, D], covariance [H, D, D])``, centred, float64."""
        n = self.count.clamp_min(1)
        mean = self.total / n
        covariance = self.outer / n - torch.einsum("hd,he->hde", mean, mean)
        return mean, covariance


#: step of the mean-squared-error optimal uniform quantizer with ``2^b`` levels for a unit Gaussian (Max, 1960):
#: the starting point of each channel's step search.
GAUSSIAN_STEP = {1: 1.596, 2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 8: 0.0312}

#: multipliers of the Gaussian step tried per channel; the one with the least squared error on calibration rows wins.
#: Powers of 2^(1/4) from 0.5 to 3.4, 1.0 (the Gaussian step itself) among them: heavy tails want wider steps at
#: high widths (the Gaussian step clips them), light tails narrower ones at low widths.
STEP_MULTIPLIERS = tuple(2.0 ** (k / 4) for k in range(-4, 8))

#: the widest step headroom (:func:`check_headroom`): at 4x the least-error step a 2-bit code spans +-8 sigma.
MAX_STEP_HEADROOM = 4.0


def check_headroom(headroom: float) -> None:
    """Refuse a step headroom (the factor a fit's final steps are widened by) outside ``[1, MAX_STEP_HEADROOM]``.

    Raises:
        ConfigError: not a finite number in that range (below 1 narrows steps past the least squared error, which
            only adds error).
    """
    if isinstance(headroom, bool) or not isinstance(headroom, (int, float)) or not 1.0 <= headroom <= MAX_STEP_HEADROOM:
        raise ConfigError(
            f"step_headroom must be a number from 1 (the least-error steps) to {MAX_STEP_HEADROOM:g} such as 1.3, "
            f"got {headroom!r}"
        )


def levels_of(widths: torch.Tensor) -> torch.Tensor:
    """Largest code ``2^b - 1`` per channel (0 for widths 0 and 16), float32."""
    coded = (widths > 0) & (widths < EXACT)
    return torch.where(coded, 2.0 ** widths.clamp(max=8).float() - 1.0, torch.zeros_like(widths, dtype=torch.float32))


def step_offset(
    center: torch.Tensor, sigma: torch.Tensor, widths: torch.Tensor, multiplier: torch.Tensor | float = 1.0
):
    """Static ``(step, offset)`` per channel: ``2^b`` levels centred on ``center``, ``step = sigma * GAUSSIAN_STEP[b] *
    multiplier``. Dropped channels get ``offset = center``; exact channels ``step = 1, offset = 0``."""
    gaussian = torch.tensor([GAUSSIAN_STEP.get(int(w), 1.0) for w in widths.tolist()], dtype=torch.float64)
    step = sigma.double() * gaussian * torch.as_tensor(multiplier, dtype=torch.float64)
    step = step.clamp_min(1e-12)
    offset = center.double() - step * levels_of(widths).double() / 2
    exact, dropped = widths == EXACT, widths == 0
    step = torch.where(exact | dropped, torch.ones_like(step), step)
    offset = torch.where(exact, torch.zeros_like(offset), torch.where(dropped, center.double(), offset))
    return step.float(), offset.float()


def grid_errors(
    z: torch.Tensor,
    center: torch.Tensor,
    sigma: torch.Tensor,
    width: int,
    chunk: int = 512,
    weights: torch.Tensor | None = None,
):
    """Summed squared quantisation error of ``z [N, C]`` at ``width`` bits for every step in :data:`STEP_MULTIPLIERS`.

    Args:
        z: latents of ``C`` channels (float).
        center, sigma: ``[C]`` each channel's calibration mean and std.
        width: a coded width (1..8).
        weights: optional ``[N, C]`` per-row weights (e.g. squared loss gradients): then also their weighted sums.

    Returns:
        ``[C, G]`` float64 sums over the ``N`` rows (``G = len(STEP_MULTIPLIERS)``); with ``weights``, a pair
        ``(plain, weighted)``.
    """
    multipliers = torch.tensor(STEP_MULTIPLIERS, dtype=torch.float32, device=z.device)
    step = (sigma.float() * GAUSSIAN_STEP[width]).clamp_min(1e-12)[:, None] * multipliers  # [C, G]
    levels = float(2**width - 1)
    offset = center.float()[:, None] - step * levels / 2
    total = torch.zeros(z.shape[1], len(STEP_MULTIPLIERS), dtype=torch.float64, device=z.device)
    weighted = torch.zeros_like(total) if weights is not None else None
    for start in range(0, z.shape[0], chunk):
        x = z[start : start + chunk].float()[:, :, None]  # [n, C, 1]
        code = torch.clamp(torch.round((x - offset) / step), 0.0, levels)
        error = (offset + step * code - x) ** 2
        total += error.sum(0).double()
        if weighted is not None:
            weighted += (error * weights[start : start + chunk].float()[:, :, None]).sum(0).double()
    return total if weighted is None else (total, weighted)


class StepSearch:
    """The search for one codec's static steps: per latent channel, the summed squared error at every multiplier of
    :data:`STEP_MULTIPLIERS` for its width (additive across batches and processes).

    Args:
        widths: ``[R]`` the codec's channel widths; only coded ones (1..8) are searched.
    """

    def __init__(self, widths: torch.Tensor, device: torch.device | str = "cpu") -> None:
        self.widths = widths.to(device)
        self.errors = torch.zeros(widths.numel(), len(STEP_MULTIPLIERS), dtype=torch.float64, device=device)

    def add(self, z: torch.Tensor, center: torch.Tensor, sigma: torch.Tensor) -> None:
        """Latents ``z [N, R]`` with the channels' calibration ``center`` and ``sigma`` (``[R]``)."""
        widths = self.widths.to(z.device)
        for width in widths.unique().tolist():
            if 0 < width < EXACT:
                index = (widths == width).nonzero().squeeze(1)
                sums = grid_errors(z[:, index], center[index], sigma[index], width)
                self.errors[index.to(self.errors.device)] += sums.to(self.errors.device)

    def best_multipliers(self) -> torch.Tensor:
        """``[R]`` float64: the multiplier of least error per channel; 1.0 (the Gaussian step) where nothing was seen."""
        errors = self.errors.cpu()
        best = torch.tensor(STEP_MULTIPLIERS, dtype=torch.float64)[errors.argmin(-1)]
        best[errors.sum(-1) == 0] = 1.0
        return best

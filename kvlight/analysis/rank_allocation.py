"""Per-head ranks from metrics: the upstream design's ``tiers``, a ``budget`` that meets a memory target, and ``uniform``.

Memory is counted as in :meth:`CompressionConfig.memory_reduction`: a head stores ``rank_k + rank_v``
numbers per token instead of ``2 * head_dim`` (exact sink/recent tokens and storage dtype aside).

- ``tiers``: the upstream design's rules, in order: ``trace > trace_critical`` -> uncompressed ("critical");
  ``cond > cond_excellent and trace < trace_moderate`` -> rank 8 ("excellent"); ``cond > cond_good`` ->
  rank 16 ("good"); else rank 32 ("moderate"). Ranks are the upstream design's for head_dim 64, scaled to the
  model's head_dim. K and V share the rank. The memory reduction is whatever the rules give.
- ``budget``: separate K and V ranks (multiples of ``rank_step``) for every head minimising the summed
  predicted loss increase (:mod:`kvlight.analysis.sensitivity`) with exactly ``floor((1 - target) * total / step)``
  rank steps kept in total: the target is met and overshot by less than one rank step. Solved exactly by
  dynamic programming over (head, K|V) items; a head whose K and V both keep ``head_dim`` is left
  uncompressed.
- ``uniform``: one rank everywhere, ``floor((1 - target) * head_dim / step) * step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvlight.analysis.metrics_io import HeadMetrics
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError
from kvlight.geometry import KVGeometry

STRATEGIES = ("budget", "tiers", "uniform")
#: The upstream design's tier ranks, for head_dim 64.
UPSTREAM_TIER_RANKS = {"excellent": 8, "good": 16, "moderate": 32}
UPSTREAM_HEAD_DIM = 64


@dataclass(frozen=True)
class TierThresholds:
    """The upstream design's thresholds (its ``generate_compression_config`` argument names)."""

    trace_critical: float = 0.95
    trace_moderate: float = 0.90
    cond_excellent: float = 1e7
    cond_good: float = 1e6


@dataclass
class Allocation:
    """Ranks chosen for every layer and KV head.

    Attributes:
        strategy: ``budget``, ``tiers`` or ``uniform``.
        geometry: the model's KV geometry.
        rank_k, rank_v: ``[L, H]`` int ranks; ``head_dim`` means kept exactly.
        tier: ``[L, H]`` labels (the upstream design's tiers, or ``compressed``/``uncompressed``).
        target: the requested memory reduction (None for ``tiers``, which has none).
    """

    strategy: str
    geometry: KVGeometry
    rank_k: np.ndarray
    rank_v: np.ndarray
    tier: np.ndarray
    target: float | None = None

    def memory_reduction(self) -> float:
        """Fraction of K/V numbers per token saved."""
        total = 2 * self.geometry.head_dim * self.rank_k.size
        return 1.0 - float(self.rank_k.sum() + self.rank_v.sum()) / total

    def uncompressed(self) -> np.ndarray:
        """``[L, H]`` bool: heads whose K and V are both kept exactly."""
        return (self.rank_k == self.geometry.head_dim) & (self.rank_v == self.geometry.head_dim)

    def to_config(self, algo: str = "kvsplice", sink_tokens: int = 0) -> CompressionConfig:
        """The upstream design's JSON schema, every head listed (valid input for ``kvlight calibrate --config``)."""
        geometry = self.geometry
        config = CompressionConfig(
            target_memory_reduction=round(self.memory_reduction(), 6),
            d_head=geometry.head_dim,
            algo_default=algo,
            num_layers=geometry.num_layers,
            num_kv_heads=geometry.num_kv_heads,
            sink_tokens=sink_tokens,
        )
        uncompressed = self.uncompressed()
        for layer in range(geometry.num_layers):
            for head in range(geometry.num_kv_heads):
                if uncompressed[layer, head]:
                    entry = {"enabled": False, "rank": geometry.head_dim}
                else:
                    rank_k, rank_v = int(self.rank_k[layer, head]), int(self.rank_v[layer, head])
                    entry = {"enabled": True, "algo": algo, "rank_k": rank_k, "rank_v": rank_v}
                config.per_layer_head[(layer, head)] = entry
        return config.validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)


def check_target(target: float) -> float:
    """A memory-reduction target must lie strictly between 0 and 1."""
    if not isinstance(target, (int, float)) or not math.isfinite(target) or not 0.0 < target < 1.0:
        raise ConfigError(f"--target-memory-reduction {target} must be strictly between 0 and 1 (0.5 halves the cache)")
    return float(target)


def check_rank_step(step: int, head_dim: int) -> int:
    """A rank step must divide head_dim."""
    if step < 1 or head_dim % step:
        raise ConfigError(f"--rank-step {step} must be a positive divisor of the head_dim {head_dim}, e.g. 1, 2 or 4")
    return step


def budget_units(geometry: KVGeometry, target: float, step: int) -> int:
    """Rank steps kept in total for ``target``; raises when even rank ``step`` everywhere keeps too much."""
    items = 2 * geometry.num_layers * geometry.num_kv_heads
    units = math.floor((1.0 - check_target(target)) * items * geometry.head_dim / step + 1e-9)
    if units < items:
        smallest = 1.0 - step / geometry.head_dim
        raise ConfigError(
            f"a KV budget of {1 - target:.4g} (target_memory_reduction {target}) cannot be met: at --rank-step {step} "
            f"every K and V keeps at least rank {step}, a budget of at least {1 - smallest:.4f}; raise --kv-budget or "
            "lower the rank step"
        )
    return units


def uniform(geometry: KVGeometry, target: float, step: int = 1) -> Allocation:
    """One rank for every K and V: the largest multiple of ``step`` that meets ``target``."""
    check_rank_step(step, geometry.head_dim)
    budget_units(geometry, target, step)
    rank = max(step, math.floor((1.0 - target) * geometry.head_dim / step + 1e-9) * step)
    shape = (geometry.num_layers, geometry.num_kv_heads)
    ranks = np.full(shape, rank, dtype=np.int64)
    return Allocation("uniform", geometry, ranks, ranks.copy(), _labels(ranks, ranks, geometry.head_dim), target)


def tiers(metrics: HeadMetrics, thresholds: TierThresholds = TierThresholds()) -> Allocation:
    """The upstream design's rules on ``trace`` and ``cond``, its ranks scaled to the model's head_dim."""
    head_dim = metrics.geometry.head_dim
    scaled = {
        name: max(1, min(head_dim, round(r * head_dim / UPSTREAM_HEAD_DIM))) for name, r in UPSTREAM_TIER_RANKS.items()
    }
    trace, cond = metrics.trace, metrics.cond
    critical = trace > thresholds.trace_critical
    excellent = ~critical & (cond > thresholds.cond_excellent) & (trace < thresholds.trace_moderate)
    good = ~critical & ~excellent & (cond > thresholds.cond_good)
    tier = np.where(critical, "critical", np.where(excellent, "excellent", np.where(good, "good", "moderate")))
    ranks = np.select([critical, excellent, good], [head_dim, scaled["excellent"], scaled["good"]], scaled["moderate"])
    ranks = ranks.astype(np.int64)
    return Allocation("tiers", metrics.geometry, ranks, ranks.copy(), tier.astype(object))


def budget(metrics: HeadMetrics, target: float, step: int = 1) -> Allocation:
    """K and V ranks minimising the summed predicted loss with the kept rank steps fixed by ``target``."""
    geometry = metrics.geometry
    if not metrics.has_sensitivity:
        raise ConfigError(
            "strategy budget needs the K/V loss curves, which these metrics lack; run analyze on the model "
            "(without --metrics-file) or import a metrics JSON written by kvlight analyze"
        )
    check_rank_step(step, geometry.head_dim)
    units = budget_units(geometry, target, step)
    choices = np.arange(step, geometry.head_dim + 1, step)  # ranks an item may keep
    # Items in a fixed order: every (layer, head) K, then every (layer, head) V. costs[j, u-1] = loss at rank u*step.
    costs = np.concatenate(
        [metrics.curves[f"loss_{kind}"][..., choices].reshape(-1, len(choices)) for kind in "kv"], axis=0
    )
    picked = _min_cost_exact(costs, units)
    ranks = choices[picked].reshape(2, geometry.num_layers, geometry.num_kv_heads)
    return Allocation("budget", geometry, ranks[0], ranks[1], _labels(ranks[0], ranks[1], geometry.head_dim), target)


def _min_cost_exact(costs: np.ndarray, total: int) -> np.ndarray:
    """Choice ``c_j`` (0-based, worth ``c_j + 1`` units) per item minimising ``sum_j costs[j, c_j]``
    subject to ``sum_j (c_j + 1) == total``: a min-plus dynamic programme, O(items * options * total).

    Args:
        costs: ``[J, M]`` cost of item ``j`` keeping ``m + 1`` units.
        total: units to spend, ``J <= total <= J * M``.

    Returns:
        ``[J]`` int choices.
    """
    items, options = costs.shape
    best = np.full(total + 1, np.inf)
    best[0] = 0.0
    argmin = np.zeros((items, total + 1), dtype=np.int16)
    for j in range(items):
        new = np.full(total + 1, np.inf)
        for m in range(min(options, total)):
            units = m + 1
            candidate = best[: total + 1 - units] + costs[j, m]
            better = candidate < new[units:]
            new[units:][better] = candidate[better]
            argmin[j, units:][better] = m
        best = new
    if not np.isfinite(best[total]):
        raise ConfigError(f"no allocation keeps exactly {total} rank steps; lower the target or the rank step")
    picked = np.zeros(items, dtype=np.int64)
    remaining = total
    for j in range(items - 1, -1, -1):
        picked[j] = argmin[j, remaining]
        remaining -= int(picked[j]) + 1
    return picked


def _labels(rank_k: np.ndarray, rank_v: np.ndarray, head_dim: int) -> np.ndarray:
    exact = (rank_k == head_dim) & (rank_v == head_dim)
    return np.where(exact, "uncompressed", "compressed").astype(object)


def allocate(
    strategy: str,
    metrics: HeadMetrics | None,
    geometry: KVGeometry,
    target: float,
    step: int = 1,
    thresholds: TierThresholds = TierThresholds(),
) -> Allocation:
    """Dispatch on ``strategy`` (see the module docstring)."""
    if strategy == "uniform":
        return uniform(geometry, target, step)
    if metrics is None:
        raise ConfigError(f"strategy {strategy} needs metrics: measure them or pass --metrics-file")
    if strategy == "tiers":
        return tiers(metrics, thresholds)
    if strategy == "budget":
        return budget(metrics, target, step)
    raise ConfigError(f"unknown strategy {strategy!r} (known: {', '.join(STRATEGIES)})")

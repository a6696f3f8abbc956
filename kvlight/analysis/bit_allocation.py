"""Widths per principal direction from the sensitivity metrics: one byte budget over every layer, head, K and V.

Each direction ``i`` (of one head's K, pre-RoPE, or V, in its principal basis) costs ``b_i`` bits per token and
adds ``w_i * D_i(b_i)`` to the predicted loss, with ``D_i(b)`` its measured quantisation error at width ``b``
(:mod:`kvlight.analysis.distortion`) and ``w_i`` its weight:

- ``fisher`` (default): ``w_i = fisher_i / 2``, the diagonal Fisher of the LM loss in that direction
  (:mod:`kvlight.analysis.sensitivity`), so the sum is the second-order estimate of the mean NLL increase per token;
- ``fisher-joint``: the cost is ``J_i(b) / 2`` itself, each row's error weighted by its own squared gradient
  (:mod:`kvlight.analysis.distortion`), the same estimate without assuming errors and gradients independent;
- ``mse``: ``w_i = 1``, plain reconstruction error (a baseline: it ignores that layers differ in scale and use);
- ``query``: keys by the energy the queries put on the direction, values by the output projection's;
- ``fisher-white``: not the principal basis but one in which each head's Fisher is (nearly) white
  (:mod:`kvlight.analysis.whitening`), its coordinates priced like ``fisher``'s; served by KVSplice heads fitted with
  that Fisher as their weight (:func:`kvlight.analysis.whitening.fisher_weights`).

:func:`allocate_bits` minimises the summed cost subject to the budget: every direction's (bits, cost) points are
reduced to their lower convex hull and hull steps are taken across all directions in order of cost saved per bit;
the allocation is the longest prefix of that order whose packed bytes fit. Each prefix is the exact optimum of the
convex relaxation at its own budget; the one chosen meets the budget to within one step (the next step does not
fit), and a larger budget can only take a longer prefix of the same order, so it never predicts a larger loss. The
budget counts what the cache stores per token at long context, packing padding included
(:func:`kvlight.serving.widths.padded_bytes_per_token`): ``target`` is ``1 - stored bytes / fp16 bytes``.

:func:`uniform_bits` is the other baseline: the same widths for every head (the leading directions one width
higher when the average falls between two widths).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvlight.analysis.metrics_io import HeadMetrics
from kvlight.compressors.widths import EXACT, WIDTHS
from kvlight.config import CompressionConfig
from kvlight.errors import ConfigError
from kvlight.geometry import KVGeometry
from kvlight.serving.widths import FIELD_SIZES, FIELDS, padded_bytes_per_token

#: how directions are weighed (see the module docstring); "uniform" ignores the metrics.
WEIGHTINGS = ("fisher", "fisher-joint", "fisher-white", "mse", "query", "uniform")
#: weightings whose directions are not the principal ones: their widths index latents only KVSplice heads fitted
#: with the same Fisher serve.
WHITENED = ("fisher-white",)
KINDS = ("k", "v")


@dataclass
class BitAllocation:
    """Widths of every direction of every layer, KV head, K and V.

    Attributes:
        geometry: the model's KV geometry.
        widths: ``{"k": [L, H, D], "v": [L, H, D]}`` ints from :data:`WIDTHS`.
        weighting: how directions were weighed (:data:`WEIGHTINGS`).
        target: the requested memory reduction.
        key_rope_block: how the keys whose directions these are were coded when the metrics measured them (the
            config's ``key_rope_block``: 1 before RoPE, or one per layer).
    """

    geometry: KVGeometry
    widths: dict[str, np.ndarray]
    weighting: str
    target: float
    key_rope_block: int | list[int] = 1

    def bits_per_element(self, kind: str | None = None) -> float:
        """Mean width over every direction (of ``kind``, or of both)."""
        kinds = KINDS if kind is None else (kind,)
        return float(np.mean([self.widths[k].mean() for k in kinds]))

    def bytes_per_token(self, exact_itemsize: int = 2) -> int:
        """Bytes the cache stores per token at long context (packing padding included)."""
        return padded_bytes_per_token(_codec_widths(self.widths), exact_itemsize)

    def memory_reduction(self) -> float:
        """``1 - stored bytes / fp16 bytes`` per token at long context."""
        return 1.0 - self.bytes_per_token() / fp16_bytes_per_token(self.geometry)

    def predicted_loss(self, metrics: HeadMetrics) -> float | None:
        """Predicted NLL increase (nats per token, second-order Fisher estimate), or None without the curves."""
        if not (metrics.has_sensitivity and metrics.has_distortion):
            return None
        return float(self.head_losses(metrics).sum())

    def head_losses(self, metrics: HeadMetrics) -> np.ndarray:
        """``[L, H]`` predicted NLL increase of each head's K and V at these widths (Fisher estimate, in the basis
        the widths index)."""
        basis = "fisher-white" if self.weighting in WHITENED else "fisher"
        return sum(_costs(metrics, kind, basis, self.widths[kind]).sum(-1) for kind in KINDS)

    def to_config(self, algo: str = "pca", sink_tokens: int = 0, recent_window: int = 0) -> CompressionConfig:
        """A compression config listing ``bits_k`` / ``bits_v`` for every head (input for ``kvlight calibrate``)."""
        geometry = self.geometry
        if self.weighting in WHITENED and algo != "kvsplice":
            raise ConfigError(
                f"{self.weighting} widths index a Fisher-whitened basis that only KVSplice heads serve (separate "
                f"encoder and decoder), not {algo}: use --compressor kvsplice"
            )
        config = CompressionConfig(
            target_memory_reduction=round(max(self.memory_reduction(), 0.0), 6),
            d_head=geometry.head_dim,
            algo_default=algo,
            num_layers=geometry.num_layers,
            num_kv_heads=geometry.num_kv_heads,
            sink_tokens=sink_tokens,
            recent_window=recent_window,
            key_rope_block=self.key_rope_block,
        )
        for layer in range(geometry.num_layers):
            for head in range(geometry.num_kv_heads):
                config.per_layer_head[(layer, head)] = {
                    "enabled": True,
                    "algo": algo,
                    "bits_k": [int(w) for w in self.widths["k"][layer, head]],
                    "bits_v": [int(w) for w in self.widths["v"][layer, head]],
                }
        return config.validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)


def fp16_bytes_per_token(geometry: KVGeometry) -> int:
    """Bytes an fp16 ``DynamicCache`` holds per token: K and V of every layer and KV head."""
    return 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim * 2


def check_bits_target(target: float, geometry: KVGeometry) -> float:
    """A target must lie in (0, 1): 0.875 stores an eighth of an fp16 cache (2 bits per element)."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ConfigError(f"--target-memory-reduction {target!r} must be a number strictly between 0 and 1")
    if not 0.0 < target < 1.0:
        raise ConfigError(
            f"--target-memory-reduction {target} must be strictly between 0 and 1 (0.875 keeps 1/8 of an fp16 cache)"
        )
    return float(target)


def direction_weights(metrics: HeadMetrics, weighting: str) -> dict[str, np.ndarray]:
    """``{"k": [L, H, D], "v": [L, H, D]}`` the weight of every direction's distortion."""
    if weighting == "fisher":
        return {kind: 0.5 * metrics.curves[f"fisher_{kind}"] for kind in KINDS}
    if weighting == "mse":
        return {kind: np.ones_like(metrics.curves[f"fisher_{kind}"]) for kind in KINDS}
    if weighting == "query":
        if "qweight_k" not in metrics.curves:
            raise ConfigError(
                "--bits-weighting query needs the query and output-projection weights, which these metrics lack "
                "(they are measured on models with q_proj/o_proj); use --bits-weighting fisher"
            )
        return {kind: metrics.curves[f"qweight_{kind}"] for kind in KINDS}
    raise ConfigError(f"unknown bits weighting {weighting!r} (known: {', '.join(WEIGHTINGS)})")


def allocate_bits(
    metrics: HeadMetrics, target: float, weighting: str = "fisher", exact_itemsize: int = 2
) -> BitAllocation:
    """Widths minimising the predicted loss within ``target`` (see the module docstring)."""
    geometry = metrics.geometry
    target = check_bits_target(target, geometry)
    block = metrics.info.get("key_rope_block", 1)  # the principal bases of the keys the metrics measured
    if weighting == "uniform":
        return uniform_bits(geometry, target, block)
    if not (metrics.has_sensitivity and metrics.has_distortion):
        raise ConfigError(
            "strategy bits needs the per-width distortions and the K/V Fisher, which these metrics lack; run "
            "kvlight analyze on the model (without --metrics-file) or import a metrics JSON it wrote"
        )
    shape = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
    costs = np.concatenate([_cost_table(metrics, kind, weighting) for kind in KINDS])
    order, steps = _hull_steps(costs)
    allowed = fp16_bytes_per_token(geometry) * (1.0 - target)
    # Item j is direction j % D of head (j // D) % H of layer (j // (H D)) % L, K for the first L H D items, then V;
    # its codec (layer, kind) packs it.
    per_kind = math.prod(shape)
    codec_of = np.arange(costs.shape[0]) // (geometry.num_kv_heads * geometry.head_dim)
    codec_of = (codec_of % geometry.num_layers) * 2 + np.arange(costs.shape[0]) // per_kind
    picked = _walk(order, steps, codec_of, 2 * geometry.num_layers, allowed, exact_itemsize)
    widths = {kind: picked[i * per_kind : (i + 1) * per_kind].reshape(shape) for i, kind in enumerate(KINDS)}
    return BitAllocation(geometry, widths, weighting, target, block)


def uniform_bits(geometry: KVGeometry, target: float, key_rope_block: int | list[int] = 1) -> BitAllocation:
    """The same widths for every head: ``avg = 16 (1 - target)`` bits, the leading directions of every head one width
    higher when ``avg`` falls between two widths, trimmed until the packed bytes fit."""
    target = check_bits_target(target, geometry)
    dim = geometry.head_dim
    allowed = fp16_bytes_per_token(geometry) * (1.0 - target)
    average = min(float(EXACT), EXACT * (1.0 - target))
    low = max(w for w in WIDTHS if w <= average + 1e-9)
    high = min((w for w in WIDTHS if w > low), default=low)
    lead = 0 if high == low else int(math.floor((average - low) / (high - low) * dim + 1e-9))
    shape = (geometry.num_layers, geometry.num_kv_heads, dim)
    while True:
        row = np.array([high] * lead + [low] * (dim - lead), dtype=np.int64)
        widths = {kind: np.broadcast_to(row, shape).copy() for kind in KINDS}
        if padded_bytes_per_token(_codec_widths(widths)) <= allowed or lead == 0:
            break
        lead -= 1
    return BitAllocation(geometry, widths, "uniform", target, key_rope_block)


def _codec_widths(widths: dict[str, np.ndarray]) -> list[list[int]]:
    """One list of channel widths per (layer, kind) codec, as the cache packs them."""
    layers = widths["k"].shape[0]
    return [widths[kind][layer].reshape(-1).tolist() for layer in range(layers) for kind in KINDS]


def _cost_table(metrics: HeadMetrics, kind: str, weighting: str) -> np.ndarray:
    """``[L * H * D, len(WIDTHS)]`` the predicted cost of every direction of ``kind`` at every width."""
    if weighting == "fisher-joint":
        if "jdist_k" not in metrics.curves:
            raise ConfigError(
                "--bits-weighting fisher-joint needs the gradient-weighted distortions (jdist_k/jdist_v), which these "
                "metrics lack; measure them with kvlight analyze or use --bits-weighting fisher"
            )
        table = 0.5 * metrics.curves[f"jdist_{kind}"]
    elif weighting in WHITENED:
        if "wdist_k" not in metrics.curves:
            raise ConfigError(
                "--bits-weighting fisher-white needs the whitened distortions (wdist_k/wdist_v), which these metrics "
                "lack; measure them with kvlight analyze (without --metrics-file) or use --bits-weighting fisher-joint"
            )
        table = 0.5 * metrics.curves[f"wfisher_{kind}"][..., None] * metrics.curves[f"wdist_{kind}"]
    else:
        table = direction_weights(metrics, weighting)[kind][..., None] * metrics.curves[f"dist_{kind}"]
    return table.reshape(-1, len(WIDTHS))


def _costs(metrics: HeadMetrics, kind: str, weighting: str, widths: np.ndarray) -> np.ndarray:
    """``[L, H, D]`` the cost of each direction at its width."""
    table = _cost_table(metrics, kind, weighting).reshape(*widths.shape, len(WIDTHS))
    index = np.searchsorted(np.array(WIDTHS), widths)[..., None]
    return np.take_along_axis(table, index, axis=-1)[..., 0]


def _hull_steps(costs: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Steps along every item's lower convex hull of ``(WIDTHS[j], costs[item, j])``, sorted by cost saved per bit
    (descending; ties by item, then width, so the walk is deterministic).

    Returns ``(order, steps)``: ``steps[s] = (item, from_width, to_width)`` and ``order`` the walking order.
    """
    bits = np.array(WIDTHS, dtype=np.float64)
    steps, slopes = [], []
    costs = np.minimum.accumulate(np.nan_to_num(costs, nan=0.0, posinf=1e300), axis=1)  # more bits never cost more
    for item in range(costs.shape[0]):
        hull: list[int] = [0]
        for j in range(1, len(WIDTHS)):
            # Drop the last hull point while it lies on or above the segment from the one before it to j.
            while len(hull) >= 2:
                a, b = hull[-2], hull[-1]
                left = (costs[item, a] - costs[item, b]) * (bits[j] - bits[b])
                right = (costs[item, b] - costs[item, j]) * (bits[b] - bits[a])
                if left <= right:
                    hull.pop()
                else:
                    break
            hull.append(j)
        for a, b in zip(hull[:-1], hull[1:]):
            steps.append((item, WIDTHS[a], WIDTHS[b]))
            slopes.append((costs[item, a] - costs[item, b]) / (bits[b] - bits[a]))
    slopes_array = np.array(slopes)
    items = np.array([s[0] for s in steps])
    starts = np.array([s[1] for s in steps])
    order = np.lexsort((starts, items, -slopes_array))
    return order, steps


def _walk(
    order: np.ndarray,
    steps: list[tuple[int, int, int]],
    codec_of: np.ndarray,
    codecs: int,
    allowed: float,
    exact_itemsize: int,
) -> np.ndarray:
    """Widths ``[items]`` of the longest prefix of ``order`` whose packed bytes per token stay within ``allowed``.

    The bytes of every prefix are tracked incrementally: per codec, the number of fields of each size (a width's
    fields: kvlight.serving.widths.FIELDS) and of exact channels.
    """
    sizes = {size: i for i, size in enumerate(FIELD_SIZES)}
    counts = np.zeros((codecs, len(FIELD_SIZES) + 1), dtype=np.int64)  # fields per size, then exact channels
    codec_bytes = np.zeros(codecs, dtype=np.int64)
    widths = np.zeros(codec_of.shape[0], dtype=np.int64)
    total, best = 0, 0

    def move(codec: int, width: int, sign: int) -> None:
        if width == EXACT:
            counts[codec, -1] += sign
        elif width:
            for size, _ in FIELDS[width]:
                counts[codec, sizes[size]] += sign

    for position, index in enumerate(order, start=1):
        item, start, stop = steps[index]
        codec = int(codec_of[item])
        move(codec, start, -1)
        move(codec, stop, +1)
        widths[item] = stop
        fields = sum(math.ceil(counts[codec, i] * size / 8) for size, i in sizes.items())
        new = fields + int(counts[codec, -1]) * exact_itemsize
        total += new - int(codec_bytes[codec])
        codec_bytes[codec] = new
        if total <= allowed:
            best = position
    widths[:] = 0
    for index in order[:best]:
        item, _, stop = steps[index]
        widths[item] = stop
    return widths

"""Measure, on calibration windows, how much the frozen model's loss depends on each KV head.

Two passes over the same windows ``[N, T]``:

1. **Statistics** (no grad): mean and covariance of every head's K (pre-RoPE for RoPE models, or relative to the RoPE
   of their block where ``rope_blocks`` says so: the keys a compressor with that ``key_rope_block`` codes) and V,
   the same statistics PCA calibration uses. Their eigen-decomposition gives each head's principal
   directions ``u_i`` and variances ``lambda_i`` (descending): the spectrum.
2. **Sensitivity** (eager attention, autograd): the cache hands attention ``K + dK`` and ``V + dV`` with
   zero ``dK, dV`` that require grad. The loss is the summed NLL of labels *sampled from the model's own
   predictions*, so the gradient ``g_t`` of a token's K (or V) row is a one-sample Monte Carlo estimate of
   the Fisher ``E[g_t g_t^T]`` (the Gauss-Newton curvature of the NLL), not the "empirical" Fisher of the
   data labels. Per head and direction ``i``, with ``c_t = u_i . (x_t - mean)`` and ``gamma_t = u_i . g_t``:

   - ``fisher_i = sum_t gamma_t^2 / n``: the diagonal Fisher in the principal directions;
   - ``loss[r] = 1/2 sum_{i >= r} sum_t c_t^2 gamma_t^2 / n``: the predicted increase of the mean NLL
     per predicted token (nats; ``n`` = predicted tokens) when the head keeps rank ``r``.

   ``loss[r]`` is the second-order estimate ``1/2 d^T F d`` of dropping directions ``r..D-1`` (``d`` the
   truncation error), i.e. of the mean ``KL(p_model || p_compressed)`` per token: the expected NLL increase
   when text follows the model's own distribution. It keeps the diagonal of ``F`` in the principal basis
   and ignores couplings between tokens, heads and K/V (on the tiny test models it lands within a factor
   of ~2 of the measured KL). It equals ``1/2 sum_{i >= r} lambda_i fisher_i`` if a token's displacement
   and its sensitivity were independent; the joint sum is kept because they are not (attention-sink
   tokens have both large, atypical keys and large gradients). Positions below ``sink_tokens`` (kept
   exact by the cache) are left out of both sums.

The pass also sums each head's Fisher matrix ``G = sum_t g_t g_t^T / n`` (``fgram_*``, original coordinates) and keeps
an even sample of rows and gradients, on which the coordinates of the Fisher-whitened basis get their distortions
and weights (``wdist_*``, ``wfisher_*``: :mod:`kvlight.analysis.whitening`).

The same pass also returns the attention probabilities and accumulates the upstream design's attention Fisher
``F = mean_{b,i}(diag(p_i) - p_i p_i^T)`` over the first ``attention_tokens`` positions (causal
attention makes that prefix exact). Query heads sharing a KV head (GQA) are averaged into it. Metrics:
``trace = tr F = mean(1 - sum_j p_ij^2)``, ``eigmax``, and ``cond = eigmax / lambda_min``, where
``lambda_min`` is the smallest eigenvalue on the subspace orthogonal to the all-ones vector: every row
of ``F`` sums to zero, so ``F 1 = 0`` always and the upstream design's ``eigmax / |eigmin|`` only measured that
null direction. ``lambda_min`` is floored at ``1e-12 * eigmax`` (float64 round-off), so ``cond <= 1e12``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kvlight.analysis.distortion import DistortionMeter, direction_energy
from kvlight.analysis.metrics_io import HeadMetrics
from kvlight.analysis.queries import QueryMoments, score_weights
from kvlight.analysis.whitening import WHITEN_EPS, WhitenedSample
from kvlight.compressors.statistics import RunningMoments
from kvlight.compressors.weighting import output_weights
from kvlight.config.compression import key_rope_block_of
from kvlight.errors import CaptureError, KVLightError
from kvlight.geometry import KVGeometry
from kvlight.hf import cache_kwargs
from kvlight.models import output_projections
from kvlight.serving.capture_cache import CaptureCache
from kvlight.serving.positions import PositionTracker

KINDS = ("k", "v")
COND_FLOOR = 1e-12


def attention_fisher_metrics(fisher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(trace, eigmax, cond)`` of attention Fishers ``[..., T, T]`` (symmetric PSD, rows summing to 0).

    The all-ones null direction is shifted above the spectrum by adding ``s * 11^T / T`` with ``s`` larger
    than any eigenvalue, so the remaining eigenvalues are those on the subspace orthogonal to it.
    """
    fisher = fisher.double()
    size = fisher.shape[-1]
    trace = fisher.diagonal(dim1=-2, dim2=-1).sum(-1)
    if size < 2:
        zeros = torch.zeros_like(trace)
        return trace, zeros, torch.ones_like(trace)
    shift = (trace + 1.0)[..., None, None]  # > eigmax, since eigmax <= trace for a PSD matrix
    eigenvalues = torch.linalg.eigvalsh(fisher + shift * torch.full_like(fisher, 1.0 / size))  # ascending
    eigmax = eigenvalues[..., -2]  # the largest one is the shifted all-ones direction
    smallest = eigenvalues[..., 0].clamp_min(0.0)
    cond = eigmax / torch.maximum(smallest, eigmax * COND_FLOOR).clamp_min(torch.finfo(torch.float64).tiny)
    return trace, eigmax, cond


class AttentionFisher:
    """Running sums of ``diag(p_i) - p_i p_i^T`` per layer and KV head over the first ``tokens`` positions."""

    def __init__(self, num_layers: int, num_kv_heads: int, tokens: int) -> None:
        self.num_kv_heads, self.tokens = num_kv_heads, tokens
        self.diagonal = torch.zeros(num_layers, num_kv_heads, tokens, dtype=torch.float64)
        self.outer = torch.zeros(num_layers, num_kv_heads, tokens, tokens, dtype=torch.float64)
        self.count = 0.0

    def add(self, layer: int, probs: torch.Tensor) -> None:
        """Attention probabilities ``[B, H_q, T, T]`` of one layer (query heads grouped by KV head, GQA)."""
        p = probs[:, :, : self.tokens, : self.tokens].detach().double()
        batch, heads, rows, _ = p.shape
        group = heads // self.num_kv_heads
        p = p.reshape(batch, self.num_kv_heads, group, rows, rows)
        self.diagonal[layer] += p.sum(dim=(0, 2, 3))
        self.outer[layer] += torch.einsum("bhgit,bhgis->hts", p, p)
        if layer == 0:
            self.count += batch * group * rows

    def metrics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(trace, eigmax, cond)``, each ``[L, H]``."""
        count = max(self.count, 1.0)
        fisher = torch.diag_embed(self.diagonal / count) - self.outer / count
        return attention_fisher_metrics(fisher)


class KVSensitivity:
    """Per-direction sums ``sum_t gamma_t^2`` and ``sum_t c_t^2 gamma_t^2`` for every layer, kind and head."""

    def __init__(
        self,
        means: dict,
        bases: dict,
        sink_tokens: int,
        distortion: DistortionMeter | None = None,
        whitened: WhitenedSample | None = None,
    ) -> None:
        self.means, self.bases, self.sink_tokens = means, bases, sink_tokens
        self.distortion, self.whitened = distortion, whitened
        self.fisher = {key: torch.zeros_like(mean) for key, mean in means.items()}  # [H, D]
        self.joint = {key: torch.zeros_like(mean) for key, mean in means.items()}

    def add(self, layer: int, kind: str, rows: torch.Tensor, grads: torch.Tensor) -> None:
        """``rows, grads [B, H, T, D]``: one layer's K (or V) and the loss gradient with respect to it."""
        mean, basis = self.means[(layer, kind)], self.bases[(layer, kind)]  # [H, D], [H, D, D]
        rows, grads = rows[:, :, self.sink_tokens :].double(), grads[:, :, self.sink_tokens :].double()
        centred = rows - mean[None, :, None]
        coords = torch.einsum("bhtd,hde->bhte", centred, basis)
        gamma = torch.einsum("bhtd,hde->bhte", grads, basis)
        self.fisher[(layer, kind)] += (gamma * gamma).sum(dim=(0, 2))
        self.joint[(layer, kind)] += (coords * coords * gamma * gamma).sum(dim=(0, 2))
        if self.distortion is not None:
            self.distortion.add((layer, kind), coords, gamma)
        if self.whitened is not None:
            self.whitened.add((layer, kind), centred, grads)


def _batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [windows[i : i + batch_size] for i in range(0, windows.shape[0], batch_size)]


@torch.no_grad()
def principal_statistics(
    model: nn.Module,
    geometry: KVGeometry,
    windows: torch.Tensor,
    batch_size: int = 2,
    progress: bool = True,
    queries: QueryMoments | None = None,
    rope_blocks: Sequence[int] = (),
) -> tuple[dict, dict, dict]:
    """Pass 1: ``(means, bases, variances)`` keyed ``(layer, kind)``: ``[H, D]``, ``[H, D, D]``, ``[H, D]``.

    ``bases[...][h]`` holds head ``h``'s principal directions as columns, by descending variance. With ``queries``,
    the pass also sums the pre-RoPE query moments into it.
    """
    moments = {
        (layer, kind): RunningMoments(geometry.num_kv_heads, geometry.head_dim)
        for layer in range(geometry.num_layers)
        for kind in KINDS
    }
    tracker = PositionTracker(model) if geometry.rope else None
    device = next(model.parameters()).device

    def keep(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        for kind, rows in (("k", keys), ("v", values)):  # [B, H, T, D] -> [B*T, H, D]
            moments[(layer, kind)].add(rows.transpose(1, 2).reshape(-1, rows.shape[1], rows.shape[-1]))

    handles = [] if queries is None else queries.attach(model)
    try:
        for batch in tqdm(_batches(windows, batch_size), desc="K/V statistics", disable=not progress, leave=False):
            cache = CaptureCache(geometry.num_layers, keep, tracker, rope_blocks)
            model(input_ids=batch.to(device), **cache_kwargs(cache))
    finally:
        for handle in handles:
            handle.remove()
        if tracker is not None:
            tracker.close()
    means, bases, variances = {}, {}, {}
    for key, running in moments.items():
        mean, covariance = running.mean_and_covariance()
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
        means[key], bases[key], variances[key] = mean, eigenvectors.flip(-1), eigenvalues.flip(-1).clamp_min(0.0)
    return means, bases, variances


def measure_sensitivity(
    model: nn.Module,
    geometry: KVGeometry,
    windows: torch.Tensor,
    batch_size: int = 2,
    attention_tokens: int = 256,
    sink_tokens: int = 0,
    seed: int = 0,
    progress: bool = True,
    rope_blocks: Sequence[int] = (),
) -> HeadMetrics:
    """Both passes over ``windows [N, T]`` (see the module docstring); returns every metric per layer and KV head.

    ``rope_blocks``: per layer, the RoPE block its keys are measured relative to (what a compressor with that
    ``key_rope_block`` codes; the gradients are then taken with respect to those keys); empty: 1, pre-RoPE."""
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"need windows [N >= 1, T >= 2], got {tuple(windows.shape)}")
    rope_blocks = tuple(rope_blocks) or (1,) * geometry.num_layers
    queries = QueryMoments(geometry)  # captured where attention reads them: every served family has queries
    means, bases, variances = principal_statistics(model, geometry, windows, batch_size, progress, queries, rope_blocks)
    sensitivity = KVSensitivity(means, bases, sink_tokens, DistortionMeter(variances), WhitenedSample())
    attention = AttentionFisher(geometry.num_layers, geometry.num_kv_heads, min(attention_tokens, windows.shape[1]))
    generator = torch.Generator().manual_seed(seed)
    predicted = 0
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the only implementation that returns attention probabilities
    tracker = PositionTracker(model) if geometry.rope else None
    device = next(model.parameters()).device
    try:
        for batch in tqdm(_batches(windows, batch_size), desc="K/V sensitivity", disable=not progress, leave=False):
            _sensitivity_step(
                model, geometry, batch.to(device), tracker, sensitivity, attention, generator, rope_blocks
            )
            predicted += batch.shape[0] * (batch.shape[1] - 1)
    finally:
        if tracker is not None:
            tracker.close()
        model.set_attn_implementation(previous)
    trace, eigmax, cond = attention.metrics()
    curves = {}
    for kind in KINDS:
        joint = _stack(sensitivity.joint, kind, geometry) / predicted
        tail = joint.flip(-1).cumsum(-1).flip(-1)  # [L, H, D]: sum over i >= r
        curves[f"eig_{kind}"] = _stack(variances, kind, geometry).numpy()
        curves[f"fisher_{kind}"] = (_stack(sensitivity.fisher, kind, geometry) / predicted).numpy()
        curves[f"loss_{kind}"] = torch.cat([0.5 * tail, torch.zeros_like(tail[..., :1])], dim=-1).numpy()
        shape = (geometry.num_kv_heads, geometry.head_dim)
        tables = [sensitivity.distortion.distortion((layer, kind), shape) for layer in range(geometry.num_layers)]
        curves[f"dist_{kind}"] = torch.stack([plain for plain, _ in tables]).numpy()
        # The joint curve is per predicted token like fisher_* (rows were subsampled evenly, so their mean stands in).
        curves[f"jdist_{kind}"] = torch.stack([joint for _, joint in tables]).numpy()
    covariances = {key: torch.einsum("hdi,hi,hei->hde", bases[key], variances[key], bases[key]) for key in bases}
    curves.update(sensitivity.whitened.curves(covariances, predicted, geometry.num_layers, WHITEN_EPS))
    if queries is not None:
        curves.update(_query_weights(model, geometry, queries, bases, windows.shape[1]))
    info = {
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "predicted_tokens": predicted,
        "attention_tokens": attention.tokens,
        "sink_tokens": sink_tokens,
        "seed": seed,
        "key_rope_block": key_rope_block_of(rope_blocks),
        "whiten_eps": WHITEN_EPS,
        "loss_unit": "nats per predicted token (second-order, diagonal in each head's principal basis)",
        "cond": "eigmax / smallest eigenvalue orthogonal to the all-ones null direction, floored at 1e-12 eigmax",
    }
    return HeadMetrics(geometry, trace.numpy(), eigmax.numpy(), cond.numpy(), curves, info)


def _query_weights(model, geometry: KVGeometry, queries: QueryMoments, bases: dict, window: int) -> dict:
    """``qweight_k`` / ``qweight_v`` ``[L, H, D]``: the energy the queries (RoPE-averaged over distances up to
    ``window``) put on each key direction, and the output projection on each value direction."""
    score = score_weights(model, queries.mean(), window)  # [L, H, D, D], the model's own rotary layout and scale
    try:
        output = output_weights(output_projections(model), geometry.num_kv_heads, geometry.head_dim)
    except KVLightError:
        return {}
    weights = {"k": score, "v": output}
    return {
        f"qweight_{kind}": torch.stack(
            [direction_energy(weights[kind][layer], bases[(layer, kind)]) for layer in range(geometry.num_layers)]
        ).numpy()
        for kind in KINDS
    }


def _stack(table: dict, kind: str, geometry: KVGeometry) -> torch.Tensor:
    """``[L, H, ...]`` from per-``(layer, kind)`` entries."""
    return torch.stack([table[(layer, kind)] for layer in range(geometry.num_layers)])


def _sensitivity_step(model, geometry, batch, tracker, sensitivity, attention, generator, rope_blocks) -> None:
    """One forward/backward of ``batch [B, T]`` through zero K/V perturbations; adds to both accumulators."""
    captured: dict[int, tuple[torch.Tensor, ...]] = {}

    def perturb(layer: int, keys: torch.Tensor, values: torch.Tensor):
        delta_k = torch.zeros_like(keys, requires_grad=True)
        delta_v = torch.zeros_like(values, requires_grad=True)
        captured[layer] = (keys.detach(), values.detach(), delta_k, delta_v)
        return keys + delta_k, values + delta_v

    with torch.enable_grad():
        cache = CaptureCache(geometry.num_layers, perturb, tracker, rope_blocks)
        out = model(input_ids=batch, output_attentions=True, **cache_kwargs(cache))
        logits = out.logits[:, :-1].float()
        with torch.no_grad():
            probs = torch.softmax(logits.flatten(0, 1), dim=-1)
            labels = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
            del probs
        loss = F.cross_entropy(logits.flatten(0, 1), labels, reduction="sum")
        deltas = [t for layer in range(geometry.num_layers) for t in captured[layer][2:]]
        if not math.isfinite(float(loss.detach())):
            raise CaptureError("the model's loss is not finite on the calibration text; try float32 or other text")
        grads = torch.autograd.grad(loss, deltas)
    for layer in range(geometry.num_layers):
        keys, values = captured[layer][:2]
        sensitivity.add(layer, "k", keys, grads[2 * layer])
        sensitivity.add(layer, "v", values, grads[2 * layer + 1])
        attention.add(layer, out.attentions[layer])

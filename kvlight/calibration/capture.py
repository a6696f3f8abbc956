"""The capture pass (the first phase of the upstream design's calibration): run the frozen model once over calibration
windows and keep K/V rows on disk.

Rows are keys (pre-RoPE, or relative to the RoPE of their block where the compressor's ``key_rope_block`` says so)
and values, ``[N, L, H, D]``, a uniform reservoir sample of tokens (at
most ``max_samples_per_head`` per head), written as checksummed shards that later fits reuse.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from kvlight.analysis.queries import QueryMoments
from kvlight.calibration.reservoir import KVReservoir
from kvlight.calibration.shards import load_manifest, write_shards
from kvlight.errors import CaptureError
from kvlight.files import atomic_write_bytes
from kvlight.geometry import KVGeometry
from kvlight.hf import cache_kwargs
from kvlight.serving.capture_cache import CaptureCache
from kvlight.serving.positions import PositionTracker

ROWS_PER_SHARD = 2048


def check_finite(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Stop on NaN/inf in captured ``[N, H, D]`` rows, naming the layer and head."""
    for name, rows in (("K", keys), ("V", values)):
        bad = ~torch.isfinite(rows).all(dim=-1).all(dim=0)  # [H]
        if bad.any():
            head = int(bad.nonzero()[0])
            raise CaptureError(
                f"captured {name} of layer {layer}, KV head {head} contains NaN or inf; "
                "the model produces non-finite activations on this data (try float32 or other text)"
            )


@torch.no_grad()
def capture_kv(
    model: nn.Module,
    geometry: KVGeometry,
    windows: Iterable[torch.Tensor],
    capacity: int,
    seed: int = 0,
    progress: bool = True,
    queries: QueryMoments | None = None,
    rope_blocks: Sequence[int] = (),
) -> KVReservoir:
    """Run ``model`` over batches of token windows ``[B, T]`` and reservoir-sample their K/V rows (keys coded as
    ``rope_blocks`` says per layer, pre-RoPE by default: see :class:`~kvlight.serving.capture_cache.CaptureCache`).

    ``windows`` may be any iterable, a generator over a stream included: it is consumed lazily and memory stays
    bounded by ``capacity`` rows whatever the number of tokens. With ``queries``, the same pass also sums the
    query second moments (for query-weighted keys).
    """
    reservoir = KVReservoir(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, capacity, seed)
    tracker = PositionTracker(model) if geometry.rope else None
    device = next(model.parameters()).device
    handles = [] if queries is None else queries.attach(model)
    try:
        # Batches are pulled one at a time (never list()-ed): a streamed source stays a stream.
        total = len(windows) if hasattr(windows, "__len__") else None
        for batch in tqdm(windows, total=total, desc="capture K/V", disable=not progress, leave=False):
            batch = batch.to(device)
            token_index, slot = reservoir.plan(batch.numel())

            def keep(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
                # [B, H, T, D] -> [B*T, H, D], token order matching the flattened batch.
                keys = keys.transpose(1, 2).reshape(-1, *keys.shape[1:2], keys.shape[-1])
                values = values.transpose(1, 2).reshape(-1, *values.shape[1:2], values.shape[-1])
                check_finite(layer, keys, values)
                reservoir.put(layer, keys, values, token_index, slot)

            cache = CaptureCache(geometry.num_layers, keep, tracker, rope_blocks)
            model(input_ids=batch, **cache_kwargs(cache))
    finally:
        for handle in handles:
            handle.remove()
        if tracker is not None:
            tracker.close()
    return reservoir


#: file next to the shards holding the query moments of the same pass: {"sums": [L, H, D, D] float64, "count": int}.
QUERY_FILE = "query_moments.pt"


def load_query_moments(directory: Path) -> dict | None:
    """What :func:`capture_to_shards` saved with ``queries=True``, or None when absent or unreadable."""
    path = Path(directory) / QUERY_FILE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # damaged: captured again
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("sums"), torch.Tensor) or "count" not in saved:
        return None
    return saved


@dataclass(frozen=True)
class CapturePlan:
    """How :func:`capture_to_shards` captures.

    Attributes:
        capacity: most rows kept (a uniform reservoir over the windows' tokens).
        batch_size: windows per forward pass.
        seed: seed of the reservoir and of the rows' order on disk.
        meta: recorded in the manifest (which process, which windows).
        reuse: reuse an intact capture in the directory.
        queries: also sum the query moments (query-weighted keys need them).
        rope_blocks: per layer, the RoPE block its keys are captured relative to (empty: 1, pre-RoPE).
    """

    capacity: int
    batch_size: int = 4
    seed: int = 0
    meta: dict | None = None
    reuse: bool = True
    queries: bool = False
    rope_blocks: tuple[int, ...] = ()


def capture_to_shards(
    model: nn.Module, geometry: KVGeometry, windows: torch.Tensor, directory: Path, plan: CapturePlan
) -> dict:
    """Reuse the intact capture in ``directory`` (unless ``plan.reuse`` is False) or make it; returns the manifest.

    With ``plan.queries`` the same pass also sums query second moments, saved to :data:`QUERY_FILE` before the
    manifest (the manifest marks a complete capture); a capture without them is not reused.
    """
    capacity, batch_size, seed, meta, reuse, queries = (
        plan.capacity, plan.batch_size, plan.seed, plan.meta, plan.reuse, plan.queries
    )  # fmt: skip
    manifest = load_manifest(directory) if reuse else None
    if manifest is not None and (not queries or load_query_moments(directory) is not None):
        return manifest
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    moments = QueryMoments(geometry) if queries else None
    reservoir = capture_kv(model, geometry, batches, capacity, seed, queries=moments, rope_blocks=plan.rope_blocks)
    if moments is not None:
        buffer = io.BytesIO()
        torch.save({"sums": moments.sums, "count": moments.count}, buffer)
        atomic_write_bytes(Path(directory) / QUERY_FILE, buffer.getvalue())
    keys, values = reservoir.rows()
    order = torch.randperm(keys.shape[0], generator=torch.Generator().manual_seed(seed))
    info = {"geometry": geometry.to_dict(), "tokens_seen": reservoir.num_seen, **(meta or {})}
    return write_shards(directory, keys[order], values[order], ROWS_PER_SHARD, info)

"""The per-head metrics table behind ``kvlight analyze``: container, checks, JSON/CSV out and in, W&B import.

One row per layer and KV head. The scalar columns keep the upstream design's names (``trace``, ``eigmax``,
``cond`` of the attention Fisher); kvlight adds per-direction arrays for K and V (variance, diagonal
Fisher, predicted loss per rank; see :mod:`kvlight.analysis.sensitivity`). Imports accept:

- CSV, wide: ``layer, head, trace, cond`` (``eigmax`` and other columns optional), one row per head;
- CSV, tall (the upstream design's export): ``layer, head, metric, value`` (+ ``run_name``), ``layer0``/``head3`` labels;
- JSON: what :func:`metrics_to_json` writes, a list of wide rows, or the upstream design's W&B export
  (runs with ``summary_metrics`` keyed ``fisher/layerL/headH/metric``).

Every problem is a one-line :class:`MetricsError`, raised before anything is written.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvlight.compressors.widths import WIDTHS
from kvlight.errors import MetricsError
from kvlight.geometry import KVGeometry

#: Scalar metrics of the upstream design, in its column order; the tiers rule reads ``trace`` and ``cond``.
UPSTREAM_METRICS = ("trace", "eigmax", "cond")
REQUIRED_COLUMNS = ("layer", "head", "trace", "cond")
#: Per-direction arrays: ``eig_*`` and ``fisher_*`` are ``[D]``, ``loss_*`` is ``[D + 1]`` (rank 0..D).
CURVES = ("eig_k", "eig_v", "fisher_k", "fisher_v", "loss_k", "loss_v")
#: Optional per-direction arrays, in pairs (K and V): ``dist_*`` ``[D, len(WIDTHS)]`` the measured quantisation error
#: of each direction at each width (kvlight.analysis.distortion; the bits allocator needs them), ``jdist_*`` (the same,
#: weighted row by row by the squared loss gradient: the "fisher-joint" weighting) and ``qweight_*`` ``[D]`` the
#: query / output-projection energy of each direction (the allocator's "query" weighting). The "fisher-white"
#: weighting (kvlight.analysis.whitening) reads ``fgram_*`` ``[D, D]`` (each head's K/V Fisher matrix), ``wdist_*``
#: ``[D, len(WIDTHS)]`` and ``wfisher_*`` ``[D]`` (distortion and Fisher of the whitened coordinates).
OPTIONAL_CURVES = (
    ("dist_k", "dist_v"),
    ("jdist_k", "jdist_v"),
    ("qweight_k", "qweight_v"),
    ("fgram_k", "fgram_v"),
    ("wdist_k", "wdist_v"),
    ("wfisher_k", "wfisher_v"),
)
FORMAT = "kvlight-metrics/1"
_UPSTREAM_KEY = re.compile(r"^fisher/layer(\d+)/head(\d+)/(\w+)$")


@dataclass
class HeadMetrics:
    """Metrics of every layer and KV head of one model (float64 numpy arrays).

    Attributes:
        geometry: the model's KV geometry (``L`` layers, ``H`` KV heads, head_dim ``D``).
        trace, eigmax, cond: ``[L, H]`` attention-Fisher metrics; NaN where not measured (eigmax may be).
        curves: ``{name: array}`` for the names in :data:`CURVES`, ``[L, H, D]`` or ``[L, H, D + 1]``;
            empty when the metrics were imported without them.
        info: provenance (model, text, token counts, approximations used).
    """

    geometry: KVGeometry
    trace: np.ndarray
    eigmax: np.ndarray
    cond: np.ndarray
    curves: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def has_sensitivity(self) -> bool:
        """True when the K/V loss curves are known (needed by the ``budget`` strategy)."""
        return "loss_k" in self.curves and "loss_v" in self.curves

    @property
    def has_distortion(self) -> bool:
        """True when the per-width distortions are known (needed by the ``bits`` strategy)."""
        return "dist_k" in self.curves and "dist_v" in self.curves

    def energy(self, kind: str) -> np.ndarray:
        """``[L, H, D + 1]`` share of the centred K or V energy kept at rank ``r = 0..D``."""
        eig = np.clip(self.curves[f"eig_{kind}"], 0.0, None)
        kept = np.concatenate([np.zeros(eig.shape[:-1] + (1,)), np.cumsum(eig, axis=-1)], axis=-1)
        return kept / np.maximum(kept[..., -1:], 1e-300)

    def predicted_loss(self, rank_k: np.ndarray, rank_v: np.ndarray) -> float:
        """Summed predicted NLL increase (nats per token) of ranks ``[L, H]`` (rank ``D`` costs nothing)."""
        total = 0.0
        for kind, ranks in (("k", rank_k), ("v", rank_v)):
            index = np.asarray(ranks, dtype=np.int64)[..., None]
            total += float(np.take_along_axis(self.curves[f"loss_{kind}"], index, axis=-1).sum())
        return total


# ---------------------------------------------------------------------- export
def metrics_to_json(metrics: HeadMetrics) -> str:
    """Every metric, arrays included, as JSON text (re-importable with :func:`read_metrics_file`)."""
    heads = []
    for layer, head in _heads(metrics.geometry):
        row: dict[str, Any] = {"layer": layer, "head": head}
        for name in UPSTREAM_METRICS:
            row[name] = _json_float(getattr(metrics, name)[layer, head])
        for name, array in metrics.curves.items():
            values = array[layer, head]
            row[name] = (
                [_json_float(x) for x in values]
                if values.ndim == 1
                else [[_json_float(x) for x in line] for line in values]
            )
        heads.append(row)
    # One line per head: the per-direction arrays stay readable and the file small.
    header = {"format": FORMAT, "geometry": metrics.geometry.to_dict(), "info": metrics.info}
    rows = ",\n  ".join(json.dumps(row, separators=(",", ":")) for row in heads)
    return json.dumps(header, indent=1)[:-2] + ',\n "heads": [\n  ' + rows + "\n ]\n}\n"


def summary_ranks(head_dim: int) -> list[int]:
    """The ranks the CSV reports energy and predicted loss at: ``D/8, D/4, D/2``."""
    return sorted({max(1, head_dim // 8), max(1, head_dim // 4), max(1, head_dim // 2)})


def metrics_to_csv(metrics: HeadMetrics) -> str:
    """One wide row per head: the upstream design's metrics, K/V Fisher traces, energy and predicted loss at a few ranks."""
    ranks = summary_ranks(metrics.geometry.head_dim)
    columns = ["layer", "head", *UPSTREAM_METRICS]
    if metrics.has_sensitivity:
        columns += ["k_fisher", "v_fisher"]
        columns += [f"{kind}_{what}_r{r}" for r in ranks for what in ("energy", "loss") for kind in "kv"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for layer, head in _heads(metrics.geometry):
        row: list[Any] = [layer, head, *(f"{getattr(metrics, n)[layer, head]:.6g}" for n in UPSTREAM_METRICS)]
        if metrics.has_sensitivity:
            row += [f"{metrics.curves[f'fisher_{k}'][layer, head].sum():.6g}" for k in "kv"]
            energy = {k: metrics.energy(k)[layer, head] for k in "kv"}
            for r in ranks:
                row += [f"{energy[k][r]:.6g}" for k in "kv"]
                row += [f"{metrics.curves[f'loss_{k}'][layer, head, r]:.6g}" for k in "kv"]
        writer.writerow(row)
    return buffer.getvalue()


# ---------------------------------------------------------------------- import
def read_metrics_file(path: str | Path, geometry: KVGeometry, run_name: str | None = None) -> HeadMetrics:
    """Metrics from a CSV or JSON file, checked against ``geometry`` (every layer and KV head, no NaN)."""
    path = Path(path)
    where = f"metrics file {str(path)!r}"
    try:
        text = path.read_text()
    except OSError as exc:
        raise MetricsError(f"cannot read {where}: {exc.strerror or exc}; pass an existing CSV or JSON file") from None
    except UnicodeDecodeError:
        raise MetricsError(f"{where} is not text; pass a CSV or JSON file") from None
    if path.suffix.lower() == ".csv":
        try:
            return _from_csv(text, geometry, where, run_name)
        except csv.Error as exc:  # e.g. a field beyond the csv module's size limit
            raise MetricsError(f"{where} is not a readable CSV file: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MetricsError(f"{where} is not valid JSON: {exc}") from None
        except ValueError:  # an integer beyond Python's 4300-digit conversion limit: no metric takes one
            raise MetricsError(f"{where} holds an integer too long to be a metric") from None
        except RecursionError:
            raise MetricsError(f"{where} is nested too deeply to be a metrics file") from None
        return metrics_from_json_data(data, geometry, where, run_name)
    raise MetricsError(f"{where} must end in .csv or .json")


def metrics_from_json_data(data: Any, geometry: KVGeometry, where: str, run_name: str | None = None) -> HeadMetrics:
    """Metrics from parsed JSON: kvlight's own format, a list of wide rows, or the upstream design's W&B export."""
    if isinstance(data, dict) and data.get("format") == FORMAT:
        rows = data.get("heads")
        if not isinstance(rows, list):
            raise MetricsError(f"{where}: 'heads' must be a list of per-head objects")
        return metrics_from_rows(rows, geometry, where, info=dict(data.get("info") or {}))
    if isinstance(data, list) and data and all(isinstance(r, dict) and "summary_metrics" in r for r in data):
        runs = {_run_label(r): r["summary_metrics"] for r in data}
        return metrics_from_rows(_upstream_summary_rows(runs, where, run_name), geometry, where)
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return metrics_from_rows(data, geometry, where)
    raise MetricsError(f"{where}: expected a list of per-head objects with layer, head, trace, cond")


def metrics_from_rows(
    rows: list[dict[str, Any]], geometry: KVGeometry, where: str, info: dict | None = None
) -> HeadMetrics:
    """Check wide rows (one per head) against ``geometry`` and build the metrics table."""
    if not rows:
        raise MetricsError(f"{where} holds no rows; it needs one row per layer and KV head")
    columns = set().union(*(row.keys() for row in rows))
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise MetricsError(
            f"{where} lacks column(s) {', '.join(missing)}; it needs {', '.join(REQUIRED_COLUMNS)} (eigmax optional)"
        )
    num_layers, num_heads, head_dim = geometry.num_layers, geometry.num_kv_heads, geometry.head_dim
    scalars = {name: np.full((num_layers, num_heads), np.nan) for name in UPSTREAM_METRICS}
    curve_names = [name for name in CURVES if name in columns]
    if curve_names and len(curve_names) != len(CURVES):
        absent = ", ".join(name for name in CURVES if name not in columns)
        raise MetricsError(f"{where} has some K/V curves but lacks {absent}; export all of {', '.join(CURVES)}")
    curves = {n: np.zeros((num_layers, num_heads, head_dim + n.startswith("loss"))) for n in curve_names}
    matrices = []
    for pair in OPTIONAL_CURVES:
        present = [name for name in pair if name in columns]
        if present and not curve_names:
            raise MetricsError(f"{where} has {present[0]} but not the K/V curves it belongs with ({', '.join(CURVES)})")
        if present and len(present) != len(pair):
            raise MetricsError(f"{where} has {present[0]} but lacks {[n for n in pair if n not in present][0]}")
        for name in present:
            if "dist" in name or name.startswith("fgram"):
                columns_of = head_dim if name.startswith("fgram") else len(WIDTHS)
                curves[name] = np.zeros((num_layers, num_heads, head_dim, columns_of))
                matrices.append(name)
            else:
                curves[name] = np.zeros((num_layers, num_heads, head_dim))
                curve_names.append(name)
    seen: set[tuple[int, int]] = set()
    for row in rows:
        layer = _index(row.get("layer"), "layer", num_layers, where)
        head = _index(row.get("head"), "head", num_heads, where)
        label = f"layer {layer} head {head}"
        if (layer, head) in seen:
            raise MetricsError(f"{where} lists {label} twice; keep one row per layer and KV head")
        seen.add((layer, head))
        for name in UPSTREAM_METRICS:
            if name in REQUIRED_COLUMNS or row.get(name) not in (None, ""):
                scalars[name][layer, head] = _finite(row.get(name), name, label, where)
        for name in curve_names:
            curves[name][layer, head] = _curve(row.get(name), name, curves[name].shape[-1], label, where)
        for name in matrices:
            value, columns_of = row.get(name), curves[name].shape[-1]
            if not isinstance(value, list) or len(value) != head_dim:
                raise MetricsError(f"{where}: {name} of {label} must be {head_dim} lists of {columns_of} numbers")
            curves[name][layer, head] = [_curve(line, name, columns_of, label, where) for line in value]
    absent = [(layer, head) for layer, head in _heads(geometry) if (layer, head) not in seen]
    if absent:
        layer, head = absent[0]
        raise MetricsError(
            f"{where} has no row for layer {layer} head {head} ({len(absent)} of {num_layers * num_heads} heads "
            "missing); every layer and KV head of the model is needed"
        )
    return HeadMetrics(geometry, scalars["trace"], scalars["eigmax"], scalars["cond"], curves, dict(info or {}))


def _from_csv(text: str, geometry: KVGeometry, where: str, run_name: str | None) -> HeadMetrics:
    reader = csv.DictReader(io.StringIO(text))
    header = [name.strip() for name in reader.fieldnames or []]
    reader.fieldnames = header
    rows = [{k: v for k, v in row.items() if k is not None} for row in reader]
    if {"metric", "value"} <= set(header):  # the upstream design's tall table
        runs: dict[str, dict[str, Any]] = {}
        for row in rows:
            key = f"fisher/{row.get('layer', '')}/{row.get('head', '')}/{row.get('metric', '')}"
            runs.setdefault(row.get("run_name") or "", {})[key] = row.get("value")
        rows = _upstream_summary_rows(runs, where, run_name)
    return metrics_from_rows(rows, geometry, where)


def _upstream_summary_rows(runs: dict[str, dict[str, Any]], where: str, run_name: str | None) -> list[dict[str, Any]]:
    """Wide rows from the upstream design's ``fisher/layerL/headH/metric`` keys of one run (``run_name`` picks it)."""
    if run_name is not None:
        if run_name not in runs:
            raise MetricsError(f"{where} has no run {run_name!r} (runs: {', '.join(sorted(runs))}); check --run-name")
        runs = {run_name: runs[run_name]}
    per_head = {name: rows for name, summary in runs.items() if (rows := _rows_from_upstream_keys(summary))}
    if not per_head:
        raise MetricsError(f"{where} holds no per-head metrics named fisher/layerL/headH/<trace|eigmax|cond>")
    if len(per_head) > 1:
        raise MetricsError(f"{where} holds several runs ({', '.join(sorted(per_head))}); pick one with --run-name")
    return next(iter(per_head.values()))


def _rows_from_upstream_keys(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for key, value in summary.items():
        match = _UPSTREAM_KEY.match(str(key))
        if match and match.group(3) in UPSTREAM_METRICS:
            layer, head = int(match.group(1)), int(match.group(2))
            rows.setdefault((layer, head), {"layer": layer, "head": head})[match.group(3)] = value
    return [rows[key] for key in sorted(rows)]


def _run_label(run: dict[str, Any]) -> str:
    info = run.get("run_info") or {}
    return str(info.get("display_name") or info.get("run_name") or info.get("run_id") or "")


def fetch_wandb_metrics(entity: str, project: str, geometry: KVGeometry, run_name: str | None = None) -> HeadMetrics:
    """The upstream design's path: per-head ``fisher/layerL/headH/*`` summary metrics of a W&B project's run."""
    hint = "export the metrics to a CSV/JSON file and pass --metrics-file instead"
    try:
        import wandb
    except ImportError:
        raise MetricsError(
            f"--entity/--project need the wandb package (pip install wandb) and network; {hint}"
        ) from None
    where = f"W&B project {entity}/{project}"
    try:
        api = wandb.Api(timeout=30)  # offline, fail in seconds rather than retry for minutes
        runs = {run.display_name or run.name: dict(run.summary) for run in api.runs(f"{entity}/{project}")}
    except Exception as exc:  # wandb raises many types for auth and network failures
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise MetricsError(f"cannot read {where}: {reason}; {hint}") from None
    return metrics_from_rows(_upstream_summary_rows(runs, where, run_name), geometry, where)


# ---------------------------------------------------------------------- helpers
def _heads(geometry: KVGeometry):
    for layer in range(geometry.num_layers):
        for head in range(geometry.num_kv_heads):
            yield layer, head


def _index(value: Any, name: str, size: int, where: str) -> int:
    text = str(value).strip().lower().removeprefix(name) if value is not None else ""
    if not text.isdecimal() or len(text) > 9:  # "²" passes isdigit but not int(); 10+ digits are no layer
        raise MetricsError(f"{where}: {name} {str(value)[:20]!r} is not an index (use 3 or '{name}3')")
    index = int(text)
    if index >= size:
        raise MetricsError(f"{where}: {name} {index} does not exist in the model ({name}s 0..{size - 1})")
    return index


def _finite(value: Any, name: str, label: str, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MetricsError(f"{where}: {name} of {label} is {value!r}, not a number") from None
    if not math.isfinite(number):
        raise MetricsError(f"{where}: {name} of {label} is {value!r}; every metric must be a finite number")
    return number


def _curve(value: Any, name: str, length: int, label: str, where: str) -> np.ndarray:
    if not isinstance(value, list) or len(value) != length:
        raise MetricsError(f"{where}: {name} of {label} must be a list of {length} numbers")
    return np.array([_finite(x, name, label, where) for x in value], dtype=np.float64)


def _json_float(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None

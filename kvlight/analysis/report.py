"""What a reader sees of an analysis: the per-head summary table, the heatmap of ranks, rank vs perplexity."""

from __future__ import annotations

import io
import math

import numpy as np

from kvlight.analysis.metrics_io import HeadMetrics
from kvlight.analysis.rank_allocation import Allocation

NOTES = (
    "Notes:",
    "- trace, eigmax, cond: the upstream design's attention Fisher F = mean_i(diag(p_i) - p_i p_i^T); query heads sharing",
    "  a KV head (GQA) are averaged into it. F 1 = 0 always, so cond is eigmax over the smallest eigenvalue",
    "  orthogonal to the all-ones vector (the upstream design divided by that zero eigenvalue; its thresholds were set on it).",
    "- E_k/E_v: share of the head's centred K/V energy kept at its rank (K pre-RoPE).",
    "- dNLL_k/dNLL_v: predicted increase of the mean NLL (nats per token) from truncating K/V to the rank:",
    "  second-order, diagonal Fisher in the head's principal directions, tokens and heads treated as independent.",
)


def summary_text(allocation: Allocation, metrics: HeadMetrics | None, header: list[str]) -> str:
    """The readable per-layer/head table: tier, ranks, metrics, and the totals."""
    geometry = allocation.geometry
    kept = int(allocation.rank_k.sum() + allocation.rank_v.sum())
    total = 2 * geometry.head_dim * geometry.num_layers * geometry.num_kv_heads
    lines = ["kvlight analyze: compression config summary", *header]
    target = "none (the upstream design's rules)" if allocation.target is None else f"{100 * allocation.target:.1f}%"
    lines.append(f"strategy: {allocation.strategy}; target memory reduction: {target}")
    lines.append(
        f"total KV memory reduction: {100 * allocation.memory_reduction():.2f}% "
        f"({kept} of {total} numbers per token kept)"
    )
    labels, counts = np.unique(allocation.tier.astype(str), return_counts=True)
    lines.append(
        "heads per tier: " + ", ".join(f"{label} {count}" for label, count in zip(labels, counts, strict=True))
    )
    has_curves = metrics is not None and metrics.has_sensitivity
    if has_curves:
        loss = metrics.predicted_loss(allocation.rank_k, allocation.rank_v)
        lines.append(f"predicted loss increase: {loss:.4f} nats/token (perplexity x{math.exp(loss):.3f})")
    lines.append("")
    columns = (
        f"{'layer':>5} {'head':>4} {'tier':<12} {'rank_k':>6} {'rank_v':>6} {'trace':>7} {'eigmax':>9} {'cond':>9}"
    )
    if has_curves:
        columns += f" {'E_k':>6} {'E_v':>6} {'dNLL_k':>8} {'dNLL_v':>8}"
    lines += [columns, "-" * len(columns)]
    for layer in range(geometry.num_layers):
        for head in range(geometry.num_kv_heads):
            rank_k, rank_v = int(allocation.rank_k[layer, head]), int(allocation.rank_v[layer, head])
            row = f"{layer:>5} {head:>4} {allocation.tier[layer, head]:<12} {rank_k:>6} {rank_v:>6}"
            if metrics is not None:
                row += f" {metrics.trace[layer, head]:>7.4f} {metrics.eigmax[layer, head]:>9.3g}"
                row += f" {metrics.cond[layer, head]:>9.3g}"
            if has_curves:
                energy_k, energy_v = metrics.energy("k")[layer, head, rank_k], metrics.energy("v")[layer, head, rank_v]
                loss_k = metrics.curves["loss_k"][layer, head, rank_k]
                loss_v = metrics.curves["loss_v"][layer, head, rank_v]
                row += f" {energy_k:>6.3f} {energy_v:>6.3f} {loss_k:>8.4f} {loss_v:>8.4f}"
            lines.append(row)
    return "\n".join([*lines, "", *NOTES]) + "\n"


def perplexity_plot_png(rows: list[dict], baseline: float | None = None) -> bytes:
    """A PNG of compressed perplexity against KV memory reduction, one line per strategy.

    Args:
        rows: ``{"strategy", "memory_reduction" (0..1), "perplexity"}`` per calibrated config.
        baseline: the uncompressed perplexity, drawn as a horizontal line.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    figure = Figure(figsize=(5.5, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.subplots()
    for strategy in sorted({row["strategy"] for row in rows}):
        points = sorted((100 * r["memory_reduction"], r["perplexity"]) for r in rows if r["strategy"] == strategy)
        axis.plot(*zip(*points, strict=True), marker="o", label=strategy)
    if baseline is not None:
        axis.axhline(baseline, color="gray", linestyle="--", label="uncompressed")
    axis.set_xlabel("KV memory reduction (%)")
    axis.set_ylabel("perplexity")
    axis.set_yscale("log")
    axis.yaxis.set_major_formatter(ScalarFormatter())  # 20, 50 rather than 2x10^1
    axis.yaxis.set_minor_formatter(ScalarFormatter())
    axis.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def heatmap_png(allocation: Allocation, title: str | None = None) -> bytes:
    """A PNG of K and V ranks per layer (rows) and KV head (columns); exact heads are marked ``=``."""
    # The object-oriented API with an Agg canvas: no pyplot, so no global backend is set.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    geometry = allocation.geometry
    layers, heads = geometry.num_layers, geometry.num_kv_heads
    figure = Figure(figsize=(2.2 + 1.1 * heads, 1.6 + 0.24 * layers), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    for axis, kind, ranks in ((axes[0], "K", allocation.rank_k), (axes[1], "V", allocation.rank_v)):
        image = axis.imshow(ranks, cmap="viridis", vmin=0, vmax=geometry.head_dim, aspect="auto")
        axis.set_title(f"{kind} rank")
        axis.set_xlabel("KV head")
        axis.set_xticks(range(heads))
        if layers * heads <= 512:  # numbers stay readable
            for layer in range(layers):
                for head in range(heads):
                    value = int(ranks[layer, head])
                    text = "=" if value == geometry.head_dim else str(value)
                    color = "black" if value > 0.6 * geometry.head_dim else "white"
                    axis.text(head, layer, text, ha="center", va="center", fontsize=7, color=color)
    axes[0].set_ylabel("layer")
    axes[0].set_yticks(range(0, layers, max(1, math.ceil(layers / 16))))
    figure.colorbar(image, ax=axes, shrink=0.6, label=f"rank (of {geometry.head_dim})")
    reduction = 100 * allocation.memory_reduction()
    figure.suptitle(title or f"{allocation.strategy}: {reduction:.1f}% KV memory saved", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


BITS_NOTES = (
    "Notes:",
    "- bits_k/bits_v: mean width of the head's principal directions (K pre-RoPE); drop: directions of width 0,",
    "  exact: of width 16 (kept in the K/V dtype). Widths 1-8 store static integer codes (kvlight.serving.widths).",
    "- dNLL: predicted increase of the mean NLL (nats per token) of the head's K and V at these widths:",
    "  1/2 sum_i fisher_i D_i(b_i), the diagonal Fisher in each principal direction times its measured",
    "  quantisation error at its width (second order, tokens, heads and directions treated as independent).",
)


def bits_summary_text(allocation, metrics: HeadMetrics | None, header: list[str]) -> str:
    """The per-layer/head table of a :class:`~kvlight.analysis.bit_allocation.BitAllocation` and its totals."""
    geometry = allocation.geometry
    widths_k, widths_v = allocation.widths["k"], allocation.widths["v"]
    lines = ["kvlight analyze: compression config summary (bits per principal direction)", *header]
    lines.append(
        f"strategy: bits, weighting {allocation.weighting}; target memory reduction: {100 * allocation.target:.2f}%"
    )
    lines.append(
        f"stored: {allocation.bits_per_element():.3f} bits per element (K {allocation.bits_per_element('k'):.3f}, "
        f"V {allocation.bits_per_element('v'):.3f}); {allocation.bytes_per_token()} bytes per token, "
        f"{100 * allocation.memory_reduction():.2f}% less than an fp16 cache (long context, before exact tokens)"
    )
    loss = None if metrics is None else allocation.predicted_loss(metrics)
    if loss is not None:
        lines.append(f"predicted loss increase: {loss:.4f} nats/token (perplexity x{math.exp(loss):.3f})")
    lines.append("")
    columns = f"{'layer':>5} {'head':>4} {'bits_k':>6} {'bits_v':>6} {'drop_k':>6} {'drop_v':>6} {'exact':>5}"
    has_loss = loss is not None
    if has_loss:
        columns += f" {'dNLL':>8}"
        per_head = allocation.head_losses(metrics)
    lines += [columns, "-" * len(columns)]
    for layer in range(geometry.num_layers):
        for head in range(geometry.num_kv_heads):
            bk, bv = widths_k[layer, head], widths_v[layer, head]
            exact = int((bk == 16).sum() + (bv == 16).sum())
            row = f"{layer:>5} {head:>4} {bk.mean():>6.2f} {bv.mean():>6.2f} {int((bk == 0).sum()):>6} "
            row += f"{int((bv == 0).sum()):>6} {exact:>5}"
            if has_loss:
                row += f" {per_head[layer, head]:>8.4f}"
            lines.append(row)
    return "\n".join([*lines, "", *BITS_NOTES]) + "\n"


def bits_heatmap_png(allocation, title: str | None = None) -> bytes:
    """A PNG of every direction's width: rows are (layer, head), columns the principal directions, K and V."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    geometry = allocation.geometry
    rows = geometry.num_layers * geometry.num_kv_heads
    figure = Figure(figsize=(8.0, 1.6 + 0.05 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2, sharey=True)
    for axis, kind in zip(axes, ("k", "v")):
        image = axis.imshow(
            allocation.widths[kind].reshape(rows, -1),
            cmap="magma",
            vmin=0,
            vmax=16,
            aspect="auto",
            interpolation="nearest",
        )
        axis.set_title(f"{kind.upper()} widths ({allocation.bits_per_element(kind):.2f} bits mean)")
        axis.set_xlabel("principal direction (by variance)")
    axes[0].set_ylabel("layer x KV head")
    step = max(1, math.ceil(geometry.num_layers / 16))
    axes[0].set_yticks([layer * geometry.num_kv_heads for layer in range(0, geometry.num_layers, step)])
    axes[0].set_yticklabels([str(layer) for layer in range(0, geometry.num_layers, step)])
    figure.colorbar(image, ax=axes, shrink=0.6, label="bits")
    reduction = 100 * allocation.memory_reduction()
    figure.suptitle(title or f"bits ({allocation.weighting}): {reduction:.1f}% of an fp16 cache saved", fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()

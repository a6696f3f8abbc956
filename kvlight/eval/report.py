"""One table of harness results, the caches side by side: a value, its 95 % interval and its sample count per cell.

A row of :func:`rows_of` is one ``(task, length, metric, cache)``: ``value`` (the harness' aggregate), ``n`` (the
samples it aggregated), ``low``/``high`` and ``interval`` (``wilson`` when every sample scored 0 or 1, ``normal``
for other per-sample means, None when the samples are not numbers, as for perplexities).
"""

from __future__ import annotations

import math
from numbers import Real

Z95 = 1.959963984540054


def interval(values) -> tuple[float, float, str] | None:
    """``(low, high, method)`` of the 95 % interval of the mean of ``values``: Wilson's for 0/1 scores, the normal
    approximation otherwise (clipped to [0, 1] for scores inside it); None for fewer than one value."""
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if all(v in (0, 1) for v in values):
        denominator = 1 + Z95**2 / n
        centre = (mean + Z95**2 / (2 * n)) / denominator
        half = Z95 * math.sqrt(mean * (1 - mean) / n + Z95**2 / (4 * n * n)) / denominator
        return max(0.0, centre - half), min(1.0, centre + half), "wilson"
    spread = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    low, high = mean - Z95 * spread / math.sqrt(n), mean + Z95 * spread / math.sqrt(n)
    if all(0 <= v <= 1 for v in values):
        low, high = max(0.0, low), min(1.0, high)
    return low, high, "normal"


def rows_of(results: dict, cache: str, length: int | None, seconds: float) -> list[dict]:
    """The rows of one ``lm_eval.simple_evaluate`` result (run with ``log_samples=True``) for ``cache``.

    A RULER task reports one metric per length (its name is the length; the others hold -1): the row of ``length``
    is kept, named ``score``.
    """
    rows = []
    for task, aggregates in results["results"].items():
        samples = results.get("samples", {}).get(task, [])
        for key, value in aggregates.items():
            metric, comma, _ = key.partition(",")
            if not comma or metric.endswith("_stderr") or not isinstance(value, Real):
                continue
            if metric.isdigit() and (length is None or metric != str(length) or value == -1):
                continue  # a RULER metric of another length
            per_sample = [s.get(metric) for s in samples if metric in s]
            numbers = [float(v) for v in per_sample if isinstance(v, Real) and not isinstance(v, bool) and v != -1]
            bounds = interval(numbers) if len(numbers) == len(per_sample) and numbers else None
            rows.append(
                {
                    "task": task,
                    "length": length,
                    "metric": "score" if metric.isdigit() else metric,
                    "cache": cache,
                    "value": float(value),
                    "n": len(per_sample) or int(results.get("n-samples", {}).get(task, {}).get("effective", 0)),
                    "low": None if bounds is None else bounds[0],
                    "high": None if bounds is None else bounds[1],
                    "interval": None if bounds is None else bounds[2],
                    "seconds": seconds,
                }
            )
    return rows


def _cell(row: dict | None, n: int | None) -> str:
    if row is None:
        return "-"
    scale, unit = (100, " %") if row["interval"] is not None and _bounded(row) else (1, "")
    text = f"{scale * row['value']:.1f}{unit}" if scale == 100 else f"{row['value']:.4g}"
    if row["low"] is not None:
        text += (
            f" [{scale * row['low']:.1f}, {scale * row['high']:.1f}]"
            if scale == 100
            else f" [{row['low']:.4g}, {row['high']:.4g}]"
        )
    if row["n"] != n:
        text += f" (n={row['n']})"
    return text


def _bounded(row: dict) -> bool:
    return 0 <= row["value"] <= 1 and (row["low"] is None or (0 <= row["low"] and row["high"] <= 1))


def table(rows: list[dict], caches: list[str]) -> str:
    """A markdown table: one line per ``(task, length, metric)``, one column per cache; scores in % with their 95 %
    interval, the sample count in its own column (in a cell too where that cache's differs)."""
    keys = list(dict.fromkeys((r["task"], r["length"], r["metric"]) for r in rows))
    cells = {(r["task"], r["length"], r["metric"], r["cache"]): r for r in rows}
    lines = [
        "| task | length | metric | n | " + " | ".join(caches) + " |",
        "|---|---|---|---|" + "---|" * len(caches),
    ]
    for task, length, metric in keys:
        found = [cells.get((task, length, metric, cache)) for cache in caches]
        n = max((row["n"] for row in found if row is not None), default=0)
        shown = [_cell(row, n) for row in found]
        lines.append(
            f"| {task} | {length if length is not None else '-'} | {metric} | {n} | " + " | ".join(shown) + " |"
        )
    return "\n".join(lines) + "\n"

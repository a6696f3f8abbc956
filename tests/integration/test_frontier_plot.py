"""The frontier plot's selection: the Pareto front of each family (bench/frontier.py), and the redraw from the stored
results, which must not rerun the benchmark nor touch anything but the picture."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def frontier():
    sys.path.insert(0, str(ROOT))
    try:
        spec = importlib.util.spec_from_file_location("bench_frontier", ROOT / "bench" / "frontier.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(ROOT))


FRONTS = {  # (points, slack) -> the front
    "empty": (([], 0.0), []),
    "one-point": (([(25.0, 1.0)], 0.0), [(25.0, 1.0)]),
    "falling-cost-all-kept": (([(6.0, 30.0), (12.0, 5.0), (25.0, 1.0)], 0.0), [(6.0, 30.0), (12.0, 5.0), (25.0, 1.0)]),
    "dominated-dropped": (([(12.0, 5.0), (18.0, 8.0), (25.0, 1.0)], 0.0), [(12.0, 5.0), (25.0, 1.0)]),
    "same-bytes-best-kept": (([(25.0, 3.0), (25.0, 1.0), (25.0, 2.0)], 0.0), [(25.0, 1.0)]),
    "duplicates-once": (([(25.0, 1.0), (25.0, 1.0)], 0.0), [(25.0, 1.0)]),
    "unsorted-input-sorted-output": (([(25.0, 1.0), (6.0, 30.0)], 0.0), [(6.0, 30.0), (25.0, 1.0)]),
    # 24.8 % of the bytes at +5 % beside 25 % at +1 %: the same budget; without slack the worse point stays
    "near-equal-bytes-strict": (([(24.8, 5.0), (25.0, 1.0)], 0.0), [(24.8, 5.0), (25.0, 1.0)]),
    "near-equal-bytes-with-slack": (([(24.8, 5.0), (25.0, 1.0)], 0.02), [(25.0, 1.0)]),
    "slack-is-relative": (([(20.0, 5.0), (25.0, 1.0)], 0.02), [(20.0, 5.0), (25.0, 1.0)]),
    "negative-costs": (([(12.0, -0.5), (25.0, -0.2)], 0.0), [(12.0, -0.5)]),
}


@pytest.mark.parametrize("case", list(FRONTS.values()), ids=list(FRONTS))
def test_pareto_front(frontier, case):
    (points, slack), front = case
    assert frontier.pareto_front(points, slack=slack) == front


FAMILIES = {  # a results row's method -> its family's label (None: not plotted as a family)
    "none (DynamicCache)": None,
    "HF QuantizedCache quanto": "HF QuantizedCache (quanto, hqq)",
    "kvlight PCA": "kvlight ranks, PCA",
    "kvlight joint-Fisher-allocated widths": "kvlight widths, PCA basis (--compressor pca)",
    "kvlight uniform widths": "kvlight widths, PCA basis (--compressor pca)",
    "kvlight Fisher-whitened basis, Fisher-allocated widths, keys in RoPE blocks of 16": (
        "kvlight widths, Fisher-whitened basis (default)"
    ),
    "kvlight Fisher-whitened basis, Fisher-allocated widths + KL-distilled": (
        "kvlight widths + KL distillation (trained)"
    ),
    "kvlight MSE-allocated widths + KL-distilled": "kvlight widths + KL distillation (trained)",
}


@pytest.mark.parametrize("method,family", list(FAMILIES.items()), ids=list(FAMILIES))
def test_plot_family(frontier, method, family):
    index = frontier.plot_family(method)
    assert (None if index is None else frontier.PLOT_FAMILIES[index][0]) == family


@pytest.mark.parametrize("name", ["frontier", "frontier_gemma-3-270m-q4_k_m"])
def test_stored_results_plot_at_most_five_series(frontier, name, tmp_path):
    results = json.loads((ROOT / "bench" / "results" / f"{name}.json").read_text())
    families = {frontier.plot_family(row["method"]) for row in results["rows"]}
    unplotted = sorted({row["method"] for row in results["rows"] if frontier.plot_family(row["method"]) is None})
    assert unplotted == ["none (DynamicCache)"]  # every measured method is in a family
    assert 1 <= len(families - {None}) <= 5
    pytest.importorskip("matplotlib")
    frontier.plot(results, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""How wide the static steps of width codecs should be: one compressor, its steps widened by each headroom.

The step search (kvlight.compressors.statistics) picks, per latent channel, the step of least squared error on the
calibration rows. This benchmark takes a compressor ``kvlight calibrate`` wrote with ``--step-headroom 1`` and
evaluates it with every coded channel's step (learned corrections included) widened by each factor around its
centre, as ``--step-headroom`` would have set them before any training: the embedded default in float32, windows
from the start of two texts, each fed in chunks of 64 through the cache, exact tokens stored in bf16 (as
bench/recipes.py does): kvlight's built-in corpus (the frontier's windows) and the standard library's docstrings
(bench.common.docstring_documents), which no calibration reads. The bytes do not change with the headroom.

    kvlight calibrate --kv-budget 0.24 --step-headroom 1 --model-dtype bfloat16 --output-dir DIR
    python bench/step_headroom.py --compressor DIR --headrooms 1 1.15 1.3 1.5
"""

from __future__ import annotations

import copy
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"

from bench.recipes import OneLineParser  # noqa: E402  (its one-line refusals, exit code 2)


def widened(compressor, headroom: float):
    """A copy of ``compressor`` with its steps widened by ``headroom`` (:meth:`KVCompressor.widen_steps`)."""
    wide = copy.deepcopy(compressor)
    wide.widen_steps(headroom)
    return wide


def run(args) -> dict:
    import torch

    from bench.common import machine
    from bench.recipes import Evaluator, changes
    from kvlight.hf import dynamic_cache
    from kvlight.serving.cache import CacheSettings, CompressedCache

    counts = {512: args.windows_512, 2048: args.windows_2048}
    evaluator = Evaluator(counts)
    directory = Path(args.compressor)
    results_file = next(directory.glob("calibration_results_*.json"), None)
    calibration = json.loads(results_file.read_text()) if results_file else {}
    results = {
        "machine": machine(),
        "command": "python bench/step_headroom.py " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "compressor": str(directory),
        "calibration_command": args.calibrate_command,
        "kv_budget_pct": 100 * calibration["kv_budget"] if "kv_budget" in calibration else None,
        "model_dtype": calibration.get("model_dtype"),
        "windows": {str(length): count for length, count in counts.items()},
        "docstrings": evaluator.docstrings,
        "rows": [],
    }
    baseline = evaluator.perplexities(dynamic_cache)
    results["baseline_perplexity"] = baseline
    compressor, _ = evaluator.compressed(directory)
    settings = CacheSettings(storage_dtype=torch.bfloat16)
    for headroom in args.headrooms:
        start = time.perf_counter()
        wide = widened(compressor, headroom)
        perplexity = evaluator.perplexities(lambda c=wide: CompressedCache(c, evaluator.tracker, settings=settings))
        row = {
            "headroom": headroom,
            "perplexity": perplexity,
            "change_pct": changes(perplexity, baseline),
            "seconds": time.perf_counter() - start,
        }
        results["rows"].append(row)
        print(json.dumps({k: row[k] for k in ("headroom", "change_pct")}), flush=True)
    evaluator.tracker.close()
    return results


def write(results: dict, name: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    lengths = list(results["windows"])
    docs = results["docstrings"]
    lines = [
        "# How wide the static steps should be: one compressor, its steps widened after the fit",
        "",
        f"Machine: {results['machine']}  ",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}",
        "",
        f"Compressor: `{results['calibration_command'] or results['compressor']}` "
        f"(fitted in {results['model_dtype']}, {results['kv_budget_pct']:.1f} % of fp16 bytes, unchanged by the "
        "headroom)."
        if results["kv_budget_pct"] is not None
        else f"Compressor: {results['compressor']}.",
        "",
        "Protocol: every coded channel's static step (learned corrections folded in) is widened by the headroom "
        "around its centre; the embedded default in float32 reads each window in chunks of 64 through the cache, "
        "exact tokens stored in bf16. corpus = kvlight's built-in corpus (the frontier's windows, "
        + ", ".join(f"{count} x {length}" for length, count in results["windows"].items())
        + f" tokens); docstrings = `inspect.getdoc` of {len(docs['modules'])} standard-library modules and their "
        f"public classes and functions ({docs['documents']} texts, {docs['characters']} characters), which no "
        "calibration reads. Perplexity change against DynamicCache on the same windows.",
        "",
        "| headroom | "
        + " | ".join(f"corpus {n}" for n in lengths)
        + " | "
        + " | ".join(f"docstrings {n}" for n in lengths)
        + " | docstrings/corpus at 2048 |",
        "|---:|" + "---:|" * (2 * len(lengths) + 1),
    ]
    for row in results["rows"]:
        change = row["change_pct"]
        cells = [f"{change['corpus'][n]:+.2f} %" for n in lengths] + [
            f"{change['docstrings'][n]:+.2f} %" for n in lengths
        ]
        ratio = (
            change["docstrings"]["2048"] / change["corpus"]["2048"] if change["corpus"]["2048"] > 0 else float("nan")
        )
        lines.append(f"| {row['headroom']:g} | " + " | ".join(cells) + f" | {ratio:.2f}x |")
    base = results["baseline_perplexity"]
    lines += [
        "",
        "DynamicCache: "
        + ", ".join(f"{text} {n} {base[text][n]:.3f}" for text in ("corpus", "docstrings") for n in lengths)
        + ".",
        "",
    ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines))


def parse(argv: list[str] | None = None):
    parser = OneLineParser(prog="bench/step_headroom.py", description=__doc__.splitlines()[0])
    parser.add_argument("--compressor", required=True, help="a kvlight calibrate --output-dir (fitted at headroom 1)")
    parser.add_argument(
        "--calibrate-command", default=None, help="the kvlight calibrate command that wrote it (recorded)"
    )
    parser.add_argument("--headrooms", type=float, nargs="+", default=[1.0, 1.15, 1.3, 1.5])
    parser.add_argument("--windows-512", type=int, default=8)
    parser.add_argument("--windows-2048", type=int, default=4)
    parser.add_argument("--name", default="step_headroom", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    if not Path(args.compressor).is_dir():
        parser.error(f"--compressor {args.compressor} is not a directory; give a kvlight calibrate --output-dir")
    if any(not 1.0 <= h <= 4.0 for h in args.headrooms):
        parser.error("--headrooms must lie in [1, 4] (1: the least-error steps)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    write(run(args), args.name)


if __name__ == "__main__":
    main()

"""RULER through the compressed cache: lm-evaluation-harness's offline RULER tasks, one row per cache (issue 32).

Protocol: lm-eval's RULER tasks that generate their data from the tokenizer (niah_single_1, niah_multikey_2,
niah_multikey_3, vt, cwe) at each length, ``--limit`` prompts per cell (30 by default), greedy, no chat template,
every prompt fed in chunks of 64 tokens through the cache (kvlight.eval). Rows: DynamicCache, HF QuantizedCache
quanto int4 (group 64, residual 16) and one row per ``--kvlight LABEL=DIR`` (a compressor ``kvlight calibrate``
wrote: the recommended budget, 12.5 %, ...). A task the uncompressed model solves below 20 % at a length is reported
once, as unsolved, and not run for the other rows.

    python bench/ruler.py --kvlight "recommended (24 %)=rec/compressor_kvsplice" --kvlight "12.5 %=b125/compressor_kvsplice"
    python bench/ruler.py --model gemma-3-270m.gguf --lengths 2048 4096 --output ruler_gemma-3-270m ...
    python bench/ruler.py --tasks niah_single_1 --lengths 512 --limit 2 --results-dir /tmp/smoke   # a smoke run

Writes ``bench/results/<output>.json`` and ``.md`` (``--results-dir`` elsewhere), with the machine, the command and
each row's time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine  # noqa: E402
from kvlight.files import atomic_write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "vt", "cwe")
LENGTHS = (2048, 4096, 8000)
PROMPTS = 30
SOLVED = 0.20  # below this, the uncompressed model does not solve the task: nothing to compare
BASELINES = (("DynamicCache", "dynamic"), ("HF QuantizedCache quanto int4", "quanto-int4"))


def run(args) -> dict:
    import torch

    from kvlight.eval.run import TaskSet, build_tasks, evaluate_caches
    from kvlight.models import load_model, load_tokenizer, resolve_dtype

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.model, resolve_dtype(args.dtype, device)).to(device)
    tokenizer = load_tokenizer(args.model)
    rows_spec = [(label, cache, None) for label, cache in BASELINES if cache in args.baselines]
    rows_spec += [(f"kvlight {label}", "kvlight", path) for label, path in args.kvlight]
    results = {
        "machine": machine(),
        "command": "python " + shlex.join(sys.argv),
        "model": args.model or "embedded:smollm2-135m-instruct",
        "dtype": args.dtype,
        "lengths": args.lengths,
        "prompts": args.limit,
        "prefill_chunk": args.prefill_chunk,
        "rows": [],
        "unsolved": [],
        "row_seconds": {},
    }
    for length in args.lengths:
        (task_set,) = build_tasks(args.tasks, [length], tokenizer)
        solved = dict(task_set.tasks)
        for label, cache, path in rows_spec:
            chosen = TaskSet(length, task_set.manager, solved)
            if not solved:
                break
            start = time.perf_counter()
            measured = evaluate_caches(
                model, tokenizer, [cache], [chosen], compressor_path=path, limit=args.limit,
                batch_size=args.batch_size, prefill_chunk=args.prefill_chunk,
            )  # fmt: skip
            seconds = time.perf_counter() - start
            results["row_seconds"][label] = results["row_seconds"].get(label, 0.0) + seconds
            for row in measured:
                if row["metric"] != "score":
                    continue
                row.update({"row": label, "compressor_path": path})
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
                if cache == "dynamic" and row["value"] < SOLVED:
                    results["unsolved"].append({"task": row["task"], "length": length, "value": row["value"]})
                    solved.pop(row["task"], None)
    return results


def write(results: dict, directory: Path, name: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / f"{name}.json", json.dumps(results, indent=2) + "\n")
    unsolved = {(u["task"], u["length"]) for u in results["unsolved"]}
    cells = list(dict.fromkeys((r["task"], r["length"]) for r in results["rows"]))
    labels = list(dict.fromkeys(r["row"] for r in results["rows"]))
    found = {(r["row"], r["task"], r["length"]): r for r in results["rows"]}
    lines = [
        f"# RULER through the compressed cache: {results['model']}",
        "",
        f"Machine: {results['machine']}  ",
        f"Command: `{results['command']}`",
        "",
        f"Protocol: lm-eval's offline RULER tasks, {results['prompts']} prompts per cell, greedy, no chat template, "
        f"prompts fed in chunks of {results['prefill_chunk']} tokens through the cache; score in % with its 95 % "
        "Wilson interval (partial-credit tasks: normal interval), n prompts per cell. A task the uncompressed model "
        f"solves below {100 * SOLVED:.0f} % at a length is listed once below and not run for the other rows.",
        "",
        "| row | " + " | ".join(f"{task} @ {length}" for task, length in cells if (task, length) not in unsolved)
        + " | time |",
        "|---|" + "---|" * (len([c for c in cells if c not in unsolved]) + 1),
    ]  # fmt: skip
    for label in labels:
        shown = []
        for task, length in cells:
            if (task, length) in unsolved:
                continue
            row = found.get((label, task, length))
            shown.append(
                "-"
                if row is None
                else f"{100 * row['value']:.1f} [{100 * row['low']:.1f}, {100 * row['high']:.1f}] (n={row['n']})"
                if row["low"] is not None
                else f"{100 * row['value']:.1f} (n={row['n']})"
            )
        seconds = results["row_seconds"].get(label, 0.0)
        lines.append(f"| {label} | " + " | ".join(shown) + f" | {seconds / 60:.1f} min |")
    if unsolved:
        lines += ["", "Unsolved by the uncompressed model (not run for the other rows):", ""]
        lines += [f"- {u['task']} @ {u['length']}: {100 * u['value']:.1f} %" for u in results["unsolved"]]
    atomic_write_text(directory / f"{name}.md", "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id, directory or .gguf file (default: the embedded default)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    parser.add_argument("--limit", type=int, default=PROMPTS, help="prompts per (task, length) cell")
    parser.add_argument(
        "--kvlight", action="append", default=[], metavar="LABEL=DIR", help="a kvlight row: its label and compressor"
    )
    parser.add_argument("--baselines", nargs="*", default=[cache for _, cache in BASELINES])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--prefill-chunk", type=int, default=64)
    parser.add_argument("--output", default="ruler", help="results file name, without extension")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    pairs = []
    for item in args.kvlight:
        label, sep, path = item.partition("=")
        if not sep or not label or not Path(path).is_dir():
            parser.error(f"--kvlight {item!r}: give LABEL=DIR, DIR a compressor directory kvlight calibrate wrote")
        pairs.append((label, path))
    args.kvlight = pairs
    if "dynamic" not in args.baselines:
        parser.error("--baselines must include dynamic: it decides which tasks are solved")
    write(run(args), args.results_dir, args.output)


if __name__ == "__main__":
    main()

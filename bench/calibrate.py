"""Calibration time: ``kvlight calibrate`` per backend beside the one-pass floor, one run.

Protocol (issue 5): the embedded default, ``kvlight calibrate`` with its defaults (bf16 model, 32
calibration windows of 512 tokens in batches of 4, 8 evaluation windows, KVSplice 10 epochs over the
captured shards), each in a fresh process with an empty ``$KVLIGHT_CACHE`` so that capture really
runs. The floor is one plain bf16 forward pass (no cache, no grad) over the same calibration windows
in the same batches, in this process after a warm-up batch: calibration cannot need less than
reading its data once through the model. Reported per backend: the fit's wall time (capture +
statistics + any optimizer epochs, as ``calibration_time_s`` in the results JSON), the capture's
share, and the whole command's wall time (process start, model load and the validation perplexity
of both caches included), each also as a multiple of the floor.

    python bench/calibrate.py            # writes bench/results/calibrate.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine  # noqa: E402
from kvlight.calibration.datamodule import KVCalibrationDataModule  # noqa: E402
from kvlight.models import load_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def floor_seconds(batch_size: int, samples: int, seq_len: int) -> tuple[float, int]:
    """Seconds of one bf16 forward over the calibrate command's calibration windows, and their token count."""
    data = KVCalibrationDataModule(batch_size=batch_size, calibration_samples=samples, eval_samples=8, seq_len=seq_len)
    data.setup("fit")
    windows = data.calibration_windows()
    model = load_model(None, torch.bfloat16)
    model(input_ids=windows[:batch_size], use_cache=False)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        model(input_ids=windows[i : i + batch_size], use_cache=False)
    return time.perf_counter() - start, windows.numel()


def calibrate_run(algo: str, work: Path, extra: list[str]) -> dict:
    env = dict(os.environ, KVLIGHT_CACHE=str(work / f"cache-{algo}"))
    output = work / f"out-{algo}"
    command = [sys.executable, "-m", "kvlight.cli", "calibrate", "--compressor", algo, "--output-dir", str(output)]
    command.append("--overwrite")  # a reused --work-dir holds this benchmark's own earlier runs
    start = time.perf_counter()
    done = subprocess.run(command + extra, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"kvlight calibrate --compressor {algo} failed:\n{done.stderr[-2000:]}")
    results = json.loads((output / f"calibration_results_{algo}.json").read_text())
    return {
        "algo": algo,
        "command_wall_s": wall,
        "fit_s": results["calibration_time_s"],
        "capture_s": results["capture_time_s"],
        "perplexity_degradation_pct": results["perplexity_degradation_pct"],
        "memory_savings_pct": results["memory_savings_pct"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibration-samples", type=int, default=32, help="as kvlight calibrate's default")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--work-dir", default=None, help="where the runs write (default: a temporary directory)")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kvlight-calibrate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    floor, tokens = floor_seconds(args.batch_size, args.calibration_samples, args.seq_len)
    print(f"floor: one bf16 forward over {tokens} tokens: {floor:.1f}s", flush=True)
    rows = []
    for algo, target in (("pca", 1.5), ("kvsplice", 3.0)):
        shared = ["--batch-size", str(args.batch_size), "--calibration-samples", str(args.calibration_samples)]
        row = calibrate_run(algo, work, shared + ["--eval-samples", "8", "--seq-len", str(args.seq_len)])
        row.update(target_x=target, fit_x=row["fit_s"] / floor, command_x=row["command_wall_s"] / floor)
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = {
        "machine": machine(),
        "command": "python bench/calibrate.py " + " ".join(sys.argv[1:]),
        "floor_s": floor,
        "tokens": tokens,
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibrate.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Calibration time vs the one-pass floor",
        "",
        f"Machine: {results['machine']}  ",
        f"Command: `{results['command']}`  ",
        f"Floor: one bf16 forward over the {tokens} calibration tokens: **{floor:.1f} s**.",
        "",
        "| backend | fit (capture + fit) | of which capture | x floor (target) | whole command | x floor | ppl change | memory saved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        verdict = "met" if r["fit_x"] <= r["target_x"] else f"missed by {r['fit_x'] - r['target_x']:.2f}x"
        lines.append(
            f"| {r['algo']} | {r['fit_s']:.1f} s | {r['capture_s']:.1f} s | {r['fit_x']:.2f}x (<= {r['target_x']}x: {verdict}) | "
            f"{r['command_wall_s']:.1f} s | {r['command_x']:.2f}x | {r['perplexity_degradation_pct']:+.2f} % | "
            f"{r['memory_savings_pct']:.1f} % |"
        )
    (RESULTS / "calibrate.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

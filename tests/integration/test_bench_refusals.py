"""The decode, memory and distillation-step benchmarks refuse what they cannot measure in one line, exit code 2, before
any model loads: a row whose prompts the text cannot fill, positions beyond the model's, a compressor that is not a
directory, a share of positions outside (0, 1], a step headroom below 1."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

CASES = {
    "text-too-short": (["bench/decode.py", "--lengths", "8000", "--batches", "16"], "need 128000 tokens of text"),
    "past-the-positions": (["bench/decode.py", "--lengths", "8190"], "8192 positions"),
    "not-a-directory": (["bench/decode.py", "--kvlight", "mine=/nonexistent"], "NAME=DIR"),
    "memory-text-too-short": (["bench/memory.py", "--length", "8000", "--batch", "16"], "need 128000 tokens of text"),
    "share-out-of-range": (["bench/distill_step.py", "--shares", "1", "0"], "--shares are fractions in (0, 1]"),
    "headroom-not-a-directory": (["bench/step_headroom.py", "--compressor", "/nonexistent"], "is not a directory"),
    "headroom-below-1": (
        ["bench/step_headroom.py", "--compressor", ".", "--headrooms", "1", "0.8"],
        "--headrooms must lie in [1, 4]",
    ),
}


@pytest.mark.parametrize("args,message", list(CASES.values()), ids=list(CASES))
def test_bench_refusals_are_one_line_exit_2(args, message, tmp_path):
    results = ROOT / "bench" / "results"
    before = {path.name: path.stat().st_mtime_ns for path in results.iterdir()}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert {path.name: path.stat().st_mtime_ns for path in results.iterdir()} == before  # nothing written

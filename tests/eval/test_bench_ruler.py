"""bench/ruler.py's table: one column per solved (task, length), an unsolved one listed once below, each row's time;
a --kvlight row that names no directory is refused in one line before anything loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import ruler  # noqa: E402


def _row(row: str, task: str, length: int, value: float, n: int = 30) -> dict:
    low, high = max(0.0, value - 0.1), min(1.0, value + 0.1)
    return {"row": row, "task": task, "length": length, "value": value, "n": n, "low": low, "high": high}


def test_unsolved_cells_are_reported_once(tmp_path):
    results = {
        "machine": "a machine",
        "command": "python bench/ruler.py",
        "model": "m",
        "prompts": 30,
        "prefill_chunk": 64,
        "rows": [
            _row("DynamicCache", "niah_single_1", 2048, 0.9),
            _row("DynamicCache", "ruler_vt", 2048, 0.1),
            _row("kvlight 12.5 %", "niah_single_1", 2048, 0.8),
        ],
        "unsolved": [{"task": "ruler_vt", "length": 2048, "value": 0.1}],
        "row_seconds": {"DynamicCache": 120.0, "kvlight 12.5 %": 60.0},
    }
    ruler.write(results, tmp_path, "ruler")
    table = (tmp_path / "ruler.md").read_text()
    assert "| row | niah_single_1 @ 2048 | time |" in table
    assert "| DynamicCache | 90.0 [80.0, 100.0] (n=30) | 2.0 min |" in table
    assert "| kvlight 12.5 % | 80.0 [70.0, 90.0] (n=30) | 1.0 min |" in table
    assert table.count("ruler_vt") == 1 and "- ruler_vt @ 2048: 10.0 %" in table
    assert (tmp_path / "ruler.json").is_file()


def test_a_kvlight_row_without_a_directory_is_refused(tmp_path):
    done = subprocess.run(
        [sys.executable, "bench/ruler.py", "--kvlight", "mine=/nonexistent", "--results-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "LABEL=DIR" in done.stderr.splitlines()[-1]
    assert not any(tmp_path.iterdir())

"""bench/recipes.py without kvlight calibrate: the docstring text, the summary, the target lines, the refusals."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench import recipes  # noqa: E402
from bench.common import docstring_documents  # noqa: E402


def test_docstring_text_is_deterministic_and_long():
    first, second = docstring_documents(), docstring_documents()
    assert first == second
    assert sum(map(len, first)) > 100_000
    assert len(first) == len(set(first)) and all(text.strip() for text in first)


def fake_row(budget, dtype, seed, corpus512, corpus2048=1.0, docs2048=1.2, estimate=100.0, took=100.0, passkey=0.9):
    return {
        "budget": budget,
        "dtype": dtype,
        "seed": seed,
        "estimate_s": estimate,
        "took_s": took,
        "estimate_over_took": estimate / took,
        "command_wall_s": took + 10,
        "printed_change_pct": corpus512,
        "kv_budget": budget,
        "seq_len": 512,
        "eval_samples": 8,
        "calibration_samples": 32,
        "calibration_first_token": 4096,
        "overlap_tokens": {"512": 0, "2048": 4096},
        "change_pct": {
            "corpus": {"512": corpus512, "2048": corpus2048},
            "docstrings": {"512": corpus512, "2048": docs2048},
        },
        "passkey": passkey,
    }


def fake_results(rows):
    baseline = {"corpus": {"512": 10.0, "2048": 9.0}, "docstrings": {"512": 20.0, "2048": 18.0}}
    zero = {t: {n: 0.0 for n in ("512", "2048")} for t in ("corpus", "docstrings")}
    quanto = {"corpus": {"512": 2.0, "2048": 2.0}, "docstrings": {"512": 3.0, "2048": 3.0}}
    return {
        "machine": "test",
        "command": "python bench/recipes.py",
        "date": "today",
        "eval_dtype": "float32",
        "windows": {"512": 1, "2048": 1},
        "docstrings": {"modules": ["json"], "documents": 3, "characters": 1000, "python": "3"},
        "rows": rows,
        "references": [
            {"method": recipes.BASELINE_METHOD, "setting": "float32", "perplexity": baseline, "change_pct": zero,
             "passkey": 0.92},
            {"method": recipes.QUANTO_METHOD, "setting": recipes.QUANTO_SETTING, "perplexity": baseline,
             "change_pct": quanto},
        ],
    }  # fmt: skip


def test_summary_mean_and_spread():
    rows = [fake_row(0.24, "float32", s, v) for s, v in enumerate([0.8, 1.0, 0.9])]
    (group,) = recipes.summaries(rows)
    assert group["mean"]["corpus@512"] == pytest.approx(0.9)
    assert group["spread"]["corpus@512"] == pytest.approx(0.2)
    assert group["worst"]["corpus@512"] == pytest.approx(1.0)
    assert group["seeds"] == [0, 1, 2]


def lines_with(lines, *words):
    found = [line for line in lines if all(word in line for word in words)]
    assert len(found) == 1, (words, lines)
    return found[0]


def test_target_lines_met_and_missed(tmp_path, monkeypatch):
    rows = [
        fake_row(0.24, "float32", 0, 0.80, estimate=110, took=100),  # estimate +10 %: met
        fake_row(0.24, "float32", 1, 0.86, estimate=140, took=100),  # +40 %: missed by 15 points
        fake_row(0.24, "bfloat16", 0, 0.95),
        fake_row(0.24, "bfloat16", 1, 1.15),  # bf16 mean 1.05 vs f32 0.83: gap 0.22, missed; spread 0.2: missed
        fake_row(0.125, "float32", 0, 2.5, corpus2048=4.0, docs2048=5.0, passkey=0.90),  # all met
        fake_row(0.125, "bfloat16", 0, 3.5, corpus2048=6.0, docs2048=12.0, passkey=0.80),  # all missed
    ]
    results = fake_results(rows)
    lines = recipes.target_lines(results)
    assert "**met** (margin 15.0 points)" in lines_with(lines, "Estimate", "float32 seed 0", "0.24")
    assert "**missed** (by 15.0 points)" in lines_with(lines, "Estimate", "float32 seed 1", "0.24")
    assert "**missed** (by 0.12 points)" in lines_with(lines, "bf16 mean within")
    assert "**met** (margin 0.09 points)" in lines_with(lines, "Spread", "0.24 float32")
    assert "**missed** (by 0.05 points)" in lines_with(lines, "Spread", "0.24 bfloat16")
    assert "one seed only" in lines_with(lines, "Spread", "0.125 float32")
    assert "**met** (margin 1.00 points)" in lines_with(lines, "1.5x the corpus", "0.125 float32")  # 5.0 <= 6.0
    assert "**missed** (by 3.00 points)" in lines_with(lines, "1.5x the corpus", "0.125 bfloat16")  # 12 > 9
    assert "**missed** (by 3.50 points)" in lines_with(lines, "half of quanto", "0.125 float32")  # 5.0 > 1.5
    assert "**met** (margin 0.30 points)" in lines_with(lines, "half of quanto", "0.24 float32")  # 1.2 <= 1.5
    assert "**met** (margin 0.50 points)" in lines_with(lines, "<= +3 % at 512", "0.125 float32")
    assert "**missed** (by 0.50 points)" in lines_with(lines, "<= +3 % at 512", "0.125 bfloat16")
    assert "**met** (margin 1.00 points)" in lines_with(lines, "<= +5 % at 2048", "0.125 float32")
    assert "**missed** (by 1.00 points)" in lines_with(lines, "<= +5 % at 2048", "0.125 bfloat16")
    assert "**met** (margin 3.0 points)" in lines_with(lines, "Passkey", "0.125 float32")
    assert "**missed** (by 7.0 points)" in lines_with(lines, "Passkey", "0.125 bfloat16")
    # the md holds the tables, the summary and the same target lines
    monkeypatch.setattr(recipes, "RESULTS", tmp_path)
    recipes.write(results, "fake")
    text = (tmp_path / "fake.md").read_text()
    assert all(line in text for line in lines)
    assert "| float32 | 0, 1 | +0.83 % | 0.06 points |" in text
    assert "**Overlap:" in text and (tmp_path / "fake.json").exists()


def test_eval_only_reads_command_and_wall_time_from_the_log(tmp_path):
    log = tmp_path / "b0.24-float32-s0.log"
    log.write_text(f"$ kvlight calibrate --kv-budget 0.24\nnoise\n{recipes.WALL_LINE} 12.500 s, exit 0\n")
    assert recipes.from_log(log) == {
        "log": str(log),
        "calibrate_command": "kvlight calibrate --kv-budget 0.24",
        "command_wall_s": 12.5,
    }
    log.write_text("$ kvlight calibrate --kv-budget 0.24\nKilled\n")
    assert "command_wall_s" not in recipes.from_log(log)
    assert recipes.from_log(tmp_path / "missing.log") == {}


def test_merge_replaces_rows_by_budget_dtype_seed():
    old = fake_results([fake_row(0.24, "float32", 0, 1.0), fake_row(0.24, "float32", 1, 2.0)])
    new = fake_results([fake_row(0.24, "float32", 1, 3.0)])
    rows = recipes.merged(old, new)["rows"]
    assert [(r["seed"], r["printed_change_pct"]) for r in rows] == [(0, 1.0), (1, 3.0)]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budgets", "1.5"], "strictly between 0 and 1"),
        (["--dtypes", "float16"], "invalid choice"),
        (["--calibrate-args", "--seed 3"], "must not hold --seed"),
        (["--eval-only"], "needs --work-dir"),
    ],
)
def test_bad_argument_exits_2_with_one_line(args, message):
    done = subprocess.run(
        [sys.executable, "bench/recipes.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr

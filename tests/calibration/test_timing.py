"""The time estimate: it scales with the work, a time budget shrinks text first and passes second, and
``kvlight calibrate`` prints the estimate before the fit and records it beside what each phase took."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from helpers import one_error_line, tiny_calibrate_args

from kvlight.calibration.timing import Speed, Workload, estimate, fit_time_budget, measure_speed, minutes
from kvlight.cli import main

SPEED = Speed(forward={512: 1.0, 4096: 10.0}, backward={512: 3.0, 4096: 30.0}, rows_step=1.0)
DISTIL = Workload(
    seq_len=4096,
    sensitivity_windows=16,
    sensitivity_len=512,
    capture_windows=16,
    distill_steps=64,
    distill_batch=1,
    reconstruction_epochs=0,
    rows=10_000,
    rows_batch=1024,
    geometry=(30, 3, 64),
    eval_windows=8,
    prerope_keys=True,
)
RECONSTRUCT = replace(DISTIL, seq_len=512, capture_windows=32, distill_steps=0, reconstruction_epochs=10, rows=200_000)


@pytest.mark.parametrize(
    ("change", "phase", "ratio"),
    [
        ({"distill_steps": 128}, "fit", 2.0),
        ({"capture_windows": 32}, "capture", 2.0),
        ({"sensitivity_windows": 8}, "sensitivity", 0.5),
        ({"eval_windows": 16}, "validation", 2.0),
    ],
)
def test_estimate_scales_with_the_work(change, phase, ratio):
    before, after = estimate(DISTIL, SPEED), estimate(replace(DISTIL, **change), SPEED)
    assert after[phase] == pytest.approx(ratio * before[phase])
    assert all(after[name] == before[name] for name in before if name != phase)


@pytest.mark.parametrize("work", [DISTIL, RECONSTRUCT], ids=["distil", "reconstruct"])
def test_estimate_scales_with_the_machine(work):
    slower = Speed({k: 2 * v for k, v in SPEED.forward.items()}, {k: 2 * v for k, v in SPEED.backward.items()}, {}, 2.0)
    for name, seconds in estimate(work, slower).items():
        assert seconds == pytest.approx(2 * estimate(work, SPEED)[name])


def test_reconstruction_epochs_are_estimated_from_the_float32_probe_not_the_model():
    """The epochs run in float32 whatever the model's dtype: a model twice as fast (bf16 on AMX) does not halve them,
    a slower float32 step doubles them, and they scale with the batches an epoch reads."""
    faster_model = replace(SPEED, forward={k: v / 2 for k, v in SPEED.forward.items()})
    assert estimate(RECONSTRUCT, faster_model)["fit"] == estimate(RECONSTRUCT, SPEED)["fit"]
    assert estimate(RECONSTRUCT, replace(SPEED, rows_step=2.0))["fit"] == pytest.approx(
        2 * estimate(RECONSTRUCT, SPEED)["fit"]
    )
    bigger_batches = replace(RECONSTRUCT, rows_batch=2 * RECONSTRUCT.rows_batch)
    assert estimate(bigger_batches, SPEED)["fit"] == pytest.approx(estimate(RECONSTRUCT, SPEED)["fit"] / 2, rel=0.2)


@pytest.mark.parametrize("work", [DISTIL, RECONSTRUCT], ids=["distil", "reconstruct"])
def test_a_time_budget_shrinks_text_first_then_passes(work):
    full = sum(estimate(work, SPEED).values())
    shrunk = fit_time_budget(work, SPEED, 0.7 * full)
    assert sum(estimate(shrunk, SPEED).values()) <= 0.7 * full
    assert shrunk.capture_windows < work.capture_windows
    if work.distill_steps:  # the passes over the text stay while the text shrinks
        passes = work.distill_steps / work.capture_windows
        assert shrunk.distill_steps / shrunk.capture_windows == pytest.approx(passes, rel=0.15)
    assert fit_time_budget(work, SPEED, 10 * full) == work  # a plan that fits is left alone


def test_an_impossible_time_budget_gives_the_smallest_plan():
    smallest = fit_time_budget(DISTIL, SPEED, 1.0)
    assert smallest.capture_windows == 4 and smallest.distill_steps == 4  # one pass over 4 windows
    assert fit_time_budget(RECONSTRUCT, SPEED, 1.0).reconstruction_epochs == 1


def test_distillation_on_a_share_of_the_positions_is_estimated_from_its_own_probe():
    """A step that compares a share of the positions (distill_tokens) costs what its probe timed, not a full step."""
    kept = replace(SPEED, kept={4096: 20.0})  # teacher and student with logits at the kept positions: 20 s, not 40
    half = replace(DISTIL, distill_tokens=0.5)
    assert estimate(half, kept)["fit"] == pytest.approx(0.5 * estimate(DISTIL, kept)["fit"])
    assert estimate(DISTIL, kept) == estimate(DISTIL, SPEED)  # every position: the full step, whatever was probed
    assert estimate(half, SPEED) == estimate(DISTIL, SPEED)  # not probed: the full step is the safe side


@pytest.mark.parametrize("tokens", [1.0, 0.25])
@pytest.mark.parametrize("rows", [None, ((2, 2, 8), 64)])
def test_measure_speed_times_each_length(tiny_models, tokens, rows):
    speed = measure_speed(tiny_models["llama"], (16, 64), distill_tokens=tokens, rows=rows)
    assert set(speed.forward) == set(speed.backward) == {16, 64}
    assert set(speed.kept) == (set() if tokens == 1 else {64})  # the calibration windows' length, the longest
    assert (speed.rows_step > 0) == (rows is not None)
    assert all(seconds > 0 for seconds in (*speed.forward.values(), *speed.backward.values(), *speed.kept.values()))
    assert not any(p.grad is not None for p in tiny_models["llama"].parameters())  # the model stays untouched


@pytest.mark.parametrize(("seconds", "shown"), [(12.4, "12 s"), (150, "2.5 min"), (4320, "1 h 12 min")])
def test_minutes_reads_as_a_duration(seconds, shown):
    assert minutes(seconds) == shown


def test_calibrate_prints_its_estimate_and_records_the_phases(tmp_path, tiny_llama_path, kvlight_cache, capsys):
    output = tmp_path / "out"
    argv = tiny_calibrate_args(tiny_llama_path, output, "--compressor", "pca", "--epochs", "1")
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    estimate_line = next(i for i, line in enumerate(lines) if line.startswith("Time estimate:"))
    assert estimate_line < next(i for i, line in enumerate(lines) if line.startswith("KV budget:"))
    assert re.search(r"^Recipe: .*the frontier's best at 25 %", stdout, flags=re.MULTILINE)
    results = json.loads((output / "calibration_results_pca.json").read_text())
    assert set(results["estimated_seconds"]) | {"setup"} == set(results["phase_seconds"]) == {
        "setup", "sensitivity", "capture", "fit", "validation"
    }  # fmt: skip
    assert results["phase_seconds"]["sensitivity"] > 0 and results["estimated_seconds"]["sensitivity"] > 0
    assert sum(results["phase_seconds"].values()) == pytest.approx(results["fit_and_validate_seconds"], rel=0.05)
    probe = results["time_probe"]  # what the estimate was made from: the model's forward at the run's lengths
    assert set(probe["forward"]) == set(probe["backward"]) and all(v > 0 for v in probe["forward"].values())


def test_calibrate_time_budget_shrinks_the_plan(tmp_path, tiny_llama_path, kvlight_cache, capsys):
    output = tmp_path / "out"
    argv = tiny_calibrate_args(tiny_llama_path, output, "--calibration-samples", "16", "--time-budget", "0.0001")
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    budget = re.search(r"^Time budget: .*", stdout, flags=re.MULTILINE).group(0)
    assert "4 calibration windows instead of 16" in budget and "the smallest plan still takes" in budget
    results = json.loads((output / "calibration_results_kvsplice.json").read_text())
    assert results["calibration_samples"] == 4


@pytest.mark.parametrize("value", ["0", "-5", "nan", "soon"])
def test_a_bad_time_budget_is_one_line_exit_2(value, tmp_path, tiny_llama_path, kvlight_cache, capfd):
    output = tmp_path / "out"
    assert main(tiny_calibrate_args(tiny_llama_path, output, "--time-budget", value)) == 2
    assert "--time-budget" in one_error_line(capfd.readouterr().err)
    assert not output.exists()

"""Budget recipes: each budget picks its recipe, flags the user gives override it, a backend that cannot train drops
its distillation, the retrieval warning, and the README's table is the recipe table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kvlight.calibration.recipes import (
    RECIPES,
    RETRIEVAL_TOLERANCE,
    TRAINING_FLAGS,
    UNCOMPRESSED_PASSKEY,
    apply,
    markdown_table,
    recipe_for,
)
from kvlight.cli import calibrate
from kvlight.compressors.registry import backend, backend_names
from kvlight.errors import KVLightError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("budget", "picked"),
    [
        (0.24, 0.25),  # the default budget: the default recipe
        (0.5, 0.25),
        (0.9, 0.25),
        (0.2, 0.1875),
        (0.1875, 0.1875),
        (0.15, 0.125),  # nearer 0.125 than 0.1875 by ratio (1.2x vs 1.25x)
        (0.125, 0.125),
        (0.11, 0.125),
        (0.094, 0.09375),
        (0.0625, 0.0625),
        (0.01, 0.0625),
    ],
)
def test_each_budget_picks_the_nearest_recipe(budget, picked):
    assert recipe_for(budget).budget == picked


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.1, float("nan")])
def test_no_recipe_outside_the_budget_range(budget):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        recipe_for(budget)


def test_recipes_name_registered_backends_and_real_flags():
    names = {flag.name for flag in calibrate.FLAGS}
    budgets = [recipe.budget for recipe in RECIPES]
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == len(budgets)
    for recipe in RECIPES:
        assert recipe.backend in backend_names()
        assert {flag for flag, _ in recipe.flags()} <= names, recipe
        if recipe.distils:  # distillation needs a backend that trains
            assert backend(recipe.backend).trainable


def test_flags_given_override_the_recipe():
    recipe = recipe_for(0.125)
    applied = apply(0.125, {"--seq-len": "1024", "--lr": "3e-4"})
    taken = dict(applied.taken)
    assert "--seq-len" not in taken and "--lr" not in taken
    assert applied.overridden == ("--seq-len",)  # the same value as the recipe's overrides nothing
    assert taken["--objective"] == "kl" and taken["--compressor"] == recipe.backend
    assert set(taken) | {"--seq-len", "--lr"} == {flag for flag, _ in recipe.flags()}
    assert "your --seq-len replace" in applied.summary()


def test_a_backend_that_does_not_train_drops_the_distillation():
    applied = apply(0.125, {"--compressor": "pca"})
    taken = dict(applied.taken)
    assert not set(taken) & set(TRAINING_FLAGS)
    assert set(applied.dropped) == {flag for flag, _ in recipe_for(0.125).settings if flag in TRAINING_FLAGS}
    assert taken["--key-rope-block"] == "1"  # what PCA can serve stays
    assert "left out: the backend does not train" in applied.summary()


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda recipe: f"{recipe.budget:g}")
def test_the_retrieval_warning_follows_the_measured_passkey(recipe):
    warning = recipe.retrieval_warning(recipe.budget)
    keeps = recipe.measured.passkey_pct >= UNCOMPRESSED_PASSKEY - RETRIEVAL_TOLERANCE
    assert (warning is None) == keeps
    if warning is not None:
        assert "\n" not in warning and f"{recipe.measured.passkey_pct:.1f} %" in warning


def test_low_budgets_warn_and_the_default_does_not():
    assert recipe_for(0.24).retrieval_warning(0.24) is None
    assert recipe_for(0.125).retrieval_warning(0.125) is None
    assert "44.4 %" in recipe_for(0.094).retrieval_warning(0.094)


@pytest.mark.parametrize("page", ["README.md", "docs/results.md"])
def test_the_which_setting_tables_are_the_recipes(page):
    text = (ROOT / page).read_text()
    section = text.split("## Which setting for which budget", 1)[1]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    table = table.split("\n\n")[0]
    assert table.startswith(markdown_table()), f"{page}: regenerate the table with kvlight.calibration.recipes"


# ---------------------------------------------------------------------- kvlight calibrate's flags


def parsed(*argv: str):
    _, config, applied = calibrate.arguments(list(argv))
    return config, applied


def test_calibrate_with_a_budget_alone_runs_its_recipe():
    config, applied = parsed("--kv-budget", "0.125")
    assert applied.recipe.budget == 0.125
    assert config.data.seq_len == 4096 and config.data.calibration_samples == 16
    assert config.model.objective.objective == "kl" and config.model.objective.lr == pytest.approx(3e-4)
    assert config.model.compression.key_rope_block == 1 and config.calibrate.epochs == 4
    assert config.model.compression.compressor == "kvsplice" and config.model.objective.distill_tokens == 0.5


def test_calibrate_flags_override_the_recipe_one_by_one():
    config, applied = parsed("--kv-budget", "0.125", "--seq-len", "1024", "--epochs", "2", "--distill-tokens", "1")
    assert config.data.seq_len == 1024 and config.calibrate.epochs == 2 and config.model.objective.distill_tokens == 1
    assert config.model.objective.objective == "kl" and config.data.calibration_samples == 16
    assert set(applied.overridden) == {"--seq-len", "--epochs", "--distill-tokens"}


def test_a_given_step_headroom_replaces_the_default_recipes():
    config, applied = parsed("--step-headroom", "1")
    assert config.model.compression.step_headroom == 1.0 and applied.overridden == ("--step-headroom",)


def test_calibrate_old_budget_spelling_picks_the_same_recipe():
    config, applied = parsed("--target-memory-reduction", "0.875")
    assert applied.recipe.budget == 0.125 and config.data.seq_len == 4096


def test_calibrate_default_takes_the_default_recipe():
    config, applied = parsed()
    assert applied.recipe.budget == 0.25
    assert applied.recipe.settings == (("--sensitivity-samples", "32"), ("--step-headroom", "1.3"))
    assert config.model.compression.sensitivity_samples == 32 and config.model.compression.step_headroom == 1.3
    assert config.model.objective.objective == "reconstruction" and config.data.seq_len == 512


@pytest.mark.parametrize("fixed", [("--rank", "8"), ("--rank-k", "8"), ("--compression-config", "c.json")])
def test_no_recipe_without_an_allocation(fixed):
    config, applied = parsed(*fixed)
    assert applied is None and config.model.objective.objective == "reconstruction"


def test_a_bad_budget_is_still_one_line():
    with pytest.raises(KVLightError, match=re.escape("--kv-budget '2' must be a fraction")):
        parsed("--kv-budget", "2")


def test_calibrate_warns_in_one_line_when_the_recipe_loses_retrieval(tmp_path, tiny_llama_path, kvlight_cache, capfd):
    from helpers import tiny_calibrate_args

    from kvlight.cli import main

    output = tmp_path / "out"
    argv = tiny_calibrate_args(tiny_llama_path, output, "--kv-budget", "0.094", "--epochs", "1")
    assert main(argv) == 0
    captured = capfd.readouterr()
    warnings = [line for line in captured.err.splitlines() if "does not keep retrieval" in line]
    assert len(warnings) == 1 and "44.4 %" in warnings[0] and warnings[0].startswith("kvlight: warning:")
    assert re.search(r"^Recipe: .* --objective kl", captured.out, flags=re.MULTILINE)
    assert re.search(r"^fit: (\d+)/\1 steps, about 0 s left$", captured.out, flags=re.MULTILINE), captured.out
    assert (output / "calibration_results_kvsplice.json").exists()


@pytest.mark.parametrize(
    ("shape", "length", "samples", "expected"),
    [
        ((16, 4096), 512, 16, (16, 512)),  # the 12.5 % recipe: its first two windows, cut in eight
        ((2, 1000), 512, 16, (2, 512)),  # a tail shorter than the length is left out
        ((32, 512), 512, 16, (16, 512)),  # windows of the length are taken as they are
        ((4, 256), 512, 16, (4, 256)),  # shorter windows too
        ((16, 4096), None, 4, (4, 4096)),  # None: the calibration windows' own length
    ],
)
def test_the_sensitivity_pass_cuts_long_windows(shape, length, samples, expected):
    import torch

    from kvlight.calibration.callbacks import sensitivity_windows
    from kvlight.calibration.options import CompressionOptions

    windows = torch.arange(shape[0] * shape[1]).reshape(shape)
    cut = sensitivity_windows(windows, CompressionOptions(sensitivity_samples=samples, sensitivity_seq_len=length))
    assert tuple(cut.shape) == expected
    assert torch.equal(cut[0], windows[0, : expected[1]])  # consecutive tokens, from the start
    if 2 * expected[1] <= shape[1]:  # the next piece of the same window comes next
        assert torch.equal(cut[1], windows[0, expected[1] : 2 * expected[1]])

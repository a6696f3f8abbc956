"""One name per thing across the commands: ``--kv-budget`` for the budget, ``--compressor`` for the backend,
``--compression-config`` for the compression JSON, the old names as deprecated aliases (one warning line; given with
the new name, one error line); help in sections with the choices listed and no reST; ``kvlight --version``;
``kvlight config --help``; ``kvlight calibrate --push-to-hub`` (the upload mocked: no network)."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

import pytest
from helpers import one_error_line, tiny_calibrate_args

import kvlight
from kvlight.cli import analyze, calibrate, config_command, main
from kvlight.cli.flags import kv_budget, plain
from kvlight.compressors.registry import backend_names
from kvlight.errors import KVLightError


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["kvlight"])


# ---------------------------------------------------------------------- the budget
@pytest.mark.parametrize(("budget", "reduction"), [("0.24", 0.76), ("0.125", 0.875), ("0.5", 0.5), ("1e-3", 0.999)])
def test_kv_budget_is_the_fraction_kept(budget, reduction):
    assert float(kv_budget(budget)) == pytest.approx(reduction, abs=1e-12)


@pytest.mark.parametrize("budget", ["0", "1", "1.5", "-0.2", "nan", "inf", "a quarter", ""])
def test_a_budget_outside_0_1_is_one_line(budget):
    with pytest.raises(KVLightError, match="--kv-budget .* strictly between 0 and 1") as caught:
        kv_budget(budget)
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("command", ["calibrate", "analyze"])
@pytest.mark.parametrize("budget", ["0", "1.2", "nan"])
def test_a_bad_budget_ends_the_command_at_once(command, budget, tmp_path, capfd, kvlight_cache):
    output = tmp_path / "out"
    start = time.perf_counter()
    assert main([command, "--output-dir", str(output), "--kv-budget", budget]) == 2
    assert time.perf_counter() - start < 5.0  # before any model or text is loaded
    assert "--kv-budget" in one_error_line(capfd.readouterr().err)
    assert not output.exists() and not kvlight_cache.exists()


def _calibrate_target(argv: list[str]) -> float | None:
    return calibrate.arguments(argv)[1].model.compression.target_memory_reduction


def _analyze_target(argv: list[str]) -> float:
    return analyze.arguments(argv).target_memory_reduction


@pytest.mark.parametrize("parse", [_calibrate_target, _analyze_target], ids=["calibrate", "analyze"])
def test_kv_budget_and_the_old_flag_set_the_same_option(parse, caplog):
    with caplog.at_level(logging.WARNING, logger="kvlight.cli"):
        assert parse(["--kv-budget", "0.3"]) == pytest.approx(0.7)
    assert caplog.records == []  # the new name does not warn
    with caplog.at_level(logging.WARNING, logger="kvlight.cli"):
        assert parse(["--target-memory-reduction", "0.7"]) == pytest.approx(0.7)
    (record,) = caplog.records
    assert record.getMessage() == (
        "kvlight: warning: --target-memory-reduction is deprecated; use --kv-budget 0.3, the fraction kept "
        "(1 - the reduction)"
    )


def test_the_default_budget_is_the_recommended_one():
    from kvlight.config import RECOMMENDED

    assert _calibrate_target([]) is None  # None: the recommended target, resolved where the widths are allocated
    assert _analyze_target([]) == RECOMMENDED["target_memory_reduction"] == pytest.approx(1 - 0.24)
    assert _analyze_target(["--strategy", "budget"]) == 0.5  # rank strategies: half the cache, as before


@pytest.mark.parametrize("budget", ["--kv-budget", "--target-memory-reduction"])
@pytest.mark.parametrize("other", [["--rank", "8"], ["--compression-config", "cfg.json"]])
def test_a_budget_with_ranks_or_a_config_is_one_line_naming_the_flag_given(budget, other, tmp_path, capfd):
    value = "0.25" if budget == "--kv-budget" else "0.75"
    assert main(["calibrate", "--output-dir", str(tmp_path / "out"), budget, value, *other]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert f"{budget} allocates a width per principal direction; it does not combine" in line


# ---------------------------------------------------------------------- old names
#: (command, old flag and value, new flag and value): the old name warns once and means what the new one does.
ALIASES = {
    "calibrate --target-memory-reduction": (["calibrate"], ["--target-memory-reduction", "0.75"], ["--kv-budget", "0.25"]),
    "calibrate --config": (["calibrate"], ["--config", "cfg.json"], ["--compression-config", "cfg.json"]),
    "analyze --target-memory-reduction": (["analyze"], ["--target-memory-reduction", "0.75"], ["--kv-budget", "0.25"]),
    "analyze --algo": (["analyze"], ["--algo", "pca"], ["--compressor", "pca"]),
    "config uniform --algo": (["config", "uniform"], ["--algo", "pca"], ["--compressor", "pca"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(ALIASES))
def test_old_and_new_name_together_is_one_line_exit_2(case, tmp_path, capfd):
    command, old, new = ALIASES[case]
    assert (
        main([*command, *old, *new, "--output-dir" if command != ["config", "uniform"] else "-o", str(tmp_path)]) == 2
    )
    line = one_error_line(capfd.readouterr().err)
    assert f"{old[0]} is the old name of {new[0]}: give {new[0]} alone" in line
    assert list(tmp_path.iterdir()) == []


def test_config_uniform_algo_still_works_and_warns(tiny_llama_path, tmp_path, caplog, capsys):
    from kvlight.config import CompressionConfig

    written = {}
    for flag in ("--algo", "--compressor"):
        path = tmp_path / f"{flag.strip('-')}.json"
        with caplog.at_level(logging.WARNING, logger="kvlight.cli"):
            assert (
                main(["config", "uniform", "--model", tiny_llama_path, "--rank", "8", flag, "pca", "-o", str(path)])
                == 0
            )
        written[flag] = CompressionConfig.from_json(path).to_dict()
    assert written["--algo"] == written["--compressor"] and written["--algo"]["global"]["algo_default"] == "pca"
    assert [r.getMessage() for r in caplog.records] == ["kvlight: warning: --algo is deprecated; use --compressor"]


def test_the_deprecation_warning_is_one_stderr_line_on_a_terminal(tiny_llama_path, tmp_path):
    argv = ["config", "uniform", "--model", tiny_llama_path, "--rank", "8", "--algo", "pca", "-o", str(tmp_path / "c")]
    done = subprocess.run(
        [sys.executable, "-m", "kvlight.cli", *argv], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["kvlight: warning: --algo is deprecated; use --compressor"]


# ---------------------------------------------------------------------- the same defaults everywhere
def test_every_command_defaults_to_the_backend_calibrate_uses():
    from kvlight.analysis.bit_allocation import WHITENED
    from kvlight.calibration.options import CompressionOptions
    from kvlight.compressors.registry import backend

    # calibrate's default: the recommended weighting, a whitened basis only KVSplice-like heads serve
    assert CompressionOptions().weighting in WHITENED and backend("kvsplice").weighted_objectives
    assert analyze.AnalyzeOptions().compressor == config_command.UniformConfig().compressor == "kvsplice"
    shown = {flag.name: flag.shown for flag in calibrate.FLAGS}
    assert shown["--compressor"] == "kvsplice"


def test_analyze_defaults_to_widths_as_calibrate_does():
    assert analyze.AnalyzeOptions().strategy == "bits"
    assert analyze.arguments([]).strategy == "bits"


# ---------------------------------------------------------------------- help
SECTIONS = {
    calibrate: ["basic:", "budget:", "training:", "hardware:"],
    analyze: ["basic:", "budget:", "measurement:", "imported metrics", "tiers strategy:", "hardware:"],
}


def _help(argv: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [["calibrate"], ["analyze"], ["config", "uniform"]], ids=" ".join)
def test_help_lists_choices_and_shows_no_markup(argv, capsys, monkeypatch):
    text = _help(argv, capsys, monkeypatch)
    backends = "{" + ",".join(backend_names()) + "}"
    assert f"--compressor {backends}" in text
    for markup in ("``", ":class:", ":attr:", ":data:", ":func:", "kvlight.compressors", "kvlight.analysis"):
        assert markup not in text, markup
    for old in ("--algo", "--target-memory-reduction", "--config "):
        assert old not in text, old  # deprecated names are accepted, not advertised


@pytest.mark.parametrize("command", list(SECTIONS), ids=lambda c: c.__name__.rsplit(".", 1)[-1])
def test_help_comes_in_sections(command, capsys, monkeypatch):
    text = _help([command.__name__.rsplit(".", 1)[-1]], capsys, monkeypatch)
    starts = [text.index(f"\n{section}") for section in SECTIONS[command]]
    assert starts == sorted(starts)
    assert "--bits-weighting {fisher,fisher-joint,fisher-white,mse,query,uniform}" in text
    assert "--kv-budget B " in text and "(default: 0.24;" in text
    if command is calibrate:
        budget = text[text.index("\nbudget:") : text.index("\ntraining:")]
        assert "--rank RANK" in budget and "--epochs" not in budget
        assert text.index("\n  --devices") > text.index("\nhardware:")


@pytest.mark.parametrize(
    ("docstring", "shown"),
    [
        (
            "the backend (kvlight.compressors.registry); None: each head's ``algo``.",
            "the backend; None: each head's algo.",
        ),
        ("None: the recommended one (:attr:`weighting`).", "None: the recommended one (weighting)."),
        ("a :class:`~kvlight.errors.KVLightError` line", "a KVLightError line"),
        ("see :data:`kvlight.config.RECOMMENDED`", "see kvlight.config.RECOMMENDED"),
        ("renamed into place at the end, see kvlight.outputs)", "renamed into place at the end)"),
    ],
)
def test_docstrings_become_plain_help(docstring, shown):
    assert plain(docstring) == shown


# ---------------------------------------------------------------------- kvlight, kvlight config
def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"kvlight {kvlight.__version__}\n" == "kvlight 0.1.0\n"
    # and at once: without importing torch
    probe = "import sys; from kvlight.cli import main; main(['--version']); print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout == f"kvlight {kvlight.__version__}\nFalse\n"


def test_top_level_help_lists_the_commands_and_version(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert "--version" in text
    for command in ("fit", "validate", "calibrate", "analyze", "config"):
        assert f"\n  {command} " in text


def test_config_help_lists_its_subcommands(capsys):
    assert main(["config", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: kvlight config {uniform}") and "kvlight config uniform --rank" in text


@pytest.mark.parametrize("argv", [["config"], ["config", "bogus"]])
def test_config_without_a_subcommand_is_one_line_exit_2(argv, capfd):
    assert main(argv) == 2
    assert "kvlight config uniform" in one_error_line(capfd.readouterr().err)


# ---------------------------------------------------------------------- --push-to-hub
@pytest.fixture
def hub_login(monkeypatch):
    """Online, with a token (nothing is sent: the upload itself is mocked where a test gets that far)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")


@pytest.mark.parametrize(
    ("repo", "fragment"),
    [
        ("a/b/c", "is not a Hugging Face repo id"),
        ("has space/x", "is not a Hugging Face repo id"),
        ("me/a--b", "is not a Hugging Face repo id"),
        ("me/-x", "is not a Hugging Face repo id"),
        ("", "is not a Hugging Face repo id"),
    ],
)
def test_a_bad_repo_id_fails_before_anything_loads(repo, fragment, hub_login, tmp_path, capfd, kvlight_cache):
    output = tmp_path / "out"
    start = time.perf_counter()
    assert main(["calibrate", "--output-dir", str(output), "--push-to-hub", repo]) == 2
    assert time.perf_counter() - start < 5.0
    line = one_error_line(capfd.readouterr().err)
    assert f"--push-to-hub {repo!r} {fragment}" in line
    assert not output.exists() and not kvlight_cache.exists()


@pytest.mark.parametrize("trouble", ["offline", "no token"])
def test_a_push_that_cannot_happen_fails_before_the_run(trouble, tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test")
    if trouble == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    output = tmp_path / "out"
    assert main(["calibrate", "--output-dir", str(output), "--push-to-hub", "me/kv"]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert ("HF_HUB_OFFLINE" in line) if trouble == "offline" else ("hf auth login" in line and "HF_TOKEN" in line)
    assert not output.exists()


def test_push_to_hub_uploads_the_compressor_directory_with_a_card(
    hub_login, tiny_llama_path, tmp_path, kvlight_cache, capsys, monkeypatch
):
    pytest.importorskip("kvlight.compressors.hub")
    pytest.importorskip("kvlight.compressors.card")
    pushed, carded = [], []

    def push_directory(directory, repo_id, **kwargs):
        pushed.append((directory, repo_id, sorted(p.name for p in directory.iterdir())))
        return f"https://huggingface.co/{repo_id}"

    def model_card(results, compressor, command, repo_id=None):
        carded.append((results, compressor, command, repo_id))
        return "---\nlibrary_name: kvlight\n---\n# card\n"

    monkeypatch.setattr("kvlight.compressors.hub.push_directory", push_directory)
    monkeypatch.setattr("kvlight.compressors.card.model_card", model_card)
    output = tmp_path / "out"
    argv = tiny_calibrate_args(tiny_llama_path, output, "--rank", "8", "--compressor", "pca", "--push-to-hub", "me/kv")
    assert main(argv) == 0
    stdout = capsys.readouterr().out

    directory = output / "compressor_pca"
    ((where, repo, files),) = pushed
    assert (where, repo) == (directory, "me/kv")  # the published directory, after the run's files are in place
    assert "README.md" in files and (directory / "README.md").read_text().startswith("---\nlibrary_name: kvlight")
    ((results, compressor, command, repo_id),) = carded
    assert repo_id == "me/kv"  # the card's loading snippet names the repository
    assert results["compressor"] == "pca" and 0 < results["kv_budget"] < 1
    assert callable(compressor.save_pretrained)
    assert command.startswith("kvlight calibrate ") and "--push-to-hub me/kv" in command
    assert stdout.rstrip().endswith(f"Pushed {directory} to https://huggingface.co/me/kv")

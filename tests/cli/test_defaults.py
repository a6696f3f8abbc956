"""One default per option: ``kvlight fit``, ``calibrate``, ``analyze`` and ``config uniform`` read the same classes.

Every flag of the one-shot commands is a name for a key of the classes LightningCLI builds; these tests compare the
default each command would use with the one ``kvlight fit --print_config`` resolves, with the options dataclasses'
own defaults, and with what ``--help`` tells the user.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from kvlight.calibration.datamodule import KVCalibrationDataModule
from kvlight.calibration.options import CompressionOptions, ObjectiveOptions, RuntimeOptions
from kvlight.cli import analyze, calibrate, config_command
from kvlight.cli.flags import namespace_get

COMMANDS = [calibrate, analyze]
SHARED = ("model", "data", "trainer")  # key groups that kvlight fit has too


@pytest.fixture(scope="module")
def fit_defaults():
    """The config ``kvlight fit`` resolves with no arguments (``--print_config``: parsed, nothing instantiated)."""
    import contextlib
    import io
    import sys
    from unittest import mock

    from kvlight.cli.lightning import lightning_cli

    out = io.StringIO()
    with (
        mock.patch.object(sys, "argv", ["kvlight"]),
        contextlib.redirect_stdout(out),
        pytest.raises(SystemExit) as exit_info,
    ):
        lightning_cli(["fit", "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def shared_keys(command):
    return [key for flag in command.FLAGS if flag.switch is None for key in flag.keys if key.split(".")[0] in SHARED]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.__name__.rsplit(".", 1)[-1])
def test_flags_default_to_what_fit_uses(command, fit_defaults):
    defaults = command.source_parser().get_defaults()
    keys = shared_keys(command)
    assert len(keys) >= 8  # the data flags and the compression flags at least
    for key in keys:
        assert namespace_get(defaults, key) == namespace_get(fit_defaults, key), key


@pytest.mark.parametrize(
    ("group", "options"),
    [("compression", CompressionOptions), ("objective", ObjectiveOptions), ("runtime", RuntimeOptions)],
)
def test_fit_defaults_are_the_dataclasses(group, options, fit_defaults):
    for field in dataclasses.fields(options):
        assert fit_defaults["model"][group][field.name] == field.default, f"model.{group}.{field.name}"


def test_data_defaults_are_the_datamodules(fit_defaults):
    for name, parameter in inspect.signature(KVCalibrationDataModule.__init__).parameters.items():
        if name in ("self", "model"):  # model is linked from model.model
            continue
        assert fit_defaults["data"][name] == parameter.default, f"data.{name}"
    assert fit_defaults["data"]["calibration_samples"] == 32  # the one value issue 12 found declared three ways


def test_config_uniform_shares_the_compression_defaults():
    defaults = config_command.source_parser().get_defaults()
    for flag in config_command.FLAGS:
        group, _, name = flag.keys[0].partition(".")
        if group == "compression":
            assert namespace_get(defaults, flag.keys[0]) == getattr(CompressionOptions(), name), flag.name


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.__name__.rsplit(".", 1)[-1])
def test_help_shows_the_default_and_key_each_flag_uses(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per flag: no key broken across lines
    with pytest.raises(SystemExit):
        command.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = command.source_parser().get_defaults()
    for flag in command.FLAGS:
        key = flag.keys[0]
        if flag.alias_of is not None:  # a deprecated name: accepted, not shown
            assert f"{flag.name} " not in text, flag.name
            continue
        if flag.switch is not None:
            assert f"(sets {key} {flag.switch})" in text, flag.name
            continue
        value = namespace_get(defaults, key)
        shown = flag.shown if flag.shown is not None else "none" if value is None else value
        assert f"(default: {shown}; {key}" in text, flag.name


def test_help_keeps_a_percent_sign_of_a_docstring():
    """argparse %-formats help: a docstring's "12.5 %" must show as written, not crash ``--help``."""
    import argparse

    from kvlight.cli.flags import Flag, add_flags

    source = argparse.ArgumentParser()
    source.add_argument("--keep", dest="model.keep", default=0.5, help="keeps 12.5 % of the bytes")
    parser = argparse.ArgumentParser()
    add_flags(parser, (Flag("--keep", ("model.keep",)),), source)
    assert "keeps 12.5 % of the bytes" in " ".join(parser.format_help().split())

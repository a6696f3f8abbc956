"""Bad flags and bad input files, through the command line in-process (issue 13, "input and messages"): each one ends
the command at once with exit code 2 and exactly one stderr line naming the flag or file and what to do, before a
model, text or Trainer is loaded, and leaves nothing behind (no output directory, no capture, no lightning_logs/).
Also: a fit that diverges stops naming the layer and head and writes nothing; a full disk is one line."""

import errno
import re
import subprocess
import sys
from pathlib import Path

import lightning.pytorch  # noqa: F401  (imported before any capture: its log handler then keeps the real stderr)
import pytest
import torch
from helpers import one_error_line, tiny_calibrate_args

from kvlight.cli import main

#: a number no option takes and Python's int() refuses (over 4300 digits): a plain ValueError used to escape.
HUGE = "9" * 5000


def _file(tmp: Path, name: str, content: str | bytes) -> str:
    path = tmp / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


#: hostile files by name: (file name, content).
FILES = {
    "binary": ("binary.yaml", bytes(range(256)) * 8),
    "huge yaml": ("huge.yaml", f"data:\n  seq_len: {HUGE}\n"),
    "huge config": (
        "cfg.json",
        f'{{"global": {{"target_memory_reduction": 0.5, "d_head": {HUGE}}}, "per_layer_head": {{}}}}',
    ),
    "huge metrics": ("metrics.json", f'[{{"layer": {HUGE}, "head": 0}}]'),
}


def _hostile(tmp: Path, kind: str) -> str:
    return _file(tmp, *FILES[kind])


def _truncated(tmp: Path) -> str:
    path = tmp / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(64)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    return str(path)


def _directory(tmp: Path) -> str:
    (tmp / "a-directory").mkdir()
    return str(tmp / "a-directory")


# (argv builder, fragments of the one error line). Builders get (tmp_path, tiny llama dir, tiny gpt2 dir, output).
CASES = {
    "lr-nan": (lambda t, m, g, o: tiny_calibrate_args(m, o, "--lr", "nan"), ["--lr must be a positive finite"]),
    "lr-inf": (lambda t, m, g, o: tiny_calibrate_args(m, o, "--lr", "inf"), ["--lr must be a positive finite"]),
    "lr-negative": (lambda t, m, g, o: tiny_calibrate_args(m, o, "--lr", "-1"), ["--lr", "got -1"]),
    "step-headroom-below-1": (
        lambda t, m, g, o: tiny_calibrate_args(m, o, "--step-headroom", "0.5"),
        ["--step-headroom must be a number from 1", "got 0.5"],
    ),
    "step-headroom-nan": (
        lambda t, m, g, o: tiny_calibrate_args(m, o, "--step-headroom", "nan"),
        ["--step-headroom must be a number from 1"],
    ),
    "step-headroom-text": (
        lambda t, m, g, o: tiny_calibrate_args(m, o, "--step-headroom", "wide"),
        ["--step-headroom"],
    ),
    "precision": (lambda t, m, g, o: tiny_calibrate_args(m, o, "--precision", "foo"), ["--precision", "'foo'"]),
    "devices-0": (lambda t, m, g, o: tiny_calibrate_args(m, o, "--devices", "0"), ["--devices '0'", "positive"]),
    "devices-abc": (lambda t, m, g, o: tiny_calibrate_args(m, o, "--devices", "abc"), ["--devices 'abc'"]),
    "seq-len-1": (lambda t, m, g, o: tiny_calibrate_args(m, o, "--seq-len", "1"), ["--seq-len must be at least 2"]),
    "seq-len-past-gpt2": (
        lambda t, m, g, o: tiny_calibrate_args(g, o, "--seq-len", "1000", "--calibration-samples", "1"),
        ["--seq-len 1000", "512 positions", "--seq-len 512 or less"],
    ),
    "seq-len-past-llama": (
        lambda t, m, g, o: tiny_calibrate_args(m, o, "--seq-len", "513", "--calibration-samples", "1"),
        ["--seq-len 513", "512 positions"],
    ),
    "unknown-flag": (
        lambda t, m, g, o: tiny_calibrate_args(m, o, "--bogus", "1"),
        ["unrecognized arguments: --bogus 1", "see 'kvlight calibrate --help'"],
    ),
    "missing-value": (
        lambda t, m, g, o: [*tiny_calibrate_args(m, o), "--rank"],
        ["argument --rank: expected one argument", "--help"],
    ),
    "analyze-unknown-flag": (lambda t, m, g, o: ["analyze", "--bogus"], ["--bogus", "see 'kvlight analyze --help'"]),
    "config-unknown-flag": (
        lambda t, m, g, o: ["config", "uniform", "--bogus"],
        ["--bogus", "see 'kvlight config uniform --help'"],
    ),
    "config-output-is-a-directory": (
        lambda t, m, g, o: ["config", "uniform", "--model", m, "--rank", "4", "-o", _directory(t)],
        ["is a directory", "cfg.json"],
    ),
    "compression-config-huge-int": (
        lambda t, m, g, o: tiny_calibrate_args(m, o, "--compression-config", _hostile(t, "huge config")),
        ["cfg.json", "integer too long"],
    ),
    "metrics-file-huge-int": (
        lambda t, m, g, o: [
            "analyze",
            "--model",
            m,
            "--metrics-file",
            _hostile(t, "huge metrics"),
            "--output-dir",
            str(o),
        ],
        ["metrics.json", "integer too long"],
    ),
    "fit-unknown-flag": (lambda t, m, g, o: ["fit", "--bogus", "1"], ["--bogus 1", "see 'kvlight fit --help'"]),
    "fit-bad-precision": (
        lambda t, m, g, o: ["fit", "--trainer.precision", "foo"],
        ["--trainer.precision: invalid value 'foo'", "kvlight fit --help"],
    ),
    "fit-bad-int": (lambda t, m, g, o: ["fit", "--data.seq_len", "abc"], ["--data.seq_len: invalid value 'abc'"]),
    "fit-devices-0": (
        lambda t, m, g, o: ["fit", "--model.model", m, "--trainer.accelerator", "cpu", "--trainer.devices", "0"],
        ["--trainer.devices '0'"],
    ),
    "fit-lr-text": (lambda t, m, g, o: ["fit", "--model.objective.lr", "nan"], ["--model.objective.lr: invalid"]),
    "fit-lr-nan": (lambda t, m, g, o: ["fit", "--model.model", m, "--model.objective.lr", ".nan"], ["lr must be"]),
    "fit-binary-config": (lambda t, m, g, o: ["fit", "--config", _hostile(t, "binary")], ["binary.yaml", "not UTF-8"]),
    "fit-config-huge-int": (lambda t, m, g, o: ["fit", "--config", _hostile(t, "huge yaml")], ["huge.yaml"]),
    "fit-config-missing": (lambda t, m, g, o: ["fit", "--config", str(t / "nope.yaml")], ["--config", "nope.yaml"]),
    "validate-missing-checkpoint": (
        lambda t, m, g, o: ["validate", "--model.model", m, "--ckpt_path", str(t / "nope.ckpt")],
        ["--ckpt_path", "nope.ckpt", "does not exist"],
    ),
    "validate-truncated-checkpoint": (
        lambda t, m, g, o: ["validate", "--model.model", m, "--ckpt_path", _truncated(t)],
        ["last.ckpt"],
    ),
}
if not torch.cuda.is_available():
    CASES["no-gpu"] = (
        lambda t, m, g, o: tiny_calibrate_args(m, o, "--accelerator", "gpu"),
        ["--accelerator gpu", "no CUDA device", "use cpu"],
    )
    CASES["fit-no-gpu"] = (
        lambda t, m, g, o: ["fit", "--model.model", m, "--trainer.accelerator", "gpu"],
        ["--trainer.accelerator gpu", "no CUDA device"],
    )


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    case, tmp_path, tiny_llama_path, tiny_gpt2_path, kvlight_cache, capfd, monkeypatch
):
    monkeypatch.setattr("sys.argv", ["kvlight"])  # LightningCLI compares its args with sys.argv
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # where LightningCLI would put lightning_logs/
    build, fragments = CASES[case]
    output = tmp_path / "out"
    argv = build(tmp_path, tiny_llama_path, tiny_gpt2_path, output)
    capfd.readouterr()

    assert main(argv) == 2
    line = one_error_line(capfd.readouterr().err)
    for fragment in fragments:
        assert fragment in line, line
    assert not output.exists()
    assert not kvlight_cache.exists()  # no capture started
    assert list(work.iterdir()) == []  # no lightning_logs/, no config.yaml


def test_a_fit_that_diverges_stops_naming_layer_and_head(tmp_path, tiny_llama_path, kvlight_cache, capfd):
    output = tmp_path / "out"
    argv = tiny_calibrate_args(tiny_llama_path, output, "--compressor", "kvsplice", "--rank", "4", "--epochs", "1")
    capfd.readouterr()
    assert main([*argv, "--lr", "1e30"]) == 2
    err = capfd.readouterr().err
    # Progress bars (loading weights, capture) share stderr; the error is one line of its own after them.
    errors = [segment for segment in re.split(r"[\r\n]+", err) if "kvlight: error:" in segment]
    assert len(errors) == 1 and "Traceback" not in err, err
    line = one_error_line(errors[0].strip())
    assert re.search(r"layer \d+ [KV] head \d+", line) and "--lr" in line, line
    assert not output.exists()  # no NaN compressor, results or checkpoint


def test_a_full_disk_is_one_line(tmp_path, tiny_llama_path, capfd, monkeypatch):
    from kvlight.config import CompressionConfig

    target = tmp_path / "cfg.json"

    def full(self, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(CompressionConfig, "to_json", full)
    assert main(["config", "uniform", "--model", tiny_llama_path, "--rank", "4", "-o", str(target)]) == 2
    line = one_error_line(capfd.readouterr().err)
    assert "no space left" in line and "cfg.json" in line
    assert not target.exists()


def test_other_os_errors_still_raise(tmp_path, tiny_llama_path, monkeypatch):
    # Only a full disk is the user's to fix; another OSError is a bug to see whole.
    from kvlight.config import CompressionConfig

    def broken(self, path):
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(CompressionConfig, "to_json", broken)
    with pytest.raises(OSError):
        main(["config", "uniform", "--model", tiny_llama_path, "--rank", "4", "-o", str(tmp_path / "cfg.json")])


def test_config_uniform_refuses_negative_exact_tokens(tmp_path, tiny_llama_path, capfd):
    target = tmp_path / "cfg.json"
    assert (
        main(["config", "uniform", "--model", tiny_llama_path, "--rank", "4", "--sink-tokens", "-5", "-o", str(target)])
        == 2
    )
    assert "--sink-tokens" in one_error_line(capfd.readouterr().err)
    assert not target.exists()


# ---------------------------------------------------------------------- a rank override changes only what it names
def test_a_key_rank_override_keeps_the_values_and_the_recommended_sinks(tiny_llama_path, tmp_path, monkeypatch):
    from kvlight.cli.lightning import lightning_cli
    from kvlight.config import RECOMMENDED

    monkeypatch.setattr("sys.argv", ["kvlight"])
    pca = str(Path(__file__).resolve().parents[2] / "configs" / "smollm2_pca.yaml")
    argv = ["fit", "--config", pca, "--model.model", tiny_llama_path, "--model.compression.rank_k", "8"]
    argv += ["--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)]
    config = lightning_cli(argv[1:], run=False).model.compressor.config
    head = config.head(0, 0, 16)
    assert (head.rank_k, head.rank_v) == (8, 16)  # the values were not named: every direction kept
    assert (config.sink_tokens, config.recent_window) == (RECOMMENDED["sink_tokens"], RECOMMENDED["recent_window"])


@pytest.mark.parametrize(
    ("extra", "sinks", "recent"), [([], 4, 0), (["--sink-tokens", "0", "--recent-window", "8"], 0, 8)]
)
def test_config_uniform_writes_the_recommended_exact_tokens_unless_told(
    extra, sinks, recent, tmp_path, tiny_llama_path
):
    from kvlight.config import CompressionConfig

    target = tmp_path / "cfg.json"
    assert main(["config", "uniform", "--model", tiny_llama_path, "--rank", "4", "-o", str(target), *extra]) == 0
    config = CompressionConfig.from_json(target)
    assert (config.sink_tokens, config.recent_window) == (sinks, recent)


# ---------------------------------------------------------------------- what a user reads
def _kvlight(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kvlight.cli", *argv], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_help_loads_no_torch(tmp_path):
    # `kvlight --help` used to import torch and transformers first (9 s on an idle machine).
    assert _kvlight("--help", cwd=tmp_path).returncode == 0
    probe = "import sys, kvlight.cli, kvlight; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


def test_a_lightning_command_error_is_one_line_from_the_shell(tmp_path, tiny_llama_path):
    # From a real command line: no "args parameter" warning, no seed messages, no usage; exit 2.
    done = _kvlight("fit", "--model.model", tiny_llama_path, "--trainer.accelerator", "cpu", "--trainer.devices", "0",
                    cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert "--trainer.devices '0'" in one_error_line(done.stderr)
    assert list(tmp_path.iterdir()) == []


def test_fit_says_where_the_checkpoint_is(tmp_path, tiny_llama_path, kvlight_cache, capsys, monkeypatch):
    from run_helpers import cli_args

    monkeypatch.setattr("sys.argv", ["kvlight"])
    pca = str(Path(__file__).resolve().parents[2] / "configs" / "smollm2_pca.yaml")
    data = ["--data.seq_len", "32", "--data.calibration_samples", "2", "--data.eval_samples", "2"]
    assert main(["fit", *cli_args(pca, tiny_llama_path, tmp_path / "run", *data)]) == 0
    printed = re.search(r"^Checkpoint saved to (\S+) ", capsys.readouterr().out, flags=re.MULTILINE)
    assert printed and Path(printed.group(1)).is_file()


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 4, b"", b"PK\x03\x04 not a zip", b"\x80\x02}q\x00."],  # random, empty, fake zip, bare pickle
)
def test_a_damaged_query_moments_file_reads_as_absent_so_it_is_captured_again(content, tmp_path):
    from kvlight.calibration.capture import QUERY_FILE, load_query_moments

    (tmp_path / QUERY_FILE).write_bytes(content)
    assert load_query_moments(tmp_path) is None


def test_a_compressor_description_with_a_huge_integer_is_one_line(tmp_path):
    from kvlight.compressors.artefacts import CONFIG_NAME, read_description
    from kvlight.errors import KVLightError

    (tmp_path / CONFIG_NAME).write_text(f'{{"format": {HUGE}}}')
    with pytest.raises(KVLightError, match="integer too long") as caught:
        read_description(tmp_path)
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("offline, hinted", [(None, True), ("1", False)])
def test_an_unreachable_model_says_how_to_fail_at_once_offline(offline, hinted, tmp_path, monkeypatch):
    """The hub retries for tens of seconds before failing offline; the error says how to skip that next time."""
    from kvlight.errors import ModelLoadError
    from kvlight.models import load_model

    if offline is None:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    # An offline transformers answers at once either way; only the message differs.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as caught:
        load_model(str(tmp_path / "no-such-owner" / "no-such-model"))
    assert ("HF_HUB_OFFLINE=1" in str(caught.value)) is hinted

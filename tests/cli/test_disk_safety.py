"""What kvlight leaves on disk when a run is rerun, refused, killed or fed hostile files (issue 13, the disk half).

- Checkpoints are unpickled with ``weights_only=True`` whatever torch's default (torch 2.4/2.5 defaulted to False:
  the tests emulate that), so a crafted checkpoint never runs code; it is refused with one line.
- ``kvlight calibrate`` owns its output directory: a rerun refuses a non-empty one without ``--overwrite`` and with it
  replaces the whole set; the set is staged beside the directory and published with one rename, so a failure leaves
  the previous set (or nothing) and no temporary files; a refused run creates no directory.
- Lightning checkpoints are written through a temp file in their own directory; ``--ckpt_path last`` takes the
  newest one that loads; the final step is always in ``last.ckpt``.
- A saved compressor records the sha256 of its weights and is refused when they changed.
"""

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import one_error_line, tiny_calibrate_args
from run_helpers import cli_args

from kvlight.cli import main

REPO = Path(__file__).resolve().parents[2]
PCA_YAML = str(REPO / "configs" / "smollm2_pca.yaml")
KVSPLICE_YAML = str(REPO / "configs" / "smollm2_kvsplice.yaml")
DATA = ["--data.seq_len", "32", "--data.calibration_samples", "4", "--data.eval_samples", "2"]
DATA += ["--data.kv_batch_size", "32"]  # 128 rows: 4 batches per epoch
FAST = ["--compressor", "pca", "--rank", "8"]  # no sensitivity pass


@pytest.fixture(autouse=True)
def _isolated(kvlight_cache, monkeypatch):
    monkeypatch.setattr("sys.argv", ["kvlight"])


def error_line(stderr: str) -> str:
    """kvlight's one error line, with no traceback (Lightning's own info lines may precede it)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("kvlight: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------- item 1: unsafe unpickling
class _Payload:
    """Unpickling this runs ``open(marker, "w")``: a crafted checkpoint's code, made visible as a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def malicious_checkpoint(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0", "payload": _Payload(marker)}, path)
    return path


@pytest.fixture
def torch_24_defaults(monkeypatch):
    """``torch.load`` as torch 2.4/2.5 behave (pyproject allowed them): ``weights_only`` unset means False."""
    original = torch.load

    def load(*args, weights_only=None, **kwargs):
        return original(*args, weights_only=False if weights_only is None else weights_only, **kwargs)

    monkeypatch.setattr(torch, "load", load)


def _fit(model, root, *extra):
    return main(["fit", *cli_args(PCA_YAML, model, root, *DATA, *extra)])


def _validate(model, root, *extra):
    return main(["validate", *cli_args(PCA_YAML, model, root, *DATA, *extra)])


#: how a checkpoint reaches torch.load: (command given model, root, the malicious file) -> exit code or None
UNPICKLE_PATHS = {
    "fit --ckpt_path FILE": lambda model, root, evil: _fit(model, root, "--ckpt_path", str(evil)),
    "fit --ckpt_path FILE --weights_only false": lambda model, root, evil: _fit(
        model, root, "--ckpt_path", str(evil), "--weights_only", "false"
    ),
    "validate --ckpt_path FILE": lambda model, root, evil: _validate(model, root, "--ckpt_path", str(evil)),
    "KVCalibrationModule.load_from_checkpoint": lambda model, root, evil: _load_module(evil),
}


def _load_module(path):
    from kvlight.calibration.module import KVCalibrationModule

    KVCalibrationModule.load_from_checkpoint(path)


@pytest.mark.parametrize("case", list(UNPICKLE_PATHS))
def test_malicious_checkpoint_never_runs_code(case, torch_24_defaults, tiny_llama_path, tmp_path, capfd):
    from kvlight.errors import KVLightError

    marker = tmp_path / "pwned"
    evil = malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    capfd.readouterr()
    if case.startswith("KVCalibrationModule"):
        with pytest.raises(KVLightError) as refused:
            UNPICKLE_PATHS[case](tiny_llama_path, tmp_path / "run", evil)
        message = str(refused.value)
        assert "\n" not in message
    else:
        assert UNPICKLE_PATHS[case](tiny_llama_path, tmp_path / "run", evil) == 2
        message = error_line(capfd.readouterr().err)
    assert not marker.exists(), "the checkpoint's pickle ran code"
    assert str(evil) in message


def test_malicious_last_checkpoint_is_skipped_by_ckpt_path_last(torch_24_defaults, tiny_llama_path, tmp_path, capfd):
    marker = tmp_path / "pwned"
    malicious_checkpoint(tmp_path / "checkpoints" / "last.ckpt", marker)
    assert _fit(tiny_llama_path, tmp_path, "--ckpt_path", "last") == 0  # starts over, as with no checkpoint
    assert not marker.exists()
    assert "last.ckpt" in capfd.readouterr().err  # said which one it skipped


# ---------------------------------------------------------------------- items 2, 3, 9b: calibrate's output set
def test_rerun_without_overwrite_is_refused_before_any_work(tiny_llama_path, tmp_path, capfd):
    output = tmp_path / "out"
    assert main(tiny_calibrate_args(tiny_llama_path, output, *FAST)) == 0
    before = snapshot(output)
    capfd.readouterr()
    assert main(tiny_calibrate_args(tiny_llama_path, output, *FAST)) == 2
    line = one_error_line(capfd.readouterr().err)
    assert str(output) in line and "--overwrite" in line
    assert snapshot(output) == before


def test_rerun_with_overwrite_replaces_the_whole_set(tiny_llama_path, tmp_path, capfd):
    output = tmp_path / "out"
    assert main(tiny_calibrate_args(tiny_llama_path, output, *FAST)) == 0
    assert main(tiny_calibrate_args(tiny_llama_path, output, "--compressor", "kvsplice", "--rank", "4",
                                    "--epochs", "1", "--overwrite")) == 0  # fmt: skip
    names = sorted(p.name for p in output.iterdir())
    assert names == sorted(["calibration_results_kvsplice.json", "compressor_kvsplice.pt", "compressor_kvsplice",
                            "compression_config_kvsplice.json", "checkpoints", "logs"])  # fmt: skip
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["last.ckpt"]
    results = json.loads((output / "calibration_results_kvsplice.json").read_text())
    # The results name this run's checkpoint, and it holds this run's compressor.
    state = torch.load(results["checkpoint"], weights_only=True)["state_dict"]
    saved = torch.load(output / "compressor_kvsplice.pt", weights_only=True)
    assert {k.removeprefix("compressor."): v for k, v in state.items()}.keys() == saved.keys()
    assert all(torch.equal(state[f"compressor.{k}"], v) for k, v in saved.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvlight-cache", "out"]  # nothing staged is left


def test_overwrite_keeps_files_kvlight_did_not_write(tiny_llama_path, tmp_path, capfd):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")
    assert main(tiny_calibrate_args(tiny_llama_path, output, *FAST, "--overwrite")) == 2
    line = one_error_line(capfd.readouterr().err)
    assert "notes.txt" in line
    assert snapshot(output) == {"notes.txt": b"mine"}


class _Killed(BaseException):
    """Stands in for a kill: nothing in kvlight catches it."""


def test_failure_while_writing_the_set_leaves_the_previous_set(tiny_llama_path, tmp_path, monkeypatch, capfd):
    import kvlight.cli.calibrate

    output = tmp_path / "out"
    assert main(tiny_calibrate_args(tiny_llama_path, output, *FAST)) == 0
    before = snapshot(output)
    written = kvlight.cli.calibrate.atomic_write_text

    def killed_at_the_results(path, text):
        if Path(path).name.startswith("calibration_results"):
            raise _Killed  # the .pt, the safetensors and the config of the new run are written by now
        written(path, text)

    monkeypatch.setattr(kvlight.cli.calibrate, "atomic_write_text", killed_at_the_results)
    with pytest.raises(_Killed):
        main(tiny_calibrate_args(tiny_llama_path, output, "--compressor", "pca", "--rank", "4", "--overwrite"))
    assert snapshot(output) == before  # the old set, whole; not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvlight-cache", "out"]
    assert not [p for p in output.rglob("*.tmp")]


def test_stale_staging_of_a_killed_run_is_cleared(tiny_llama_path, tmp_path):
    from kvlight.outputs import staging_path

    output = tmp_path / "out"
    stale = staging_path(output)
    (stale / "checkpoints").mkdir(parents=True)
    (stale / "checkpoints" / ".last.ckpt.x.tmp").write_bytes(b"half")
    assert main(tiny_calibrate_args(tiny_llama_path, output, *FAST)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kvlight-cache", "out"]
    assert not [p for p in output.rglob("*.tmp")]


def _fail_in_fit(monkeypatch):
    from kvlight.calibration.module import KVCalibrationModule
    from kvlight.errors import CaptureError

    def fail(self, *args, **kwargs):
        raise CaptureError("K of layer 0, KV head 0 contains NaN or inf")

    monkeypatch.setattr(KVCalibrationModule, "training_step", fail)


#: case -> (extra calibrate flags, what to break); each run fails with one line and leaves no output directory
REFUSED = {
    "missing --compression-config file": (["--compression-config", "/nonexistent/cfg.json"], None),
    "offline hub dataset": (["--calibration-dataset", "wikitext"], None),
    "fails during fit": ([], _fail_in_fit),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_or_failed_calibrate_leaves_no_output_directory(case, tiny_llama_path, tmp_path, monkeypatch, capfd):
    extra, breaks = REFUSED[case]
    if case == "offline hub dataset":
        monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    if breaks is not None:
        breaks(monkeypatch)
    output = tmp_path / "results" / "out"
    argv = tiny_calibrate_args(tiny_llama_path, output, *(extra or FAST))
    assert main(argv) == 2
    error_line(capfd.readouterr().err)
    assert not (tmp_path / "results").exists()  # neither the directory nor the parent it would have made
    assert sorted(p.name for p in tmp_path.iterdir()) in (["kvlight-cache"], [])


def test_stale_temporaries_in_a_capture_directory_are_removed(tmp_path):
    from kvlight.calibration.shards import write_shards

    directory = tmp_path / "capture"
    directory.mkdir()
    for name in (".shard-00000.safetensors.abc123.tmp", ".query_moments.pt.def456.tmp"):
        (directory / name).write_bytes(b"left by a killed capture")
    keys = torch.randn(10, 2, 2, 16)
    write_shards(directory, keys, keys.clone(), rows_per_shard=4, meta={})
    assert sorted(p.name for p in directory.iterdir()) == [
        "manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors",
    ]  # fmt: skip


# ---------------------------------------------------------------------- item 4: torn checkpoints
def _torn_4096(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:4096])


def _torn_half(path: Path) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


#: case -> how the newest checkpoint beside the intact last.ckpt was torn
TORN = {"disk-full 4096 bytes": _torn_4096, "killed mid-copy, half size": _torn_half}


@pytest.mark.parametrize("case", list(TORN))
def test_ckpt_path_last_takes_the_newest_checkpoint_that_loads(case, tiny_llama_path, tmp_path, capfd):
    assert _fit(tiny_llama_path, tmp_path) == 0
    intact = tmp_path / "checkpoints" / "last.ckpt"
    torn = intact.with_name("last-v1.ckpt")
    torn.write_bytes(intact.read_bytes())
    TORN[case](torn)
    os.utime(torn, ns=(intact.stat().st_mtime_ns + 10**9,) * 2)
    stale = intact.with_name(".last.ckpt.k1ll3d.tmp")  # what a save killed before its rename leaves
    stale.write_bytes(b"half")
    capfd.readouterr()
    assert _fit(tiny_llama_path, tmp_path, "--ckpt_path", "last") == 0
    assert "last-v1.ckpt" in capfd.readouterr().err  # said which one it skipped
    assert not stale.exists()


def test_checkpoints_are_written_in_their_own_directory(tiny_llama_path, tmp_path, monkeypatch):
    # $TMPDIR on another filesystem made the write a copy; an unusable one shows where the temp file goes.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-tmpdir"))
    assert _fit(tiny_llama_path, tmp_path / "run") == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["state_dict"]
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == sorted(["last.ckpt", *_topk(checkpoint.parent)])
    assert oct(checkpoint.stat().st_mode & 0o777) == oct(_default_mode())


def _topk(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith("epoch=")]


def _default_mode() -> int:
    from kvlight.files import default_file_mode

    return default_file_mode()


def test_a_failed_checkpoint_write_leaves_the_previous_one(tiny_llama_path, tmp_path, monkeypatch):
    from kvlight.calibration.checkpoints import AtomicCheckpointIO

    directory = tmp_path / "checkpoints"
    directory.mkdir()
    path = directory / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in directory.iterdir()) == ["last.ckpt"]


# ---------------------------------------------------------------------- item 11: the final step is checkpointed
def test_every_n_train_steps_still_checkpoints_the_final_step(tiny_llama_path, tmp_path):
    every_3 = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 3},
    }
    config = tmp_path / "every3.yaml"
    config.write_text(json.dumps({"trainer": {"callbacks": [every_3]}}))
    args = cli_args(KVSPLICE_YAML, tiny_llama_path, tmp_path, *DATA, "--trainer.max_epochs", "3", "--config",
                    str(config))  # fmt: skip
    assert main(["fit", *args]) == 0  # 1 statistics epoch + 2 Adam epochs of 4 batches: 8 steps
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 8


# ---------------------------------------------------------------------- item 10: compressor integrity
@pytest.fixture
def saved(fitted_compressor, tmp_path):
    directory = tmp_path / "compressor"
    fitted_compressor("llama", "pca", rank=8).save_pretrained(directory)
    return directory


def _flip_data_byte(directory: Path) -> None:
    path = directory / "compressor.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-7] ^= 0x40  # a tensor's data, not the header: the file still parses
    path.write_bytes(bytes(blob))


def test_a_flipped_weight_byte_is_refused(saved, tiny_models):
    from kvlight.compressors.compressor import load_compressor
    from kvlight.errors import KVLightError
    from kvlight.geometry import kv_geometry

    geometry = kv_geometry(tiny_models["llama"])
    assert load_compressor(saved, geometry) is not None
    _flip_data_byte(saved)
    with pytest.raises(KVLightError) as refused:
        load_compressor(saved, geometry)
    assert "sha256" in str(refused.value) and "\n" not in str(refused.value)


def test_compressor_files_get_the_umask_mode(saved):
    modes = {p.name: p.stat().st_mode & 0o777 for p in saved.iterdir()}
    assert set(modes.values()) == {_default_mode()}, modes


def test_a_run_in_progress_is_not_disturbed(tmp_path):
    from kvlight.errors import OutputError
    from kvlight.outputs import OutputSet

    running = OutputSet(tmp_path / "out")
    staging = running.stage()
    (staging / "checkpoints").mkdir()
    try:
        with pytest.raises(OutputError, match="another kvlight run is writing"):
            OutputSet(tmp_path / "out").stage()
        assert (staging / "checkpoints").is_dir()  # the running one's files are untouched
    finally:
        running.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == []

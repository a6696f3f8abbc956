"""Resume: a ``kvlight fit`` killed part-way resumes with ``--ckpt_path last`` and ends with the compressor of an
uninterrupted run; damaged captured-K/V shards are detected and recaptured, never used.

Kills are :class:`run_helpers.SimulatedKill` raised from a callback (Lightning does not catch it), so whatever was
on disk at that moment is what the resumed run gets. Every run logs with a CSVLogger, so the resumed run writes a
new ``version_N`` directory and ``last`` must be found in the killed run's.
"""

import json
from pathlib import Path

import pytest
import torch
from run_helpers import SimulatedKill, checkpoint_state, cli_args, load_records, record_config

from kvlight.calibration.module import STATISTICS_KEY
from kvlight.calibration.shards import KVShardStream, load_manifest, write_shards
from kvlight.cli import main
from kvlight.errors import CaptureError

REPO = Path(__file__).resolve().parents[2]
YAML = {"kvsplice": str(REPO / "configs" / "smollm2_kvsplice.yaml"), "pca": str(REPO / "configs" / "smollm2_pca.yaml")}
# 4 windows x 32 tokens = 128 rows, 32 per batch: 4 batches per epoch. KVSplice: 1 statistics + 3 Adam epochs,
# from a random start so that every step changes the weights.
DATA = ["--data.seq_len", "32", "--data.calibration_samples", "4", "--data.eval_samples", "2"]
DATA += ["--data.kv_batch_size", "32"]
ALGO = {
    "kvsplice": [
        "--trainer.max_epochs",
        "4",
        "--model.backend_options",
        '{"kvsplice": {"init": "random"}}',
        "--model.objective.lr",
        "0.02",
    ],
    "pca": [],
}
BATCHES, EPOCHS = 4, {"kvsplice": 4, "pca": 1}

EVERY_STEP = {
    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
    "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 1},
}


def on_exception(root: Path) -> dict:
    return {"class_path": "lightning.pytorch.callbacks.OnExceptionCheckpoint", "init_args": {"dirpath": str(root)}}


def kill(epoch: int, batch: int) -> dict:
    return {"class_path": "run_helpers.Kill", "init_args": {"epoch": epoch, "batch": batch}}


#: case -> (algo, extra callbacks of both runs (given the run root), the kill, where the resumed run starts)
CASES = {
    # A checkpoint after every optimizer step; killed in the middle of the second Adam epoch.
    "mid-adam-epoch": ("kvsplice", lambda root: [EVERY_STEP], kill(2, 1), (2, 1)),
    # Killed before an epoch starts: the last checkpoint was taken after the previous epoch's last batch.
    "after-an-epochs-last-batch": ("kvsplice", lambda root: [EVERY_STEP], kill(3, -1), (3, 0)),
    # The shipped YAML's checkpointing (last.ckpt at epoch ends): killed mid-epoch, that epoch is redone.
    "epoch-end-checkpoints-only": ("kvsplice", lambda root: [], kill(2, 2), (2, 0)),
    # Inside the statistics epoch (no optimizer step yet, so only an exception checkpoint exists there): the
    # float64 sums so far travel in the checkpoint and the stream skips the rows they already hold.
    "mid-statistics-epoch": ("kvsplice", lambda root: [on_exception(root / "exception")], kill(0, 1), (0, 2)),
    "pca-mid-statistics-epoch": ("pca", lambda root: [on_exception(root / "exception")], kill(0, 2), (0, 3)),
    # Nothing was saved before the kill: --ckpt_path last starts over (the capture on disk is reused).
    "pca-nothing-saved": ("pca", lambda root: [], kill(0, 2), (0, 0)),
}


def fit(algo: str, model: str, root: Path, config: str, *extra: str) -> int:
    logger = ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(root)]
    args = cli_args(YAML[algo], model, root, *DATA, *ALGO[algo], "--config", config, *extra)
    logger_off = args.index("--trainer.logger")  # cli_args turns the logger off; these runs log
    del args[logger_off : logger_off + 2]
    return main(["fit", *args, *logger])


def last_state(root: Path) -> dict[str, torch.Tensor]:
    """The compressor of the newest last.ckpt of any run (version) under ``root``."""
    checkpoints = root.glob("lightning_logs/version_*/checkpoints/last.ckpt")
    return checkpoint_state(max(checkpoints, key=lambda path: path.stat().st_mtime_ns))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("resume-cache")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, cache_dir):
    monkeypatch.setenv("KVLIGHT_CACHE", str(cache_dir))  # shared by the module: the K/V are captured once
    monkeypatch.setattr("sys.argv", ["kvlight"])


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama_path, tmp_path_factory, cache_dir):
    """``{algo: compressor state}`` of uninterrupted runs."""
    states = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVLIGHT_CACHE", str(cache_dir))
        patch.setattr("sys.argv", ["kvlight"])
        for algo in YAML:
            root = tmp_path_factory.mktemp(f"uninterrupted-{algo}")
            assert fit(algo, tiny_llama_path, root, record_config(root, "full")) == 0
            states[algo] = last_state(root)
    return states


@pytest.mark.parametrize("case", list(CASES))
def test_killed_fit_resumes_to_the_uninterrupted_compressor(case, uninterrupted, tiny_llama_path, tmp_path):
    algo, callbacks, killer, (epoch, batch) = CASES[case]
    with pytest.raises(SimulatedKill):
        fit(algo, tiny_llama_path, tmp_path, record_config(tmp_path, "killed", *callbacks(tmp_path), killer))
    if case.endswith("mid-statistics-epoch"):
        saved = torch.load(tmp_path / "exception" / "on_exception.ckpt", weights_only=False)
        assert all(t.dtype == torch.float64 for t in saved[STATISTICS_KEY])  # the sums so far

    resumed_config = record_config(tmp_path, "resumed", *callbacks(tmp_path))
    assert fit(algo, tiny_llama_path, tmp_path, resumed_config, "--ckpt_path", "last") == 0

    # The resumed run trained only what was left ...
    steps = load_records(tmp_path, "resumed")[0]["steps"]
    assert min(int(e) for e in steps) == epoch
    assert sum(steps.values()) == BATCHES * (EPOCHS[algo] - epoch) - batch
    # ... and ends exactly where the uninterrupted run did.
    resumed, reference = last_state(tmp_path), uninterrupted[algo]
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key


# ---------------------------------------------------------------------- damaged shards
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_byte(path: Path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0xFF  # inside the tensor data: the file still parses, only the checksum tells
    path.write_bytes(bytes(blob))


DAMAGE = {"truncated": _truncate, "one-byte-flipped": _flip_byte}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_shard_is_recaptured_not_used(damage, uninterrupted, tiny_llama_path, tmp_path, cache_dir, monkeypatch):
    import kvlight.calibration.capture

    captures = []
    original = kvlight.calibration.capture.capture_kv
    monkeypatch.setattr(
        kvlight.calibration.capture, "capture_kv", lambda *a, **k: captures.append(1) or original(*a, **k)
    )
    (directory,) = [path.parent for path in (cache_dir / "captures").glob("*/manifest.json") if _is_pca_data(path)]
    shard = sorted(directory.glob("shard-*.safetensors"))[0]
    DAMAGE[damage](shard)
    assert load_manifest(directory) is None  # detected

    assert fit("pca", tiny_llama_path, tmp_path, record_config(tmp_path, "refit")) == 0

    assert captures == [1]  # captured again
    assert load_manifest(directory) is not None  # intact again, checksums verified
    resumed, reference = last_state(tmp_path), uninterrupted["pca"]
    assert all(torch.equal(resumed[key], reference[key]) for key in reference)


def _is_pca_data(manifest: Path) -> bool:
    meta = json.loads(manifest.read_text())["meta"]
    return meta.get("world_size") == 1 and meta.get("tokens_seen") == 4 * 32


def test_shard_damaged_after_capture_stops_training(tmp_path):
    # Between capture and training (or between epochs): the stream checks each shard as it opens it.
    keys = torch.randn(10, 2, 1, 4)
    write_shards(tmp_path, keys, keys.clone(), rows_per_shard=5, meta={})
    stream = KVShardStream(tmp_path, batch_size=5, num_batches=2)
    _flip_byte(sorted(tmp_path.glob("shard-*.safetensors"))[1])
    with pytest.raises(CaptureError, match="failed its checksum"):
        list(stream)

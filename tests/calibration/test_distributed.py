"""Distributed calibration: ``kvlight fit`` with ``--trainer.strategy ddp --trainer.devices 2`` on CPU (gloo) against
the same fits in one process.

One subprocess runs the whole 2-process suite once for this module (tests/run_helpers.py: a PCA fit, its validation,
a KVSplice fit from a random start); the 1-process suite runs in-process. Each rank writes what it saw (captured
windows, rows and steps per epoch, validation results) to JSON files; the compressors are the checkpoints.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import calibrate_suite, checkpoint_state, load_records

from kvlight.calibration.module import KVCalibrationModule
from kvlight.calibration.shards import KVShardStream, write_shards

pytestmark = pytest.mark.slow  # one 2-process launch for the module: about 25 s on two busy cores

REPO = Path(__file__).resolve().parents[2]
CALIBRATION_WINDOWS, SEQ_LEN = 5, 32  # run_helpers.DDP_DATA


def run_process_group(command: list[str], env: dict, timeout: float, cwd=None) -> tuple[int, str]:
    """Run ``command`` in its own session; on timeout kill the whole group (Lightning's extra ranks included)."""
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        _, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:3])} ... ran past {timeout} s:\n{stderr[-2000:]}")
    return process.returncode, stderr


@pytest.fixture(scope="module")
def runs(tiny_llama_path, tmp_path_factory):
    """``{1: out_dir, 2: out_dir, "fsdp": out_dir}``: the suite with one process (in-process), with two under DDP
    and with two under FSDP (ModelParallelStrategy, the frozen model sharded), each 2-process run a subprocess."""
    root = tmp_path_factory.mktemp("distributed")
    out = {1: root / "one", 2: root / "two", "fsdp": root / "fsdp"}
    for key, strategy in ((2, "ddp"), ("fsdp", "fsdp")):
        env = {**os.environ, "KVLIGHT_CACHE": str(root / f"cache-{strategy}"), "PYTHONPATH": str(REPO / "tests")}
        env["OMP_NUM_THREADS"] = "1"
        script = str(REPO / "tests" / "run_helpers.py")
        command = [sys.executable, script, str(REPO), tiny_llama_path, str(out[key]), "2", strategy]
        returncode, stderr = run_process_group(command, env, timeout=400)
        assert returncode == 0, stderr[-4000:]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KVLIGHT_CACHE", str(root / "cache-1"))
        patch.setattr("sys.argv", ["kvlight"])
        calibrate_suite(REPO, tiny_llama_path, out[1], devices=1)
    return out


def test_windows_are_split_across_ranks_none_repeated_or_dropped(runs):
    one, (rank0, rank1) = load_records(runs[1], "pca")[0], load_records(runs[2], "pca")
    shares = [rank["capture"]["calibration_windows"] for rank in (rank0, rank1)]
    assert [rank["world_size"] for rank in (rank0, rank1)] == [2, 2]
    assert sorted(shares[0] + shares[1]) == list(range(CALIBRATION_WINDOWS))  # every window once
    assert len(shares[0]) - len(shares[1]) == 1  # an odd count: the shares differ by one window
    assert one["capture"]["calibration_windows"] == list(range(CALIBRATION_WINDOWS))
    # Every captured token became a row (the bound is far above), and the statistics epoch read each row once.
    for rank, share in zip((rank0, rank1), shares):
        assert rank["capture"]["tokens_seen"] == rank["capture"]["num_rows"] == len(share) * SEQ_LEN
        assert rank["rows"]["0"] == rank["capture"]["num_rows"]
    assert rank0["rows"]["0"] + rank1["rows"]["0"] == one["rows"]["0"] == CALIBRATION_WINDOWS * SEQ_LEN


#: (rows, batch size, batches per epoch): a rank's rows in the statistics epoch, with the batch count of the rank
#: holding the most rows.
SINGLE_PASS = [(12, 5, 3), (12, 4, 3), (7, 4, 4), (3, 8, 2)]


@pytest.mark.parametrize(("rows", "batch_size", "num_batches"), SINGLE_PASS)
def test_statistics_epoch_reads_each_row_once_then_empty_batches(rows, batch_size, num_batches, tmp_path):
    keys = torch.arange(rows, dtype=torch.float32).reshape(rows, 1, 1, 1).expand(rows, 2, 1, 3).contiguous()
    write_shards(tmp_path, keys, -keys, rows_per_shard=5, meta={})
    stream = KVShardStream(tmp_path, batch_size, num_batches, exact_epochs=1)
    batches = list(stream)
    assert len(batches) == num_batches  # the same number of steps on every rank
    seen = torch.cat([batch["keys"][:, 0, 0, 0] for batch in batches])
    assert sorted(seen.tolist()) == list(range(rows))  # every row exactly once
    assert all(batch["keys"].shape[1:] == (2, 1, 3) for batch in batches)
    stream.set_epoch(1)  # later (Adam) epochs: full batches, cycling through the rows
    assert [batch["keys"].shape[0] for batch in stream] == [batch_size] * num_batches


@pytest.mark.parametrize("tag", ["pca", "kvsplice"])
def test_every_rank_takes_the_same_number_of_steps(runs, tag):
    rank0, rank1 = load_records(runs[2], tag)
    assert rank0["steps"] == rank1["steps"]
    assert len(rank0["steps"]) == (1 if tag == "pca" else 30)  # every epoch ran on both ranks


def _aligned(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``other``'s basis columns flipped to the sign of ``reference``'s (an eigenvector is defined up to sign)."""
    signs = torch.sign((reference * other).sum(0))
    signs[signs == 0] = 1
    return other * signs


@pytest.mark.parametrize("parallel", [2, "fsdp"], ids=["ddp", "fsdp"])
def test_pca_fitted_with_two_processes_equals_the_one_process_fit(runs, parallel):
    one = checkpoint_state(runs[1] / "pca" / "checkpoints" / "last.ckpt")
    two = checkpoint_state(runs[parallel] / "pca" / "checkpoints" / "last.ckpt")
    assert one.keys() == two.keys()  # nothing extra (DDP's placeholder parameter stays out of the checkpoint)
    bases = [key for key in one if key.endswith(".basis")]
    assert len(bases) == 2 * 2 * 2  # layers x K/V x KV heads
    for key in one:
        other = _aligned(one[key], two[key]) if key.endswith(".basis") else two[key]
        torch.testing.assert_close(other, one[key], rtol=0, atol=1e-5, msg=key)


@pytest.mark.parametrize("parallel", [2, "fsdp"], ids=["ddp", "fsdp"])
def test_kvsplice_with_two_processes_reaches_the_one_process_loss(runs, tiny_rows, parallel):
    keys, values = tiny_rows["llama"]["heldout"]

    def heldout_loss(out: Path, algo: str) -> float:
        module = KVCalibrationModule.load_from_checkpoint(out / algo / "checkpoints" / "last.ckpt")
        with torch.no_grad():
            return float(module.compressor.reconstruction_loss(keys, values))

    one, two = heldout_loss(runs[1], "kvsplice"), heldout_loss(runs[parallel], "kvsplice")
    assert abs(two - one) <= 0.02 * one, (one, two)
    # Both trained from a random start to near the PCA optimum (the best a linear autoencoder can do on MSE).
    optimum = heldout_loss(runs[1], "pca")
    assert one < 1.1 * optimum and two < 1.1 * optimum, (one, two, optimum)


@pytest.mark.parametrize("parallel", [2, "fsdp"], ids=["ddp", "fsdp"])
def test_validation_perplexity_is_the_same_with_one_and_two_processes(runs, parallel):
    one = load_records(runs[1], "pca-validate")[0]["results"]
    two = [rank["results"] for rank in load_records(runs[parallel], "pca-validate")]
    assert two[0] == two[1]  # the metrics are synchronised: every rank reports the global numbers
    for key in ("baseline_perplexity", "compressed_perplexity"):
        assert two[0][key] == pytest.approx(one[key], rel=1e-5), key
    for key in ("compressed_cache_bytes", "dynamic_cache_bytes"):  # every evaluation window counted once
        assert two[0][key] == one[key], key


@pytest.mark.parametrize("parallel", [1, 2, "fsdp"], ids=["one", "ddp", "fsdp"])
def test_kl_distillation_lowers_the_loss_on_every_rank(runs, parallel):
    """``objective: kl`` under DDP and FSDP (backward through the sharded frozen model): every rank takes the same 8
    steps and its KL falls."""
    records = load_records(runs[parallel], "kl")
    assert len(records) == (1 if parallel == 1 else 2)
    for rank in records:
        losses = rank["losses"]
        assert len(losses) == 8, losses
        assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses


def test_fsdp_shards_the_frozen_model(runs):
    """Under FSDP each process holds half of the frozen weights (DDP: all of them), and the runs agree on windows."""
    for tag in ("pca", "kvsplice"):
        ddp, fsdp = load_records(runs[2], tag), load_records(runs["fsdp"], tag)
        for rank in fsdp:
            numel = rank["frozen_numel"]
            assert numel["local"] <= numel["global"] // 2 + 64, numel  # a shard (plus rounding of odd dims)
        assert all(rank["frozen_numel"]["local"] == rank["frozen_numel"]["global"] for rank in ddp)
        assert [r["capture"]["calibration_windows"] for r in fsdp] == [r["capture"]["calibration_windows"] for r in ddp]


def test_fsdp_refuses_a_split_with_unequal_forward_counts(tiny_llama_path, tmp_path):
    """9 windows over 2 processes in capture batches of 4: 2 forwards on one rank, 1 on the other. With a sharded
    model that would hang in FSDP's collective gathers, so the fit stops first, on every rank, with one line."""
    from run_helpers import FSDP

    command = [sys.executable, "-m", "kvlight.cli", "fit", "--config", str(REPO / "configs" / "smollm2_pca.yaml")]
    command += [
        "--model.model",
        tiny_llama_path,
        "--model.compression.rank",
        "8",
        "--model.runtime.model_dtype",
        "float32",
    ]
    command += ["--data.seq_len", "32", "--data.calibration_samples", "9", "--data.eval_samples", "2"]
    command += ["--trainer.accelerator", "cpu", "--trainer.devices", "2", *FSDP]
    command += ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    env = {**os.environ, "KVLIGHT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    returncode, stderr = run_process_group(command, env, timeout=300, cwd=tmp_path)
    assert returncode != 0
    assert "same number of forward passes" in stderr and "[2, 1] batches per process" in stderr, stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs CUDA devices")
def test_fsdp_yaml_calibrates_on_gpus(tiny_llama_path, tmp_path, tiny_rows):
    # configs/llama_7b_fsdp.yaml as shipped, on the tiny Llama with offline text and every GPU up to two.
    devices = min(2, torch.cuda.device_count())
    command = [sys.executable, "-m", "kvlight.cli", "fit", "--config", str(REPO / "configs" / "llama_7b_fsdp.yaml")]
    command += ["--model.model", tiny_llama_path, "--model.compression.rank", "8", "--trainer.devices", str(devices)]
    command += ["--data.dataset", "builtin", "--data.dataset_config", "null", "--data.seq_len", "32"]
    command += ["--data.calibration_samples", "4", "--data.eval_samples", "2", "--data.kv_batch_size", "32"]
    command += ["--trainer.max_epochs", "3", "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false"]
    env = {**os.environ, "KVLIGHT_CACHE": str(tmp_path / "cache")}
    returncode, stderr = run_process_group(command, env, timeout=500, cwd=tmp_path)
    assert returncode == 0, stderr[-4000:]
    state = checkpoint_state(tmp_path / "checkpoints" / "last.ckpt")
    assert state and all(key.startswith("compressor.") for key in state)
    module = KVCalibrationModule.load_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    with torch.no_grad():
        assert torch.isfinite(module.compressor.reconstruction_loss(*tiny_rows["llama"]["heldout"]))

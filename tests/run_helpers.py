"""Lightning callbacks and a calibration driver shared by the distributed, resume and precision tests.

Importable by class path from a LightningCLI YAML (``run_helpers.Kill``) because pytest puts tests/ on sys.path;
the DDP test runs this file as a script (``python tests/run_helpers.py MODEL OUT DEVICES``), which Lightning's
DDP launcher then starts once more per extra rank with the same arguments.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import lightning.pytorch as pl
import torch

#: Data settings of the distributed comparison: odd window counts, so the two ranks get unequal shares.
DDP_DATA = ["--data.seq_len", "32", "--data.calibration_samples", "5", "--data.eval_samples", "3"]
DDP_DATA += ["--data.batch_size", "2", "--data.seed", "0"]
#: KVSplice from a random start: training has real work to do, so "reaches the same loss" means something.
KVSPLICE = [
    "--model.backend_options",
    '{"kvsplice": {"init": "random"}}',
    "--model.objective.lr",
    "0.03",
    "--trainer.max_epochs",
    "30",
    # Plain reconstruction error on keys coded before RoPE: the tests compare the fits on held-out pre-RoPE rows
    # against the PCA optimum, which a Fisher-weighted (fisher-white) fit of keys in RoPE blocks does not aim at.
    "--model.compression.bits_weighting",
    "fisher-joint",
    "--model.compression.key_rope_block",
    "1",
]
#: End-to-end distillation at low rank with int4 latents, 8 steps of 2 windows per process.
KL = [
    "--model.objective.objective",
    "kl",
    "--model.compression.rank",
    "3",
    "--model.objective.lr",
    "0.01",
    "--model.compression.latent_bits",
    "4",
]
KL += [
    "--model.compression.quant_group_size",
    "3",
    "--model.objective.distill_batch_size",
    "2",
    "--trainer.max_steps",
    "8",
]
KL += ["--trainer.max_epochs", "-1"]


class SimulatedKill(RuntimeError):
    """Raised by :class:`Kill` in place of a SIGKILL; nothing catches it."""


class Kill(pl.Callback):
    """Stops the fit like a crash at the end of batch ``batch`` of epoch ``epoch`` (before that batch's checkpoint).

    ``batch=-1`` kills at the start of the epoch's first batch instead (after the previous epoch's last checkpoint).
    """

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batch == -1 and (trainer.current_epoch, batch_idx) == (self.epoch, 0):
            raise SimulatedKill(f"killed before epoch {self.epoch}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise SimulatedKill(f"killed at epoch {self.epoch}, batch {batch_idx}")


class Record(pl.Callback):
    """Writes what one rank saw to ``{directory}/{tag}-rank{R}.json``.

    ``rows``/``steps``: training rows and batches per epoch; ``capture``: the capture manifest's meta (which
    calibration windows this rank captured); ``statistics_dtypes``: dtypes of the running sums during the
    statistics epoch; ``results``: validation results (perplexities, bytes).
    """

    def __init__(self, directory: str, tag: str) -> None:
        self.directory, self.tag = Path(directory), tag
        self.record: dict = {"rows": defaultdict(int), "steps": defaultdict(int), "statistics_dtypes": [], "losses": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["rows"][trainer.current_epoch] += int(batch["keys"].shape[0])
        self.record["steps"][trainer.current_epoch] += 1
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.record["losses"].append(float(loss))
        dtypes = sorted({str(t.dtype) for t in pl_module.compressor.statistics_tensors()})
        if dtypes and dtypes not in self.record["statistics_dtypes"]:
            self.record["statistics_dtypes"].append(dtypes)

    def on_train_end(self, trainer, pl_module) -> None:
        stream = trainer.datamodule.kv_stream
        self.record["capture"] = {**stream.manifest["meta"], "num_rows": stream.manifest["num_rows"]}
        # How much of the frozen model this process holds (FSDP: a shard of each weight).
        params = list(pl_module.frozen.parameters())
        local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params)
        self.record["frozen_numel"] = {"local": local, "global": sum(p.numel() for p in params)}
        self._write(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.record["results"] = dict(pl_module.results)
        self._write(trainer)

    def _write(self, trainer) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.tag}-rank{trainer.global_rank}.json"
        path.write_text(json.dumps({**self.record, "world_size": trainer.world_size}, indent=1))


def cli_args(config: str, model: str, root: Path, *extra: str) -> list[str]:
    """``kvlight fit`` arguments for a tiny model in float32, quiet, no logger, everything under ``root``."""
    return [
        "--config",
        config,
        "--model.model",
        model,
        "--model.compression.rank",
        "8",
        "--model.runtime.model_dtype",
        "float32",
        "--trainer.default_root_dir",
        str(root),
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


def record_config(directory: Path, tag: str, *callbacks: dict) -> str:
    """A YAML with the shipped configs' checkpoint callback (last.ckpt after each epoch), a :class:`Record`, and
    ``callbacks``."""
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = {"save_last": True, "save_top_k": 1, "save_on_train_epoch_end": True}
    entries = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint},
        {"class_path": "run_helpers.Record", "init_args": {"directory": str(directory), "tag": tag}},
        *callbacks,
    ]
    path = directory / f"{tag}.yaml"
    path.write_text(json.dumps({"trainer": {"callbacks": entries}}))  # JSON is YAML
    return str(path)


#: FSDP2 through Lightning's ModelParallelStrategy (the frozen model's blocks sharded over the processes).
FSDP = ["--trainer.strategy", '{"class_path": "kvlight.calibration.strategy.FrozenModelFSDP"}']


def calibrate_suite(repo: Path, model: str, out: Path, devices: int, strategy: str = "ddp") -> None:
    """PCA fit + validate, then a KVSplice fit, with ``devices`` CPU processes; records under ``out``."""
    from kvlight.cli.lightning import lightning_cli

    parallel = []
    if devices > 1:
        parallel = (["--trainer.strategy", "ddp"] if strategy == "ddp" else FSDP) + ["--trainer.devices", str(devices)]
    # The same effective batch (rows per optimizer step, summed over ranks) as the one-process run.
    kv_batch = ["--data.kv_batch_size", str(32 // devices)]
    pca_yaml = str(repo / "configs" / "smollm2_pca.yaml")
    kvsplice_yaml = str(repo / "configs" / "smollm2_kvsplice.yaml")
    pca = out / "pca"
    lightning_cli(
        ["fit", *cli_args(pca_yaml, model, pca, *DDP_DATA, *parallel, *kv_batch, "--config", record_config(out, "pca"))]
    )
    lightning_cli(
        [
            "validate",
            *cli_args(pca_yaml, model, pca, *DDP_DATA, *parallel, "--config", record_config(out, "pca-validate")),
            "--ckpt_path",
            str(pca / "checkpoints" / "last.ckpt"),
        ]
    )
    kvsplice = out / "kvsplice"
    extra = [*DDP_DATA, *KVSPLICE, *parallel, *kv_batch, "--config", record_config(out, "kvsplice")]
    lightning_cli(["fit", *cli_args(kvsplice_yaml, model, kvsplice, *extra)])
    kl = out / "kl"
    extra = [*DDP_DATA, *KL, *parallel, *kv_batch, "--config", record_config(out, "kl")]
    lightning_cli(["fit", *cli_args(kvsplice_yaml, model, kl, *extra)])


def load_records(out: Path, tag: str) -> list[dict]:
    """The per-rank records of one run, rank order."""
    paths = sorted(out.glob(f"{tag}-rank*.json"))
    return [json.loads(path.read_text()) for path in paths]


def checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


if __name__ == "__main__":
    torch.set_num_threads(1)
    _repo, _model, _out, _devices = sys.argv[1:5]
    calibrate_suite(Path(_repo), _model, Path(_out), int(_devices), *sys.argv[5:6])

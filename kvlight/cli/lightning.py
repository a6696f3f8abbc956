"""LightningCLI around the calibration module and data module: ``kvlight fit`` / ``kvlight validate``."""

from __future__ import annotations


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI around :class:`~kvlight.calibration.module.KVCalibrationModule` and
    :class:`~kvlight.calibration.datamodule.KVCalibrationDataModule`."""
    from lightning.pytorch.cli import LightningCLI

    from kvlight.calibration.datamodule import KVCalibrationDataModule
    from kvlight.calibration.module import KVCalibrationModule

    class KVLightCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The tokenizer must be the model's: one value, set once.
            parser.link_arguments("model.model", "data.model")

        def before_fit(self) -> None:
            config = self.config_init[self.subcommand]
            if config.get("ckpt_path") == "last":
                config["ckpt_path"] = last_checkpoint(self.trainer)

    return KVLightCLI(
        KVCalibrationModule,
        KVCalibrationDataModule,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"num_sanity_val_steps": 0, "use_distributed_sampler": False},
        auto_configure_optimizers=False,
    )


def last_checkpoint(trainer) -> str | None:
    """The newest ``last*.ckpt`` of this run's checkpoint directory or of an earlier run (logger version) beside it,
    or an ``OnExceptionCheckpoint`` file if that is newer.

    Lightning's own ``ckpt_path="last"`` looks only in the checkpoint directory of the *new* run, which is a fresh
    ``version_N`` unless ModelCheckpoint has a fixed ``dirpath``: a killed run would silently start over.
    None (start from scratch) when there is none.
    """
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint

    candidates: set[Path] = set()
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            candidates |= {Path(path) for path in callback._find_last_checkpoints(trainer)}
        elif isinstance(callback, OnExceptionCheckpoint):
            candidates.add(Path(callback.ckpt_path))
    if trainer.loggers:
        logger = trainer.loggers[0]
        root = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name or "")
        candidates |= set(root.glob("version_*/checkpoints/last*.ckpt"))
    else:
        candidates |= set(Path(trainer.default_root_dir).glob("checkpoints/last*.ckpt"))
    existing = [path for path in candidates if path.is_file()]
    return str(max(existing, key=lambda path: path.stat().st_mtime_ns)) if existing else None

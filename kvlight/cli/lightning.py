"""LightningCLI around the calibration module and data module: ``kvlight fit`` / ``kvlight validate``."""

from __future__ import annotations


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI around :class:`~kvlight.calibration.module.KVCalibrationModule` and
    :class:`~kvlight.calibration.datamodule.KVCalibrationDataModule`."""
    import argparse
    import warnings

    from lightning.pytorch.cli import LightningCLI

    from kvlight.calibration.datamodule import KVCalibrationDataModule
    from kvlight.calibration.module import KVCalibrationModule
    from kvlight.cli.preflight import (
        argument_error,
        check_checkpoint,
        check_config_files,
        check_hardware,
        trainer_errors,
    )

    # Files named on the command line are checked before the parser builds anything (seconds, not a model load).
    check_config_files(list(args or []))
    check_checkpoint(list(args or []))
    prog = f"kvlight {args[0]}" if args else "kvlight fit"

    class KVLightCLI(LightningCLI):
        def init_parser(self, **kwargs):
            # Parse errors raise (one line, below) instead of printing ~80 lines of usage.
            return super().init_parser(**{**kwargs, "exit_on_error": False})

        def before_instantiate_classes(self) -> None:
            # Before the model and data are built: a missing GPU or a device count of 0 is one line, at once.
            trainer = self._get(self.config, "trainer", default={})
            check_hardware(trainer.get("accelerator", "auto"), trainer.get("devices", "auto"), "--trainer.")

        def instantiate_trainer(self, **kwargs):
            with trainer_errors("--trainer."):
                return super().instantiate_trainer(**kwargs)

        def add_arguments_to_parser(self, parser) -> None:
            # The tokenizer must be the model's: one value, set once.
            parser.link_arguments("model.model", "data.model")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI unpickles --ckpt_path here for its hyperparameters, before any kvlight code runs: an
            # unsafe or damaged file is refused with one line first (kvlight.calibration.checkpoints).
            from pathlib import Path

            from kvlight.calibration.checkpoints import load_checkpoint_file

            subcommand = self.config.get("subcommand")
            ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
            if ckpt_path and Path(ckpt_path).is_file():
                load_checkpoint_file(ckpt_path, map_location="cpu")
            super()._parse_ckpt_path()

        def after_fit(self) -> None:
            # Where the run's checkpoint went: the path `kvlight validate --ckpt_path` needs.
            callback = self.trainer.checkpoint_callback
            path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
            if path and self.trainer.is_global_zero:
                print(f"Checkpoint saved to {path} (kvlight validate --ckpt_path {path})")

        def before_fit(self) -> None:
            config = self.config_init[self.subcommand]
            if config.get("ckpt_path") == "last":
                config["ckpt_path"] = last_checkpoint(self.trainer)

    with warnings.catch_warnings():
        # kvlight always hands LightningCLI the command line as args; its warning about that is noise to a user.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        try:
            return KVLightCLI(
                KVCalibrationModule,
                KVCalibrationDataModule,
                args=args,
                run=run,
                save_config_kwargs={"overwrite": True},
                # No model summary: the frozen model is outside the module, so it only ever said "Trainable params: 0".
                trainer_defaults={
                    "num_sanity_val_steps": 0,
                    "use_distributed_sampler": False,
                    "enable_model_summary": False,
                },
                auto_configure_optimizers=False,
            )
        except argparse.ArgumentError as exc:
            raise argument_error(exc, prog) from None


def last_checkpoint(trainer) -> str | None:
    """The newest ``last*.ckpt`` that loads, of this run's checkpoint directory or of an earlier run (logger
    version) beside it, or an ``OnExceptionCheckpoint`` file if that is newer.

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
    from kvlight.calibration.checkpoints import newest_loadable

    # The newest that loads: a torn or crafted file beside an intact checkpoint is skipped (and named), not a crash.
    return newest_loadable(path for path in candidates if path.is_file())

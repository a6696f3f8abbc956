"""Command line: LightningCLI (``fit``, ``validate``) and the one-shot commands.

    kvlight fit --config configs/smollm2_pca.yaml
    kvlight validate --config configs/smollm2_pca.yaml --ckpt_path OUT/checkpoints/last.ckpt
    kvlight calibrate --compressor pca --output-dir OUT        # fit + validate, the seed's five lines
    kvlight config uniform --model M --rank 32 -o cfg.json

Every :class:`KVLightError` ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

from kvlight.errors import KVLightError

LIGHTNING_COMMANDS = {"fit", "validate", "test", "predict"}


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """The LightningCLI around :class:`KVCalibrationModule` and :class:`KVCalibrationDataModule`."""
    from lightning.pytorch.cli import LightningCLI

    from kvlight.data import KVCalibrationDataModule
    from kvlight.module import KVCalibrationModule

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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            lightning_cli(argv)
            return 0
        from kvlight.commands import run_command

        return run_command(argv)
    except KVLightError as exc:
        print(f"kvlight: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Silence the messages Lightning and PyTorch print on every kvlight command that a user reads as trouble but that say
nothing about their run (each one is named here, so a new warning still shows).
"""

from __future__ import annotations

import logging
import warnings

#: Warnings that are true of how kvlight drives Lightning on every run, not of the user's input.
NOISE = (
    # kvlight always hands LightningCLI the command line as ``args``.
    r"LightningCLI's args parameter",
    # Lightning's own pytree helper, deprecated inside PyTorch; nothing a user can change.
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # The evaluation batches are an IterableDataset with a length on purpose (kvlight.calibration.datamodule).
    r"Your `IterableDataset` has `__len__` defined",
    # A short statistics epoch has fewer batches than the logging interval; the epoch's values are still logged.
    r"The number of training batches \(\d+\) is smaller than the logging interval",
    # kvlight seeds every run itself (--seed / seed_everything: 0 in the YAMLs).
    r"No seed found, seed set to",
    # `kvlight validate --ckpt_path` on a calibrate checkpoint: the checkpoint callback's bookkeeping (best score,
    # top-k paths) belongs to the run that wrote it, and validate writes no checkpoint.
    r"The dirpath has changed from",
)
#: Log lines of the same kind: advertisements for optional packages, and the seed kvlight chose.
LOG_NOISE = ("💡 Tip:", "Seed set to")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.getMessage())
        return not any(noise in message for noise in LOG_NOISE)  # in: a rank prefix may come first


def quiet() -> None:
    """Install the filters (idempotent: a filter already installed is not added twice)."""
    for pattern in NOISE:
        warnings.filterwarnings("ignore", message=pattern)
    loggers = (
        "lightning.pytorch.utilities.rank_zero",
        "lightning.fabric.utilities.rank_zero",
        "lightning.fabric.utilities.seed",
    )
    for name in loggers:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())

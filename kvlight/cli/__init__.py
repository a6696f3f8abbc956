"""Command line: LightningCLI (``fit``, ``validate``) and the one-shot commands.

    kvlight fit --config configs/smollm2_pca.yaml
    kvlight validate --config configs/smollm2_pca.yaml --ckpt_path OUT/checkpoints/last.ckpt
    kvlight calibrate --compressor pca --output-dir OUT        # fit + validate, the seed's five lines
    kvlight config uniform --model M --rank 32 -o cfg.json

Every :class:`KVLightError` ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

from kvlight.cli.lightning import lightning_cli
from kvlight.errors import KVLightError

LIGHTNING_COMMANDS = {"fit", "validate", "test", "predict"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in LIGHTNING_COMMANDS:
            lightning_cli(argv)
            return 0
        from kvlight.cli.parser import run_command

        return run_command(argv)
    except KVLightError as exc:
        print(f"kvlight: error: {exc}", file=sys.stderr)
        return 2

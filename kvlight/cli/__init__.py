"""Command line: LightningCLI (``fit``, ``validate``) and the one-shot commands.

    kvlight fit --config configs/smollm2_pca.yaml
    kvlight validate --config configs/smollm2_pca.yaml --ckpt_path OUT/checkpoints/last.ckpt
    kvlight calibrate --compressor pca --output-dir OUT        # fit + validate, the five result lines of the upstream design's step 2
    kvlight analyze --strategy bits --target-memory-reduction 0.875 --output-dir analysis
    kvlight config uniform --model M --rank 32 -o cfg.json

Every :class:`~kvlight.errors.KVLightError` ends the command with one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

from kvlight.errors import KVLightError

LIGHTNING_COMMANDS = {"fit", "validate", "test", "predict"}
#: every command and what it does (``kvlight --help``).
COMMANDS = {
    "fit": "calibrate a compressor (LightningCLI; see 'kvlight fit --help')",
    "validate": "baseline vs compressed perplexity of a checkpoint (LightningCLI; 'kvlight validate --help')",
    "calibrate": "fit + validate in one go; prints the five result lines of the upstream design's step 2",
    "analyze": "per-head sensitivity metrics -> ranks or widths per direction -> compression config",
    "config": "write a compression config (kvlight config uniform)",
}


def _usage() -> str:
    lines = [
        "usage: kvlight {" + ",".join(COMMANDS) + "} ...",
        "",
        "Post-hoc KV-cache compression for HF causal LMs.",
        "",
    ]
    return "\n".join(lines + [f"  {name:<10} {text}" for name, text in COMMANDS.items()]) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(), file=sys.stdout if argv else sys.stderr, end="")
            return 0 if argv else 2
        command, rest = argv[0], argv[1:]
        from kvlight.cli.quiet import quiet

        quiet()
        # Each command imports what it runs: `kvlight config` does not pay for importing Lightning.
        if command in LIGHTNING_COMMANDS:
            from kvlight.cli.lightning import lightning_cli

            lightning_cli(argv)
            return 0
        if command == "calibrate":
            from kvlight.cli import calibrate

            return calibrate.main(rest)
        if command == "analyze":
            from kvlight.cli import analyze

            return analyze.main(rest)
        if command == "config":
            from kvlight.cli import config_command

            return config_command.main(rest)
        raise KVLightError(f"unknown command {command!r}; the commands are {', '.join(COMMANDS)}")
    except KVLightError as exc:
        print(f"kvlight: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        # A full disk is the user's to fix, wherever the write was (outputs, TensorBoard, checkpoints, captures);
        # every other OSError is left to show its traceback.
        from kvlight.cli.preflight import no_space

        error = no_space(exc)
        if error is None:
            raise
        print(f"kvlight: error: {error}", file=sys.stderr)
        return 2

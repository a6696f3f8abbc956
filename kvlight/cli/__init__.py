"""Command line: LightningCLI (``fit``, ``validate``) and the one-shot commands.

    kvlight fit --config configs/smollm2_pca.yaml
    kvlight validate --config configs/smollm2_pca.yaml --ckpt_path OUT/checkpoints/last.ckpt
    kvlight calibrate --kv-budget 0.24 --output-dir OUT       # fit + validate in one go, the result lines printed
    kvlight analyze --strategy bits --kv-budget 0.125 --output-dir analysis
    kvlight config uniform --model M --rank 32 -o cfg.json
    kvlight eval --compressor-path OUT/compressor_kvsplice --tasks niah_single_1 --limit 30
    kvlight --version

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
    "calibrate": "fit + validate in one go at a KV budget; prints the results, writes the compressor",
    "analyze": "per-head sensitivity metrics -> ranks or widths per direction -> compression config",
    "config": "write a compression config (kvlight config uniform)",
    "eval": "lm-evaluation-harness tasks (RULER, ...) through several caches, one table (pip install 'kvlight[eval]')",
}


def _usage() -> str:
    lines = [
        "usage: kvlight [--version] {" + ",".join(COMMANDS) + "} ...",
        "",
        "Post-hoc KV-cache compression for HF causal LMs.",
        "",
    ]
    commands = [f"  {name:<10} {text}" for name, text in COMMANDS.items()]
    tail = ["", "kvlight --version prints the version; kvlight COMMAND --help, each command's flags."]
    return "\n".join(lines + commands + tail) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] in ("-h", "--help"):
            print(_usage(), file=sys.stdout if argv else sys.stderr, end="")
            return 0 if argv else 2
        if argv[0] == "--version":
            from kvlight import __version__

            print(f"kvlight {__version__}")
            return 0
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
        if command == "eval":
            from kvlight.cli import eval as eval_command

            return eval_command.main(rest)
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

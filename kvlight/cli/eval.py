"""``kvlight eval``: lm-evaluation-harness tasks through several KV caches of one model, one table side by side.

    kvlight eval --compressor-path compression_results/compressor_kvsplice --tasks niah_single_1,vt \\
        --max-seq-lengths 2048,4096 --limit 30

Every prompt fills the cache in chunks of ``--prefill-chunk`` tokens (kvlight.eval.lm). The table (stdout,
``results.md``) and the rows (``results.json``) are written into ``--output-dir`` at the end, each file atomically.
Needs the harness: ``pip install 'kvlight[eval]'``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import time
from pathlib import Path

from kvlight.cli.flags import OneLineParser
from kvlight.errors import ConfigError, KVLightError, OutputError
from kvlight.files import atomic_write_text, ensure_writable

#: the caches --caches takes (kvlight.eval.lm.CACHES, named here so --help needs no harness import).
CACHE_NAMES = ("kvlight", "dynamic", "quanto-int4", "quanto-int2")
DEFAULT_CACHES = "dynamic,quanto-int4,kvlight"


def _names(flag: str):
    def parse(text: str) -> list[str]:
        names = [part.strip() for part in text.split(",")]
        if not names or any(not name for name in names):
            raise KVLightError(f"{flag} {text!r}: give comma-separated names without empty entries")
        return list(dict.fromkeys(names))

    return parse


def _counts(flag: str, single: bool = False):
    def parse(text: str):
        try:
            values = [int(part) for part in text.split(",")]
        except ValueError:
            values = []
        if not values or any(value < 1 for value in values) or (single and len(values) != 1):
            what = "a whole number of at least 1" if single else "comma-separated whole numbers of at least 1"
            raise KVLightError(f"{flag} {text!r} must be {what}")
        return values[0] if single else list(dict.fromkeys(values))

    return parse


def parser() -> OneLineParser:
    cli = OneLineParser(
        prog="kvlight eval",
        description="Run lm-evaluation-harness tasks (RULER's niah_single_1, vt, ...) with attention reading each "
        "cache of --caches; print and write one table, the caches side by side, with sample counts and 95 % "
        "intervals.",
    )
    basic = cli.add_argument_group("basic")
    basic.add_argument("--model", default=None, help="hub id, directory or .gguf file (default: the embedded default)")
    basic.add_argument(
        "--compressor-path",
        default=None,
        metavar="DIR|REPO",
        help="the compressor of the kvlight cache: a directory kvlight calibrate wrote or a hub repo id",
    )
    basic.add_argument(
        "--caches",
        type=_names("--caches"),
        default=DEFAULT_CACHES,
        help=f"caches to compare, comma-separated, from {', '.join(CACHE_NAMES)} (default: {DEFAULT_CACHES})",
    )
    basic.add_argument(
        "--tasks",
        type=_names("--tasks"),
        default="niah_single_1",
        help="harness tasks, comma-separated; offline RULER tasks: niah_single_1, niah_multikey_2, niah_multikey_3, "
        "vt, cwe (default: niah_single_1)",
    )
    basic.add_argument(
        "--max-seq-lengths",
        type=_counts("--max-seq-lengths"),
        default="2048",
        metavar="L1,L2",
        help="prompt lengths in tokens of the RULER tasks, comma-separated (default: 2048)",
    )
    basic.add_argument(
        "--limit",
        type=_counts("--limit", single=True),
        default=None,
        metavar="N",
        help="samples per task and length (default: all; RULER generates 500 per length)",
    )
    basic.add_argument(
        "--output-dir", default="eval_results", metavar="DIR", help="where results.json and results.md go"
    )
    hardware = cli.add_argument_group("hardware")
    hardware.add_argument(
        "--batch-size", type=_counts("--batch-size", single=True), default=1, metavar="B", help="prompts per forward"
    )
    hardware.add_argument(
        "--prefill-chunk",
        type=_counts("--prefill-chunk", single=True),
        default=64,
        metavar="T",
        help="tokens per forward while a prompt fills the cache (default: 64)",
    )
    hardware.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"), help="model dtype"
    )
    hardware.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return cli


def arguments(argv: list[str]):
    """The parsed flags, every one checked that can be before anything loads."""
    args = parser().parse_args(argv)
    unknown = [name for name in args.caches if name not in CACHE_NAMES]
    if unknown:
        raise ConfigError(
            f"--caches: unknown cache {', '.join(map(repr, unknown))}; the caches are {', '.join(CACHE_NAMES)}"
        )
    if "kvlight" in args.caches and args.compressor_path is None:
        raise ConfigError(
            "--caches includes kvlight, which needs --compressor-path DIR|REPO (a compressor kvlight calibrate "
            "wrote, or a hub repo id); or leave kvlight out of --caches"
        )
    if args.compressor_path is not None and "kvlight" not in args.caches:
        raise ConfigError("--compressor-path is the kvlight cache's: add kvlight to --caches, or drop it")
    return args


def _check_output(output: Path) -> None:
    """Refuse, in one line, an output directory that could not be written; create nothing (a failed run leaves no
    trace)."""
    existing = output
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write to output directory {str(output)!r}: {str(existing)!r} is not a writable directory"
        )


def _has_quanto() -> bool:
    try:
        return importlib.util.find_spec("optimum.quanto") is not None
    except ModuleNotFoundError:  # no optimum at all
        return False


def main(argv: list[str]) -> int:
    args = arguments(argv)  # argparse converts the string defaults through their type= too
    if importlib.util.find_spec("lm_eval") is None:
        raise KVLightError("kvlight eval needs lm-evaluation-harness: pip install 'kvlight[eval]'")
    quanto = [name for name in args.caches if name.startswith("quanto")]
    if quanto and not _has_quanto():
        raise KVLightError(f"--caches {quanto[0]} needs optimum-quanto: pip install 'kvlight[eval]'")
    output = Path(args.output_dir)
    _check_output(output)  # before anything loads: a typo must not cost the run
    command = shlex.join(["kvlight", "eval", *argv])
    import torch

    from kvlight.eval import table
    from kvlight.eval.ruler import check_hub_tasks, task_name
    from kvlight.eval.run import build_tasks, evaluate_caches
    from kvlight.models import load_model, load_tokenizer, resolve_dtype

    check_hub_tasks([task_name(name) for name in args.tasks])  # an unreachable hub fails before the model loads

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    model = load_model(args.model, resolve_dtype(args.dtype, device)).to(device)
    tokenizer = load_tokenizer(args.model)
    task_sets = build_tasks(args.tasks, args.max_seq_lengths, tokenizer)
    rows = evaluate_caches(
        model,
        tokenizer,
        args.caches,
        task_sets,
        compressor_path=args.compressor_path,
        limit=args.limit,
        batch_size=args.batch_size,
        prefill_chunk=args.prefill_chunk,
    )
    shown = table(rows, args.caches)
    results = {
        "command": command,
        "model": args.model or "embedded:smollm2-135m-instruct",
        "compressor_path": args.compressor_path,
        "caches": args.caches,
        "tasks": args.tasks,
        "max_seq_lengths": args.max_seq_lengths,
        "limit": args.limit,
        "prefill_chunk": args.prefill_chunk,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "device": device,
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }
    heading = f"# kvlight eval\n\nCommand: `{command}`\n\n"
    ensure_writable(output)
    atomic_write_text(output / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(output / "results.md", heading + shown)
    print(shown, end="")
    print(f"Results saved to {output}/results.json and {output}/results.md")
    return 0

"""Seconds per distillation step when the KL compares a share of the positions (``--distill-tokens``).

Protocol: the embedded default in each ``--dtypes`` (bf16 only where the CPU has it natively, or on a GPU), a
KVSplice compressor of the 12.5 % recipe's shape (keys before RoPE, rank ``--rank`` per head with 2-bit latents, 4
sinks) fitted on the K/V rows of 4 windows of 512 tokens of the built-in corpus, and one window of ``--seq-len``
tokens of it. For each share, ``--steps`` optimizer steps of ``kvlight.calibration.distill.distill`` (teacher forward,
student forward and backward through the simulated cache, Adam), after one step that is not timed; the table gives
the median step. The shares run one after another in one process, alone on the machine: compare the ratios, which
the machine's drift between runs moves less than the seconds.

    python bench/distill_step.py                    # writes bench/results/distill_step.{md,json}
    python bench/distill_step.py --shares 1 0.5 --steps 2 --seq-len 1024 --name distill_step_smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

RESULTS = Path(__file__).resolve().parent / "results"


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr, exit code 2, before anything loads or is written."""

    def error(self, message: str) -> None:
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"])
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--name", default="distill_step", help="results file name under bench/results/")
    args = parser.parse_args(argv)
    if any(not 0 < share <= 1 for share in args.shares):
        parser.error("--shares are fractions in (0, 1], e.g. 1 0.5 0.25")
    if args.steps < 1 or args.seq_len < 64 or args.rank < 1:
        parser.error("--steps and --rank must be at least 1 and --seq-len at least 64")
    return args


def step_seconds(model, compressor, window: torch.Tensor, tracker, share: float, steps: int) -> list[float]:
    """Seconds of each of ``steps`` distillation steps at ``share`` of the positions (after one untimed step)."""
    from kvlight.calibration.distill import distill

    times: list[float] = []
    last = [time.perf_counter()]

    def log(step: int, loss: float) -> None:
        now = time.perf_counter()
        if step > 0:
            times.append(now - last[0])
        last[0] = now

    distill(model, compressor, window, tracker, steps=steps + 1, lr=1e-5, log=log, tokens=share)
    return times


def measure(args) -> list[dict]:
    from bench.common import captured_rows, embedded_default, offline_windows
    from kvlight.compressors.compressor import KVCompressor
    from kvlight.config import CompressionConfig
    from kvlight.models import resolve_dtype
    from kvlight.serving.positions import PositionTracker

    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        if dtype == torch.bfloat16 and resolve_dtype("auto") != torch.bfloat16:
            print("skipping bfloat16: not native on this machine", flush=True)
            continue
        model, tokenizer, geometry = embedded_default(dtype)
        model.requires_grad_(False)
        config = CompressionConfig.uniform(
            geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=args.rank, sink_tokens=4,
            latent_bits=2,
        )  # fmt: skip
        config.key_rope_block = 1
        fitting = offline_windows(tokenizer, 512, skip=0, count=4)
        captured = captured_rows(model, geometry, fitting, rope_blocks=config.rope_blocks())
        window = offline_windows(tokenizer, args.seq_len, skip=1, count=1)
        tracker = PositionTracker(model)
        try:
            for share in args.shares:
                compressor = KVCompressor(config, geometry, algo="kvsplice")
                compressor.fit_statistics([captured])
                times = step_seconds(model, compressor, window, tracker, share, args.steps)
                rows.append({"dtype": name, "seq_len": args.seq_len, "share": share, "steps": times})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            tracker.close()
    return rows


def markdown(results: dict) -> str:
    lines = [
        "# Seconds per distillation step, by the share of positions the KL compares (`--distill-tokens`)",
        "",
        f"Machine: {results['machine']}  ",
        f"Command: `{results['command']}`  ",
        f"Date: {results['date']}",
        "",
        "Protocol: " + " ".join(__doc__.split("\n\n")[1].split()),
        "",
        "| dtype | tokens | share | median step | of all positions' |",
        "|---|---:|---:|---:|---:|",
    ]
    full = {(r["dtype"], r["seq_len"]): statistics.median(r["steps"]) for r in results["rows"] if r["share"] == 1}
    for row in results["rows"]:
        median = statistics.median(row["steps"])
        reference = full.get((row["dtype"], row["seq_len"]))
        ratio = f"{median / reference:.2f}x" if reference else "-"
        lines.append(f"| {row['dtype']} | {row['seq_len']} | {row['share']:g} | {median:.1f} s | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from bench.common import machine

    results = {
        "machine": machine(),
        "command": "python bench/distill_step.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "rows": measure(args),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(results))
    print(f"wrote {RESULTS / args.name}.md and .json", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Peak memory of ``generate`` with each cache: the process's peak minus what the loaded model alone holds.

Protocol: the embedded default in ``--dtype``; ``--batch`` prompts (8) of ``--length`` tokens (8000) from the standard
library's docstrings; ``model.generate(..., max_new_tokens=64, do_sample=False, prefill_chunk_size=1024)`` through the
cache of the row, so the prefill goes through that cache too (chunked, so the prefill's activations stay a few hundred
MiB and the cache is what grows). Every row runs in a fresh process of its own (``--row``): on the CPU its peak is
the kernel's high-water mark of resident memory (``VmHWM``, reset before generating), on a GPU
``torch.cuda.max_memory_allocated``; the model's share is what the process holds after loading it (and, for kvlight,
its compressor: bench/bitrows.py's, from its disk cache) and running one 16-token forward, so the allocator's and the
libraries' own working memory count with the model, not with the cache.

Rows: ``DynamicCache``, ``StaticCache`` (sized for prompt + new tokens), HF ``QuantizedCache`` quanto int4 (group 64,
residual 128) and kvlight at 25 % of fp16 bytes: Fisher-whitened widths with keys coded in RoPE blocks of 16 tokens, and
joint-Fisher widths with keys coded before RoPE (bench/decode.py's rows).

    python bench/memory.py                                    # writes bench/results/memory.{md,json}
    python bench/memory.py --length 2048 --batch 2 --name memory_smoke
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bitrows  # noqa: E402
from bench.common import embedded_default, machine, offline_windows, prose_tokens  # noqa: E402
from bench.decode import KVLIGHT_ROWS, QUANTO, prompt_batches, refuse  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("DynamicCache", "StaticCache", "quanto int4", *KVLIGHT_ROWS)
NEW_TOKENS = 64
PREFILL_CHUNK = 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> int:
    """Start a new peak from what is held now (returned, in bytes): CUDA's allocator statistics, or the kernel's
    resident high-water mark (``echo 5 > /proc/self/clear_refs``) after a garbage collection."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def _peak() -> int:
    """Peak bytes since :func:`_reset_peak`."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status_kib("VmHWM") * 1024


def measure(args) -> dict:
    """One row, in this process: load, warm up, generate through the row's cache; the peaks before and after."""
    from transformers.cache_utils import QuantizedCache, StaticCache

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tokenizer, geometry = embedded_default(dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    prose = prose_tokens(tokenizer)
    prompts = prose[: args.length * args.batch].view(args.batch, args.length).to(device)
    compressor = None
    if args.row in KVLIGHT_ROWS:  # loaded from the disk cache (or fitted) before the peak is reset
        compressor = _kvlight_compressor(model, geometry, tokenizer, args.row)
    with torch.no_grad():
        model(input_ids=prompts[:1, :16])  # the model's working memory belongs to the model's share
    model_bytes = _reset_peak()
    wrapper = None
    if args.row == "DynamicCache":
        cache, generator = None, model  # generate's own DynamicCache
    elif args.row == "StaticCache":
        cache, generator = StaticCache(config=model.config, max_cache_len=args.length + NEW_TOKENS + 1), model
    elif args.row == "quanto int4":
        cache, generator = QuantizedCache(config=model.config, **QUANTO), model
    else:
        from kvlight.serving.wrapper import CompressedKVModelWrapper

        storage = torch.bfloat16 if dtype == torch.float32 else None
        wrapper = CompressedKVModelWrapper(model, compressor.to(device), storage_dtype=storage)
        cache, generator = wrapper.new_cache(), wrapper
    kwargs = {} if cache is None else {"past_key_values": cache}
    with torch.no_grad():
        out = generator.generate(
            input_ids=prompts,
            attention_mask=torch.ones_like(prompts),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            prefill_chunk_size=PREFILL_CHUNK,
            pad_token_id=tokenizer.eos_token_id,
            **kwargs,
        )
    peak = _peak()
    if wrapper is not None:
        wrapper.close()
    return {
        "row": args.row,
        "new_tokens": int(out.shape[1] - prompts.shape[1]),
        "model_bytes": model_bytes,
        "peak_bytes": peak,
        "peak_minus_model_bytes": peak - model_bytes,
    }


def _kvlight_compressor(model, geometry, tokenizer, row_id: str):
    from kvlight.serving.positions import PositionTracker

    calibration = offline_windows(tokenizer, 512, skip=16, count=bitrows.CALIBRATION_WINDOWS)
    row = next(r for r in bitrows.all_rows(distilled=False) if bitrows.row_id(r) == row_id)
    inputs = bitrows.FitInputs(model, geometry, calibration)
    tracker = PositionTracker(model)
    try:
        return bitrows.compressor_for(
            row, model, geometry, calibration, inputs.rows(row.rope_block), inputs.metrics(row.rope_block), tracker
        )
    finally:
        tracker.close()


def run(args) -> dict:
    """Every row in a process of its own."""
    results = {
        "machine": machine(),
        "command": "python bench/memory.py " + " ".join(sys.argv[1:]),
        "dtype": args.dtype,
        "length": args.length,
        "batch": args.batch,
        "new_tokens": NEW_TOKENS,
        "peak_kind": "torch.cuda.max_memory_allocated" if torch.cuda.is_available() else "peak resident memory (VmHWM)",
        "rows": [],
    }
    for row in args.rows:
        command = [sys.executable, __file__, "--row", row, "--length", str(args.length), "--batch", str(args.batch)]
        command += ["--dtype", args.dtype] + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"error: the {row} row failed: {tail}", file=sys.stderr)
            raise SystemExit(1)
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        results["rows"].append(measured)
        print(json.dumps(measured), flush=True)
    return results


def write(results: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    dynamic = next((r for r in results["rows"] if r["row"] == "DynamicCache"), None)
    lines = [
        f"# Peak memory of generate: {results['batch']} x {results['length']} prompt tokens + "
        f"{results['new_tokens']} new, {results['dtype']}",
        "",
        f"Machine: {results['machine']}  ",
        f"Command: `{results['command']}`  ",
        f"Peak: {results['peak_kind']}, each row in a process of its own; model: what the process holds after loading "
        "the model (and compressor) and one 16-token forward.",
        "",
        "| cache | peak MiB | model MiB | peak - model MiB | vs DynamicCache |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        ratio = "-" if dynamic is None else f"{r['peak_minus_model_bytes'] / dynamic['peak_minus_model_bytes']:.2f}x"
        lines.append(
            f"| {r['row']} | {r['peak_bytes'] / 2**20:.0f} | {r['model_bytes'] / 2**20:.0f} | "
            f"{r['peak_minus_model_bytes'] / 2**20:.0f} | {ratio} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=bitrows.positive_int, default=8000)
    parser.add_argument("--batch", type=bitrows.positive_int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=bitrows.positive_int, default=None)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--row", choices=ROWS, default=None, help=argparse.SUPPRESS)  # one row, in this process
    parser.add_argument("--name", default="memory", help="results file name under bench/results/")
    args = parser.parse_args()
    if args.length + NEW_TOKENS + 1 > 8192:
        refuse("the embedded default has 8192 positions: --length plus 64 new tokens must stay below it")
    if args.row is None:  # the text must hold the prompts; checked before any row's process starts
        from kvlight.models import load_tokenizer

        prompt_batches(load_tokenizer(None), [args.length], [args.batch])
    if args.row is not None:
        print(json.dumps(measure(args)))
        return
    write(run(args), args.name)


if __name__ == "__main__":
    main()

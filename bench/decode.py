"""Decode speed: tokens/s of kvlight's cache against DynamicCache, StaticCache and quanto int4, with cache bytes.

Protocol: the embedded default (SmolLM2-135M-Instruct) in ``--dtype`` with ``--threads`` intra-op threads; prompts
of ``--lengths`` tokens (default 2048, 4096 and 8000: the model has 8192 positions) at batch ``--batches`` (1 and 8),
cut from the docstrings of CPython's standard library (no compressor here was fitted on them: kvlight's are fitted on
the pydoc topics), one stretch of text per batch row. Each (length, batch) prompt is prefilled once into a
``DynamicCache`` in chunks of 1024 tokens; every row's cache is then filled from that prefill (``DynamicCache``: a
copy; ``StaticCache`` and ``QuantizedCache``: their own ``update``; kvlight: ``CompressedCache.ingest``), so all rows
decode from the same history. Then ``--new-tokens`` tokens (64) are decoded greedily one forward at a time, timed
with ``time.perf_counter`` around the decode loop only, after one untimed step. Rows run one after another in one
process, interleaved over ``--rounds`` rounds (3; each from a fresh copy of the prefill): the table gives each row's
median tokens/s and the median over rounds of its ratio to DynamicCache (StaticCache) measured in the same round.

Rows: ``DynamicCache`` (what a model gets by default; it appends with ``torch.cat``, copying its history every step),
``StaticCache`` (uncompressed, appends in place: the honest floor), HF ``QuantizedCache`` quanto int4 (transformers'
defaults: group 64, residual 128), and kvlight at 25 % of an fp16 cache's bytes (4 sinks, the rows of
bench/bitrows.py, fitted on the frontier's calibration windows): Fisher-whitened widths with keys coded relative to
RoPE blocks of 16 tokens (scored in latent space), and joint-Fisher widths with keys coded before RoPE (rebuilt and
rotated each step), both through ``CompressedKVModelWrapper``'s fast path.
``--kvlight NAME=DIR`` times compressors ``kvlight calibrate`` wrote instead. Cache bytes are counted from the
tensors each cache holds after decoding (kvlight: exact tokens in bf16 when the model is float32, as a 16-bit
deployment keeps them); on a GPU the table adds each row's ``torch.cuda.max_memory_allocated`` growth.

    python bench/decode.py                                            # float32, the machine's threads
    python bench/decode.py --threads 1 --name decode_1thread
    python bench/decode.py --dtype bfloat16 --name decode_bf16        # CPUs with native bf16, or a GPU
    python bench/decode.py --lengths 2048 --batches 1 --new-tokens 16 --name decode_smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bitrows  # noqa: E402
from bench.common import embedded_default, held_bytes, machine, offline_windows, prose_tokens  # noqa: E402
from kvlight.compressors.compressor import load_compressor  # noqa: E402
from kvlight.hf import cache_kwargs, dynamic_cache  # noqa: E402
from kvlight.models import load_tokenizer  # noqa: E402
from kvlight.serving import kernels  # noqa: E402
from kvlight.serving.cache import dynamic_cache_bytes  # noqa: E402
from kvlight.serving.positions import PositionTracker  # noqa: E402
from kvlight.serving.wrapper import CompressedKVModelWrapper  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PREFILL_CHUNK = 1024
#: the kvlight rows timed by default: bench/bitrows.py ids -> (method, setting) of the table.
KVLIGHT_ROWS = {
    "fisher-white-b16-0.25": ("kvlight, keys in RoPE blocks of 16", "25 % of fp16, Fisher-whitened widths, 4 sinks"),
    "fisher-joint-0.25": ("kvlight, keys pre-RoPE", "25 % of fp16, joint-Fisher widths, 4 sinks"),
}
QUANTO = {"backend": "quanto", "nbits": 4, "q_group_size": 64, "residual_length": 128}


def refuse(message: str) -> None:
    """Bad input: one line on stderr, exit code 2, before anything is loaded or written."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def prompt_batches(tokenizer, lengths: list[int], batches: list[int]) -> torch.Tensor:
    """The prompt text, or exit 2 with one line when it cannot fill the longest (length, batch): every row is
    decoded from prompts of the length it reports."""
    prose = prose_tokens(tokenizer)
    need = max(lengths) * max(batches)
    if prose.numel() < need:
        refuse(
            f"{max(batches)} prompts of {max(lengths)} tokens need {need} tokens of text; the standard library's "
            f"docstrings hold {prose.numel()}: ask for fewer or shorter prompts (--batches, --lengths)"
        )
    return prose


def kvlight_compressors(model, geometry, tokenizer, args) -> dict[str, tuple[str, str, object]]:
    """``{row id: (method, setting, compressor)}``: the directories of ``--kvlight`` or the default rows."""
    dtype = next(model.parameters()).dtype
    if args.kvlight:
        out = {}
        for spec in args.kvlight:
            name, directory = spec.split("=", 1)
            out[name] = (f"kvlight {name}", directory, load_compressor(directory, geometry).to(dtype))
        return out
    calibration = offline_windows(tokenizer, 512, skip=16, count=bitrows.CALIBRATION_WINDOWS)
    inputs = bitrows.FitInputs(model, geometry, calibration)
    tracker = PositionTracker(model)
    out = {}
    try:
        for row in bitrows.all_rows(distilled=False):
            if bitrows.row_id(row) in KVLIGHT_ROWS:
                compressor = bitrows.compressor_for(
                    row,
                    model,
                    geometry,
                    calibration,
                    inputs.rows(row.rope_block),
                    inputs.metrics(row.rope_block),
                    tracker,
                )
                out[bitrows.row_id(row)] = (*KVLIGHT_ROWS[bitrows.row_id(row)], compressor)
    finally:
        tracker.close()
    return dict(sorted(out.items(), key=lambda item: list(KVLIGHT_ROWS).index(item[0])))


@torch.no_grad()
def prefill(model, prompts: torch.Tensor):
    """The prompts (all but their last token) in a DynamicCache, in chunks; returns it and the last tokens."""
    cache = dynamic_cache()
    body = prompts[:, :-1]
    for start in range(0, body.shape[1], PREFILL_CHUNK):
        model(input_ids=body[:, start : start + PREFILL_CHUNK], **cache_kwargs(cache))
    return cache, prompts[:, -1:]


@torch.no_grad()
def decode(forward, cache, last: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy decode from ``last [B, 1]``: one untimed step, then ``new_tokens`` timed; (seconds, tokens)."""
    token = forward(input_ids=last, **cache_kwargs(cache)).logits[:, -1].argmax(-1, keepdim=True)
    synchronize()
    start, out = time.perf_counter(), []
    for _ in range(new_tokens):
        token = forward(input_ids=token, **cache_kwargs(cache)).logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    synchronize()
    return time.perf_counter() - start, torch.cat(out, dim=1)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def filled(kind: str, reference, model, length: int, new_tokens: int):
    """A cache of ``kind`` holding what ``reference`` (the prefill's DynamicCache) holds."""
    from transformers.cache_utils import QuantizedCache, StaticCache

    if kind == "dynamic":
        return copy.deepcopy(reference)
    if kind == "static":
        cache = StaticCache(config=model.config, max_cache_len=length + new_tokens + 1)
    else:
        cache = QuantizedCache(config=model.config, **QUANTO)
    for index, layer in enumerate(reference.layers):
        cache.update(layer.keys.clone(), layer.values.clone(), index)
    return cache


def quanto_bytes(cache, geometry, batch: int) -> int:
    """Bytes a quanto QuantizedCache holds: int4 codes, an fp16 scale and zero point per group, the residual exact."""
    total = 0
    heads, dim, group = geometry.num_kv_heads, geometry.head_dim, QUANTO["q_group_size"]
    for layer in cache.layers:
        residual = 0 if layer.keys is None or layer.keys.dim() != 4 else layer.keys.shape[-2]
        quantized = batch * heads * (layer.cumulative_length - residual) * dim
        total += 2 * (quantized * QUANTO["nbits"] // 8 + (quantized // group) * 4)
        total += 2 * batch * heads * residual * dim * layer.keys.element_size()
    return total


def time_one(kind, fitted, reference, last, model, length, new_tokens, storage, geometry, batch, device):
    """One row's decode from a fresh copy of the prefill: (seconds, tokens, cache bytes, peak allocated or None)."""
    wrapper = None
    if kind in fitted:
        wrapper = CompressedKVModelWrapper(model, fitted[kind][2], storage_dtype=storage)
        cache = wrapper.new_cache()
        cache.ingest([(layer.keys, layer.values) for layer in reference.layers])
        forward = wrapper
    else:
        cache, forward = filled(kind, reference, model, length, new_tokens), model
    gc.collect()
    before = 0
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    try:
        seconds, tokens = decode(forward, cache, last, new_tokens)
    finally:
        if wrapper is not None:
            wrapper.close()
    peak = torch.cuda.max_memory_allocated() - before if device == "cuda" else None
    if wrapper is not None:
        stored = cache.stored_bytes()
    elif kind == "quanto":
        stored = quanto_bytes(cache, geometry, batch)
    else:
        stored = held_bytes(cache)
    del cache
    gc.collect()
    return seconds, tokens, stored, peak


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    prose = prompt_batches(load_tokenizer(None), args.lengths, args.batches)  # refused before the model loads
    model, tokenizer, geometry = embedded_default(dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    fitted = {
        name: (m, s, c.to(device)) for name, (m, s, c) in kvlight_compressors(model, geometry, tokenizer, args).items()
    }
    storage = torch.bfloat16 if dtype == torch.float32 else None  # exact tokens in 16 bits, as deployed
    rows = []
    for length in args.lengths:
        for batch in args.batches:
            prompts = prose[: batch * length].view(batch, length).to(device)
            reference, last = prefill(model, prompts)
            fp16 = dynamic_cache_bytes(geometry, batch, length + args.new_tokens, torch.float16)
            methods = [
                ("DynamicCache", args.dtype, "dynamic"),
                ("StaticCache", f"{args.dtype}, in place", "static"),
                ("HF QuantizedCache", "quanto int4, group 64, residual 128", "quanto"),
                *((method, setting, name) for name, (method, setting, _) in fitted.items()),
            ]
            # Rounds: every method once per round, in order, each from a fresh copy of the prefill; a ratio is the
            # median over rounds of the two methods' speeds in the same round (the machine drifts between rounds).
            timings: dict[str, list[float]] = {kind: [] for _, _, kind in methods}
            first_tokens: dict[str, torch.Tensor] = {}
            stored: dict[str, int] = {}
            peaks: dict[str, int | None] = {}
            for _ in range(args.rounds):
                for *_, kind in methods:
                    seconds, tokens, stored[kind], peaks[kind] = time_one(
                        kind, fitted, reference, last, model, length, args.new_tokens, storage, geometry, batch, device
                    )
                    timings[kind].append(batch * args.new_tokens / seconds)
                    first_tokens.setdefault(kind, tokens)
            for method, setting, kind in methods:
                speeds = timings[kind]
                row = {
                    "length": length,
                    "batch": batch,
                    "method": method,
                    "setting": setting,
                    "tokens_per_s": statistics.median(speeds),
                    "tokens_per_s_rounds": speeds,
                    "vs_dynamic": statistics.median(a / b for a, b in zip(speeds, timings["dynamic"])),
                    "vs_static": statistics.median(a / b for a, b in zip(speeds, timings["static"])),
                    "cache_bytes": stored[kind],
                    "cache_fraction_fp16": stored[kind] / fp16,
                    "peak_allocated_bytes": peaks[kind],
                    "tokens_equal_dynamic": float((first_tokens[kind] == first_tokens["dynamic"]).float().mean()),
                }
                rows.append(row)
                print(
                    f"L={length} B={batch} {method:24s} {row['tokens_per_s']:7.2f} tok/s x{row['vs_dynamic']:.2f} "
                    f"dynamic x{row['vs_static']:.2f} static  cache {100 * row['cache_fraction_fp16']:5.1f} % of fp16",
                    flush=True,
                )
            del reference
            gc.collect()
    return {
        "machine": machine(),
        "command": "python bench/decode.py " + " ".join(sys.argv[1:]),
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "kernels": "native (kvlight.serving.kernels)" if kernels.library() is not None and device == "cpu" else "torch",
        "rows": rows,
    }


def write(results: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    gpu = any(r["peak_allocated_bytes"] is not None for r in results["rows"])
    lines = [
        f"# Decode speed ({results['new_tokens']} new tokens, {results['dtype']}, median of {results['rounds']} rounds)",
        "",
        f"Machine: {results['machine']}  ",
        f"Command: `{results['command']}`  ",
        f"kvlight's packed codes read by: {results['kernels']}",
        "",
        "| prompt | batch | method | setting | tokens/s | vs DynamicCache | vs StaticCache | cache bytes (% of fp16) "
        f"| tokens = DynamicCache |{' peak allocated MiB |' if gpu else ''}",
        f"|---:|---:|---|---|---:|---:|---:|---:|---:|{'---:|' if gpu else ''}",
    ]
    for r in results["rows"]:
        vs_static = "-" if r["vs_static"] is None else f"{r['vs_static']:.2f}x"
        peak = f" {r['peak_allocated_bytes'] / 2**20:.0f} |" if gpu else ""
        lines.append(
            f"| {r['length']} | {r['batch']} | {r['method']} | {r['setting']} | {r['tokens_per_s']:.2f} | "
            f"{r['vs_dynamic']:.2f}x | {vs_static} | {r['cache_bytes'] / 2**20:.1f} MiB "
            f"({100 * r['cache_fraction_fp16']:.1f} %) | {100 * r['tokens_equal_dynamic']:.0f} % |{peak}"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=bitrows.positive_int, nargs="+", default=[2048, 4096, 8000])
    parser.add_argument("--batches", type=bitrows.positive_int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=bitrows.positive_int, default=64)
    parser.add_argument(
        "--rounds", type=bitrows.positive_int, default=3, help="decodes per row, interleaved; medians are reported"
    )
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--threads", type=bitrows.positive_int, default=None, help="intra-op threads (default torch's)")
    parser.add_argument("--kvlight", nargs="+", default=None, metavar="NAME=DIR", help="compressors to time instead")
    parser.add_argument("--name", default="decode", help="results file name under bench/results/")
    args = parser.parse_args()
    for spec in args.kvlight or ():
        if "=" not in spec or not Path(spec.split("=", 1)[1]).is_dir():
            refuse(f"--kvlight {spec!r}: give NAME=DIR, a compressor directory kvlight calibrate wrote")
    if max(args.lengths) + args.new_tokens + 1 > 8192:
        refuse("the embedded default has 8192 positions: --lengths plus --new-tokens must stay below it")
    write(run(args), args.name)


if __name__ == "__main__":
    main()

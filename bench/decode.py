"""Decode speed with the compressed cache: tokens/s and cache bytes vs DynamicCache and HF QuantizedCache.

Protocol (issue 5): the embedded default (SmolLM2-135M-Instruct), float32 by default (``--dtype``: on CPUs
without native bfloat16 a bf16 model is several times slower; kvlight then stores its exact tokens in bf16);
prompts of 512, 2048 and 8192 tokens cut from the built-in offline corpus; batch 1 and 8; 128 new tokens, greedy, one token
per forward, timed with ``time.perf_counter`` around the decode loop only. Each (length, batch)
prompt is prefilled once into a ``DynamicCache`` (in chunks of 1024 tokens); every method's cache is
then filled from that prefill (``DynamicCache``: a copy; ``QuantizedCache``: its own ``update``;
kvlight: ``CompressedCache.ingest``), so all rows decode from the same history and only decoding is
timed. Methods run one after another in one process, so their ratios share the machine's state.

Rows: ``DynamicCache``; HF ``QuantizedCache`` (quanto int4, group 64, residual 16); kvlight at the recommended
configuration (issue 11: joint-Fisher-allocated widths per principal direction, 25 % of fp16 bytes at 512 tokens,
4 sinks, no recent window; bench/bitrows.py) and at the previous one (PCA K64/V64 int4 latents in groups of 64,
4 sinks, 16 recent), both on the fast path (latents read in place) and, with ``--plain``, on the plain path (history rebuilt each step).
Cache bytes are counted from the tensors each cache holds at the end of decoding (as in
``bench/frontier.py``); peak memory is ``torch.cuda.max_memory_allocated`` on a GPU, the growth of
the process's peak RSS during the decode loop on CPU.

    python bench/decode.py                                   # every length and batch (slow on CPU)
    python bench/decode.py --lengths 512 2048 --batches 8 --new-tokens 32
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (  # noqa: E402
    captured_rows,
    embedded_default,
    held_bytes,
    machine,
    offline_windows,
    quantized_cache_bytes,
)
from kvlight.compressors.compressor import KVCompressor, load_compressor  # noqa: E402
from kvlight.config import CompressionConfig  # noqa: E402
from kvlight.hf import cache_kwargs, dynamic_cache  # noqa: E402
from kvlight.serving.cache import dynamic_cache_bytes  # noqa: E402
from kvlight.serving.wrapper import CompressedKVModelWrapper  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PREFILL_CHUNK = 1024


def _rss_peak_reset() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def compressors(model, geometry, tokenizer, args) -> dict[str, KVCompressor]:
    """The recommended widths compressor and the previous recommended PCA int4 one: loaded from ``--widths`` /
    ``--pca`` directories (what ``kvlight calibrate`` wrote), otherwise fitted on the frontier's calibration windows
    (the widths row from bench/bitrows.py's disk cache when bench/frontier.py made it)."""
    from bench import bitrows
    from kvlight.serving.positions import PositionTracker

    out = {}
    calibration = offline_windows(tokenizer, 512, skip=16, count=16)
    rows = None
    if args.pca:
        out["previous"] = load_compressor(args.pca, geometry)
    else:
        rows = captured_rows(model, geometry, calibration)
        config = CompressionConfig.uniform(
            geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=geometry.head_dim, algo="pca",
            sink_tokens=4, recent_window=16, latent_bits=4,
        )  # fmt: skip
        config.quant_group_size = 64
        out["previous"] = KVCompressor(config, geometry)
        out["previous"].fit_statistics([rows])
    if args.widths:
        out["widths"] = load_compressor(args.widths, geometry)
    else:
        rows = rows if rows is not None else captured_rows(model, geometry, calibration)
        metrics = bitrows.sensitivity(model, geometry, calibration)
        tracker = PositionTracker(model)
        row = bitrows.BitRow(0.25, "fisher-joint")
        out["widths"] = bitrows.compressor_for(row, model, geometry, calibration, rows, metrics, tracker)
        tracker.close()
    return {name: c.to(next(model.parameters()).dtype) for name, c in out.items()}


@torch.no_grad()
def prefill(model, prompts: torch.Tensor):
    cache = dynamic_cache()
    logits = None
    for start in range(0, prompts.shape[1], PREFILL_CHUNK):
        logits = model(input_ids=prompts[:, start : start + PREFILL_CHUNK], **cache_kwargs(cache)).logits[:, -1]
    return cache, logits.argmax(-1, keepdim=True)


@torch.no_grad()
def decode(model, cache, first: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Greedy decode ``new_tokens`` one at a time; returns (seconds, tokens ``[B, new_tokens]``)."""
    token, out = first, []
    model(input_ids=token, **cache_kwargs(cache))  # warm-up step: allocations, dispatch (not timed)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = model(input_ids=token, **cache_kwargs(cache)).logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cat(out, dim=1)


def run(args) -> dict:
    from transformers.cache_utils import QuantizedCache

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model, tokenizer, geometry = embedded_default(dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    fitted = {name: c.to(device) for name, c in compressors(model, geometry, tokenizer, args).items()}
    rows = []
    for length in args.lengths:
        corpus = offline_windows(tokenizer, length, skip=0, count=max(args.batches)).to(device)
        for batch in args.batches:
            prompts = corpus[:batch]
            reference, first = prefill(model, prompts)
            full_fp16 = dynamic_cache_bytes(geometry, batch, length + args.new_tokens + 1, torch.float16)
            methods = [("DynamicCache", args.dtype, lambda: dynamic_cache(), None, None)]
            methods.append(
                (
                    "HF QuantizedCache",
                    "quanto int4 g64 res16",
                    lambda: QuantizedCache(
                        backend="quanto", config=model.config, nbits=4, q_group_size=64, residual_length=16
                    ),
                    None,
                    None,
                )
            )
            names = {"widths": "kvlight widths (recommended)", "previous": "kvlight PCA int4 (previous)"}
            for algo in ("widths", "previous"):
                for fast in (True, False) if args.plain else (True,):
                    methods.append((names[algo], "fast path" if fast else "plain path", None, algo, fast))
            baseline = None
            for method, setting, make, algo, fast in methods:
                wrapper = None
                if algo is None:
                    cache = make()
                    for index, layer in enumerate(reference.layers):
                        cache.update(layer.keys.clone(), layer.values.clone(), index)
                else:
                    storage = torch.bfloat16 if dtype == torch.float32 else None  # exact tokens in 16 bits
                    wrapper = CompressedKVModelWrapper(model, fitted[algo], fast_decode=fast, storage_dtype=storage)
                    cache = wrapper.new_cache()
                    cache.ingest([(layer.keys, layer.values) for layer in reference.layers])
                gc.collect()
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                _rss_peak_reset()
                rss_before = _rss_kib("VmRSS")
                seconds, tokens = decode(model, cache, first, args.new_tokens)
                if device == "cuda":
                    peak = torch.cuda.max_memory_allocated() - before
                else:
                    peak = (_rss_kib("VmHWM") - rss_before) * 1024
                if algo is not None:
                    stored, allocated, scratch = cache.stored_bytes(), cache.allocated_bytes(), cache.scratch_bytes()
                elif method == "DynamicCache":
                    stored = allocated = held_bytes(cache)
                    scratch = 0
                else:
                    stored = allocated = quantized_cache_bytes(cache, geometry, batch)
                    scratch = 0
                tps = batch * args.new_tokens / seconds
                if baseline is None:
                    baseline = (tps, tokens)
                row = {
                    "length": length,
                    "batch": batch,
                    "method": method,
                    "setting": setting,
                    "tokens_per_s": tps,
                    "ratio_vs_dynamic": tps / baseline[0],
                    "cache_bytes": stored,
                    "allocated_bytes": allocated,
                    "scratch_bytes": scratch,
                    "cache_fraction_fp16": stored / full_fp16,
                    "peak_growth_bytes": peak,
                    "tokens_equal_dynamic": float((tokens == baseline[1]).float().mean()),
                }
                rows.append(row)
                print(
                    f"L={length} B={batch} {method:18s} {setting:22s} {tps:8.1f} tok/s  x{row['ratio_vs_dynamic']:.2f}  "
                    f"cache {row['cache_fraction_fp16'] * 100:5.1f} % of fp16  peak +{peak / 2**20:7.1f} MiB",
                    flush=True,
                )
                if wrapper is not None:
                    wrapper.close()
                del cache
                gc.collect()
            del reference
            gc.collect()
    return {
        "machine": machine(),
        "command": "python bench/decode.py " + " ".join(sys.argv[1:]),
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "peak_kind": "torch.cuda.max_memory_allocated growth" if device == "cuda" else "peak RSS growth during decode",
        "rows": rows,
    }


def write(results: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"# Decode speed ({results['new_tokens']} new tokens, {results['dtype']})",
        "",
        f"Machine: {results['machine']}  ",
        f"Command: `{results['command']}`  ",
        f"Peak memory: {results['peak_kind']}.",
        "",
        "| prompt | batch | method | setting | tokens/s | vs DynamicCache | cache bytes (% of fp16) | peak growth MiB | tokens = DynamicCache |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['length']} | {r['batch']} | {r['method']} | {r['setting']} | {r['tokens_per_s']:.1f} | "
            f"{r['ratio_vs_dynamic']:.2f}x | {r['cache_bytes'] / 2**20:.1f} MiB ({r['cache_fraction_fp16'] * 100:.1f} %) | "
            f"{r['peak_growth_bytes'] / 2**20:.1f} | {r['tokens_equal_dynamic'] * 100:.0f} % |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--widths", default=None, help="directory of the recommended compressor (kvlight calibrate)")
    parser.add_argument("--pca", default=None, help="directory of a PCA int4 compressor (the previous recommended)")
    parser.add_argument("--plain", action="store_true", help="also time the plain reconstruction path")
    parser.add_argument("--name", default="decode", help="results file name under bench/results/")
    args = parser.parse_args()
    write(run(args), args.name)


if __name__ == "__main__":
    main()

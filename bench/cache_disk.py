"""Compressed caches on disk: bytes of ``cache.save`` (plain and zstd) against an fp16 cache and ``torch.save``.

Protocol (issue 15, item 7): the embedded default (SmolLM2-135M-Instruct, float32), one prompt of each length cut
from the built-in offline corpus, prefilled once into a ``DynamicCache`` (chunks of 1024 tokens); each kvlight cache
is filled from that prefill (``CompressedCache.ingest``, exact tokens in bf16 as a 16-bit deployment keeps them, as
bench/decode.py does) at the recommended configuration (joint-Fisher widths at 25 % of fp16 bytes at 512 tokens, 4
sinks, no recent window; bench/bitrows.py) and the previous one (PCA K64/V64 int4 latents in groups of 64, 4 sinks,
16 recent). Columns: the bytes the cache holds in memory (``stored_bytes``); the file sizes of ``cache.save(path)``
and ``cache.save(path, entropy="zstd")``; zstd of the same tensors with their bytes as stored (no reordering: what
the per-tensor reordering of kvlight.serving.persist gains, header included in neither); an fp16 ``DynamicCache`` of that length (formula); the
file of ``torch.save`` of the ``DynamicCache``'s tensors cast to fp16; seconds to save and load (best of 3); and
whether the next 16 greedy tokens from each loaded cache equal those from the cache it was saved from.

    python bench/cache_disk.py                       # 512 and 2048 tokens
    python bench/cache_disk.py --lengths 512 2048 8192
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import embedded_default, machine, offline_windows  # noqa: E402
from bench.decode import compressors, prefill  # noqa: E402
from kvlight.hf import cache_kwargs  # noqa: E402
from kvlight.serving import persist  # noqa: E402
from kvlight.serving.cache import dynamic_cache_bytes  # noqa: E402
from kvlight.serving.wrapper import CompressedKVModelWrapper  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NEXT_TOKENS = 16
REPEATS = 3
NAMES = {"widths": "kvlight widths (recommended)", "previous": "kvlight PCA int4 (previous)"}


@torch.no_grad()
def greedy(model, cache, first: torch.Tensor, count: int = NEXT_TOKENS) -> torch.Tensor:
    """The ``count`` greedy tokens ``[B, count]`` after ``first [B, 1]`` (not yet in ``cache``)."""
    token, out = first, []
    for _ in range(count):
        token = model(input_ids=token, **cache_kwargs(cache)).logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)


def timed(fn, repeats: int = REPEATS):
    """``(best seconds, last result)`` of ``repeats`` calls of ``fn``."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def raw_zstd_bytes(path: Path) -> int:
    """Bytes of zstd (the level persist uses) over each tensor of a plain saved cache, its bytes as stored."""
    from safetensors.torch import load

    compressor = persist._zstd_compressor()
    tensors = load(path.read_bytes())
    return sum(
        len(compressor.compress(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()))
        for t in tensors.values()
    )


CODING_NAMES = {"": "as stored", "T": "transposed", "S": "byte planes", "TS": "transposed + byte planes"}


def codings(path: Path) -> dict[str, int]:
    """How many tensors of a zstd-saved cache each reordering (kvlight.serving.persist.CODINGS) was chosen for."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = json.loads(handle.metadata()[persist.METADATA_KEY])
    counts: dict[str, int] = {}
    for entry in metadata["tensors"].values():
        name = CODING_NAMES[entry["coding"]]
        counts[name] = counts.get(name, 0) + 1
    return counts


def torch_save_bytes(reference, directory: Path) -> tuple[int, int]:
    """File sizes of ``torch.save`` of the DynamicCache's ``(keys, values)`` per layer: cast to fp16, and as run."""
    sizes = []
    for cast in (torch.float16, None):
        tensors = [
            (layer.keys.to(cast or layer.keys.dtype), layer.values.to(cast or layer.values.dtype))
            for layer in reference.layers
        ]
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        path = directory / f"dynamic-{cast}.pt"
        path.write_bytes(buffer.getvalue())
        sizes.append(path.stat().st_size)
    return sizes[0], sizes[1]


def measure(model, compressor, reference, first, directory: Path) -> dict:
    """One row: save / load sizes and times of one kvlight cache filled from ``reference``."""
    wrapper = CompressedKVModelWrapper(model, compressor, storage_dtype=torch.bfloat16)
    try:
        cache = wrapper.new_cache()
        cache.ingest([(layer.keys, layer.values) for layer in reference.layers])
        row = {"stored_bytes": cache.stored_bytes()}
        loaded = {}
        for entropy in (None, "zstd"):
            path = directory / f"cache-{entropy}.safetensors"
            row[f"save_s_{entropy}"], _ = timed(lambda: cache.save(path, entropy=entropy))
            row[f"file_bytes_{entropy}"] = path.stat().st_size
            row[f"load_s_{entropy}"], loaded[entropy] = timed(lambda: wrapper.load_cache(path))
        row["zstd_as_stored_bytes"] = raw_zstd_bytes(directory / "cache-None.safetensors")
        row["zstd_codings"] = codings(directory / "cache-zstd.safetensors")
        expected = greedy(model, cache, first)
        for entropy, restored in loaded.items():
            row[f"tokens_equal_{entropy}"] = bool(torch.equal(greedy(model, restored, first), expected))
        return row
    finally:
        wrapper.close()


def run(args) -> dict:
    torch.manual_seed(0)
    model, tokenizer, geometry = embedded_default(torch.float32)
    fitted = compressors(model, geometry, tokenizer, argparse.Namespace(pca=None, widths=None))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        for length in args.lengths:
            prompt = offline_windows(tokenizer, length, skip=0, count=1)
            reference, first = prefill(model, prompt)
            fp16_bytes = dynamic_cache_bytes(geometry, 1, length, torch.float16)
            torch_fp16, torch_as_run = torch_save_bytes(reference, directory)
            for algo in ("widths", "previous"):
                row = {"length": length, "method": NAMES[algo], "fp16_bytes": fp16_bytes}
                row.update(torch_save_fp16_bytes=torch_fp16, torch_save_fp32_bytes=torch_as_run)
                row.update(measure(model, fitted[algo], reference, first, directory))
                rows.append(row)
                print(
                    f"L={length} {row['method']:30s} plain {row['file_bytes_None'] / 2**20:6.2f} MiB  "
                    f"zstd {row['file_bytes_zstd'] / 2**20:6.2f} MiB  fp16 {fp16_bytes / 2**20:6.2f} MiB  "
                    f"tokens {row['tokens_equal_None']}/{row['tokens_equal_zstd']}",
                    flush=True,
                )
    return {
        "machine": machine(),
        "command": "python bench/cache_disk.py " + " ".join(sys.argv[1:]),
        "zstd_level": persist.ZSTD_LEVEL,
        "format_version": persist.VERSION,
        "rows": rows,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def write(results: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Compressed caches on disk: `cache.save` vs an fp16 cache and `torch.save(DynamicCache)`",
        "",
        f"Machine: {results['machine']}; model dtype float32 (kvlight exact tokens in bf16)  ",
        f"Command: `{results['command']}`  ",
        f"Format version {results['format_version']}, zstd level {results['zstd_level']}; one prompt per length; "
        f"times: best of {REPEATS}; tokens: the next {NEXT_TOKENS} greedy tokens from the loaded cache (plain / zstd) "
        "equal those from the cache it was saved from.",
        "",
        "| prompt | method | in memory | save | save zstd (% of fp16) | zstd as stored | fp16 DynamicCache (formula) | "
        "torch.save fp16 / fp32 | save s (plain / zstd) | load s (plain / zstd) | same tokens |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results["rows"]:
        same = "yes" if r["tokens_equal_None"] and r["tokens_equal_zstd"] else "no"
        lines.append(
            f"| {r['length']} | {r['method']} | {_mib(r['stored_bytes'])} | {_mib(r['file_bytes_None'])} "
            f"({100 * r['file_bytes_None'] / r['fp16_bytes']:.1f} %) | {_mib(r['file_bytes_zstd'])} "
            f"({100 * r['file_bytes_zstd'] / r['fp16_bytes']:.1f} %) | {_mib(r['zstd_as_stored_bytes'])} | "
            f"{_mib(r['fp16_bytes'])} | {_mib(r['torch_save_fp16_bytes'])} / {_mib(r['torch_save_fp32_bytes'])} | "
            f"{r['save_s_None']:.3f} / {r['save_s_zstd']:.3f} | {r['load_s_None']:.3f} / {r['load_s_zstd']:.3f} | {same} |"
        )
    lines += ["", "zstd reorderings chosen (tensors per coding, per row):", ""]
    for r in results["rows"]:
        chosen = ", ".join(f"{k}: {v}" for k, v in sorted(r["zstd_codings"].items()))
        lines.append(f"- {r['length']}, {r['method']}: {chosen}")
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--name", default="cache_disk", help="results file name under bench/results/")
    args = parser.parse_args()
    write(run(args), args.name)


if __name__ == "__main__":
    main()

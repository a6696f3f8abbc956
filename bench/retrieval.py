"""What a compressed cache forgets: passkey retrieval and long-range copy, beside perplexity's rows.

Protocol (issue 11): the embedded default (SmolLM2-135M-Instruct); prose that is not the calibration text (the
docstrings of CPython's standard library, read from its sources; the calibration text is CPython's pydoc topics).

- Passkey: a 5-digit key placed at 10, 50 and 90 % depth of 1000, 2000 and 4000 tokens of prose, between an
  instruction to remember it and the question ("What is the passkey? The passkey is"); 10 prompts per cell (another
  stretch of prose and another key each), no chat template. Every prompt is fed in chunks of 64 tokens through the
  cache (so the question reads what the cache stored, as in bench/frontier.py), then 7 tokens are decoded greedily;
  a prompt counts when the first 5-digit number decoded is the key.
- Long-range copy: passages of 1000 tokens of prose fed twice (2000 tokens, chunks of 64): perplexity and top-1
  token accuracy over the second copy (its first token left out), which can only be right by reading the first.

Rows: DynamicCache, HF QuantizedCache (quanto int4 and int2, HQQ int4; group 64, residual 16) and the kvlight rows of
bench/bitrows.py (fitted on the frontier's calibration windows, distilled rows loaded from its disk cache).

    python bench/retrieval.py                               # writes bench/results/retrieval.{md,json}
    python bench/retrieval.py --rows fisher-0.25 fisher-0.125 --merge
    python bench/retrieval.py --lengths 1000 2000 --quant quanto-4   # a shorter run (stated in the table)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bitrows  # noqa: E402
from bench.common import embedded_default, machine, offline_windows, prose_tokens, results_lock  # noqa: E402
from kvlight.hf import cache_kwargs, dynamic_cache  # noqa: E402
from kvlight.serving.attention import LatentAttention  # noqa: E402
from kvlight.serving.cache import CacheSettings, CompressedCache  # noqa: E402
from kvlight.serving.positions import PositionTracker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LENGTHS = (1000, 2000, 4000)
DEPTHS = (0.1, 0.5, 0.9)
PROMPTS = 10
CHUNK = 64
NEW_TOKENS = 7
COPY_PASSAGE, COPY_PASSAGES, COPY_BATCH = 1000, 8, 4
INTRO = (
    "There is an important passkey hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the passkey.\n\n"
)
NEEDLE = "\n\nThe passkey is {key}. Remember it. {key} is the passkey.\n\n"
QUESTION = "\n\nWhat is the passkey? The passkey is"
QUANT_ROWS = [("quanto", 4), ("quanto", 2), ("hqq", 4)]


def passkey_prompts(tokenizer, prose: torch.Tensor, length: int, depth: float, count: int = PROMPTS):
    """``(prompts [count, length], keys)``: each prompt exactly ``length`` tokens.

    The key and the stretch of prose depend only on ``(length, depth, index)``, so a run over fewer lengths or
    prompts asks a subset of the full run's questions.
    """
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    cell = length * 100 + round(depth * 100)
    generator = torch.Generator().manual_seed(1000 + cell)
    prompts, keys = [], []
    for index in range(count):
        key = int(torch.randint(10_000, 100_000, (1,), generator=generator))
        intro, needle, question = encode(INTRO), encode(NEEDLE.format(key=key)), encode(QUESTION)
        filler = length - len(intro) - len(needle) - len(question)
        start = ((cell * 16 + index) * 3779) % (prose.numel() // 2 - filler)  # the first half of the prose
        text = prose[start : start + filler].tolist()
        cut = int(depth * filler)
        prompts.append(intro + text[:cut] + needle + text[cut:] + question)
        keys.append(key)
    return torch.tensor(prompts), keys


def copy_passages(prose: torch.Tensor) -> torch.Tensor:
    """``[COPY_PASSAGES, 2 * COPY_PASSAGE]``: passages from the second half of the prose, each fed twice."""
    half = prose.numel() // 2
    stride = (half - COPY_PASSAGE) // COPY_PASSAGES
    passages = [prose[half + i * stride : half + i * stride + COPY_PASSAGE] for i in range(COPY_PASSAGES)]
    return torch.stack([torch.cat([p, p]) for p in passages])


@torch.no_grad()
def feed(model, ids: torch.Tensor, cache) -> torch.Tensor:
    """Logits of every position, ``ids`` fed in chunks of :data:`CHUNK` through ``cache``."""
    logits = [
        model(input_ids=ids[:, s : s + CHUNK], **cache_kwargs(cache)).logits.float()
        for s in range(0, ids.shape[1], CHUNK)
    ]
    return torch.cat(logits, dim=1)


@torch.no_grad()
def answer(model, prompts: torch.Tensor, cache, tokenizer) -> list[str]:
    last = feed(model, prompts, cache)[:, -1]
    token = last.argmax(-1, keepdim=True)
    out = [token]
    for _ in range(NEW_TOKENS - 1):
        token = model(input_ids=token, **cache_kwargs(cache)).logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return tokenizer.batch_decode(torch.cat(out, 1))


def evaluate(model, tokenizer, prose, make_cache, lengths=LENGTHS, prompts_per_cell: int = PROMPTS) -> dict:
    """Passkey accuracy per (length, depth) and overall; copy perplexity and accuracy."""
    cells, hits, total = {}, 0, 0
    for length in lengths:
        for depth in DEPTHS:
            prompts, keys = passkey_prompts(tokenizer, prose, length, depth, prompts_per_cell)
            texts = answer(model, prompts, make_cache(), tokenizer)
            found = [re.search(r"\d{5}", text) for text in texts]
            right = sum(match is not None and int(match.group()) == key for match, key in zip(found, keys))
            cells[f"{length}@{depth:g}"] = right / len(keys)
            hits, total = hits + right, total + len(keys)
    nll, correct, count = 0.0, 0, 0
    passages = copy_passages(prose)
    for start in range(0, passages.shape[0], COPY_BATCH):
        ids = passages[start : start + COPY_BATCH]
        logits = feed(model, ids, make_cache())
        predicted = logits[:, COPY_PASSAGE : 2 * COPY_PASSAGE - 1]  # predictions of tokens P+1 .. 2P-1
        targets = ids[:, COPY_PASSAGE + 1 :]
        logp = torch.log_softmax(predicted, -1)
        nll += -logp.gather(-1, targets[..., None]).sum().item()
        correct += int((predicted.argmax(-1) == targets).sum())
        count += targets.numel()
    return {
        "passkey": hits / total,
        "passkey_cells": cells,
        "copy_perplexity": math.exp(nll / count),
        "copy_accuracy": correct / count,
    }


def run(args) -> dict:
    from transformers.cache_utils import QuantizedCache

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model, tokenizer, geometry = embedded_default(dtype)
    prose = prose_tokens(tokenizer)
    print(f"prose: {prose.numel()} tokens of standard-library docstrings", flush=True)
    results = {
        "machine": machine(),
        "command": "python " + " ".join(sys.argv),
        "dtype": args.dtype,
        "lengths": args.lengths,
        "prompts": args.prompts,
        "rows": [],
    }
    fast = LatentAttention(model)  # decode steps read the stored latents in place, as CompressedKVModelWrapper does
    tracker = PositionTracker(model)
    selected = [row for row in bitrows.all_rows() if args.rows is None or row_id(row) in args.rows]
    plan = bitrows.Distillation.from_args(args)
    compressors = {}
    if selected:
        # The frontier's calibration: 16 windows of 512 after its longest evaluation text (4 x 2048 tokens).
        calibration = offline_windows(tokenizer, 512, skip=16, count=bitrows.CALIBRATION_WINDOWS)
        distill_windows = bitrows.distillation_windows(tokenizer, 16, plan, "--distill-windows")
        inputs = bitrows.FitInputs(model, geometry, calibration)
        for row in selected:
            compressors[row] = bitrows.compressor_for(
                row, model, geometry, calibration, inputs.rows(row.rope_block), inputs.metrics(row.rope_block), tracker,
                plan, distill_windows,
            )  # fmt: skip

    def record(method: str, setting: str, make_cache) -> None:
        start = time.perf_counter()
        measured = evaluate(model, tokenizer, prose, make_cache, args.lengths, args.prompts)
        row = {"method": method, "setting": setting, **measured}
        row.update(
            {"seconds": time.perf_counter() - start, "command": results["command"], "machine": results["machine"]}
        )
        results["rows"].append(row)
        print(json.dumps(row), flush=True)

    if args.baselines:
        record("none (DynamicCache)", args.dtype, dynamic_cache)
        for backend, bits in [row for row in QUANT_ROWS if f"{row[0]}-{row[1]}" in args.quant]:
            record(
                f"HF QuantizedCache {backend}",
                f"int{bits}, group 64, residual 16",
                lambda b=backend, n=bits: QuantizedCache(
                    backend=b, config=model.config, nbits=n, q_group_size=64, residual_length=16
                ),
            )
    for row, compressor in compressors.items():
        storage = torch.bfloat16 if dtype == torch.float32 else None  # exact tokens in 16 bits, as deployed
        record(
            *row.label(plan),
            lambda c=compressor: CompressedCache(c, tracker, fast=fast, settings=CacheSettings(storage_dtype=storage)),
        )
    fast.close()
    tracker.close()
    return results


row_id = bitrows.row_id


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "retrieval.json").write_text(json.dumps(results, indent=2) + "\n")
    lengths, prompts = results.get("lengths", list(LENGTHS)), results.get("prompts", PROMPTS)
    cells = [f"{length}@{depth:g}" for length in lengths for depth in DEPTHS]
    lines = [
        "# Retrieval: passkey and long-range copy through the compressed cache",
        "",
        f"Machine of the newest run: {results['machine']} (each row's last run in its last column; a row merged "
        "from several runs lists each command in the JSON)  ",
        "Commands: "
        + "; ".join(f"`{c}`" for c in dict.fromkeys(c for r in results["rows"] for c in r["command"].split(" ; "))),
        "",
        "Protocol: embedded default SmolLM2-135M-Instruct, prose from the standard library's docstrings (not the "
        "calibration text). Passkey: a 5-digit key at 10/50/90 % depth of "
        + "/".join(map(str, lengths))
        + f" tokens, {prompts} prompts per cell, "
        "fed in chunks of 64 through the cache, 7 tokens decoded greedily, exact match of the first 5-digit number. "
        "Copy: 8 passages of 1000 tokens fed twice; perplexity and top-1 accuracy of the second copy. Bytes of each "
        "method: bench/results/frontier.md (the same caches).",
        "",
        "| method | setting | passkey | " + " | ".join(cells) + " | copy ppl | copy acc | last run on |",
        "|---|---|---|" + "---|" * len(cells) + "---|---|---|",
    ]
    for r in results["rows"]:
        per_cell = " | ".join(f"{100 * r['passkey_cells'][c]:.0f}" if c in r["passkey_cells"] else "-" for c in cells)
        lines.append(
            f"| {r['method']} | {r['setting']} | {100 * r['passkey']:.1f} % | {per_cell} | "
            f"{r['copy_perplexity']:.3f} | {100 * r['copy_accuracy']:.1f} % | {r['machine'].split(';')[0]} |"
        )
    (RESULTS / "retrieval.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rows", nargs="+", default=None, help="kvlight rows by id, e.g. fisher-0.25 fisher-kl-0.125")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="passkey prompt lengths")
    parser.add_argument("--prompts", type=int, default=PROMPTS, help="passkey prompts per (length, depth) cell")
    parser.add_argument(
        "--quant",
        nargs="+",
        default=[f"{b}-{n}" for b, n in QUANT_ROWS],
        choices=[f"{b}-{n}" for b, n in QUANT_ROWS],
        help="HF QuantizedCache rows",
    )
    bitrows.add_distill_options(parser)
    parser.add_argument("--no-baselines", dest="baselines", action="store_false", help="skip DynamicCache and HF rows")
    parser.add_argument("--merge", action="store_true", help="keep the rows of retrieval.json not measured again")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite retrieval.md from retrieval.json")
    args = parser.parse_args()
    if args.rewrite:
        write(json.loads((RESULTS / "retrieval.json").read_text()))
        return
    known = [row_id(row) for row in bitrows.all_rows()]
    unknown = [name for name in args.rows or () if name not in known]
    if unknown:  # a row id that names no row would run nothing and say nothing
        parser.error(f"unknown --rows {' '.join(unknown)}; the rows are: {' '.join(known)}")
    previous = RESULTS / "retrieval.json"
    if args.merge and previous.exists():
        old_dtype = json.loads(previous.read_text()).get("dtype", "float32")
        if old_dtype != args.dtype:  # rows of two model dtypes in one table would not be comparable
            parser.error(f"--merge: retrieval.json holds {old_dtype} rows; pass --dtype {old_dtype}")
    results = run(args)
    with results_lock(previous):  # a second run finishing meanwhile must not lose its rows, nor this one
        if args.merge and previous.exists():
            results = merged(json.loads(previous.read_text()), results)
        write(results)


def merged(old: dict, new: dict) -> dict:
    """``new`` with the rows and passkey cells of ``old`` it did not measure again.

    A row measured again at other lengths keeps its old cells beside the new ones (the passkey column is then the
    mean over every cell it has: each cell holds the same number of prompts); its copy numbers are the new run's.
    """
    if old.get("prompts", PROMPTS) != new["prompts"]:
        raise SystemExit("--merge: retrieval.json was measured with another --prompts; rerun every row instead")
    fresh = {(r["method"], r["setting"]): r for r in new["rows"]}
    rows = []
    for row in old["rows"]:
        again = fresh.pop((row["method"], row["setting"]), None)
        if again is None:
            rows.append(row)
            continue
        cells = {**row["passkey_cells"], **again["passkey_cells"]}
        kept_old = set(row["passkey_cells"]) - set(again["passkey_cells"])  # the old command only if a cell is left
        commands = dict.fromkeys([*(row.get("command", "").split(" ; ") if kept_old else ()), again["command"]])
        rows.append({**again, "passkey_cells": cells, "passkey": sum(cells.values()) / len(cells),
                     "command": " ; ".join(c for c in commands if c)})  # fmt: skip
    lengths = sorted(set(old.get("lengths", LENGTHS)) | set(new["lengths"]))
    return {**new, "lengths": lengths, "rows": rows + list(fresh.values())}


if __name__ == "__main__":
    main()

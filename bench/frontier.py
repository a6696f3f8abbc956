"""The quality frontier: perplexity change vs stored cache bytes, kvlight vs KV quantization, one run.

Protocol (issue 4): the embedded default (SmolLM2-135M-Instruct) in bf16; the built-in offline
corpus; evaluation windows of 512 and 2048 tokens taken from the start of the corpus; each window
fed in chunks of 64 tokens through the cache, so every chunk attends to what the cache stored.
Bytes are what each cache holds at the end of the window, as a fraction of what the model's default cache
(``DynamicCache(config=model.config)``, whose sliding layers keep only their window; for SmolLM2, which has none, a
full ``DynamicCache``) holds in fp16 at the same length (each JSON row also gives ``bytes_fraction_full``, the
fraction of a full fp16 ``DynamicCache``): for kvlight every tensor the cache holds (latents, scales,
zero points, exact sink/recent tokens, positions), counted from the tensors themselves; for HF
``QuantizedCache`` the codes (nbits per value) plus one scale and one zero point (2 bytes each)
per group of 64, plus its exact residual tokens. The per-model projection weights of kvlight
are reported separately (they do not grow with context). kvlight is calibrated once on 16
windows of 512 tokens that come after every evaluation window, from statistics only: PCA rows, and
"query-weighted keys" rows (KVSplice heads at the closed form of kvlight.compressors.weighting, query
moments from the same capture pass, RoPE averaged over distances up to the evaluated window length
with weights 1/(d+1); values PCA); "+ output-weighted values" rows (values too at their closed form, weighted by
each layer's output projection); "KL-distilled" rows (that start, then trained end to end on the KL between the
model's outputs with and without compression, kvlight.distill, on the same 16 windows; distilled once, at score
window 512, and evaluated at every length); "budget ranks" rows (unequal K and V ranks per head from the
sensitivity analysis, kvlight analyze's ``budget`` strategy on the same windows, at the memory of a uniform row;
keys query-weighted); "widths" rows (issue 11: a width per principal direction, uniform, MSE-allocated or
Fisher-allocated by kvlight.bit_allocation at 25, 18.75, 12.5, 9.4 and 6.25 % of fp16 bytes at 512 tokens, exact
tokens included, or per direction of the Fisher-whitened basis (kvlight.analysis.whitening, KVSplice heads), each
also KL-distilled through the static codes: bench/bitrows.py). Keys are pre-RoPE.

    python bench/frontier.py --families quant widths widths-distilled   # issue 11's rows
    python bench/frontier.py --lengths 512   # quicker
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import bitrows  # noqa: E402
from bench.common import (  # noqa: E402
    captured_rows,
    chunked_perplexity,
    embedded_default,
    fitted_pca,
    fitted_query_weighted,
    held_bytes,
    machine,
    offline_windows,
    quantized_cache_bytes,
    results_lock,
)
from kvlight.analysis.queries import QueryMoments, score_weights  # noqa: E402
from kvlight.analysis.rank_allocation import budget  # noqa: E402
from kvlight.analysis.sensitivity import measure_sensitivity  # noqa: E402
from kvlight.calibration.distill import distill  # noqa: E402
from kvlight.compressors.compressor import KVCompressor  # noqa: E402
from kvlight.compressors.weighting import output_weights  # noqa: E402
from kvlight.config import CompressionConfig  # noqa: E402
from kvlight.hf import default_cache, default_cache_windows  # noqa: E402
from kvlight.models import output_projections, preferred_dtype, resolve_dtype  # noqa: E402
from kvlight.serving.cache import (  # noqa: E402
    CacheSettings,
    CompressedCache,
    default_cache_bytes,
    dynamic_cache_bytes,
)
from kvlight.serving.positions import PositionTracker  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
RECENT = 16  # exact recent window of kvlight's configurations, and the HF caches' residual length

#: kvlight configurations: (rank_k, rank_v, latent_bits, sink_tokens, recent_window)
KVLIGHT_ROWS = [
    (32, 32, None, 0, 0),  # the seed's plain uniform 50 %
    (32, 64, None, 4, 0),
    (64, 64, 4, 4, RECENT),
    (48, 64, 4, 4, RECENT),
    (32, 64, 4, 4, RECENT),
    (32, 48, 4, 4, RECENT),
    (48, 64, 2, 4, RECENT),
    (32, 64, 2, 4, RECENT),
    (16, 32, 4, 4, RECENT),
    (24, 48, 2, 4, 8),  # under 12.5 % of fp16 at 512 tokens
]
#: the kvlight rows of ``--rows core`` (for slow, long windows): the default and the ranks and bits around the targets.
CORE_ROWS = [(64, 64, 4, 4, RECENT), (48, 64, 4, 4, RECENT), (32, 64, 4, 4, RECENT), (32, 64, 2, 4, RECENT)]
#: kvlight rows whose keys start from the query-weighted closed form (kvlight.compressors.weighting, "near").
QUERY_WEIGHTED_ROWS = [
    (48, 64, 4, 4, RECENT),
    (44, 64, 4, 4, RECENT),
    (40, 64, 4, 4, RECENT),
    (32, 64, 4, 4, RECENT),
    (48, 64, 2, 4, RECENT),
]
#: rows whose values also start from the output-weighted closed form (keys query-weighted).
OUTPUT_WEIGHTED_ROWS = [(40, 64, 4, 4, RECENT), (32, 64, 2, 4, RECENT)]
#: rows distilled end to end (KL) from the weighted start (keys query-weighted, values output-weighted).
DISTILLED_ROWS = [
    (40, 64, 4, 4, RECENT),
    (40, 64, 4, 4, 8),  # under 25 % of fp16 at 512 tokens
    (32, 64, 4, 4, RECENT),
    (32, 64, 4, 4, 8),
    (32, 64, 2, 4, RECENT),
    (24, 48, 2, 4, 8),  # under 12.5 %
]
#: rows with the analysis' unequal ranks at the memory of the uniform (rank_k, rank_v) given (keys query-weighted).
BUDGET_ROWS = [(40, 64, 4, 4, RECENT), (32, 64, 4, 4, RECENT)]
#: distillation settings of the KL-distilled rows (peak lr; warm-up then cosine decay, kvlight.distill.warmup_cosine).
#: Measured on other calibration windows: K32/V64 int4 +5.24 % -> +2.19 % after 96 steps at constant 3e-4 (6e-4: worse).
DISTILL_STEPS, DISTILL_LR, DISTILL_BATCH = 96, 3e-4, 2
QUANT_ROWS = [("quanto", 4), ("quanto", 2), ("hqq", 4)]
#: row families; the uncompressed baseline is always measured.
FAMILIES = ("quant", "pca", "query-weighted", "output-weighted", "distilled", "budget", "widths", "widths-distilled")


def row_config(geometry, spec: tuple, algo: str) -> CompressionConfig:
    """The uniform config of one kvlight row ``(rank_k, rank_v, latent_bits, sink_tokens, recent_window)``, groups of 64."""
    rank_k, rank_v, bits, sinks, recent = spec
    config = CompressionConfig.uniform(
        geometry.num_layers,
        geometry.num_kv_heads,
        geometry.head_dim,
        rank_k=rank_k,
        rank_v=rank_v,
        algo=algo,
        sink_tokens=sinks,
        recent_window=recent,
        latent_bits=bits,
    )
    config.quant_group_size = 64
    return config


def budget_config(metrics, geometry, spec: tuple) -> CompressionConfig:
    """The analysis' ``budget`` ranks (K and V separately, steps of 4) at the memory of uniform ``spec``'s ranks."""
    rank_k, rank_v, bits, sinks, recent = spec
    allocation = budget(metrics, target=1 - (rank_k + rank_v) / (2 * geometry.head_dim), step=4)
    config = allocation.to_config(algo="kvsplice", sink_tokens=sinks)
    config.recent_window, config.latent_bits, config.quant_group_size = recent, bits, 64
    return config.validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)


def weighted_fit(config, geometry, rows, key_weights, value_weights, dtype) -> KVCompressor:
    """KVSplice heads at the closed form: keys by ``key_weights``, values by ``value_weights`` (None: PCA)."""
    compressor = KVCompressor(config, geometry, algo="kvsplice", options={"kvsplice": {"latent_affine": False}})
    compressor.fit_statistics([rows], key_weights=key_weights, value_weights=value_weights)
    return compressor.to(dtype)


def label(
    family: str, spec: tuple, config: CompressionConfig | None = None, steps: int = DISTILL_STEPS
) -> tuple[str, str]:
    """(method, setting) columns of a kvlight row."""
    rank_k, rank_v, bits, sinks, recent = spec
    stored = "fp16" if bits is None else f"int{bits}" if bits != "fp8" else "fp8"
    ranks = f"K{rank_k}/V{rank_v}"
    if config is not None:  # unequal ranks: their means
        heads = [config.head(layer, head, config.d_head) for layer, head in config.per_layer_head]
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        ranks = f"mean K{mean([h.rank_k for h in heads]):.1f}/V{mean([h.rank_v for h in heads]):.1f}"
        ranks += f" (memory of K{rank_k}/V{rank_v})"
    methods = {
        "pca": "kvlight PCA",
        "query-weighted": "kvlight query-weighted keys",
        "output-weighted": "kvlight query-weighted keys + output-weighted values",
        "distilled": "kvlight KL-distilled (from the weighted start)",
        "budget": "kvlight budget ranks (analyze) + query-weighted keys",
    }
    setting = f"{ranks}, {stored} latents, sinks {sinks}, recent {recent}"
    if family == "distilled":
        setting += f", {steps} steps x {DISTILL_BATCH} windows of 512"
    return methods[family], setting


#: the model this run measures (None: the embedded default) and its name in the results file and protocol text;
#: ``--model PATH --name NAME`` writes bench/results/NAME.{json,md,png} instead of frontier.*.
TARGET = {"model": None, "label": "SmolLM2-135M-Instruct (the embedded default)", "name": "frontier"}


def load_target(dtype: torch.dtype):
    """(model, tokenizer, geometry) of :data:`TARGET`."""
    if TARGET["model"] is None:
        return embedded_default(dtype)
    from kvlight.geometry import kv_geometry
    from kvlight.models import load_model, load_tokenizer

    model = load_model(TARGET["model"], dtype)
    return model, load_tokenizer(TARGET["model"]), kv_geometry(model)


def run(
    lengths: list[int],
    eval_windows: dict[int, int],
    kvlight_rows: list[tuple] = KVLIGHT_ROWS,
    families: tuple[str, ...] = FAMILIES,
    distill_steps: int = DISTILL_STEPS,
    distilled_rows: list[tuple] = DISTILLED_ROWS,
    dtype: torch.dtype | None = None,
    width_rows: list | None = None,
    width_distill: bitrows.Distillation | None = None,
) -> dict:
    """The rows of ``families`` (see :data:`FAMILIES`; ``kvlight_rows`` are the PCA ones) at every length."""
    from transformers.cache_utils import QuantizedCache

    torch.manual_seed(0)
    dtype = dtype or preferred_dtype()
    model, tokenizer, geometry = load_target(dtype)
    longest = max(length * eval_windows[length] for length in lengths)
    # After every evaluation text, and never before the default run's (4 x 2048 tokens), so that a run over fewer
    # lengths calibrates on the same windows (and reuses the compressors cached on disk).
    skip = max(16, -(-longest // 512))
    calibration = offline_windows(tokenizer, 512, skip=skip, count=bitrows.CALIBRATION_WINDOWS)
    # Widths rows distilled on more windows: the calibration windows and the ones after them (still after the text).
    width_distill = width_distill or bitrows.Distillation()
    distill_windows = bitrows.distillation_windows(tokenizer, skip, width_distill, "--width-distill-windows")
    queries = QueryMoments(geometry)
    rows = captured_rows(model, geometry, calibration, queries=queries)
    tracker = PositionTracker(model)
    dtype_name = str(dtype).removeprefix("torch.")
    storage = torch.bfloat16 if dtype == torch.float32 else None
    results = {
        "machine": machine(), "command": "python " + " ".join(sys.argv), "dtype": dtype_name, "rows": [],
        "model": TARGET["label"],
    }  # fmt: skip
    # (family, length the compressor is for, or None for every length, spec) -> (compressor, config if unequal)
    compressors: dict[tuple, tuple[KVCompressor, CompressionConfig | None]] = {}
    for spec in kvlight_rows if "pca" in families else []:
        compressors[("pca", None, spec)] = (fitted_pca(row_config(geometry, spec, "pca"), geometry, rows, dtype), None)
    value_weights = output_weights(output_projections(model), geometry.num_kv_heads, geometry.head_dim)
    if "budget" in families:
        start = time.perf_counter()
        metrics = measure_sensitivity(model, geometry, calibration, 2, 256, 4, 0, progress=False)
        print(f"sensitivity analysis {time.perf_counter() - start:.0f}s", flush=True)
    for length in lengths:
        # Score weights average RoPE over the query-key distances of the context served: here the window length.
        key_weights = score_weights(model, queries.mean(), length)
        for spec in QUERY_WEIGHTED_ROWS if "query-weighted" in families else []:
            config = row_config(geometry, spec, "kvsplice")
            compressors[("query-weighted", length, spec)] = (
                fitted_query_weighted(config, geometry, rows, key_weights, dtype),
                None,
            )
        for spec in OUTPUT_WEIGHTED_ROWS if "output-weighted" in families else []:
            config = row_config(geometry, spec, "kvsplice")
            fitted = weighted_fit(config, geometry, rows, key_weights, value_weights, dtype)
            compressors[("output-weighted", length, spec)] = (fitted, None)
        for spec in BUDGET_ROWS if "budget" in families else []:
            config = budget_config(metrics, geometry, spec)
            compressors[("budget", length, spec)] = (
                weighted_fit(config, geometry, rows, key_weights, None, dtype),
                config,
            )
    if "distilled" in families:
        key_weights = score_weights(model, queries.mean(), 512)
        for spec in distilled_rows:
            compressor = weighted_fit(
                row_config(geometry, spec, "kvsplice"), geometry, rows, key_weights, value_weights, torch.float32
            )
            start = time.perf_counter()
            losses = distill(model, compressor, calibration, tracker, distill_steps, DISTILL_LR, DISTILL_BATCH)
            print(
                f"distilled {spec} in {time.perf_counter() - start:.0f}s: KL {losses[0]:.4f} -> {losses[-1]:.4f}",
                flush=True,
            )
            compressors[("distilled", None, spec)] = (compressor.to(dtype), None)
    selected = [
        row
        for row in bitrows.all_rows()
        if (("widths-distilled" if row.distilled else "widths") in families)
        and (width_rows is None or row_id(row) in width_rows)
    ]
    inputs = bitrows.FitInputs(model, geometry, calibration, pre_rows=rows)
    for row in selected:
        compressor = bitrows.compressor_for(
            row, model, geometry, calibration, inputs.rows(row.rope_block), inputs.metrics(row.rope_block), tracker,
            width_distill, distill_windows,
        )  # fmt: skip
        compressors[("widths", None, row)] = (compressor, None)
    for length in lengths:
        windows = offline_windows(tokenizer, length, skip=0, count=eval_windows[length])
        # The reference is the model's default cache in fp16 (sliding layers keep their window only); a full
        # DynamicCache's bytes are kept beside it (equal for a model without sliding layers).
        reference = default_cache_bytes(geometry, 1, length, torch.float16, default_cache_windows(model.config))
        reference *= len(windows)
        full = dynamic_cache_bytes(geometry, 1, length, torch.float16) * len(windows)

        def record(method: str, setting: str, make_cache, bytes_of, weights: int = 0) -> None:
            start = time.perf_counter()
            ppl, caches = chunked_perplexity(model, windows, make_cache)
            stored = sum(bytes_of(cache, batch) for cache, batch in caches)
            row = {
                "command": results["command"],
                "machine": results["machine"],
                "dtype": dtype_name,
                "length": length,
                "method": method,
                "setting": setting,
                "perplexity": ppl,
                "bytes_fraction": stored / reference,
                "bytes_fraction_full": stored / full,
                "weights_bytes": weights,
                "seconds": time.perf_counter() - start,
            }
            results["rows"].append(row)
            print(json.dumps(row), flush=True)

        itemsize = torch.empty((), dtype=dtype).element_size()
        # The reference: what the model's default DynamicCache holds in fp16 (a float32 model's holds twice as much).
        record(
            "none (DynamicCache)",
            dtype_name,
            lambda: default_cache(model.config),
            lambda c, b: held_bytes(c) * 2 // itemsize,
        )
        quant_rows = QUANT_ROWS if "quant" in families else []
        if quant_rows and any(window is not None for window in default_cache_windows(model.config)):
            # transformers' QuantizedCache raises for any layer type but full attention (Gemma 2/3, Mistral...).
            print("no QuantizedCache rows: transformers' QuantizedCache refuses models with sliding layers", flush=True)
            quant_rows = []
        for backend, bits in quant_rows:
            record(
                f"HF QuantizedCache {backend}",
                f"int{bits}, group 64, residual {RECENT}",
                lambda b=backend, n=bits: QuantizedCache(
                    backend=b, config=model.config, nbits=n, q_group_size=64, residual_length=RECENT
                ),
                lambda c, b: quantized_cache_bytes(c, geometry, b),
            )
        for (family, fitted_for, spec), (compressor, config) in compressors.items():
            if fitted_for not in (None, length):
                continue  # weighted for another context length
            method, setting = (
                spec.label(width_distill) if family == "widths" else label(family, spec, config, distill_steps)
            )
            weights = sum(t.numel() for t in compressor.state_dict().values()) * 2  # fp16
            record(
                method,
                setting,
                # A float32 model's cache keeps its exact tokens in bf16, as a 16-bit deployment would.
                lambda c=compressor: CompressedCache(c, tracker, settings=CacheSettings(storage_dtype=storage)),
                lambda c, b: c.stored_bytes(),
                weights,
            )
    tracker.close()
    return results


row_id = bitrows.row_id


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{TARGET['name']}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Quality frontier: perplexity change vs stored KV bytes",
        "",
        f"Machine: {results['machine']}; model dtype {results.get('dtype', 'bfloat16')}  ",
        f"Command of the newest run: `{results['command']}` (each section names its own)",
        "",
        f"Protocol: {results.get('model', 'embedded default SmolLM2-135M-Instruct')} (dtype above), built-in offline corpus, windows from its "
        "start, each fed in chunks of 64 tokens through the cache. Bytes: what the cache holds at the end of the window "
        "vs what the model's default cache (DynamicCache(config=...): sliding layers keep their window only; SmolLM2 "
        "has none, so a full DynamicCache) holds in fp16 at the same length (bytes_fraction_full in the JSON: vs a "
        "full fp16 DynamicCache) (kvlight: every held tensor, measured, exact tokens kept in bf16 "
        "when the model is float32 (CacheSettings(storage_dtype=...)), as a 16-bit deployment stores them; HF "
        "QuantizedCache: codes + fp16 scale and zero per group of 64 + exact residual at 2 bytes, by formula). kvlight: PCA fitted on 16 x 512 tokens "
        "after the evaluation text (query-weighted rows: KVSplice keys at the query-weighted closed form, distances up to "
        "the window length; output-weighted values: the closed form weighted by each layer's o_proj; KL-distilled: that "
        "start with both, then Adam on the KL between the model's outputs with and without the simulated cache on the "
        "same 16 windows, distilled once at score window 512 and evaluated at every length; budget ranks: kvlight "
        "analyze's allocator on the same windows, unequal K and V ranks per head at the memory of a uniform row; "
        "widths: a width per principal direction (uniform, MSE- or Fisher-allocated by kvlight.bit_allocation from "
        "the sensitivity of the same windows) at a budget of fp16 bytes at 512 tokens, 4 sinks and the recent window "
        "included, PCA bases with static per-direction steps (Fisher-whitened basis: KVSplice heads at the closed form "
        "weighted by each head's regularised Fisher, kvlight.analysis.whitening); + KL-distilled: KVSplice from that "
        "start trained through "
        "the codes, bench/bitrows.py); keys pre-RoPE. Projection weights and static steps (fp16, per model, not per "
        "token) in the last column.",
        "",
    ]
    for length in sorted({r["length"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["length"] == length]
        base = next(r["perplexity"] for r in rows if r["method"].startswith("none"))
        lines += [
            f"## {length}-token windows",
            "",
            "Commands: "
            + "; ".join(
                f"`{command}` on {machine_}"
                for command, machine_ in dict.fromkeys(
                    (r.get("command", results["command"]), r.get("machine", results["machine"])) for r in rows
                )
            ),
            "",
            "| method | setting | bytes vs fp16 | perplexity | change | weights |",
            "|---|---|---|---|---|---|",
        ]
        for r in sorted(rows, key=lambda r: -r["bytes_fraction"]):
            change = 100 * (r["perplexity"] / base - 1)
            weights = f"{r['weights_bytes'] / 2**20:.2f} MiB" if r["weights_bytes"] else "-"
            lines.append(
                f"| {r['method']} | {r['setting']} | {100 * r['bytes_fraction']:.1f} % | {r['perplexity']:.3f} | "
                f"{change:+.2f} % | {weights} |"
            )
        lines += ["", *target_lines(rows, base), ""]
    (RESULTS / f"{TARGET['name']}.md").write_text("\n".join(lines))
    plot(results)


#: issue 11's targets: (most bytes as a fraction of fp16, largest perplexity increase in %, training-free rows only).
TARGETS = [(0.25, 1.0, True), (0.125, 2.0, False), (0.0625, 10.0, False)]


def trained(row: dict) -> bool:
    """Rows whose projections were trained (KL-distilled): the others are fitted from statistics alone."""
    return "distilled" in row["method"]


def target_lines(rows: list[dict], base: float) -> list[str]:
    """One line per target: the best kvlight row within its bytes, met or missed and by how much."""
    lines = []
    for budget_, limit, training_free in TARGETS:
        within = [
            r
            for r in rows
            if r["method"].startswith("kvlight")
            and r["bytes_fraction"] <= budget_ + 1e-9
            and not (training_free and trained(r))
        ]
        name = f"Target <= +{limit:g} % at <= {100 * budget_:g} % of fp16 bytes" + (
            " with no training" if training_free else ""
        )
        if not within:
            lines.append(f"- {name}: no kvlight row within the bytes.")
            continue
        best = min(within, key=lambda r: r["perplexity"])
        change = 100 * (best["perplexity"] / base - 1)
        verdict = "met" if change <= limit else f"missed by {change - limit:.2f} points"
        lines.append(
            f"- {name}: {verdict} (best: {best['method']}, "
            f"{best['setting']}: {change:+.2f} % at {100 * best['bytes_fraction']:.1f} %)."
        )
    for quant in (r for r in rows if r["method"].startswith("HF QuantizedCache")):
        cheaper = [
            r for r in rows if r["method"].startswith("kvlight") and r["bytes_fraction"] <= quant["bytes_fraction"]
        ]
        best = min(cheaper, key=lambda r: r["perplexity"], default=None)
        if best is None:
            lines.append(f"- {quant['method']} {quant['setting']}: no kvlight row at equal or fewer bytes.")
            continue
        verdict = "beaten" if best["perplexity"] < quant["perplexity"] else "NOT beaten"
        lines.append(
            f"- {quant['method']} {quant['setting']} ({100 * (quant['perplexity'] / base - 1):+.2f} % at "
            f"{100 * quant['bytes_fraction']:.1f} %): {verdict} by kvlight at equal or fewer bytes "
            f"({100 * (best['perplexity'] / base - 1):+.2f} % at {100 * best['bytes_fraction']:.1f} %)."
        )
    return lines


#: The plot's families, in legend order: (label, marker, colour, test on a row's method). A method belongs to the first
#: family whose test accepts it; the baseline and unknown methods belong to none.
PLOT_FAMILIES = [
    ("HF QuantizedCache (quanto, hqq)", "s", "tab:gray", lambda m: m.startswith("HF QuantizedCache")),
    ("kvlight ranks, PCA", "v", "tab:purple", lambda m: m in {"kvlight PCA", "kvlight query-weighted keys"}),
    (
        "kvlight widths, PCA basis (--compressor pca)",
        "o",
        "tab:orange",
        lambda m: "widths" in m and "whitened" not in m and "distilled" not in m,
    ),
    (
        "kvlight widths, Fisher-whitened basis (default)",
        "D",
        "tab:blue",
        lambda m: "whitened" in m and "distilled" not in m,
    ),
    ("kvlight widths + KL distillation (trained)", "^", "tab:green", lambda m: "widths" in m and "distilled" in m),
]
#: The method and budget of what ``kvlight calibrate`` does with no flags, marked on the plot.
DEFAULT_METHOD = "kvlight Fisher-whitened basis, Fisher-allocated widths, keys in RoPE blocks of 16"
DEFAULT_SETTING_PREFIX = "budget 25 %"


def pareto_front(points: list[tuple[float, float]], slack: float = 0.0) -> list[tuple[float, float]]:
    """The points no other point beats: none costs less within the same bytes.

    Args:
        points: ``(bytes, cost)`` pairs, e.g. (% of fp16 bytes, % perplexity increase).
        slack: relative bytes treated as equal: a point is beaten by one with a lower cost and at most
            ``bytes * (1 + slack)`` bytes. Settings of one budget land a fraction of a percent apart (24.8 vs 25.0 %
            of the bytes), and without slack the cheaper, far worse one would join the front.

    Returns:
        The front sorted by bytes, each point once.
    """
    unique = sorted(set(points))
    return [
        (size, cost)
        for size, cost in unique
        if not any(other < cost and other_size <= size * (1 + slack) for other_size, other in unique)
    ]


def plot_family(method: str) -> int | None:
    """Index into :data:`PLOT_FAMILIES` of a row's method (None: the baseline or a method no family names)."""
    return next((index for index, family in enumerate(PLOT_FAMILIES) if family[3](method)), None)


def plot(results: dict, path: Path | None = None) -> None:
    """Draw ``results`` (a frontier JSON) to ``path`` (default bench/results/NAME.png): one panel per window length,
    the Pareto front of each family in :data:`PLOT_FAMILIES` (perplexity increase vs bytes), the default marked, the
    legend below the panels. The .md tables hold every row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lengths = sorted({r["length"] for r in results["rows"]})
    present = sorted({plot_family(r["method"]) for r in results["rows"]} - {None})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4.6), squeeze=False, sharey=True)
    for ax, length in zip(axes[0], lengths):
        rows = [r for r in results["rows"] if r["length"] == length]
        base = next(r["perplexity"] for r in rows if r["method"].startswith("none"))
        change = lambda r: 100 * (r["perplexity"] / base - 1)  # noqa: E731
        for index in present:
            label, marker, color, _ = PLOT_FAMILIES[index]
            points = [(100 * r["bytes_fraction"], change(r)) for r in rows if plot_family(r["method"]) == index]
            front = pareto_front(points, slack=0.02)
            ax.plot(*zip(*front), marker=marker, color=color, label=label, markersize=6, linewidth=1.4)
        default = [r for r in rows if r["method"] == DEFAULT_METHOD and r["setting"].startswith(DEFAULT_SETTING_PREFIX)]
        for r in default:
            ax.plot(
                100 * r["bytes_fraction"],
                change(r),
                marker="*",
                markersize=17,
                color="tab:red",
                linestyle="",
                zorder=5,
                label=f"the default (kvlight calibrate): {change(r):+.2f} %",
            )
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("cache bytes, % of an fp16 DynamicCache", fontsize=11)
        ax.set_title(f"{length}-token windows", fontsize=12)
        ax.tick_params(labelsize=10)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:+g} %" if v else "0"))
        ax.grid(alpha=0.3)
        if default:  # the default's entry names this panel's number
            ax.legend(handles=ax.get_lines()[-1:], loc="lower left", fontsize=10, frameon=True)
    axes[0][0].set_ylabel("perplexity increase, % (log above 1 %)", fontsize=11)
    handles, labels = axes[0][0].get_legend_handles_labels()
    handles, labels = handles[: len(present)], labels[: len(present)]
    fig.suptitle(
        f"{results.get('model', 'SmolLM2-135M')}: best setting of each family (lower and left is better)", fontsize=12
    )
    # The legend sits below the panels, never over the points.
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=10, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * ((len(handles) + 1) // 2), 1, 1))
    fig.savefig(path or RESULTS / f"{TARGET['name']}.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--windows-512", type=int, default=8)
    parser.add_argument("--windows-2048", type=int, default=4)
    parser.add_argument(
        "--rows",
        choices=["all", "core"],
        default="all",
        help="core: 4 PCA rows and the query-weighted ones (long windows)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the existing frontier.json that this run does not measure again (same length, "
        "method and setting: replaced)",
    )
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=None, help="row families (default all)")
    parser.add_argument(
        "--distilled-rows",
        nargs="+",
        default=None,
        metavar="K,V,BITS,SINKS,RECENT",
        help="the distilled rows to fit, e.g. 40,64,4,4,8 (default: all of DISTILLED_ROWS)",
    )
    parser.add_argument("--distill-steps", type=int, default=DISTILL_STEPS, help="KL steps of the distilled rank rows")
    bitrows.add_distill_options(parser, prefix="width-")
    parser.add_argument("--rewrite", action="store_true", help="only rewrite frontier.md/png from frontier.json")
    parser.add_argument("--plot-only", action="store_true", help="only redraw frontier.png from frontier.json")
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="model dtype (auto: bf16 where native)"
    )
    parser.add_argument(
        "--width-rows", nargs="+", default=None, help="only these widths rows, e.g. fisher-0.125 fisher-kl-0.125"
    )
    parser.add_argument(
        "--model", default=None, help="another model (path, .gguf, hub id) instead of the embedded default"
    )
    parser.add_argument("--name", default=None, help="results file name under bench/results/ (default: frontier)")
    args = parser.parse_args()
    if args.model is not None:
        TARGET.update(
            model=args.model, label=Path(args.model).name, name=args.name or "frontier_" + Path(args.model).stem
        )
    elif args.name:
        TARGET["name"] = args.name
    if args.plot_only:
        plot(json.loads((RESULTS / f"{TARGET['name']}.json").read_text()))
        return
    if args.rewrite:
        write(json.loads((RESULTS / f"{TARGET['name']}.json").read_text()))
        return
    known = [row_id(row) for row in bitrows.all_rows()]
    unknown = [name for name in args.width_rows or () if name not in known]
    if unknown:  # a row id that names no row would run nothing and say nothing
        parser.error(f"unknown --width-rows {' '.join(unknown)}; the rows are: {' '.join(known)}")
    previous = RESULTS / f"{TARGET['name']}.json"
    run_dtype = str(resolve_dtype(args.dtype)).removeprefix("torch.")
    if args.merge and previous.exists():
        old_dtype = json.loads(previous.read_text()).get("dtype", "bfloat16")
        if old_dtype != run_dtype:  # rows of two model dtypes in one table would not be comparable
            parser.error(
                f"--merge: frontier.json holds {old_dtype} rows, this run would be {run_dtype}; pass --dtype {old_dtype}"
            )
    counts = {512: args.windows_512, 2048: args.windows_2048}
    families = tuple(args.families or (("quant", "pca", "query-weighted") if args.rows == "core" else FAMILIES))
    distilled = DISTILLED_ROWS
    if args.distilled_rows:
        distilled = [
            tuple(int(p) if p.isdigit() else (p if p == "fp8" else None) for p in spec.split(","))
            for spec in args.distilled_rows
        ]
        if any(len(spec) != 5 for spec in distilled):
            parser.error("--distilled-rows takes K,V,BITS,SINKS,RECENT, e.g. 40,64,4,4,8")
    results = run(
        args.lengths,
        {n: counts.get(n, 4) for n in args.lengths},
        CORE_ROWS if args.rows == "core" else KVLIGHT_ROWS,
        families=families,
        distill_steps=args.distill_steps,
        distilled_rows=distilled,
        dtype=resolve_dtype(args.dtype),
        width_rows=args.width_rows,
        width_distill=bitrows.Distillation.from_args(args, prefix="width-"),
    )
    with results_lock(previous):  # a second run finishing meanwhile must not lose its rows, nor this one
        if args.merge and previous.exists():
            old = json.loads(previous.read_text())
            measured = {(r["length"], r["method"], r["setting"]) for r in results["rows"]}
            kept = [
                {"command": old["command"], "machine": old["machine"], **row}
                for row in old["rows"]
                if (row["length"], row["method"], row["setting"]) not in measured
            ]
            results["rows"] = kept + results["rows"]
        write(results)


if __name__ == "__main__":
    main()

"""The model card of a shared compressor: the ``README.md`` a Hugging Face Hub repository shows as its page.

:func:`model_card` writes it from what ``kvlight calibrate`` measured (the ``calibration_results_<compressor>.json``
dict) and from what the compressor itself records (the model it was fitted to, its geometry and nominal budget), so a
card written without results still says which model the compressor serves and how to load it.
"""

from __future__ import annotations

import json
import math
import re

#: the card's file name in a compressor directory and a hub repository.
CARD_NAME = "README.md"
#: written where the repository is not known yet (a card made before the upload is named).
REPO_PLACEHOLDER = "<user>/<repo>"
#: the hub id of the model the embedded default (a Q4_1 GGUF, dequantized) was converted from.
_EMBEDDED = ("embedded:smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
#: a hub model id (``name`` or ``owner/name``), the only kind of name a card's ``base_model`` may hold.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
#: result keys of retrieval benchmarks a card shows when the dict has them (fractions or perplexities).
_RETRIEVAL = {
    "passkey": "Passkey retrieval accuracy",
    "passkey_accuracy": "Passkey retrieval accuracy",
    "copy_accuracy": "Copy accuracy",
    "copy_perplexity": "Copy perplexity",
    "retrieval_accuracy": "Retrieval accuracy",
}


def model_card(results: dict | None, compressor, command: str | None, repo_id: str | None = None) -> str:
    """A hub model card (Markdown with YAML front matter) for ``compressor``.

    Args:
        results: what ``kvlight calibrate`` wrote to ``calibration_results_<compressor>.json`` (model, measured KV
            budget, perplexities, and retrieval figures where present), or None: the card then says what the
            compressor records.
        compressor: the :class:`~kvlight.compressors.compressor.KVCompressor` the card describes.
        command: the command line that made it (shown verbatim), or None.
        repo_id: the repository the card is uploaded to, named by the loading snippet (``<user>/<repo>`` without it).
    """
    results = results or {}
    model = results.get("model") or compressor.fitted_name()
    base = _hub_model(model)
    algo = results.get("compressor") or compressor.config.algo_default
    front = ["---", "library_name: kvlight"]
    if base is not None:
        front.append(f"base_model: {base}")
    front += ["tags:", "- kvlight", "- kv-cache", "- kv-cache-compression", f"- {algo}", "---", ""]
    title = f"# KV-cache compressor for {model}" if model else "# KV-cache compressor"
    lines = [*front, title, ""]
    budget, measured = _budget(results, compressor)
    where = f"measured at {results['seq_len']} tokens" if measured and results.get("seq_len") else "at long context"
    kept = f", keeping {budget:.1%} of an fp16 cache's bytes ({where})" if budget is not None else ""
    lines.append(
        f"A kvlight compressor ({algo}): the model's KV cache stores its latents instead of full keys and values{kept}."
        " The model's weights are neither changed nor included here."
    )
    lines += ["", "## Use", "", "```python", "import kvlight", *_load_lines(model)]
    lines += [
        "",
        f'with kvlight.from_pretrained(model, "{repo_id or REPO_PLACEHOLDER}") as wrapped:',
        '    inputs = tokenizer("The KV cache of a language model", return_tensors="pt")',
        "    output = wrapped.generate(**inputs, max_new_tokens=50)",
        "print(tokenizer.decode(output[0]))",
        "```",
        "",
    ]
    table = _results_table(results, budget if measured else None)
    if table:
        lines += ["## Results", "", "| Measure | Value |", "| --- | --- |", *table, ""]
    geometry = compressor.geometry
    lines += ["## Details", ""]
    if geometry is not None:
        lines.append(
            f"- Fitted to: {model or geometry.model_type} ({geometry.num_layers} layers x {geometry.num_kv_heads} "
            f"KV heads x head_dim {geometry.head_dim}{', RoPE' if geometry.rope else ''})"
        )
    for key, label in (
        ("calibration_dataset", "Calibration data"),
        ("calibration_samples", "Calibration windows"),
        ("seq_len", "Window length"),
        ("model_dtype", "Model dtype"),
    ):
        if results.get(key) is not None:
            lines.append(f"- {label}: {results[key]}")
    if command:
        lines += ["", "Made with:", "", "```bash", command, "```"]
    return "\n".join(lines).rstrip() + "\n"


def _hub_model(model: str | None) -> str | None:
    """The hub id of ``model`` for ``base_model`` (the embedded default's source), None for a local path."""
    if not model:
        return None
    if model == _EMBEDDED[0]:
        return _EMBEDDED[1]
    return model if _HUB_ID.match(model) and not model.startswith((".", "/", "~")) else None


def _load_lines(model: str | None) -> list[str]:
    """The snippet's lines that load the base model (the embedded default through kvlight: its weights are the
    dequantized GGUF, which the compressor's fingerprint checks)."""
    if model == _EMBEDDED[0]:
        return [
            "from kvlight.models import load_model, load_tokenizer",
            "",
            "model, tokenizer = load_model(), load_tokenizer(None)  # the embedded default",
        ]
    name = json.dumps(model or "the model it was fitted to")
    return [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"model = AutoModelForCausalLM.from_pretrained({name})",
        f"tokenizer = AutoTokenizer.from_pretrained({name})",
    ]


def _budget(results: dict, compressor) -> tuple[float | None, bool]:
    """``(fraction of an fp16 cache's bytes kept, measured)``: the results' measurement, else the config's nominal
    fraction at long context (exact sink and recent tokens aside)."""
    if _number(results.get("kv_budget")):
        return float(results["kv_budget"]), True
    stored, fp16 = results.get("compressed_cache_bytes"), results.get("fp16_cache_bytes")
    if _number(stored) and _number(fp16) and fp16 > 0:
        return float(stored) / float(fp16), True
    try:
        reduction = compressor.config.memory_reduction(
            compressor.num_layers, compressor.num_kv_heads, compressor.head_dim
        )
    except (AttributeError, TypeError, ValueError):
        return None, False
    return 1.0 - reduction, False


def _results_table(results: dict, budget: float | None) -> list[str]:
    """``| measure | value |`` rows of what was measured (``budget``: the measured fraction, or None)."""
    rows = []
    if budget is not None:
        seq = results.get("seq_len")
        rows.append(f"| KV budget (fraction of fp16 bytes kept{f', at {seq} tokens' if seq else ''}) | {budget:.3f} |")
    for key, label in (
        ("baseline_perplexity", "Perplexity, full cache"),
        ("compressed_perplexity", "Perplexity, compressed"),
    ):
        if _number(results.get(key)):
            rows.append(f"| {label} | {results[key]:.3f} |")
    if _number(results.get("perplexity_degradation_pct")):
        rows.append(f"| Perplexity degradation | {results['perplexity_degradation_pct']:+.2f} % |")
    retrieval = dict(results.get("retrieval") or {}) if isinstance(results.get("retrieval"), dict) else {}
    retrieval.update({k: v for k, v in results.items() if k in _RETRIEVAL})
    for key, value in retrieval.items():
        if _number(value):
            rows.append(f"| {_RETRIEVAL.get(key, key.replace('_', ' ').capitalize())} | {value:.3f} |")
    return rows


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""The verdict of every causal-LM family transformers ships: refused (and why), or served at full rank exactly as
``DynamicCache`` (same greedy tokens and logits to 1e-4, on the fast and the plain decode path), on a tiny random model
built from the family's own config with small dimensions. Used by tests/integration/test_support_table.py, which
keeps the README's support table equal to what this sweep finds."""

from __future__ import annotations

import warnings

import torch

TINY = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, ffn_dim=128,
    word_embed_proj_dim=64,
)  # fmt: skip
PROMPT, NEW_TOKENS, ATOL = 10, 6, 1e-4
#: families whose small config still builds more are left untested (emu3's built 15 GB).
MAX_PARAMETERS = 40_000_000


def families() -> list[str]:
    """transformers' causal-LM model types, in its own order."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


#: settings a family's validators may tie to others (per-layer lists sized by the layer count, head shapes): the
#: second try keeps the family's own values for these.
TIED = ("num_hidden_layers", "num_key_value_heads", "head_dim", "num_attention_heads")


def tiny_configs(model_type: str) -> list:
    """Small configs of the family to try in turn: its default config with the :data:`TINY` dimensions it declares
    (a setting it does not declare, such as ``num_key_value_heads`` without grouped-query attention, would only add
    a misleading attribute), then the same without the :data:`TIED` ones."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    declared = {k: v for k, v in TINY.items() if hasattr(default, k)}
    configs, errors = [], []
    for overrides in (declared, {k: v for k, v in declared.items() if k not in TIED}):
        try:
            configs.append(AutoConfig.for_model(model_type, **overrides))
        except Exception as exc:  # noqa: BLE001 - a validator refusing the small sizes
            errors.append(exc)
    if not configs:
        raise errors[0]
    return configs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:100] if text else ''}"


def verdict(model_type: str) -> tuple[str, str]:
    """``(status, detail)``: ``("works", "")``, ``("refused", reason)`` or ``("fails", what went wrong)``; a config
    transformers cannot build tiny gives ``("untested", why)``."""
    from transformers import AutoModelForCausalLM

    from kvlight.errors import ModelLoadError
    from kvlight.models import check_architecture

    try:
        candidates = tiny_configs(model_type)
    except Exception as exc:  # noqa: BLE001 - any config error makes the family untestable here, not a kvlight bug
        return "untested", f"no small config: {_first_line(exc)}"
    config, why = None, ""
    for candidate in candidates:
        try:  # a small config transformers cannot build says nothing about kvlight
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                skeleton = AutoModelForCausalLM.from_config(candidate)
        except Exception as exc:  # noqa: BLE001
            why = why or f"no small model: {_first_line(exc)}"
            continue
        parameters = sum(p.numel() for p in skeleton.parameters())
        if parameters > MAX_PARAMETERS:  # parts the small dimensions do not reach (a vision tower, a codebook)
            why = why or f"the small config still builds {parameters / 1e6:.0f} M parameters"
            continue
        config = candidate
        break
    if config is None:
        return "untested", why
    try:
        check_architecture(config, model_type)
    except ModelLoadError as exc:
        reason = str(exc).split(" is not supported: ", 1)[-1].split("; kvlight supports", 1)[0]
        return "refused", reason
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config).eval()
    except Exception as exc:  # noqa: BLE001
        return "untested", f"no tiny model: {_first_line(exc)}"
    try:
        return _identity(model)
    except Exception as exc:  # noqa: BLE001 - the sweep reports every failure instead of stopping
        return "fails", _first_line(exc)


def _identity(model) -> tuple[str, str]:
    from kvlight.calibration.capture import capture_kv
    from kvlight.compressors.compressor import KVCompressor
    from kvlight.config import CompressionConfig
    from kvlight.geometry import kv_geometry
    from kvlight.serving.wrapper import CompressedKVModelWrapper

    geometry = kv_geometry(model)
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(1)
    windows = torch.randint(3, min(vocab, 320), (2, 24), generator=generator)
    prompts = torch.randint(3, min(vocab, 320), (2, PROMPT), generator=generator)
    config = CompressionConfig.uniform(
        geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rank=geometry.head_dim
    )
    keys, values = capture_kv(model, geometry, [windows], capacity=10_000, progress=False).rows()
    compressor = KVCompressor(config, geometry, algo="pca")
    compressor.fit_statistics([{"keys": keys, "values": values}])
    kwargs = dict(
        input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW_TOKENS, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0,
    )  # fmt: skip
    with torch.no_grad():
        expected = model.generate(**kwargs)  # the cache transformers builds for this model by default
        for fast in (True, False):
            wrapper = CompressedKVModelWrapper(model, compressor, fast_decode=fast)
            try:
                got = wrapper.generate(**kwargs)
            finally:
                wrapper.close()
            path = "fast" if fast else "plain"
            if not torch.equal(got.sequences, expected.sequences):
                return "fails", f"{path} path: greedy tokens differ from the model's own cache"
            error = (torch.stack(got.logits) - torch.stack(expected.logits)).abs().max().item()
            if error > ATOL:
                return "fails", f"{path} path: logits differ by {error:.2g}"
    return "works", ""


def table(verdicts: dict[str, tuple[str, str]]) -> str:
    """The README's support table (markdown) from ``{model_type: (status, detail)}``."""
    counts = {s: sum(v[0] == s for v in verdicts.values()) for s in ("works", "refused", "fails", "untested")}
    lines = [
        f"{counts['works']} families served, {counts['refused']} refused, {counts['fails']} failing, "
        f"{counts['untested']} not testable from a tiny config (transformers' causal-LM list, "
        f"{len(verdicts)} model types):",
        "",
        "| model type | verdict | why |",
        "|---|---|---|",
    ]
    for model_type, (status, detail) in verdicts.items():
        lines.append(f"| `{model_type}` | {status} | {detail.replace('|', '/')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    import time

    for name in sys.argv[1:] or families():
        start = time.perf_counter()
        status, detail = verdict(name)
        print(f"{name:28s} {status:9s} {time.perf_counter() - start:5.1f}s {detail[:110]}", flush=True)

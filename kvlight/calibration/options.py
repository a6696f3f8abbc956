"""Every option of a calibration, declared once, in groups: what the cache stores, what the fit minimises, how it runs.

The LightningModule takes these dataclasses (``kvlight fit``'s ``--model.compression.rank 8``), and ``kvlight
calibrate`` is built from the same signatures (its flags, ``--rank 8``, are names for these fields; types, defaults and
help come from here), so a default cannot differ between the two. Plain data: a checkpoint stores them as dicts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from kvlight.analysis.bit_allocation import WEIGHTINGS
from kvlight.compressors.registry import backend
from kvlight.compressors.statistics import check_headroom
from kvlight.config import RECOMMENDED
from kvlight.errors import ConfigError

#: "mse": keys fitted by plain reconstruction error; "query": by the error attention scores see (KVSplice heads start
#: from kvlight.compressors.weighting's closed form and train on the weighted loss; query moments from the capture).
KEY_OBJECTIVES = ("mse", "query")
#: "mse": values fitted by plain reconstruction error; "output": by the error after the output projection (KVSplice
#: heads start from the closed form with weighting.output_weight of the model's o_proj, and train on that loss).
VALUE_OBJECTIVES = ("mse", "output")
#: what the Adam epochs after the statistics epoch minimise: "reconstruction" (the captured K/V rows, weighted as
#: key_objective / value_objective say) or "kl" (end to end: kvlight.calibration.distill, on the calibration windows).
OBJECTIVES = ("reconstruction", "kl")
#: dtypes the frozen model may be loaded in ("auto": bfloat16 where native, else float32; kvlight.models).
MODEL_DTYPES = ("auto", "bfloat16", "float32", "float16")


@dataclass(frozen=True)
class CompressionOptions:
    """What the compressed cache stores.

    Args:
        config: a compression config JSON file (or its content, as a checkpoint stores it); None: the ranks below,
            or with no rank either, widths allocated at ``target_memory_reduction``.
        compressor: the backend of every head (kvlight.compressors.registry); None: each head's ``algo``.
        rank: uniform K and V rank when no config is given.
        rank_k: uniform key rank when no config is given.
        rank_v: uniform value rank when no config is given.
        target_memory_reduction: with no config or rank: measure the model's sensitivity at the start of fit and give
            every principal direction the width that minimises the predicted loss within 1 - target of an fp16
            cache's bytes at long context (None: the recommended 0.76).
        bits_weighting: how that allocation weighs a direction's error (kvlight.analysis.bit_allocation.WEIGHTINGS);
            None: the recommended one the backend can serve (:attr:`weighting`).
        sensitivity_samples: calibration windows the sensitivity pass of that allocation measures.
        sensitivity_seq_len: tokens per window of that pass: longer calibration windows are cut into windows of
            this length first (its eager attention holds every score for the backward, so its memory grows with the
            square of the length: 16 windows of 4096 tokens need more than 24 GB); None: the calibration windows'.
        sink_tokens: first positions kept exact (None: a config file's, else the recommended 4, ranks included).
        recent_window: newest positions kept exact (None: a config file's, else the recommended 0).
        latent_bits: rank configs: store latents as 8, 4, 2 (integer codes with per-token group scales) or "fp8".
        quant_group_size: rank configs: latent channels sharing one scale and zero point.
        key_rope_block: how a RoPE model's keys are coded: rotated back by the RoPE angle of the first token of their
            block of this many tokens (kvlight.config.compression). 1: before RoPE, the best quality per byte, but
            every decode step rebuilds and rotates the stored keys; 16: decode scores them in latent space, faster,
            for a little quality. None: a config file's, else the recommended one.
        step_headroom: width codecs: the static steps the fit ends with (searched, and trained where the backend
            trains) are widened by this factor around each channel's centre, once, after the last step (1: as
            fitted, the least squared error on the calibration rows). Wider steps clip fewer of the large keys and
            values attention depends on, at more rounding error: at a quarter of fp16 bytes on the embedded
            default, fitted in bf16, 1.3 left the perplexity cost on the calibration corpus about the same and
            cut it by about 40 % on text no calibration read; one float32 fit traded corpus cost for that
            (bench/results/step_headroom.md, default_headroom*.md). The default recipe takes 1.3.
    """

    config: str | dict | None = None
    compressor: str | None = None
    rank: int | None = None
    rank_k: int | None = None
    rank_v: int | None = None
    target_memory_reduction: float | None = None
    bits_weighting: str | None = None
    sensitivity_samples: int = 16
    sensitivity_seq_len: int | None = 512
    sink_tokens: int | None = None
    recent_window: int | None = None
    latent_bits: int | str | None = None
    quant_group_size: int | None = None
    key_rope_block: int | None = None
    step_headroom: float = 1.0

    @property
    def by_rank(self) -> bool:
        return self.rank is not None or self.rank_k is not None or self.rank_v is not None

    @property
    def allocates(self) -> bool:
        """True when no config or rank is given: the widths are allocated from the model's sensitivity."""
        return self.config is None and not self.by_rank

    @property
    def weighting(self) -> str:
        """The allocation's weighting: ``bits_weighting`` when given, else the recommended one (a Fisher-whitened
        basis) unless the named backend cannot serve it (no separate encoder and decoder, as PCA), which gets the
        recommended weighting of principal directions."""
        if self.bits_weighting is not None:
            return self.bits_weighting
        if self.compressor is not None and not backend(self.compressor).weighted_objectives:
            return RECOMMENDED["principal_bits_weighting"]
        return RECOMMENDED["bits_weighting"]

    def __post_init__(self) -> None:
        if self.bits_weighting is not None and self.bits_weighting not in WEIGHTINGS:
            raise ConfigError(f"bits_weighting {self.bits_weighting!r} must be one of {', '.join(WEIGHTINGS)}")
        _at_least(self, "sensitivity_samples", 1)
        _at_least(self, "sensitivity_seq_len", 2, optional=True, what="a number of tokens >= 2")
        for name in ("rank", "rank_k", "rank_v", "quant_group_size"):
            _at_least(self, name, 1, optional=True)
        for name in ("sink_tokens", "recent_window"):
            _at_least(self, name, 0, optional=True)
        _at_least(self, "key_rope_block", 1, optional=True, what="a whole number of tokens >= 1 (1: keys before RoPE)")
        check_headroom(self.step_headroom)


@dataclass(frozen=True)
class ObjectiveOptions:
    """What the fit minimises after the statistics pass.

    Args:
        objective: "reconstruction" or "kl" (end to end through the simulated cache; needs a trainable backend).
        key_objective: "mse" or "query" (keys by the error attention scores see; needs separate encoder and decoder).
        value_objective: "mse" or "output" (values by the error after the output projection).
        score_window: with "query", the longest query-key distance the weights average RoPE over: the context you
            serve (None: the calibration windows' length).
        lr: Adam learning rate of trainable heads (peak, with warm-up and cosine decay, for "kl").
        distill_batch_size: calibration windows per step with "kl".
        distill_tokens: with "kl", the fraction of each window's positions whose next-token distributions the KL
            compares, a fresh random sample at every step (1: all). Every position's K/V still shapes the kept
            positions' outputs; at 0.5 a step at 4096 tokens takes about three quarters of the time on a small model,
            whose vocabulary projection and softmax cost as much as its layers (bench/results/distill_step.md).
    """

    objective: str = "reconstruction"
    key_objective: str = "mse"
    value_objective: str = "mse"
    score_window: int | None = None
    lr: float = 1e-3
    distill_batch_size: int = 1
    distill_tokens: float = 1.0

    def __post_init__(self) -> None:
        _one_of(self, "objective", OBJECTIVES)
        _one_of(self, "key_objective", KEY_OBJECTIVES)
        _one_of(self, "value_objective", VALUE_OBJECTIVES)
        _at_least(self, "distill_batch_size", 1)
        _at_least(self, "score_window", 1, optional=True, what="a positive number of tokens")
        share = self.distill_tokens
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"distill_tokens must be a fraction in (0, 1] such as 0.5, got {share!r}")
        lr = self.lr
        # Adam takes nan and inf without complaint and fills every weight with NaN; a negative rate ascends.
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ConfigError(f"lr must be a positive finite number such as 1e-3, got {lr!r}")


@dataclass(frozen=True)
class RuntimeOptions:
    """How the frozen model runs.

    Args:
        model_dtype: dtype the frozen model is loaded in: auto (bfloat16 where native on the device, else float32),
            bfloat16, float32 or float16.
        capture_batch_size: windows per forward pass while capturing K/V (and while measuring sensitivity).
        eval_chunk: validation feeds each window in chunks of this many tokens through the compressed cache.
    """

    model_dtype: str = "auto"
    capture_batch_size: int = 4
    eval_chunk: int = 64

    def __post_init__(self) -> None:
        _one_of(self, "model_dtype", MODEL_DTYPES)
        _at_least(self, "capture_batch_size", 1)
        _at_least(self, "eval_chunk", 1)


def grouped(**flat: Any) -> dict[str, Any]:
    """``{"compression": ..., "objective": ..., "runtime": ...}`` from flat field names (``rank=8, lr=0.01``): a
    shorthand for building :class:`~kvlight.calibration.module.KVCalibrationModule` in code."""
    groups = {"compression": CompressionOptions, "objective": ObjectiveOptions, "runtime": RuntimeOptions}
    out: dict[str, dict] = {name: {} for name in groups}
    for key, value in flat.items():
        owner = next((name for name, kind in groups.items() if key in {f.name for f in fields(kind)}), None)
        if owner is None:
            raise ConfigError(f"{key!r} is no calibration option (the options: kvlight.calibration.options)")
        out[owner][key] = value
    return {name: groups[name](**values) for name, values in out.items()}


def coerce(kind: type, value: Any) -> Any:
    """An options dataclass from itself, a dict of its fields (a checkpoint's hyperparameters) or None (defaults)."""
    if value is None:
        return kind()
    if isinstance(value, kind):
        return value
    if isinstance(value, dict):
        known = {field.name for field in fields(kind)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{kind.__name__} has no option {unknown[0]!r} (its options: {', '.join(sorted(known))})")
        return kind(**value)
    raise ConfigError(f"{kind.__name__} must be given as its fields, got {value!r}")


def as_dict(options: Any) -> dict:
    """Plain data of an options dataclass (what a checkpoint stores)."""
    return asdict(options)


def _one_of(options: Any, name: str, allowed: tuple) -> None:
    value = getattr(options, name)
    if value not in allowed:
        raise ConfigError(f"{name} {value!r} must be one of {', '.join(allowed)}")


def _at_least(options: Any, name: str, minimum: int, optional: bool = False, what: str | None = None) -> None:
    value = getattr(options, name)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be {what or f'at least {minimum}'}, got {value!r}")


#: The defaults, as frozen instances (safe to share as argument defaults).
DEFAULT_COMPRESSION, DEFAULT_OBJECTIVE, DEFAULT_RUNTIME = CompressionOptions(), ObjectiveOptions(), RuntimeOptions()

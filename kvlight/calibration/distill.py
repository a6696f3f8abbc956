"""End-to-end calibration: fit the projections on the KL divergence between the frozen model's outputs with and
without compression.

Reconstruction objectives, plain or weighted, only approximate what compression costs; what a user sees is the
model's next-token distribution. One distillation step runs the frozen model twice on calibration windows
``[B, T]``: exactly (the teacher, no gradient) and with every layer's K/V replaced inside the forward by what the
cache would store (the student), and returns the mean per-token ``KL(p_teacher || p_student)``, differentiable
with respect to the compressor's parameters only.

How the student's forward simulates the cache: the first ``sink_tokens`` positions stay exact; every other
position is encoded, quantized as the cache stores it (the forward sees the rounded latents; the gradient passes
through rounding as if it were the identity, the straight-through estimator), and decoded. Keys of RoPE models are
compressed as the cache codes them (pre-RoPE, or relative to their RoPE block: ``key_rope_block``). The recent window is not simulated (in one full-window forward no position is
"newest" for every query), so training sees a little more compression than serving does.

A step may compare the two distributions at a random sample of the positions only (``distill_tokens``): the mean KL
over a uniform sample is an unbiased estimate of the mean over all positions, every position's K/V still reaches the
kept positions through attention, and the vocabulary projection, softmax and KL, which on a small model cost as much
as its layers, shrink with the sample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kvlight.compressors.base import STEP_CORRECTIONS
from kvlight.compressors.compressor import KVCompressor
from kvlight.hf import cache_kwargs, logits_at
from kvlight.serving.capture_cache import CaptureCache
from kvlight.serving.positions import PositionTracker
from kvlight.serving.quant import LatentQuantizer, codec_quantizer
from kvlight.serving.widths import DirectionQuantizer, direction_quantizers

Quantizer = LatentQuantizer | DirectionQuantizer


def latent_quantizers(
    compressor: KVCompressor, exact_dtype: torch.dtype = torch.float16
) -> dict[tuple[int, str], Quantizer] | None:
    """The quantizer of every ``(layer, kind)`` codec as the cache builds it (static mixed-width codes for width
    codecs, exact channels in ``exact_dtype``; per-token groups with ``latent_bits``), or None when none is quantized."""
    bits, group = compressor.config.latent_bits, compressor.config.quant_group_size
    quantizers: dict[tuple[int, str], Quantizer] = dict(direction_quantizers(compressor, exact_dtype))
    if bits is not None:
        for layer in range(compressor.num_layers):
            for kind in ("k", "v"):
                if (layer, kind) not in quantizers:
                    quantizers[(layer, kind)] = codec_quantizer(bits, group, compressor.codec(layer, kind))
    return quantizers or None


def simulate(
    compressor: KVCompressor,
    layer: int,
    kind: str,
    x: torch.Tensor,
    quantizer: Quantizer | None,
    sink_tokens: int,
) -> torch.Tensor:
    """``x [B, H, T, D]`` (keys as the compressor codes them) -> what attention reads from the cache, same shape and
    dtype.

    Positions ``< sink_tokens`` pass through exactly; the rest go through encode, quantize (straight-through) and
    decode in float32. Differentiable with respect to the compressor's parameters.
    """
    if sink_tokens >= x.shape[2]:
        return x
    codec = compressor.codec(layer, kind)
    tail = x[:, :, sink_tokens:].float()
    z = codec.encode(tail)  # [B, T', R]
    if isinstance(quantizer, DirectionQuantizer):  # static mixed-width codes, their steps learned with the codec
        z = quantizer.fake_quantize(z, *codec.quantizer_steps())
    elif quantizer is not None:
        rounded = quantizer.dequantize(quantizer.quantize(z.detach()), torch.float32)
        z = z + (rounded - z).detach()
    rebuilt = codec.decode(z).to(x.dtype)
    return torch.cat([x[:, :, :sink_tokens], rebuilt], dim=2) if sink_tokens else rebuilt


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(teacher) || softmax(student))``; logits ``[B, T, V]``, computed in float32."""
    teacher = torch.log_softmax(teacher_logits.float(), dim=-1)
    student = torch.log_softmax(student_logits.float(), dim=-1)
    tokens = teacher_logits.shape[0] * teacher_logits.shape[1]
    return F.kl_div(student, teacher, log_target=True, reduction="sum") / tokens


def kept_positions(
    length: int, share: float, generator: torch.Generator, device: torch.device | str | None = None
) -> torch.Tensor | None:
    """The positions ``[P]`` (ascending, on ``device``) of a ``length``-token window whose outputs a step compares: a
    uniform sample of ``P = ceil(share * length)`` of them drawn with ``generator``, or None when that is every
    position."""
    count = math.ceil(share * length)
    if count >= length:
        return None
    return torch.randperm(length, generator=generator)[:count].sort().values.to(device)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a step's :func:`kept_positions`: a function of the run's seed and the step alone, so a resumed
    fit draws what the uninterrupted one would have."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def distillation_loss(
    model: nn.Module,
    compressor: KVCompressor,
    input_ids: torch.Tensor,
    tracker: PositionTracker | None,
    quantizers: dict[tuple[int, str], Quantizer] | None = None,
    sink_tokens: int | None = None,
    teacher_logits: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean per-token ``KL(p_model || p_model with compressed K/V)`` over ``input_ids [B, T]``.

    Args:
        model: the frozen model (its parameters get no gradient).
        compressor: the projections; gradients reach its trainable parameters.
        tracker: the model's :class:`PositionTracker` (RoPE models), None otherwise.
        quantizers: from :func:`latent_quantizers` (None: latents unquantized).
        sink_tokens: exact first positions (None: the compressor's config).
        teacher_logits: the exact model's logits ``[B, P, V]`` (at ``positions``) when already computed.
        positions: the positions ``[P]`` whose distributions are compared (:func:`kept_positions`; None: all).
    """
    sinks = compressor.config.sink_tokens if sink_tokens is None else sink_tokens
    if teacher_logits is None:
        with torch.no_grad():
            teacher_logits = logits_at(model, positions, input_ids=input_ids)

    def replace(layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quant = (lambda kind: None) if quantizers is None else (lambda kind: quantizers.get((layer, kind)))
        return (
            simulate(compressor, layer, "k", keys, quant("k"), sinks),
            simulate(compressor, layer, "v", values, quant("v"), sinks),
        )

    cache = CaptureCache(compressor.num_layers, replace, tracker, compressor.rope_blocks)
    student_logits = logits_at(model, positions, input_ids=input_ids, **cache_kwargs(cache))
    return token_kl(teacher_logits, student_logits)


#: learning-rate multiple of the learned step corrections (``code_log_gain``, ``code_shift``). Why: Adam moves every
#: parameter by about ``lr`` per step; the projections' entries are ~0.1, but a log-gain must move by ~0.1-0.5 to
#: matter, which 3e-4 per step would take thousands of steps to do.
STEP_LR_SCALE = 30.0


def compressor_optimizer(compressor: nn.Module, lr: float) -> torch.optim.Adam | None:
    """Adam over the compressor's trainable parameters: the projections at ``lr``, the learned step corrections at
    ``lr * STEP_LR_SCALE``; None when nothing is trainable."""
    groups: dict[bool, list[nn.Parameter]] = {False: [], True: []}
    for name, parameter in compressor.named_parameters():
        if parameter.requires_grad:
            groups[name.rsplit(".", 1)[-1] in STEP_CORRECTIONS].append(parameter)
    if not groups[False] and not groups[True]:
        return None
    params = [{"params": groups[False], "lr": lr}]
    if groups[True]:
        params.append({"params": groups[True], "lr": lr * STEP_LR_SCALE})
    return torch.optim.Adam(params, lr=lr)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, steps: int, warmup: float = 0.1
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first ``warmup`` of ``steps``, then cosine decay to zero.

    Why: from the closed-form start, full-size Adam steps at once overshoot (the KL first rises); the decay lets the
    last steps settle.
    """
    ramp = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < ramp:
            return (step + 1) / ramp
        progress = (step - ramp) / max(1, steps - ramp)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def distill(
    model: nn.Module,
    compressor: KVCompressor,
    windows: torch.Tensor,
    tracker: PositionTracker | None,
    steps: int,
    lr: float = 3e-4,
    batch_size: int = 1,
    log=None,
    tokens: float = 1.0,
    seed: int = 0,
) -> list[float]:
    """Adam on :func:`distillation_loss` over ``windows [N, T]`` (cycled in order), ``steps`` steps; the losses.

    The plain-PyTorch loop behind ``objective="kl"`` (the LightningModule runs the same step and schedule), for
    scripts and benchmarks. The compressor must have trainable heads (KVSplice). ``tokens``: the share of positions
    each step compares (:func:`kept_positions`, drawn as the LightningModule draws them from ``seed``).
    """
    optimizer = compressor_optimizer(compressor, lr)
    if optimizer is None:
        raise ValueError("the compressor has nothing to train: distillation needs KVSplice heads")
    scheduler = warmup_cosine(optimizer, steps)
    quantizers = latent_quantizers(compressor, next(model.parameters()).dtype)
    device = next(model.parameters()).device
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)].to(device)
        positions = kept_positions(batch.shape[1], tokens, step_generator(seed, step), device)
        loss = distillation_loss(model, compressor, batch, tracker, quantizers, positions=positions)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if log is not None:
            log(step, losses[-1])
    return losses

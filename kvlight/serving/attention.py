"""Decode attention that reads the compressed cache where it lies, instead of rebuilding K/V.

When one token arrives, a :class:`~kvlight.serving.layer.CompressedLayer` does not reconstruct its history: it
offers itself to the model's :class:`DecodeHandoff` and kvlight's attention function (registered in transformers'
``AttentionInterface`` under ``kvlight_<original>`` while a :class:`LatentAttention` is open) calls the layer's
``attend``. The numeric core is below, for one layer and one decode step, with ``H`` KV heads, ``G`` query heads
per KV head and latents ``z`` of rank ``r`` per head::

    decode(z) = z @ A + c                      (A [H, r, D], c [H, D]: every backend decodes affinely)
    scores    = (q @ A^T) @ z^T + q . c        keys with no RoPE (or per RoPE block, below): O(r) per token
    output    = (p @ z) @ A + sum(p) * c       values: weights times latents, one up-projection per head

Keys of RoPE models are coded as the compressor's ``key_rope_block`` says. Block 1: pre-RoPE (rotation depends on
each token's position, so the query cannot be projected once); they are reconstructed into one preallocated workspace
and rotated in place. Block ``B > 1``: each key rotated back by the angle of its block's first token, so the score of
a block's tokens is ``(A R(-theta_block) q) . z + ...``: the query is rotated and projected once per block
(:func:`block_scores`). On the CPU, width codes take one native call per layer instead
(:func:`kvlight.serving.kernels.attend`, the same arithmetic). Calls that are not a pending decode step (prefill, other
caches) go to the model's original attention function unchanged, with the original mask function, so outputs there
are identical.
"""

from __future__ import annotations

import threading
import warnings
import weakref

import torch
from torch import nn

from kvlight.errors import AlreadyWrappedError
from kvlight.hf import attention_implementation, original_attention, register_attention, set_attention
from kvlight.serving.widths import HeadLayout, head_layout

#: original attention implementations the decode path can stand in for (their masks are bool or additive).
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")
_PREFIX = "kvlight_"
#: what a second wrap of one model says (kvlight.serving.wrapper refuses it too, for wrappers without fast decode).
ALREADY_WRAPPED = (
    "this model is already served by another kvlight wrapper; call .close() on that wrapper first, or wrap with "
    "'with kvlight.compress(model, compressor) as wrapped:' so that it closes itself"
)


class DecodeHandoff:
    """The hand-off of one decode step from a compressed cache layer to kvlight's attention function.

    Cache side: on a one-token step under an :attr:`active` hand-off, ``CompressedLayer.update`` calls
    :meth:`offer` ``(key_states, layer)`` and returns the new token's K/V alone instead of the whole history.
    Attention side: the registered attention function calls :meth:`take` with the key tensor transformers hands it,
    right after that ``update``; the same tensor object means this call is that layer's decode step, and the
    function returns ``layer.attend(query, mask, scale)``; anything else (prefill, another cache, a stale offer)
    gets None and the model's original attention runs. Offers are per thread, so two threads decoding never take
    each other's layer. A :class:`LatentAttention` owns one and closes it with itself.
    """

    def __init__(self) -> None:
        self.active = True
        self._local = threading.local()

    def offer(self, key_states: torch.Tensor, layer) -> None:
        self._local.pending = (key_states, layer)

    def take(self, key: torch.Tensor):
        pending = getattr(self._local, "pending", None)
        self._local.pending = None
        return pending[1] if pending is not None and pending[0] is key else None


#: the hand-offs of every open LatentAttention (one attention function serves them all, per implementation).
_OPEN: weakref.WeakSet[DecodeHandoff] = weakref.WeakSet()


def _taken(key: torch.Tensor):
    for handoff in list(_OPEN):
        layer = handoff.take(key)
        if layer is not None:
            return layer
    return None


def _make_forward(original: str):
    def forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = _taken(key)
        if layer is None or kwargs.get("output_attentions"):
            return original_attention(original, module)(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # Gemma 2 passes its attn_logit_softcapping as `softcap`; the mask (sliding windows included) is the model's.
        return layer.attend(query, attention_mask, scale, softcap=kwargs.get("softcap")), None

    forward.__name__ = f"{_PREFIX}{original}_attention_forward"
    return forward


def fast_path_obstacle(model: nn.Module) -> str | None:
    """Why kvlight's decode attention cannot stand in for this model's (None: it can); such models keep the plain
    path, where their own attention reads the rebuilt K/V and is exact.

    The decode attention computes ``softmax(q k^T * scale [softcapped]) v`` over what the cache stores. An attention
    module with parameters of its own (attention sinks, GPT-OSS; differential-attention lambdas, DiffLlama) or with
    experts (JetMoE's mixture of attention heads) computes something else around the attention function.
    """
    from kvlight.models import decoder_blocks

    for block in decoder_blocks(model):
        attention = next((getattr(block, n) for n in ("self_attn", "attn", "attention") if hasattr(block, n)), None)
        if attention is None:
            continue
        own = [name for name, _ in attention.named_parameters(recurse=False)]
        if own:
            return f"its attention holds parameters of its own ({', '.join(own)})"
        if any("expert" in name for name, _ in attention.named_children()):
            return "its attention is a mixture of experts"
    return None


class LatentAttention:
    """Switches ``model`` to kvlight's decode attention until :meth:`close` restores the original.

    Only models on the ``sdpa`` or ``eager`` implementation are switched (:attr:`active` stays False
    otherwise, and the compressed cache then returns reconstructed K/V as before); another implementation
    (``flash_attention_2``, ``flex_attention``, ...) gets a one-line warning saying so. ``handoff`` is what its
    compressed caches offer their decode steps to. A model already switched by an open one is refused
    (:class:`~kvlight.errors.AlreadyWrappedError`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.original = attention_implementation(model)
        self.handoff = DecodeHandoff()
        self.handoff.active = False
        if self.original.startswith(_PREFIX):
            raise AlreadyWrappedError(ALREADY_WRAPPED)
        if self.original not in SUPPORTED_IMPLEMENTATIONS:
            warnings.warn(
                f"kvlight: the model runs attention_implementation={self.original!r}, which kvlight's fast decode "
                "cannot stand in for, so every decode step rebuilds the whole cached K/V (slow at long context); "
                'load the model with attn_implementation="sdpa" for the fast path',
                stacklevel=3,
            )
            return
        if fast_path_obstacle(model) is not None:
            return
        name = _PREFIX + self.original
        register_attention(name, _make_forward(self.original), mask_of=self.original)
        set_attention(model, name)
        self.handoff.active = True
        _OPEN.add(self.handoff)

    @property
    def active(self) -> bool:
        return self.handoff.active

    def close(self) -> None:
        if self.active:
            set_attention(self.model, self.original)
            self.handoff.active = False
            _OPEN.discard(self.handoff)


def stacked_decoder(codec, channel_scale: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer codec's affine decoders, stacked and padded to the largest rank.

    Returns ``A [H, r_max, D]`` (rows past a head's rank are zero) and ``c [H, D]``, with the static
    per-channel scale of quantized latents (``channel_scale [sum_h r_h]``) folded into ``A``.
    """
    weights, biases = [], []
    offset = 0
    r_max = max(codec.splits)
    for proj in codec.heads:
        probe = torch.cat([torch.zeros(1, proj.rank), torch.eye(proj.rank)]).to(proj.mean)
        with torch.no_grad():
            decoded = proj.decode(probe).float()
        bias, weight = decoded[0], decoded[1:] - decoded[0]
        if channel_scale is not None:
            weight = weight * channel_scale[offset : offset + proj.rank, None].to(weight)
        offset += proj.rank
        weights.append(torch.nn.functional.pad(weight, (0, 0, 0, r_max - proj.rank)))
        biases.append(bias)
    return torch.stack(weights).to(dtype), torch.stack(biases).to(dtype)


def width_decoder(codec, quantizer) -> tuple[torch.Tensor, torch.Tensor, HeadLayout]:
    """A width codec's affine decoders over its stored codes laid out per head (kvlight.serving.widths), float32.

    Row ``j`` of head ``h`` holds logical channel ``c = layout.channel[h, j]``: the integer code of a coded channel
    (value ``offset_c + step_c * code``) or the value of an exact one, so
    ``decode(z) = sum_j z_j * s_j * A[c_j] + (c + sum_c constant_c * A[c])`` with ``s_j`` the step (1 for exact
    channels) and ``constant_c`` the offset of coded and dropped channels. Returns ``A' [H, r_max, D]`` (zero rows
    past a head's stored channels), ``c' [H, D]`` and the :class:`~kvlight.serving.widths.HeadLayout`.
    """
    layout = head_layout(quantizer, codec.splits)
    channel = layout.channel.cpu()
    exact = (quantizer.widths == 16).cpu()
    scale = torch.where(exact, torch.ones_like(quantizer.step), quantizer.step).float().cpu()
    constant = quantizer._constant.float().cpu()
    weights = torch.zeros(*channel.shape, codec.heads[0].head_dim)
    biases = []
    start = 0
    for h, proj in enumerate(codec.heads):
        probe = torch.cat([torch.zeros(1, proj.rank), torch.eye(proj.rank)]).to(proj.mean)
        with torch.no_grad():
            decoded = proj.decode(probe).float().cpu()
        bias, weight = decoded[0], decoded[1:] - decoded[0]  # [D], [r_h, D]
        biases.append(bias + constant[start : start + proj.rank] @ weight)
        rows = channel[h][channel[h] >= 0]
        weights[h, : rows.numel()] = scale[rows, None] * weight[rows - start]
        start += proj.rank
    device = quantizer.step.device
    return weights.to(device), torch.stack(biases).to(device), layout


def latents_per_head(z: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """``z [B, n, sum_h r_h] -> [B, H, n, r_max]`` (a view when ranks are equal, zero-padded otherwise)."""
    batch, tokens, _ = z.shape
    if len(set(splits)) == 1:
        return z.view(batch, tokens, len(splits), splits[0]).transpose(1, 2)
    r_max = max(splits)
    parts = [torch.nn.functional.pad(part, (0, r_max - part.shape[-1])) for part in torch.split(z, splits, dim=-1)]
    return torch.stack(parts, dim=1)


def latent_scores(
    q: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale=None, zero=None
) -> torch.Tensor:
    """``q . decode(z)`` without decoding: ``q [B, H, G, D]``, ``z [B, H, n, r]`` -> ``[B, H, G, n]``.

    With ``scale``/``zero`` (``[B, H, n, 1]``), ``z`` holds integer codes and the latent is
    ``scale * z + zero`` (one quantization group per head): the scores are then
    ``scale * (q_latent . z) + zero * sum(q_latent)``, so the codes are never dequantized.
    """
    q_latent = q @ weight.transpose(-1, -2)  # [B, H, G, r]: the query projected once per step
    scores = q_latent @ z.transpose(-1, -2)
    if scale is not None:
        scores = scores * scale.transpose(-1, -2) + q_latent.sum(-1, keepdim=True) * zero.transpose(-1, -2)
    return scores + (q * bias[:, None, :]).sum(-1, keepdim=True)


def block_scores(
    q: torch.Tensor,
    z: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    tables: tuple[torch.Tensor, torch.Tensor],
    layout,
    lead: int,
    block: int,
    scale=None,
    zero=None,
) -> torch.Tensor:
    """Scores of keys coded relative to their RoPE block, in latent space: ``q [B, H, G, D]``, ``z [B, H, n, r]``
    -> ``[B, H, G, n]``.

    Token ``i`` lies in block ``(lead + i) // block`` of the ``K`` blocks whose first-token pair tables are ``tables``
    (``(cos, sin) [B|1, 1, K, D_rot/2]``, :meth:`~kvlight.serving.positions.PositionLog.block_rope`); its key is
    ``R(theta_block) decode(z_i)``, so its score is ``(R(-theta_block) q) . decode(z_i)``: each query is rotated and
    projected once per block, ``A R(-theta) q`` (with the table's scale), and the tokens are scored in latent space.
    ``scale``/``zero`` as in :func:`latent_scores` (dequantized here).
    """
    batch, heads, groups, dim = q.shape
    cos, sin = tables
    blocks = cos.shape[2]
    if scale is not None:
        z = z * scale + zero
    # q . (s R(theta) k) = (s R(-theta) q) . k: the transpose of the keys' rotation, the table's scale included.
    expanded = q.reshape(batch, heads * groups, 1, dim).expand(-1, -1, blocks, -1)
    rotated = layout.rotate(expanded, cos, -sin).reshape(batch, heads, groups, blocks, dim)  # [B, H, G, K, D]
    q_latent = rotated @ weight.transpose(-1, -2)[None, :, None]  # [B, H, G, K, r]
    q_bias = (rotated * bias[None, :, None, None, :]).sum(-1, keepdim=True)  # [B, H, G, K, 1]
    tokens = z.shape[2]
    padded = torch.nn.functional.pad(z, (0, 0, lead, blocks * block - lead - tokens))  # [B, H, K * block, r]
    padded = padded.reshape(batch, heads, blocks, block, z.shape[-1])
    scores = torch.einsum("bhgkr,bhktr->bhgkt", q_latent, padded) + q_bias
    return scores.reshape(batch, heads, groups, blocks * block)[..., lead : lead + tokens]


def latent_values(
    p: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale=None, zero=None
) -> torch.Tensor:
    """``p @ decode(z)`` without decoding: ``p [B, H, G, n]``, ``z [B, H, n, r]`` -> ``[B, H, G, D]``.

    With ``scale``/``zero`` (``[B, H, n, 1]``, see :func:`latent_scores`) the weights absorb the scales:
    ``p @ (scale * z + zero) = (p * scale) @ z + p @ zero``.
    """
    if scale is None:
        mixed = p @ z
    else:
        mixed = (p * scale.transpose(-1, -2)) @ z + p @ zero
    return mixed @ weight + p.sum(-1, keepdim=True) * bias[:, None, :]


def is_channel_major(z: torch.Tensor) -> bool:
    """True when ``z [..., n, r]`` is the transposed view of a contiguous ``[..., r, n]`` tensor."""
    return z.dim() >= 2 and z.shape[-1] > 1 and z.stride(-2) == 1 and not z.is_contiguous()


def decode_into(
    workspace: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale=None, zero=None
) -> torch.Tensor:
    """Reconstruct ``z [B, H, n, r]`` into the front of the flat ``workspace``; returns the ``[B, H, n, D]`` view.

    With ``scale``/``zero`` (codes, see :func:`latent_scores`): ``scale * (z @ A) + zero * sum_r(A) + c``, in place.
    A channel-major ``z`` (:func:`is_channel_major`) gives channel-major keys (``A^T @ z^T`` into ``[B, H, D, n]``):
    each matmul then reads and writes contiguous rows.
    """
    batch, heads, tokens, _ = z.shape
    dim = weight.shape[-1]
    flat = workspace[: batch * heads * tokens * dim]
    if is_channel_major(z):
        out_t = flat.view(batch, heads, dim, tokens)
        torch.matmul(weight.transpose(-1, -2), z.transpose(-1, -2), out=out_t)
        out = out_t.transpose(-1, -2)
    else:
        out = flat.view(batch, heads, tokens, dim)
        torch.matmul(z, weight, out=out)
    if scale is not None:
        out.mul_(scale).addcmul_(zero, weight.sum(-2)[None, :, None, :])
    return out.add_(bias[:, None, :])


def rotate_in_place(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout=None) -> torch.Tensor:
    """RoPE in place on ``keys [B, H, n, D]`` (fastest when keys and tables have the same memory layout, e.g. both
    channel-major).

    With a :class:`~kvlight.serving.positions.RotaryLayout`, ``cos/sin`` are its pair tables ``[B|1, 1, n, D_rot/2]``
    and only the rotary channels turn, paired half-split or interleaved (strided views, still in place). Without
    one: full-width half-split tables ``[B|1, 1, n, D]``, ``keys * cos + rotate_half(keys) * sin``.
    """
    if layout is not None:
        return layout.rotate_(keys, cos, sin)
    half = keys.shape[-1] // 2
    first, second = keys[..., :half], keys[..., half:]
    saved = first.clone()
    first.mul_(cos[..., :half]).sub_(second * sin[..., :half])
    second.mul_(cos[..., half:]).add_(saved * sin[..., half:])
    return keys


def apply_softcap(scores: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """Scaled scores ``[B, H, G, N]`` soft-capped as the eager attention of Gemma 2 does before its mask:
    ``tanh(scores / cap) * cap`` (unchanged for None)."""
    if softcap is None:
        return scores
    return torch.tanh(scores / softcap) * softcap


def additive_mask(mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """A transformers mask ``[B|1, 1, Q, N]`` as the decode step's additive float32 row ``[B|1, N]`` (bool: True
    attends, 0, else -inf; float: its values), or None when there is none."""
    if mask is None:
        return None
    row = mask[:, 0, -1, :]
    if row.shape[-1] != tokens:
        raise ValueError(f"the attention mask covers {row.shape[-1]} tokens, the cache layer holds {tokens}")
    if row.dtype == torch.bool:
        return torch.zeros(row.shape, dtype=torch.float32, device=row.device).masked_fill_(~row, float("-inf"))
    return row.float().contiguous()


def apply_mask(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Scores ``[B, H, G, N]`` (float32) with a transformers mask ``[B|1, 1, 1, N]`` (bool: True attends; float: added)."""
    if mask is None:
        return scores
    mask = mask[:, :, -1:, :]  # [B|1, 1, 1, N]: the decode step's row, broadcast over heads
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.float()

"""Positions: which position ids the model really used, and RoPE applied and undone with them.

The rotation is derived from the model, not from a list of architectures: the tracker observes the rotary module's
output (the exact ``(cos, sin)`` of each forward, whatever the scaling), and :func:`probe_layout` reads the modeling
file's own ``apply_rotary_pos_emb`` once to learn which channels rotate and how they pair (:class:`RotaryLayout`).
"""

from __future__ import annotations

import copy
import functools
import itertools
import threading
from dataclasses import dataclass

import torch
from torch import nn

from kvlight.errors import ModelLoadError
from kvlight.hf import (
    default_cache_windows,
    rope_layers,
    rotary_call_layer_type,
    rotary_cos_sin_of,
    rotary_dynamic_any,
    rotary_function,
    rotary_is_dynamic,
    rotary_layer_types,
)
from kvlight.models import decoder_blocks, rotary_module


def block_starts(start: int, stop: int, block: int, device=None) -> torch.Tensor:
    """Sequence slot of the first token of the block of ``block`` tokens that each slot ``start:stop`` falls in
    (blocks counted from slot 0), long ``[stop - start]``."""
    slots = torch.arange(start, stop, device=device)
    return slots - slots % block


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class RotaryLayout:
    """Which channels of a ``head_dim`` key rotate, and how they pair.

    The first ``rotary_dim`` channels rotate (the rest pass through: partial rotary, GPT-NeoX, Phi); pair ``i`` is
    channels ``(i, i + rotary_dim/2)`` (half-split, Llama) or ``(2i, 2i + 1)`` (``interleaved``, Cohere, GLM), and
    turns by the angle of the rotary table's column ``columns[i]``. A rotation table here is the pair table
    ``(cos, sin) [..., rotary_dim/2]``: one value per pair (with any attention scaling ``s`` in both).
    """

    head_dim: int
    rotary_dim: int
    interleaved: bool
    columns: tuple[int, ...]

    def pairs(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``(first, second) [..., rotary_dim/2]`` of ``keys [..., head_dim]``: the two channels of each pair."""
        if self.interleaved:
            return keys[..., 0 : self.rotary_dim : 2], keys[..., 1 : self.rotary_dim : 2]
        half = self.rotary_dim // 2
        return keys[..., :half], keys[..., half : self.rotary_dim]

    @functools.cached_property
    def pair_channels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 ``[D_rot/2]`` each: the channel of every pair's first and of its second member (what :meth:`pairs`
        views), for the native decode kernels."""
        pairs = torch.arange(self.rotary_dim // 2, dtype=torch.int32)
        if self.interleaved:
            return 2 * pairs, 2 * pairs + 1
        return pairs, pairs + self.rotary_dim // 2

    def pair_table(self, table: torch.Tensor) -> torch.Tensor:
        """A rotary module's ``cos`` or ``sin`` ``[..., W]`` -> the pair table ``[..., rotary_dim/2]``."""
        index = torch.tensor(self.columns, device=table.device)
        return table.index_select(-1, index)

    def rotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Pre-RoPE ``keys [B, H, T, D]`` -> post-RoPE with pair tables ``cos/sin [B|1, 1, T, D_rot/2]``."""
        out = keys.clone()
        first, second = self.pairs(keys)
        new_first, new_second = self.pairs(out)
        cos, sin = cos.to(keys.dtype), sin.to(keys.dtype)
        new_first.copy_(first * cos - second * sin)
        new_second.copy_(second * cos + first * sin)
        return out

    def unrotate(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Post-RoPE ``keys [B, H, T, D]`` -> pre-RoPE, exactly: the inverse of ``s * R(theta)`` is ``R(-theta) / s^2``,
        with ``s^2 = cos^2 + sin^2`` per pair (float32 arithmetic)."""
        out = keys.float()  # a copy unless keys are float32; cloned below then
        out = out.clone() if out.data_ptr() == keys.data_ptr() else out
        cos, sin = cos.float(), sin.float()
        first, second = (t.float() for t in self.pairs(keys))
        scale = cos * cos + sin * sin
        new_first, new_second = self.pairs(out)
        new_first.copy_((first * cos + second * sin) / scale)
        new_second.copy_((second * cos - first * sin) / scale)
        return out.to(keys.dtype)

    def rotate_(self, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """:meth:`rotate` in place (the decode path's workspace); strided pair views are updated where they lie."""
        first, second = self.pairs(keys)
        saved = first.clone()
        first.mul_(cos).sub_(second * sin)
        second.mul_(cos).add_(saved * sin)
        return keys


def probe_layout(apply_rotary, head_dim: int, width: int, where: str) -> RotaryLayout:
    """The :class:`RotaryLayout` of a modeling file's ``apply_rotary_pos_emb``, read off basis vectors once.

    ``width`` is the last dimension of the rotary module's ``cos``/``sin``. The function gets the whole head first
    (GPT-NeoX and GLM split off the pass-through channels themselves); a function that only takes the rotary part
    (Phi, Persimmon, StableLM rotate ``[..., :width]`` and pass the rest) is probed at ``width`` channels. The layout is
    checked against the function on random angles; anything else is refused with one line.
    """
    for channels in dict.fromkeys((head_dim, width)):
        try:
            probed = _probe(apply_rotary, channels, width)
        except (RuntimeError, ValueError, IndexError):
            continue
        if probed is not None and _reproduces(apply_rotary, *probed, width):
            layout = probed[0]
            return RotaryLayout(head_dim, layout.rotary_dim, layout.interleaved, layout.columns)
    raise ModelLoadError(
        f"the rotary embedding of {where} is not a pairwise rotation kvlight can reproduce "
        "(half-split or interleaved pairs over the leading channels)"
    )


def _apply(apply_rotary, keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``apply_rotary_pos_emb`` on ``keys [1, N, 1, C]`` with one-token tables ``[1, 1, W]``: the rotated keys."""
    return apply_rotary(keys, keys, cos, sin)[1]


def _probe(apply_rotary, channels: int, width: int) -> tuple[RotaryLayout, tuple[int, ...]] | None:
    """The layout over ``channels`` and the table column each pair's second channel reads, or None."""
    eye = torch.eye(channels, dtype=torch.float64).view(1, channels, 1, channels)
    zeros = torch.zeros(1, 1, width, dtype=torch.float64)
    passing = _apply(apply_rotary, eye, zeros, zeros)[0, :, 0].diagonal() != 0  # pass-through channels survive
    rotary_dim = int((~passing).sum())
    if rotary_dim == 0 or rotary_dim % 2 or bool(passing[:rotary_dim].any()):
        return None
    turned = _apply(apply_rotary, eye, zeros, torch.ones_like(zeros))[0, :rotary_dim, 0, :rotary_dim]  # P(e_j)
    half = rotary_dim // 2
    for interleaved in (False, True):
        order = torch.arange(rotary_dim).view(2, half).T.flatten() if not interleaved else torch.arange(rotary_dim)
        firsts, seconds = order[0::2], order[1::2]
        expected = torch.zeros_like(turned)
        expected[firsts, seconds], expected[seconds, firsts] = 1.0, -1.0
        if torch.equal(turned, expected):
            codes = (torch.arange(width, dtype=torch.float64) + 2).view(1, 1, width)
            ones = torch.ones(1, 1, 1, channels, dtype=torch.float64)
            gathered = _apply(apply_rotary, ones, codes, torch.zeros_like(codes))[0, 0, 0]
            columns, partners = (
                tuple(int(round(float(gathered[i]))) - 2 for i in part.tolist()) for part in (firsts, seconds)
            )
            if not all(0 <= c < width for c in columns + partners):
                return None
            return RotaryLayout(channels, rotary_dim, interleaved, columns), partners
    return None


def _reproduces(apply_rotary, layout: RotaryLayout, partners: tuple[int, ...], width: int) -> bool:
    """True when ``layout`` rotates random keys as ``apply_rotary`` does, at random angles and scale (the tables give
    both channels of a pair, ``layout.columns`` and ``partners``, the pair's angle, as a rotary module's do)."""
    generator = torch.Generator().manual_seed(0)
    angles = torch.rand(1, 3, len(layout.columns), generator=generator, dtype=torch.float64) * 6.0
    cos_pair, sin_pair = angles.cos() * 1.3, angles.sin() * 1.3
    cos, sin = torch.zeros(1, 3, width, dtype=torch.float64), torch.zeros(1, 3, width, dtype=torch.float64)
    for columns in (layout.columns, partners):
        index = torch.tensor(columns)
        cos[..., index], sin[..., index] = cos_pair, sin_pair
    keys = torch.randn(1, 2, 3, layout.head_dim, generator=generator, dtype=torch.float64)
    try:
        reference = apply_rotary(keys, keys, cos, sin)[1]
    except (RuntimeError, ValueError, IndexError):
        return False
    got = layout.rotate(keys, cos_pair.unsqueeze(1), sin_pair.unsqueeze(1))
    return reference.shape == got.shape and torch.allclose(reference, got, atol=1e-9)


class PositionTracker:
    """Observes the position ids each forward of a RoPE model really uses, and rotates keys with them.

    A forward pre-hook on the model's rotary-embedding module records ``position_ids`` (``[B|1, T]``)
    before any attention layer runs, and a forward hook its output: the ``(cos, sin)`` every attention layer of this
    forward rotates with, whatever the rope scaling (dynamic NTK and longrope change them with the sequence length,
    so a key is unrotated with the table it arrived with, not one recomputed later). :meth:`close` removes the hooks.
    ``layout`` is how keys rotate (probed from the modeling file), ``dynamic`` whether tables must be kept as
    observed, :meth:`rotates` which layers rotate at all (NoPE layers do not).

    What it records is per thread: a forward runs its rotary module and then its attention layers in one thread,
    so two threads generating with one wrapped model each read their own forward's positions. Every observation gets
    a number unique across threads (:attr:`step`), so a cache used in one thread and continued in another (a prefix
    cache handed to a worker) never takes a stale observation for a new one.

    A rotary module called once per layer type (Gemma 3: ``rotary_emb(x, position_ids, layer_type)``, a rope base per
    type) has its tables recorded per type (``layer_types``: each layer's type, ``config.layer_types``); every
    method that rotates takes the ``layer_idx`` whose type's tables it uses. ``windows`` is each layer's sliding
    window in transformers' default cache (None: the layer keeps every token).
    """

    #: numbers observations across every tracker and thread (itertools.count's next is atomic in CPython).
    _observations = itertools.count(1)

    def __init__(self, model: nn.Module) -> None:
        self.rotary = rotary_module(model)
        if self.rotary is None:
            raise ValueError(f"{type(model).__name__} has no rotary embedding module to track positions on")
        self._local = threading.local()
        #: per layer, the layer_type its rotary tables are computed for (None: one table serves every layer).
        self.layer_types = rotary_layer_types(self.rotary, model.config)
        if self.layer_types is not None and rotary_dynamic_any(self.rotary):
            # Arrival tables (PositionLog.tables) are kept for one table per forward, not one per layer type.
            raise ModelLoadError(
                f"{type(model).__name__}: a dynamic rope (dynamic NTK, longrope) per layer type is not supported"
            )
        self.windows = default_cache_windows(model.config)
        self.layout = _model_layout(model, self.rotary, self._probe_width(model))
        self.dynamic = rotary_is_dynamic(self.rotary)
        blocks = decoder_blocks(model)
        self._rope_layers = rope_layers(blocks)
        self._handle = self.rotary.register_forward_pre_hook(self._observe, with_kwargs=True)
        self._output_handle = self.rotary.register_forward_hook(self._observe_output, with_kwargs=True)
        # Which block runs (typed tables only): observed() without a layer reads the running layer's type.
        self._block_handles = [
            block.register_forward_pre_hook(functools.partial(self._enter_block, index))
            for index, block in enumerate(blocks if self.layer_types is not None else [])
        ]

    def _probe_width(self, model: nn.Module) -> int:
        """Last dimension of the rotary module's tables (one call at position 0, no state of dynamic rope changes:
        a one-token sequence is below any original length)."""
        return self.cos_sin(torch.zeros(1, 1, dtype=torch.long, device=_device_of(model)))[0].shape[-1]

    def rotates(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` rotates its keys (SmolLM3's NoPE layers do not)."""
        return layer_idx >= len(self._rope_layers) or self._rope_layers[layer_idx]

    def kind(self, layer_idx: int | None) -> str | None:
        """The layer type whose rotary tables layer ``layer_idx`` rotates with (None: the model has one table; a
        ``layer_idx`` of None: layer 0's)."""
        if self.layer_types is None:
            return None
        return self.layer_types[0 if layer_idx is None else layer_idx]

    @property
    def table(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Pair tables ``(cos, sin) [B|1, T, D_rot/2]`` this thread's latest forward rotated with (None before); with
        tables per layer type, the latest call's."""
        return getattr(self._local, "table", None)

    def table_of(self, layer_idx: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Pair tables ``(cos, sin) [B|1, T, D_rot/2]`` of this thread's latest forward for layer ``layer_idx``'s
        type (:meth:`kind`); the latest call's for a model with one table."""
        if self.layer_types is None:
            return self.table
        return getattr(self._local, "tables", {}).get(self.kind(layer_idx))

    def _enter_block(self, index: int, module: nn.Module, args: tuple) -> None:
        self._local.layer = index
        return None

    def _observe_output(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        if getattr(self._local, "internal", False):
            return None
        cos, sin = output
        table = (self.layout.pair_table(cos.detach()), self.layout.pair_table(sin.detach()))
        self._local.table = table
        if self.layer_types is not None:  # one call per layer type and forward: keep each type's
            if not hasattr(self._local, "tables"):
                self._local.tables = {}
            self._local.tables[rotary_call_layer_type(args, kwargs)] = table
        return None

    @property
    def current(self) -> torch.Tensor | None:
        """``position_ids [B|1, T]`` of this thread's latest forward (None before its first)."""
        return getattr(self._local, "current", None)

    @property
    def step(self) -> int:
        """Number of this thread's latest observation (0 before its first); unique across threads."""
        return getattr(self._local, "step", 0)

    def _observe(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if getattr(self._local, "internal", False):
            return None
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if position_ids is not None:
            self._local.current = position_ids.detach()
            self._local.step = next(self._observations)
        return None

    def close(self) -> None:
        for handle in (self._handle, self._output_handle, *self._block_handles):
            if handle is not None:
                handle.remove()

    def __deepcopy__(self, memo: dict) -> PositionTracker:
        """What ``copy.deepcopy`` of a wrapped model copies with it (its hooks are bound to this tracker): a tracker of
        the copied modules with its own per-thread state. The copy's hooks stay on the copied model until it is
        discarded; :meth:`close` of the copy removes nothing (its handles would name the original's hooks)."""
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            if name == "_local":
                value = threading.local()
            elif name in ("_handle", "_output_handle"):
                value = None
            elif name == "_block_handles":
                value = []
            else:
                value = copy.deepcopy(value, memo)
            setattr(copied, name, value)
        return copied

    def pair_tables(
        self, position_ids: torch.Tensor, layer_idx: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own pair tables ``(cos, sin) [B|1, T, D_rot/2]`` float32 for ``position_ids [B|1, T]`` of layer
        ``layer_idx``'s type (:meth:`kind`), recomputed (exact for static rope types; for dynamic ones, what one
        forward of these positions uses)."""
        return tuple(self.layout.pair_table(t) for t in self.cos_sin(position_ids, layer_idx))

    def cos_sin(self, position_ids: torch.Tensor, layer_idx: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own ``(cos, sin)``, ``[B|1, T, D]`` float32, for ``position_ids [B|1, T]`` (of layer
        ``layer_idx``'s type where the rotary module has one table per layer type; default layer 0's)."""
        probe = torch.empty(0, dtype=torch.float32, device=position_ids.device)
        self._local.internal = True
        try:
            cos, sin = rotary_cos_sin_of(self.rotary, probe, position_ids, self.kind(layer_idx))
        finally:
            self._local.internal = False
        return cos.float(), sin.float()

    def unrotate(self, keys: torch.Tensor, position_ids: torch.Tensor, layer_idx: int | None = None) -> torch.Tensor:
        """Post-RoPE ``keys [B, H, T, D]`` of layer ``layer_idx`` -> pre-RoPE (what attention reads before rotation),
        exactly.

        RoPE applies ``s * R(theta)``; its inverse is ``R(-theta) / s^2`` and ``cos^2 + sin^2 = s^2``.
        """
        cos, sin = (t.unsqueeze(1) for t in self.pair_tables(position_ids, layer_idx))
        return self.layout.unrotate(keys, cos, sin)

    def rotate(self, keys: torch.Tensor, position_ids: torch.Tensor, layer_idx: int | None = None) -> torch.Tensor:
        """Pre-RoPE ``keys [B, H, T, D]`` of layer ``layer_idx`` -> post-RoPE, as the model's attention applies it."""
        cos, sin = (t.unsqueeze(1) for t in self.pair_tables(position_ids, layer_idx))
        return self.layout.rotate(keys, cos, sin)

    def observed(self, batch: int, layer_idx: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """This thread's latest forward's pair tables as ``[B|1, 1, T, D_rot/2]`` (what its attention rotated with):
        with tables per layer type, those of layer ``layer_idx``'s type (default: the decoder block running now, so a
        cache layer that calls this from its update gets its own layer's)."""
        if layer_idx is None and self.layer_types is not None:
            layer_idx = getattr(self._local, "layer", None)
        table = self.table_of(layer_idx)
        if table is None:
            raise RuntimeError("no forward of this model's rotary module was observed in this thread")
        return tuple(t.unsqueeze(1) for t in table)


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return torch.device("cpu") if parameter is None or parameter.device.type == "meta" else parameter.device


def _model_layout(model: nn.Module, rotary: nn.Module, width: int) -> RotaryLayout:
    """The :class:`RotaryLayout` of ``model``'s attention, probed from its modeling file's ``apply_rotary_pos_emb``."""
    from kvlight.geometry import kv_geometry

    where = type(model).__name__
    apply_rotary = rotary_function(rotary)
    if apply_rotary is None:
        raise ModelLoadError(f"{where}: its modeling file has no apply_rotary_pos_emb to rotate keys with")
    return probe_layout(apply_rotary, kv_geometry(model).head_dim, width, where)


class PositionLog:
    """Positions of every token a cache holds, ``[B, N]`` int32, appended once per forward, and the rotation table of
    its compressed tokens. One per cache, shared by its layers (they all hold the same tokens).

    For dynamic rope types (``PositionTracker.dynamic``) it also keeps ``tables``, the pair tables
    ``(cos, sin) [B|1, N, D_rot/2]`` each token arrived with (as observed), because the model's own cache keeps each
    key as rotated then and the rotary module's later tables differ; they are stored bytes (see :meth:`stored_tensors`).
    For static types the tables are recomputed from the positions, with the layer type of the layer that asks
    (:meth:`PositionTracker.kind`: Gemma 3's sliding and global layers rotate with different bases).
    """

    def __init__(self, tracker: PositionTracker | None) -> None:
        self.tracker = tracker
        self.positions: torch.Tensor | None = None
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None
        self._step = -1
        # Rotation tables of compressed tokens, one per (layer type, sliding): full layers' compressed tokens start at
        # the sinks, a sliding layer's where its window starts, so the two would rebuild each other's every step.
        self._rope: dict[tuple, tuple[int, torch.Tensor, torch.Tensor]] = {}
        self._rope_channel_major: dict[tuple, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        #: the tables :meth:`tables_of` made for the positions held now (the layers of a forward share them).
        self._memo: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._memo_stamp: tuple | None = None

    def observe(self, batch: int, new_tokens: int, device: torch.device) -> None:
        if self.tracker is None or self.tracker.step == self._step:
            return
        current = self.tracker.current
        if current is None or current.shape[-1] != new_tokens:
            raise RuntimeError(
                "the compressed cache did not see this forward's position ids; build it through "
                "CompressedKVModelWrapper (or PositionTracker) for the same model"
            )
        current = current.to(device=device, dtype=torch.int32).expand(batch, -1)
        self.positions = current if self.positions is None else torch.cat([self.positions, current], dim=1)
        if self.tracker.dynamic:
            self._append_tables(tuple(t.to(device) for t in self.tracker.table))
        self._step = self.tracker.step

    def _append_tables(self, tables: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Append pair tables ``[B|1, T, D_rot/2]`` of the newest tokens (rows broadcast when one side has one)."""
        if self.tables is None:
            self.tables = tables
            return
        old = self.tables
        if old[0].shape[0] != tables[0].shape[0]:
            rows = max(old[0].shape[0], tables[0].shape[0])
            old, tables = ([t.expand(rows, -1, -1) for t in pair] for pair in (old, tables))
        self.tables = tuple(torch.cat([a, b], dim=1) for a, b in zip(old, tables, strict=True))

    def rotates(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx``'s keys are rotated (a RoPE model's layer that is not NoPE)."""
        return self.tracker is not None and self.tracker.rotates(layer_idx)

    def tables_of(
        self, start: int, stop: int, dtype: torch.dtype, layer_idx: int = 0, block: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair tables ``(cos, sin) [B|1, 1, stop-start, D_rot/2]`` of sequence slots ``start:stop`` for layer
        ``layer_idx``: those observed on arrival (dynamic rope) or recomputed from the positions with the layer's type
        (one row when all rows agree). ``block`` > 1: each slot gets the table of the first slot of its block of that
        many slots (:func:`block_starts`), what keys coded relative to their block's RoPE are rotated with."""
        # Every full layer compresses the same slots in one forward: the tables are made once and handed to each.
        stamp = (id(self.positions), self.positions.shape[1])  # new positions: a new tensor, a new length
        if self._memo_stamp != stamp:
            self._memo, self._memo_stamp = {}, stamp
        key = (start, stop, dtype, block, None if self.tracker is None else self.tracker.kind(layer_idx))
        if key not in self._memo:
            if block == 1:
                self._memo[key] = self._tables_at(slice(start, stop), dtype, layer_idx)
            else:
                slots = block_starts(start, stop, block, self.positions.device)
                self._memo[key] = self._tables_at(slots, dtype, layer_idx)
        return self._memo[key]

    def _tables_at(self, slots, dtype: torch.dtype, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair tables ``[B|1, 1, S, D_rot/2]`` of sequence ``slots`` (a slice or a long index)."""
        if self.tables is not None:
            return tuple(t[:, slots].unsqueeze(1).to(dtype) for t in self.tables)
        positions = self.positions[:, slots].long()
        if bool((positions == positions[:1]).all()):
            positions = positions[:1]
        return tuple(t.unsqueeze(1).to(dtype) for t in self.tracker.pair_tables(positions, layer_idx))

    def unrotate(self, keys: torch.Tensor, start: int, layer_idx: int = 0, block: int = 1) -> torch.Tensor:
        """Post-RoPE ``keys [B, H, T, D]`` of slots ``start:start+T`` of layer ``layer_idx`` -> rotated back by the
        tables they arrived with (``block`` > 1: their block start's), as the compressor codes them."""
        cos, sin = self.tables_of(start, start + keys.shape[2], torch.float32, layer_idx, block)
        return self.tracker.layout.unrotate(keys, cos, sin)

    def rotate(self, keys: torch.Tensor, start: int, layer_idx: int = 0, block: int = 1) -> torch.Tensor:
        """The inverse of :meth:`unrotate`: coded ``keys [B, H, T, D]`` of slots ``start:start+T`` -> post-RoPE, as
        the model's own cache holds them."""
        cos, sin = self.tables_of(start, start + keys.shape[2], torch.float32, layer_idx, block)
        return self.tracker.layout.rotate(keys, cos, sin)

    def block_rope(self, first: int, count: int, block: int, layer_idx: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair tables ``(cos, sin) [B|1, 1, K, D_rot/2]`` float32 of the first slot of every block of ``block`` slots
        that slots ``first:first+count`` touch (``K = (first + count - 1) // block - first // block + 1``): what a
        decode step rotates each query by, once per block, to score keys coded relative to their block's RoPE.

        Shared by every layer of one rotary type and extended only by new blocks (slots are counted from the start of
        the sequence, so a sliding window's blocks keep their starts and the table is sliced, not rebuilt).
        """
        group = ("blocks", block, None if self.tracker is None else self.tracker.kind(layer_idx))
        low, high = first // block, (first + count - 1) // block + 1  # blocks [low, high)
        entry = self._rope.get(group)
        if entry is None or entry[0] > low:  # a first table, or one a crop or reorder would have dropped
            entry = (low, *self._block_tables(low, high, block, layer_idx))
        start, cos, sin = entry
        covered = start + cos.shape[2]
        if covered < high:  # new blocks: only their tables are made
            new_cos, new_sin = self._block_tables(covered, high, block, layer_idx)
            if new_cos.shape[0] != cos.shape[0]:  # one side's rows agreed, the other's not
                rows = max(new_cos.shape[0], cos.shape[0])
                cos, sin, new_cos, new_sin = (t.expand(rows, -1, -1, -1) for t in (cos, sin, new_cos, new_sin))
            cos, sin = torch.cat([cos, new_cos], dim=2), torch.cat([sin, new_sin], dim=2)
            entry = (start, cos, sin)
        self._rope[group] = entry
        return cos[:, :, low - start : high - start], sin[:, :, low - start : high - start]

    def block_rope_rows(
        self, first: int, count: int, block: int, layer_idx: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`block_rope` as the native kernel reads it, ``(cos, sin) [B|1, K, D_rot/2]`` contiguous; made once per
        step (memoised like :meth:`tables_of`) and handed to every layer of the same rotary type."""
        stamp = (id(self.positions), self.positions.shape[1])
        if self._memo_stamp != stamp:
            self._memo, self._memo_stamp = {}, stamp
        key = ("block rows", first, count, block, None if self.tracker is None else self.tracker.kind(layer_idx))
        if key not in self._memo:
            self._memo[key] = tuple(t[:, 0].contiguous() for t in self.block_rope(first, count, block, layer_idx))
        return self._memo[key]

    def _block_tables(self, low: int, high: int, block: int, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair tables ``[B|1, 1, high - low, D_rot/2]`` float32 of the first slots of blocks ``low:high``."""
        slots = torch.arange(low, high, device=self.positions.device) * block
        return self._tables_at(slots, torch.float32, layer_idx)

    def stored_tensors(self) -> list[torch.Tensor]:
        """What this log stores for the cached tokens: the positions and, for dynamic rope, the arrival tables."""
        held = [] if self.positions is None else [self.positions]
        return held + ([] if self.tables is None else list(self.tables))

    def select(self, fn) -> None:
        """Apply a batch selection ``fn`` (beam reordering) to the positions and tables."""
        if self.positions is not None:
            self.positions = fn(self.positions)
        if self.tables is not None and self.tables[0].shape[0] > 1:
            self.tables = tuple(fn(t) for t in self.tables)
        self.forget_rope()

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` tokens' positions and tables (a crop)."""
        if self.positions is not None:
            self.positions = self.positions[:, :length]
        if self.tables is not None:
            self.tables = tuple(t[:, :length] for t in self.tables)
        self.forget_rope()

    def slice(self, start: int, stop: int) -> torch.Tensor:
        return self.positions[:, start:stop].long()

    def extend(self, position_ids: torch.Tensor) -> None:
        """Append ``position_ids [B, T]`` given directly (see CompressedCache.ingest), for this step's updates."""
        if self.tracker is not None and self.tracker.dynamic:  # what one forward of these positions would rotate with
            self._append_tables(self.tracker.pair_tables(position_ids))
        position_ids = position_ids.to(torch.int32)
        self.positions = position_ids if self.positions is None else torch.cat([self.positions, position_ids], dim=1)
        self._step = None if self.tracker is None else self.tracker.step

    def restore(self, positions: torch.Tensor | None, tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Hold ``positions [B, N]`` (int32) as the positions of the N tokens already cached, e.g. of a cache read back
        from disk; the rotation table is rebuilt from them when first needed. For dynamic rope, ``tables`` are the
        arrival tables (``tables``); without them they are recomputed from the positions in one call, which is
        exact only while the sequence stayed below the rope's original length."""
        self.positions = None if positions is None else positions.to(torch.int32)
        self.tables = tables
        if tables is None and self.positions is not None and self.tracker is not None and self.tracker.dynamic:
            self.tables = self.tracker.pair_tables(self.positions)
        self.forget_rope()

    def compressed_rope(
        self,
        first: int,
        count: int,
        dtype: torch.dtype,
        channel_major: bool = False,
        layer_idx: int = 0,
        sliding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pair tables ``(cos, sin) [B|1, 1, count, D_rot/2]`` of layer ``layer_idx``'s compressed tokens at slots
        ``first:first+count``.

        Shared by every layer of one rotary type (:meth:`PositionTracker.kind`) and one kind of layer (``sliding``:
        a sliding layer's compressed tokens start where its window starts) and extended only by the newly compressed
        tokens (the rotary module is not asked again for the whole history each step); when ``first`` moves on (a
        sliding window drops its oldest tokens) the table is sliced, not rebuilt. One row serves the batch when all
        rows have the same positions. ``channel_major``: the same values as transposed views of contiguous
        ``[B|1, 1, D, count]`` tables (made once per table, for keys decoded channel-major; see attention.decode_into).
        """
        group = (None if self.tracker is None else self.tracker.kind(layer_idx), sliding)
        cos, sin = self._compressed_rope(first, count, dtype, layer_idx, group)
        if not channel_major:
            return cos, sin
        key = (first, count, dtype, cos.data_ptr(), cos.shape[0])
        cached = self._rope_channel_major.get(group)
        if cached is None or cached[0] != key:
            cos_t, sin_t = (t.transpose(-1, -2).contiguous() for t in (cos, sin))
            cached = self._rope_channel_major[group] = (key, cos_t, sin_t)
        return tuple(t.transpose(-1, -2) for t in cached[1:])

    def _compressed_rope(
        self, first: int, count: int, dtype: torch.dtype, layer_idx: int, group: tuple
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The token-major table of :meth:`compressed_rope`, sliced and extended in place of rebuilt."""
        entry = self._rope.get(group)
        if entry is not None:
            start, cos, sin = entry
            skip = first - start  # tokens that left a sliding window since the table was made
            if skip < 0 or skip > cos.shape[2] or cos.shape[2] - skip > count or cos.dtype != dtype:
                entry = None
            else:
                entry = (first, cos[:, :, skip:], sin[:, :, skip:])
        have = 0 if entry is None else entry[1].shape[2]
        if have < count:
            cos, sin = self.tables_of(first + have, first + count, dtype, layer_idx)
            if entry is not None:
                old_cos, old_sin = entry[1], entry[2]
                if old_cos.shape[0] != cos.shape[0]:
                    old_cos, old_sin = (t.expand(cos.shape[0], -1, -1, -1) for t in (old_cos, old_sin))
                    cos, sin = cos.expand(old_cos.shape[0], -1, -1, -1), sin.expand(old_cos.shape[0], -1, -1, -1)
                cos, sin = torch.cat([old_cos, cos], dim=2), torch.cat([old_sin, sin], dim=2)
            entry = (first, cos, sin)
        self._rope[group] = entry
        return entry[1], entry[2]

    #: decode scratch: rebuilt from the positions when needed, never copied.
    _SCRATCH = ("_rope", "_rope_channel_major", "_memo", "_memo_stamp")

    def __deepcopy__(self, memo: dict) -> PositionLog:
        """A copy of the positions and arrival tables (``copy.deepcopy`` of a cache); the tracker is shared by
        whoever put it in ``memo`` (the cache), the rotation tables are left to be rebuilt."""
        copied = self.__class__.__new__(self.__class__)
        memo[id(self)] = copied
        for name, value in self.__dict__.items():
            if name not in self._SCRATCH:
                setattr(copied, name, copy.deepcopy(value, memo))
        copied.forget_rope()
        return copied

    def forget_rope(self) -> None:
        """Drop the rotation tables (after a crop, a batch selection, or a reset); appends only extend them."""
        self._rope = {}
        self._rope_channel_major = {}
        self._memo, self._memo_stamp = {}, None

    def table_tensors(self) -> list[torch.Tensor]:
        """The rotation tables' tensors (decode scratch, not stored tokens)."""
        tables = [t for entry in self._rope.values() for t in entry[1:]]
        return tables + [t for entry in self._rope_channel_major.values() for t in entry[1:]]

"""A bounded, uniform reservoir sample of captured tokens, shared by every layer (Algorithm R over the stream).

A *row* is one token's keys and values for every layer and KV head, ``[L, H, D]`` each, so compressors for all
layers are fitted on the same tokens.
"""

from __future__ import annotations

import torch

from kvlight.errors import CaptureError


class KVReservoir:
    """Uniform reservoir sample of *tokens* shared by all layers.

    A kept row holds that token's K and V for every layer and KV head, so the layers stay aligned. Memory is
    bounded by ``capacity`` rows whatever the number of tokens streamed.

    Use it once per captured batch: :meth:`plan` decides which tokens enter and where, then :meth:`put` is called
    for every layer with that plan before the next :meth:`plan`.

    Args:
        num_layers: Number of decoder layers ``L``.
        num_kv_heads: Number of key/value heads ``H`` per layer.
        head_dim: Size ``D`` of one head.
        capacity: Maximum number of rows kept.
        seed: Seed of the generator that decides replacements (same seed and batches -> same sample).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, seed: int = 0):
        if min(num_layers, num_kv_heads, head_dim, capacity) < 1:
            raise ValueError(
                f"KVReservoir needs positive sizes, got num_layers={num_layers}, num_kv_heads={num_kv_heads}, "
                f"head_dim={head_dim}, capacity={capacity}"
            )
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.capacity = capacity
        self._generator = torch.Generator().manual_seed(seed)
        self._seen = 0
        # Allocated on first put: torch.empty pages are only touched when written, but deferring keeps
        # construction free for callers that never capture (e.g. a cache hit).
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        # Layers still owed a put() for the last plan; a missing layer would leave stale rows in its slots.
        self._pending_layers: set[int] = set()

    @property
    def num_seen(self) -> int:
        """Number of tokens offered to the reservoir so far."""
        return self._seen

    def __len__(self) -> int:
        return min(self._seen, self.capacity)

    def plan(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Decide which of the next ``num_tokens`` tokens enter the reservoir and which slot each takes.

        Algorithm R, vectorised: the token with global index ``n`` goes to slot ``n`` while ``n < capacity``;
        afterwards it draws ``j`` uniformly from ``[0, n]`` and replaces slot ``j`` if ``j < capacity``. When two
        tokens of this batch target the same slot only the later one is returned, which is what writing them one
        after the other would leave.

        Args:
            num_tokens: Tokens in this batch, flattened over batch and time.

        Returns:
            ``(token_index, slot)``: LongTensors ``[N]``; ``token_index`` indexes this batch's flattened tokens
            (ascending), ``slot`` the reservoir row each one overwrites (all distinct).
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if self._pending_layers:
            raise RuntimeError(
                f"KVReservoir.plan called before put() for layers {sorted(self._pending_layers)} of the previous plan"
            )
        index = torch.arange(num_tokens, dtype=torch.long)
        global_index = index + self._seen
        # float64 keeps floor(u * (n + 1)) exact-enough for n far beyond any realistic token count.
        draw = torch.rand(num_tokens, generator=self._generator, dtype=torch.float64)
        slot = torch.floor(draw * (global_index + 1).to(torch.float64)).to(torch.long)
        slot = torch.minimum(slot, global_index)  # rounding of u * (n + 1) must not reach n + 1
        filling = global_index < self.capacity
        slot = torch.where(filling, global_index, slot)
        keep = slot < self.capacity
        token_index, slot = index[keep], slot[keep]
        if token_index.numel():
            # The latest token per slot wins; amax is deterministic where scatter_ with duplicates is not.
            last = torch.full((self.capacity,), -1, dtype=torch.long)
            last.scatter_reduce_(0, slot, token_index, reduce="amax")
            latest = last[slot] == token_index
            token_index, slot = token_index[latest], slot[latest]
            self._pending_layers = set(range(self.num_layers))
        self._seen += num_tokens
        return token_index, slot

    def put(
        self,
        layer: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        token_index: torch.Tensor,
        slot: torch.Tensor,
    ) -> None:
        """Store this batch's kept rows for one layer.

        Args:
            layer: Layer index in ``[0, num_layers)``.
            keys: All tokens of the batch for this layer, ``[num_tokens, H, D]`` (any device and float dtype).
            values: Same shape as ``keys``.
            token_index: From :meth:`plan`, ``[N]``.
            slot: From :meth:`plan`, ``[N]``.

        Raises:
            CaptureError: The kept rows contain NaN or inf.
        """
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers})")
        expected = (self.num_kv_heads, self.head_dim)
        if keys.dim() != 3 or tuple(keys.shape[1:]) != expected or keys.shape != values.shape:
            raise ValueError(
                f"expected keys and values of shape [num_tokens, {expected[0]}, {expected[1]}], "
                f"got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        if token_index.numel() == 0:
            self._pending_layers.discard(layer)
            return
        if self._keys is None or self._values is None:
            shape = (self.capacity, self.num_layers, self.num_kv_heads, self.head_dim)
            self._keys = torch.empty(shape, dtype=torch.float32)
            self._values = torch.empty(shape, dtype=torch.float32)
        # Gather on the capture device first so only the kept rows cross to host memory.
        picked = token_index.to(keys.device)
        kept_keys = keys.index_select(0, picked).to("cpu", torch.float32)
        kept_values = values.index_select(0, picked).to("cpu", torch.float32)
        if not (torch.isfinite(kept_keys).all() and torch.isfinite(kept_values).all()):
            raise CaptureError(
                f"captured K/V of layer {layer} contain NaN or inf; load the model in bfloat16 or float32 instead "
                "of float16 and capture again"
            )
        self._keys[slot, layer] = kept_keys
        self._values[slot, layer] = kept_values
        self._pending_layers.discard(layer)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept rows.

        Returns:
            ``(keys, values)``, each ``[n, L, H, D]`` float32 with ``n = min(num_seen, capacity)``. These are views
            of the reservoir's storage: clone them before putting more batches if they must stay unchanged.
        """
        if self._pending_layers:
            raise RuntimeError(f"KVReservoir.rows called before put() for layers {sorted(self._pending_layers)}")
        n = len(self)
        if self._keys is None or self._values is None:
            empty = torch.empty((0, self.num_layers, self.num_kv_heads, self.head_dim), dtype=torch.float32)
            return empty, empty.clone()
        return self._keys[:n], self._values[:n]

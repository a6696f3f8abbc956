"""The queries each KV head serves: pre-RoPE query moments measured with forward hooks on ``q_proj``."""

from __future__ import annotations

import torch
from torch import nn

from kvlight.geometry import KVGeometry
from kvlight.models import decoder_blocks


class QueryMoments:
    """Float64 sums of pre-RoPE query outer products per layer and KV head, ``[L, H, D, D]``, from ``q_proj`` hooks.

    The query heads that share a KV head are pooled: they all read its keys. :meth:`attach` hooks the model for
    the duration of a capture pass; :meth:`mean` gives ``E[q q^T]`` (the input of
    :func:`kvlight.compressors.weighting.score_weight`).
    """

    def __init__(self, geometry: KVGeometry) -> None:
        self.geometry = geometry
        shape = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, geometry.head_dim)
        self.sums = torch.zeros(shape, dtype=torch.float64)
        self.count = 0

    def attach(self, model: nn.Module) -> list:
        handles = []
        for layer, block in enumerate(decoder_blocks(model)):
            projection = getattr(getattr(block, "self_attn", None), "q_proj", None)
            if projection is None:
                raise ValueError(f"{type(model).__name__} has no self_attn.q_proj to measure queries on")
            handles.append(projection.register_forward_hook(self._hook(layer)))
        return handles

    def _hook(self, layer: int):
        heads, dim = self.geometry.num_kv_heads, self.geometry.head_dim

        def observe(module, args, output) -> None:
            q = output.detach().to(torch.float64).reshape(-1, heads, output.shape[-1] // (heads * dim), dim)
            self.sums[layer] += torch.einsum("nhgd,nhge->hde", q, q).cpu()
            if layer == 0:
                self.count += q.shape[0] * q.shape[2]

        return observe

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no queries were observed")
        return self.sums / self.count

"""The whole-model compressor: one :class:`LayerCodec` per layer for K and one for V.

Built from a :class:`CompressionConfig` alone (it carries the geometry), so the upstream design's
``KVSpliceCompressor(config)`` + ``load_state_dict(torch.load(...))`` works; ``save_pretrained``
writes safetensors plus a JSON naming the model geometry it was fitted to (kvlight.compressors.artefacts).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kvlight.compressors import artefacts
from kvlight.compressors.base import IdentityProjection, LayerCodec
from kvlight.compressors.card import CARD_NAME
from kvlight.compressors.registry import backend
from kvlight.compressors.statistics import RunningMoments, StepSearch, check_headroom, levels_of, step_offset
from kvlight.compressors.widths import EXACT
from kvlight.config import CompressionConfig
from kvlight.errors import CaptureError, ConfigError, GeometryMismatchError, KVLightError
from kvlight.files import atomic_write_text
from kvlight.geometry import KVGeometry

#: Captured rows that fit the static steps of width codecs (an even sample; more changes little).
STEP_ROWS = 4096
KINDS = ("k", "v")


class KVCompressor(nn.Module):
    """Per-layer, per-KV-head projections of keys and values, each head's backend chosen by its ``algo``.

    Args:
        config: the compression config; must carry ``num_layers``, ``num_kv_heads`` and ``d_head``
            (configs written by kvlight do) unless ``geometry`` is given.
        geometry: the model's KV geometry; recorded, and checked against the config.
        algo: force one backend for every enabled head (``--compressor``), else each head's ``algo``.
        options: settings per backend name, e.g. ``{"kvsplice": {"init": "random"}}`` (each backend's options
            dataclass, kvlight.compressors.registry); backends not named keep their defaults.
    """

    def __init__(
        self,
        config: CompressionConfig,
        geometry: KVGeometry | None = None,
        algo: str | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if algo is not None:
            config = config.with_algo(algo)
        if geometry is not None:
            config.validate(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
        if config.num_layers is None or config.num_kv_heads is None or config.d_head is None:
            raise ConfigError(
                "the compression config lacks global.num_layers/num_kv_heads/d_head: write it with "
                "'kvlight config uniform' or pass the model geometry"
            )
        self.config = config
        self.geometry = geometry
        self.num_layers, self.num_kv_heads, self.head_dim = config.num_layers, config.num_kv_heads, config.d_head
        self.options = {name: backend(name).make_options(value) for name, value in (options or {}).items()}
        self.layers = nn.ModuleList(
            nn.ModuleDict({kind: LayerCodec(self._projections(layer, kind)) for kind in KINDS})
            for layer in range(self.num_layers)
        )
        #: the model it was fitted to, as kvlight.compressors.provenance records it (None: not recorded).
        self.base_model: dict | None = None
        self._moments: dict[tuple[int, str], RunningMoments] | None = None
        self._steps: dict[tuple[int, str], StepSearch] | None = None

    def _projections(self, layer: int, kind: str) -> list[nn.Module]:
        """The projection of every KV head of one layer and kind, from the config's head specs."""
        projections = []
        for head in range(self.num_kv_heads):
            spec = self.config.head(layer, head, self.head_dim)
            rank = spec.rank_k if kind == "k" else spec.rank_v
            if not spec.enabled:
                projection = IdentityProjection(self.head_dim)
            else:
                entry = backend(spec.algo)
                options = self.options.get(spec.algo) or entry.make_options()
                projection = entry.projection(self.head_dim, rank, **vars(options))
            if self.config.uses_widths(kind):  # validated: every enabled head has widths; disabled ones are exact
                bits = spec.bits(kind) if spec.enabled else (EXACT,) * self.head_dim
                projection.set_widths(bits[: projection.rank])
            projections.append(projection)
        return projections

    def options_dict(self) -> dict[str, dict]:
        """The backend options as plain data (what ``save_pretrained`` records)."""
        return {name: dict(vars(options)) for name, options in self.options.items()}

    # ------------------------------------------------------------------ serving
    def codec(self, layer: int, kind: str) -> LayerCodec:
        return self.layers[layer][kind]

    def encode(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H, T, D] -> z [B, T, R]`` with ``R`` the layer's summed rank for this kind."""
        return self.codec(layer, kind).encode(x)

    def decode(self, layer: int, kind: str, z: torch.Tensor) -> torch.Tensor:
        """``z [B, T, R] -> x_hat [B, H, T, D]``."""
        return self.codec(layer, kind).decode(z)

    @property
    def rope_blocks(self) -> tuple[int, ...]:
        """Per layer, the RoPE block its keys are coded relative to (the config's ``key_rope_block``; 1: pre-RoPE)."""
        return self.config.rope_blocks(self.num_layers)

    def latent_dims(self) -> list[tuple[int, int]]:
        """``(R_k, R_v)`` per layer: numbers stored per token."""
        return [(self.codec(i, "k").latent_dim, self.codec(i, "v").latent_dim) for i in range(self.num_layers)]

    @property
    def trainable(self) -> bool:
        """True when some head has parameters to fit by gradient descent."""
        return any(p.requires_grad for p in self.parameters())

    def width_codecs(self) -> list[tuple[int, str]]:
        """``(layer, kind)`` of every codec that stores static mixed-width codes."""
        return [
            (layer, kind) for layer in range(self.num_layers) for kind in KINDS if self.codec(layer, kind).has_widths
        ]

    @property
    def has_widths(self) -> bool:
        return bool(self.width_codecs())

    # ------------------------------------------------------------------ calibration
    def begin_statistics(self, device: torch.device | str = "cpu") -> None:
        """Start a float64 statistics pass (mean and covariance per head, K and V)."""
        self._moments = {
            (layer, kind): RunningMoments(self.num_kv_heads, self.head_dim, device)
            for layer in range(self.num_layers)
            for kind in KINDS
        }

    def accumulate(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add captured rows ``keys/values [N, L, H, D]`` to the running statistics."""
        if self._moments is None:
            raise RuntimeError("call begin_statistics() first")
        for layer in range(self.num_layers):
            self._moments[(layer, "k")].add(keys[:, layer])
            self._moments[(layer, "v")].add(values[:, layer])

    def statistics_tensors(self) -> list[torch.Tensor]:
        """Every running sum, in a fixed order, for an all-reduce (sum) across processes."""
        if self._moments is None:
            return []
        return [t for key in sorted(self._moments) for t in self._moments[key].tensors()]

    def finalize_statistics(
        self, key_weights: torch.Tensor | None = None, value_weights: torch.Tensor | None = None
    ) -> None:
        """Fit PCA heads (and initialise KVSplice heads) from the statistics, then drop them.

        Args:
            key_weights: optional ``[L, H, D, D]`` score weights (kvlight.compressors.weighting.score_weight): key
                heads then start from the query-weighted closed form. Needs KVSplice key heads (separate encoder and
                decoder).
            value_weights: optional ``[L, H, D, D]`` output-projection weights (weighting.output_weight): value heads
                start from the output-weighted closed form. Needs KVSplice value heads.
        """
        if self._moments is None:
            raise RuntimeError("no statistics were accumulated")
        for (layer, kind), moments in self._moments.items():
            if moments.count.item() == 0:
                raise KVLightError("no captured rows reached the statistics pass; check the calibration data")
            mean, covariance = moments.mean_and_covariance()
            finite = torch.isfinite(mean).all(-1) & torch.isfinite(covariance).flatten(1).all(-1)  # [H]
            if not finite.all():
                head = int((~finite).nonzero()[0])
                raise CaptureError(
                    f"captured {kind.upper()} of layer {layer}, KV head {head} contains NaN or inf; the capture is "
                    "damaged or the model produces non-finite activations on this data (try float32 or other text)"
                )
            weights = key_weights if kind == "k" else value_weights
            for head, projection in enumerate(self.codec(layer, kind).heads):
                if weights is not None and projection.algo != "none":
                    if not backend(projection.algo).weighted_objectives:
                        raise ConfigError(
                            f"{'query' if kind == 'k' else 'output'}-weighted {'keys' if kind == 'k' else 'values'} "
                            f"need KVSplice heads or another backend with separate encoder and decoder (layer {layer}, "
                            f"head {head} is {projection.algo}): use --compressor kvsplice"
                        )
                    weight = weights[layer, head].to(covariance.device)  # weights are built on the CPU
                    projection.init_from_statistics(mean[head], covariance[head], score_weight=weight)
                else:
                    projection.init_from_statistics(mean[head], covariance[head])
        self._moments = None
        self.reset_steps()

    # ------------------------------------------------------------------ static steps of width codecs
    def reset_steps(self) -> None:
        """Gaussian-optimal steps for every width codec from its latents' centre and std (no data pass)."""
        with torch.no_grad():
            for key in self.width_codecs():
                codec = self.codec(*key)
                step, offset = step_offset(codec.latent_center().cpu(), codec.latent_std.cpu(), codec.widths)
                codec.set_steps(step, offset)

    def begin_step_calibration(self, device: torch.device | str = "cpu") -> None:
        """Start a pass that measures, per coded channel, the squared error of every step in ``STEP_MULTIPLIERS``."""
        self._steps = {key: StepSearch(self.codec(*key).widths, device) for key in self.width_codecs()}

    @torch.no_grad()
    def accumulate_steps(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add captured rows ``keys/values [N, L, H, D]`` to the step search (after :meth:`finalize_statistics`)."""
        if self._steps is None:
            raise RuntimeError("call begin_step_calibration() first")
        if keys.shape[0] == 0:
            return
        for (layer, kind), search in self._steps.items():
            codec = self.codec(layer, kind)
            rows = (keys if kind == "k" else values)[:, layer]
            z = codec.encode(rows.unsqueeze(2).transpose(0, 2).to(codec.latent_std.dtype))[0].float()  # [N, R]
            search.add(z, codec.latent_center().to(z.device), codec.latent_std.float().to(z.device))

    def step_tensors(self) -> list[torch.Tensor]:
        """The step-search sums, in a fixed order, for an all-reduce (sum) across processes."""
        return [] if self._steps is None else [self._steps[key].errors for key in sorted(self._steps)]

    def finalize_steps(self) -> None:
        """Give every coded channel the step of least measured squared error, then drop the sums."""
        if self._steps is None:
            raise RuntimeError("no step statistics were accumulated")
        with torch.no_grad():
            for key, search in self._steps.items():
                codec = self.codec(*key)
                multipliers = search.best_multipliers()
                step, offset = step_offset(
                    codec.latent_center().cpu(), codec.latent_std.cpu(), codec.widths, multipliers
                )
                codec.set_steps(step, offset)
        self._steps = None

    def widen_steps(self, headroom: float) -> None:
        """Widen the static step of every coded channel by ``headroom`` around its centre, the learned step
        corrections folded in first (they are then zero); exact and dropped channels stay as they are; the bytes do
        not change. 1 changes nothing.

        Why: the steps a fit picks (and trains) minimise the squared error of the latents, which trades clipping for
        rounding as if every value mattered alike; attention turns a clipped large key or value into a large error
        in its output, and text unlike the calibration text reaches further into the tails
        (``bench/results/step_headroom.md``; the default recipe takes 1.3, kvlight.calibration.recipes). ``kvlight
        calibrate --step-headroom`` applies it once, to the steps the fit ends with: a fit that trains its steps on
        the squared error would train a headroom given earlier away.

        Raises:
            ConfigError: ``headroom`` outside ``[1, MAX_STEP_HEADROOM]`` (kvlight.compressors.statistics).
        """
        check_headroom(headroom)
        if headroom == 1.0:
            return
        with torch.no_grad():
            for key in self.width_codecs():
                codec = self.codec(*key)
                step, offset = (t.detach() for t in codec.quantizer_steps())
                levels = levels_of(codec.widths).to(step)
                coded = levels > 0
                centre = offset + step * levels / 2
                wide = torch.where(coded, step * headroom, step)
                codec.set_steps(wide, torch.where(coded, centre - wide * levels / 2, offset))

    def calibrate_steps(self, batches: Iterable[dict[str, torch.Tensor]], max_rows: int = STEP_ROWS) -> None:
        """One pass over ``{'keys', 'values'}`` batches fitting the static steps of every width codec, on at most
        ``max_rows`` rows (an even sample of each batch, in proportion)."""
        batches = batches if isinstance(batches, (list, tuple)) else list(batches)
        total = sum(batch["keys"].shape[0] for batch in batches)
        self.begin_step_calibration(next(iter(self.buffers())).device)
        for batch in batches:
            keys, values = batch["keys"], batch["values"]
            if total > max_rows:
                count = max(1, round(keys.shape[0] * max_rows / total))
                index = torch.linspace(0, keys.shape[0] - 1, count).round().long()
                keys, values = keys[index], values[index]
            self.accumulate_steps(keys, values)
        self.finalize_steps()

    def fit_statistics(
        self,
        batches: Iterable[dict[str, torch.Tensor]],
        key_weights: torch.Tensor | None = None,
        value_weights: torch.Tensor | None = None,
    ) -> None:
        """One statistics pass over ``{'keys', 'values'}`` batches, then :meth:`finalize_statistics`; with width codecs a second
        pass fits their static steps (:meth:`calibrate_steps`), so ``batches`` must then be iterable twice."""
        batches = batches if isinstance(batches, (list, tuple)) else list(batches)
        self.begin_statistics()
        for batch in batches:
            self.accumulate(batch["keys"], batch["values"])
        self.finalize_statistics(key_weights, value_weights)
        if self.has_widths:
            self.calibrate_steps(batches)

    def reconstruction_loss(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        key_weights: torch.Tensor | None = None,
        value_weights: torch.Tensor | None = None,
        quantizers: Mapping[tuple[int, str], Any] | None = None,
    ) -> torch.Tensor:
        """The upstream design's loss ``mse(K_hat, K) + mse(V_hat, V)`` over every layer and head.

        Args:
            keys, values: ``[N, L, H, D]`` captured rows (keys as the config's ``key_rope_block`` codes them).
            key_weights: optional ``[L, H, D, D]`` score weights: the key term becomes ``E[e^T W e] / D`` with each
                ``W`` scaled to trace ``D`` (so ``W = I`` is the plain MSE), the error attention scores see.
            value_weights: optional ``[L, H, D, D]`` output-projection weights, the same way for the value term.
            quantizers: optional ``{(layer, kind): q}`` whose ``q.fake_quantize(z)`` is what storage makes of latents
                (kvlight.serving.widths.direction_quantizers): those codecs train through the rounding
                (straight-through gradient).
        """
        total = keys.new_zeros(())
        quantizers = quantizers or {}
        for layer in range(self.num_layers):
            for kind, rows in (("k", keys), ("v", values)):
                x = rows[:, layer].unsqueeze(2).transpose(0, 2)  # [1, H, N, D]: the cache layout, N as time
                codec = self.codec(layer, kind)
                if (layer, kind) in quantizers:  # static codes: train through the rounding (straight-through)
                    fake = quantizers[(layer, kind)].fake_quantize(codec.encode(x.float()), *codec.quantizer_steps())
                    error = codec.decode(fake) - x
                else:
                    error = codec.reconstruct(x) - x
                weights = key_weights if kind == "k" else value_weights
                if weights is not None:
                    weight = weights[layer].to(error)
                    weight = weight * (weight.shape[-1] / weight.diagonal(dim1=-2, dim2=-1).sum(-1))[:, None, None]
                    total = total + torch.einsum("bhnd,hde,bhne->", error, weight, error) / error.numel()
                else:
                    total = total + torch.mean(error**2)
        return total / self.num_layers

    # ------------------------------------------------------------------ artefacts
    def describe(self) -> dict:
        """What ``save_pretrained`` writes beside the weights."""
        described = {
            "compression_config": self.config.to_dict(),
            "geometry": self.geometry.to_dict() if self.geometry else None,
            "options": self.options_dict(),
        }
        if self.base_model is not None:
            described["base_model"] = self.base_model
        return described

    def fingerprint(self) -> str:
        """sha256 (hex) of what this compressor computes with: its config, geometry, options and every tensor of its
        state (name, dtype, shape, bytes). Equal fingerprints mean a saved cache decodes identically."""
        described = {k: v for k, v in self.describe().items() if k != "base_model"}  # what it computes, not provenance
        digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.state_dict().items()):
            tensor = tensor.detach().contiguous().cpu()
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return digest.hexdigest()

    def save_pretrained(self, directory: str | os.PathLike, card: str | None = None) -> None:
        """Write ``compressor.safetensors`` and ``compressor_config.json`` (each atomically) to ``directory``, and
        ``card`` (a model card, :func:`kvlight.compressors.card.model_card`) as ``README.md`` when given."""
        artefacts.write_files(Path(directory), self.state_dict(), self.describe())
        if card is not None:
            atomic_write_text(Path(directory) / CARD_NAME, card)

    def check_geometry(self, geometry: KVGeometry, model_name: str | None = None) -> None:
        """Refuse a model whose KV geometry differs from the one this compressor was built for; the message names the
        model it was fitted to (its recorded base model, else its model type) and ``model_name`` (the model given)."""
        mine = (self.num_layers, self.num_kv_heads, self.head_dim)
        theirs = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
        fitted_rope = self.geometry.rope if self.geometry else geometry.rope
        if mine == theirs and fitted_rope == geometry.rope:
            return
        fitted = self.fitted_name() or "another model"
        given = model_name or geometry.model_type
        raise GeometryMismatchError(
            f"this compressor was fitted to {fitted} ({mine[0]} layers x {mine[1]} KV heads x head_dim {mine[2]}"
            f"{', RoPE' if fitted_rope else ''}), but the model given, {given}, has {theirs[0]} x {theirs[1]} x "
            f"{theirs[2]}{', RoPE' if geometry.rope else ''}; serve it on {fitted if fitted != given else 'that model'}"
            f", or calibrate a compressor for this model{f' (kvlight calibrate --model {model_name})' if model_name else ''}"
        )

    def fitted_name(self) -> str | None:
        """The model this compressor was fitted to: the recorded base model's name, else the fitted model type."""
        name = (self.base_model or {}).get("name")
        if name:
            return str(name)
        return self.geometry.model_type if self.geometry is not None else None

    # ------------------------------------------------------------------ sharing, like an adapter
    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        *,
        geometry: KVGeometry | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
    ) -> KVCompressor:
        """Load a compressor from the directory :meth:`save_pretrained` wrote (offline) or from a Hugging Face Hub
        repository that :meth:`push_to_hub` filled (downloaded with ``huggingface_hub.snapshot_download``).

        Args:
            path_or_repo_id: a local directory, else a hub repo id such as ``"user/smollm2-kv-0.24"``.
            geometry: the model's KV geometry (:func:`kvlight.geometry.kv_geometry`); a different one is refused
                with :class:`~kvlight.errors.GeometryMismatchError`. The geometry the compressor was fitted to is
                read from its own JSON either way.
            revision, token, cache_dir, local_files_only: passed to ``snapshot_download`` for a hub id.

        Raises:
            HubError: the id is neither a directory nor a repo id, or the hub cannot be reached or has no such repo.
        """
        from kvlight.compressors.hub import resolve

        directory = resolve(
            path_or_repo_id, revision=revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only
        )
        return load_compressor(directory, geometry)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        card: str | None = None,
    ) -> str:
        """Upload this compressor (what :meth:`save_pretrained` writes, and a ``README.md`` model card) to the hub
        repository ``repo_id``, created if missing; returns the repository's URL.

        ``card`` is the model card's text (:func:`kvlight.compressors.card.model_card` writes one from calibration
        results); without it a card is written from what the compressor records.
        """
        import tempfile

        from kvlight.compressors.card import model_card
        from kvlight.compressors.hub import push_directory

        with tempfile.TemporaryDirectory(prefix="kvlight-push-") as staging:
            self.save_pretrained(staging, card=card if card is not None else model_card(None, self, None, repo_id))
            return push_directory(staging, repo_id, private=private, token=token, commit_message=commit_message)


class PCACompressor(KVCompressor):
    """Every enabled head uses PCA (the upstream design's class name)."""

    def __init__(self, config: CompressionConfig, geometry: KVGeometry | None = None) -> None:
        super().__init__(config, geometry, algo="pca")


class KVSpliceCompressor(KVCompressor):
    """Every enabled head uses learned KVSplice projections (the upstream design's class name and arguments)."""

    def __init__(
        self,
        config: CompressionConfig,
        geometry: KVGeometry | None = None,
        latent_affine: bool = True,
        init: str = "pca",
    ) -> None:
        options = {"kvsplice": {"latent_affine": latent_affine, "init": init}}
        super().__init__(config, geometry, algo="kvsplice", options=options)


def load_compressor(directory: str | os.PathLike, geometry: KVGeometry | None = None) -> KVCompressor:
    """Load what :meth:`KVCompressor.save_pretrained` wrote; with ``geometry``, refuse a different model."""
    directory = Path(directory)
    config, fitted, options = artefacts.read_description(directory)
    try:
        compressor = KVCompressor(config, fitted, options=options)
    except ConfigError as exc:
        where = directory / artefacts.CONFIG_NAME
        raise KVLightError(f"{where}: its compression config does not fit its geometry: {exc}") from None
    compressor.base_model = artefacts.read_base_model(directory)  # first: a geometry refusal names it
    if geometry is not None:
        compressor.check_geometry(geometry)
    state = artefacts.read_weights(directory)
    try:
        compressor.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise KVLightError(
            f"{directory / artefacts.WEIGHTS_NAME} does not match its config: {' '.join(first[:2])[:300]}"
        ) from None
    return compressor

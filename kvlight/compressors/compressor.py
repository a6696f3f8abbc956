"""The whole-model compressor: one :class:`LayerCodec` per layer for K and one for V.

Built from a :class:`CompressionConfig` alone (it carries the geometry), so the seed's
``KVSpliceCompressor(config)`` + ``load_state_dict(torch.load(...))`` works; ``save_pretrained``
writes safetensors plus a JSON naming the model geometry it was fitted to.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from kvlight.compressors.base import IdentityProjection, LayerCodec, RunningMoments
from kvlight.config import CompressionConfig, atomic_write_text
from kvlight.errors import CaptureError, ConfigError, GeometryMismatchError, KVLightError
from kvlight.models import KVGeometry
from kvlight.widths import EXACT, STEP_MULTIPLIERS, grid_errors, step_offset

#: Captured rows that fit the static steps of width codecs (an even sample; more changes little).
STEP_ROWS = 4096
WEIGHTS_NAME = "compressor.safetensors"
CONFIG_NAME = "compressor_config.json"
KINDS = ("k", "v")


class KVCompressor(nn.Module):
    """Per-layer, per-KV-head projections of keys and values, each head's backend chosen by its ``algo``.

    Args:
        config: the compression config; must carry ``num_layers``, ``num_kv_heads`` and ``d_head``
            (configs written by kvlight do) unless ``geometry`` is given.
        geometry: the model's KV geometry; recorded, and checked against the config.
        algo: force one backend for every enabled head (``--compressor``), else each head's ``algo``.
        latent_affine: KVSplice's learned latent scale and shift.
        init: KVSplice initialisation, ``"pca"`` or ``"random"``.
    """

    def __init__(
        self,
        config: CompressionConfig,
        geometry: KVGeometry | None = None,
        algo: str | None = None,
        latent_affine: bool = True,
        init: str = "pca",
    ) -> None:
        super().__init__()
        from kvlight.compressors import PROJECTIONS

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
        self.latent_affine, self.init = latent_affine, init
        layers = []
        for layer in range(self.num_layers):
            codecs = {}
            for kind in KINDS:
                projections = []
                for head in range(self.num_kv_heads):
                    spec = config.head(layer, head, self.head_dim)
                    rank = spec.rank_k if kind == "k" else spec.rank_v
                    if not spec.enabled:
                        projection = IdentityProjection(self.head_dim)
                    elif spec.algo == "kvsplice":
                        projection = PROJECTIONS["kvsplice"](self.head_dim, rank, latent_affine, init)
                    else:
                        projection = PROJECTIONS[spec.algo](self.head_dim, rank)
                    if config.uses_widths(kind):  # validated: every enabled head has widths; disabled ones are exact
                        bits = spec.bits(kind) if spec.enabled else (EXACT,) * self.head_dim
                        projection.set_widths(bits[: projection.rank])
                    projections.append(projection)
                codecs[kind] = LayerCodec(projections)
            layers.append(nn.ModuleDict(codecs))
        self.layers = nn.ModuleList(layers)
        self._moments: dict[tuple[int, str], RunningMoments] | None = None
        self._step_errors: dict[tuple[int, str], torch.Tensor] | None = None

    # ------------------------------------------------------------------ serving
    def codec(self, layer: int, kind: str) -> LayerCodec:
        return self.layers[layer][kind]

    def encode(self, layer: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        """``x [B, H, T, D] -> z [B, T, R]`` with ``R`` the layer's summed rank for this kind."""
        return self.codec(layer, kind).encode(x)

    def decode(self, layer: int, kind: str, z: torch.Tensor) -> torch.Tensor:
        """``z [B, T, R] -> x_hat [B, H, T, D]``."""
        return self.codec(layer, kind).decode(z)

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

    def direction_quantizers(self, exact_dtype: torch.dtype = torch.float16) -> dict:
        """``{(layer, kind): DirectionQuantizer}`` of the width codecs (a snapshot of their current steps)."""
        return {key: self.codec(*key).direction_quantizer(exact_dtype) for key in self.width_codecs()}

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
                    if projection.algo != "kvsplice":
                        raise ConfigError(
                            f"{'query' if kind == 'k' else 'output'}-weighted {'keys' if kind == 'k' else 'values'} "
                            f"need KVSplice heads (layer {layer}, head {head} is {projection.algo}): "
                            "use --compressor kvsplice"
                        )
                    projection.init_from_statistics(mean[head], covariance[head], score_weight=weights[layer, head])
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
        self._step_errors = {
            key: torch.zeros(self.codec(*key).latent_dim, len(STEP_MULTIPLIERS), dtype=torch.float64, device=device)
            for key in self.width_codecs()
        }

    @torch.no_grad()
    def accumulate_steps(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add captured rows ``keys/values [N, L, H, D]`` to the step search (after :meth:`finalize_statistics`)."""
        if self._step_errors is None:
            raise RuntimeError("call begin_step_calibration() first")
        if keys.shape[0] == 0:
            return
        for (layer, kind), errors in self._step_errors.items():
            codec = self.codec(layer, kind)
            rows = (keys if kind == "k" else values)[:, layer]
            z = codec.encode(rows.unsqueeze(2).transpose(0, 2).to(codec.latent_std.dtype))[0].float()  # [N, R]
            widths = codec.widths.to(z.device)
            center, sigma = codec.latent_center().to(z.device), codec.latent_std.float().to(z.device)
            for width in widths.unique().tolist():
                if 0 < width < EXACT:
                    index = (widths == width).nonzero().squeeze(1)
                    errors[index] += grid_errors(z[:, index], center[index], sigma[index], width).to(errors.device)

    def step_tensors(self) -> list[torch.Tensor]:
        """The step-search sums, in a fixed order, for an all-reduce (sum) across processes."""
        return [] if self._step_errors is None else [self._step_errors[key] for key in sorted(self._step_errors)]

    def finalize_steps(self) -> None:
        """Give every coded channel the step of least measured squared error, then drop the sums."""
        if self._step_errors is None:
            raise RuntimeError("no step statistics were accumulated")
        multipliers = torch.tensor(STEP_MULTIPLIERS, dtype=torch.float64)
        with torch.no_grad():
            for key, errors in self._step_errors.items():
                codec = self.codec(*key)
                errors = errors.cpu()
                best = multipliers[errors.argmin(-1)]
                best[errors.sum(-1) == 0] = 1.0  # no rows (or not coded): keep the Gaussian step
                step, offset = step_offset(codec.latent_center().cpu(), codec.latent_std.cpu(), codec.widths, best)
                codec.set_steps(step, offset)
        self._step_errors = None

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
    ) -> torch.Tensor:
        """The seed's loss ``mse(K_hat, K) + mse(V_hat, V)`` over every layer and head (width codecs: through their
        static codes, rounded in the forward with a straight-through gradient).

        Args:
            keys, values: ``[N, L, H, D]`` captured rows (keys pre-RoPE for RoPE models).
            key_weights: optional ``[L, H, D, D]`` score weights: the key term becomes ``E[e^T W e] / D`` with each
                ``W`` scaled to trace ``D`` (so ``W = I`` is the plain MSE), the error attention scores see.
            value_weights: optional ``[L, H, D, D]`` output-projection weights, the same way for the value term.
        """
        total = keys.new_zeros(())
        quantizers = self.direction_quantizers(keys.dtype)
        for layer in range(self.num_layers):
            for kind, rows in (("k", keys), ("v", values)):
                x = rows[:, layer].unsqueeze(2).transpose(0, 2)  # [1, H, N, D]: the cache layout, N as time
                codec = self.codec(layer, kind)
                if (layer, kind) in quantizers:  # static codes: train through the rounding (straight-through)
                    error = codec.decode(quantizers[(layer, kind)].fake_quantize(codec.encode(x.float()))) - x
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
        return {
            "compression_config": self.config.to_dict(),
            "geometry": self.geometry.to_dict() if self.geometry else None,
            "latent_affine": self.latent_affine,
            "init": self.init,
            "format": "kvlight-compressor/1",
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``compressor.safetensors`` and ``compressor_config.json`` (atomically) to ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{WEIGHTS_NAME}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(state, tmp, metadata={"format": "pt"})
            os.replace(tmp, directory / WEIGHTS_NAME)
        finally:
            Path(tmp).unlink(missing_ok=True)
        atomic_write_text(directory / CONFIG_NAME, json.dumps(self.describe(), indent=2) + "\n")

    def check_geometry(self, geometry: KVGeometry) -> None:
        """Refuse a model whose KV geometry differs from the one this compressor was built for."""
        mine = (self.num_layers, self.num_kv_heads, self.head_dim)
        theirs = (geometry.num_layers, geometry.num_kv_heads, geometry.head_dim)
        fitted_rope = self.geometry.rope if self.geometry else geometry.rope
        if mine != theirs or fitted_rope != geometry.rope:
            raise GeometryMismatchError(
                f"compressor was fitted to {mine[0]} layers x {mine[1]} KV heads x head_dim {mine[2]}"
                f"{' (RoPE)' if fitted_rope else ''}, but the model has {theirs[0]} x {theirs[1]} x {theirs[2]}"
                f"{' (RoPE)' if geometry.rope else ''}; calibrate a compressor for this model"
            )


class PCACompressor(KVCompressor):
    """Every enabled head uses PCA."""

    def __init__(self, config: CompressionConfig, geometry: KVGeometry | None = None) -> None:
        super().__init__(config, geometry, algo="pca")


class KVSpliceCompressor(KVCompressor):
    """Every enabled head uses learned KVSplice projections."""

    def __init__(
        self,
        config: CompressionConfig,
        geometry: KVGeometry | None = None,
        latent_affine: bool = True,
        init: str = "pca",
    ) -> None:
        super().__init__(config, geometry, algo="kvsplice", latent_affine=latent_affine, init=init)


def load_compressor(directory: str | os.PathLike, geometry: KVGeometry | None = None) -> KVCompressor:
    """Load what :meth:`KVCompressor.save_pretrained` wrote; with ``geometry``, refuse a different model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        described = json.loads((directory / CONFIG_NAME).read_text())
    except OSError as exc:
        raise KVLightError(
            f"cannot read {directory / CONFIG_NAME}: {exc.strerror or exc}; is this a compressor directory?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise KVLightError(f"{directory / CONFIG_NAME} is not valid JSON: {exc}") from None
    except RecursionError:
        raise KVLightError(f"{directory / CONFIG_NAME} is nested too deeply to be a compressor description") from None
    if not isinstance(described, dict) or described.get("format") != "kvlight-compressor/1":
        raise KVLightError(f"{directory / CONFIG_NAME} is not a kvlight compressor description")
    config = CompressionConfig.from_dict(described.get("compression_config"))
    saved_geometry = described.get("geometry")
    fitted = _saved_geometry(saved_geometry, directory / CONFIG_NAME) if saved_geometry is not None else None
    latent_affine = described.get("latent_affine", True)
    if not isinstance(latent_affine, bool):
        raise KVLightError(f"{directory / CONFIG_NAME}: latent_affine must be true or false, got {latent_affine!r}")
    try:
        compressor = KVCompressor(
            config,
            fitted,
            latent_affine=latent_affine,
            init=described.get("init", "pca") if described.get("init") in ("pca", "random") else "pca",
        )
    except ConfigError as exc:
        raise KVLightError(
            f"{directory / CONFIG_NAME}: its compression config does not fit its geometry: {exc}"
        ) from None
    if geometry is not None:
        compressor.check_geometry(geometry)
    try:
        state = load_file(directory / WEIGHTS_NAME)
    except (OSError, SafetensorError) as exc:
        raise KVLightError(f"cannot read {directory / WEIGHTS_NAME}: {exc}") from None
    try:
        compressor.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise KVLightError(
            f"{directory / WEIGHTS_NAME} does not match its config: {' '.join(first[:2])[:300]}"
        ) from None
    for name, tensor in state.items():  # a damaged or hand-made file: NaN weights would poison every generation
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise KVLightError(f"{directory / WEIGHTS_NAME}: {name} holds NaN or inf; calibrate the compressor again")
    return compressor


def _saved_geometry(saved: object, where: Path) -> KVGeometry:
    """The geometry a compressor file names, checked field by field (a hand-edited file may hold anything)."""
    fields = {"num_layers": int, "num_kv_heads": int, "head_dim": int, "model_type": str, "rope": bool}
    if not isinstance(saved, dict) or set(fields) - set(saved):
        raise KVLightError(f"{where}: malformed geometry (needs {', '.join(fields)})")
    for name, kind in fields.items():
        value = saved[name]
        wrong_type = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
        if wrong_type or (kind is int and value < 1):
            raise KVLightError(f"{where}: malformed geometry: {name} = {value!r}")
    return KVGeometry.from_dict(saved)

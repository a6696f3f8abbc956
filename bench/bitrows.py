"""The bits-per-direction rows that bench/frontier.py and bench/retrieval.py share, fitted once and kept on disk.

A row is a byte budget (a fraction of an fp16 cache at the 512-token protocol: the frontier's windows), a
weighting (uniform widths, MSE-allocated, Fisher-allocated: kvlight.bit_allocation; or Fisher-allocated in the
Fisher-whitened basis, KVSplice heads fitted with each head's Fisher: kvlight.analysis.whitening) and whether the
projections were then KL-distilled through the static codes (kvlight.distill; KVSplice heads from that start, the learned
latent scale and shift acting as learned steps). Every row keeps 4 sink tokens and a recent window exact; their
bytes count, so the widths get what is left of the budget at 512 tokens (at 2048 the same compressor stores less).

Fitting a row needs the sensitivity metrics of the calibration windows (one pass, cached) and, for distilled rows,
minutes of Adam steps, so compressors are saved under ``$KVLIGHT_CACHE/bench/bits/`` keyed by everything that
determines them, and loaded back by the next benchmark.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import captured_rows, offline_windows
from kvlight.analysis.bit_allocation import WHITENED, allocate_bits, fp16_bytes_per_token
from kvlight.analysis.metrics_io import metrics_to_json, read_metrics_file
from kvlight.analysis.sensitivity import measure_sensitivity
from kvlight.analysis.whitening import fisher_weights
from kvlight.calibration.distill import distill
from kvlight.compressors.compressor import KVCompressor, load_compressor

#: byte budgets, as fractions of an fp16 DynamicCache at the protocol length (issue 11's rows).
BUDGETS = (0.25, 0.1875, 0.125, 0.09375, 0.0625)
WEIGHTINGS = ("uniform", "mse", "fisher", "fisher-joint", "fisher-white")
PROTOCOL_LENGTH = 512
SINKS = 4
#: exact recent tokens per budget: at 512 tokens each costs 1/512 of the fp16 bytes, a large share of a small budget.
#: Measured (Fisher widths, 512 tokens): at 25 % of fp16 bytes +2.25 / +1.69 / +1.58 / +1.50 % with 16 / 8 / 4 / 0
#: recent tokens, at 12.5 % +39.3 / +29.7 / +25.4 / +21.6 %: the bits are worth more than the window at every budget.
RECENT = dict.fromkeys(BUDGETS, 0)
#: the RoPE blocks keys are coded relative to (kvlight.config's key_rope_block): 1 pre-RoPE, 16 scored in latent space.
ROPE_BLOCKS = (1, 16)
#: distillation of the distilled rows: steps x windows of 512, peak learning rate (warm-up + cosine). 48 steps, not the
#: rank rows' 96: on a 2-core AVX2 CPU in float32 a step takes ~17 s.
DISTILL_STEPS, DISTILL_BATCH, DISTILL_LR = 48, 2, 3e-4
#: tokens per distillation window by default; longer windows train ``DISTILL_BATCH * 512 // length`` to a step, at
#: least one (so from 1024 tokens on a step is one window, and a step of 2048 or 4096 holds 2 or 4 times the tokens).
DISTILL_LENGTH = 512
#: the calibration windows of 512 every row is fitted (and by default distilled) on.
CALIBRATION_WINDOWS = 16
#: the distilled rows: every weighting at every budget (issue 11's grid, plus the joint-Fisher variant).
DISTILLED = [(budget, weighting) for budget in BUDGETS for weighting in WEIGHTINGS]
NAMES = {
    "uniform": "uniform widths",
    "mse": "MSE-allocated widths",
    "fisher": "Fisher-allocated widths",
    "fisher-joint": "joint-Fisher-allocated widths",
    "fisher-white": "Fisher-whitened basis, Fisher-allocated widths",
}
#: bumped whenever what the sensitivity pass measures changes, so cached metrics and rows are measured again.
METRICS_VERSION = 2
#: bumped whenever how a row's compressor is fitted changes (3: static steps fitted on the rows, not the Gaussian rule;
#: 4: distillation learns the steps too).
ROW_VERSION = 4


@dataclass(frozen=True)
class BitRow:
    budget: float
    weighting: str
    distilled: bool = False
    #: the compressor's key_rope_block: 1 codes keys before RoPE; 16 relative to the RoPE of blocks of 16 tokens
    #: (decode scores them in latent space).
    rope_block: int = 1

    @property
    def recent(self) -> int:
        return RECENT[self.budget]

    def label(self, plan: Distillation | None = None) -> tuple[str, str]:
        """(method, setting) columns of the row (distilled as ``plan`` says; None: the default plan)."""
        method = f"kvlight {NAMES[self.weighting]}" + (" + KL-distilled" if self.distilled else "")
        method += f", keys in RoPE blocks of {self.rope_block}" if self.rope_block != 1 else ""
        setting = f"budget {100 * self.budget:g} % at 512, sinks {SINKS}, recent {self.recent}"
        if self.distilled:
            setting += ", " + (plan or Distillation()).setting()
        return method, setting


@dataclass(frozen=True)
class Distillation:
    """How the distilled widths rows train: Adam ``steps`` over ``windows`` windows of ``length`` tokens at peak
    learning rate ``lr`` (warm-up + cosine). Each step takes :attr:`batch` windows."""

    steps: int = DISTILL_STEPS
    windows: int = CALIBRATION_WINDOWS
    length: int = DISTILL_LENGTH
    lr: float = DISTILL_LR

    @property
    def batch(self) -> int:
        """Windows per step: ``DISTILL_BATCH`` windows of 512's tokens, at least one."""
        return max(1, DISTILL_BATCH * DISTILL_LENGTH // self.length)

    @property
    def own_windows(self) -> bool:
        """Whether it trains on windows of its own, not the calibration windows."""
        return self.windows != CALIBRATION_WINDOWS or self.length != DISTILL_LENGTH

    def setting(self) -> str:
        text = f"{self.steps} steps x {self.batch} windows of {self.length}"
        if self.own_windows:
            text += f" from {self.windows}"
        if self.lr != DISTILL_LR:
            text += f", lr {self.lr:g}"
        # Since ROW_VERSION 4 the static steps train with the projections (rows without this ran with them fixed).
        return text + ", steps learned"

    @classmethod
    def from_args(cls, args: argparse.Namespace, prefix: str = "") -> Distillation:
        """The plan of the options :func:`add_distill_options` added with ``prefix``."""
        name = prefix.replace("-", "_") + "distill_"
        return cls(*(getattr(args, name + field) for field in ("steps", "windows", "length", "lr")))


def all_rows(distilled: bool = True) -> list[BitRow]:
    """Every row: each budget and weighting, training-free and distilled, keys coded before and after RoPE."""
    rows = [BitRow(b, w, rope_block=k) for k in ROPE_BLOCKS for b in BUDGETS for w in WEIGHTINGS]
    return rows + ([BitRow(b, w, True, k) for k in ROPE_BLOCKS for b, w in DISTILLED] if distilled else [])


def row_id(row: BitRow) -> str:
    """The id of a widths row on the command line: ``fisher-0.125``, ``uniform-kl-0.25``, ``fisher-joint-b16-0.25``."""
    block = f"-b{row.rope_block}" if row.rope_block != 1 else ""
    return f"{row.weighting}{'-kl' if row.distilled else ''}{block}-{row.budget:g}"


class FitInputs:
    """What the rows of one model and calibration text are fitted from, per RoPE block of the keys (1: pre-RoPE),
    measured on first use: the captured K/V rows and the sensitivity metrics (cached on disk)."""

    def __init__(self, model, geometry, calibration: torch.Tensor, pre_rows: dict | None = None) -> None:
        self.model, self.geometry, self.calibration = model, geometry, calibration
        self._rows = {} if pre_rows is None else {1: pre_rows}
        self._metrics: dict = {}

    def rows(self, block: int) -> dict:
        if block not in self._rows:
            blocks = (block,) * self.geometry.num_layers
            self._rows[block] = captured_rows(self.model, self.geometry, self.calibration, rope_blocks=blocks)
        return self._rows[block]

    def metrics(self, block: int):
        if block not in self._metrics:
            self._metrics[block] = sensitivity(self.model, self.geometry, self.calibration, block)
        return self._metrics[block]


def long_context_target(row: BitRow, geometry) -> float:
    """The allocator's target (1 - width bits / 16 at long context) that makes the cache hold ``row.budget`` of an
    fp16 cache's bytes at the protocol length: exact tokens at 2 bytes per number, int32 positions per token."""
    exact = (SINKS + row.recent) / PROTOCOL_LENGTH
    positions = 4 / fp16_bytes_per_token(geometry)
    widths_fraction = (row.budget - exact - positions) / (1 - exact)
    return 1.0 - widths_fraction


def cache_root() -> Path:
    root = Path(os.environ.get("KVLIGHT_CACHE", Path.home() / ".cache" / "kvlight")) / "bench" / "bits"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _model_id(model) -> tuple[str, ...]:
    """Key parts naming the model: none for the embedded default (its cached rows keep their keys), else its type and
    size."""
    config = model.config
    if getattr(config, "model_type", None) == "llama" and getattr(config, "num_hidden_layers", None) == 30:
        return ()
    return (f"{config.model_type}-{config.num_hidden_layers}x{getattr(config, 'hidden_size', '?')}",)


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sensitivity(model, geometry, calibration: torch.Tensor, block: int = 1):
    """The sensitivity metrics of the calibration windows (4 sinks left out, keys before or after RoPE as
    relative to RoPE blocks of ``block`` tokens, 1: pre-RoPE), measured once and cached."""
    dtype = str(next(model.parameters()).dtype)  # a bf16 model's Fisher is not a float32 model's
    post = ("rope-block", block) if block != 1 else ()  # pre-RoPE metrics keep their cache keys
    key = _key(calibration.sum().item(), calibration.shape, SINKS, METRICS_VERSION, dtype, *_model_id(model), *post)
    path = cache_root() / f"metrics-{key}.json"
    if path.exists():
        metrics = read_metrics_file(path, geometry)
        # Metrics cached before the whitened basis existed lack its curves; the rest of the pass is unchanged, so the
        # rows fitted from them stay valid and only the metrics are measured again.
        if "fgram_k" in metrics.curves:
            return metrics
    start = time.perf_counter()
    blocks = (block,) * geometry.num_layers
    metrics = measure_sensitivity(model, geometry, calibration, 2, 256, SINKS, 0, progress=False, rope_blocks=blocks)
    print(f"sensitivity analysis (keys in RoPE blocks of {block}) {time.perf_counter() - start:.0f}s", flush=True)
    path.write_text(metrics_to_json(metrics))
    return metrics


def positive_float(text: str) -> float:
    """argparse type of a learning rate: bad values exit 2 with argparse's one-line error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type of a step or window count: bad values exit 2 with argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_distill_options(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--{prefix}distill-steps``, ``-windows``, ``-length`` and ``-lr``: how the distilled widths rows train
    (:class:`Distillation`; a new plan is a new row, from its own disk-cache entry)."""
    parser.add_argument(
        f"--{prefix}distill-steps",
        type=positive_int,
        default=DISTILL_STEPS,
        help=f"KL steps of the distilled widths rows (default {DISTILL_STEPS})",
    )
    parser.add_argument(
        f"--{prefix}distill-windows",
        type=positive_int,
        default=CALIBRATION_WINDOWS,
        help=f"windows the distilled widths rows train on (default the {CALIBRATION_WINDOWS} calibration "
        "windows; more: those and the ones after them)",
    )
    parser.add_argument(
        f"--{prefix}distill-length",
        type=positive_int,
        default=DISTILL_LENGTH,
        help=f"tokens per distillation window (default {DISTILL_LENGTH}; longer windows start where the calibration "
        "text does and teach the codes to survive attention over longer contexts)",
    )
    parser.add_argument(
        f"--{prefix}distill-lr",
        type=positive_float,
        default=DISTILL_LR,
        help=f"peak learning rate of the distilled widths rows (default {DISTILL_LR:g})",
    )


def distillation_windows(tokenizer, skip: int, plan: Distillation, option: str) -> torch.Tensor | None:
    """The ``plan.windows`` windows of ``plan.length`` tokens from the ``skip``-th window of 512 on (the calibration
    text first) that widths rows distil on, or None for the calibration windows themselves (the default, which keeps
    the rows' cache keys). A corpus too short exits 2 with one line naming ``option``, before anything is fitted or
    written."""
    if not plan.own_windows:
        return None
    # The evaluation text ends at token skip * 512; a longer window starts at the first of its length after it.
    count, length = plan.windows, plan.length
    windows = offline_windows(tokenizer, length, skip=-(-skip * DISTILL_LENGTH // length), count=count)
    if windows.shape[0] < count:
        print(
            f"error: {option} {count}: the corpus holds only {windows.shape[0]} windows of {length} tokens after the "
            "evaluation text; ask for fewer or shorter ones",
            file=sys.stderr,
        )
        raise SystemExit(2)  # bad input, as argparse exits
    return windows


def compressor_for(
    row: BitRow,
    model,
    geometry,
    calibration,
    rows,
    metrics,
    tracker,
    plan: Distillation | None = None,
    distill_windows: torch.Tensor | None = None,
) -> KVCompressor:
    """The fitted (and, for distilled rows, distilled) compressor of ``row``, from the disk cache when it is there.

    Fitted on ``calibration``; distilled on ``distill_windows [N, T]`` (None: the calibration windows). 144 steps on
    the 16 calibration windows overfit them (fisher-white at 12.5 %: KL 0.053 -> 0.033 on them, perplexity +6.26 ->
    +6.17 %); the same steps on 64 windows gave +3.45 %: longer distillations need more windows (+2.33 % with the
    steps learned too, ROW_VERSION 4).
    """
    plan = plan or Distillation()
    distill_on = calibration if distill_windows is None else distill_windows
    key = _key(
        row,
        plan.steps if row.distilled else 0,
        calibration.sum().item(),
        calibration.shape,
        plan.lr,
        METRICS_VERSION,
        ROW_VERSION,
        str(next(model.parameters()).dtype),  # fitted and distilled through a model of this dtype
        *_model_id(model),
        # 2: the whitened Fisher scaled to trace D (distillation diverged on the raw scale).
        *(("whitened", 2) if row.weighting in WHITENED else ()),
        # other distillation windows: their own entry (the default's key is unchanged, so its cache stays valid)
        *((distill_on.sum().item(), tuple(distill_on.shape)) if row.distilled and distill_windows is not None else ()),
    )
    directory = cache_root() / f"row-{key}"
    dtype = next(model.parameters()).dtype
    if (directory / "compressor_config.json").exists():
        return load_compressor(directory, geometry).to(dtype)
    allocation = allocate_bits(metrics, long_context_target(row, geometry), row.weighting)
    whitened = row.weighting in WHITENED  # its widths index latents only KVSplice heads fitted with the Fisher serve
    algo = "kvsplice" if row.distilled or whitened else "pca"
    config = allocation.to_config(algo, SINKS, row.recent)
    compressor = KVCompressor(config, geometry)
    compressor.fit_statistics([rows], *(fisher_weights(metrics) if whitened else ()))
    if row.distilled:
        start = time.perf_counter()
        losses = distill(model, compressor, distill_on, tracker, plan.steps, plan.lr, plan.batch)
        print(
            f"distilled {row} in {time.perf_counter() - start:.0f}s: KL {losses[0]:.4f} -> {losses[-1]:.4f}", flush=True
        )
    compressor.save_pretrained(directory)
    return compressor.to(dtype)

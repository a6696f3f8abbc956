"""Budget recipes: what ``kvlight calibrate --kv-budget B`` runs when no other flag says otherwise.

The frontier (``bench/results/frontier.md``) and the retrieval benchmark (``bench/results/retrieval.md``) found, for
each budget, which backend, key coding, objective, window length, amount of text and number of passes give the
lowest perplexity and keep retrieval. :data:`RECIPES` is that finding, and the one place where defaults depend on
the budget: ``kvlight calibrate`` takes the recipe nearest to the budget it is given (:func:`recipe_for`), applies
each of its settings the user did not give (:func:`apply`), and says what it picked. The README's and the results
page's "which setting for which budget" tables are :func:`markdown_table` of it.

Every setting is a ``kvlight calibrate`` flag and its value, so a recipe reads as the command it stands for; the
backend is a name the registry knows (kvlight.compressors.registry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kvlight.compressors.registry import backend

#: passkey retrieval of the uncompressed model (``DynamicCache``, float32), % of 90 prompts at 1000-4000 tokens
#: (``bench/results/retrieval.md``): a recipe keeps retrieval when it finds at least this minus
#: :data:`RETRIEVAL_TOLERANCE` points.
UNCOMPRESSED_PASSKEY = 91.1
RETRIEVAL_TOLERANCE = 5.0
#: the settings of a recipe that only a trainable backend can use (end-to-end distillation and its schedule).
TRAINING_FLAGS = ("--objective", "--epochs", "--lr", "--distill-batch-size", "--distill-tokens")


@dataclass(frozen=True)
class Measured:
    """What a recipe measured on the embedded default (2-core CPU, evaluated in float32, chunked by 64): the
    frontier's row (float32 fit), or for a recipe changed since, ``bench/recipes.py``'s run of ``kvlight calibrate
    --kv-budget B`` (fitted in the dtype ``auto`` picks; bytes: the frontier's, which the budget fixes).

    Attributes:
        bytes_pct: bytes kept, % of an fp16 cache's, at 512 and 2048 tokens.
        perplexity_pct: perplexity change, %, on 512- and 2048-token windows of the built-in corpus.
        passkey_pct: passkey found, % of 90 prompts (None: not measured).
    """

    bytes_pct: tuple[float, float]
    perplexity_pct: tuple[float, float]
    passkey_pct: float | None


@dataclass(frozen=True)
class Recipe:
    """The best setting the frontier found at one budget.

    Attributes:
        budget: the KV budget it was measured at (a fraction of an fp16 cache's bytes).
        backend: the compressor backend it fits (a registry name).
        settings: ``kvlight calibrate`` flags and their values, besides ``--kv-budget`` and ``--compressor``.
        measured: what it gave on the embedded default.
        use: what it is for, in a few words.
    """

    budget: float
    backend: str
    settings: tuple[tuple[str, str], ...]
    measured: Measured
    use: str

    @property
    def keeps_retrieval(self) -> bool:
        """Whether its measured passkey is within :data:`RETRIEVAL_TOLERANCE` points of the uncompressed model's."""
        found = self.measured.passkey_pct
        return found is not None and found >= UNCOMPRESSED_PASSKEY - RETRIEVAL_TOLERANCE

    @property
    def distils(self) -> bool:
        return dict(self.settings).get("--objective") == "kl"

    def flags(self) -> tuple[tuple[str, str], ...]:
        """Every flag it sets, ``--compressor`` first."""
        return (("--compressor", self.backend), *self.settings)

    def retrieval_warning(self, budget: float) -> str | None:
        """One line for a run at ``budget`` with this recipe when its cache does not keep retrieval, else None."""
        if self.keeps_retrieval:
            return None
        found = "not measured" if self.measured.passkey_pct is None else f"{self.measured.passkey_pct:.1f} %"
        return (
            f"kvlight: warning: at a KV budget of {100 * budget:.4g} % the cache does not keep retrieval: this recipe "
            f"found the passkey in {found} of prompts against {UNCOMPRESSED_PASSKEY:.1f} % uncompressed "
            "(bench/results/retrieval.md); check your task before you ship it"
        )


_DISTIL_512 = (
    ("--key-rope-block", "1"),
    ("--objective", "kl"),
    ("--calibration-samples", "64"),
    ("--epochs", "4"),
    ("--lr", "3e-4"),
)

#: One recipe per budget the frontier measured, from the largest budget down.
RECIPES: tuple[Recipe, ...] = (
    Recipe(
        0.25,
        "kvsplice",
        # A sensitivity pass on 32 windows rather than 16: fitted in bf16 on a 2-core Xeon, +0.66 % mean over 3 seeds
        # at 512 tokens (bench/results/default_sensitivity32.md) against +0.80 % with 16 (bench/results/recipes.md,
        # EPYC); the frontier's figures below are of 16. Steps widened by 1.3 after the fit: the standard library's
        # docstrings (text no calibration reads) then cost +1.96 % at 2048 tokens (bf16, mean of 3 seeds, 2-core EPYC:
        # bench/results/default_headroom.md) against +3.23 % with the steps as fitted (Xeon,
        # default_sensitivity32.md); one compressor widened after its fit went from +3.16 to +1.79 %, its corpus
        # cost about the same (bench/results/step_headroom.md).
        (("--sensitivity-samples", "32"), ("--step-headroom", "1.3")),
        Measured((25.0, 24.6), (0.82, 1.06), 90.0),
        "serving: fast decode, near-lossless",
    ),
    Recipe(
        0.1875,
        "kvsplice",
        _DISTIL_512,
        Measured((18.7, 18.3), (0.31, 0.76), 87.8),
        "under a fifth of the bytes, retrieval kept",
    ),
    Recipe(
        0.125,
        "kvsplice",
        (
            ("--key-rope-block", "1"),
            ("--objective", "kl"),
            ("--seq-len", "4096"),
            ("--calibration-samples", "16"),
            ("--epochs", "4"),
            ("--distill-batch-size", "1"),
            ("--distill-tokens", "0.5"),
            ("--lr", "3e-4"),
        ),
        # bench/results/recipes_xeon.md: bf16 fit on a 2-core Xeon, whole command 25.3 min
        Measured((12.5, 12.0), (2.94, 3.59), 93.3),
        "long contexts at 2 bits per element",
    ),
    Recipe(
        0.09375,
        "kvsplice",
        _DISTIL_512,
        Measured((9.4, 8.8), (7.52, 11.0), 44.4),
        "perplexity only, not retrieval",
    ),
    Recipe(
        0.0625,
        "kvsplice",
        _DISTIL_512,
        Measured((6.2, 5.7), (22.3, 31.3), 1.1),
        "not recommended: the cache forgets",
    ),
)


def recipe_for(budget: float, recipes: tuple[Recipe, ...] = RECIPES) -> Recipe:
    """The recipe measured nearest to ``budget`` (by ratio: 0.15 is nearer 0.125 than 0.1875)."""
    if not 0.0 < budget < 1.0:
        raise ValueError(f"a KV budget is a fraction strictly between 0 and 1, got {budget!r}")
    return min(recipes, key=lambda recipe: (abs(math.log(budget / recipe.budget)), -recipe.budget))


@dataclass(frozen=True)
class Applied:
    """What :func:`apply` decided for one run.

    Attributes:
        budget: the run's KV budget.
        recipe: the recipe picked.
        taken: the settings it applied, as ``(flag, value)``.
        overridden: the flags the user gave that replace the recipe's.
        dropped: the recipe's training settings left out because the chosen backend does not train.
    """

    budget: float
    recipe: Recipe
    taken: tuple[tuple[str, str], ...]
    overridden: tuple[str, ...]
    dropped: tuple[str, ...]

    def summary(self) -> str:
        """The line ``kvlight calibrate`` prints before it starts."""
        budget, recipe, measured = self.budget, self.recipe, self.recipe.measured
        taken = " ".join(f"{flag} {value}" for flag, value in self.taken) or "nothing beyond the defaults"
        line = (
            f"Recipe:                 for a KV budget of {100 * budget:.4g} %, the frontier's best at "
            f"{100 * recipe.budget:.4g} % ({measured.perplexity_pct[0]:+.2f} / {measured.perplexity_pct[1]:+.2f} % "
            f"perplexity at 512 / 2048 tokens on the embedded default): {taken}"
        )
        if self.overridden:
            line += f"; your {', '.join(self.overridden)} replace its own"
        if self.dropped:
            line += f"; {', '.join(self.dropped)} left out: the backend does not train"
        return line


def apply(budget: float, given: dict[str, str | None]) -> Applied:
    """The recipe for ``budget`` and which of its settings a run takes.

    Args:
        budget: the run's KV budget.
        given: for every flag a recipe may set, the value the user gave, or None when not given.

    Returns:
        :class:`Applied`: a setting the user gave is theirs; the recipe's training settings are dropped when the
        backend in force (given or the recipe's) is not trainable.
    """
    recipe = recipe_for(budget)
    chosen = given.get("--compressor") or recipe.backend
    trains = backend(chosen).trainable
    taken, overridden, dropped = [], [], []
    for flag, value in recipe.flags():
        if given.get(flag) is not None:
            if given[flag] != value:
                overridden.append(flag)
            continue
        if flag in TRAINING_FLAGS and not trains:
            dropped.append(flag)
            continue
        taken.append((flag, value))
    return Applied(budget, recipe, tuple(taken), tuple(overridden), tuple(dropped))


def markdown_table(recipes: tuple[Recipe, ...] = RECIPES) -> str:
    """The "which setting for which budget" table of the README and the results page."""
    lines = [
        "| budget | `kvlight calibrate` picks | bytes | perplexity, 512 / 2048 | passkey | use it for |",
        "|---|---|---:|---:|---:|---|",
    ]
    for recipe in recipes:
        measured = recipe.measured
        settings = " ".join(f"{flag} {value}" for flag, value in recipe.settings)
        picks = f"`{settings}`" if settings else "the default settings"
        passkey = "" if measured.passkey_pct is None else f"{measured.passkey_pct:.1f} %"
        ppl = " / ".join(_signed(value) for value in measured.perplexity_pct)
        lines.append(
            f"| `--kv-budget {recipe.budget:g}` | {picks} | {measured.bytes_pct[0]:.1f} / {measured.bytes_pct[1]:.1f} % "
            f"| {ppl} % | {passkey} | {recipe.use} |"
        )
    return "\n".join(lines)


def _signed(value: float) -> str:
    return f"{value:+.2f}" if abs(value) < 10 else f"{value:+.1f}"

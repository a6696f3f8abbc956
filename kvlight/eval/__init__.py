"""lm-evaluation-harness through kvlight's caches (``pip install 'kvlight[eval]'``).

Importing this package registers :class:`~kvlight.eval.lm.KVLightLM` with the harness as ``kvlight``, so that::

    import kvlight.eval
    import lm_eval

    lm_eval.simple_evaluate(
        model="kvlight",
        model_args="pretrained=DIR,cache=kvlight,compressor_path=OUT/compressor_kvsplice,prefill_chunk=64",
        tasks=["niah_single_1"],
        metadata=kvlight.eval.ruler_metadata("DIR", [2048]),
        limit=30,
    )

evaluates a task with attention reading what the compressed cache stores. ``kvlight eval`` runs several caches side
by side and writes one table (:mod:`kvlight.eval.run`, :mod:`kvlight.eval.report`). Nothing here is imported by
``import kvlight``; the harness is imported only when this package is.
"""

from __future__ import annotations

try:
    import lm_eval  # noqa: F401
except ImportError as exc:  # the one thing to do, in one line
    raise ImportError("kvlight.eval needs lm-evaluation-harness: pip install 'kvlight[eval]'") from exc

from kvlight.eval.lm import CACHES, KVLightLM
from kvlight.eval.report import interval, table
from kvlight.eval.ruler import HUB_TASKS, OFFLINE_TASKS, offline_ruler, ruler_metadata
from kvlight.eval.run import evaluate_caches

__all__ = [
    "CACHES",
    "HUB_TASKS",
    "KVLightLM",
    "OFFLINE_TASKS",
    "evaluate_caches",
    "interval",
    "offline_ruler",
    "ruler_metadata",
    "table",
]

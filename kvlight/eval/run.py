"""Harness tasks through several caches of one model: the rows behind ``kvlight eval`` and bench/ruler.py.

:func:`build_tasks` builds each task once per length (RULER's prompts depend on the length; other tasks are built
once), refusing an unknown task or an unreachable hub in one line before anything is evaluated;
:func:`evaluate_caches` then runs every task through each cache in turn, the model loaded once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from kvlight.errors import KVLightError
from kvlight.eval.ruler import check_hub_tasks, first_line, is_ruler, offline_ruler, ruler_metadata, task_name


@dataclass
class TaskSet:
    """The built tasks of one length (None: tasks that do not depend on it) and the manager that built them."""

    length: int | None
    manager: object
    tasks: dict = field(default_factory=dict)


def build_tasks(names: list[str], lengths: list[int], tokenizer) -> list[TaskSet]:
    """Every task of ``names`` built: RULER tasks once per length of ``lengths`` (prompts sized by ``tokenizer``),
    others once. A task that does not exist, needs an unreachable hub or cannot be generated is one
    :class:`KVLightError` line."""
    from lm_eval.tasks import TaskManager

    names = [task_name(name) for name in names]
    check_hub_tasks(names)
    ruler = [name for name in names if is_ruler(name)]
    others = [name for name in names if not is_ruler(name)]
    sets = []
    plan = [(length, ruler) for length in lengths if ruler] + ([(None, others)] if others else [])
    for length, chosen in plan:
        metadata = ruler_metadata(tokenizer, [length]) if length is not None else {}
        manager = TaskManager(metadata=metadata)
        built = TaskSet(length, manager)
        for name in chosen:
            with offline_ruler():
                try:
                    loaded = manager.load([name])
                except KeyError:
                    raise KVLightError(
                        f"unknown task {name!r}; 'lm_eval ls tasks' lists them (offline RULER tasks: "
                        "niah_single_1, niah_multikey_2, niah_multikey_3, vt, cwe)"
                    ) from None
                except (OSError, ValueError, ImportError, LookupError, AssertionError) as exc:
                    at = f" at {length} tokens" if length is not None else ""
                    raise KVLightError(f"task {name}{at} could not be built: {first_line(exc)}") from None
            built.tasks.update(loaded["tasks"])
        sets.append(built)
    return sets


def evaluate_caches(
    model,
    tokenizer,
    caches: list[str],
    task_sets: list[TaskSet],
    *,
    compressor_path=None,
    limit: int | None = None,
    batch_size: int = 1,
    prefill_chunk: int = 64,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Rows (:func:`kvlight.eval.report.rows_of`) of every built task through every cache, in that order; the
    model is unwrapped after each cache. ``on_row`` sees each row as it is measured."""
    import lm_eval

    from kvlight.eval.lm import KVLightLM
    from kvlight.eval.report import rows_of

    rows = []
    for cache in caches:
        with KVLightLM(
            pretrained=model,
            tokenizer=tokenizer,
            cache=cache,
            compressor_path=compressor_path if cache == "kvlight" else None,
            batch_size=batch_size,
            prefill_chunk=prefill_chunk,
        ) as lm:
            for task_set in task_sets:
                start = time.perf_counter()
                results = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=list(task_set.tasks.values()),
                    task_manager=task_set.manager,
                    limit=limit,
                    bootstrap_iters=0,
                    log_samples=True,
                    verbosity="ERROR",
                )
                for row in rows_of(results, cache, task_set.length, time.perf_counter() - start):
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows

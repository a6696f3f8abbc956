"""The walkthrough notebook runs on the embedded default at the small sizes its parameter cell reads from
``KVLIGHT_NOTEBOOK_SMALL``, and its stored outputs are those of such a run: the same cells, each with the same kinds
of output (the numbers may differ from run to run; the structure may not).

``KVLIGHT_STORE_NOTEBOOK=1 python -m pytest -q tests/integration/test_slow_notebook.py`` writes the executed notebook
back to notebooks/walkthrough.ipynb, which is how its stored outputs are made."""

import copy
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "walkthrough.ipynb"


def output_kinds(cell) -> list[str]:
    """What a code cell showed, by kind, in order: stdout or stderr text (each stream is one output once coalesced), a
    picture, a result, an error. Other displays are progress bars, whose number of redraws is not the notebook's."""
    kinds: list[str] = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            kinds.append(out["name"])
        elif "image/png" in out.get("data", {}):
            kinds.append("image")
        elif out["output_type"] != "display_data":
            kinds.append(out["output_type"])
    return kinds


def text_of(cell) -> str:
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out["output_type"] == "stream")


def test_walkthrough_runs_and_its_stored_outputs_are_a_small_run(embedded_cache, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    stored = nbformat.read(NOTEBOOK, as_version=4)
    notebook = copy.deepcopy(stored)
    monkeypatch.setenv("KVLIGHT_NOTEBOOK_SMALL", "1")  # read by the parameter cell; the kernel inherits it
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    client = nbclient.NotebookClient(  # coalesced: a cell's stdout and stderr are one output each, \r applied
        notebook,
        timeout=900,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
        coalesce_streams=True,
    )
    client.execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [out for cell in code for out in cell.get("outputs", []) if out["output_type"] == "error"]
    assert errors == []
    shown = "\n".join(text_of(cell) for cell in code)
    assert "small sizes" in shown
    assert "compressed perplexity:" in shown and "of an fp16 DynamicCache" in shown
    assert "same tokens from the restored cache: True" in shown
    assert "image" in output_kinds(code[-1])  # the memory plot
    if os.environ.get("KVLIGHT_STORE_NOTEBOOK"):
        nbformat.write(notebook, NOTEBOOK)
        return
    # The stored notebook is this run's: same cells, same sources, same kinds of output in every cell.
    assert [(cell.cell_type, cell.source) for cell in stored.cells] == [
        (cell.cell_type, cell.source) for cell in notebook.cells
    ]
    # Sorted: ipykernel flushes stdout and stderr on their own timers, so which of the two a cell shows first
    # depends on timing (the same notebook has stored them in both orders), not on the notebook.
    assert [sorted(output_kinds(cell)) for cell in stored.cells if cell.cell_type == "code"] == [
        sorted(output_kinds(cell)) for cell in code
    ]
    assert "small sizes" in text_of([cell for cell in stored.cells if cell.cell_type == "code"][0])

"""The docs' table of supported model families (docs/supported-models.md) is generated, not written by hand: this
test sweeps transformers' whole causal-LM list (tests/integration/support_sweep.py: a tiny random model of each family,
refused with its reason or served at full rank exactly as the model's own cache) and fails when the page says anything
else.

    KVLIGHT_UPDATE_DOCS=1 python -m pytest tests/integration/test_support_table.py   # rewrite the page's table
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from support_sweep import families, table, verdict

PAGE = Path(__file__).resolve().parents[2] / "docs" / "supported-models.md"
START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
#: families issue 14 names: each must be served, not refused.
REQUIRED = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "olmo2", "gpt_neox", "cohere", "gpt2")


@pytest.fixture(scope="module")
def verdicts() -> dict[str, tuple[str, str]]:
    return {name: verdict(name) for name in families()}


def test_no_family_fails_silently(verdicts):
    """Every family kvlight accepts is served exactly; what it cannot serve is refused with a reason."""
    failing = {name: detail for name, (status, detail) in verdicts.items() if status == "fails"}
    assert failing == {}


@pytest.mark.parametrize("family", REQUIRED)
def test_required_families_are_served(family, verdicts):
    assert verdicts[family] == ("works", "")


def test_docs_table_is_the_sweep(verdicts):
    text = PAGE.read_text()
    match = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, flags=re.S)
    assert match, f"{PAGE.name} has no {START} ... {END} block"
    generated = table(verdicts)
    if os.environ.get("KVLIGHT_UPDATE_DOCS"):
        PAGE.write_text(text[: match.start(1)] + generated + text[match.end(1) :])
        return
    assert match.group(1) == generated, f"{PAGE.name}'s support table is stale: rerun with KVLIGHT_UPDATE_DOCS=1"

"""The README's table of supported model families is generated, not written by hand: this test sweeps transformers'
whole causal-LM list (tests/integration/support_sweep.py: a tiny random model of each family, refused with its reason
or served at full rank exactly as the model's own cache) and fails when the README says anything else.

    KVLIGHT_UPDATE_README=1 python -m pytest tests/integration/test_support_table.py   # rewrite the README's table
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from support_sweep import families, table, verdict

README = Path(__file__).resolve().parents[2] / "README.md"
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


def test_readme_table_is_the_sweep(verdicts):
    text = README.read_text()
    match = re.search(re.escape(START) + r"\n(.*?)\n" + re.escape(END), text, flags=re.S)
    assert match, f"README.md has no {START} ... {END} block"
    generated = table(verdicts)
    if os.environ.get("KVLIGHT_UPDATE_README"):
        README.write_text(text[: match.start(1)] + generated + text[match.end(1) :])
        return
    assert match.group(1) == generated, "README support table is stale: rerun with KVLIGHT_UPDATE_README=1"

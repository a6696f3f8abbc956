"""Every Python and shell block of the README and the docs runs, so the manual cannot go stale.

Pages are ``README.md`` and ``docs/**/*.md``. The blocks of one page run in order, in a fresh temporary working
directory that holds a link to the repository's ``configs/`` (as a clone's root does):

- ```` ```python ```` blocks share one namespace, like a doctest session;
- ```` ```bash ````, ```` ```sh ```` and ```` ```shell ```` blocks run with ``bash`` (``set -euo pipefail``), the
  venv's ``kvlight`` first on ``PATH``, offline;
- ```` ```text ```` blocks show output and are not run, nor are blocks of any other language.

Markers, on the lines right above a block (blank lines between them are allowed):

- ``*Not run in CI: REASON.*``: a visible line (on GitHub and on the site) for a block that needs a GPU, the hub or
  the network, or more than 10 minutes (:data:`SKIP_REASONS`). The block is reported as a pytest skip with that
  reason, so ``pytest -ra`` lists the skipped blocks by reason.
- ``<!-- fixture: NAME -->``: a shell block whose products other pages use. It runs once per session, verbatim, in a
  directory of its own; its page then gets a copy of what it wrote. docs/guide/calibrate.md's ``tiny-calibrate`` is a
  fast ``kvlight calibrate`` on the embedded default that writes ``compression_results/``.
- ``<!-- setup: NAME -->``: before the block runs, its page's directory gets a copy of what fixture ``NAME`` wrote.
  A snippet that loads ``compression_results/compressor_kvsplice`` then runs verbatim while the full calibration it
  follows (20 minutes) is skipped.

The install lines of the README are not run here (they need the network): :func:`test_readme_install_is_what_ci_runs`
checks instead that ``.ci/run`` runs exactly them, the docs build and the README's test command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
RUN_LANGUAGES = {"python": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
SKIP = re.compile(r"^\*Not run in CI: (?P<reason>[^*]+?)\.?\*\s*$")
SETUP = re.compile(r"^<!-- setup: (?P<name>[\w-]+) -->\s*$")
FIXTURE = re.compile(r"^<!-- fixture: (?P<name>[\w-]+) -->\s*$")
FENCE = re.compile(r"^(?P<indent> {0,4})```(?P<lang>[\w+-]*)\s*$")
#: why a block may stay out of CI (issue text: a GPU, the hub, more than 10 minutes)
SKIP_REASONS = (
    "needs a GPU",
    "needs several GPUs",
    "needs the hub",
    "needs the network",
    "takes more than 10 minutes",
    "can take more than 10 minutes",
    # the README's test command: pytest cannot run inside itself, and .ci/run runs exactly that command
    "it is the test suite",
)
SHELL_TIMEOUT_S = 600


@dataclass
class Block:
    page: Path
    line: int
    language: str  # "python" or "shell"
    code: str
    skip: str | None = None
    setup: list[str] = field(default_factory=list)
    fixture: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` this test runs (or skips), in order, with their markers."""
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if not fence:
            i += 1
            continue
        indent, language = fence.group("indent"), fence.group("lang")
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if language in RUN_LANGUAGES:
            body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]]
            block = Block(page, i + 1, RUN_LANGUAGES[language], "\n".join(body) + "\n")
            above = i - 1
            while above >= 0 and (
                not lines[above].strip() or any(m.match(lines[above]) for m in (SKIP, SETUP, FIXTURE))
            ):
                if skip := SKIP.match(lines[above]):
                    block.skip = skip.group("reason")
                elif setup := SETUP.match(lines[above]):
                    block.setup.append(setup.group("name"))
                elif fixture := FIXTURE.match(lines[above]):
                    block.fixture = fixture.group("name")
                above -= 1
            found.append(block)
        i = end + 1
    return found


BLOCKS = [block for page in PAGES for block in blocks_of(page)]
FIXTURES = {block.fixture: block for block in BLOCKS if block.fixture}


# ---------------------------------------------------------------------------------------------- fast checks
def test_the_manual_has_runnable_blocks():
    assert len([block for block in BLOCKS if block.skip is None]) >= 5
    assert any(block.page.name == "README.md" and block.skip is None for block in BLOCKS)


@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_markers_are_known(block):
    """A skipped block says one of the reasons CI cannot run it; a setup names a fixture this test provides."""
    if block.skip is not None:
        assert block.skip.startswith(SKIP_REASONS), (
            f"{block.id}: skip reason {block.skip!r} is not one of {SKIP_REASONS}"
        )
    assert set(block.setup) <= set(FIXTURES), f"{block.id}: setup {block.setup} names no fixture block"
    if block.fixture is not None:
        assert block.language == "shell" and block.skip is None, f"{block.id}: a fixture is a shell block CI runs"
        assert [b.id for b in BLOCKS if b.fixture == block.fixture] == [block.id], f"fixture {block.fixture} twice"


def _install_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"## Install\n.*?```bash\n(.*?)```", text, flags=re.S)
    assert match, "README.md has no Install section with a bash block"
    return [line.split("#")[0].strip() for line in match.group(1).splitlines() if line.strip()]


def _normalise(command: str) -> str:
    return " ".join(word for word in command.split() if word != "-q")


def test_readme_install_is_what_ci_runs():
    """.ci/run installs exactly as the README's Install says, and runs the README's test command."""
    ci = [_normalise(line.split("#")[0]) for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    installs = [_normalise(line) for line in _install_block() if line.startswith("pip install")]
    assert any('".[test,docs,eval]"' in line for line in installs), installs
    missing = [line for line in installs if line not in ci]
    assert missing == [], f".ci/run does not run the README's install lines {missing}"
    assert _normalise("python -m pytest -q") in ci
    assert "mkdocs build --strict" in ci


# ---------------------------------------------------------------------------------------------- running them
def _environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return env


def _run_shell(block: Block, directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + block.code],
        cwd=directory,
        capture_output=True,
        text=True,
        env=_environment(),
        timeout=SHELL_TIMEOUT_S,
    )


def _exit_zero(block: Block, done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"{block.id}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


@pytest.fixture(scope="session")
def fixture_runs(tmp_path_factory):
    """``run(name)``: the directory fixture block ``name`` wrote into, the block run once per session."""
    made: dict[str, Path | BaseException] = {}

    def run(name: str) -> Path:
        if name not in made:
            directory = tmp_path_factory.mktemp(f"fixture-{name}")
            try:
                _exit_zero(FIXTURES[name], _run_shell(FIXTURES[name], directory))
                made[name] = directory
            except BaseException as error:
                made[name] = error
        if isinstance(made[name], BaseException):
            raise made[name]
        return made[name]

    return run


def _copy_products(source: Path, target: Path) -> None:
    for path in source.iterdir():
        if not (target / path.name).exists():
            (shutil.copytree if path.is_dir() else shutil.copy2)(path, target / path.name)


@dataclass
class PageState:
    directory: Path
    namespace: dict
    failed: str | None = None


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> dict[Path, PageState]:
    return {}


def _state(pages: dict[Path, PageState], page: Path, tmp_path_factory) -> PageState:
    if page not in pages:
        directory = tmp_path_factory.mktemp(page.stem)
        (directory / "configs").symlink_to(ROOT / "configs")
        pages[page] = PageState(directory, {"__name__": "__main__"})
    return pages[page]


@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_block_runs(block, pages, tmp_path_factory, fixture_runs, monkeypatch):
    if block.skip is not None:
        pytest.skip(f"{block.skip} ({block.id})")
    state = _state(pages, block.page, tmp_path_factory)
    if state.failed:
        pytest.fail(f"an earlier block of this page failed ({state.failed}); this one depends on it")
    monkeypatch.chdir(state.directory)
    try:
        for name in [*block.setup, *([block.fixture] if block.fixture else [])]:
            _copy_products(fixture_runs(name), state.directory)
        if block.fixture is not None:  # it ran verbatim in fixture_runs (exit 0); its page now holds what it wrote
            assert any(state.directory.iterdir()), f"{block.id}: the fixture wrote nothing"
        elif block.language == "python":
            exec(compile(block.code, block.id, "exec"), state.namespace)
            # it ran to its end: every name it binds at top level (what later blocks of its page read) is bound
            unbound = _bound_names(block.code) - set(state.namespace)
            assert not unbound, f"{block.id}: never bound {sorted(unbound)}"
        else:
            _exit_zero(block, _run_shell(block, state.directory))
    except BaseException:
        state.failed = block.id
        raise


def _bound_names(code: str) -> set[str]:
    """The names ``code`` binds at top level: imports, plain assignments, defs and classes."""
    import ast

    names: set[str] = set()
    for node in ast.parse(code).body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name != "*"}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for target in targets for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names

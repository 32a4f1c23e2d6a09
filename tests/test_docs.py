"""Every code block of README.md and docs/*.md runs, and its printed output is what the page shows.

The convention (docs/contributing.md, "Documentation"):

- ``python`` blocks run in-process, in order, in one namespace per page, with the working
  directory a temporary folder of that page; ``bash`` blocks run with ``bash -e`` in the same
  folder, with this checkout's ``deeplab`` first on ``PATH`` (a shim running
  ``python -m deeplab.cli.main`` with this checkout's ``src`` on ``PYTHONPATH``). ``console``
  blocks are ``$ command`` lines followed by their output.
- A ````text```` block directly after a command block (only blank lines or a marker between) is
  that command's output (stdout and stderr together) and is compared after stripping trailing
  spaces, surrounding blank lines and tqdm progress bars (their figures depend on time); a line
  ``...`` stands for any number of lines.
- Markers, an HTML comment directly above a fence (blank lines allowed between):
  ``<!-- skip: REASON -->`` (not run), ``<!-- output: not compared, REASON -->`` (above an
  output or console block: run, not compared), ``<!-- slow: REASON -->`` (run only by the
  ``slow`` test of the page), ``<!-- network: REASON -->`` (run only by the ``network`` test).
- ``<!-- setup: SHELL COMMAND -->`` anywhere on a page runs before the page's first slow or
  network block (e.g. the demo run whose checkpoint later blocks use).

Each page gets three tests: its default blocks, then (marked ``slow``) all but network blocks,
then (marked ``network``) all blocks. A page's blocks depend on the blocks before them, so a
page is one test, and a failure names the file and line of the block.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*(?P<kind>skip|output|slow|network|setup|exit)\s*:\s*(?P<text>.*?)\s*-->\s*$")
COMMAND_LANGS = ("python", "bash", "sh", "console")
BLOCK_TIMEOUT_S = 1800  # the full demo: ~140 s alone on 2 cores, >15 min on a shared one


@dataclass
class Block:
    """One fenced code block of a page."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    markers: Dict[str, str] = field(default_factory=dict)
    output: Optional["Block"] = None  # the text block showing this command's output

    @property
    def where(self) -> str:
        shown = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{shown}:{self.line}"


def parse(path: Path) -> tuple[List[Block], List[str]]:
    """The command blocks of a page (each with its output block, if any) and its setup commands."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: List[Block] = []
    setups: List[str] = []
    pending: Dict[str, str] = {}
    last_command: Optional[Block] = None
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line.strip())
        fence = FENCE.match(line)
        if marker:
            if marker.group("kind") == "setup":
                setups.append(marker.group("text"))
            else:
                pending[marker.group("kind")] = marker.group("text")
            i += 1
            continue
        if fence:
            indent = len(fence.group("indent"))
            j = i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            code = textwrap.dedent("\n".join(row[indent:] if row[:indent].strip() == "" else row for row in lines[i + 1:j]))
            block = Block(path, i + 1, fence.group("lang").lower(), code, dict(pending))
            pending = {}
            if block.lang == "text" and last_command is not None and last_command.output is None:
                last_command.output = block
            elif block.lang in COMMAND_LANGS:
                blocks.append(block)
            last_command = block if block.lang in COMMAND_LANGS else None
            i = j + 1
            continue
        if line.strip():
            # prose between a command and a text block: that text block is not its output
            last_command = None
            pending = {}
        i += 1
    return blocks, setups


# a tqdm bar ends in "[elapsed<remaining, rate]" or "[elapsed, rate]"; "\r" separates its redraws
PROGRESS_BAR = re.compile(r"\[(\d+:)?\d\d:\d\d(<[^\]]*)?(, *[^\]]*)?\]\s*$")


def normalise(text: str) -> List[str]:
    rows = [row for row in re.split(r"\r\n|\r|\n", text) if not PROGRESS_BAR.search(row)]
    text = "\n".join(rows)
    return [row.rstrip() for row in text.strip("\n").split("\n")] if text.strip() else []


def matches(expected: List[str], actual: List[str]) -> bool:
    """``expected`` equals ``actual``, where an expected line ``...`` matches any run of lines."""
    if not expected:
        return not actual
    if expected[0] == "...":
        return any(matches(expected[1:], actual[k:]) for k in range(len(actual) + 1))
    return bool(actual) and expected[0] == actual[0] and matches(expected[1:], actual[1:])


class Page:
    """The state one page's blocks share: a temporary folder, a Python namespace, an environment."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.namespace: Dict[str, object] = {"__name__": "__docs__"}
        bin_dir = tmp / ".bin"
        bin_dir.mkdir()
        shim = bin_dir / "deeplab"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m deeplab.cli.main "$@"\n')
        shim.chmod(0o755)
        self.env = dict(os.environ)
        self.env["PATH"] = f"{bin_dir}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), self.env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        self.env["COLUMNS"] = "100"

    def shell(self, script: str) -> tuple[int, str]:
        proc = subprocess.run(["bash", "-e", "-c", script], cwd=self.tmp, env=self.env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=BLOCK_TIMEOUT_S)
        return proc.returncode, proc.stdout

    def python(self, code: str) -> str:
        out = io.StringIO()
        cwd = os.getcwd()
        os.chdir(self.tmp)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                exec(compile(code, "<docs>", "exec"), self.namespace)
        finally:
            os.chdir(cwd)
        return out.getvalue()


def console_parts(code: str) -> tuple[str, str]:
    """A console block's commands (``$ `` lines and their ``\\`` continuations) and its output."""
    commands, output = [], []
    continuing = False
    for line in code.split("\n"):
        if line.startswith("$ ") or continuing:
            commands.append(line[2:] if line.startswith("$ ") and not continuing else line)
            continuing = line.rstrip().endswith("\\")
        else:
            output.append(line)
    return "\n".join(commands), "\n".join(output)


def run_block(page: Page, block: Block) -> Optional[str]:
    """Run one block; the failure message, or ``None`` when it ran and printed what the page shows."""
    expected_text: Optional[str] = block.output.code if block.output is not None else None
    compare = block.output is not None and "output" not in block.output.markers
    if block.lang == "python":
        try:
            printed = page.python(block.code)
        except Exception as exc:  # noqa: BLE001 - reported with the block's place
            return f"{block.where}: the python block raised {type(exc).__name__}: {exc}"
    else:
        code = block.code
        if block.lang == "console":
            code, expected_text = console_parts(block.code)
            compare = "output" not in block.markers
        status, printed = page.shell(code)
        expected_status = int(block.markers.get("exit", "0").split()[0])
        if status != expected_status:
            return f"{block.where}: the {block.lang} block exited with status {status}, not {expected_status}:\n{printed[-3000:]}"
    if compare and expected_text is not None and not matches(normalise(expected_text), normalise(printed)):
        return f"{block.where}: printed output differs from the page's.\n--- page\n{expected_text}\n--- printed\n{printed}"
    return None


def run_page(path: Path, tmp: Path, *, level: str) -> None:
    blocks, setups = parse(path)
    page = Page(tmp)
    set_up = False
    skipped = []
    for block in blocks:
        if "skip" in block.markers:
            skipped.append(f"{block.where} ({block.markers['skip']})")
            continue
        needs = "network" if "network" in block.markers else "slow" if "slow" in block.markers else "default"
        if (needs == "network" and level != "network") or (needs == "slow" and level == "default"):
            continue
        if needs != "default" and not set_up:
            for command in setups:
                status, printed = page.shell(command)
                assert status == 0, f"{path.relative_to(ROOT)}: setup {command!r} failed:\n{printed[-3000:]}"
            set_up = True
        failure = run_block(page, block)
        assert failure is None, failure


def _ids(paths: List[Path]) -> List[str]:
    return [str(p.relative_to(ROOT)) for p in paths]


@pytest.mark.parametrize("path", PAGES, ids=_ids(PAGES))
def test_page_blocks(path: Path, tmp_path: Path) -> None:
    run_page(path, tmp_path, level="default")


@pytest.mark.slow
@pytest.mark.spawn
@pytest.mark.parametrize("path", [p for p in PAGES if "<!-- slow:" in p.read_text(encoding="utf-8")],
                         ids=_ids([p for p in PAGES if "<!-- slow:" in p.read_text(encoding="utf-8")]))
def test_page_blocks_slow(path: Path, tmp_path: Path) -> None:
    run_page(path, tmp_path, level="slow")


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in PAGES if "<!-- network:" in p.read_text(encoding="utf-8")],
                         ids=_ids([p for p in PAGES if "<!-- network:" in p.read_text(encoding="utf-8")]))
def test_page_blocks_network(path: Path, tmp_path: Path) -> None:
    run_page(path, tmp_path, level="network")


# --- the executor itself ---------------------------------------------------------------------------


def test_parser_pairs_outputs_and_markers(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text(textwrap.dedent("""\
        <!-- skip: needs a GPU -->
        ```bash
        nvidia-smi
        ```

        ```bash
        echo hi
        ```

        <!-- output: not compared, timing -->
        ```text
        hi
        ```

        Prose.

        ```text
        not an output: prose came between
        ```

        <!-- setup: echo ready > ready.txt -->
        <!-- slow: minutes -->
        ```python
        print(1)
        ```
        ```text
        1
        ```
        """))
    blocks, setups = parse(page)
    assert [b.lang for b in blocks] == ["bash", "bash", "python"]
    assert blocks[0].markers == {"skip": "needs a GPU"} and blocks[0].output is None
    assert blocks[1].output is not None and blocks[1].output.markers == {"output": "not compared, timing"}
    assert blocks[2].markers == {"slow": "minutes"} and blocks[2].output is not None
    assert setups == ["echo ready > ready.txt"]


def test_a_lying_output_fails(tmp_path: Path) -> None:
    page = tmp_path / "p.md"
    page.write_text("```bash\necho 41\n```\n\n```text\n42\n```\n\n```python\nprint('x')\n```\n```text\n...\nx\n```\n")
    blocks, _ = parse(page)
    (tmp_path / "run").mkdir()
    runner = Page(tmp_path / "run")
    failure = run_block(runner, blocks[0])
    assert failure is not None and "differs" in failure and "p.md:1" in failure
    assert run_block(runner, blocks[1]) is None  # '...' matches any lines
    assert matches(["a", "...", "c"], ["a", "b", "b", "c"]) and not matches(["a", "c"], ["a", "b", "c"])


def test_shim_runs_this_checkout(tmp_path: Path) -> None:
    page = Page(tmp_path)
    status, printed = page.shell('python -c "import deeplab; print(deeplab.__file__)"; deeplab --version')
    assert status == 0
    assert printed.splitlines()[0].startswith(str(ROOT / "src"))


def test_cli_reference_covers_every_subcommand() -> None:
    # the hook that generates docs/cli.md's reference from the parsers (run by mkdocs build in CI)
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import docs_cli_reference
    finally:
        sys.path.pop(0)
    from deeplab.cli.main import SUBCOMMANDS

    text = docs_cli_reference.render()
    for name in SUBCOMMANDS:
        assert f"## `deeplab {name}`" in text
    assert "`--multi-grid` `M` ..." in text and "`--paper`" in text
    assert docs_cli_reference.MARKER in (ROOT / "docs" / "cli.md").read_text()


def test_every_page_is_in_the_site_navigation() -> None:
    # mkdocs only reports a page missing from nav as INFO, so --strict does not catch it
    import yaml

    def pages(entries: object) -> List[str]:
        if isinstance(entries, str):
            return [entries]
        if isinstance(entries, list):
            return [p for e in entries for p in pages(e)]
        if isinstance(entries, dict):
            return [p for v in entries.values() for p in pages(v)]
        return []

    nav = set(pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    on_disk = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    assert on_disk - nav == set(), "pages no reader can reach from the navigation"


def test_readme_is_a_front_page() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    # the two commands, exactly as .ci/run runs the second
    assert "pip install -c constraints.txt -e . && deeplab demo" in text
    assert 'pip install -c constraints.txt -e ".[test]" && python -m pytest' in text
    assert 'pip install -c constraints.txt -e ".[test]" && python -m pytest' in (ROOT / ".ci" / "run").read_text()
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).is_file(), f"README links to {link}, which does not exist"

"""MkDocs hooks: the CLI reference, generated from the argparse parsers themselves (and Sphinx
roles in docstrings shown as plain code).

``docs/cli.md`` holds the marker ``<!-- cli-reference -->``; at build time it is replaced by one
section per ``deeplab`` subcommand (and per sub-subcommand, e.g. ``deeplab data check``): usage,
description and a table of every option with its default, choices and help, read from the parser
that the subcommand's ``main`` really builds. The parser is captured by calling
``main(["--help"])`` with ``ArgumentParser.parse_known_args`` patched to hand the parser back
instead of parsing, so nothing is restated and the page cannot drift from the code.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any, Iterator, List, Tuple
from unittest import mock

MARKER = "<!-- cli-reference -->"


class _Captured(BaseException):
    """Carries the parser out of a subcommand's ``main`` (a BaseException: no wrapper catches it)."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


def capture_parser(module_name: str) -> argparse.ArgumentParser:
    """The first parser a subcommand's ``main`` parses its arguments with."""
    module = importlib.import_module(module_name)

    def grab(self: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> Any:
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", grab):
        try:
            module.main(["--help"])
        except _Captured as captured:
            return captured.parser
    raise RuntimeError(f"{module_name}.main did not parse its arguments with argparse")


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _option_rows(parser: argparse.ArgumentParser) -> Iterator[Tuple[str, str, str, str]]:
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        name = ", ".join(f"`{s}`" for s in action.option_strings) or f"`{action.metavar or action.dest}`"
        if action.option_strings and action.nargs != 0:
            metavar = action.metavar or action.dest.upper()
            metavar = " ".join(metavar) if isinstance(metavar, tuple) else metavar
            name += f" `{metavar}`" + (" ..." if action.nargs in ("+", "*") else "")
        default = "" if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 else f"`{action.default!r}`"
        if action.required:
            default = "required"
        choices = ", ".join(f"`{c}`" for c in action.choices) if action.choices else ""
        help_ = (action.help or "") % {"default": action.default, "prog": parser.prog} if action.help else ""
        yield name, default, choices, help_


def render_parser(parser: argparse.ArgumentParser, level: int = 2) -> List[str]:
    """Markdown for one parser and, recursively, its sub-parsers."""
    lines = [f"{'#' * level} `{parser.prog}`", ""]
    if parser.description:
        lines += [_cell(parser.description), ""]
    usage = parser.format_usage().strip()
    lines += ["```text", usage.removeprefix("usage: "), "```", ""]
    rows = list(_option_rows(parser))
    if rows:
        lines += ["| option | default | choices | help |", "|---|---|---|---|"]
        lines += [f"| {_cell(a)} | {_cell(b)} | {_cell(c)} | {_cell(d)} |" for a, b, c, d in rows]
        lines.append("")
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                lines += render_parser(sub, level + 1)
    return lines


def render() -> str:
    """The whole CLI reference in Markdown, one section per subcommand of ``deeplab.cli.main``."""
    import os

    from deeplab.cli.main import SUBCOMMANDS

    os.environ["COLUMNS"] = "100"  # argparse wraps usage lines at the terminal width: fix it
    lines = ["| subcommand | what it does |", "|---|---|"]
    lines += [f"| [`deeplab {name}`](#deeplab-{name}) | {_cell(help_)} |" for name, (_, help_) in SUBCOMMANDS.items()]
    lines.append("")
    for module_name, _ in SUBCOMMANDS.values():
        lines += render_parser(capture_parser(module_name))
    return "\n".join(lines)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: expand the marker of ``docs/cli.md``."""
    if MARKER in markdown:
        return markdown.replace(MARKER, render())
    return markdown


_SPHINX_ROLE = __import__("re").compile(r":(?:meth|class|func|mod|data|attr|exc|obj|const):(<code>)~?")


def on_page_content(html: str, page: Any, config: Any, files: Any) -> str:
    """MkDocs hook: the docstrings' Sphinx roles (``:class:`X```) render as plain code, not ``:class:X``."""
    return _SPHINX_ROLE.sub(r"\1", html)

"""Helpers shared by the subcommands: the one error wrapper, presets, datasets from flags, printing."""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TypeVar, cast

import yaml

from deeplab._utils import DeeplabError, one_line
from deeplab.data import DATASETS, build_dataset
from deeplab.data.base import SegmentationDataset, Transform

# Keys a preset may carry for people, not for the program.
DOC_KEYS = ("notes", "expected_miou", "paper")


class CLIError(DeeplabError):
    """A user error in the command line: printed as one line, exit status 2."""


# --------------------------------------------------------------------------- the one error wrapper

DEBUG_ENV = "DEEPLAB_DEBUG"

# OSErrors about a path the user named (a missing --checkpoint, an unwritable --out, an existing
# run folder) are the user's to fix, like the project's own errors.
PATH_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
)

# torch (ExceptionWrapper.reraise, torch.utils.data._utils) re-raises a DataLoader worker's
# exception in the main process as ``type(exc)(msg)`` where msg is
# "Caught <Name> in DataLoader worker process <N>.\nOriginal <traceback.format_exception(...)>":
# the worker's exception object never crosses the process boundary, only its type and that text,
# so the plain message has to be read back from the text.
_WORKER_RERAISE = re.compile(r"\ACaught (?P<name>\w+) in [^\n]*\.\nOriginal (?P<trace>.*)\Z", re.DOTALL)
_TRACEBACK_HEADER = "Traceback (most recent call last):\n"

# a subcommand's main(argv=None) -> int; a TypeVar so the decorated main keeps its signature (argv optional)
MainFunction = TypeVar("MainFunction", bound=Callable[..., int])


def debug_enabled() -> bool:
    """``DEEPLAB_DEBUG`` set (and not ``0``): show tracebacks instead of one-line errors."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def worker_message(text: str) -> Optional[str]:
    """The original message inside torch's DataLoader-worker re-raise text, or ``None``.

    Args:
        text: ``str(exc)`` of an exception the main process received from a DataLoader.

    Returns:
        What the worker's exception said (possibly several lines), without torch's
        "Caught X in DataLoader worker process N" header, the traceback and the ``X:`` prefix;
        ``None`` when ``text`` is not such a re-raise.
    """
    match = _WORKER_RERAISE.match(text)
    if match is None:
        return None
    # A chained exception ("raise DatasetError(...) from e") prints its causes first: the
    # exception itself is the last traceback in the text.
    last = match["trace"].rsplit(_TRACEBACK_HEADER, 1)[-1]
    lines = last.split("\n")
    # Frame lines are indented; the first line flush left is "module.Name: message".
    start = next((i for i, line in enumerate(lines) if line and not line[0].isspace()), None)
    if start is None:
        return None
    first = re.sub(rf"\A(?:[\w.]+\.)?{match['name']}(?::\s?|\Z)", "", lines[start])
    # an exception raised without a message still says what it was
    return "\n".join([first, *lines[start + 1:]]).strip() or match["name"]


def user_error_message(exc: BaseException, user_errors: tuple[type[BaseException], ...] = ()) -> Optional[str]:
    """One line for an error the user can fix, or ``None`` for a bug (which keeps its traceback).

    Args:
        exc: the exception a subcommand raised.
        user_errors: further exception types this subcommand treats as user errors.

    Returns:
        The message on one line (a DataLoader worker's original message, not torch's wrapper
        text), or ``None`` when ``exc`` is not a :class:`DeeplabError`, a path error or one of
        ``user_errors``.
    """
    if not isinstance(exc, (DeeplabError, *PATH_ERRORS, *user_errors)):
        return None
    original = worker_message(str(exc))
    return one_line(exc if original is None else DeeplabError(original))


def cli_command(name: str, *, user_errors: tuple[type[BaseException], ...] = ()) -> Callable[[MainFunction], MainFunction]:
    """Decorate a subcommand's ``main(argv=None)``: errors for people become one line.

    A :class:`DeeplabError`, an error about a path (:data:`PATH_ERRORS`) or one of
    ``user_errors`` prints ``deeplab <name>: error: <message>`` on stderr and returns 2, also when
    it was raised inside a DataLoader worker; Ctrl-C prints one line and returns 130. Anything
    else is a bug and keeps its traceback. ``DEEPLAB_DEBUG=1`` re-raises everything.

    Args:
        name: the subcommand, as typed after ``deeplab``.
        user_errors: further exception types this subcommand reports as user errors.
    """

    def decorate(main: MainFunction) -> MainFunction:
        @functools.wraps(main)
        def wrapped(argv: Optional[List[str]] = None) -> int:
            try:
                return main(argv)
            except KeyboardInterrupt:
                if debug_enabled():
                    raise
                print(f"deeplab {name}: error: interrupted", file=sys.stderr)
                return 130
            except Exception as exc:
                message = user_error_message(exc, user_errors)
                if message is None or debug_enabled():
                    raise
                print(f"deeplab {name}: error: {message}", file=sys.stderr)
                return 2

        return cast(MainFunction, wrapped)

    return decorate


# --------------------------------------------------------------------------- presets


def load_preset(path: str, allowed: Sequence[str]) -> Dict[str, Any]:
    """Read a flat YAML preset whose keys are the command's flag names (``-`` or ``_``).

    Raises:
        CLIError: missing/unreadable file, not a mapping, or unknown keys (listed with the choices).
    """
    file = Path(path)
    if not file.is_file():
        raise CLIError(f"config file {file} does not exist; presets live in configs/ (e.g. configs/voc_xception65_os16.yaml)")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise CLIError(f"{file} is not valid YAML: {exc}") from exc
    if not isinstance(data, Mapping):
        raise CLIError(f"{file} must be a flat mapping of option: value, got {type(data).__name__}")
    out = {str(k).replace("-", "_"): v for k, v in data.items() if str(k) not in DOC_KEYS}
    unknown = sorted(set(out) - set(allowed))
    if unknown:
        raise CLIError(f"{file}: unknown keys {unknown}; allowed keys are {sorted(allowed)} (+ {list(DOC_KEYS)})")
    return out


def parse_with_preset(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """Parse ``argv``; a ``--config`` preset fills every option not given on the command line."""
    args = parser.parse_args(argv)
    config = getattr(args, "config", None)
    if config:
        dests = [a.dest for a in parser._actions if a.dest not in ("help", "config")]
        preset = load_preset(config, dests)
        # Re-parse into a namespace pre-filled with a sentinel: argparse then fills in only
        # what was typed, which tells command-line values (they win) from defaults.
        explicit = parser.parse_args(argv, namespace=argparse.Namespace(**{d: _UNSET for d in dests}))
        actions = {a.dest: a for a in parser._actions}
        for key, value in preset.items():
            if getattr(explicit, key, _UNSET) is _UNSET:
                setattr(args, key, _convert(actions[key], value, config))
    return args


def _convert(action: argparse.Action, value: Any, source: str) -> Any:
    """Give a preset value the type its flag would (YAML reads ``1e-4`` as a string)."""
    if value is None or action.type is None:
        return value
    try:
        if isinstance(value, (list, tuple)):
            return [action.type(v) for v in value]
        return action.type(value)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{source}: {action.dest}: {value!r} is not a valid {getattr(action.type, '__name__', action.type)}") from exc


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def add_data_args(parser: argparse.ArgumentParser, *, split: Optional[str], with_split: bool = True) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                       help="dataset layout (default: the checkpoint's, else voc)")
    group.add_argument("--data-root", default=None, help="dataset root directory")
    if with_split:
        group.add_argument("--split", default=split, help=f"split to use (default: {split})")


def make_dataset(name: str, root: Optional[str], split: Optional[str], transform: Optional[Transform],
                 **kwargs: Any) -> SegmentationDataset:
    if not root:
        raise CLIError("--data-root is required: the folder holding the dataset (see README 'Datasets')")
    return build_dataset(name, root, split, transform, **kwargs)


def print_config(title: str, config: Mapping[str, Any], *, stream: Any = None) -> None:
    """Print the resolved configuration at the start of a run."""
    stream = stream or sys.stdout
    print(f"{title}:", file=stream)
    width = max((len(k) for k in config), default=0)
    for key, value in config.items():
        print(f"  {key:<{width}}  {json.dumps(value, default=str)}", file=stream)
    stream.flush()

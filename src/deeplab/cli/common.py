"""Helpers shared by the subcommands: the one error wrapper, presets, datasets from flags, printing."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TypeVar, cast

import yaml

from deeplab._utils import DeeplabError, one_line
from deeplab.config import INFERENCE_MODES, INFERENCE_PRECISIONS, OUTPUT_STRIDES, InferenceConfig
from deeplab.data import DATASETS, build_dataset
from deeplab.data.base import SegmentationDataset, Transform
from deeplab.deploy.open import BACKEND_ALIASES, BACKENDS, resolve_source
from deeplab.zoo import ZOO, ZOO_BASE_URL, ZOO_URL_ENV, ZooEntry

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
    convert = cast(Callable[[Any], Any], action.type)  # our flags' types are callables, never names
    try:
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return convert(value)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"{source}: {action.dest}: {value!r} is not a valid {getattr(action.type, '__name__', action.type)}") from exc


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET = _Unset()


def add_data_args(parser: argparse.ArgumentParser, *, split: Optional[str], with_split: bool = True,
                  label_map_help: Optional[str] = None) -> argparse._ArgumentGroup:
    """The data flag group: ``--dataset --data-root [--split] [--label-map]``."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", default=None, choices=sorted(DATASETS),
                       help="dataset layout (default: the checkpoint's, else voc)")
    group.add_argument("--data-root", default=None, help="dataset root directory")
    if with_split:
        group.add_argument("--split", default=split, help=f"split to use (default: {split})")
    if label_map_help is not None:
        group.add_argument("--label-map", default=None, help=label_map_help)
    return group


def make_dataset(name: str, root: Optional[str], split: Optional[str], transform: Optional[Transform],
                 **kwargs: Any) -> SegmentationDataset:
    if not root:
        raise CLIError("--data-root is required: the folder holding the dataset (see README 'Datasets')")
    return build_dataset(name, root, split, transform, **kwargs)


# ---------------------------------------------------------------------- inference flags
# One flag group for every subcommand that predicts (eval, predict): the flags are the
# fields of InferenceConfig, named the same everywhere.
PAPER_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


class DeprecatedAlias(argparse.Action):
    """An old flag name that still works for a release: stores into the new flag's ``dest``
    (``True`` for an on/off flag, ``nargs=0``) and prints one warning line to stderr."""

    def __init__(self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, True if self.nargs == 0 else values)  # nargs=0: an old on/off flag


# One argparse spec per InferenceConfig field: the flag group is generated from
# dataclasses.fields(InferenceConfig), so a new field without a flag fails at import.
def _inference_flag_specs(defaults: InferenceConfig) -> Dict[str, Dict[str, Any]]:
    return {
        "mode": dict(default=defaults.mode, choices=list(INFERENCE_MODES), help="whole image or sliding window"),
        "scales": dict(type=float, nargs="+", default=list(defaults.scales),
                       help=f"input scales whose softmax is averaged (paper: {' '.join(map(str, PAPER_SCALES))})"),
        "flip": dict(action="store_true", help="also average the left-right flipped input"),
        "crop_size": dict(type=int, default=defaults.crop_size, help="sliding-window size"),
        "stride": dict(type=int, default=defaults.stride, help="sliding-window step"),
        "output_stride": dict(type=int, default=None, choices=list(OUTPUT_STRIDES),
                              help="rebuild the checkpoint at this output stride (default: the checkpoint's)"),
        "pad_to": dict(type=int, nargs=2, default=None, metavar=("H", "W"),
                       help="pad every image to this size first, as TF evaluates (VOC 513 513, Cityscapes 1025 2049)"),
        "precision": dict(default=defaults.precision, choices=list(INFERENCE_PRECISIONS),
                          help="auto: the fastest this CPU accelerates whose stored export parity is in bound "
                               "(fp32 for a checkpoint; deeplab eval: the file's own)"),
    }


def add_inference_args(parser: argparse.ArgumentParser, *, deprecated_crop: bool = False) -> argparse._ArgumentGroup:
    """Add the inference flags, one per :class:`~deeplab.config.InferenceConfig` field
    (``--mode --scales --flip --crop-size --stride --output-stride --pad-to --precision``), as one
    group generated from ``dataclasses.fields(InferenceConfig)``.

    Args:
        parser: the subcommand's parser.
        deprecated_crop: also accept ``--crop`` (``deeplab eval``'s old name of
            ``--crop-size``), with a warning.

    Returns:
        The argument group.
    """
    specs = _inference_flag_specs(InferenceConfig())
    group = parser.add_argument_group("inference (the paper: --output-stride 8 --scales 0.5 ... 1.75 --flip)")
    for field in dataclasses.fields(InferenceConfig):
        group.add_argument("--" + field.name.replace("_", "-"), dest=field.name, **specs[field.name])
        if field.name == "crop_size" and deprecated_crop:
            group.add_argument("--crop", dest="crop_size", type=int, action=DeprecatedAlias, new="--crop-size",
                               help="deprecated: use --crop-size")
    return group


def inference_config(args: argparse.Namespace) -> InferenceConfig:
    """The :class:`~deeplab.config.InferenceConfig` of flags added by :func:`add_inference_args`.

    Raises:
        deeplab._utils.ConfigError: an invalid combination (e.g. ``--stride`` larger than
            ``--crop-size`` with ``--mode slide``); the message says what is allowed.
    """
    values = {field.name: getattr(args, field.name) for field in dataclasses.fields(InferenceConfig)}
    if values["pad_to"] is not None:
        values["pad_to"] = tuple(values["pad_to"])
    return InferenceConfig.from_dict(values)


# ---------------------------------------------------------------------- runtime, progress
# One vocabulary and one default per flag across subcommands.


def backend_name(value: str) -> str:
    """argparse type of ``--backend``: the one vocabulary, ``torchscript`` read as ``torch``."""
    if value in BACKEND_ALIASES:
        print(f"deeplab: warning: --backend {value} is deprecated; use --backend {BACKEND_ALIASES[value]}",
              file=sys.stderr)
        return BACKEND_ALIASES[value]
    return value


def add_runtime_args(parser: argparse.ArgumentParser, *, threads: bool = True) -> None:
    """``--backend`` (:data:`deeplab.deploy.open.BACKENDS`, default ``auto``), ``--device``
    (default ``auto``: CUDA where there is one for a checkpoint, else the CPU) and ``--threads``."""
    parser.add_argument("--backend", default="auto", type=backend_name, choices=list(BACKENDS),
                        help="auto: PyTorch for a checkpoint, ONNX Runtime for .onnx, OpenVINO for .xml, PyTorch "
                             "for TorchScript; torch: a checkpoint or TorchScript file; onnxruntime/openvino: an .onnx file")
    parser.add_argument("--device", default="auto", help="checkpoints: auto, cpu, cuda, cuda:N (exported files run on the CPU)")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: all cores)")


def add_progress_args(parser: argparse.ArgumentParser, *, quiet_alias: bool = False) -> None:
    """``--no-progress`` (``--quiet`` as a deprecated alias where a subcommand had it)."""
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    if quiet_alias:
        parser.add_argument("--quiet", dest="no_progress", nargs=0, action=DeprecatedAlias, new="--no-progress",
                            help="deprecated: use --no-progress")


# ---------------------------------------------------------------------- model source: a file or a zoo name
# One flag pair for every subcommand that loads a model (predict, eval, export): --checkpoint FILE
# or --model NAME (the paper's zoo; downloaded, converted and cached on first use).


@dataclass(frozen=True)
class ModelSource:
    """What ``--checkpoint`` / ``--model`` resolved to.

    Attributes:
        path: the file to load (for a zoo name, its converted checkpoint in the cache).
        entry: the zoo entry, or ``None`` for a file.
    """

    path: str
    entry: Optional[ZooEntry] = None


def add_model_source_args(parser: argparse.ArgumentParser, *, what: str = "deeplab checkpoint (.pt)") -> None:
    """Add ``--checkpoint FILE | --model NAME`` (one of them required) and ``--mirror URL``."""
    group = parser.add_argument_group("model (--checkpoint or --model)")
    one = group.add_mutually_exclusive_group(required=True)
    one.add_argument("--checkpoint", default=None, help=what)
    one.add_argument("--model", default=None, metavar="NAME",
                     help="a model of the paper's zoo (deeplab weights list), downloaded from its official location "
                          "on first use and cached, or hf://ORG/NAME[@REV] from the Hugging Face Hub; a file path "
                          "here works like --checkpoint")
    group.add_argument("--mirror", default=None, metavar="URL",
                       help=f"fetch zoo tarballs from this base URL or folder instead of {ZOO_BASE_URL} "
                            f"(or set ${ZOO_URL_ENV})")


def resolve_model_source(args: argparse.Namespace, *, eval_settings: bool = False) -> ModelSource:
    """Turn ``--checkpoint`` / ``--model`` into a file; sets ``args.checkpoint`` to it.

    A zoo name is fetched (download, convert, cache; a cache hit makes no request). Its eval
    crop fills ``--pad-to`` when that flag was not given; with ``eval_settings`` the entry's
    ``--output-stride``, ``--scales`` and ``--flip`` (the setting of the zoo's reported mIoU) fill
    those flags too when they were left at their defaults.

    Raises:
        CLIError: ``--model`` is neither a zoo name nor an existing file, or names a backbone.
    """
    name = getattr(args, "model", None)
    if name is None:
        return ModelSource(str(args.checkpoint))
    if name.startswith("hf://"):  # a Hugging Face Hub model: fetched, verified, kept as a checkpoint
        path, _ = resolve_source(name)
        args.checkpoint = str(path)
        return ModelSource(args.checkpoint)
    if name not in ZOO:
        if Path(name).expanduser().exists():  # the old `--model FILE` spelling of predict
            args.checkpoint = name
            return ModelSource(name)
        raise CLIError(f"--model {name}: not a model of the zoo nor a file; zoo names are {sorted(ZOO)} "
                       "(deeplab weights list)")
    entry = ZOO[name]
    if entry.is_backbone:
        raise CLIError(f"--model {name} is an ImageNet backbone, not a segmentation model; train with "
                       f"--pretrained-backbone zoo:{name}")
    path, _ = resolve_source(name, mirror=getattr(args, "mirror", None))  # the zoo, as Segmenter.open fetches it
    args.checkpoint = str(path)
    if hasattr(args, "pad_to") and args.pad_to is None and entry.pad_to is not None:
        args.pad_to = list(entry.pad_to)
    if eval_settings:
        if getattr(args, "output_stride", 0) is None:
            args.output_stride = entry.eval_output_stride
        if list(getattr(args, "scales", [])) == [1.0]:
            args.scales = list(entry.eval_scales)
        if getattr(args, "flip", True) is False:
            args.flip = entry.eval_flip
    return ModelSource(str(path), entry)


def zoo_comparison(source: ModelSource, miou: float, split: Optional[str]) -> Optional[str]:
    """``zoo: 82.20 (val, OS 16, scales 1.0) | ours: 82.21`` for a zoo model, else ``None``."""
    entry = source.entry
    if entry is None or entry.miou is None:
        return None
    line = f"zoo {entry.name}: mIoU {entry.miou:.2f} ({entry.miou_split}, {entry.eval_setting()}) | ours: {100 * miou:.2f}"
    if split is not None and split != entry.miou_split:
        line += f" on {split} (not comparable: the zoo's figure is on {entry.miou_split})"
    return line

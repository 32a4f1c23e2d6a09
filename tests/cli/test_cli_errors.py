"""The one CLI error wrapper: one ``deeplab <cmd>: error:`` line, exit 2, also from DataLoader workers."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List

import pytest
import torch
from PIL import Image

# torch's own re-raise: the text the wrapper must read
from torch.utils.data._utils import ExceptionWrapper

import deeplab
from deeplab._utils import DeeplabError
from deeplab.checkpoint import save_checkpoint
from deeplab.cli.common import cli_command, user_error_message, worker_message
from deeplab.cli.main import SUBCOMMANDS
from deeplab.data.base import DatasetError

from tests.data_fixtures import label_array, make_voc, save_mask

VAL = ["v0", "v1"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 21-class checkpoint (VOC's classes), random weights: eval fails on the data, not the model."""
    torch.manual_seed(0)
    model = deeplab.build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=21, pretrained_backbone=None)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "best.pt",
                           {"model": model.state_dict(), "config": model.config.to_dict()})


def run_cli(*argv: str, debug: bool = False) -> subprocess.CompletedProcess:
    """``python -m deeplab.cli.main ...`` in a fresh process (DataLoader workers really fork)."""
    env = {k: v for k, v in os.environ.items() if k != "DEEPLAB_DEBUG"}
    if debug:
        env["DEEPLAB_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "deeplab.cli.main", *argv], env=env, capture_output=True,
                          text=True, timeout=300)


def eval_argv(checkpoint: Path, root: Path, workers: int) -> List[str]:
    return ["eval", "--checkpoint", str(checkpoint), "--data-root", str(root), "--num-workers", str(workers),
            "--device", "cpu", "--no-progress", "--out", str(root / "report")]


def one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    """The single stderr line of a failed run, checked for exit status 2 and the prefix."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"deeplab {command}: error: "), lines[0]
    return lines[0]


@pytest.fixture()
def corrupt_jpeg_root(tmp_path: Path) -> Path:
    root = make_voc(tmp_path / "voc", {"train": ["t0"], "val": VAL})
    jpeg = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "v1.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[:40])  # a JPEG header and nothing after it
    return root


@pytest.fixture()
def label40_root(tmp_path: Path) -> Path:
    root = make_voc(tmp_path / "voc", {"train": ["t0"], "val": VAL})
    save_mask(root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "v1.png", label_array((0, 40, 255)))
    return root


# --------------------------------------------------------------------------- bad files, with and without workers


@pytest.mark.spawn
@pytest.mark.parametrize("workers", [0, 2])
def test_eval_corrupt_jpeg_is_one_line_naming_the_file(checkpoint: Path, corrupt_jpeg_root: Path,
                                                       workers: int) -> None:
    line = one_error_line(run_cli(*eval_argv(checkpoint, corrupt_jpeg_root, workers)), "eval")
    jpeg = corrupt_jpeg_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "v1.jpg"
    assert f"cannot read image {jpeg}: the file is truncated or corrupt" in line
    assert "DataLoader worker" not in line and "Traceback" not in line


@pytest.mark.spawn
@pytest.mark.parametrize("workers", [0, 2])
def test_eval_label_40_is_one_line_naming_the_mask(checkpoint: Path, label40_root: Path, workers: int) -> None:
    line = one_error_line(run_cli(*eval_argv(checkpoint, label40_root, workers)), "eval")
    mask = label40_root / "VOCdevkit" / "VOC2012" / "SegmentationClass" / "v1.png"
    assert f"mask {mask} has label value(s) 40 outside the 21 classes [0, 20]" in line
    assert "DataLoader worker" not in line and "Traceback" not in line


@pytest.mark.spawn
def test_deeplab_debug_shows_the_traceback(checkpoint: Path, label40_root: Path) -> None:
    proc = run_cli(*eval_argv(checkpoint, label40_root, 2), debug=True)
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "DatasetError: Caught DatasetError in DataLoader worker process" in proc.stderr  # the worker's own
    assert "has label value(s) 40" in proc.stderr
    assert "deeplab eval: error:" not in proc.stderr


# --------------------------------------------------------------------------- every subcommand is wrapped


@pytest.mark.spawn
@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--data-root", "{tmp}/nonexistent/voc", "--pretrained-backbone", "none"], "no PASCAL VOC 2012 found at {tmp}/nonexistent/voc"),
        (["train", "--config", "{tmp}/nonexistent.yaml"], "config file {tmp}/nonexistent.yaml does not exist"),
        (["eval", "--checkpoint", "{tmp}/nonexistent.pt", "--data-root", "{tmp}"], "checkpoint not found: {tmp}/nonexistent.pt"),
        (["predict", "{tmp}/x.png", "--checkpoint", "{tmp}/nonexistent.pt", "--out", "{tmp}/o"], "not found: {tmp}/nonexistent.pt"),
        (["export", "--checkpoint", "{tmp}/nonexistent.pt", "--out", "{tmp}/m.onnx"], "checkpoint not found: {tmp}/nonexistent.pt"),
        (["convert", "tf", "{tmp}/nonexistent.tar.gz", "--out", "{tmp}/x.pt"], "{tmp}/nonexistent.tar.gz does not exist"),
    ],
    ids=["train-data-root", "train-config", "eval", "predict", "export", "convert"],
)
def test_missing_path_is_one_line_from_every_subcommand(argv: List[str], message: str, tmp_path: Path) -> None:
    Image.new("RGB", (9, 9)).save(tmp_path / "x.png")
    proc = run_cli(*[a.format(tmp=tmp_path) for a in argv])
    assert message.format(tmp=tmp_path) in one_error_line(proc, argv[0])


class Raising:
    """An argv whose iteration raises: every ``main`` hands argv to argparse first, so this reaches
    each subcommand's body however it is written."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __iter__(self) -> Iterator[str]:
        raise self.exc


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_subcommand_main_goes_through_the_wrapper(name: str, capsys: pytest.CaptureFixture,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPLAB_DEBUG", raising=False)
    main = importlib.import_module(SUBCOMMANDS[name][0]).main
    assert hasattr(main, "__wrapped__")
    assert main(Raising(DatasetError("mask /data/a.png is an RGB image;\n  use index PNGs."))) == 2
    assert capsys.readouterr().err == f"deeplab {name}: error: mask /data/a.png is an RGB image; use index PNGs\n"
    assert main(Raising(PermissionError(13, "Permission denied", "/root/out"))) == 2
    assert capsys.readouterr().err == f"deeplab {name}: error: [Errno 13] Permission denied: '/root/out'\n"
    assert main(Raising(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == f"deeplab {name}: error: interrupted\n"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        main(Raising(ZeroDivisionError("division by zero")))
    monkeypatch.setenv("DEEPLAB_DEBUG", "1")
    with pytest.raises(DatasetError):
        main(Raising(DatasetError("bad file")))
    with pytest.raises(KeyboardInterrupt):
        main(Raising(KeyboardInterrupt()))


def test_user_errors_of_one_command_and_debug_zero(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    @cli_command("demo", user_errors=(ValueError,))
    def main(argv: object = None) -> int:
        raise ValueError("lr must be > 0, got -1.0")

    monkeypatch.setenv("DEEPLAB_DEBUG", "0")  # "0" means off
    assert main() == 2
    assert capsys.readouterr().err == "deeplab demo: error: lr must be > 0, got -1.0\n"

    @cli_command("demo")
    def other(argv: object = None) -> int:
        raise ValueError("a plain ValueError elsewhere is a bug")

    with pytest.raises(ValueError):
        other()


def test_unknown_subcommand_uses_the_same_style(capsys: pytest.CaptureFixture) -> None:
    from deeplab.cli.main import main

    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deeplab: error: unknown subcommand 'frobnicate'; choose from [") and err.count("\n") == 1


# --------------------------------------------------------------------------- reading torch's re-raise text


def reraised(exc: BaseException, where: str = "in DataLoader worker process 3") -> BaseException:
    """What the main process receives when a DataLoader worker raised ``exc`` (torch's own code path)."""
    try:
        try:
            raise OSError("image file is truncated")
        except OSError as cause:
            raise exc from cause
    except BaseException:
        wrapper = ExceptionWrapper(where=where)
    try:
        wrapper.reraise()
    except BaseException as out:
        return out
    raise AssertionError("reraise did not raise")


def test_worker_message_reads_the_original_message_of_a_chained_multiline_error() -> None:
    out = reraised(DatasetError("cannot read image /d/v1.jpg: truncated.\nRe-download it."))
    assert type(out) is DatasetError and str(out).startswith("Caught DatasetError in DataLoader worker process 3.")
    assert worker_message(str(out)) == "cannot read image /d/v1.jpg: truncated.\nRe-download it."
    assert user_error_message(out) == "cannot read image /d/v1.jpg: truncated. Re-download it"


def test_worker_message_for_builtin_types_empty_messages_and_plain_errors() -> None:
    assert worker_message(str(reraised(FileNotFoundError("image file not found: /d/x.jpg")))) == \
        "image file not found: /d/x.jpg"
    assert worker_message(str(reraised(ValueError()))) == "ValueError"
    assert worker_message(str(reraised(DatasetError("x"), where="in pin memory thread for device 0"))) == "x"
    assert worker_message("cannot read image /d/v1.jpg") is None  # not a re-raise: used as is
    assert user_error_message(DeeplabError("plain")) == "plain"
    assert user_error_message(RuntimeError("a bug")) is None

"""Pictures of every run: curves.png at every eval, ``deeplab plot`` overlaying runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from deeplab.cli import main as cli
from deeplab.train.logging import RunLog
from deeplab.viz import read_metrics


def fake_run(run: Path, steps: int = 6, offset: float = 0.0) -> Path:
    log = RunLog(run, enabled=True, tensorboard=False)
    log.write({"kind": "start", "step": 0})
    for step in range(1, steps + 1):
        log.write({"kind": "train", "step": step, "loss": 2.0 / step + offset, "lr": 0.01 * (1 - step / steps)})
        if step % 3 == 0:
            assert not (run / "curves.png").exists() or step > 3
            log.write({"kind": "eval", "step": step, "mIoU": 0.1 * step + offset})
            assert (run / "curves.png").is_file()  # redrawn at every eval
    log.close()
    return run


def test_curves_png_is_rewritten_at_every_eval(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "a")
    first = (run / "curves.png").stat().st_mtime_ns
    log = RunLog(run, enabled=True, tensorboard=False)
    log.write({"kind": "eval", "step": 7, "mIoU": 0.9})
    log.close()
    assert (run / "curves.png").stat().st_mtime_ns >= first
    with Image.open(run / "curves.png") as img:
        assert img.size[0] > img.size[1] > 200


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "r")
    with open(run / "metrics.jsonl", "a") as f:  # a resumed run repeats steps 5-6, a killed line is cut
        f.write(json.dumps({"kind": "train", "step": 5, "loss": 9.0, "lr": 0.0}) + "\n")
        f.write('{"kind": "train", "st')
    records = read_metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    assert train[4]["loss"] == 9.0


def test_plot_overlays_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", offset=0.05)
    out = tmp_path / "both.png"
    assert cli.main(["plot", str(a), str(b), "--out", str(out)]) == 0
    assert out.stat().st_size > 5000
    text = capsys.readouterr().out
    assert "a: 6 train points, mIoU 0.6000 at step 6" in text and "b: 6 train points" in text
    assert cli.main(["plot", str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err

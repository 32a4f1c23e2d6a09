"""``deeplab predict`` and ``deeplab export`` run in-process: outputs, summaries, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deeplab.cli import export as export_cli
from deeplab.cli import predict as predict_cli
from deeplab.cli.main import main as deeplab_main
from deeplab.deploy.format import read_metadata

from tests.helpers import CLASSES, PALETTE, needs_openvino


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(root / "a.jpg")
    Image.fromarray(rng.integers(0, 255, (41, 33, 3), dtype=np.uint8)).save(root / "b.png")
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8)).save(root / "sub" / "a.png")  # grey, same stem
    (root / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "README.txt").write_text("not an image")
    return root


def test_predict_writes_masks_overlays_probs_and_reports_failures(
    ckpt: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = predict_cli.main([
        str(images), str(images / "sub" / "*.png"), str(images / "README.txt"), str(images / "missing.jpg"),
        "--checkpoint", str(ckpt), "--out", str(out), "--overlay", "--probs", "--quiet",
    ])
    captured = capsys.readouterr()
    assert code == 1  # some files failed
    assert "done: 3, failed: 2" in captured.out
    assert "README.txt" in captured.err and "broken.png" in captured.err and "missing.jpg" in captured.err
    # a.jpg and sub/a.png share a stem: the second gets a suffix
    assert sorted(p.name for p in out.glob("*.png") if "_overlay" not in p.name) == ["a-2.png", "a.png", "b.png"]
    mask = Image.open(out / "a.png")
    assert mask.mode == "P" and mask.size == (53, 37)
    assert mask.getpalette()[:9] == [v for c in PALETTE for v in c]
    assert int(np.asarray(mask).max()) < len(CLASSES)
    assert Image.open(out / "a-2.png").size == (30, 20)
    overlay = Image.open(out / "b_overlay.png")
    assert overlay.mode == "RGB" and overlay.size[1] >= 41 and overlay.size[0] > 33
    probs = np.load(out / "b_probs.npy")
    assert probs.shape == (3, 41, 33) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)
    assert np.array_equal(probs.argmax(0), np.asarray(Image.open(out / "b.png")))


def test_predict_all_good_exits_zero_with_multiscale_flip(ckpt: Path, images: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = deeplab_main(["predict", str(images / "a.jpg"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "o"),
                         "--scales", "0.75", "1.0", "--flip", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "scales=[0.75, 1.0] flip=True" in out and "done: 1, failed: 0" in out


def test_predict_usage_errors(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert predict_cli.main([str(tmp_path / "nothing*.jpg"), "--checkpoint", str(ckpt), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no input files" in err
    assert err.splitlines()[-1].startswith("deeplab predict: error: no input files")  # after the pattern's warning
    img = tmp_path / "x.png"
    Image.new("RGB", (9, 9)).save(img)
    assert predict_cli.main([str(img), "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")]) == 2
    assert "not found" in capsys.readouterr().err
    assert predict_cli.main([str(img), "--checkpoint", str(ckpt), "--backend", "onnxruntime", "--out", str(tmp_path / "o")]) == 2
    assert "export it first" in capsys.readouterr().err


def test_predict_slide_pad_to_and_invalid_inference_flags(ckpt: Path, images: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # The inference flags are eval's: --crop-size, --stride, --pad-to behave the same here.
    code = predict_cli.main([str(images / "b.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "s"),
                             "--mode", "slide", "--crop-size", "33", "--stride", "20", "--pad-to", "65", "65", "--quiet"])
    assert code == 0
    assert "mode=slide scales=[1.0] flip=False" in capsys.readouterr().out
    assert Image.open(tmp_path / "s" / "b.png").size == (33, 41)
    code = predict_cli.main([str(images / "b.png"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"),
                             "--mode", "slide", "--crop-size", "33", "--stride", "65", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "deeplab predict: error: invalid InferenceConfig: stride (65, 65) larger than crop_size (33, 33)" in err


def test_export_cli_onnx_then_predict_with_onnxruntime(ckpt: Path, images: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    model_path = tmp_path / "model.onnx"
    code = export_cli.main(["--checkpoint", str(ckpt), "--format", "onnx", "--out", str(model_path), "--parity-size", "97"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "parity (onnxruntime vs PyTorch, input (1, 3, 97, 97)): max |diff| of logits = " in out
    assert "parity OK" in out
    assert read_metadata(model_path)["classes"] == CLASSES
    torch_out, onnx_out = tmp_path / "t", tmp_path / "o"
    assert predict_cli.main([str(images / "b.png"), "--checkpoint", str(ckpt), "--out", str(torch_out), "--probs", "--quiet"]) == 0
    assert predict_cli.main([str(images / "b.png"), "--checkpoint", str(model_path), "--backend", "onnxruntime",
                             "--out", str(onnx_out), "--probs", "--quiet"]) == 0
    np.testing.assert_allclose(np.load(onnx_out / "b_probs.npy"), np.load(torch_out / "b_probs.npy"), atol=1e-4)


@needs_openvino
def test_predict_with_openvino(ckpt: Path, images: Path, tmp_path: Path) -> None:
    model_path = tmp_path / "model.onnx"
    assert export_cli.main(["--checkpoint", str(ckpt), "--out", str(model_path), "--no-parity"]) == 0
    assert predict_cli.main([str(images / "b.png"), "--checkpoint", str(model_path), "--backend", "openvino",
                             "--out", str(tmp_path / "v"), "--quiet"]) == 0
    assert (tmp_path / "v" / "b.png").is_file()


def test_export_cli_torchscript_and_errors(ckpt: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ts = tmp_path / "model.ts"
    assert export_cli.main(["--checkpoint", str(ckpt), "--format", "torchscript", "--out", str(ts), "--parity-size", "65"]) == 0
    assert "parity (torchscript vs PyTorch" in capsys.readouterr().out
    assert predict_cli.main([str(images / "a.jpg"), "--checkpoint", str(ts), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    assert export_cli.main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "not found" in capsys.readouterr().err
    # an impossible tolerance makes the parity check fail loudly
    assert export_cli.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m.onnx"), "--parity-size", "33",
                            "--tolerance", "0"]) == 1
    assert "parity FAILED" in capsys.readouterr().err


def test_collect_inputs_and_names(images: Path) -> None:
    files, problems = predict_cli.collect_inputs([str(images), str(images / "a.jpg"), "nope/*.png"])
    assert [p.name for p in files] == ["a.jpg", "b.png", "broken.png"]  # folder: image suffixes only, no duplicates
    assert problems == ["nope/*.png: pattern matched no files"]
    files, _ = predict_cli.collect_inputs([str(images)], recursive=True)
    assert len(files) == 4
    names = predict_cli.output_names(files)
    assert sorted(names.values()) == ["a", "a-2", "b", "broken"]

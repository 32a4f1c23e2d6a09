"""`deeplab train` and `deeplab eval` end to end on tiny datasets in the real layouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deeplab.checkpoint import load_checkpoint
from deeplab.cli import main as cli

from tests.data_fixtures import label_array, make_folder, make_voc

TINY = ["--backbone", "mobilenet_v2", "--pretrained-backbone", "none", "--crop-size", "33", "--batch-size", "2",
        "--num-workers", "0", "--device", "cpu", "--no-progress", "--log-every", "1"]


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    return make_voc(tmp_path / "voc", {"train": ["t0", "t1", "t2", "t3"], "val": ["v0", "v1", "v2"]})


def test_train_then_eval_on_voc_layout(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    assert cli.main(["train", "--data-root", str(voc_root), "--max-steps", "2", "--eval-every", "2",
                     "--ckpt-every", "1", "--out", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "model:" in out and "recipe:" in out and '"mobilenet_v2"' in out  # resolved config printed
    assert "finished at step 2" in out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "mIoU" in r]
    assert [r["step"] for r in evals] == [2]
    # the logged mIoU is the mean of the logged per-class IoUs over the classes that occurred
    present = [v for v in evals[0]["iou"] if v is not None]  # None: class absent from prediction and truth
    assert present and evals[0]["mIoU"] == pytest.approx(sum(present) / len(present), abs=1e-12)
    assert any(r.get("kind") == "train" and r["step"] == 1 for r in records)
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["config"]["backbone"] == "mobilenet_v2" and ckpt["config"]["num_classes"] == 21
    assert ckpt["classes"][15] == "person" and ckpt["dataset"]["dataset"] == "voc"
    assert ckpt["normalization"]["mean"] == pytest.approx([0.485, 0.456, 0.406])

    # eval: dataset taken from the checkpoint, paper-style inference options.
    assert cli.main(["eval", "--checkpoint", str(run / "best.pt"), "--data-root", str(voc_root),
                     "--output-stride", "8", "--scales", "0.75", "1.0", "--flip", "--num-workers", "0",
                     "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    report_dir = run / "eval_val_os8_ms_flip"
    report = json.loads((report_dir / "report.json").read_text())
    assert report["config"]["output_stride"] == 8 and report["config"]["images"] == 3
    assert (report_dir / "confusion.png").is_file()
    matrix = torch.tensor(report["confusion_matrix"])
    # Every non-ignore pixel of the 3 val masks is counted exactly once.
    labels = label_array((0, 1, 15, 255))
    assert int(matrix.sum()) == 3 * int((labels != 255).sum())
    assert matrix.sum(1)[[0, 1, 15]].tolist() == [3 * int((labels == c).sum()) for c in (0, 1, 15)]
    assert f"mIoU {100 * report['metrics']['mIoU']:.2f}" in out


def test_rerun_resumes_instead_of_overwriting(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = ["train", "--data-root", str(voc_root), "--val-split", "none", "--out", str(run), *TINY]
    assert cli.main(args + ["--max-steps", "1"]) == 0
    first = load_checkpoint(run / "last.pt")["model"]
    # Same command with a bigger budget continues from step 1; '--resume none' refuses to overwrite.
    assert cli.main(args + ["--max-steps", "1", "--resume", "none"]) == 2
    assert "last.pt" in capsys.readouterr().err
    assert torch.equal(load_checkpoint(run / "last.pt")["model"]["classifier.weight"], first["classifier.weight"])


def test_preset_fills_flags_and_command_line_wins(voc_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    preset = tmp_path / "preset.yaml"
    preset.write_text("expected_miou: 1.0\nlr: 1e-3\nmax_steps: 1\nbatch_size: 2\nval_split: none\n"
                      "arch: deeplabv3\naspp_rates: []\nweight_decay: 1e-4\n")
    run = tmp_path / "run"
    assert cli.main(["train", "--config", str(preset), "--data-root", str(voc_root), "--out", str(run),
                     "--weight-decay", "0.5", *TINY]) == 0
    ckpt = load_checkpoint(run / "last.pt")
    assert ckpt["train_config"]["lr"] == pytest.approx(1e-3)  # YAML's "1e-3" string became a float
    assert ckpt["train_config"]["weight_decay"] == 0.5  # typed flag beats the preset
    assert ckpt["config"]["arch"] == "deeplabv3" and ckpt["config"]["aspp_rates"] == []

    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 0.1\n")
    assert cli.main(["train", "--config", str(bad), "--data-root", str(voc_root)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: unknown keys ['learning_rate']" in err


def test_every_shipped_preset_parses() -> None:
    from deeplab.cli.common import parse_with_preset
    from deeplab.cli.train import _model_config, _train_config, build_parser
    from deeplab.config import ModelConfig

    presets = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(presets) >= 4
    for preset in presets:
        args = parse_with_preset(build_parser(), ["--config", str(preset)])
        _train_config(args)
        values = _model_config(args)
        ModelConfig(**{**values, "num_classes": values["num_classes"] or 21})


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--out", "x"], "--data-root is required"),
        (["train", "--data-root", "/nonexistent/voc"], "/nonexistent/voc"),
        (["eval", "--checkpoint", "/nonexistent/best.pt", "--data-root", "x"], "/nonexistent/best.pt"),
    ],
)
def test_user_errors_are_one_line(argv: list, message: str, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert err.startswith(f"deeplab {argv[0]}: error: ") and err.count("\n") == 1


def test_folder_dataset_and_init_from(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_folder(tmp_path / "folder", names=("a", "b", "c", "d"))
    run = tmp_path / "run"
    common = ["train", "--dataset", "folder", "--data-root", str(root), "--train-split", "all", "--val-split", "all",
              "--max-steps", "1", *TINY]
    assert cli.main(common + ["--out", str(run)]) == 0
    # Fine-tune from it at OS 8 with frozen BN: weights carried over, then trained.
    assert cli.main(common + ["--out", str(tmp_path / "os8"), "--init-from", str(run / "last.pt"),
                              "--output-stride", "8", "--freeze-bn"]) == 0
    assert load_checkpoint(tmp_path / "os8" / "last.pt")["config"]["output_stride"] == 8
    # A checkpoint for another head does not fit.
    capsys.readouterr()
    assert cli.main(common + ["--out", str(tmp_path / "bad"), "--init-from", str(run / "last.pt"),
                              "--arch", "deeplabv3"]) == 2
    assert "--init-from" in capsys.readouterr().err


INFERENCE_FLAGS = [
    ["--mode", "slide", "--crop-size", "65", "--stride", "33"],
    ["--scales", "0.5", "0.75", "1.0", "1.25", "1.5", "1.75", "--flip", "--output-stride", "8"],
    ["--pad-to", "513", "513"],
    [],
]


@pytest.mark.parametrize("flags", INFERENCE_FLAGS)
def test_eval_and_predict_parse_the_same_inference_config(flags: list) -> None:
    from deeplab.cli import eval as eval_cli
    from deeplab.cli import predict as predict_cli
    from deeplab.cli.common import inference_config
    from deeplab.config import InferenceConfig

    eval_args = eval_cli.build_parser().parse_args(["--checkpoint", "m.pt", *flags])
    predict_args = predict_cli.build_parser().parse_args(["img.png", "--checkpoint", "m.pt", "--out", "o", *flags])
    config = inference_config(eval_args)
    assert isinstance(config, InferenceConfig)
    assert config == inference_config(predict_args)
    if not flags:
        assert config == InferenceConfig()  # the flags' defaults are the config's


def test_eval_crop_is_a_deprecated_alias_of_crop_size(capsys: pytest.CaptureFixture) -> None:
    from deeplab.cli import eval as eval_cli
    from deeplab.cli.common import inference_config

    parser = eval_cli.build_parser()
    old = parser.parse_args(["--checkpoint", "m.pt", "--mode", "slide", "--crop", "65", "--stride", "33"])
    err = capsys.readouterr().err
    assert err == "deeplab eval: warning: --crop is deprecated; use --crop-size\n"
    new = parser.parse_args(["--checkpoint", "m.pt", "--mode", "slide", "--crop-size", "65", "--stride", "33"])
    assert capsys.readouterr().err == ""
    assert inference_config(old) == inference_config(new) and inference_config(old).crop_size == 65


def test_invalid_inference_flags_are_one_line_errors(capsys: pytest.CaptureFixture) -> None:
    # Checked before the checkpoint is opened: the message names the field and the rule.
    assert cli.main(["eval", "--checkpoint", "/nonexistent/best.pt", "--data-root", "x", "--mode", "slide",
                     "--crop-size", "33", "--stride", "65"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deeplab eval: error: invalid InferenceConfig: stride (65, 65) larger than crop_size (33, 33)")
    assert "Traceback" not in err and err.count("\n") == 1

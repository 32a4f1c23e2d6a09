"""Core ML: ``deeplab export --format coreml`` converts (torch.export + coremltools) and checks the
package's specification; Core ML has no Linux runtime, so nothing here runs the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deeplab._utils import ConfigError
from deeplab.cli import main as cli
from deeplab.deploy.format import sniff_format

from tests.helpers import CLASSES, make_checkpoint


@pytest.mark.slow
def test_export_coreml_writes_an_mlpackage_with_the_interface_and_metadata(tmp_path: Path, capsys) -> None:
    ct = pytest.importorskip("coremltools")
    from deeplab.deploy.coreml import check_spec
    from deeplab.deploy.open import open_model

    ckpt = make_checkpoint(tmp_path / "model.pt")
    out = tmp_path / "model.mlpackage"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "coreml", "--input-size", "65", "97",
                     "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Core ML spec checked: image (1, 3, 65, 97) float32 -> logits (1, 3, 65, 97) float32" in printed
    assert "parity not measured here" in printed
    assert out.is_dir() and sniff_format(out) == "coreml"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model.mlpackage.")]  # no staging left
    spec = check_spec(out, 3, (65, 97))
    meta = json.loads(spec["metadata"]["deeplab"])
    assert meta["classes"] == CLASSES and meta["input_size"] == [65, 97] and meta["precision"] == "fp32"
    assert meta["config"]["backbone"] == "mobilenet_v2"
    program = ct.models.MLModel(str(out), skip_model_load=True).get_spec()
    assert program.WhichOneof("Type") == "mlProgram"
    with pytest.raises(ConfigError, match="runs on macOS / iOS only"):
        open_model(out)
    with pytest.raises(Exception, match="does not have the expected interface"):
        check_spec(out, 21, (65, 97))


def test_export_coreml_flag_errors(tmp_path: Path, capsys) -> None:
    ckpt = make_checkpoint(tmp_path / "model.pt")
    assert cli.main(["export", "--checkpoint", str(ckpt), "--format", "coreml", "--precision", "int8",
                     "--out", str(tmp_path / "m.mlpackage")]) == 2
    assert "--format coreml writes fp32" in capsys.readouterr().err

"""`deeplab info` counts Mult-Adds by running the models; the figures match the paper's."""

from __future__ import annotations

import json

import pytest

from deeplab.cli import main as cli
from deeplab.cli.info import count


def test_xception65_separable_mult_adds_match_paper() -> None:
    # Paper, Table 5: Xception-65, decoder, separable ASPP + decoder, OS 16, 513x513: 54.17B.
    row = count(arch="deeplabv3plus", backbone="xception65", output_stride=16, separable=True)
    assert row["mult_adds"] / 1e9 == pytest.approx(54.17, rel=0.01)
    assert row["params"] == 41_055_413


def test_mobilenet_v2_released_head_mult_adds_match_paper() -> None:
    # The released mobile DeepLabv3 (image pooling + 1x1 only): 2.75B Mult-Adds at OS 16, 513x513.
    from torch.utils.flop_counter import FlopCounterMode
    import torch

    from deeplab.models import build_model

    with torch.device("meta"):
        model = build_model(arch="deeplabv3", backbone="mobilenet_v2", aspp_rates=()).eval()
        x = torch.empty(1, 3, 513, 513)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    assert counter.get_total_flops() / 2e9 == pytest.approx(2.75, rel=0.01)


def test_output_stride_8_costs_more_and_separable_less() -> None:
    base = count(arch="deeplabv3plus", backbone="resnet50", output_stride=16, separable=True)
    os8 = count(arch="deeplabv3plus", backbone="resnet50", output_stride=8, separable=True)
    regular = count(arch="deeplabv3plus", backbone="resnet50", output_stride=16, separable=False)
    assert os8["mult_adds"] > 2.5 * base["mult_adds"]
    assert os8["params"] == base["params"]
    assert regular["mult_adds"] > base["mult_adds"] and regular["params"] > base["params"]


def test_info_cli_prints_table_and_json(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["info", "--backbone", "mobilenet_v2", "--arch", "deeplabv3plus", "--output-stride", "16",
                     "--separable", "on"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| arch | backbone | OS |")
    assert out[2].startswith("| deeplabv3plus | mobilenet_v2 | 16 | separable | 2.72 |")
    assert cli.main(["info", "--backbone", "mobilenet_v2", "--arch", "deeplabv3", "--output-stride", "8",
                     "--separable", "off", "--json"]) == 0
    row = json.loads(capsys.readouterr().out.strip())
    assert row["output_stride"] == 8 and row["separable"] is False and row["mult_adds"] > 1e9


def test_unknown_subcommand_and_help(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert "unknown subcommand 'frobnicate'" in err and err.startswith("deeplab: error: ")
    assert cli.main([]) == 0
    assert "subcommands:" in capsys.readouterr().out

"""Quantization-aware fine-tuning (``--qat``): the rounding it simulates and ONNX Runtime's agree, the
ranges it tracks are saved, resumed exactly and written into the int8 export, and the caller's model
and checkpoints keep their float form."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch
from torch import nn

from deeplab._utils import ConfigError
from deeplab.checkpoint import load_checkpoint
from deeplab.config import TrainConfig
from deeplab.train import freeze_batchnorm, set_train_mode
from deeplab.train.qat import (
    EMA_DECAY,
    activation_qparams,
    disable_fake_quant,
    enable_fake_quant,
    fake_quant_activation,
    fake_quant_weight,
    fake_quantized_convs,
    qat_state,
)
from tests.helpers import small_model
from tests.train.test_train import assert_identical, make_cfg, run


def test_weights_round_to_a_symmetric_per_channel_grid_with_identity_gradient() -> None:
    w = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    with torch.no_grad():
        w[2] *= 100.0  # channels keep their own scale
    for qmax in (127, 64):
        q = fake_quant_weight(w, qmax)
        scale = w.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / qmax
        steps = (q.detach() / scale).double()
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= qmax + 1e-3
        assert (q.detach() - w.detach()).abs().le(scale / 2 * (1 + 1e-5)).all()  # at most half a step away
    upstream = torch.randn_like(w)
    fake_quant_weight(w).backward(upstream)
    assert torch.equal(w.grad, upstream)  # straight through: no weight lies outside its own range


def test_weight_rounding_commutes_with_frozen_batchnorm_folding() -> None:
    # folded weight = w * s_c (s_c = gamma / sqrt(var + eps), any sign): rounding per channel before or
    # after folding gives the same weights, so QAT's rounding of the unfolded conv is the export's
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 3, 3, 3, generator=g)
    s = torch.randn(8, 1, 1, 1, generator=g)
    a, b = fake_quant_weight(w) * s, fake_quant_weight(w * s)
    step = (w * s).abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    # in steps: equal up to float32 rounding (~1e-6 of a value of 127 steps); a value lying exactly
    # between two steps may round either way (one step, rarely)
    k = ((a - b) / step).abs()
    assert (k < 1e-4).float().mean() > 0.999 and (k < 1.001).all()


def test_activation_parameters_are_onnx_runtimes() -> None:
    from onnxruntime.quantization.quant_utils import compute_scale_zp

    for lo, hi in [(-1.3, 4.2), (0.0, 6.0), (0.5, 3.0), (-7.0, -0.25), (-2.0, 0.0)]:
        zero, scale = compute_scale_zp(np.array(lo, np.float32), np.array(hi, np.float32), np.array(0, np.uint8),
                                       np.array(255, np.uint8))
        ours = activation_qparams(lo, hi)
        assert ours[1] == int(zero) and ours[0] == pytest.approx(float(scale), rel=1e-6), (lo, hi)


def test_activations_round_to_256_levels_and_clip_outside_the_range() -> None:
    x = (torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(2)) * 3 + 1).requires_grad_()
    lo, hi = -2.0, 5.0
    q = fake_quant_activation(x, lo, hi)
    scale, zero = activation_qparams(lo, hi)
    levels = torch.unique(q.detach())
    assert len(levels) <= 256 and levels.min() >= -zero * scale - 1e-6 and levels.max() <= (255 - zero) * scale + 1e-5
    inside = (x.detach() >= -zero * scale) & (x.detach() <= (255 - zero) * scale)
    assert (q.detach() - x.detach())[inside].abs().max() <= scale / 2 + 1e-6
    q.sum().backward()
    assert torch.equal(x.grad, inside.float())  # the clipped values pass no gradient
    relu = torch.relu(torch.randn(1, 4, 5, 5))
    assert (fake_quant_activation(relu, 0.0, 3.0)[relu == 0] == 0).all()  # exact zeros stay zeros


def test_enable_tracks_ranges_in_training_only_and_disable_restores_float_exactly() -> None:
    model = small_model(num_classes=5)
    x1, x2 = (torch.randn(1, 3, 65, 65, generator=torch.Generator().manual_seed(s)) for s in (3, 4))
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model.eval()(x1)
    ranges = enable_fake_quant(model, scheme="u8s8")
    names = [n for n, _ in fake_quantized_convs(model)]
    assert names and not any(n.startswith(("classifier", "aspp.image_pool")) for n in names)
    assert enable_fake_quant(model) is ranges  # idempotent
    first_conv = model.backbone.features[0][0]
    seen: Dict[str, Any] = {}
    first_conv.register_forward_pre_hook(lambda m, inp: seen.setdefault("x", []).append(inp[0].detach()))
    freeze_batchnorm(model)
    set_train_mode(model.train(), freeze_bn=True)  # as --qat trains: convs in training, BN frozen
    with torch.no_grad():
        model(x1)
        model(x2)
    a, b = seen["x"]
    lo = EMA_DECAY * float(a.min()) + (1 - EMA_DECAY) * float(b.min())
    hi = EMA_DECAY * float(a.max()) + (1 - EMA_DECAY) * float(b.max())
    assert ranges.ranges[names[0]] == pytest.approx([lo, hi], rel=1e-6)
    assert set(ranges.ranges) == set(names)
    frozen = {k: list(v) for k, v in ranges.ranges.items()}
    with torch.no_grad():
        rounded = model.eval()(x1)
    assert ranges.ranges == frozen  # eval mode rounds with the tracked ranges and leaves them
    assert not torch.equal(rounded, ref)
    assert (rounded - ref).abs().max() < 0.5 * ref.abs().max()  # int8 moves logits a little, not to noise
    assert list(model.state_dict()) == keys  # checkpoints keep their keys
    assert qat_state(model)["ranges"] == frozen and qat_state(model)["scheme"] == "u8s8"
    disable_fake_quant(model)
    assert qat_state(model) is None
    with torch.no_grad():
        assert torch.equal(model(x1), ref)


def test_qat_needs_frozen_batchnorm() -> None:
    with pytest.raises(ConfigError, match="qat fine-tunes with BatchNorm frozen"):
        TrainConfig(qat=True)
    assert TrainConfig(qat=True, freeze_bn=True).recipe.qat


def test_qat_run_saves_its_ranges_and_resumes_exactly(tmp_path: Path) -> None:
    settings = dict(qat=True, freeze_bn=True, max_steps=5, lr=0.01)
    _, ref = run(make_cfg(tmp_path / "ref", **settings))
    saved = load_checkpoint(tmp_path / "ref" / "last.pt")
    assert set(saved["qat"]["ranges"]) == {"conv", "head"} and qat_state(ref) is None  # float again after train()
    run(make_cfg(tmp_path / "split", **settings), stop_at=2)
    _, resumed = run(make_cfg(tmp_path / "split", **settings, resume_from=str(tmp_path / "split" / "last.pt")),
                     model_seed=1)
    assert_identical(resumed.state_dict(), ref.state_dict())
    assert load_checkpoint(tmp_path / "split" / "last.pt")["qat"] == saved["qat"]
    _, plain = run(make_cfg(tmp_path / "plain", freeze_bn=True, max_steps=5, lr=0.01))
    assert load_checkpoint(tmp_path / "plain" / "last.pt")["qat"] is None
    assert not torch.equal(plain.state_dict()["conv.weight"], ref.state_dict()["conv.weight"])  # QAT trains otherwise


class _Net(nn.Module):
    """conv-BN-ReLU x2 then a 1x1 conv: every conv input is a tensor ONNX Runtime quantizes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)))


def test_int8_export_uses_the_tracked_ranges_and_rounds_as_qat_did(tmp_path: Path) -> None:
    """The exported file's input scales are the tracked ranges' (not calibrated), and it computes what the
    fake-quantized PyTorch model computes far more closely than what the float model computes."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from deeplab.deploy.export import export_onnx
    from deeplab.deploy.quantize import conv_input_tensors, quantize_onnx

    torch.manual_seed(0)
    model = _Net().eval()
    for bn in (model.a[1], model.b[1]):
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(5)
    images = [torch.randn(1, 3, 24, 24, generator=g) for _ in range(4)]
    ranges = enable_fake_quant(model, scheme="u8s8")
    # ranges a calibration would not pick: wider than any activation here, and the input clipped at +-1
    ranges.ranges = {"a.0": [-1.0, 1.0], "b.0": [0.0, 9.0], "head": [0.0, 7.0]}
    with torch.no_grad():
        fake = model(images[0])
    disable_fake_quant(model)
    with torch.no_grad():
        float_out = model(images[0])

    float_path = export_onnx(model, tmp_path / "fp32.onnx")
    tensors = conv_input_tensors(model, float_path, images[0])
    assert list(tensors) == ["a.0", "b.0", "head"] and tensors["a.0"] == "image"
    given = {tensors[k]: v for k, v in ranges.ranges.items()}
    info = quantize_onnx(float_path, tmp_path / "int8.onnx", [x.numpy() for x in images], method="minmax",
                         keep_float=(), scheme="u8s8", activation_ranges=given)
    assert info["qat_ranges"] == 3
    q = onnx.load(str(tmp_path / "int8.onnx"))
    init = {i.name: numpy_helper.to_array(i) for i in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] == "image":
            scale, zero = activation_qparams(-1.0, 1.0)
            assert float(init[node.input[1]]) == pytest.approx(scale, rel=1e-6) and int(init[node.input[2]]) == zero
            break
    else:
        pytest.fail("the image is not quantized in the int8 file")
    session = ort.InferenceSession(str(tmp_path / "int8.onnx"), providers=["CPUExecutionProvider"])
    out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images[0].numpy()})[0])
    to_fake, to_float = (out - fake).abs().max(), (out - float_out).abs().max()
    assert to_fake < 0.2 * to_float, (float(to_fake), float(to_float))


def test_cli_exports_a_qat_checkpoint_with_its_ranges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``deeplab export --precision int8`` of a checkpoint holding ``qat`` says it used the tracked ranges
    and stores how many; the same weights without ``qat`` are calibrated as usual."""
    from deeplab.checkpoint import save_checkpoint
    from deeplab.cli.export import main
    from deeplab.deploy.format import read_metadata
    from deeplab.deploy.precision import parity_within_bound
    from tests.deploy.test_precision import tiny_model
    from tests.deploy.test_quantize import NORM, write_images

    model = tiny_model()
    ranges = enable_fake_quant(model, scheme="u8s8")
    freeze_batchnorm(model)
    set_train_mode(model.train(), freeze_bn=True)
    with torch.no_grad():
        model((torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0)) - 0.45) / 0.25)
    state = qat_state(model)
    disable_fake_quant(model)
    assert state is not None and len(state["ranges"]) == len(ranges.ranges) > 40
    write_images(tmp_path / "imgs", n=4, size=(48, 64))
    payload = {"model": model.state_dict(), "config": model.config.to_dict(), "classes": ["a", "b", "c"],
               "normalization": NORM}
    for name, qat in (("qat", state), ("plain", None)):
        ckpt = save_checkpoint(tmp_path / f"{name}.pt", {**payload, "qat": qat})
        code = main(["--checkpoint", str(ckpt), "--out", str(tmp_path / f"{name}.onnx"), "--precision", "int8",
                     "--calib-data", str(tmp_path / "imgs"), "--int8-float-fraction", "0", "--int8-scheme", "u8s8"])
        out = capsys.readouterr().out
        meta = read_metadata(tmp_path / f"{name}.onnx")
        quant = meta["quantization"]
        assert code == (0 if parity_within_bound(meta["parity"], "int8") else 1)
        if qat is None:
            assert "quantization-aware" not in out and "qat_ranges" not in quant
            continue
        assert f"int8 input ranges of {len(state['ranges'])} conv(s) from quantization-aware fine-tuning" in out
        # convs reading one tensor (ASPP's branches) share its range: fewer tensors than convs
        assert 0 < quant["qat_ranges"] < len(state["ranges"])
        assert f"input ranges of {quant['qat_ranges']} tensor(s) from quantization-aware fine-tuning" in out

"""Every architecture passes torch.export (strict, dynamic height/width) and torch.compile(fullgraph=True).

As segmentation_models_pytorch's CI does per encoder: export once, then run the exported program at
sizes it was not traced at (odd and even, so TF "SAME" padding takes both branches) and compare with
eager; compile with ``fullgraph=True`` (any graph break is an error) and compare likewise.

All ``slow``: on a shared 2-core machine export takes 25-80 s per backbone, dynamo's capture
(``backend="eager"``: graph breaks and numerics, no C++ build) as long, inductor minutes.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import pytest
import torch

import deeplab

# (backbone, extra ModelConfig fields); the TF-layout and tf_compat variants carry TF SAME padding
CASES: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "mobilenet_v2-tf": ("mobilenet_v2", {"tf_compat": True}),
    "mobilenet_v2-v3": ("mobilenet_v2", {"arch": "deeplabv3", "aspp_rates": ()}),
    "resnet50": ("resnet50", {}),
    "resnet101-os8": ("resnet101", {"output_stride": 8, "multi_grid": (1, 2, 4)}),
    "xception41": ("xception41", {}),
    "xception65-tf": ("xception65", {"tf_compat": True}),
    "xception71": ("xception71", {}),
    "resnet_v1_50": ("resnet_v1_50", {}),
    "resnet_v1_101": ("resnet_v1_101", {}),
    "resnet_v1_50_beta": ("resnet_v1_50_beta", {}),
    "resnet_v1_101_beta": ("resnet_v1_101_beta", {"tf_compat": True}),
}
TRACE_SIZE = (65, 97)
CHECK_SIZES = ((50, 81), (96, 64))  # neither is the traced size; even and odd sides


def test_cases_cover_every_backbone() -> None:
    assert {backbone for backbone, _ in CASES.values()} == set(deeplab.BACKBONES)


def params(kind: str) -> Any:
    return [pytest.param(name, id=f"{kind}-{name}", marks=pytest.mark.slow) for name in CASES]


def model_for(name: str) -> torch.nn.Module:
    backbone, extra = CASES[name]
    torch.manual_seed(0)
    model = deeplab.build_model(backbone=backbone, num_classes=5, **extra).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model


def assert_close_to_eager(got: torch.Tensor, want: torch.Tensor, *, reordered: bool) -> None:
    """Equal to eager: exactly the same kernels give float32 round-off at most; a fused/reordered
    graph (inductor) differs by float32 accumulation error, relative to the logits' scale."""
    assert got.shape == want.shape
    scale = float(want.abs().max())
    eps = torch.finfo(torch.float32).eps
    tol = (1e4 if reordered else 64) * eps * max(scale, 1.0)
    torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=tol)


def inputs() -> Any:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(1, 3, h, w, generator=generator) for h, w in CHECK_SIZES]


@pytest.mark.parametrize("name", params("export"))
def test_torch_export_strict_dynamic_hw(name: str) -> None:
    from torch.export import Dim, export

    model = model_for(name)
    height, width = Dim("height", min=33, max=1025), Dim("width", min=33, max=1025)
    example = torch.randn(1, 3, *TRACE_SIZE)
    program = export(model, (example,), dynamic_shapes={"x": {2: height, 3: width}}, strict=True)
    exported = program.module()
    with torch.no_grad():
        for x in inputs():
            assert_close_to_eager(exported(x), model(x), reordered=False)


@pytest.mark.parametrize("name", params("compile"))
def test_torch_compile_fullgraph(name: str) -> None:
    torch._dynamo.reset()
    model = model_for(name)
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        for x in inputs():
            assert_close_to_eager(compiled(x), model(x), reordered=False)


@pytest.mark.slow
def test_torch_compile_inductor_mobilenet() -> None:
    """Inductor's generated kernels (minutes of C++ build on a CPU) against eager."""
    torch._dynamo.reset()
    model = model_for("mobilenet_v2-tf")
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for x in inputs():
            assert_close_to_eager(compiled(x), model(x), reordered=True)

"""Plain helpers shared by test modules (fixtures live in conftest.py): a tiny model and its
checkpoint in the documented payload format, the optional-extra markers, and the TensorFlow
reference runner."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
import torch
from torch import nn

import deeplab
from deeplab.checkpoint import save_checkpoint

try:
    import openvino  # noqa: F401  (optional extra)

    HAVE_OPENVINO = True
except ImportError:  # optional extra
    HAVE_OPENVINO = False

needs_openvino = pytest.mark.skipif(not HAVE_OPENVINO, reason="openvino not installed (pip install 'deeplab[openvino]')")

CLASSES = ["background", "cat", "dog"]
PALETTE = [[0, 0, 0], [200, 30, 30], [30, 200, 30]]
NORM = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so that folding
    really changes the weights (a fresh model's BNs are identities)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
    return model.eval()


def small_model(arch: str = "deeplabv3plus", backbone: str = "mobilenet_v2", num_classes: int = 3, **kw: Any) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(deeplab.build_model(arch=arch, backbone=backbone, num_classes=num_classes, **kw))


def make_checkpoint(path: Path, arch: str = "deeplabv3plus", backbone: str = "mobilenet_v2") -> Path:
    """A checkpoint in the documented payload format, for a tiny 3-class model."""
    model = small_model(arch, backbone)
    payload: Dict[str, Any] = {
        "model": model.state_dict(),
        "config": model.config.to_dict(),
        "classes": list(CLASSES),
        "palette": [list(c) for c in PALETTE],
        "normalization": dict(NORM),
    }
    return save_checkpoint(path, payload)


def run_tf_reference(out: Path, *args: str) -> Dict[str, Any]:
    """Run tests/tf_reference.py (real TensorFlow, in its own process) into ``out``; its outputs
    (``refs.npz``) and ``"dir"``. Skips where TensorFlow is missing, except in CI, which must run it."""
    if importlib.util.find_spec("tensorflow") is None:
        if os.environ.get("CI"):
            pytest.fail("tensorflow is not installed; the test extra installs tensorflow-cpu and CI must run these")
        pytest.skip("tensorflow is not installed (pip install -c constraints.txt -e '.[test]' installs it)")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    script = Path(__file__).resolve().parent / "tf_reference.py"
    result = subprocess.run([sys.executable, str(script), str(out), *args], env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    data = np.load(out / "refs.npz")
    return {"dir": out, **{key: data[key] for key in data.files}}

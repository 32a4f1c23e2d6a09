"""Parameters and Mult-Adds of a model, counted two ways: the convolution proper and as
TensorFlow's profiler counts the reference graph (the figures of the paper's Tables 3 and 5).

Both counts run the model once on the ``meta`` device (no memory for activations, nothing typed
in). The convolution proper is ``torch.utils.flop_counter.FlopCounterMode``'s count
(convolutions and matmuls, FLOPs / 2).

TensorFlow runs every atrous convolution (rate > 1) as ``SpaceToBatchND -> convolution ->
BatchToSpaceND`` (``tf.nn.convolution`` -> ``with_space_to_batch``). Space-to-batch pads the
input with the "SAME" padding ``rate * (k - 1)`` and then rounds each padded side up to a multiple
of the rate (``required_space_to_batch_paddings``), so the convolution runs over
``(H + e_h) x (W + e_w)`` output positions with ``e = (rate - H % rate) % rate``; the profiler
counts the multiply-adds over that zero padding too. Measured with the authors' own
``research/deeplab/model.py`` under TF's profiler at 513x513 (see docs/faithfulness.md), the
conv proper plus this padding is within 0.5 % of every profiler figure; the rest (~0.2B) is
residual adds, pooling and initialiser ops that are not convolutions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..config import ModelConfig


def space_to_batch_extra(size: int, rate: int, kernel_size: int) -> int:
    """Rows (or columns) that ``SpaceToBatchND`` adds beyond the "SAME" padding of an atrous conv.

    TensorFlow's ``required_space_to_batch_paddings`` pads ``rate * (k - 1)`` ("SAME", split
    start/end) and then extends the end so that the padded side is a multiple of ``rate``; the
    convolution inside space-to-batch then produces ``size + extra`` outputs along that side.

    Args:
        size: input height or width of the convolution.
        rate: atrous rate (dilation) along that side.
        kernel_size: kernel extent along that side.

    Returns:
        The extra output rows (or columns): ``(rate - (size + rate*(k-1)) % rate) % rate``.
    """
    if rate <= 1:
        return 0
    padded = size + rate * (kernel_size - 1)
    return (rate - padded % rate) % rate


@dataclass(frozen=True)
class MultAdds:
    """Mult-Adds of one forward pass.

    Attributes:
        conv: multiply-adds of the convolutions (and matmuls) proper.
        space_to_batch: extra multiply-adds TensorFlow's atrous convolutions spend on the zero
            padding ``SpaceToBatchND`` adds (0 when no conv is atrous).
        backbone_space_to_batch: the part of ``space_to_batch`` inside the backbone.
    """

    conv: float
    space_to_batch: float
    backbone_space_to_batch: float

    @property
    def tf_profiler(self) -> float:
        """The count as TensorFlow's profiler reports the reference graph (the paper's tables)."""
        return self.conv + self.space_to_batch


def count_mult_adds(model: nn.Module, x: torch.Tensor) -> MultAdds:
    """Count a model's Mult-Adds on input ``x`` (any device; use ``meta`` for free counting).

    Args:
        model: a module whose convolutions are ``nn.Conv2d`` (their subclasses included).
        x: an input batch, ``(B, C, H, W)``.

    Returns:
        The conv-proper count and the space-to-batch padding TensorFlow would add.
    """
    backbone = getattr(model, "backbone", None)
    in_backbone = {id(m) for m in backbone.modules()} if isinstance(backbone, nn.Module) else set()
    extra = {"all": 0.0, "backbone": 0.0}

    def hook(module: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        assert isinstance(module, nn.Conv2d)
        dh, dw = (int(d) for d in module.dilation)
        if dh <= 1 and dw <= 1:
            return
        kh, kw = (int(k) for k in module.kernel_size)
        h, w = output.shape[-2:]
        eh, ew = space_to_batch_extra(int(h), dh, kh), space_to_batch_extra(int(w), dw, kw)
        per_position = module.in_channels // module.groups * module.out_channels * kh * kw
        macs = float(output.shape[0] * ((h + eh) * (w + ew) - h * w) * per_position)
        extra["all"] += macs
        if id(module) in in_backbone:
            extra["backbone"] += macs

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return MultAdds(conv=counter.get_total_flops() / 2, space_to_batch=extra["all"], backbone_space_to_batch=extra["backbone"])


def count(config: ModelConfig, *, size: int = 513) -> Dict[str, Any]:
    """Parameters and Mult-Adds of the model a config builds, at ``1 x in_channels x size x size``.

    Args:
        config: the model's configuration (no weights are loaded; the model is built on ``meta``).
        size: square input size (the paper's tables use 513).

    Returns:
        A JSON-able dict: the config's ``arch``, ``backbone``, ``output_stride``, ``separable``,
        ``multi_grid``; ``params``, ``backbone_params``; ``mult_adds`` (convolution proper),
        ``mult_adds_tf`` (as TF's profiler counts it), ``space_to_batch`` and
        ``backbone_space_to_batch`` (the padding part of ``mult_adds_tf``).
    """
    from .deeplab import build_model_from_config

    with torch.device("meta"):
        model = build_model_from_config(config).eval()
        x = torch.empty(1, config.in_channels, size, size)
    counted = count_mult_adds(model, x)
    return {
        "arch": config.arch,
        "backbone": config.backbone,
        "output_stride": config.output_stride,
        "separable": config.separable,
        "multi_grid": list(config.multi_grid) if config.multi_grid else None,
        "params": sum(p.numel() for p in model.parameters()),
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
        "mult_adds": counted.conv,
        "mult_adds_tf": counted.tf_profiler,
        "space_to_batch": counted.space_to_batch,
        "backbone_space_to_batch": counted.backbone_space_to_batch,
    }


@dataclass(frozen=True)
class PaperRow:
    """One Mult-Adds figure of the paper, with the model that reproduces it.

    Attributes:
        where: the paper's table.
        label: the row, in the paper's words.
        config: keyword arguments of the :class:`~deeplab.config.ModelConfig`.
        profiler: billions, TF's profiler on the authors' ``research/deeplab/model.py`` at 513x513.
        paper: billions as printed in the paper (``None`` where the paper prints no figure we hold).
    """

    where: str
    label: str
    config: Dict[str, Any]
    profiler: float
    paper: Optional[float] = None


_RESNET = {"backbone": "resnet_v1_101_beta", "separable": False, "multi_grid": (1, 2, 4)}

#: The rows of Tables 3 and 5 with a Mult-Adds figure, and TF's profiler count of each
#: (tensorflow/models research/deeplab, 513x513, 21 classes).
PAPER_ROWS: List[PaperRow] = [
    PaperRow("Table 3", "ResNet-101 (beta, multi-grid 1,2,4), DeepLabv3, OS 16", dict(_RESNET, arch="deeplabv3", output_stride=16), 81.02,
             paper=81.02),
    PaperRow("Table 3", "ResNet-101 (beta, multi-grid 1,2,4), DeepLabv3+, OS 16", dict(_RESNET, arch="deeplabv3plus", output_stride=16),
             102.78, paper=101.28),
    PaperRow("Table 3", "ResNet-101 (beta, multi-grid 1,2,4), DeepLabv3, eval OS 8", dict(_RESNET, arch="deeplabv3", output_stride=8), 276.17,
             paper=276.18),
    PaperRow("Table 5", "Xception-65, DeepLabv3, OS 16",
             {"backbone": "xception65", "arch": "deeplabv3", "separable": False, "output_stride": 16}, 68.00,
             paper=68.00),
    PaperRow("Table 5", "Xception-65, DeepLabv3+, OS 16",
             {"backbone": "xception65", "arch": "deeplabv3plus", "separable": False, "output_stride": 16}, 89.76,
             paper=89.76),
    PaperRow("Table 5", "Xception-65, DeepLabv3+, separable, OS 16",
             {"backbone": "xception65", "arch": "deeplabv3plus", "separable": True, "output_stride": 16}, 54.16,
             paper=54.17),
    PaperRow("Table 5", "Xception-65, DeepLabv3+, separable, eval OS 8",
             {"backbone": "xception65", "arch": "deeplabv3plus", "separable": True, "output_stride": 8}, 177.10),
]

"""Modified aligned Xception-41/65/71 (the paper's backbone), timm's parameter layout.

Follows the TF reference (``research/deeplab/core/xception.py``) and timm's
``xception_aligned.py``, whose ``tf_xception_*`` files are ports of the reference's ImageNet
checkpoints: a stride-2 stem (32 -> 64), entry-flow blocks, 16 (65/71) or 8 (41) middle-flow
blocks, two exit-flow blocks. Every max-pool is a strided separable conv; every separable conv
has BN after its depthwise and its pointwise part. Blocks that "start with ReLU" put a ReLU
before each separable conv (TF ``activation_fn_in_separable_conv=False``); the last exit block
has a ReLU after each BN instead and no residual. BatchNorm epsilon is 1e-3 as in TF.

Parameter names: ``stem.0.conv.weight``, ``blocks.1.stack.conv2.conv_dw.weight``,
``blocks.1.shortcut.bn.running_var``...; timm's classifier ``head.fc.*`` is ignored on load.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    INCEPTION_MEAN,
    INCEPTION_STD,
    Backbone,
    FeatureSpec,
    Normalization,
    init_conv_bn,
    stride_to_dilation,
    validate_multi_grid,
)

XCEPTION_BN_EPS = 1e-3


class BlockDef(NamedTuple):
    in_channels: int
    out_channels: Tuple[int, int, int]
    stride: int
    start_with_relu: bool = True
    skip: bool = True


def _entry(cin: int, cout: int, stride: int) -> BlockDef:
    return BlockDef(cin, (cout, cout, cout), stride)


def _xception_blocks(entry: Sequence[Tuple[int, int, int]], middle: int) -> List[BlockDef]:
    blocks = [_entry(*e) for e in entry]
    blocks += [_entry(728, 728, 1)] * middle
    blocks.append(BlockDef(728, (728, 1024, 1024), 2))
    blocks.append(BlockDef(1024, (1536, 1536, 2048), 1, start_with_relu=False, skip=False))
    return blocks


XCEPTION_DEFS: Dict[str, List[BlockDef]] = {
    "xception41": _xception_blocks([(64, 128, 2), (128, 256, 2), (256, 728, 2)], 8),
    "xception65": _xception_blocks([(64, 128, 2), (128, 256, 2), (256, 728, 2)], 16),
    "xception71": _xception_blocks(
        [(64, 128, 2), (128, 256, 1), (256, 256, 2), (256, 728, 1), (728, 728, 2)], 16
    ),
}


class XceptionConvBN(nn.Module):
    """timm's ``ConvNormAct`` layout (``conv``, ``bn``) with an optional ReLU.

    Public because :func:`deeplab.deploy.optimize.fuse_conv_activations` recognises it to fuse
    its (functional) ReLU into the conv.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int, *, stride: int = 1, relu: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=XCEPTION_BN_EPS)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x, inplace=True) if self.relu else x


class XceptionSeparableConv2d(nn.Module):
    """``conv_dw (3x3, rate) -> bn_dw [-> ReLU] -> conv_pw (1x1) -> bn_pw [-> ReLU]``.

    With even-sized inputs a stride-2 depthwise conv with symmetric padding 1 equals TF's
    ``fixed_padding`` + VALID that the reference uses for strided separable convs.
    """

    def __init__(self, cin: int, cout: int, *, stride: int = 1, dilation: int = 1, relu: bool = False) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(
            cin, cin, 3, stride=stride, padding=dilation, dilation=dilation, groups=cin, bias=False
        )
        self.bn_dw = nn.BatchNorm2d(cin, eps=XCEPTION_BN_EPS)
        self.conv_pw = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn_pw = nn.BatchNorm2d(cout, eps=XCEPTION_BN_EPS)
        self.relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn_dw(self.conv_dw(x))
        if self.relu:
            x = F.relu(x, inplace=True)
        x = self.bn_pw(self.conv_pw(x))
        if self.relu:
            x = F.relu(x, inplace=True)
        return x


class XceptionModule(nn.Module):
    """Three separable convs (stride on the third) with a 1x1-conv or identity residual.

    ``forward_with_tap`` also returns the output of the second separable conv before the ReLU
    that follows it: the TF reference's ``separable_conv2_pointwise`` end point that the
    decoder reads at stride 4.
    """

    def __init__(self, spec: BlockDef, *, stride: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.start_with_relu = spec.start_with_relu
        self.skip = spec.skip
        cout = spec.out_channels[-1]
        self.shortcut: Optional[XceptionConvBN] = None
        # Decided by the block's nominal stride, not the effective one: a block whose stride
        # became a dilation keeps its projection shortcut, so weight files load at any OS.
        if spec.skip and (cout != spec.in_channels or spec.stride != 1):
            self.shortcut = XceptionConvBN(spec.in_channels, cout, 1, stride=stride, relu=False)
        layers: "OrderedDict[str, nn.Module]" = OrderedDict()
        cin = spec.in_channels
        for i in range(3):
            if spec.start_with_relu:
                # The first ReLU must not overwrite the block input (it feeds the residual).
                layers[f"act{i + 1}"] = nn.ReLU(inplace=i > 0)
            layers[f"conv{i + 1}"] = XceptionSeparableConv2d(
                cin,
                spec.out_channels[i],
                stride=stride if i == 2 else 1,
                dilation=rates[i],
                relu=not spec.start_with_relu,
            )
            cin = spec.out_channels[i]
        self.stack = nn.Sequential(layers)

    def _residual(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if not self.skip:
            return out
        return out + (x if self.shortcut is None else self.shortcut(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._residual(x, self.stack(x))

    def forward_with_tap(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if not self.start_with_relu:
            raise RuntimeError("the low-level tap is defined for blocks that start with ReLU")
        h = x
        tap = x
        for name, layer in self.stack.named_children():
            if name == "act3":
                tap = h
                h = F.relu(h)  # not in place: ``tap`` must stay the pre-activation
            else:
                h = layer(h)
        return self._residual(x, h), tap


class Xception(Backbone):
    """Modified aligned Xception backbone.

    Returns ``{"low_level": (B, 256, H/4, W/4) (``separable_conv2_pointwise`` of the block that
    takes stride 4 to 8, before ReLU), "out": (B, 2048, H/OS, W/OS)}``.

    Args:
        blocks: block definitions (see ``XCEPTION_DEFS``).
        output_stride: 8, 16 or 32; strides of the deepest blocks become 1 and later blocks are
            dilated (TF ``stack_blocks_dense`` rule).
        multi_grid: optional rate multipliers for the three separable convs of the last block
            (TF ``unit_rate_list``).
        name: backbone name for messages.
    """

    pretrained_ignore = ("head.fc.",)

    def __init__(
        self,
        blocks: Sequence[BlockDef],
        *,
        output_stride: int = 16,
        multi_grid: Optional[Sequence[int]] = None,
        name: str = "xception",
    ) -> None:
        super().__init__()
        grid = validate_multi_grid(multi_grid, 3, name) or (1, 1, 1)
        self.output_stride = output_stride
        self.normalization = Normalization(INCEPTION_MEAN, INCEPTION_STD)
        self.stem = nn.Sequential(XceptionConvBN(3, 32, 3, stride=2), XceptionConvBN(32, 64, 3))
        plan = stride_to_dilation([b.stride for b in blocks], initial_stride=2, output_stride=output_stride)
        modules = []
        current_stride = 2
        self.low_level_index = -1
        for index, (spec, (stride, dilation)) in enumerate(zip(blocks, plan)):
            if current_stride == 4 and spec.stride == 2 and self.low_level_index < 0:
                self.low_level_index = index
            rates = [dilation * g for g in grid] if index == len(blocks) - 1 else [dilation] * 3
            modules.append(XceptionModule(spec, stride=stride, rates=rates))
            current_stride *= stride
        self.blocks = nn.Sequential(*modules)
        self.feature_specs = {
            "low_level": FeatureSpec(blocks[self.low_level_index].out_channels[1], 4),
            "out": FeatureSpec(blocks[-1].out_channels[-1], output_stride),
        }
        init_conv_bn(self)


    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.stem(x)
        low_level = x
        for index, block in enumerate(self.blocks):
            if index == self.low_level_index:
                x, low_level = cast(XceptionModule, block).forward_with_tap(x)
            else:
                x = block(x)
        return {"low_level": low_level, "out": x}


def _builder(name: str):
    def build(
        *, output_stride: int = 16, multi_grid: Optional[Sequence[int]] = None, tf_compat: bool = False
    ) -> Xception:
        # tf_compat needs nothing here: this network already computes what the TF reference does
        # (explicit symmetric ``fixed_padding`` for strided convs, BN eps 1e-3, [-1, 1] inputs).
        return Xception(XCEPTION_DEFS[name], output_stride=output_stride, multi_grid=multi_grid, name=name)

    build.__name__ = name
    build.__doc__ = (
        f"Modified aligned {name.capitalize()} (timm layout); equal to the TF reference's network, so "
        "``tf_compat`` changes nothing here."
    )
    return build


xception41 = _builder("xception41")
xception65 = _builder("xception65")
xception71 = _builder("xception71")

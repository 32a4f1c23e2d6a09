"""Test-time rewrites of a model that keep its outputs: BatchNorm folding and CPU fusion.

* **BatchNorm folding.** At test time BN is a per-channel affine map, so a conv followed
  directly by BN equals one conv with scaled weights and a bias. :func:`fold_batchnorm`
  finds every such pair by *running* the model once on a small probe input and watching
  the data flow (a conv's output must be read by exactly one BN and by nothing else), so
  it works for any layout - ``ConvBNReLU``'s ``conv``/``bn``, torchvision's ``0``/``1`` and
  ``conv1``/``bn1``, timm's ``conv_dw``/``bn_dw`` - and never folds a BN that does not
  directly follow a conv. Folded BNs become ``nn.Identity``; the folded model is checked
  against the original on the probe input.
* **Eager CPU inference.** :func:`optimize_for_inference` folds BN, fuses conv + activation
  (+ ResNet's residual add) into single oneDNN calls (:func:`fuse_conv_activations`) and
  switches to channels_last with :class:`ShiftDepthwiseConv` for large-rate depthwise convs.

Every rewrite is checked numerically against the original model and raises
:class:`~deeplab.deploy.format.ExportError` if it changed the output.
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Type, Union, cast

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from deeplab.deploy.format import ExportError
from deeplab.models.backbones.resnet import Bottleneck
from deeplab.models.backbones.xception import XceptionConvBN, XceptionSeparableConv2d

__all__ = [
    "LAYOUTS",
    "SHIFT_DEPTHWISE_MIN_RATE",
    "FusedBottleneck",
    "FusedConv2d",
    "ShiftDepthwiseConv",
    "find_conv_bn_pairs",
    "fold_batchnorm",
    "fuse_conv_activations",
    "mkldnn_fusion_available",
    "optimize_for_inference",
]


# --------------------------------------------------------------------------- BN folding

# Tensor calls that read only metadata: they do not consume a conv's output values.
_METADATA_FUNCS = (
    torch.Tensor.dim,
    torch.Tensor.size,
    torch.Tensor.numel,
    torch.Tensor.is_floating_point,
    torch.Tensor.shape.__get__,  # type: ignore[attr-defined]
    torch.Tensor.dtype.__get__,  # type: ignore[attr-defined]
    torch.Tensor.device.__get__,
    torch.Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
)


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _iter_tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _iter_tensors(item)


class _DataFlowProbe(TorchFunctionMode):
    """Records, for every conv output, which code reads it.

    A read made while a BatchNorm module is running is attributed to that BN; any other read
    (a ReLU, an add, a concat, a second module) is attributed to ``None`` and blocks folding.
    """

    def __init__(self) -> None:
        super().__init__()
        # id(output) -> (output, conv name); the tensor is kept so its id is not reused.
        self.outputs: Dict[int, Tuple[torch.Tensor, str]] = {}
        self.readers: Dict[str, List[Optional[str]]] = {}
        self.bn_input: Dict[str, List[Optional[str]]] = {}
        self.calls: Dict[str, int] = {}
        self.active_bn: List[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func not in _METADATA_FUNCS:
            for tensor in _iter_tensors((args, kwargs)):
                entry = self.outputs.get(id(tensor))
                if entry is not None and entry[0] is tensor:
                    self.readers[entry[1]].append(self.active_bn[-1] if self.active_bn else None)
        return func(*args, **kwargs)


def _conv_consumer_pairs(
    model: nn.Module,
    example_input: torch.Tensor,
    consumer_types: Tuple[type, ...],
    conv_types: Tuple[type, ...] = (nn.Conv2d,),
) -> List[Tuple[str, str]]:
    """``(conv, consumer)`` name pairs: the consumer module's input is the conv's output, nothing
    else reads that output, and both modules run exactly once on ``example_input``."""
    probe = _DataFlowProbe()
    names = {id(m): name for name, m in model.named_modules()}
    handles = []

    def conv_hook(module: nn.Module, inputs: Any, output: Any) -> None:
        name = names[id(module)]
        probe.calls[name] = probe.calls.get(name, 0) + 1
        if isinstance(output, torch.Tensor):
            probe.outputs[id(output)] = (output, name)
            probe.readers.setdefault(name, [])

    def consumer_pre_hook(module: nn.Module, inputs: Any) -> None:
        name = names[id(module)]
        probe.calls[name] = probe.calls.get(name, 0) + 1
        entry = probe.outputs.get(id(inputs[0])) if inputs else None
        source = entry[1] if entry is not None and entry[0] is inputs[0] else None
        probe.bn_input.setdefault(name, []).append(source)
        probe.active_bn.append(name)

    def consumer_hook(module: nn.Module, inputs: Any, output: Any) -> None:
        probe.active_bn.pop()
        # An in-place consumer (ReLU(inplace=True)) returns the conv's tensor object: later reads
        # of it read the consumer's result, not the raw conv output.
        entry = probe.outputs.get(id(output))
        if entry is not None and entry[0] is output:
            del probe.outputs[id(output)]

    for module in model.modules():
        if isinstance(module, conv_types):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, consumer_types):
            handles.append(module.register_forward_pre_hook(consumer_pre_hook))
            handles.append(module.register_forward_hook(consumer_hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), probe:
            model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    pairs: List[Tuple[str, str]] = []
    for consumer_name, sources in probe.bn_input.items():
        if len(sources) != 1 or sources[0] is None or probe.calls.get(consumer_name) != 1:
            continue
        conv_name = sources[0]
        if probe.calls.get(conv_name) != 1:
            continue
        if set(probe.readers[conv_name]) != {consumer_name}:
            continue  # the raw conv output is also read elsewhere (or not at all by the consumer)
        pairs.append((conv_name, consumer_name))
    return pairs


def find_conv_bn_pairs(model: nn.Module, example_input: torch.Tensor) -> List[Tuple[str, str]]:
    """Names of ``(conv, bn)`` pairs where the BN's input is the conv's output and nothing else
    reads that output.

    The model is run once (no grad) on ``example_input``; a conv or BN that runs more than once
    (a shared module) is not paired, nor is a BN without running statistics. Subclasses of
    ``nn.Conv2d`` count too (e.g. TF-"SAME" padding convs pad, then convolve: still linear in the
    weights); :func:`fold_batchnorm`'s numerical check guards against exotic forwards.

    Args:
        model: any module; its mode is left as it was.
        example_input: a (small) input the model accepts, e.g. ``(1, 3, 65, 65)``.

    Returns:
        ``[(conv_name, bn_name), ...]`` in execution order.
    """
    pairs = _conv_consumer_pairs(model, example_input, (nn.BatchNorm2d,))
    return [
        (conv, bn)
        for conv, bn in pairs
        if model.get_submodule(bn).running_mean is not None and model.get_submodule(bn).running_var is not None
    ]


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Merge eval-mode ``bn`` into ``conv`` in place (float64 arithmetic)."""
    dtype = conv.weight.dtype
    # find_conv_bn_pairs keeps only BatchNorms that track running statistics.
    assert bn.running_var is not None and bn.running_mean is not None
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
    conv.weight.copy_(weight.to(dtype))
    new_bias = ((bias - mean) * scale + beta).to(dtype=dtype, device=conv.weight.device)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _default_probe(model: nn.Module) -> torch.Tensor:
    # OS * 4 + 1 keeps every stage at least 5 pixels wide, so BN on the image-pooling map is the
    # only 1x1 one; it is cheap (a ResNet-101 probe runs in ~0.1 s).
    stride = int(getattr(model, "output_stride", 16) or 16)
    side = max(stride * 4 + 1, 33)
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = torch.device("cpu"), torch.float32
    generator = torch.Generator().manual_seed(0)
    channels = int(getattr(model, "in_channels", 3) or 3)  # N-channel models
    return torch.randn(1, channels, side, side, generator=generator).to(device=device, dtype=dtype)


def fold_batchnorm(
    model: nn.Module,
    *,
    example_input: Optional[torch.Tensor] = None,
    inplace: bool = False,
    check: bool = True,
    atol: float = 1e-4,
) -> nn.Module:
    """Fold every BatchNorm that directly follows a conv into that conv (test-time only).

    ``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta`` is a conv with weight
    ``W * gamma / sqrt(var + eps)`` and bias ``(b - mean) * gamma / sqrt(var + eps) + beta``.
    Pairs are found by :func:`find_conv_bn_pairs`; each folded BN (including ASPP's
    ``PoolingBatchNorm``, which is BatchNorm in eval mode) is replaced by ``nn.Identity``.
    BNs that do not follow a conv are left as they are.

    Args:
        model: the model; it is put in eval mode (folding uses running statistics).
        example_input: the probe input; default a ``(1, 3, 4*OS+1, 4*OS+1)`` random image.
        inplace: modify ``model`` itself instead of a deep copy.
        check: compare the folded model with the original on the probe input.
        atol: tolerance of that check, relative to the largest logit magnitude (at least 1).

    Returns:
        The folded model in eval mode, with ``folded_batchnorms`` (list of ``(conv, bn)`` names).

    Raises:
        ExportError: the folded model does not reproduce the original (``check=True``).
    """
    model.eval()
    probe = _default_probe(model) if example_input is None else example_input
    pairs = find_conv_bn_pairs(model, probe)
    with torch.no_grad():
        reference = model(probe) if check else None
    folded = model if inplace else copy.deepcopy(model)
    for conv_name, bn_name in pairs:
        conv = folded.get_submodule(conv_name)
        bn = folded.get_submodule(bn_name)
        _fold_into(conv, bn)  # type: ignore[arg-type]
        _set_submodule(folded, bn_name, nn.Identity())
    folded.eval()
    folded.folded_batchnorms = pairs  # type: ignore[assignment]
    if check and isinstance(reference, torch.Tensor):
        with torch.no_grad():
            out = folded(probe)
        diff = (out - reference).abs().max().item()
        scale = max(1.0, reference.abs().max().item())
        if not diff <= atol * scale:
            raise ExportError(
                f"BatchNorm folding changed the output (max |diff| {diff:.3g} at logit scale {scale:.3g}); "
                "a BN subclass with a non-standard forward was folded - report this with the model's config"
            )
    return folded


# --------------------------------------------------------------------------- eager inference

LAYOUTS = ("auto", "contiguous", "channels_last")


# oneDNN's NHWC depthwise kernel is fine up to this atrous rate and falls off a cliff above
# it (measured on AVX2, 2048 ch at 33x33: rate 2-4 about 1-2 ms, rate 6-18 about 200 ms).
SHIFT_DEPTHWISE_MIN_RATE = 3


class ShiftDepthwiseConv(nn.Module):
    """A stride-1 depthwise atrous conv (+ folded BN, + ReLU) as ``k*k`` shifted multiply-adds.

    Each tap adds ``x`` shifted by ``(ky - k//2) * rate, (kx - k//2) * rate`` times the tap's
    per-channel weight to the output, restricted to the pixels where the shifted input lies
    inside the image (zero padding contributes nothing, so taps that fall wholly into the padding
    are skipped). Working on the NHWC view of a channels_last tensor makes every tap one
    vectorised pass over contiguous channels: memory-bound, ~1.7 ms for ASPP's 2048 x 33 x 33
    maps at any rate, where oneDNN's NHWC depthwise kernel takes ~200 ms at rates 6-18 on AVX2 and
    its NCHW one 60-100 ms. Eager, channels_last inference only (shapes are Python ints, so it is
    not for tracing).
    """

    taps: torch.Tensor
    bias: torch.Tensor

    def __init__(self, conv: Union[nn.Conv2d, "FusedConv2d"]) -> None:
        super().__init__()
        weight = conv.weight.detach()
        channels, _, kh, kw = weight.shape
        self.kernel = (kh, kw)
        self.dilation = tuple(int(d) for d in conv.dilation)
        self.padding = tuple(int(p) for p in conv.padding)
        # (k*k, C): one contiguous row of per-channel weights per tap.
        self.register_buffer("taps", weight.reshape(channels, kh * kw).t().contiguous())
        bias = getattr(conv, "bias", None)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else torch.zeros(channels))
        attr = getattr(conv, "attr", "none")
        if attr not in ("none", "relu"):
            raise ValueError(f"ShiftDepthwiseConv supports no activation or ReLU, not {attr!r}")
        self.relu = attr == "relu"

    @staticmethod
    def supports(module: nn.Module) -> bool:
        """A depthwise, stride-1, 'same'-padded conv with an atrous rate worth replacing."""
        if not isinstance(module, (nn.Conv2d, FusedConv2d)) or isinstance(getattr(module, "padding", 0), str):
            return False
        if type(module) is not nn.Conv2d and not isinstance(module, FusedConv2d):
            return False
        kh, kw = module.weight.shape[2:]
        dh, dw = module.dilation
        return (
            module.groups > 1
            and module.groups == module.in_channels == module.out_channels
            and tuple(module.stride) == (1, 1)
            and kh % 2 == 1 and kw % 2 == 1
            and tuple(module.padding) == (dh * (kh // 2), dw * (kw // 2))
            and min(dh, dw) >= SHIFT_DEPTHWISE_MIN_RATE
            and getattr(module, "attr", "none") in ("none", "relu")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        nhwc = x.permute(0, 2, 3, 1)  # a view; contiguous when x is channels_last
        kh, kw = self.kernel
        dh, dw = self.dilation
        centre = (kh // 2) * kw + kw // 2
        out = torch.addcmul(self.bias, nhwc, self.taps[centre])
        for index in range(kh * kw):
            if index == centre:
                continue
            ky, kx = divmod(index, kw)
            oy, ox = (ky - kh // 2) * dh, (kx - kw // 2) * dw
            y0, y1 = max(0, -oy), min(h, h - oy)
            x0, x1 = max(0, -ox), min(w, w - ox)
            if y0 >= y1 or x0 >= x1:
                continue  # the tap only ever sees zero padding
            out[:, y0:y1, x0:x1].addcmul_(nhwc[:, y0 + oy : y1 + oy, x0 + ox : x1 + ox], self.taps[index])
        if self.relu:
            out.relu_()
        return out.permute(0, 3, 1, 2)  # channels_last (B, C, H, W) view

    def extra_repr(self) -> str:
        return f"{self.taps.shape[1]}, kernel={self.kernel}, dilation={self.dilation}, relu={self.relu}"


def mkldnn_fusion_available() -> bool:
    """Whether oneDNN's fused conv + post-op kernels (``torch.ops.mkldnn._convolution_pointwise``)
    are in this torch build."""
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


_ACTIVATIONS = {nn.ReLU: ("relu", []), nn.ReLU6: ("hardtanh", [0.0, 6.0])}


class FusedConv2d(nn.Module):
    """A (BN-folded) ``nn.Conv2d`` + activation [+ residual add before it] as one oneDNN call.

    ``forward(x)`` = ``act(conv(x))``; ``forward(x, other)`` = ``act(conv(x) + other)``. The
    activation is applied to the conv's output while it is still in cache, saving the separate
    memory pass of an elementwise ReLU (and of the add). CPU, inference only (no autograd).

    Attributes ``weight``/``bias`` keep ``nn.Conv2d``'s names, so a state dict still reads.
    """

    def __init__(self, conv: nn.Conv2d, activation: Optional[Type[nn.Module]] = None) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FusedConv2d needs an nn.Conv2d with explicit zero padding")
        self.weight = nn.Parameter(conv.weight.detach(), requires_grad=False)
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(conv.out_channels, dtype=conv.weight.dtype)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.padding = list(conv.padding)
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.attr, self.scalars = _ACTIVATIONS[activation] if activation is not None else ("none", [])

    def forward(self, x: torch.Tensor, other: Optional[torch.Tensor] = None) -> torch.Tensor:
        if other is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
                self.attr, self.scalars, "",
            )
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups,
            "add", None, None if self.attr == "none" else self.attr, self.scalars, "",
        )

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel={tuple(self.weight.shape[2:])}, stride={self.stride}, "
                f"dilation={self.dilation}, groups={self.groups}, post_op={self.attr}")


class FusedBottleneck(nn.Module):
    """ResNet's Bottleneck with every conv fused: conv1+ReLU, conv2+ReLU, conv3+residual+ReLU."""

    def __init__(self, block: Bottleneck) -> None:
        super().__init__()
        self.conv1 = FusedConv2d(block.conv1, nn.ReLU)
        self.conv2 = FusedConv2d(block.conv2, nn.ReLU)
        self.conv3 = FusedConv2d(block.conv3, nn.ReLU)
        # fuse_conv_activations rewrites only blocks whose downsample is (1x1 conv, folded BN).
        self.downsample = None if block.downsample is None else FusedConv2d(cast(nn.Conv2d, block.downsample[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), identity)


def _plain_conv(module: Any) -> bool:
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def fuse_conv_activations(model: nn.Module, example_input: Optional[torch.Tensor] = None) -> nn.Module:
    """Fuse a BN-folded model's conv -> ReLU/ReLU6 pairs (and ResNet's residual add + ReLU) into
    oneDNN fused convs, in place. Pairs are found by data flow like the BN folding; an activation
    module that runs more than once (torchvision's shared ``Bottleneck.relu``) is handled by the
    :class:`FusedBottleneck` rewrite; activations applied functionally are left as they are.

    Returns:
        ``model`` with ``fused_activations`` (list of ``(conv, activation)`` names).
    """
    probe = _default_probe(model) if example_input is None else example_input
    fused: List[Tuple[str, str]] = []
    for name, module in list(model.named_modules()):
        if isinstance(module, Bottleneck) and all(
            isinstance(getattr(module, bn), nn.Identity) for bn in ("bn1", "bn2", "bn3")
        ) and all(_plain_conv(getattr(module, c)) for c in ("conv1", "conv2", "conv3")) and (
            module.downsample is None
            or (_plain_conv(module.downsample[0]) and isinstance(module.downsample[1], nn.Identity))
        ):
            _set_submodule(model, name, FusedBottleneck(module))
            fused.append((name, "relu"))
    for conv_name, act_name in _conv_consumer_pairs(model, probe, tuple(_ACTIVATIONS)):
        conv = model.get_submodule(conv_name)
        act = model.get_submodule(act_name)
        if not _plain_conv(conv):
            continue
        _set_submodule(model, conv_name, FusedConv2d(cast(nn.Conv2d, conv), type(act)))
        _set_submodule(model, act_name, nn.Identity())
        fused.append((conv_name, act_name))
    # timm-style Xception modules apply ReLU functionally behind a ``relu`` flag.
    for name, module in list(model.named_modules()):
        if isinstance(module, XceptionConvBN) and module.relu is True and isinstance(module.bn, nn.Identity) \
                and _plain_conv(module.conv):
            _set_submodule(model, f"{name}.conv", FusedConv2d(module.conv, nn.ReLU))
            module.relu = False
            fused.append((f"{name}.conv", f"{name}.relu"))
        elif isinstance(module, XceptionSeparableConv2d) and module.relu is True \
                and isinstance(module.bn_dw, nn.Identity) and isinstance(module.bn_pw, nn.Identity) \
                and _plain_conv(module.conv_dw) and _plain_conv(module.conv_pw):
            _set_submodule(model, f"{name}.conv_dw", FusedConv2d(module.conv_dw, nn.ReLU))
            _set_submodule(model, f"{name}.conv_pw", FusedConv2d(module.conv_pw, nn.ReLU))
            module.relu = False
            fused += [(f"{name}.conv_dw", f"{name}.relu"), (f"{name}.conv_pw", f"{name}.relu")]
    # Every other conv calls oneDNN directly too: aten's dispatcher would send some NCHW shapes
    # to its slower im2col path.
    for name, module in list(model.named_modules()):
        if _plain_conv(module):
            _set_submodule(model, name, FusedConv2d(cast(nn.Conv2d, module)))
    model.fused_activations = fused  # type: ignore[assignment]
    return model


def optimize_for_inference(
    model: nn.Module,
    *,
    device: Union[str, torch.device] = "cpu",
    fold_bn: bool = True,
    layout: str = "auto",
    fuse: Optional[bool] = None,
    check: bool = True,
) -> nn.Module:
    """The fastest eager PyTorch form of a model for test-time use (same outputs).

    * BatchNorm folded into the convs (:func:`fold_batchnorm`).
    * ``fuse`` (default: on CPU when the build has oneDNN): conv + ReLU/ReLU6 and ResNet's
      conv + residual add + ReLU run as single oneDNN calls (:func:`fuse_conv_activations`).
    * ``layout="channels_last"``: weights in NHWC, the input converted on entry (a forward
      pre-hook), and every depthwise conv with atrous rate >= 3 replaced by
      :class:`ShiftDepthwiseConv` (oneDNN's NHWC kernel for those is ~100x slower on AVX2, its
      NCHW one ~40x); dense convs prefer NHWC. ``"auto"`` picks
      channels_last on CPU and leaves CUDA models contiguous; ``"contiguous"`` changes no layout.

    Args:
        model: the model (a deep copy is optimised; the original is untouched).
        device: the device it will run on.
        fold_bn: fold BatchNorm.
        layout: ``"auto"``, ``"contiguous"`` or ``"channels_last"``.
        fuse: fuse activations (CPU only); ``None`` = when available.
        check: compare with the original model on a small probe input.

    Returns:
        The optimised model in eval mode (``model.config`` etc. are kept). Inference only.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {list(LAYOUTS)}")
    cpu = torch.device(device).type == "cpu"
    original = model.eval()
    model = fold_batchnorm(model, check=False) if fold_bn else copy.deepcopy(model).eval()
    probe = _default_probe(model)
    if fuse is None:
        fuse = cpu and fold_bn and mkldnn_fusion_available()
    if fuse:
        if not cpu:
            raise ValueError("fused oneDNN convs run on the CPU only; pass fuse=False for other devices")
        fuse_conv_activations(model, probe)
    if layout == "auto":
        layout = "channels_last" if cpu else "contiguous"
    if layout == "channels_last":
        for name, module in list(model.named_modules()):
            if ShiftDepthwiseConv.supports(module):
                _set_submodule(model, name, ShiftDepthwiseConv(module))
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it

        def to_channels_last(_: nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
            x = args[0]
            if isinstance(x, torch.Tensor) and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return (x, *args[1:])

        model.register_forward_pre_hook(to_channels_last)
    model.inference_layout = layout  # type: ignore[assignment]
    model.eval()
    if check:
        with torch.no_grad():
            ref = original(probe)
            out = model(probe)
        diff = (out - ref).abs().max().item()
        if not diff <= 1e-4 * max(1.0, ref.abs().max().item()):
            raise ExportError(f"optimize_for_inference changed the output (max |diff| {diff:.3g}); use fuse=False / fold_bn=False")
    return model


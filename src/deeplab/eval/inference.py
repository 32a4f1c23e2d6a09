"""Test-time inference: whole-image or sliding-window, multi-scale and flip averaging.

The paper evaluates on the whole image padded to a fixed size (513x513 on VOC), and its
best numbers average softmax probabilities over scales 0.5-1.75 (step 0.25) and
left-right flips. This module does that for any model that follows the package contract:
``model(x)`` with ``x`` ``(B, 3, H, W)`` normalised returns logits ``(B, C, H, W)`` at the
input size, and exposes ``model.output_stride``. The options come in one
:class:`deeplab.config.InferenceConfig`.

Why ``OS*k + 1`` padding: with that size every strided conv and the final bilinear resize
line up pixel centres exactly (the TF reference's crop sizes 513 = 32*16+1 and
1025 = 64*16+1 are of this form). The pad value is 0, i.e. the mean pixel after
normalisation, and the padded part of the output is cropped away.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from deeplab._utils import unwrap_model
from deeplab.config import INFERENCE_MODES, InferenceConfig

__all__ = [
    "MODES",
    "padded_size",
    "scaled_size",
    "window_starts",
    "predict_probs",
    "predict_mask",
]

MODES = INFERENCE_MODES


def padded_size(size: int, output_stride: int) -> int:
    """Smallest ``output_stride * k + 1 >= size`` (``k >= 0``).

    >>> padded_size(500, 16), padded_size(513, 16), padded_size(67, 8)
    (513, 513, 73)
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    k = -(-(size - 1) // output_stride)  # ceil((size - 1) / OS) in integers
    return output_stride * k + 1


def scaled_size(size: int, scale: float) -> int:
    """Side length after rescaling by ``scale``, as the TF reference computes it.

    ``int((size - 1) * scale + 1)``: keeps ``OS*k + 1`` sizes of that form for the
    paper's scales (513 at 0.75 -> 385, at 1.75 -> 897), so no extra padding is needed.
    """
    # The epsilon protects exact products such as 0.1 * 30 = 2.9999999999999996.
    return max(1, int((size - 1) * scale + 1.0 + 1e-6))


def window_starts(size: int, crop: int, stride: int) -> List[int]:
    """Start offsets of sliding windows of length ``crop`` covering ``[0, size)``.

    Windows step by ``stride``; the last one is shifted back to end exactly at ``size``
    so every pixel is covered and no window leaves the image. ``size <= crop`` gives
    ``[0]`` (the caller pads the image up to ``crop``).

    >>> window_starts(100, 33, 20)
    [0, 20, 40, 60, 67]
    """
    if size <= crop:
        return [0]
    n = -(-(size - crop) // stride) + 1
    return [min(i * stride, size - crop) for i in range(n)]


def _resolve_output_stride(model: nn.Module, output_stride: Optional[int]) -> int:
    if output_stride is None:
        output_stride = getattr(unwrap_model(model), "output_stride", None)
        if output_stride is None:
            raise ValueError(
                f"{type(unwrap_model(model)).__name__} has no `output_stride` attribute; pass "
                "output_stride= explicitly (1 disables the OS*k+1 padding)"
            )
    if not isinstance(output_stride, int) or isinstance(output_stride, bool) or output_stride < 1:
        raise ValueError(f"output_stride must be a positive int, got {output_stride!r}")
    return output_stride


def _resize(x: torch.Tensor, size: Tuple[int, int], align_corners: bool) -> torch.Tensor:
    if tuple(x.shape[-2:]) == size:
        return x  # skip: interpolating to the same size would still cost a copy
    return F.interpolate(x, size=size, mode="bilinear", align_corners=align_corners)


def _forward_whole(
    model: nn.Module, x: torch.Tensor, inference: InferenceConfig, num_classes: Optional[int]
) -> torch.Tensor:
    """Logits ``(B, C, h, w)`` for ``x`` ``(B, 3, h, w)``: pad to OS*k+1, run, crop back.

    ``inference.output_stride`` is already resolved (not ``None``).
    """
    output_stride = inference.output_stride
    assert output_stride is not None  # predict_probs resolves it from the model
    h, w = x.shape[-2:]
    ph, pw = padded_size(h, output_stride), padded_size(w, output_stride)
    if (ph, pw) != (h, w):
        # Bottom/right padding keeps output pixel (i, j) aligned with input pixel (i, j).
        x = F.pad(x, (0, pw - w, 0, ph - h), value=0.0)
    logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        raise TypeError(
            f"model must return a logits tensor (B, C, H, W), got "
            f"{type(logits).__name__ if not isinstance(logits, torch.Tensor) else tuple(logits.shape)}"
        )
    if tuple(logits.shape[-2:]) != (ph, pw) or logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"model returned logits {tuple(logits.shape)} for input {tuple(x.shape)}; "
            "the contract is logits (B, C, H, W) at the input size"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"model returned {logits.shape[1]} classes but num_classes={num_classes}; "
            "is the checkpoint for another dataset?"
        )
    return logits[..., :h, :w]


def _forward_slide(
    model: nn.Module, x: torch.Tensor, inference: InferenceConfig, num_classes: Optional[int]
) -> torch.Tensor:
    """Logits ``(B, C, h, w)`` averaged over overlapping ``inference.crop_size`` windows."""
    b = x.shape[0]
    h, w = x.shape[-2:]
    ch, cw = inference.crop_hw
    stride = inference.stride_hw
    ph, pw = max(h, ch), max(w, cw)
    if (ph, pw) != (h, w):
        # Images smaller than the crop are padded (mean pixel) like TF's eval crop.
        x = F.pad(x, (0, pw - w, 0, ph - h), value=0.0)
    total: Optional[torch.Tensor] = None
    count = torch.zeros(1, 1, ph, pw, device=x.device, dtype=torch.float32)
    for y in window_starts(ph, ch, stride[0]):
        for x0 in window_starts(pw, cw, stride[1]):
            # Each window also gets the OS*k+1 treatment, so any crop size is valid.
            logits = _forward_whole(model, x[..., y : y + ch, x0 : x0 + cw], inference, num_classes)
            if total is None:
                total = torch.zeros(b, logits.shape[1], ph, pw, device=x.device, dtype=torch.float32)
            total[..., y : y + ch, x0 : x0 + cw] += logits.float()
            count[..., y : y + ch, x0 : x0 + cw] += 1
    assert total is not None and bool((count > 0).all())  # window_starts covers everything
    # Overlaps are averaged in logit space (as mmsegmentation does); softmax comes after.
    return (total / count)[..., :h, :w]


@torch.inference_mode()
def predict_probs(
    model: nn.Module,
    image: torch.Tensor,
    inference: InferenceConfig = InferenceConfig(),
    *,
    num_classes: Optional[int] = None,
    align_corners: Optional[bool] = None,
) -> torch.Tensor:
    """Class probabilities averaged over scales and flips.

    For every scale ``s`` of ``inference.scales`` (and, with ``inference.flip``, for the
    left-right flipped image too): resize the image bilinearly to
    ``scaled_size(H, s) x scaled_size(W, s)``, get logits by ``inference.mode``, un-flip,
    resize the logits back to ``(H, W)``, softmax; the result is the mean of these softmaxes
    (the paper's multi-scale + flip evaluation). Scale 1.0 skips both resizes, so
    ``scales=(1.0,)`` on an ``OS*k+1``-sized image is exactly ``model(image).softmax(1)``.

    Modes:
        * ``"whole"``: pad the (rescaled) image at the bottom/right with 0 to the next
          ``OS*k + 1`` size in each dimension, run once, crop the logits back.
        * ``"slide"``: windows of ``crop_size`` every ``stride`` pixels, the last window
          aligned to the bottom/right edge so every pixel is covered; an image smaller
          than the crop is padded with 0 up to it. Each window is run as in ``"whole"``;
          overlapping logits are averaged with a per-pixel count before the softmax.

    Runs under ``torch.inference_mode()``. It does not switch the model to eval mode:
    the caller does (``evaluate`` does it for you).

    Args:
        model: returns logits ``(B, C, h, w)`` at its input size for ``(B, 3, h, w)``.
        image: normalised images ``(B, 3, H, W)``, floating point, on the model's device.
        inference: mode, scales, flip, crop_size, stride, output_stride (default
            ``model.output_stride``) and pad_to; see :class:`deeplab.config.InferenceConfig`.
            ``pad_to`` pads the input (before any rescaling) at the bottom/right with 0 and
            the result is cropped back: the TF reference evaluates VOC images padded to
            513x513 (Cityscapes 1025x2049), which changes what ASPP's image pooling averages
            over; set it to reproduce that.
        num_classes: if given, the model's channel count is checked against it.
        align_corners: for the scale resizes; default ``model.align_corners`` if the model
            has it (TF-compatible models use ``True``), else ``False``.

    Returns:
        Probabilities ``(B, C, H, W)`` float32 on ``image``'s device; they sum to 1 over C.

    Raises:
        ValueError: a model without ``output_stride`` when none is given, or model
            outputs that break the contract (bad options already fail when the
            :class:`~deeplab.config.InferenceConfig` is built, with a ``ConfigError``).
        TypeError: ``image`` is not a floating-point ``(B, 3, H, W)`` tensor.
    """
    if not isinstance(image, torch.Tensor) or image.dim() != 4:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise TypeError(f"image must be a (B, 3, H, W) tensor, got {shape}; add a batch dim with image[None]")
    if not image.is_floating_point():
        raise TypeError(f"image must be normalised floating point, got dtype {image.dtype}")
    if not isinstance(inference, InferenceConfig):
        raise TypeError(
            f"inference must be a deeplab.InferenceConfig, got {type(inference).__name__}; "
            "e.g. predict_probs(model, x, InferenceConfig(scales=(0.75, 1.0), flip=True))"
        )
    # Resolve the model's output stride once; the forward helpers read it from the config.
    inference = dataclasses.replace(
        inference, output_stride=_resolve_output_stride(model, inference.output_stride)
    )
    if align_corners is None:
        align_corners = bool(getattr(unwrap_model(model), "align_corners", False))
    if model.training:
        warnings.warn(
            "predict_probs() called with the model in training mode: BatchNorm and dropout "
            "behave differently than at test time; call model.eval() first",
            stacklevel=3,  # skip the inference_mode wrapper: point at the caller
        )

    out_h, out_w = image.shape[-2:]
    if inference.pad_to is not None:
        th, tw = inference.pad_to
        image = F.pad(image, (0, max(tw - out_w, 0), 0, max(th - out_h, 0)), value=0.0)
    size = (int(image.shape[-2]), int(image.shape[-1]))

    forward = _forward_whole if inference.mode == "whole" else _forward_slide

    probs: Optional[torch.Tensor] = None
    runs = 0
    for scale in inference.scales:
        scaled = (scaled_size(size[0], scale), scaled_size(size[1], scale))
        x = image if scale == 1.0 else _resize(image, scaled, align_corners)
        for flipped in (False, True) if inference.flip else (False,):
            logits = forward(model, x.flip(-1) if flipped else x, inference, num_classes)
            if flipped:
                logits = logits.flip(-1)
            logits = _resize(logits.float(), size, align_corners)
            p = logits.softmax(dim=1)
            probs = p if probs is None else probs.add_(p)
            runs += 1
    assert probs is not None
    probs = probs.div_(runs)
    return probs[..., :out_h, :out_w]


@torch.inference_mode()
def predict_mask(
    model: nn.Module,
    image: torch.Tensor,
    inference: InferenceConfig = InferenceConfig(),
    *,
    num_classes: Optional[int] = None,
    align_corners: Optional[bool] = None,
) -> torch.Tensor:
    """Predicted class ids ``(B, H, W)`` int64: the argmax over C of :func:`predict_probs`.

    Takes exactly the arguments of :func:`predict_probs`.
    """
    probs = predict_probs(model, image, inference, num_classes=num_classes, align_corners=align_corners)
    return probs.argmax(dim=1)

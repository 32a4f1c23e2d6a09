"""Quantization-aware fine-tuning (``deeplab train --qat``), for models that post-training int8 cannot
bring within its accuracy bound.

While it is on, every convolution the int8 export quantizes computes with its weights and its input
rounded as the exported ONNX Runtime file rounds them, and the gradient passes the rounding
(straight-through estimator, zero outside the clipping range), so the weights learn to sit where int8
keeps them:

* **weights**: symmetric per output channel, scale ``max|w_c| / 127`` (``/ 64`` for the ``u8s7``
  scheme of CPUs without VNNI) - ONNX Runtime's per-channel weights. With BatchNorm frozen
  (required: ``--freeze-bn``) folding multiplies each output channel by a constant, and per-channel
  symmetric rounding commutes with that, so rounding the unfolded weight here rounds exactly as
  the folded export does.
* **inputs**: uint8, asymmetric per tensor, over a **range the run tracks**: the exponential moving
  average (decay :data:`EMA_DECAY`) of each batch's min and max, started from the first batch - the
  scheme of TensorFlow's ``contrib.quantize``, with which the reference trained its 8-bit
  MobileNetV2. Under DDP every rank's batch range is all-reduced first, so the ranks agree. In eval
  mode (the run's validation) the tracked range is used as it is.

The ranges are saved in every checkpoint (``ckpt["qat"]``: :func:`qat_state`) and restored on
resume, so an exact resume stays exact. ``deeplab export --precision int8`` of such a checkpoint
writes these ranges into the file for the convolutions' inputs instead of the ones its calibration
measures (:func:`deeplab.deploy.quantize.quantize_onnx` ``activation_ranges``): the file rounds as
the fine-tuning did. The model's ``state_dict`` is unchanged (no extra keys): a QAT checkpoint
loads, evaluates and exports at fp32 like any other.

The layers the ONNX export keeps float (:data:`deeplab.deploy.quantize.KEEP_FLOAT`: the logits conv
and ASPP's image pooling) stay float here too.
"""

from __future__ import annotations

import types
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import nn

__all__ = [
    "EMA_DECAY",
    "QAT_SKIP",
    "QatRanges",
    "disable_fake_quant",
    "enable_fake_quant",
    "fake_quant_activation",
    "fake_quant_weight",
    "fake_quantized_convs",
    "load_qat_state",
    "qat_state",
]

# Module-name prefixes kept float, as the ONNX int8 export keeps them (deploy.quantize.KEEP_FLOAT).
QAT_SKIP = ("classifier", "aspp.image_pool")
# Weight of the running range per step: a fine-tuning run of a few hundred steps forgets the first
# batch's range after ~100 steps (TF's contrib.quantize used 0.999 over whole trainings).
EMA_DECAY = 0.99
WEIGHT_QMAX = {"u8s8": 127, "u8s7": 64}  # ONNX Runtime's symmetric int8 / reduce_range
_ATTR = "_deeplab_qat"


def fake_quant_weight(weight: torch.Tensor, qmax: int = 127) -> torch.Tensor:
    """Symmetric per-output-channel rounding to ``[-qmax, qmax]`` steps, straight-through gradient."""
    dims = tuple(range(1, weight.dim()))
    scale = weight.detach().abs().amax(dim=dims).clamp_min(1e-12) / qmax
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale.float(), zero, 0, -qmax, qmax)


def activation_qparams(lo: float, hi: float) -> Tuple[float, int]:
    """ONNX Runtime's uint8 asymmetric ``(scale, zero_point)`` for the range ``[lo, hi]`` (0 put inside)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255.0
    if scale <= 0:
        return 1.0, 0
    return scale, int(min(255, max(0, round(-lo / scale))))


def fake_quant_activation(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """uint8 rounding of ``x`` over ``[lo, hi]`` (values outside clip; their gradient is 0)."""
    scale, zero = activation_qparams(lo, hi)
    if x.dtype != torch.float32:  # autocast: round in float32, hand back the dtype it came in
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, 0, 255)


class QatRanges:
    """The tracked input range of each fake-quantized conv, and the weight scheme.

    Attributes:
        ranges: conv module name -> ``[lo, hi]`` (Python floats: the same on every rank and device).
        scheme: ``"u8s8"`` or ``"u8s7"`` (7-bit weights), as the export's ``--int8-scheme``.
        decay: the moving average's weight of the running range.
    """

    def __init__(self, scheme: str = "u8s8", decay: float = EMA_DECAY) -> None:
        if scheme not in WEIGHT_QMAX:
            raise ValueError(f"unknown int8 scheme {scheme!r}; choose from {list(WEIGHT_QMAX)}")
        self.ranges: Dict[str, List[float]] = {}
        self.scheme = scheme
        self.decay = decay

    def observe(self, name: str, x: torch.Tensor, *, update: bool) -> Tuple[float, float]:
        """The range to round ``x`` with; in training it first moves toward this batch's range."""
        known = self.ranges.get(name)
        if known is not None and not update:
            return known[0], known[1]
        batch = torch.stack([-x.detach().amin(), x.detach().amax()]).float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch, op=torch.distributed.ReduceOp.MAX)
        lo, hi = -float(batch[0]), float(batch[1])
        if known is not None:
            lo = self.decay * known[0] + (1 - self.decay) * lo
            hi = self.decay * known[1] + (1 - self.decay) * hi
        self.ranges[name] = [lo, hi]
        return lo, hi

    def state(self) -> Dict[str, Any]:
        """Plain data for a checkpoint (``ckpt["qat"]``)."""
        return {"scheme": self.scheme, "decay": self.decay, "ema": "batch min/max",
                "ranges": {k: list(v) for k, v in self.ranges.items()}}

    def load(self, state: Mapping[str, Any]) -> None:
        """Take the ranges (and scheme) a checkpoint saved."""
        self.scheme = str(state.get("scheme", self.scheme))
        self.ranges = {str(k): [float(v[0]), float(v[1])] for k, v in dict(state.get("ranges") or {}).items()}


def _qat_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    ranges, name = getattr(self, _ATTR)
    lo, hi = ranges.observe(name, x, update=self.training)
    weight = fake_quant_weight(self.weight, WEIGHT_QMAX[ranges.scheme])
    return self._conv_forward(fake_quant_activation(x, lo, hi), weight, self.bias)


def _bare(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP


def fake_quantized_convs(model: nn.Module) -> Iterator[Tuple[str, nn.Conv2d]]:
    """The convolutions ``--qat`` rounds: every plain ``nn.Conv2d`` outside :data:`QAT_SKIP`
    (a conv with its own forward, e.g. TF "SAME" padding, is left as it is)."""
    for name, module in _bare(model).named_modules():
        if (isinstance(module, nn.Conv2d) and not any(name == s or name.startswith(s + ".") for s in QAT_SKIP)
                and type(module).forward is nn.Conv2d.forward and module.padding_mode == "zeros"):
            yield name, module


def enable_fake_quant(model: nn.Module, scheme: Optional[str] = None) -> QatRanges:
    """Make the quantized convolutions of ``model`` compute as int8 will (in place; idempotent).

    Args:
        scheme: ``"u8s8"``/``"u8s7"``; default :func:`deeplab.cpu.int8_scheme` of this CPU (what
            ``deeplab export`` picks here by default).

    Returns:
        The :class:`QatRanges` the convs share (also ``qat_state(model)``).
    """
    existing = _ranges_of(model)
    if existing is not None:
        return existing
    if scheme is None:
        from deeplab.cpu import int8_scheme

        scheme = int8_scheme()[0]
    ranges = QatRanges(scheme)
    for name, conv in fake_quantized_convs(model):
        conv.forward = types.MethodType(_qat_forward, conv)  # type: ignore[method-assign]
        object.__setattr__(conv, _ATTR, (ranges, name))  # not a submodule: state_dict keeps its keys
    return ranges


def _ranges_of(model: nn.Module) -> Optional[QatRanges]:
    for module in _bare(model).modules():
        found = getattr(module, _ATTR, None)
        if found is not None:
            return found[0]
    return None


def qat_state(model: nn.Module) -> Optional[Dict[str, Any]]:
    """What a checkpoint records of the model's fake quantization; ``None`` when it has none."""
    ranges = _ranges_of(model)
    return None if ranges is None else ranges.state()


def load_qat_state(model: nn.Module, state: Optional[Mapping[str, Any]]) -> None:
    """Restore saved ranges into a model with fake quantization on (nothing to do otherwise)."""
    ranges = _ranges_of(model)
    if ranges is not None and state:
        ranges.load(state)


def disable_fake_quant(model: nn.Module) -> None:
    """Undo :func:`enable_fake_quant`: the convolutions compute in float again."""
    for module in _bare(model).modules():
        if getattr(module, _ATTR, None) is not None:
            del module.forward
            object.__delattr__(module, _ATTR)

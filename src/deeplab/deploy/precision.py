"""The precision policy: what ``precision="auto"`` runs a model at, and why.

The gate is accuracy. A bf16/int8 export stores its parity against the fp32 model
(:func:`deeplab.deploy.runtime.measure_parity`): the **pseudo-label mIoU delta** (100 minus the
mIoU of the low-precision predictions scored against the fp32 predictions, on held-out images)
and, where the calibration source has masks, the **true mIoU delta** (fp32 minus low precision).
The gate (:func:`gate_delta`) is the true delta where there were masks, else the pseudo-label
delta; it must be within :data:`PARITY_BOUNDS` (mIoU points): 1.0 for int8 (the TF reference's
8-bit MobileNetV2 loses 1.06), 0.3 for bf16.

``auto`` picks int8 or bf16 only when

1. the stored deltas are within the bound (:func:`parity_within_bound`), and
2. this CPU accelerates the precision *enough to matter*: an ISA flag that speeds it up
   (:mod:`deeplab.cpu`) whose measured gain over the best fp32 path (:data:`MEASURED_GAIN`) is at
   least :data:`MIN_GAIN` (10 %). On AVX2-only CPUs int8 measured 1.07x (R101, ONNX Runtime): not
   chosen there.

An int8 file has no float weights to fall back to; ``auto`` refuses it with the reason where it
would not pick it (out of bound, int8 not accelerated, or its 8-bit weights would saturate here)
and names what to run instead. ``precision="int8"`` runs it anyway.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from deeplab._utils import DeeplabError

__all__ = [
    "MEASURED_GAIN",
    "MIN_GAIN",
    "PARITY_BOUNDS",
    "PrecisionError",
    "choose_precision",
    "gain_on_this_cpu",
    "gate_delta",
    "parity_text",
    "parity_within_bound",
]

# The most mIoU (points) a precision may lose against fp32 on held-out images: the pseudo-label
# delta and, where masks exist, the true delta.
PARITY_BOUNDS: Dict[str, float] = {"int8": 1.0, "bf16": 0.3}

# The least speed-up over the best fp32 path that makes a lower precision worth its error.
MIN_GAIN = 1.10

# (precision, the ISA flag that accelerates it, or "none") -> measured speed-up of the best path at
# that precision over the best fp32 path, R101 DeepLabv3+ 513x513, and where it was measured.
# None: not measured; the flag alone decides.
MEASURED_GAIN: Dict[Tuple[str, str], Tuple[Optional[float], str]] = {
    ("int8", "amx_int8"): (2.13, "Intel Xeon AMX, 2 loaded vCPUs, ONNX Runtime int8 2.21 s vs OpenVINO fp32 4.71 s "
                                 "(deeplab bench, docs/precision.md)"),
    ("int8", "avx512_vnni"): (3.45, "AMD EPYC AVX-512 VNNI, ONNX Runtime int8 0.189 s vs best fp32 (deeplab bench)"),
    ("int8", "avx_vnni"): (None, "not measured"),
    ("int8", "none"): (1.07, "AMD EPYC AVX2 only, ONNX Runtime int8 1.78 s vs fp32 1.91 s (issue 19)"),
    ("bf16", "amx_bf16"): (4.06, "Intel Xeon AMX, 2 loaded vCPUs, OpenVINO bf16 1.16 s vs OpenVINO fp32 4.71 s "
                                 "(deeplab bench, docs/precision.md)"),
    ("bf16", "avx512_bf16"): (2.05, "AMD EPYC AVX512_BF16, OpenVINO bf16 0.318 s vs best fp32 (deeplab bench)"),
    ("bf16", "none"): (None, "no bf16 instructions: emulated, slower than fp32"),
}


class PrecisionError(DeeplabError, ValueError):
    """``auto`` cannot run a file at a precision it would choose; the message names the fix."""


def gate_delta(parity: Optional[Mapping[str, Any]]) -> Tuple[Optional[float], str]:
    """The delta the gate bounds and its name: the true mIoU delta where the held-out images had
    masks, else the pseudo-label mIoU delta.

    The true delta is the accuracy a user measures; the pseudo-label delta is its stand-in without
    masks and is far stricter on models with near-tied logits (every flipped pixel counts against,
    none for): the demo model's all-int8 file reads a pseudo-label delta of 18 on its held-out photo
    while its true mIoU there rises by 1.7.
    """
    if not parity:
        return None, "no stored parity"
    if parity.get("true_miou_delta") is not None:
        return float(parity["true_miou_delta"]), "true mIoU delta"
    if parity.get("miou_delta") is not None:
        return float(parity["miou_delta"]), "pseudo-label mIoU delta"
    return None, "no stored mIoU parity"


def parity_within_bound(parity: Optional[Mapping[str, Any]], precision: str) -> bool:
    """Whether a stored parity meets :data:`PARITY_BOUNDS` of ``precision`` by :func:`gate_delta`
    (``False`` without one, and for files from before the gate was accuracy: pixel agreement only)."""
    delta, _ = gate_delta(parity)
    return delta is not None and delta <= PARITY_BOUNDS[precision]


def parity_text(parity: Optional[Mapping[str, Any]], precision: str) -> str:
    """The stored parity in words, e.g. ``"pseudo-label mIoU delta 0.42 (bound 1)"``."""
    bound = PARITY_BOUNDS[precision]
    if not parity:
        return "no stored parity"
    if parity.get("miou_delta") is None:
        agreement = parity.get("pixel_agreement")
        shown = f" (only pixel agreement {100 * agreement:.1f}%)" if agreement is not None else ""
        return f"no stored mIoU parity{shown}"
    if parity.get("true_miou_delta") is not None:
        return (f"true mIoU delta {parity['true_miou_delta']:+.2f} on held-out masks (bound {bound:g}; "
                f"pseudo-label delta {parity['miou_delta']:.2f})")
    return f"pseudo-label mIoU delta {parity['miou_delta']:.2f} (bound {bound:g})"


def gain_on_this_cpu(precision: str, flags: Optional[Mapping[str, bool]] = None) -> Tuple[bool, str]:
    """Whether ``precision`` is accelerated here enough to matter (:data:`MIN_GAIN`), and why."""
    from deeplab.cpu import precision_support

    accelerated, why = precision_support(precision, flags)
    flag = why if accelerated else "none"
    gain, where = MEASURED_GAIN.get((precision, flag), (None, "not measured"))
    if gain is None:
        return accelerated, (f"{precision} accelerated by {why}" if accelerated else f"this CPU does not accelerate {precision} ({why})")
    if gain < MIN_GAIN:
        return False, (f"{precision} gains only {gain:.2f}x over fp32 on a CPU like this one "
                       f"({why}; measured: {where}), under the {MIN_GAIN:.2f}x that pays for its error")
    return True, f"{precision} accelerated by {why} ({gain:.2f}x fp32 measured: {where})"


def choose_precision(
    metadata: Optional[Mapping[str, Any]],
    backend: str,
    *,
    flags: Optional[Mapping[str, bool]] = None,
) -> Tuple[str, str]:
    """The precision ``"auto"`` runs a model at, and why (one sentence).

    Args:
        metadata: an exported file's metadata (``precision``, ``parity``, ``quantization``);
            ``None`` for a checkpoint.
        backend: ``"torch"``, ``"onnxruntime"``, ``"openvino"`` or ``"torchscript"``.
        flags: ISA flags (default this CPU's, :func:`deeplab.cpu.cpu_flags`; tests pass their own).

    Returns:
        ``(precision, reason)``.

    Raises:
        PrecisionError: an int8 file that ``auto`` would not pick (it has no fp32 weights): out of
            bound, not worth it on this CPU, or saturating here. The message says what to do.
    """
    from deeplab.cpu import int8_scheme_runs_here

    if metadata is None:
        return "fp32", "a checkpoint carries no measured bf16/int8 parity (export with --precision to measure one)"
    stored = str(metadata.get("precision") or "fp32")
    if stored == "fp32":
        return "fp32", "the file was exported at fp32"
    parity = metadata.get("parity") or {}
    within = parity_within_bound(parity, stored)
    fast, why = gain_on_this_cpu(stored, flags)
    text = parity_text(parity, stored)
    if stored == "int8":
        scheme = str((metadata.get("quantization") or {}).get("scheme") or "u8s8")
        runs, saturation = int8_scheme_runs_here(scheme, flags)
        problem = (None if within and fast and runs else
                   f"its {text} is out of bound" if not within else
                   f"it cannot run here: {saturation}" if not runs else why)
        if problem:
            raise PrecisionError(
                f"precision auto does not run this int8 file: {problem}; it holds no fp32 weights, so export the "
                "checkpoint at fp32 for this CPU (or pass precision int8 to run it anyway)")
        return "int8", f"{why}, {text}"
    # bf16: fp32 weights, bf16 at run time where it is fast, accurate and the backend has it
    if backend == "onnxruntime":
        return "fp32", "ONNX Runtime's CPU provider has no bf16 path (use backend openvino)"
    if not fast:
        return "fp32", why
    if not within:
        return "fp32", f"bf16 {text} is out of bound"
    return "bf16", f"{why}, {text}"

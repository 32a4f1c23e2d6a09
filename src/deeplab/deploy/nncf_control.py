"""Accuracy-aware int8 with OpenVINO NNCF (``--calib-method nncf``): ``nncf.quantize_with_accuracy_control``
on the ONNX graph, its validation function our gate.

NNCF 3.x runs accuracy control on ONNX models itself (its ONNX and OpenVINO backends both have
it), so the ONNX file is quantized in place, no OpenVINO IR on the way: the result is the same
QDQ file :func:`deeplab.deploy.quantize.quantize_openvino` writes, runnable in ONNX Runtime and
OpenVINO, with the layers NNCF reverted left float.

The validation function (:class:`GateValidation`) runs each candidate with ONNX Runtime exactly as
the stored parity is measured (:func:`deeplab.deploy.runtime.measure_parity` against the fp32
PyTorch model on the held-out images) and returns 100 minus the gate's delta
(:func:`deeplab.deploy.precision.gate_delta`: the true mIoU delta where the held-out images have
masks, else the pseudo-label mIoU delta; without masks that is the pseudo-label mIoU itself): NNCF
wants "higher is better" (and divides by the fp32 score, so not 0), and its absolute drop
``metric(fp32 file) - metric(int8)`` is then our delta less the fp32 file's own (~0). NNCF ranks
its groups of quantizers by that metric on the held-out images, reverts the worst to float one by
one, and stops when ``max_drop = bound - delta(fp32 file)`` holds: our gate, exactly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch

from deeplab.deploy.calibration import CalibrationSet
from deeplab.deploy.quantize import KEEP_FLOAT, NNCFSetup, nncf_setup
from deeplab.deploy.runtime import OnnxRuntimeModel, measure_parity

__all__ = ["GateValidation", "NNCFControlResult", "gate_metric", "nncf_accuracy_control", "quantized_convs"]

PathLike = Union[str, "os.PathLike[str]"]


def gate_metric(parity: Mapping[str, Any]) -> float:
    """NNCF's metric for a parity (higher is better): 100 minus :func:`deeplab.deploy.precision.gate_delta`
    (the fp32 model scores 100; NNCF divides by the fp32 score, so the offset keeps it from 0)."""
    from deeplab.deploy.precision import gate_delta

    delta, _ = gate_delta(parity)
    if delta is None:
        raise ValueError("the parity has no mIoU delta to validate with")
    return 100.0 - delta


def parity_line(parity: Mapping[str, Any]) -> str:
    """``"pseudo-label mIoU 97.1 (delta 2.90), true mIoU delta +0.40"``: one attempt, in words."""
    note = (f", true mIoU delta {parity['true_miou_delta']:+.2f}" if parity.get("true_miou_delta") is not None else "")
    return f"pseudo-label mIoU {parity['pseudo_miou']:.2f} (delta {parity['miou_delta']:.2f}){note}"


class GateValidation:
    """NNCF's ``validation_fn``: ``(onnx.ModelProto, data items) -> gate_metric`` on those held-out images.

    The data items are indices into ``calibration.parity`` (:meth:`dataset` transforms them into
    inputs for NNCF's own inference), so a subset keeps its sizes and masks. Each call writes the
    model to ``scratch`` and runs it with :class:`~deeplab.deploy.runtime.OnnxRuntimeModel`, the
    runner the stored parity is measured with. ``on_parity`` sees every call's parity and its
    number of images.
    """

    def __init__(self, reference: Callable[[torch.Tensor], torch.Tensor], calibration: CalibrationSet,
                 metadata: Mapping[str, Any], scratch: PathLike) -> None:
        self.reference = reference
        self.arrays, self.sizes, self.masks = calibration.parity, calibration.parity_sizes, calibration.parity_masks
        self.metadata = dict(metadata)
        self.scratch = Path(scratch)
        self.calls = 0
        self.on_parity: Optional[Callable[[Dict[str, Any], int], None]] = None

    def dataset(self, input_name: str) -> Any:
        """An ``nncf.Dataset`` of the held-out images' indices."""
        import nncf

        arrays = self.arrays
        return nncf.Dataset(list(range(len(arrays))), lambda i: {input_name: arrays[i]})

    def parity(self, model: Any, indices: Optional[Sequence[int]] = None) -> Dict[str, Any]:
        """:func:`~deeplab.deploy.runtime.measure_parity` of ONNX ``model`` on the held-out images ``indices`` (all)."""
        import onnx

        chosen = list(range(len(self.arrays))) if indices is None else [int(i) for i in indices]
        handle, name = tempfile.mkstemp(suffix=".onnx", dir=self.scratch)
        os.close(handle)
        try:
            onnx.save(model, name)
            runner = OnnxRuntimeModel(name, metadata=self.metadata)
            return measure_parity(self.reference, runner, [self.arrays[i] for i in chosen],
                                  sizes=[self.sizes[i] for i in chosen], masks=[self.masks[i] for i in chosen])
        finally:
            os.unlink(name)

    def __call__(self, model: Any, items: Iterable[Any]) -> float:
        indices = [int(i) for i in items]
        parity = self.parity(model, indices)
        self.calls += 1
        if self.on_parity is not None:
            self.on_parity(parity, len(indices))
        return gate_metric(parity)


class _Trace(logging.Handler):
    """Follows NNCF's accuracy-restoring loop through its log: "Validation of quantized model" and each
    "Reverted N operations" message are followed by the validation of that model (an attempt);
    "Re-calculating ranking scores" means the last group made it worse and was put back."""

    def __init__(self, say: Callable[[str], None], bound: float) -> None:
        super().__init__(logging.INFO)
        self.say, self.bound = say, bound
        self.attempts: List[Dict[str, Any]] = []
        self.pending: Optional[List[str]] = None
        self.float_ops = 0

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Validation of quantized model"):  # NNCF's plain int8 model comes next
            self.pending = []
        elif message.startswith("Reverted "):
            self.pending = [line.strip() for line in message.splitlines()[1:] if line.strip()]
        elif message.startswith("Re-calculating") and self.attempts:
            self.attempts[-1]["undone"] = True
            self.float_ops -= len(self.attempts[-1].get("reverted", []))

    def parity(self, parity: Dict[str, Any], images: int) -> None:
        if self.pending is None:
            return
        self.float_ops += len(self.pending)
        attempt = {"float_ops": self.float_ops, "miou_delta": parity["miou_delta"],
                   "true_miou_delta": parity.get("true_miou_delta")}
        self.attempts.append(attempt if not self.pending else dict(attempt, reverted=self.pending))
        self.say(f"int8 by NNCF with {self.float_ops} operation(s) reverted to float: {parity_line(parity)}; "
                 f"bound {self.bound:g}")
        self.pending = None


@contextlib.contextmanager
def _traced(trace: _Trace) -> Iterator[None]:
    """NNCF's INFO log goes to ``trace`` only (its own stdout handler is held at WARNING)."""
    logger = logging.getLogger("nncf")
    level, handlers = logger.level, [(h, h.level) for h in logger.handlers]
    for handler, old in handlers:
        handler.setLevel(max(old, logging.WARNING))
    logger.setLevel(logging.INFO)
    logger.addHandler(trace)
    try:
        yield
    finally:
        logger.removeHandler(trace)
        logger.setLevel(level)
        for handler, old in handlers:
            handler.setLevel(old)


def quantized_convs(model: Any) -> List[str]:
    """Names of the convs of ONNX ``model`` whose weights are int8 (read through a ``DequantizeLinear``)."""
    producer = {out: n for n in model.graph.node for out in n.output}
    return [n.name for n in model.graph.node if n.op_type == "Conv" and len(n.input) > 1
            and getattr(producer.get(n.input[1]), "op_type", None) == "DequantizeLinear"]


@dataclass
class NNCFControlResult:
    """What :func:`nncf_accuracy_control` wrote: the chosen file (``path``), NNCF's plain int8 file
    before any layer was reverted (``plain_path``), the metadata and the parity of each."""

    path: Path
    info: Dict[str, Any]
    parity: Dict[str, Any]
    plain_path: Path
    plain_parity: Dict[str, Any]


def nncf_accuracy_control(
    float_path: PathLike,
    workdir: PathLike,
    calibration: CalibrationSet,
    reference: Callable[[torch.Tensor], torch.Tensor],
    *,
    bound: float,
    keep_float: Sequence[str] = KEEP_FLOAT,
    scheme: Optional[str] = None,
    max_float_fraction: float = 0.5,
    report: Optional[Callable[[str], None]] = None,
) -> NNCFControlResult:
    """``nncf.quantize_with_accuracy_control`` of ``float_path`` to the gate ``bound`` (mIoU points),
    files written into ``workdir`` (:func:`deeplab.deploy.accuracy.quantize_to_bound` calls this for
    ``method="nncf"``).

    NNCF quantizes (as :func:`~deeplab.deploy.quantize.quantize_openvino`, ``keep_float`` ignored),
    and while the gate is over ``bound`` reverts its most harmful groups of quantizers to float, at
    most ``max_float_fraction`` of the quantizable convs' worth of steps. The result is the first
    model within the bound, else the more accurate of NNCF's last model and the plain int8 one.

    Returns:
        :class:`NNCFControlResult`. ``info`` adds to the quantization metadata ``"accuracy_control"``
        (NNCF's settings: ``max_drop``, the fp32 file's own delta, validations run),
        ``"sensitive_float"`` (convs NNCF reverted to float), ``"reverted_ops"`` (every operation it
        reverted: convs and the adds / concats between them) and ``"attempts"`` (the plain file, then
        each step: the operations it reverted, the deltas after it, whether NNCF put it back).

    Raises:
        ExportError: nncf is not installed, or NNCF failed.
    """
    import onnx

    from deeplab.deploy.precision import gate_delta

    work = Path(workdir)
    setup = nncf_setup(float_path, calibration.calibration, keep_float=keep_float, scheme=scheme)
    validate = GateValidation(reference, calibration, {"precision": "int8", "quantization": setup.info}, work)
    own = gate_delta(validate.parity(setup.model))[0] or 0.0  # the fp32 file against fp32 PyTorch: ~0
    ignored = set(setup.ignored_scope.names)
    convs = sum(1 for n in setup.model.graph.node if n.op_type == "Conv" and n.name not in ignored)
    steps, max_drop = max(1, int(convs * max_float_fraction)), max(0.0, bound - own)
    trace = _Trace(report or (lambda message: None), bound)
    validate.on_parity = trace.parity
    quantized = _restore(setup, validate, trace, work, max_drop=max_drop, steps=steps, name=str(float_path))
    plain_path, path = work / "intermediate_model.onnx", work / "int8-nncf-control.onnx"
    onnx.save(quantized, str(path))
    plain = onnx.load(str(plain_path))
    final = set(quantized_convs(quantized))
    reverted = [name for name in quantized_convs(plain) if name not in final]
    plain_parity, parity = validate.parity(plain), validate.parity(quantized)
    if not trace.attempts or trace.attempts[0]["float_ops"]:  # NNCF's log said nothing of its plain model
        trace.attempts.insert(0, {"float_ops": 0, "miou_delta": plain_parity["miou_delta"],
                                  "true_miou_delta": plain_parity.get("true_miou_delta")})
    delta, plain_delta = gate_delta(parity)[0] or 0.0, gate_delta(plain_parity)[0] or 0.0
    kept = [a for a in trace.attempts if not a.get("undone")]
    if delta > bound and plain_delta < delta:  # NNCF's search made it worse: the plain file
        path, parity, reverted, kept = plain_path, plain_parity, [], []
    info = dict(setup.info, float_nodes=[*setup.info["float_nodes"], *reverted], sensitive_float=reverted,
                reverted_ops=[name for a in kept for name in a.get("reverted", [])], attempts=trace.attempts,
                accuracy_control={"tool": "nncf.quantize_with_accuracy_control", "drop_type": "absolute",
                                  "max_drop": round(max_drop, 6), "fp32_file_delta": round(own, 6),
                                  "max_num_iterations": steps, "validations": validate.calls})
    return NNCFControlResult(path, info, parity, plain_path, plain_parity)


def _restore(setup: NNCFSetup, validate: GateValidation, trace: _Trace, work: Path, *, max_drop: float, steps: int,
             name: str) -> Any:
    """NNCF's ``quantize_with_accuracy_control`` (its plain int8 model saved into ``work``), traced."""
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    from deeplab.deploy.format import ExportError

    nncf = setup.nncf
    try:
        with _traced(trace):
            return nncf.quantize_with_accuracy_control(
                setup.model, setup.dataset, validate.dataset(setup.input_name), validate,
                max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE, subset_size=setup.subset_size,
                ignored_scope=setup.ignored_scope, advanced_quantization_parameters=setup.advanced,
                advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
                    max_num_iterations=steps, num_ranking_workers=1, intermediate_model_dir=str(work)),
            )
    except Exception as exc:
        raise ExportError(f"NNCF accuracy control of {name} failed: {str(exc).splitlines()[0] if str(exc) else exc!r}") from exc

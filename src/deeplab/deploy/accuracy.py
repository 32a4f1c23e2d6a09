"""Accuracy-aware int8 (:func:`quantize_to_bound`): quantize, measure the mIoU delta against fp32 on
the held-out images (:func:`deeplab.deploy.runtime.measure_parity`), and while it is over the bound
keep the most sensitive layers (:func:`layer_sensitivity`) in float, each with the conv that makes
its input (:func:`with_producers`). With ``method="nncf"`` NNCF's own accuracy control does the
search (:func:`deeplab.deploy.nncf_control.nncf_accuracy_control`), validated by the same gate.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from deeplab._utils import optional_import
from deeplab.deploy.calibration import CalibrationSet
from deeplab.deploy.format import ExportError
from deeplab.deploy.quantize import KEEP_FLOAT, QAT_NEEDS_ORT, default_calibration_method, quantize
from deeplab.deploy.runtime import OnnxRuntimeModel, measure_parity

__all__ = ["layer_sensitivity", "quantize_to_bound", "with_producers", "within_bound"]

PathLike = Union[str, "os.PathLike[str]"]


def within_bound(parity: Mapping[str, Any], bound: float) -> bool:
    """Whether a parity (:func:`~deeplab.deploy.runtime.measure_parity`) meets a delta ``bound``
    (mIoU points) by :func:`deeplab.deploy.precision.gate_delta`."""
    from deeplab.deploy.precision import gate_delta

    delta, _ = gate_delta(parity)
    return delta is not None and delta <= bound


def _with_outputs(model: Any, names: Sequence[str]) -> Any:
    """A copy of ONNX ``model`` that also returns the float tensors ``names``."""
    import onnx

    copy_ = onnx.ModelProto()
    copy_.CopyFrom(model)
    have = {o.name for o in copy_.graph.output}
    for name in names:
        if name not in have:
            copy_.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy_


def _run_outputs(model: Any, arrays: Sequence[np.ndarray]) -> Tuple[List[str], List[List[np.ndarray]]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feed = session.get_inputs()[0].name
    return names, [session.run(None, {feed: a}) for a in arrays]


def layer_sensitivity(float_path: PathLike, int8_path: PathLike, arrays: Sequence[np.ndarray]) -> List[Tuple[str, float]]:
    """How much error each quantized conv of ``int8_path`` adds, most sensitive first.

    Both files run on ``arrays`` with every quantized conv's input and output as extra outputs
    (which keeps ONNX Runtime from fusing those convs into int8 kernels: the QDQ graph then
    simulates int8 in float, without any CPU's rounding or saturation). A layer's score is the
    relative L2 error of its output minus that of its input (``||q - f|| / ||f||``, over all
    arrays): what quantizing this layer's weights and input adds to the error already there.

    Returns:
        ``[(conv node name, score), ...]`` sorted by score, largest first.
    """
    import onnx

    fp = onnx.load(str(float_path))
    q = onnx.load(str(int8_path))
    producer = {out: n for n in q.graph.node for out in n.output}
    consumers: Dict[str, List[Any]] = {}
    for n in q.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    fp_tensors = {out for n in fp.graph.node for out in n.output}

    def dequantized(tensor: str) -> str:
        # ORT folds a Relu into its conv's output Q/DQ pair: what the next layer reads is the DQ output
        for qnode in consumers.get(tensor, []):
            if qnode.op_type == "QuantizeLinear":
                for dq in consumers.get(qnode.output[0], []):
                    if dq.op_type == "DequantizeLinear":
                        return str(dq.output[0])
        return tensor

    def float_name(tensor: str) -> str:
        dq = producer.get(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear":
            qnode = producer.get(dq.input[0])
            if qnode is not None and qnode.op_type == "QuantizeLinear":
                return str(qnode.input[0])
        return tensor

    # (node, (float input, int8-graph input), (float output, int8-graph output))
    pairs: List[Tuple[str, Tuple[str, str], Tuple[str, str]]] = []
    for n in q.graph.node:
        weight = producer.get(n.input[1]) if n.op_type == "Conv" and len(n.input) > 1 else None
        if weight is None or weight.op_type != "DequantizeLinear":
            continue
        out = (n.output[0], dequantized(n.output[0]))
        inp = (float_name(n.input[0]), n.input[0])
        if out[0] in fp_tensors:
            pairs.append((n.name, inp if inp[0] in fp_tensors else ("", ""), out))
    if not pairs:
        return []
    fp_wanted = sorted({t for _, i, o in pairs for t in (i[0], o[0]) if t})
    q_wanted = sorted({t for _, i, o in pairs for t in (i[1], o[1]) if t})
    fp_names, fp_runs = _run_outputs(_with_outputs(fp, fp_wanted), arrays)
    q_names, q_runs = _run_outputs(_with_outputs(q, q_wanted), arrays)

    def error(pair: Tuple[str, str]) -> float:
        if not pair[0]:
            return 0.0
        i, j = fp_names.index(pair[0]), q_names.index(pair[1])
        num = sum(float(np.sum((q_run[j].astype(np.float64) - f_run[i]) ** 2)) for f_run, q_run in zip(fp_runs, q_runs))
        den = sum(float(np.sum(f_run[i].astype(np.float64) ** 2)) for f_run in fp_runs)
        return float(np.sqrt(num / den)) if den > 0 else 0.0

    scores = [(name, error(out) - error(inp)) for name, inp, out in pairs]
    return sorted(scores, key=lambda item: -item[1])


def _gate(parity: Mapping[str, Any]) -> float:
    from deeplab.deploy.precision import gate_delta

    delta, _ = gate_delta(parity)
    return float("inf") if delta is None else delta


def with_producers(float_path: PathLike, names: Sequence[str]) -> List[str]:
    """``names`` plus, for each, the conv that makes its input (through Relu / Clip).

    Keeping a conv float does not keep its *input* float: the conv producing that tensor still
    quantizes its own output (ONNX Runtime puts the Q/DQ pair on the producer's side). A float
    island therefore takes the producer along; measured on a model with an outlier channel, the
    consumer alone changed nothing, the pair restored the accuracy.
    """
    import onnx

    nodes = onnx.load(str(float_path), load_external_data=False).graph.node
    producer = {out: n for n in nodes for out in n.output}
    by_name = {n.name: n for n in nodes}
    out: List[str] = []
    for name in names:
        if name not in out:
            out.append(name)
        node = by_name.get(name)
        source = producer.get(node.input[0]) if node is not None and node.input else None
        while source is not None and source.op_type in ("Relu", "Clip", "Identity"):
            source = producer.get(source.input[0]) if source.input else None
        if source is not None and source.op_type == "Conv" and source.name not in out:
            out.append(source.name)
    return out


class _CachedReference:
    """The reference model's logits, computed once per input (every attempt compares against them)."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.model = model
        self.cache: Dict[Tuple[Tuple[int, ...], bytes], torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import hashlib

        key = (tuple(x.shape), hashlib.sha1(x.numpy().tobytes()).digest())
        if key not in self.cache:
            with torch.no_grad():
                self.cache[key] = self.model(x)
        return self.cache[key]


def _latency(path: Path, info: Mapping[str, Any], x: np.ndarray, runs: int = 3, backend: str = "onnxruntime") -> float:
    import time

    from deeplab.deploy.runtime import OpenVINOModel

    kind = OpenVINOModel if backend == "openvino" else OnnxRuntimeModel
    runner = kind(path, metadata={"precision": "int8", "quantization": dict(info)})
    t = torch.from_numpy(x)
    runner(t)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner(t)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def quantize_to_bound(
    float_path: PathLike,
    dst: PathLike,
    calibration: CalibrationSet,
    reference: Callable[[torch.Tensor], torch.Tensor],
    *,
    bound: float,
    method: Optional[str] = None,
    keep_float: Sequence[str] = KEEP_FLOAT,
    scheme: Optional[str] = None,
    max_float_fraction: float = 0.5,
    sensitivity_images: int = 2,
    report: Optional[Callable[[str], None]] = None,
    activation_ranges: Optional[Mapping[str, Sequence[float]]] = None,
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Accuracy-aware int8: quantize ``float_path`` into ``dst`` and keep layers in float until the
    held-out accuracy is within ``bound``.

    1. Quantize everything but ``keep_float``; measure the parity against ``reference`` on the
       held-out images (pseudo-label mIoU delta; true mIoU delta where they have masks).
    2. Over the bound: rank the quantized convs by :func:`layer_sensitivity` and keep the top 1, 2,
       4, ... in float, each with the conv that makes its input (:func:`with_producers`; ONNX
       Runtime ``nodes_to_exclude``; the calibration ranges are reused),
       measuring each attempt, until the bound holds or ``max_float_fraction`` of the convs are float.
       ``activation_ranges`` (tensor -> ``(lo, hi)``, from a ``--qat`` run) replace calibrated ranges
       in every attempt.
    3. Write the first attempt within the bound, else the most accurate one (its parity then says
       it is out of bound; :mod:`deeplab.deploy.precision` refuses it).

    ``method="nncf"`` (with ``max_float_fraction > 0``): steps 1-3 are NNCF's
    ``quantize_with_accuracy_control`` with our gate as its validation function
    (:func:`deeplab.deploy.nncf_control.nncf_accuracy_control`); its metadata adds
    ``"reverted_ops"`` and ``"accuracy_control"``, and the parity is measured again on the written
    file as for the other methods.

    Returns:
        ``(quantization, parity)`` for the metadata. ``quantization`` adds to :func:`quantize`'s
        ``"sensitive_float"`` (the convs kept float for accuracy), ``"attempts"`` (ranked layers ->
        deltas) and, when layers were kept float, ``"float_cost"`` (latency of the all-int8 and of
        the written file on one held-out image, and their ratio).
    """
    say = report or (lambda message: None)
    method = method or default_calibration_method()
    ref = _CachedReference(reference)
    arrays, sizes, masks = calibration.parity, calibration.parity_sizes, calibration.parity_masks
    if method == "nncf" and activation_ranges:
        raise ExportError(QAT_NEEDS_ORT)
    if method == "nncf" and max_float_fraction > 0:
        return _nncf_to_bound(float_path, dst, calibration, ref, bound=bound, keep_float=keep_float, scheme=scheme,
                              max_float_fraction=max_float_fraction, report=report)
    with tempfile.TemporaryDirectory(prefix="deeplab-int8-search-") as tmp:
        cache = Path(tmp) / "ranges.json" if method != "nncf" else None

        def attempt(extra: Sequence[str]) -> Tuple[Path, Dict[str, Any], Dict[str, Any]]:
            out = Path(tmp) / f"int8-{len(extra)}.onnx"
            info = quantize(float_path, out, calibration.calibration, method=method, keep_float=keep_float,
                            scheme=scheme, float_nodes=extra, calibration_cache=cache,
                            activation_ranges=activation_ranges)
            runner = OnnxRuntimeModel(out, metadata={"precision": "int8", "quantization": info})
            parity = measure_parity(ref, runner, arrays, sizes=sizes, masks=masks)
            note = (f", true mIoU delta {parity['true_miou_delta']:+.2f}" if parity.get("true_miou_delta") is not None
                    else "")
            say(f"int8 with {len(extra)} sensitive layer(s) float: pseudo-label mIoU {parity['pseudo_miou']:.2f} "
                f"(delta {parity['miou_delta']:.2f}){note}; bound {bound:g}")
            return out, info, parity

        first = attempt([])
        chosen, attempts = first, [{"float_layers": 0, "miou_delta": first[2]["miou_delta"],
                                    "true_miou_delta": first[2].get("true_miou_delta")}]
        extra: List[str] = []
        ranking: List[Tuple[str, float]] = []
        if not within_bound(first[2], bound) and max_float_fraction > 0:
            ranking = layer_sensitivity(float_path, first[0], arrays[:max(1, sensitivity_images)])
            limit = int(len(ranking) * max_float_fraction) if ranking else 0
            k = 1
            best = first
            while ranking and k <= limit:
                islands = with_producers(float_path, [name for name, _ in ranking[:k]])
                candidate = attempt(islands)
                attempts.append({"float_layers": k, "miou_delta": candidate[2]["miou_delta"],
                                 "true_miou_delta": candidate[2].get("true_miou_delta")})
                if within_bound(candidate[2], bound):
                    best, extra = candidate, islands
                    break
                if _gate(candidate[2]) < _gate(best[2]):
                    best, extra = candidate, islands
                if k == limit:
                    break
                k = min(limit, 2 * k)
            chosen = best
        path, info, parity = chosen
        info = dict(info, sensitive_float=list(extra), attempts=attempts)
        if ranking:
            info["sensitivity"] = [{"node": name, "score": round(score, 6)} for name, score in ranking[:10]]
        if extra:
            base, mixed = _latency(first[0], first[1], arrays[0]), _latency(path, info, arrays[0])
            info["float_cost"] = {"all_int8_s": base, "mixed_s": mixed, "slowdown": mixed / base if base else None}
        Path(dst).write_bytes(path.read_bytes())
    return info, parity


def _nncf_to_bound(
    float_path: PathLike,
    dst: PathLike,
    calibration: CalibrationSet,
    reference: Callable[[torch.Tensor], torch.Tensor],
    *,
    bound: float,
    keep_float: Sequence[str],
    scheme: Optional[str],
    max_float_fraction: float,
    report: Optional[Callable[[str], None]],
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """:func:`quantize_to_bound` by NNCF's accuracy control, with the same ``float_cost`` record."""
    from deeplab.deploy.nncf_control import nncf_accuracy_control

    with tempfile.TemporaryDirectory(prefix="deeplab-int8-nncf-") as tmp:
        result = nncf_accuracy_control(float_path, tmp, calibration, reference, bound=bound, keep_float=keep_float,
                                       scheme=scheme, max_float_fraction=max_float_fraction, report=report)
        info = result.info
        if result.path != result.plain_path and info["reverted_ops"]:
            x = calibration.parity[0]

            def cost(backend: str) -> Dict[str, Any]:
                base = _latency(result.plain_path, info, x, backend=backend)
                mixed = _latency(result.path, info, x, backend=backend)
                return {"all_int8_s": base, "mixed_s": mixed, "slowdown": mixed / base if base else None}

            info["float_cost"] = cost("onnxruntime")
            if optional_import("openvino") is not None:  # where NNCF's QDQ runs fast (ONNX Runtime does not fuse it)
                info["float_cost"]["openvino"] = cost("openvino")
        Path(dst).write_bytes(result.path.read_bytes())
    return info, result.parity

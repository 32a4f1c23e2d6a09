"""The machine's own limits per precision, measured in the process that runs the benchmark.

Each precision's limit is the best of the ``N x N`` GEMMs this process can run at the benchmark's
thread count (:data:`LIMIT_GEMMS`): fp32 - MKL (``torch.mm``), oneDNN (a 1x1 convolution,
channels_last), ONNX Runtime ``MatMul``, OpenVINO ``MatMul``, numpy's BLAS; bf16 - ``torch.mm``,
oneDNN and OpenVINO in bfloat16; int8 - ``torch._int_mm`` and ONNX Runtime ``MatMulInteger``.
:class:`Limits` samples them before, between and after the timed models and names the GEMM that
set each limit. The CPU's model name and the ISA flags that decide them (:data:`ISA_FLAGS`) come
from ``/proc/cpuinfo`` (:func:`machine_isa`). :mod:`deeplab.deploy.bench` divides each path by the
limit of its own precision.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch

from deeplab import cpu

__all__ = ["EMULATED_BELOW", "GEMMS", "ISA_FLAGS", "LIMIT_GEMMS", "PRECISIONS", "GemmSpec", "Limits",
           "error_line", "gemm_throughput", "machine_isa", "parse_cpuinfo"]

PRECISIONS = ("fp32", "bf16", "int8")

# The flags that decide the GEMM limits above: fp32 (AVX2 / AVX-512F FMA), bf16 (AVX-512 BF16,
# AMX), int8 (AVX-512 VNNI, AMX).
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")

# A bf16/int8 GEMM below this fraction of the fp32 one is an emulation, not a machine limit:
# dividing a path by it would flatter the path, so the limit is reported as n/a instead.
EMULATED_BELOW = 0.1
PROBE_SIZE = 256  # the quick first GEMM that decides whether a precision is worth sampling at full size


def parse_cpuinfo(text: str) -> Dict[str, Any]:
    """The CPU model name and the :data:`ISA_FLAGS` from the text of ``/proc/cpuinfo``
    (:func:`deeplab.cpu.parse_cpuinfo` restricted to the flags this table shows).

    Returns:
        ``{"cpu": name or None, "flags": {flag: bool for flag in ISA_FLAGS}}``.
    """
    return cpu.parse_cpuinfo(text, ISA_FLAGS)


def machine_isa(cpuinfo: str = "/proc/cpuinfo") -> Dict[str, Any]:
    """:func:`parse_cpuinfo` of this machine plus torch's own CPU capability (``AVX2``, ``AVX512``, ...)."""
    return cpu.machine_isa(cpuinfo, ISA_FLAGS)


@dataclass(frozen=True)
class GemmSpec:
    """How one precision's GEMM limit is measured."""

    op: str
    unit: str
    make: Callable[[int, torch.Generator], torch.Tensor]
    mm: Callable[..., torch.Tensor]
    out_dtype: torch.dtype


def _float_operand(dtype: torch.dtype) -> Callable[[int, torch.Generator], torch.Tensor]:
    def make(n: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n, n, generator=g).to(dtype)

    return make


def _int8_operand(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(-128, 128, (n, n), generator=g, dtype=torch.int8)


GEMMS: Dict[str, GemmSpec] = {
    "fp32": GemmSpec("torch.mm float32", "GFLOP/s", _float_operand(torch.float32), torch.mm, torch.float32),
    "bf16": GemmSpec("torch.mm bfloat16", "GFLOP/s", _float_operand(torch.bfloat16), torch.mm, torch.bfloat16),
    "int8": GemmSpec("torch._int_mm int8 -> int32", "GOP/s", _int8_operand, torch._int_mm, torch.int32),
}


def gemm_throughput(precision: str, n: int = 4096, repeat: int = 3) -> float:
    """Best ``n x n`` GEMM throughput of ``precision`` over ``repeat`` runs, in G(FL)OP/s (``2 n^3`` per run).

    Raises:
        ValueError: for a precision not in :data:`PRECISIONS`.
        RuntimeError: where this torch build or CPU has no such GEMM.
    """
    if precision not in GEMMS:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    spec = GEMMS[precision]
    g = torch.Generator().manual_seed(0)
    a = spec.make(n, g)
    b = spec.make(n, g)
    out = torch.empty(n, n, dtype=spec.out_dtype)
    spec.mm(a, b, out=out)  # warm-up: first-call dispatch and packing are not the limit
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        spec.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / max(best, 1e-9) / 1e9


def _timed(run: Callable[[], Any], n: int, repeat: int) -> float:
    run()  # warm-up: first-call dispatch, packing, session setup are not the limit
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / max(best, 1e-9) / 1e9


def _onednn_conv(dtype: torch.dtype) -> Callable[[int, int], float]:
    """oneDNN's GEMM as a 1x1 convolution: ``n`` channels in and out over ``s x s = n`` pixels
    (channels_last), ``2 n^3`` FLOP like an ``n x n`` GEMM."""

    def rate(n: int, repeat: int) -> float:
        side = max(1, int(round(n ** 0.5)))
        pixels = side * side
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, n, side, side, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(n, n, 1, 1, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            seconds_rate = _timed(lambda: torch.nn.functional.conv2d(x, w), n, repeat)
        return seconds_rate * pixels / n  # 2 n^2 pixels FLOP, not 2 n^3, when side^2 != n

    return rate


def _onnx_matmul(precision: str) -> Callable[[int, int], float]:
    """ONNX Runtime's ``MatMul`` (fp32) or ``MatMulInteger`` (uint8 x int8 -> int32) of ``n x n``."""

    def rate(n: int, repeat: int) -> float:
        import numpy as np
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        a: np.ndarray
        b: np.ndarray
        if precision == "int8":
            a = rng.integers(0, 256, (n, n), dtype=np.uint8)
            b = rng.integers(-128, 128, (n, n), dtype=np.int8)
            node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
            elem_in, elem_out = TensorProto.UINT8, TensorProto.INT32
        else:
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            node = helper.make_node("MatMul", ["a", "b"], ["y"])
            elem_in, elem_out = TensorProto.FLOAT, TensorProto.FLOAT
        graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", elem_in, [n, n])],
                                  [helper.make_tensor_value_info("y", elem_out, [n, n])],
                                  [numpy_helper.from_array(b, "b")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = min(model.ir_version, 9)
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return _timed(lambda: session.run(None, {"a": a}), n, repeat)

    return rate


def _openvino_matmul(precision: str) -> Callable[[int, int], float]:
    """OpenVINO's ``MatMul`` of ``n x n`` float32, at f32 or with ``INFERENCE_PRECISION_HINT=bf16``."""

    def rate(n: int, repeat: int) -> float:
        import numpy as np
        import openvino as ov
        import openvino.opset13 as ops

        rng = np.random.default_rng(0)
        a = ops.parameter([n, n], ov.Type.f32, name="a")
        b = ops.constant(rng.standard_normal((n, n), dtype=np.float32))
        model = ov.Model([ops.matmul(a, b, False, False)], [a], "gemm")
        config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32"}
        compiled = ov.Core().compile_model(model, "CPU", config)
        x = rng.standard_normal((n, n), dtype=np.float32)
        return _timed(lambda: compiled(x), n, repeat)

    return rate


def _numpy_matmul(n: int, repeat: int) -> float:
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return _timed(lambda: a @ b, n, repeat)


def _torch_gemm(precision: str) -> Callable[[int, int], float]:
    def rate(n: int, repeat: int) -> float:
        # looked up at call time, so a test that replaces gemm_throughput replaces this one
        return globals()["gemm_throughput"](precision, n, repeat)

    return rate


# precision -> {GEMM name: (n, repeat) -> G(FL)OP/s}: the candidates for the machine's limit. The
# first is torch's (it also decides whether the precision is native here, see Limits).
LIMIT_GEMMS: Dict[str, Dict[str, Callable[[int, int], float]]] = {
    "fp32": {"torch.mm float32 (MKL)": _torch_gemm("fp32"),
             "oneDNN 1x1 conv float32": _onednn_conv(torch.float32),
             "ONNX Runtime MatMul float32": _onnx_matmul("fp32"),
             "OpenVINO MatMul f32": _openvino_matmul("fp32"),
             "numpy matmul float32 (BLAS)": _numpy_matmul},
    "bf16": {"torch.mm bfloat16": _torch_gemm("bf16"),
             "oneDNN 1x1 conv bfloat16": _onednn_conv(torch.bfloat16),
             "OpenVINO MatMul bf16 hint": _openvino_matmul("bf16")},
    "int8": {"torch._int_mm int8 -> int32": _torch_gemm("int8"),
             "ONNX Runtime MatMulInteger u8 x s8": _onnx_matmul("int8")},
}


def error_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, at most 200 characters (a failed GEMM or path in the report)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


class Limits:
    """Samples of each precision's GEMM limit taken during the run, at one thread count.

    Every sample runs each of the precision's :data:`LIMIT_GEMMS` that works here and keeps the
    best; the limit is the best sample and names the GEMM that set it. A precision that cannot run
    here, or runs emulated (torch's GEMM below :data:`EMULATED_BELOW` of fp32 on a quick probe), is
    not sampled: its limit is ``None`` and :attr:`reasons` says why.
    """

    def __init__(self, threads: int, gemm_size: int, *, precisions: Sequence[str] = PRECISIONS,
                 gemms: Optional[Mapping[str, Mapping[str, Callable[[int, int], float]]]] = None) -> None:
        self.threads = threads
        self.gemm_size = gemm_size
        self.samples: Dict[str, List[float]] = {p: [] for p in precisions}
        self.by_gemm: Dict[str, Dict[str, float]] = {p: {} for p in precisions}
        self.gemm_errors: Dict[str, Dict[str, str]] = {p: {} for p in precisions}
        self.reasons: Dict[str, str] = {}
        self.gemms = gemms
        self._probed = False

    def _candidates(self, precision: str) -> Mapping[str, Callable[[int, int], float]]:
        if self.gemms is not None:
            return self.gemms.get(precision, {})
        return LIMIT_GEMMS.get(precision, {})

    def _probe(self) -> None:
        # A small GEMM first, so an emulated precision costs a fraction of a second, not the
        # minutes a full-size emulated GEMM can take. One thread: on a loaded machine a small
        # multi-threaded GEMM waits on descheduled workers, which would blur the ratio.
        size = min(PROBE_SIZE, self.gemm_size)
        rates: Dict[str, float] = {}
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for precision in self.samples:
                try:
                    rates[precision] = gemm_throughput(precision, size, repeat=3)
                except Exception as exc:  # unsupported dtype/op on this build or CPU: n/a with the reason
                    self.reasons[precision] = error_line(exc)
        finally:
            torch.set_num_threads(threads)
        fp32 = rates.get("fp32")
        for precision, rate in rates.items():
            if precision != "fp32" and fp32 and rate < EMULATED_BELOW * fp32:
                self.reasons[precision] = (
                    f"{GEMMS[precision].op} runs at {rate:.1f} {GEMMS[precision].unit}, under "
                    f"{EMULATED_BELOW:.0%} of fp32 ({fp32:.1f}) on a {size}^2 probe: no native {precision} GEMM here"
                )
        self._probed = True

    def sample(self) -> None:
        """One sample of every precision that runs here: the best of its GEMMs."""
        if not self._probed:
            self._probe()
        for precision, samples in self.samples.items():
            if precision in self.reasons:
                continue
            best: Optional[float] = None
            for name, rate_of in self._candidates(precision).items():
                if name in self.gemm_errors[precision]:
                    continue
                try:
                    rate = float(rate_of(self.gemm_size, 3))
                except Exception as exc:  # a runtime not installed, an op not supported: skip it, say why
                    self.gemm_errors[precision][name] = error_line(exc)
                    continue
                self.by_gemm[precision][name] = max(rate, self.by_gemm[precision].get(name, 0.0))
                best = rate if best is None else max(best, rate)
            if best is not None:
                samples.append(best)

    def peak(self, precision: str) -> Optional[float]:
        """The best sample of ``precision`` (``None`` where it was not measured)."""
        samples = self.samples.get(precision)
        return max(samples) if samples else None

    def winner(self, precision: str) -> Optional[str]:
        """The GEMM whose best run set ``precision``'s limit."""
        rates = self.by_gemm.get(precision) or {}
        return max(rates, key=lambda k: rates[k]) if rates else None

    def last(self) -> str:
        """The latest sample of each precision, for the progress log."""
        return ", ".join(
            f"{p} GEMM " + (f"{s[-1]:.0f} {GEMMS[p].unit} ({self.winner(p)})" if s else "n/a")
            for p, s in self.samples.items()
        )

    def as_dict(self) -> Dict[str, Dict[str, Any]]:
        """``{precision: {"peak", "samples", "unit", "op", "gemms", "gemm_errors", "size", "threads",
        "reason"}}``; ``op`` is the GEMM that set the limit, ``gemms`` every candidate's best;
        ``peak`` is ``None`` exactly when ``reason`` says why."""
        out: Dict[str, Dict[str, Any]] = {}
        for precision, samples in self.samples.items():
            peak = self.peak(precision)
            reason = self.reasons.get(precision) or (None if peak else "not sampled")
            out[precision] = {
                "peak": peak if reason is None else None,
                "samples": list(samples),
                "unit": GEMMS[precision].unit,
                "op": self.winner(precision) or GEMMS[precision].op,
                "gemms": dict(self.by_gemm[precision]),
                "gemm_errors": dict(self.gemm_errors[precision]),
                "size": self.gemm_size,
                "threads": self.threads,
                "reason": reason,
            }
        return out

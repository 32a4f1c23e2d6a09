"""The benchmark behind ``deeplab bench``: CPU inference latency of DeepLabv3+ against the machine's own limits.

``deeplab.cli.bench`` parses the flags and prints; everything measured lives here.

In one run, for each backbone (default ResNet-101, Xception-65, MobileNetV2; DeepLabv3+, OS 16,
separable ASPP/decoder, ``1 x 3 x 513 x 513``, fp32), it measures the latency of

* ``eager``      - the model as built, NCHW, ``torch.inference_mode``;
* ``eager_cl``   - BN folded, channels_last, ASPP's atrous depthwise convs as shifted
  multiply-adds (:func:`deeplab.deploy.optimize.optimize_for_inference` with ``fuse=False``);
* ``eager_opt``  - the same plus conv + ReLU/ReLU6 and ResNet's conv + add + ReLU as single
  oneDNN calls (:func:`deeplab.deploy.optimize.optimize_for_inference`, what ``Segmenter`` runs);
* ``compile``    - ``torch.compile`` (inductor, weight freezing) of the BN-folded model;
* ``onnxruntime``- the exported ONNX file (BN folded), ``ORT_ENABLE_ALL``, intra-op threads;
* ``openvino``   - the same ONNX file, OpenVINO CPU, ``PERFORMANCE_HINT=LATENCY``, f32, the
  input shape fixed at compile time (a deployment knows its input size);
* ``eager_bf16`` - ``eager_cl`` under ``torch.autocast`` bfloat16 (what ``Segmenter`` runs for
  ``precision="bf16"``);
* ``openvino_bf16`` - the ``openvino`` path with ``INFERENCE_PRECISION_HINT=bf16``;
* ``onnxruntime_int8`` / ``openvino_int8`` - the ONNX file quantized to int8 (static QDQ,
  per-channel weights, ONNX Runtime MinMax calibration on 2 random images: speed does not
  depend on the calibration, and the weights are random anyway; accuracy is measured by
  ``benchmarks/deploy_precision.py`` on a trained model);
* ``tflite`` / ``tflite_int8`` (asked for by name; they need litert-torch, which has an
  environment of its own) - the LiteRT file at the input's size, fp32 or full-integer int8, run
  by the LiteRT interpreter (XNNPACK);

each timed ``--repeat`` times after ``--warmup`` runs, *interleaved* (one run of each path in
turn), so a neighbour's load hits all paths alike; min and median are reported. It also
measures, in the same run and at the same thread count, the machine's limit per precision:

* **fp32 GEMM**: the best of the ``N x N`` float32 GEMMs this process can run: MKL
  (``torch.mm``), oneDNN (a 1x1 convolution of ``N`` channels over ``sqrt(N) x sqrt(N)`` pixels,
  channels_last, the same ``2 N^3`` FLOP), ONNX Runtime ``MatMul``, OpenVINO ``MatMul`` and
  numpy's BLAS (:data:`LIMIT_GEMMS`); MKL's sgemm is not the fastest GEMM on every CPU (on AMD
  EPYC ONNX Runtime ran a whole R101 faster than ``torch.mm`` ran a GEMM);
* **bf16 GEMM**: ``torch.mm`` in bfloat16, oneDNN's 1x1 convolution in bfloat16 and OpenVINO
  ``MatMul`` with ``INFERENCE_PRECISION_HINT=bf16`` (n/a where torch's is unsupported or emulated
  far below fp32);
* **int8 GEMM**: ``torch._int_mm`` (int8 x int8 -> int32) and ONNX Runtime ``MatMulInteger``
  (uint8 x int8 -> int32), ``2 N^3`` OPs;

each sampled before, between and after the models; the best sample is the limit. The CPU's
model name, ``torch.backends.cpu.get_cpu_capability()`` and the ISA flags that decide these
limits (AVX2, AVX-512F, AVX-512 BF16/VNNI, AMX BF16/INT8; from ``/proc/cpuinfo``) go with them.
Each path declares its precision (:data:`PATH_SPECS`); its effective throughput
``2 x Mult-Adds / median latency`` (Mult-Adds counted by ``deeplab info``'s FLOP counter) is
shown as a fraction of the GEMM limit of *that* precision, and the limit names the GEMM that set
it. A path faster than its limit proves the limit wrong: it is never shown above 100 %, the row
says "limit underestimated" (``"limit_underestimated": true`` in the JSON, with the factor).

Developer-only figures (per-op profiles, each conv timed in isolation) are in
``benchmarks/profile_ops.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from deeplab.deploy.limits import (  # re-exported: bench's JSON and table speak of them
    ISA_FLAGS,
    PRECISIONS,
    Limits,
    error_line,
    machine_isa,
)


@dataclass(frozen=True)
class PathSpec:
    """One deployment path: its table label and the precision whose limit its figure is divided by."""

    label: str
    precision: str


PATH_SPECS: Dict[str, PathSpec] = {
    "eager": PathSpec("eager fp32", "fp32"),
    "eager_cl": PathSpec("eager, BN folded + channels_last", "fp32"),
    "eager_opt": PathSpec("eager, + fused conv/ReLU/add (`Segmenter`)", "fp32"),
    "compile": PathSpec("torch.compile (inductor, frozen)", "fp32"),
    "onnxruntime": PathSpec("ONNX Runtime", "fp32"),
    "openvino": PathSpec("OpenVINO", "fp32"),
    "eager_bf16": PathSpec("eager bf16 autocast, BN folded + channels_last", "bf16"),
    "openvino_bf16": PathSpec("OpenVINO bf16 (`INFERENCE_PRECISION_HINT`)", "bf16"),
    "onnxruntime_int8": PathSpec("ONNX Runtime int8 (QDQ, per-channel)", "int8"),
    "openvino_int8": PathSpec("OpenVINO int8 (same QDQ file)", "int8"),
    "tflite": PathSpec("LiteRT (XNNPACK)", "fp32"),
    "tflite_int8": PathSpec("LiteRT int8 (full integer)", "int8"),
}
PATHS = tuple(PATH_SPECS)
# The LiteRT paths convert with litert-torch, which lives in an environment of its own: asked for by name.
DEFAULT_PATHS = tuple(p for p in PATHS if not p.startswith("tflite"))
DEFAULT_BACKBONES = ("resnet101", "xception65", "mobilenet_v2")

def path_precision(result: Dict[str, Any]) -> str:
    """The precision a result row is measured against: its own ``precision`` or its path's."""
    spec = PATH_SPECS.get(result.get("path", ""))
    return str(result.get("precision") or (spec.precision if spec else "fp32"))


def fraction_of_limit(result: Dict[str, Any], limits: Dict[str, Dict[str, Any]], key: str = "gflops") -> Optional[float]:
    """``result[key]`` as a fraction of the GEMM limit of the result's own precision (``None``: no
    limit). Above 1 the limit is underestimated (:func:`apply_limits` never reports such a figure)."""
    limit = limits.get(path_precision(result), {}).get("peak")
    value = result.get(key)
    if not limit or value is None:
        return None
    return float(value) / float(limit)


def apply_limits(results: List[Dict[str, Any]], limits: Dict[str, Dict[str, Any]]) -> None:
    """Give each timed row its ``fraction_of_limit`` (median) and ``fraction_of_limit_min``, in place.

    A row faster than its precision's limit proves that limit too low: its fractions become ``None``
    and ``limit_underestimated`` holds the factor (row / limit); the limit gets ``"underestimated":
    true`` and the largest such factor. So no figure above 100 % is ever reported.
    """
    for r in results:
        if "gflops" not in r:
            continue
        for key, field in (("gflops", "fraction_of_limit"), ("gflops_min", "fraction_of_limit_min")):
            frac = fraction_of_limit(r, limits, key)
            if frac is not None and frac > 1.0:
                r[field] = None
                r["limit_underestimated"] = max(frac, float(r.get("limit_underestimated") or 0.0))
                entry = limits[path_precision(r)]
                entry["underestimated"] = True
                entry["underestimated_by"] = max(frac, float(entry.get("underestimated_by") or 0.0))
            else:
                r[field] = frac


def _sync_runner(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        fn(x)

    return run


def build_paths(
    model: nn.Module,
    x: torch.Tensor,
    paths: Sequence[str],
    workdir: Path,
    threads: int,
    log: Callable[[str], None],
) -> Dict[str, Any]:
    """A zero-argument runner per path (or the error string if the path could not be built)."""
    from deeplab.deploy import export_onnx, fold_batchnorm, optimize_for_inference

    runners: Dict[str, Any] = {}
    folded: Optional[nn.Module] = None
    onnx_path: Optional[Path] = None
    int8_path: Optional[Path] = None
    stem = getattr(getattr(model, "config", None), "backbone", "model")
    for path in paths:
        start = time.perf_counter()
        try:
            if path == "eager":
                runners[path] = _sync_runner(model, x)
            elif path == "eager_cl":
                runners[path] = _sync_runner(optimize_for_inference(model, layout="channels_last", fuse=False), x)
            elif path == "eager_opt":
                runners[path] = _sync_runner(optimize_for_inference(model, layout="auto"), x)
            elif path == "compile":
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True
                folded = folded or fold_batchnorm(model)
                compiled = torch.compile(folded, dynamic=False)
                with torch.no_grad():
                    compiled(x)  # compile now, not inside the timed loop
                runners[path] = _sync_runner(compiled, x)
            elif path == "eager_bf16":
                from deeplab.deploy.runtime import AutocastBF16

                runners[path] = _sync_runner(AutocastBF16(optimize_for_inference(model, layout="channels_last", fuse=False)), x)
            elif path in ("onnxruntime", "openvino", "openvino_bf16", "onnxruntime_int8", "openvino_int8"):
                if onnx_path is None:
                    onnx_path = export_onnx(model, workdir / f"{stem}.onnx")
                from deeplab.deploy.runtime import OnnxRuntimeModel, OpenVINOModel

                file, precision = onnx_path, PATH_SPECS[path].precision
                if precision == "int8":
                    if int8_path is None:
                        int8_path = _quantized(onnx_path, workdir / f"{stem}.int8.onnx", x)
                    file = int8_path
                runner: nn.Module
                if path.startswith("onnxruntime"):
                    runner = OnnxRuntimeModel(file, threads=threads)
                else:
                    runner = OpenVINOModel(file, threads=threads, static_shapes=True, precision=precision)
                runner(x)  # first run: session / compiled-model setup, not inside the timed loop
                runners[path] = _sync_runner(runner, x)
            elif path in ("tflite", "tflite_int8"):
                runners[path] = _sync_runner(_litert(model, x, workdir / f"{stem}.{path}.tflite", path, threads), x)
            else:
                raise ValueError(f"unknown path {path!r}; choose from {list(PATHS)}")
        except Exception as exc:  # one backend failing (not installed, no compiler) must not end the run
            runners[path] = error_line(exc)
        log(f"  prepared {path:<12} in {time.perf_counter() - start:5.1f} s"
            + (f"  ({runners[path]})" if isinstance(runners[path], str) else ""))
    return runners


def _litert(model: nn.Module, x: torch.Tensor, path: Path, kind: str, threads: int) -> nn.Module:
    """The model as a LiteRT file at ``x``'s size, run by the LiteRT interpreter (int8: calibrated
    on 2 random images, as the ONNX int8 path: speed does not depend on the calibration)."""
    from deeplab.deploy.calibration import CalibrationSet
    from deeplab.deploy.export import model_metadata, prepare_for_export
    from deeplab.deploy.runtime import TFLiteModel
    from deeplab.deploy.tflite import export_tflite

    g = torch.Generator().manual_seed(1)
    calibration = CalibrationSet(arrays=[torch.randn(x[:1].shape, generator=g).numpy() for _ in range(2)],
                                 names=["random-0", "random-1"], source="random")
    precision = "int8" if kind == "tflite_int8" else "fp32"
    export_tflite(prepare_for_export(model, True), path, metadata=model_metadata(model), input_size=(x.shape[-2], x.shape[-1]),
                  precision=precision, calibration=calibration if precision == "int8" else None)
    runner = TFLiteModel(path, threads=threads)
    runner(x)
    return runner


def _quantized(src: Path, dst: Path, x: torch.Tensor) -> Path:
    """``src`` quantized to int8 (MinMax on 2 random images of ``x``'s shape), metadata kept."""
    from deeplab.deploy.export import write_onnx_metadata
    from deeplab.deploy.format import read_metadata
    from deeplab.deploy.quantize import quantize_onnx

    g = torch.Generator().manual_seed(1)
    images = [torch.randn(x.shape, generator=g).numpy() for _ in range(2)]
    info = quantize_onnx(src, dst, images, method="minmax")
    write_onnx_metadata(dst, {**read_metadata(src), "precision": "int8", "quantization": info})
    return dst


def time_interleaved(runners: Dict[str, Any], *, warmup: int, repeat: int) -> Dict[str, List[float]]:
    """``repeat`` timed rounds, each running every path once, after ``warmup`` rounds."""
    live = {k: v for k, v in runners.items() if callable(v)}
    times: Dict[str, List[float]] = {k: [] for k in live}
    with torch.inference_mode():
        for _ in range(warmup):
            for run in live.values():
                run()
        for _ in range(repeat):
            for name, run in live.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return times


def _fmt_pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _limit_text(precision: str, entry: Dict[str, Any]) -> str:
    if entry.get("peak") is None:
        return f"{precision} GEMM n/a ({entry.get('reason') or 'not measured'})"
    samples = ", ".join(f"{v:.0f}" for v in entry.get("samples", []))
    text = f"{precision} GEMM {entry['peak']:.0f} {entry.get('unit', 'GFLOP/s')} ({entry.get('op', '')}; samples {samples})"
    if entry.get("underestimated"):
        text += f" - underestimated: a path ran at {entry['underestimated_by']:.2f}x it"
    return text


def _isa_text(machine: Dict[str, Any]) -> str:
    isa = machine.get("isa") or {}
    flags = isa.get("flags") or {}
    have = [f for f in ISA_FLAGS if flags.get(f)]
    lack = [f for f in ISA_FLAGS if f in flags and not flags[f]]
    text = f"CPU {machine.get('cpu', '?')}, torch CPU capability {isa.get('torch_cpu_capability') or 'n/a'}"
    if flags:
        text += f"; ISA {', '.join(have) or 'none of ' + ', '.join(ISA_FLAGS)}"
        if have and lack:
            text += f" (no {', '.join(lack)})"
    return text + "."


def markdown_table(report: Dict[str, Any]) -> str:
    """The results as a Markdown table, then one paragraph with the limits and the ISA."""
    limits: Dict[str, Dict[str, Any]] = report["limits"]
    precisions = {path_precision(r) for r in report["results"]}
    # One precision (today: all fp32) names its limit; mixed rows are each divided by their own.
    against = f"{next(iter(precisions))} GEMM" if len(precisions) == 1 else "own-precision GEMM"
    lines = [
        f"| model | GMACs | path | min (s) | median (s) | GFLOP/s (median) | % of {against} (median / min) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        spec = PATH_SPECS.get(r["path"])
        label = spec.label if spec else r["path"]
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['gmacs']:.2f} | {label} | - | - | - | {r['error']} |")
            continue
        frac_med = r.get("fraction_of_limit", fraction_of_limit(r, limits, "gflops"))
        frac_min = r.get("fraction_of_limit_min", fraction_of_limit(r, limits, "gflops_min"))
        if r.get("limit_underestimated") or any(f is not None and f > 1.0 for f in (frac_med, frac_min)):
            over = r.get("limit_underestimated") or max(f for f in (frac_med, frac_min) if f is not None)
            shown = f"limit underestimated (path at {over:.2f}x it)"
        else:
            shown = f"{_fmt_pct(frac_med)} / {_fmt_pct(frac_min)}"
        lines.append(
            f"| {r['model']} | {r['gmacs']:.2f} | {label} | {r['min_s']:.3f} | "
            f"{r['median_s']:.3f} | {r['gflops']:.0f} | {shown} |"
        )
    sizes = {int(entry["size"]) for entry in limits.values() if entry.get("size")}
    size_text = f", {'/'.join(str(s) for s in sorted(sizes))}^2 matrices" if sizes else ""
    lines.append("")
    lines.append(
        f"Machine limits measured in this run ({report['machine']['threads']} threads{size_text}; best sample): "
        + "; ".join(_limit_text(p, limits[p]) for p in PRECISIONS if p in limits)
        + ". " + _isa_text(report["machine"])
    )
    return "\n".join(lines)


def mult_adds(*, arch: str, backbone: str, output_stride: int, separable: bool, size: int = 513,
              num_classes: int = 21) -> float:
    """Mult-Adds of one variant at ``1 x 3 x size x size``, as ``deeplab info`` counts them
    (:func:`deeplab.models.complexity.count`: the convolutions proper, on the meta device)."""
    from deeplab.config import ModelConfig
    from deeplab.models.complexity import count

    config = ModelConfig(arch=arch, backbone=backbone, num_classes=num_classes, output_stride=output_stride,
                         separable=separable)
    return float(count(config, size=size)["mult_adds"])


def run_bench(
    *,
    backbones: Sequence[str] = DEFAULT_BACKBONES,
    arch: str = "deeplabv3plus",
    size: int = 513,
    batch: int = 1,
    output_stride: int = 16,
    separable: bool = True,
    num_classes: int = 21,
    paths: Sequence[str] = DEFAULT_PATHS,
    warmup: int = 2,
    repeat: int = 7,
    threads: Optional[int] = None,
    gemm_size: int = 4096,
    log: Callable[[str], None] = print,
    gemms: Optional[Mapping[str, Mapping[str, Callable[[int, int], float]]]] = None,
) -> Dict[str, Any]:
    """Run the benchmark; returns the report dict (see :func:`markdown_table`).

    ``gemms`` replaces :data:`LIMIT_GEMMS` (tests; a quicker run with fewer candidates).
    """
    from deeplab._version import __version__
    from deeplab.models import build_model

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    limits = Limits(threads, gemm_size, gemms=gemms)
    limits.sample()
    log(f"limits: {limits.last()}")
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="deeplab-bench-") as tmp:
        for backbone in backbones:
            torch.manual_seed(0)
            model = build_model(arch=arch, backbone=backbone, num_classes=num_classes, output_stride=output_stride,
                                separable=separable).eval()
            macs = mult_adds(arch=arch, backbone=backbone, output_stride=output_stride, separable=separable, size=size,
                             num_classes=num_classes) * batch
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            log(f"{arch} {backbone} OS {output_stride} {'separable' if separable else 'regular'} "
                f"{batch}x3x{size}x{size}: {macs / 1e9:.2f} GMACs")
            runners = build_paths(model, x, paths, Path(tmp), threads, log)
            times = time_interleaved(runners, warmup=warmup, repeat=repeat)
            limits.sample()
            name = f"{arch} {backbone}"
            for path in paths:
                entry: Dict[str, Any] = {"model": name, "backbone": backbone, "path": path, "gmacs": macs / 1e9,
                                         "precision": PATH_SPECS[path].precision}
                if path not in times:
                    entry["error"] = runners.get(path, "not run")
                else:
                    samples = times[path]
                    entry.update(
                        times_s=samples,
                        min_s=min(samples),
                        median_s=statistics.median(samples),
                        gflops=2 * macs / statistics.median(samples) / 1e9,
                        gflops_min=2 * macs / min(samples) / 1e9,
                    )
                    log(f"  {path:<12} min {entry['min_s']:.3f} s  median {entry['median_s']:.3f} s  "
                        f"{entry['gflops']:.0f} GFLOP/s")
                results.append(entry)
            del runners, model
    limits.sample()
    log(f"limits: {limits.last()}")
    versions = {"torch": torch.__version__, "deeplab": __version__, "python": platform.python_version()}
    for module in ("onnxruntime", "openvino"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            pass
    isa = machine_isa()
    limit_table = limits.as_dict()
    apply_limits(results, limit_table)
    return {
        "config": {"arch": arch, "backbones": list(backbones), "size": size, "batch": batch,
                   "output_stride": output_stride, "separable": separable, "num_classes": num_classes,
                   "warmup": warmup, "repeat": repeat, "paths": list(paths), "gemm_size": gemm_size},
        "machine": {"cpu": isa.pop("cpu"), "threads": threads, "logical_cpus": os.cpu_count(), "isa": isa,
                    "versions": versions},
        "limits": limit_table,
        "results": results,
    }

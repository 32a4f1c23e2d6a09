"""``deeplab bench``: CPU inference latency of DeepLabv3+ against the machine's own limits.

In one run, for each backbone (default ResNet-101, Xception-65, MobileNetV2; DeepLabv3+, OS 16,
separable ASPP/decoder, ``1 x 3 x 513 x 513``, fp32), it measures the latency of

* ``eager``      - the model as built, NCHW, ``torch.inference_mode``;
* ``eager_cl``   - BN folded, channels_last, ASPP's atrous depthwise convs as shifted
  multiply-adds (:func:`deeplab.deploy.export.optimize_for_inference` with ``fuse=False``);
* ``eager_opt``  - the same plus conv + ReLU/ReLU6 and ResNet's conv + add + ReLU as single
  oneDNN calls (:func:`deeplab.deploy.export.optimize_for_inference`, what ``Segmenter`` runs);
* ``compile``    - ``torch.compile`` (inductor, weight freezing) of the BN-folded model;
* ``onnxruntime``- the exported ONNX file (BN folded), ``ORT_ENABLE_ALL``, intra-op threads;
* ``openvino``   - the same ONNX file, OpenVINO CPU, ``PERFORMANCE_HINT=LATENCY``, f32, the
  input shape fixed at compile time (a deployment knows its input size);

each timed ``--repeat`` times after ``--warmup`` runs, *interleaved* (one run of each path in
turn), so a neighbour's load hits all paths alike; min and median are reported. It also
measures, in the same run, the machine's fp32 limits:

* **FMA peak**: a tight loop of 12 independent AVX2 ``vfmadd231ps`` per iteration (no memory
  traffic, 192 FLOP/iteration), run on every thread at once - the machine's real
  fused-multiply-add throughput (x86-64 Linux with AVX2+FMA; elsewhere reported as n/a).
* **GEMM**: ``torch.mm`` of two ``N x N`` fp32 matrices (MKL), ``2 N^3`` FLOP.

Both are sampled before, between and after the models; the best sample is the limit. Each
path's effective throughput is ``2 x Mult-Adds / median latency`` (Mult-Adds counted by
``deeplab info``'s FLOP counter), also shown as a fraction of the FMA peak.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from deeplab.cli.common import cli_command

PATHS = ("eager", "eager_cl", "eager_opt", "compile", "onnxruntime", "openvino")
PATH_LABELS = {
    "eager": "eager fp32",
    "eager_cl": "eager, BN folded + channels_last",
    "eager_opt": "eager, + fused conv/ReLU/add (`Segmenter`)",
    "compile": "torch.compile (inductor, frozen)",
    "onnxruntime": "ONNX Runtime",
    "openvino": "OpenVINO",
}
DEFAULT_BACKBONES = ("resnet101", "xception65", "mobilenet_v2")

# fma_loop(n): 14 x vxorps; loop n times { 12 x vfmadd231ps ymm0-11, ymm12, ymm13 }; vzeroupper; ret.
# Assembled from the listing in benchmarks/fma_loop.s (SysV x86-64: n in rdi; ymm are caller-saved).
_FMA_LOOP = bytes.fromhex(
    "c5fc57c0c5f457c9c5ec57d2c5e457dbc5dc57e4c5d457edc5cc57f6c5c457ffc4413c57c0c4413457c9c4412c57d2"
    "c4412457dbc4411c57e4c4411457ed4889f8c4c21db8c5c4c21db8cdc4c21db8d5c4c21db8ddc4c21db8e5c4c21db8ed"
    "c4c21db8f5c4c21db8fdc4421db8c5c4421db8cdc4421db8d5c4421db8dd48ffcf75bfc5f877c3"
)
_FMA_FLOP_PER_ITER = 12 * 8 * 2  # 12 FMAs x 8 fp32 lanes x 2 FLOP


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class FmaKernel:
    """The AVX2 FMA loop as a callable (``None`` where it cannot run)."""

    def __init__(self) -> None:
        self.fn: Optional[Callable[[int], int]] = None
        self.reason = ""
        if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
            self.reason = f"needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
            return
        flags = _cpu_flags()
        if not {"avx2", "fma"} <= flags:
            self.reason = "CPU lacks AVX2/FMA"
            return
        try:
            self._buf = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except (OSError, ValueError) as exc:  # W^X policies forbid executable anonymous maps
            self.reason = f"cannot map executable memory ({exc})"
            return
        self._buf.write(_FMA_LOOP)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._buf))
        self.fn = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint64)(address)

    def gflops(self, threads: int, seconds: float = 0.25) -> Optional[float]:
        """FMA throughput of ``threads`` threads running the loop at once (ctypes drops the GIL)."""
        if self.fn is None:
            return None
        fn = self.fn
        n = 1_000_000
        start = time.perf_counter()
        fn(n)
        one = max(time.perf_counter() - start, 1e-6)
        n = max(int(n * seconds / one), 1_000_000)
        workers = [threading.Thread(target=fn, args=(n,)) for _ in range(threads)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - start
        return threads * n * _FMA_FLOP_PER_ITER / elapsed / 1e9


def gemm_gflops(n: int = 4096, repeat: int = 3) -> float:
    """Best fp32 ``torch.mm`` throughput for ``n x n`` matrices over ``repeat`` runs."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


class Limits:
    """Samples of the GEMM and FMA limits taken during the run."""

    def __init__(self, threads: int, gemm_size: int) -> None:
        self.threads = threads
        self.gemm_size = gemm_size
        self.kernel = FmaKernel()
        self.gemm: List[float] = []
        self.fma: List[float] = []

    def sample(self) -> None:
        self.gemm.append(gemm_gflops(self.gemm_size))
        value = self.kernel.gflops(self.threads)
        if value is not None:
            self.fma.append(value)

    @property
    def fma_peak(self) -> Optional[float]:
        return max(self.fma) if self.fma else None

    @property
    def gemm_peak(self) -> float:
        return max(self.gemm) if self.gemm else float("nan")


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
    from deeplab.deploy.export import export_onnx, fold_batchnorm, optimize_for_inference

    runners: Dict[str, Any] = {}
    folded: Optional[nn.Module] = None
    onnx_path: Optional[Path] = None
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
            elif path in ("onnxruntime", "openvino"):
                if onnx_path is None:
                    onnx_path = export_onnx(model, workdir / f"{model.config.backbone}.onnx")
                from deeplab.deploy.runtime import OnnxRuntimeModel, OpenVINOModel

                if path == "onnxruntime":
                    runner = OnnxRuntimeModel(onnx_path, threads=threads)
                else:
                    runner = OpenVINOModel(onnx_path, threads=threads, static_shapes=True)
                array = x.numpy()
                runner._run(array)
                runners[path] = (lambda r=runner, a=array: r._run(a))
            else:
                raise ValueError(f"unknown path {path!r}; choose from {list(PATHS)}")
        except Exception as exc:  # one backend failing (not installed, no compiler) must not end the run
            runners[path] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
        log(f"  prepared {path:<12} in {time.perf_counter() - start:5.1f} s"
            + (f"  ({runners[path]})" if isinstance(runners[path], str) else ""))
    return runners


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


def profile_ops(run: Callable[[], None], rows: int = 12) -> str:
    """Self-CPU time per op of one run (torch.profiler), as a table."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _fmt_pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def markdown_table(report: Dict[str, Any]) -> str:
    fma = report["limits"]["fma_peak_gflops"]
    gemm = report["limits"]["gemm_peak_gflops"]
    lines = [
        "| model | GMACs | path | min (s) | median (s) | GFLOP/s (median) | % FMA peak (median / min) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['gmacs']:.2f} | {PATH_LABELS.get(r['path'], r['path'])} | - | - | - | {r['error']} |")
            continue
        frac_med = r["gflops"] / fma if fma else None
        frac_min = r["gflops_min"] / fma if fma else None
        lines.append(
            f"| {r['model']} | {r['gmacs']:.2f} | {PATH_LABELS.get(r['path'], r['path'])} | {r['min_s']:.3f} | "
            f"{r['median_s']:.3f} | {r['gflops']:.0f} | {_fmt_pct(frac_med)} / {_fmt_pct(frac_min)} |"
        )
    fma_text = f"{fma:.0f}" if fma else f"n/a ({report['limits']['fma_note']})"
    lines.append("")
    lines.append(
        f"Machine limits measured in this run ({report['machine']['threads']} threads): FMA peak {fma_text} GFLOP/s "
        f"(samples {', '.join(f'{v:.0f}' for v in report['limits']['fma_samples_gflops']) or '-'}); "
        f"fp32 GEMM {gemm:.0f} GFLOP/s (torch.mm {report['limits']['gemm_size']}^2; samples "
        f"{', '.join(f'{v:.0f}' for v in report['limits']['gemm_samples_gflops'])})."
    )
    return "\n".join(lines)


def run_bench(
    *,
    backbones: Sequence[str] = DEFAULT_BACKBONES,
    arch: str = "deeplabv3plus",
    size: int = 513,
    batch: int = 1,
    output_stride: int = 16,
    separable: bool = True,
    num_classes: int = 21,
    paths: Sequence[str] = PATHS,
    warmup: int = 2,
    repeat: int = 7,
    threads: Optional[int] = None,
    gemm_size: int = 4096,
    profile: bool = False,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Run the benchmark; returns the report dict (see :func:`markdown_table`)."""
    from deeplab import __version__
    from deeplab.cli.info import count
    from deeplab.models import build_model

    if threads:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    limits = Limits(threads, gemm_size)
    limits.sample()
    log(f"limits: GEMM {limits.gemm[-1]:.0f} GFLOP/s, FMA "
        + (f"{limits.fma[-1]:.0f} GFLOP/s" if limits.fma else f"n/a ({limits.kernel.reason})"))
    results: List[Dict[str, Any]] = []
    profiles: Dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="deeplab-bench-") as tmp:
        for backbone in backbones:
            torch.manual_seed(0)
            model = build_model(arch=arch, backbone=backbone, num_classes=num_classes, output_stride=output_stride,
                                separable=separable).eval()
            macs = count(arch=arch, backbone=backbone, output_stride=output_stride, separable=separable, size=size,
                         num_classes=num_classes)["mult_adds"] * batch
            x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
            log(f"{arch} {backbone} OS {output_stride} {'separable' if separable else 'regular'} "
                f"{batch}x3x{size}x{size}: {macs / 1e9:.2f} GMACs")
            runners = build_paths(model, x, paths, Path(tmp), threads, log)
            times = time_interleaved(runners, warmup=warmup, repeat=repeat)
            limits.sample()
            name = f"{arch} {backbone}"
            for path in paths:
                entry: Dict[str, Any] = {"model": name, "backbone": backbone, "path": path, "gmacs": macs / 1e9}
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
            if profile:
                for path in ("eager", "eager_cl", "eager_opt"):
                    if callable(runners.get(path)):
                        profiles[f"{backbone}/{path}"] = profile_ops(runners[path])
                        log(f"profile {backbone} {path}:\n{profiles[f'{backbone}/{path}']}")
            del runners, model
    limits.sample()
    versions = {"torch": torch.__version__, "deeplab": __version__, "python": platform.python_version()}
    for module in ("onnxruntime", "openvino"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:
            pass
    report = {
        "config": {"arch": arch, "backbones": list(backbones), "size": size, "batch": batch,
                   "output_stride": output_stride, "separable": separable, "num_classes": num_classes,
                   "warmup": warmup, "repeat": repeat, "paths": list(paths)},
        "machine": {"cpu": cpu_name(), "threads": threads, "logical_cpus": os.cpu_count(), "versions": versions},
        "limits": {
            "fma_peak_gflops": limits.fma_peak,
            "fma_samples_gflops": limits.fma,
            "fma_note": limits.kernel.reason,
            "gemm_peak_gflops": limits.gemm_peak,
            "gemm_samples_gflops": limits.gemm,
            "gemm_size": gemm_size,
        },
        "results": results,
        "profiles": profiles,
    }
    for r in results:
        if "gflops" in r and limits.fma_peak:
            r["fraction_of_fma_peak"] = r["gflops"] / limits.fma_peak
            r["fraction_of_fma_peak_min"] = r["gflops_min"] / limits.fma_peak
        if "gflops" in r:
            r["fraction_of_gemm"] = r["gflops"] / limits.gemm_peak
    return report


@cli_command("bench")
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="deeplab bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT_BACKBONES))
    parser.add_argument("--arch", default="deeplabv3plus", choices=["deeplabv3plus", "deeplabv3"])
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--output-stride", type=int, default=16, choices=[8, 16, 32])
    parser.add_argument("--regular", action="store_true", help="regular 3x3 convs in ASPP/decoder (default: separable)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's (the machine's cores)")
    parser.add_argument("--gemm-size", type=int, default=4096)
    parser.add_argument("--profile", action="store_true", help="print a per-op profile of the eager paths")
    parser.add_argument("--json", default="bench.json", help="where to write the full report")
    args = parser.parse_args(argv)
    print(f"deeplab bench: {vars(args)}", flush=True)
    report = run_bench(
        backbones=args.backbones, arch=args.arch, size=args.size, batch=args.batch, output_stride=args.output_stride,
        separable=not args.regular, num_classes=args.num_classes, paths=args.paths, warmup=args.warmup,
        repeat=args.repeat, threads=args.threads, gemm_size=args.gemm_size, profile=args.profile,
        log=lambda s: print(s, flush=True),
    )
    table = markdown_table(report)
    print()
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

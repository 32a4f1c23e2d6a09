"""Eager fp32 efficiency: our paper-exact DeepLabv3+ against segmentation_models_pytorch's, same process.

    pip install --no-deps --target .cache/smp-target segmentation_models_pytorch==0.6.0 timm==1.0.31 torchvision==0.28.0
    PYTHONPATH=src python benchmarks/smp_compare.py --repeat 5

smp, timm and torchvision are *not* dependencies of the package: they are installed with
``--no-deps`` into a folder of their own (``--smp-target``, default ``.cache/smp-target``) that only
this script puts on ``sys.path``, so the shared environment keeps its versions. A torchvision
wheel whose C++ ops do not load next to this torch fails at import in ``_meta_registrations.py``
(``torch.library.register_fake("torchvision::...")`` on an op that does not exist): while it is
imported here, ``register_fake`` applies only where the op is present (:func:`guarded_register_fake`).

Both models are built from random weights (speed does not depend on them), in eval mode, timed
interleaved (one run of each in turn) after a warm-up, under ``torch.inference_mode``:

* ours: ``deeplab.build_model(arch="deeplabv3plus", backbone=B, output_stride=16)`` (separable
  ASPP/decoder, BN+ReLU after every depthwise conv, as the paper), ``1 x 3 x 513 x 513``;
* ours, optimised: :func:`deeplab.deploy.optimize.optimize_for_inference` (BN folded, channels_last,
  fused conv+ReLU: what ``Segmenter`` runs);
* smp: ``DeepLabV3Plus(encoder_name=B, encoder_weights=None, encoder_output_stride=16)`` at
  ``1 x 3 x 512 x 512`` (smp needs a multiple of 16).

Throughput = 2 x Mult-Adds (torch's FLOP counter) / median latency; the ratio ours / smp of
GFLOP/s is what the issue bounds (>= 1.0).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def guarded_register_fake() -> Iterator[None]:
    """``torch.library.register_fake`` that skips ops this process does not have (torchvision's
    meta registrations when its C++ extension did not load)."""
    real = torch.library.register_fake

    def guarded(op: Any, *args: Any, **kwargs: Any) -> Any:
        name = op if isinstance(op, str) else None
        namespace, _, opname = (name or "").partition("::")
        if name and not hasattr(getattr(torch.ops, namespace), opname.split(".")[0]):
            return lambda fn=None, *a, **k: fn  # the C++ op is absent: nothing to give a fake kernel
        return real(op, *args, **kwargs)

    torch.library.register_fake = guarded  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.library.register_fake = real  # type: ignore[assignment]


def import_smp(target: Path) -> Any:
    if target.is_dir():
        sys.path.insert(0, str(target))
    with guarded_register_fake():
        import segmentation_models_pytorch as smp
        import torchvision  # noqa: F401  (imported under the guard)
    return smp


def mult_adds(model: torch.nn.Module, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 2


def interleaved(runs: Dict[str, Callable[[], Any]], warmup: int, repeat: int) -> Dict[str, List[float]]:
    times: Dict[str, List[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        for _ in range(warmup):
            for run in runs.values():
                run()
        for _ in range(repeat):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
    return times


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--smp-target", type=Path, default=REPO / ".cache" / "smp-target")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import deeplab
    from deeplab.deploy.optimize import optimize_for_inference

    smp = import_smp(args.smp_target)
    torch.manual_seed(0)
    ours = deeplab.build_model(arch="deeplabv3plus", backbone=args.backbone, num_classes=21, output_stride=16).eval()
    theirs = smp.DeepLabV3Plus(encoder_name=args.backbone, encoder_weights=None, encoder_output_stride=16,
                               classes=21).eval()
    x_ours = torch.randn(1, 3, 513, 513)
    x_smp = torch.randn(1, 3, 512, 512)
    optimised = optimize_for_inference(ours, layout="auto")
    macs = {"ours": mult_adds(ours, x_ours), "ours_optimised": mult_adds(ours, x_ours), "smp": mult_adds(theirs, x_smp)}
    runs = {"ours": lambda: ours(x_ours), "ours_optimised": lambda: optimised(x_ours), "smp": lambda: theirs(x_smp)}
    times = interleaved(runs, args.warmup, args.repeat)
    rows = {}
    for name, samples in times.items():
        median = statistics.median(samples)
        rows[name] = {"median_s": median, "min_s": min(samples), "gmacs": macs[name] / 1e9,
                      "gflops": 2 * macs[name] / median / 1e9}
    report = {
        "backbone": args.backbone, "threads": torch.get_num_threads(), "repeat": args.repeat, "rows": rows,
        "ratio_eager": rows["ours"]["gflops"] / rows["smp"]["gflops"],
        "ratio_optimised": rows["ours_optimised"]["gflops"] / rows["smp"]["gflops"],
        "versions": {"torch": torch.__version__, "smp": smp.__version__},
    }
    for name, row in rows.items():
        print(f"{name:<15} median {row['median_s']:.3f} s  min {row['min_s']:.3f} s  {row['gmacs']:.2f} GMACs  "
              f"{row['gflops']:.1f} GFLOP/s")
    print(f"ratio of GFLOP/s, ours / smp: eager {report['ratio_eager']:.2f}, optimised {report['ratio_optimised']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

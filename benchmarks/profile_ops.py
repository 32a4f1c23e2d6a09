"""Where the eager paths spend their time: per-op profiles and each conv timed on its own.

    python benchmarks/profile_ops.py                                  # R101, the three eager paths
    python benchmarks/profile_ops.py --backbone xception65 --convs    # + every conv in isolation
    python benchmarks/profile_ops.py --backbone mobilenet_v2 --size 65 --paths eager --rows 8

Developer figures behind the *Speed* section of the README (``deeplab bench`` measures the
deploy paths themselves):

* ``torch.profiler`` self-CPU time per op of one run of each eager path (``eager``: the model
  as built; ``eager_cl``: BN folded + channels_last; ``eager_opt``: + fused conv/ReLU/add, what
  ``Segmenter`` runs), as the profiler's table;
* with ``--convs``: every conv of the ``eager_opt`` model timed in isolation on the input it
  gets in the real forward pass (min of ``--conv-repeat``), its Mult-Adds, GFLOP/s and share of
  the fp32 GEMM limit (``torch.mm`` of ``--gemm-size``\\ :sup:`2` matrices, measured in the same
  run), grouped by kind (1x1, 3x3 dense, depthwise, ...). This is what shows that dense 3x3
  convs run near the GEMM limit while 1x1 and depthwise ones do not.

Writes all of it as JSON to ``--json`` (default ``benchmarks/results/profile_ops.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import torch
from torch import nn

from deeplab.deploy.optimize import (
    FusedConv2d,
    ShiftDepthwiseConv,
    optimize_for_inference,
)
from deeplab.models import build_model

EAGER_PATHS = ("eager", "eager_cl", "eager_opt")
CONV_TYPES = (nn.Conv2d, FusedConv2d, ShiftDepthwiseConv)


def eager_model(model: nn.Module, path: str) -> nn.Module:
    """The model as ``deeplab bench`` runs it on ``path`` (one of :data:`EAGER_PATHS`)."""
    if path == "eager":
        return model
    if path == "eager_cl":
        return optimize_for_inference(model, layout="channels_last", fuse=False)
    if path == "eager_opt":
        return optimize_for_inference(model, layout="auto")
    raise ValueError(f"unknown eager path {path!r}; choose from {list(EAGER_PATHS)}")


def profile_table(model: nn.Module, x: torch.Tensor, rows: int = 12) -> str:
    """Self-CPU time per op of one run of ``model(x)`` (after one warm-up run), as a table."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        model(x)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(x)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def profile_paths(model: nn.Module, x: torch.Tensor, paths: Sequence[str], rows: int = 12) -> Dict[str, str]:
    """:func:`profile_table` of each eager path, keyed by path."""
    return {path: profile_table(eager_model(model, path), x, rows) for path in paths}


def conv_kind(module: nn.Module) -> str:
    """A short name for a conv's shape class: ``1x1``, ``3x3``, ``3x3 depthwise``, ``3x3 atrous`` ..."""
    if isinstance(module, ShiftDepthwiseConv):
        kh, kw = module.kernel
        return f"{kh}x{kw} depthwise atrous (shifted)"
    kh, kw = cast(torch.Tensor, module.weight).shape[2:]
    groups, in_channels = int(getattr(module, "groups")), int(getattr(module, "in_channels"))
    depthwise = groups > 1 and groups == in_channels
    atrous = max(int(d) for d in getattr(module, "dilation")) > 1
    return f"{kh}x{kw}" + (" depthwise" if depthwise else "") + (" atrous" if atrous else "")


def conv_mult_adds(module: nn.Module, output: torch.Tensor) -> int:
    """Nominal Mult-Adds of one call (every tap counted, as ``deeplab info`` counts them)."""
    if isinstance(module, ShiftDepthwiseConv):
        kh, kw = module.kernel
        return output.numel() * kh * kw
    _, per_group, kh, kw = cast(torch.Tensor, module.weight).shape
    return output.numel() * per_group * kh * kw


def capture_conv_inputs(model: nn.Module, x: torch.Tensor) -> List[Tuple[str, nn.Module, Tuple[Any, ...], Dict[str, Any]]]:
    """``(name, module, args, kwargs)`` of every conv call in one forward pass of ``model(x)``."""
    calls: List[Tuple[str, nn.Module, Tuple[Any, ...], Dict[str, Any]]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CONV_TYPES):
            def hook(mod: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any], name: str = name) -> None:
                calls.append((name, mod, args, dict(kwargs)))

            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def best_time(fn: Callable[[], Any], repeat: int) -> float:
    """Min wall time of ``repeat`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def fp32_gemm_gflops(n: int, repeat: int = 3) -> float:
    """Best ``torch.mm`` throughput of two ``n x n`` fp32 matrices (the limit ``deeplab bench`` reports)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    return 2.0 * n**3 / best_time(lambda: torch.mm(a, b, out=out), repeat) / 1e9


def time_convs(model: nn.Module, x: torch.Tensor, repeat: int = 5) -> List[Dict[str, Any]]:
    """Each conv of ``model`` timed on its own real input: name, kind, Mult-Adds, seconds, GFLOP/s."""
    rows = []
    with torch.inference_mode():
        for name, module, args, kwargs in capture_conv_inputs(model, x):
            output = module(*args, **kwargs)
            macs = conv_mult_adds(module, output)
            seconds = best_time(functools.partial(module, *args, **kwargs), repeat)
            rows.append({"name": name, "kind": conv_kind(module), "mult_adds": macs, "seconds": seconds,
                         "gflops": 2 * macs / seconds / 1e9})
    return rows


def conv_summary(rows: List[Dict[str, Any]], gemm_gflops: float) -> str:
    """Per conv kind: count, GMACs, share of the conv time, GFLOP/s and % of the fp32 GEMM, as Markdown."""
    groups: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["kind"]].append(row)
    total = sum(r["seconds"] for r in rows) or 1.0
    lines = ["| conv kind | convs | GMACs | time (ms) | share of conv time | GFLOP/s | % of fp32 GEMM |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, members in sorted(groups.items(), key=lambda kv: -sum(r["seconds"] for r in kv[1])):
        macs = sum(r["mult_adds"] for r in members)
        seconds = sum(r["seconds"] for r in members)
        gflops = 2 * macs / seconds / 1e9
        lines.append(f"| {kind} | {len(members)} | {macs / 1e9:.2f} | {1e3 * seconds:.1f} | {seconds / total:.0%} | "
                     f"{gflops:.0f} | {gflops / gemm_gflops:.0%} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Parse ``argv``, print the profiles (and conv tables), write the JSON; returns the report."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--arch", default="deeplabv3plus", choices=["deeplabv3plus", "deeplabv3"])
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--output-stride", type=int, default=16, choices=[8, 16, 32])
    parser.add_argument("--regular", action="store_true", help="regular 3x3 convs in ASPP/decoder (default: separable)")
    parser.add_argument("--num-classes", type=int, default=21)
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--paths", nargs="+", default=list(EAGER_PATHS), choices=list(EAGER_PATHS))
    parser.add_argument("--rows", type=int, default=12, help="ops per profile table")
    parser.add_argument("--convs", action="store_true", help="also time every conv of eager_opt in isolation")
    parser.add_argument("--conv-repeat", type=int, default=5)
    parser.add_argument("--gemm-size", type=int, default=4096)
    parser.add_argument("--json", default="benchmarks/results/profile_ops.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(arch=args.arch, backbone=args.backbone, num_classes=args.num_classes,
                        output_stride=args.output_stride, separable=not args.regular).eval()
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    report: Dict[str, Any] = {"config": vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__}
    report["profiles"] = {f"{args.backbone}/{path}": table
                          for path, table in profile_paths(model, x, args.paths, args.rows).items()}
    for key, table in report["profiles"].items():
        print(f"profile {key}:\n{table}")
    if args.convs:
        rows = time_convs(eager_model(model, "eager_opt"), x, args.conv_repeat)
        gemm = fp32_gemm_gflops(args.gemm_size)
        report.update(convs=rows, gemm_gflops=gemm)
        print(f"each conv of eager_opt alone ({report['threads']} threads; fp32 GEMM {gemm:.0f} GFLOP/s):")
        print(conv_summary(rows, gemm))
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

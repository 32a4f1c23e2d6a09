"""The GPU check: what the CPU test suite cannot show, on one CUDA GPU, in under 8 minutes.

Run through ``scripts/gpu_check.sh`` (which installs the package without replacing a CUDA
torch). Every phase runs ``deeplab`` in its own process, so one failure is a row of the
table, not the end of the check:

a) training throughput of DeepLabv3+ ResNet-101 OS 16 from random init on synthetic
   VOC-layout data (written here, under a temporary directory) with ``--amp --amp-dtype bf16``,
   ``--amp --amp-dtype fp16`` (channels-last, the default) and bf16 with ``--no-channels-last``;
b) ``torchrun --nproc_per_node 1 -m deeplab.cli.main train ...``, and an NCCL probe: one
   process group with torch's own ``torch.nn.SyncBatchNorm`` (what ``convert_sync_batchnorm``
   picks on CUDA) under DDP. With WORLD_SIZE=1 ``deeplab train`` itself initialises no
   process group (see ``deeplab/distributed.init_distributed``), hence the probe;
c) exact resume on CUDA: N steps straight vs N/2 (``stop_at``) + ``--resume`` to N, comparing
   ``last.pt`` weights, with cuDNN/cuBLAS deterministic settings (``deeplab train`` has no
   flag for them; this script sets them before calling it) and the straight run repeated
   once as the noise floor (bilinear upsampling's backward uses atomics on CUDA, so even
   "deterministic" runs may differ by rounding);
d) inference latency at 1x3x513x513, eager vs ``torch.compile``, fp32 and bf16 autocast:
   median of 20 runs after warm-up, timed with ``torch.cuda.synchronize``.

Then it prints one markdown table of all figures. ``--dry-run`` (or
``DEEPLAB_GPU_CHECK_CPU=1``) runs the same phases on the CPU at tiny sizes (fp16 and
channels-last do not exist there and are reported as skipped), to test the script itself.
Exit status 1 if any phase failed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sizes:
    """How big each phase is: the GPU sizes, or tiny ones for ``--dry-run`` on a CPU."""

    device: str
    backbone: str
    crop: int
    batch: int
    steps: int
    log_every: int
    resume_crop: int
    resume_batch: int
    resume_steps: int
    images: int
    image_hw: tuple
    infer_size: int
    infer_runs: int
    infer_warmup: int
    num_workers: int
    phase_timeout_s: int


GPU = Sizes("cuda", "resnet101", 513, 8, 20, 5, 321, 4, 8, 32, (540, 620), 513, 20, 5, 4, 300)
CPU = Sizes("cpu", "resnet101", 65, 2, 4, 1, 65, 2, 4, 6, (80, 96), 65, 3, 1, 0, 600)


@dataclass
class Row:
    phase: str
    setting: str
    result: str
    notes: str = ""
    ok: bool = True


# --------------------------------------------------------------------------- helpers


def write_voc(root: Path, n: int, hw: Sequence[int], seed: int = 0) -> Path:
    """``root/VOCdevkit/VOC2012`` (JPEGImages, palette SegmentationClass PNGs, train.txt), as
    ``tests/data_fixtures.make_voc`` lays it out; masks are blocks of the 21 classes and 255."""
    import numpy as np
    from PIL import Image

    from deeplab.data.palettes import voc_colormap

    voc = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = hw
    palette = [v for c in voc_colormap(256) for v in c]
    ids = [f"gpu_{i:04d}" for i in range(n)]
    for name in ids:
        blocks = rng.integers(0, 21, (h // 32 + 1, w // 32 + 1))
        blocks[rng.random(blocks.shape) < 0.05] = 255
        mask = np.kron(blocks, np.ones((32, 32), dtype=np.int64))[:h, :w].astype(np.uint8)
        # Image correlated with the mask, so the loss has something to learn.
        image = (mask[..., None] * np.array([11, 23, 37]) % 256 + rng.integers(0, 40, (h, w, 3))).clip(0, 255)
        Image.fromarray(image.astype(np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg", quality=90)
        png = Image.fromarray(mask)
        png.putpalette(palette)
        png.save(voc / "SegmentationClass" / f"{name}.png")
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("".join(f"{i}\n" for i in ids))
    return root


def train_args(sz: Sizes, data: Path, out: Path, *, crop: int, batch: int, steps: int, extra: Sequence[str] = ()) -> List[str]:
    return [
        "train", "--dataset", "voc", "--data-root", str(data), "--train-split", "train", "--val-split", "none",
        "--arch", "deeplabv3plus", "--backbone", sz.backbone, "--output-stride", "16",
        "--pretrained-backbone", "none", "--max-steps", str(steps), "--batch-size", str(batch),
        "--crop-size", str(crop), "--log-every", str(sz.log_every), "--ckpt-every", "0", "--eval-every", "0",
        "--num-workers", str(sz.num_workers), "--device", sz.device, "--seed", "0", "--out", str(out),
        "--no-progress", *extra,
    ]


def run_logged(cmd: Sequence[str], log: Path, timeout_s: int, env: Optional[Dict[str, str]] = None) -> tuple:
    """Run ``cmd`` with output to ``log``; returns ``(ok, seconds, last line of output)``."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        try:
            rc = subprocess.run(list(cmd), stdout=handle, stderr=subprocess.STDOUT, timeout=timeout_s,
                                env=env, cwd=REPO).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    seconds = time.perf_counter() - start
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    last = lines[-1][-200:] if lines else ""
    if rc == 124:
        last = f"timed out after {timeout_s} s; {last}"
    return rc == 0, seconds, last


def train_speed(run_dir: Path) -> str:
    """Median img/s of the logged train steps after the first log (cuDNN autotuning, warm-up)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [r["img_per_s"] for r in records if r.get("kind") == "train" and r.get("img_per_s")]
    if not speeds:
        return "no train records"
    steady = speeds[1:] or speeds
    loss = [r["loss"] for r in records if r.get("kind") == "train"][-1]
    return f"{statistics.median(steady):.1f} img/s (last loss {loss:.3f})"


def max_abs_diff(a: Path, b: Path) -> str:
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=True)["model"]
    sb = torch.load(b, map_location="cpu", weights_only=True)["model"]
    if sa.keys() != sb.keys():
        return "different keys"
    diff = max(((sa[k].double() - sb[k].double()).abs().max().item() if sa[k].is_floating_point()
                else float(not torch.equal(sa[k], sb[k]))) for k in sa)
    return f"{diff:.3g}"


def python_cmd(*args: str) -> List[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


# --------------------------------------------------------------------------- entries run in child processes


def entry_train(argv: List[str]) -> int:
    """``deeplab train`` with deterministic kernels and, optionally, a stop after step K."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--stop-at", type=int, default=None)
    parser.add_argument("--deterministic", action="store_true")
    own, rest = parser.parse_known_args(argv)
    import torch

    import deeplab.cli.train as cli_train

    if own.deterministic:
        # The loop sets cudnn.benchmark=True; with deterministic=True it only picks among
        # deterministic algorithms. warn_only: bilinear upsampling's CUDA backward has none.
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    if own.stop_at is not None:
        # The CLI has no --stop-at; the loop's stop_at writes last.pt there without changing
        # the schedule (max_steps), exactly what an interrupted run leaves.
        cli_train.train = functools.partial(cli_train.train, stop_at=own.stop_at)  # type: ignore[assignment]
    # ``rest`` is a full ``deeplab train ...`` argument list; cli.train.main takes what follows "train".
    return cli_train.main(rest[1:] if rest[:1] == ["train"] else rest)


def entry_syncbn_probe(argv: List[str]) -> int:
    """Under torchrun: a real process group, torch's SyncBatchNorm (CUDA) under DDP, one step."""
    import torch
    import torch.distributed as dist

    from deeplab.models import build_model
    from deeplab import distributed as D

    device = D.resolve_device("auto", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = D.default_backend(device.type)
    # deeplab's init_distributed skips WORLD_SIZE=1; the probe wants the group anyway.
    dist.init_process_group(backend=backend, init_method="env://")
    torch.manual_seed(0)
    # No dropout: the two forwards must compute the same function.
    plain = build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=5, dropout=0.0).to(device).train()
    synced = build_model(arch="deeplabv3plus", backbone="mobilenet_v2", num_classes=5, dropout=0.0)
    synced.load_state_dict(plain.state_dict())
    synced = D.convert_sync_batchnorm(synced.to(device), device=device).train()
    kinds = sorted({type(m).__name__ for m in synced.modules() if "BatchNorm" in type(m).__name__})
    # DDP directly: deeplab's wrap_ddp leaves a world of one unwrapped, the probe wants DDP's path.
    ddp = torch.nn.parallel.DistributedDataParallel(synced, device_ids=[device.index] if device.type == "cuda" else None)
    x = torch.randn(4, 3, 97, 97, device=device)
    y_plain = plain(x)
    y_sync = ddp(x)
    y_sync.square().mean().backward()
    # One process: the synchronised statistics are the local ones, so outputs agree.
    diff = (y_plain - y_sync).abs().max().item()
    grads = all(p.grad is not None for p in synced.parameters())
    print(json.dumps({"backend": dist.get_backend(), "world_size": dist.get_world_size(), "bn_types": kinds,
                      "ddp": type(ddp).__name__, "max_diff_vs_bn": diff, "all_grads": grads}))
    dist.destroy_process_group()
    return 0 if diff < 1e-3 and grads else 1


def entry_latency(argv: List[str]) -> int:
    """Median latency (ms) of DeepLabv3+ at 1x3xSxS: eager / compiled x fp32 / bf16 autocast."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", default="resnet101")
    parser.add_argument("--size", type=int, default=513)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args(argv)
    import torch

    from deeplab.models import build_model

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = build_model(arch="deeplabv3plus", backbone=args.backbone, num_classes=21, output_stride=16).eval().to(device)
    x = torch.randn(1, 3, args.size, args.size, device=device)
    compiled = None if args.no_compile else torch.compile(model)
    for name, net in (("eager", model), ("compile", compiled)):
        for precision in ("fp32", "bf16"):
            key = f"{name} {precision}"
            if net is None:
                print(json.dumps({"variant": key, "skipped": "--no-compile"}), flush=True)
                continue
            try:
                with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                            enabled=precision == "bf16"):
                    sync()
                    start = time.perf_counter()
                    net(x)  # the first call compiles
                    sync()
                    first = time.perf_counter() - start
                    for _ in range(args.warmup):
                        net(x)
                    times = []
                    for _ in range(args.runs):
                        sync()
                        start = time.perf_counter()
                        net(x)
                        sync()
                        times.append(time.perf_counter() - start)
                print(json.dumps({"variant": key, "median_ms": 1e3 * statistics.median(times),
                                  "min_ms": 1e3 * min(times), "first_call_s": first}), flush=True)
            except Exception as exc:  # one variant failing (e.g. no compiler) is a row, not the end
                print(json.dumps({"variant": key, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"}),
                      flush=True)
    return 0


# --------------------------------------------------------------------------- phases


def phase_throughput(sz: Sizes, data: Path, work: Path, env: Dict[str, str]) -> List[Row]:
    rows = []
    variants = [
        ("bf16, channels-last", ["--amp", "--amp-dtype", "bf16", "--channels-last"]),
        ("fp16, channels-last", ["--amp", "--amp-dtype", "fp16", "--channels-last"]),
        ("bf16, NCHW", ["--amp", "--amp-dtype", "bf16", "--no-channels-last"]),
        ("fp32 (TF32 convs), channels-last", ["--no-amp", "--channels-last"]),
    ]
    for label, extra in variants:
        setting = f"{sz.backbone} OS16 b{sz.batch} {sz.crop}px, {sz.steps} steps, {label}"
        if sz.device == "cpu" and "fp16" in label:
            rows.append(Row("a) train", setting, "skipped", "CPU: no fp16 autocast"))
            continue
        out = work / f"speed_{len(rows)}"
        ok, seconds, last = run_logged(
            [sys.executable, "-m", "deeplab.cli.main", *train_args(sz, data, out, crop=sz.crop, batch=sz.batch,
                                                                    steps=sz.steps, extra=extra)],
            work / f"speed_{len(rows)}.log", sz.phase_timeout_s, env)
        result = train_speed(out) if ok else f"FAILED: {last}"
        notes = f"{seconds:.0f} s wall incl. start-up" + ("; channels-last is CUDA-only" if sz.device == "cpu" else "")
        rows.append(Row("a) train", setting, result, notes, ok))
    return rows


def phase_torchrun(sz: Sizes, data: Path, work: Path, env: Dict[str, str]) -> List[Row]:
    rows = []
    torchrun = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    launcher = [*torchrun, "--standalone", "--nproc_per_node", "1"]
    out = work / "torchrun"
    amp = ["--amp", "--amp-dtype", "bf16"]
    ok, seconds, last = run_logged(
        [*launcher, "-m", "deeplab.cli.main", *train_args(sz, data, out, crop=sz.crop, batch=sz.batch,
                                                          steps=sz.steps, extra=amp)],
        work / "torchrun.log", sz.phase_timeout_s, env)
    rows.append(Row("b) torchrun", f"--nproc_per_node 1 deeplab train, bf16, {sz.steps} steps",
                    train_speed(out) if ok else f"FAILED: {last}",
                    "WORLD_SIZE=1: deeplab runs it as one process (no group, no DDP, no SyncBN); torchrun sets OMP_NUM_THREADS=1", ok))
    # torchrun runs a script path with its own python: no sys.executable here.
    ok, seconds, last = run_logged([*launcher, str(Path(__file__).resolve()), "--entry", "syncbn"], work / "syncbn.log",
                                   sz.phase_timeout_s, env)
    probe: Dict[str, Any] = {}
    for line in (work / "syncbn.log").read_text(errors="replace").splitlines():
        if line.startswith("{"):
            probe = json.loads(line)
    if ok and probe:
        result = (f"{probe['backend']} group of {probe['world_size']}, {'/'.join(probe['bn_types'])} under "
                  f"{probe['ddp']}; max abs diff vs BatchNorm {probe['max_diff_vs_bn']:.2g}")
    else:
        result = f"FAILED: {last}"
    rows.append(Row("b) SyncBN probe", "torchrun 1 proc, convert_sync_batchnorm + DDP, fwd/bwd", result,
                    "torch.nn.SyncBatchNorm on CUDA (NCCL); CPUSyncBatchNorm on CPU (Gloo)", ok))
    return rows


def phase_resume(sz: Sizes, data: Path, work: Path, env: Dict[str, str]) -> List[Row]:
    n, half = sz.resume_steps, sz.resume_steps // 2
    det_env = dict(env, CUBLAS_WORKSPACE_CONFIG=":4096:8")
    amp = ["--amp", "--amp-dtype", "bf16"]

    def args(out: Path, *extra: str) -> List[str]:
        return train_args(sz, data, out, crop=sz.resume_crop, batch=sz.resume_batch, steps=n, extra=[*amp, *extra])

    runs = [
        ("straight", python_cmd("--entry", "train", "--deterministic", *args(work / "straight"))),
        ("straight again", python_cmd("--entry", "train", "--deterministic", *args(work / "straight2"))),
        ("first half", python_cmd("--entry", "train", "--deterministic", "--stop-at", str(half), *args(work / "split"))),
        ("resumed", python_cmd("--entry", "train", "--deterministic",
                               *args(work / "split", "--resume", str(work / "split" / "last.pt")))),
    ]
    for label, cmd in runs:
        ok, _, last = run_logged(cmd, work / f"resume_{label.replace(' ', '_')}.log", sz.phase_timeout_s, det_env)
        if not ok:
            return [Row("c) resume", f"{label} run", f"FAILED: {last}", ok=False)]
    straight = work / "straight" / "last.pt"
    setting = f"{n} steps vs {half} + resume to {n}, bf16, b{sz.resume_batch} {sz.resume_crop}px, deterministic"
    return [
        Row("c) resume", setting, f"max abs diff straight vs resumed: {max_abs_diff(straight, work / 'split' / 'last.pt')}",
            "0 = exact"),
        Row("c) resume", "noise floor: the straight run twice",
            f"max abs diff straight vs straight again: {max_abs_diff(straight, work / 'straight2' / 'last.pt')}",
            "non-zero: CUDA kernels without a deterministic variant (e.g. bilinear backward atomics)"),
    ]


def phase_latency(sz: Sizes, work: Path, env: Dict[str, str], compile_: bool) -> List[Row]:
    cmd = python_cmd("--entry", "latency", "--backbone", sz.backbone, "--size", str(sz.infer_size), "--runs",
                     str(sz.infer_runs), "--warmup", str(sz.infer_warmup), "--device", sz.device,
                     *([] if compile_ else ["--no-compile"]))
    ok, _, last = run_logged(cmd, work / "latency.log", sz.phase_timeout_s, env)
    rows = []
    for line in (work / "latency.log").read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        setting = f"{sz.backbone} 1x3x{sz.infer_size}x{sz.infer_size}, {r['variant']}"
        if "median_ms" in r:
            rows.append(Row("d) latency", setting, f"{r['median_ms']:.2f} ms median (min {r['min_ms']:.2f})",
                            f"first call {r['first_call_s']:.1f} s; {sz.infer_runs} runs after {sz.infer_warmup} warm-up"))
        elif "skipped" in r:
            rows.append(Row("d) latency", setting, "skipped", r["skipped"]))
        else:
            rows.append(Row("d) latency", setting, f"FAILED: {r['error']}", ok=False))
    if not ok or not rows:
        rows.append(Row("d) latency", "all variants", f"FAILED: {last}", ok=False))
    return rows


def markdown(rows: List[Row], header: str) -> str:
    lines = [header, "", "| phase | setting | result | notes |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.phase} | {r.setting} | {r.result.replace('|', '/')} | {r.notes.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--entry"]:
        entries = {"train": entry_train, "syncbn": entry_syncbn_probe, "latency": entry_latency}
        return entries[argv[1]](argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (also DEEPLAB_GPU_CHECK_CPU=1)")
    parser.add_argument("--phases", default="abcd", help="subset of a, b, c, d to run (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile in d)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, runs)")
    args = parser.parse_args(argv)
    import torch

    dry = args.dry_run or os.environ.get("DEEPLAB_GPU_CHECK_CPU") == "1"
    if not dry and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available; on a CPU machine run `scripts/gpu_check.sh --dry-run`", file=sys.stderr)
        return 2
    sz = CPU if dry else GPU
    # Children import this checkout's deeplab even where the editable install points elsewhere.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])))
    env.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    gpu = torch.cuda.get_device_name(0) if not dry else "CPU (dry run)"
    header = (f"## GPU check: {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
              f"cuDNN {torch.backends.cudnn.version() if torch.cuda.is_available() else None}")
    work = Path(tempfile.mkdtemp(prefix="deeplab-gpu-check-"))
    start = time.perf_counter()
    rows: List[Row] = []
    try:
        data = write_voc(work / "voc", sz.images, sz.image_hw)
        if "a" in args.phases:
            rows += phase_throughput(sz, data, work, env)
        if "b" in args.phases:
            rows += phase_torchrun(sz, data, work, env)
        if "c" in args.phases:
            rows += phase_resume(sz, data, work, env)
        if "d" in args.phases:
            rows += phase_latency(sz, work, env, compile_=not args.no_compile)
    finally:
        rows.append(Row("total", "wall time of the check", f"{time.perf_counter() - start:.0f} s",
                        f"logs in {work}" if args.keep else ""))
        failed = not all(r.ok for r in rows)
        if failed and not args.keep:
            rows[-1].notes = f"a phase failed: logs kept in {work}"
        print(markdown(rows, header))
        if not (args.keep or failed):
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""What this CPU accelerates: ISA flags from ``/proc/cpuinfo`` and the precisions they speed up.

Standard library + torch only, so every layer may ask (``deeplab bench`` shows the flags,
``Segmenter``'s ``precision="auto"`` decides with them). Tests pass a cpuinfo text or a flag
dict instead of reading this machine's (:func:`parse_cpuinfo`, ``flags=`` arguments), or
monkeypatch :func:`cpu_flags`.

Which instruction sets make a precision faster than fp32 on the CPU:

* **bf16**: AMX-BF16 (Intel Sapphire Rapids+: tile matmuls, ~2-4x fp32) or AVX-512 BF16
  (``vdpbf16ps``: Intel Cooper Lake, AMD Zen 4+; ~1.3-2x fp32 in GEMMs).
* **int8**: AMX-INT8, AVX-512 VNNI or AVX-VNNI (``vpdpbusd``: one u8 x s8 -> s32 multiply-add
  per lane, ~2-4x fp32). Without VNNI, int8 convs are emulated with ``vpmaddubsw`` pairs and
  gain little or nothing over fp32 (and risk saturation).

**int8 saturation** (:func:`int8_scheme`): without VNNI the u8 x s8 product is formed by
``vpmaddubsw``, which adds two u8*s8 products into a *saturating* int16: 2 x 255 x 127 = 64770 >
32767, so large activations times large weights clip. ONNX Runtime's quantizer documents
``reduce_range`` (7-bit weights, |w| <= 63: 2 x 255 x 63 = 32130 fits) for exactly this. int8
files built on a CPU without VNNI use it (scheme ``"u8s7"``); files built with full 8-bit
weights (``"u8s8"``, on VNNI/AMX CPUs) are refused on a CPU without VNNI
(:func:`int8_scheme_runs_here`).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "CPU_FLAGS",
    "PRECISION_ISA",
    "accelerated_precisions",
    "cpu_flags",
    "INT8_SCHEMES",
    "int8_scheme",
    "int8_scheme_runs_here",
    "machine_isa",
    "parse_cpuinfo",
    "precision_support",
]

# The flags that decide which precision is fast here (see the module docstring).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")

# precision -> the flags that accelerate it, fastest first.
PRECISION_ISA: Dict[str, Tuple[str, ...]] = {
    "bf16": ("amx_bf16", "avx512_bf16"),
    "int8": ("amx_int8", "avx512_vnni", "avx_vnni"),
}


def parse_cpuinfo(text: str, flags: Sequence[str] = CPU_FLAGS) -> Dict[str, Any]:
    """The CPU model name and the ``flags`` asked for, from the text of ``/proc/cpuinfo``.

    Args:
        text: the file's contents (the first processor's entries are used).
        flags: which flags to report.

    Returns:
        ``{"cpu": name or None, "flags": {flag: bool for flag in flags}}``.
    """
    name: Optional[str] = None
    found: Optional[set] = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "model name" and name is None:
            name = value.strip()
        elif key in ("flags", "Features") and found is None:  # "Features" on ARM
            found = set(value.split())
    return {"cpu": name, "flags": {flag: flag in (found or set()) for flag in flags}}


def machine_isa(cpuinfo: str = "/proc/cpuinfo", flags: Sequence[str] = CPU_FLAGS) -> Dict[str, Any]:
    """:func:`parse_cpuinfo` of this machine plus torch's own CPU capability (``AVX2``, ``AVX512``, ...)."""
    try:
        info = parse_cpuinfo(Path(cpuinfo).read_text(), flags)
    except OSError:  # not Linux: no flags to show, the capability below still tells the kernel set
        info = parse_cpuinfo("", flags)
    info["cpu"] = info["cpu"] or platform.processor() or platform.machine()
    try:
        info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # an old or unusual build; the figure is informative only
        info["torch_cpu_capability"] = None
    return info


@functools.lru_cache(maxsize=1)
def _machine_flags() -> Tuple[Tuple[str, bool], ...]:
    return tuple(machine_isa()["flags"].items())


def cpu_flags() -> Dict[str, bool]:
    """This machine's :data:`CPU_FLAGS` (read once per process)."""
    return dict(_machine_flags())


def precision_support(precision: str, flags: Optional[Mapping[str, bool]] = None) -> Tuple[bool, str]:
    """Whether this CPU (or ``flags``) accelerates ``precision``, and a phrase saying why.

    Args:
        precision: ``"fp32"``, ``"bf16"`` or ``"int8"``.
        flags: ISA flags (default: :func:`cpu_flags`).

    Returns:
        ``(accelerated, why)``, e.g. ``(True, "avx512_bf16")`` or
        ``(False, "no amx_int8 / avx512_vnni / avx_vnni")``. fp32 is always ``True``.

    Raises:
        ValueError: an unknown precision.
    """
    if precision == "fp32":
        return True, "fp32 runs everywhere"
    if precision not in PRECISION_ISA:
        raise ValueError(f"unknown precision {precision!r}; choose from ['fp32', {', '.join(map(repr, PRECISION_ISA))}]")
    have = cpu_flags() if flags is None else flags
    for flag in PRECISION_ISA[precision]:
        if have.get(flag):
            return True, flag
    return False, "no " + " / ".join(PRECISION_ISA[precision])


def accelerated_precisions(flags: Optional[Mapping[str, bool]] = None) -> Dict[str, str]:
    """``{precision: the flag that accelerates it}`` for each precision this CPU speeds up (fp32 always)."""
    out = {"fp32": "fp32 runs everywhere"}
    for precision in PRECISION_ISA:
        ok, why = precision_support(precision, flags)
        if ok:
            out[precision] = why
    return out


# int8 weight/activation schemes of an exported file -> what they are (see the module docstring)
INT8_SCHEMES: Dict[str, str] = {
    "u8s8": "uint8 activations x int8 weights (8-bit, VNNI/AMX: exact int32 accumulation)",
    "u8s7": "uint8 activations x int8 weights reduced to 7 bits (|w| <= 63: no int16 saturation without VNNI)",
}


def int8_scheme(flags: Optional[Mapping[str, bool]] = None) -> Tuple[str, str]:
    """The int8 scheme to quantize for on this CPU (or ``flags``), and why.

    Returns:
        ``("u8s8", why)`` where int8 multiplies natively (AMX-INT8 / AVX-512 VNNI / AVX-VNNI),
        else ``("u8s7", why)``: 7-bit weights, saturation-safe on ``vpmaddubsw``.
    """
    ok, why = precision_support("int8", flags)
    if ok:
        return "u8s8", f"{why}: u8 x s8 products accumulate in int32 without saturation"
    return "u8s7", f"{why}: u8 x s8 pairs add into a saturating int16, so weights are reduced to 7 bits"


def int8_scheme_runs_here(scheme: str, flags: Optional[Mapping[str, bool]] = None) -> Tuple[bool, str]:
    """Whether an int8 file of ``scheme`` runs without saturation on this CPU (or ``flags``), and why.

    ``"u8s7"`` and LiteRT's ``"s8s8"`` run everywhere; ``"u8s8"`` needs VNNI/AMX. An unknown scheme (a file from before
    schemes were recorded was built as ``"u8s8"``) is treated as ``"u8s8"``.
    """
    if scheme == "u8s7":
        return True, "7-bit weights cannot saturate"
    if scheme == "s8s8":  # LiteRT (XNNPACK) widens s8 x s8 products to int32 on every x86 ISA
        return True, "LiteRT's s8 x s8 kernels accumulate in int32 on any CPU"
    ok, why = precision_support("int8", flags)
    if ok:
        return True, why
    return False, (f"its 8-bit weights saturate without VNNI ({why}); export it again on this machine "
                   "(or anywhere with --int8-scheme u8s7)")

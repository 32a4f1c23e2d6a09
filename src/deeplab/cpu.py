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

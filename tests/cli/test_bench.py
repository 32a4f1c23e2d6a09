"""``deeplab bench`` code path on a tiny input: report structure, table, JSON, limits per precision,
ISA flags; and the developer profile script in benchmarks/. No timing assertions."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Dict

import pytest

from deeplab.cli import bench as bench_cli
from deeplab.deploy import bench
from deeplab.deploy import limits as gemm_limits

REPO = Path(__file__).resolve().parents[2]

AVX2_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2

processor\t: 1
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse tsc msr pae mce cx8 apic sep mtrr sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2
"""

AMX_CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse sse2 avx fma avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_bf16 avx512_vnni \
avx512_fp16 amx_bf16 amx_tile amx_int8
"""


def test_bench_smoke_small_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = bench_cli.main([
        "--backbones", "mobilenet_v2", "--size", "65", "--repeat", "2", "--warmup", "1",
        "--paths", "eager", "eager_opt", "onnxruntime", "openvino", "--gemm-size", "256",
        "--json", str(out),
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model | GMACs | path |" in printed and "Machine limits measured in this run" in printed
    assert "% of fp32 GEMM (median / min)" in printed  # every path today is fp32
    report = json.loads(out.read_text())
    assert report["config"]["size"] == 65 and report["machine"]["threads"] >= 1
    rows = {r["path"]: r for r in report["results"]}
    assert set(rows) == {"eager", "eager_opt", "onnxruntime", "openvino"}
    for path in ("eager", "eager_opt", "onnxruntime"):
        r = rows[path]
        assert len(r["times_s"]) == 2 and r["min_s"] <= r["median_s"]
        assert r["gflops"] == pytest.approx(2 * r["gmacs"] / r["median_s"], rel=1e-6)
        assert r["gmacs"] > 0
        assert r["precision"] == "fp32"
        assert r["fraction_of_limit"] == pytest.approx(r["gflops"] / report["limits"]["fp32"]["peak"], rel=1e-9)
    # openvino is an optional extra: either timed or reported with the reason
    assert "times_s" in rows["openvino"] or "openvino" in rows["openvino"]["error"].lower()
    assert report["limits"]["fp32"]["samples"] and report["limits"]["fp32"]["peak"] > 0
    assert set(report["limits"]) == {"fp32", "bf16", "int8"}
    isa = report["machine"]["isa"]
    assert set(isa["flags"]) == set(gemm_limits.ISA_FLAGS) and "torch_cpu_capability" in isa
    assert report["machine"]["cpu"]


def test_bench_maps_no_executable_memory() -> None:
    source = Path(bench.__file__).read_text() + Path(gemm_limits.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"mmap", "ctypes"}, imported
    assert "PROT_EXEC" not in source and "CFUNCTYPE" not in source
    assert not (REPO / "benchmarks" / "fma_loop.s").exists()


def test_limits_per_precision_positive_or_say_why() -> None:
    limits = gemm_limits.Limits(threads=1, gemm_size=64)
    limits.sample()
    limits.sample()
    table = limits.as_dict()
    assert set(table) == {"fp32", "bf16", "int8"}
    assert table["fp32"]["peak"] > 0 and table["fp32"]["reason"] is None  # torch.mm fp32 runs everywhere
    for precision, entry in table.items():
        if entry["peak"] is None:
            assert isinstance(entry["reason"], str) and entry["reason"], precision
        else:
            assert entry["peak"] > 0 and entry["reason"] is None, precision
            assert entry["peak"] == max(entry["samples"]) and len(entry["samples"]) == 2
        assert entry["size"] == 64 and entry["threads"] == 1 and entry["unit"] in ("GFLOP/s", "GOP/s")


def test_int8_limit_is_an_int_mm() -> None:
    # torch._int_mm on the CPU: int8 x int8 -> int32, exact
    spec = gemm_limits.GEMMS["int8"]
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = spec.make(32, g), spec.make(32, g)
    assert a.dtype == torch.int8
    out = spec.mm(a, b)
    assert out.dtype == torch.int32 and torch.equal(out, a.int() @ b.int())


def test_no_path_is_ever_above_its_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A limit a path exceeds is not a limit: with a GEMM made slow on purpose every path beats it,
    # and the report says "underestimated" instead of a figure above 100 %.
    slow = {"fp32": {"a GEMM 1000x too slow": lambda n, repeat: 1e-3 * gemm_limits.gemm_throughput("fp32", n, 1)}}
    report = bench.run_bench(backbones=["mobilenet_v2"], size=65, paths=["eager", "onnxruntime"], warmup=1, repeat=2,
                             gemm_size=64, gemms=slow, log=lambda s: None)
    limit = report["limits"]["fp32"]
    assert limit["op"] == "a GEMM 1000x too slow" and limit["underestimated"] and limit["underestimated_by"] > 1
    timed = [r for r in report["results"] if "gflops" in r]
    assert timed
    for r in timed:
        assert r["fraction_of_limit"] is None and r["limit_underestimated"] > 1
    json.dumps(report)
    table = bench.markdown_table(report)
    assert "limit underestimated" in table and "underestimated: a path ran at" in table
    assert not any(cell.strip().endswith("%") and float(cell.strip().split("%")[0]) > 100
                   for line in table.splitlines() for cell in line.split("|")[-2:-1] if "/" in cell)


def test_the_limit_is_the_best_gemm_and_names_it() -> None:
    gemms = {"fp32": {"slow": lambda n, repeat: 10.0, "fast": lambda n, repeat: 30.0,
                      "broken": lambda n, repeat: (_ for _ in ()).throw(RuntimeError("not installed"))}}
    limits = gemm_limits.Limits(threads=1, gemm_size=64, precisions=("fp32",), gemms=gemms)
    limits.sample()
    entry = limits.as_dict()["fp32"]
    assert entry["peak"] == 30.0 and entry["op"] == "fast" and entry["gemms"] == {"slow": 10.0, "fast": 30.0}
    assert "not installed" in entry["gemm_errors"]["broken"]
    # the default candidates: MKL, oneDNN, ONNX Runtime, OpenVINO and numpy for fp32
    assert len(gemm_limits.LIMIT_GEMMS["fp32"]) == 5 and any("oneDNN" in k for k in gemm_limits.LIMIT_GEMMS["fp32"])


def test_limits_say_why_for_unsupported_or_emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    real = gemm_limits.gemm_throughput

    def fake(precision: str, n: int = 4096, repeat: int = 3) -> float:
        if precision == "bf16":
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'BFloat16'\nmore text")
        if precision == "int8":
            return 0.01 * real("fp32", n, repeat)  # emulated: far below fp32
        return real(precision, n, repeat)

    monkeypatch.setattr(gemm_limits, "gemm_throughput", fake)
    limits = gemm_limits.Limits(threads=1, gemm_size=64)
    limits.sample()
    table = limits.as_dict()
    assert table["fp32"]["peak"] > 0
    assert table["bf16"]["peak"] is None and "not implemented for 'BFloat16'" in table["bf16"]["reason"]
    assert "more text" not in table["bf16"]["reason"]  # one line
    assert table["int8"]["peak"] is None and "no native int8 GEMM" in table["int8"]["reason"]
    assert table["bf16"]["samples"] == [] and table["int8"]["samples"] == []


def test_parse_cpuinfo_avx2_only() -> None:
    info = gemm_limits.parse_cpuinfo(AVX2_CPUINFO)
    assert info["cpu"] == "AMD EPYC 7B12"
    assert info["flags"] == {"avx2": True, "avx512f": False, "avx512_bf16": False, "avx512_vnni": False,
                             "amx_bf16": False, "amx_int8": False}


def test_parse_cpuinfo_avx512_amx() -> None:
    info = gemm_limits.parse_cpuinfo(AMX_CPUINFO)
    assert info["cpu"] == "Intel(R) Xeon(R) Platinum 8480+"
    assert all(info["flags"].values()) and set(info["flags"]) == set(gemm_limits.ISA_FLAGS)


def test_parse_cpuinfo_without_flags() -> None:
    info = gemm_limits.parse_cpuinfo("")
    assert info["cpu"] is None and not any(info["flags"].values())


def test_machine_isa_reads_a_cpuinfo_file(tmp_path: Path) -> None:
    path = tmp_path / "cpuinfo"
    path.write_text(AVX2_CPUINFO)
    info = gemm_limits.machine_isa(str(path))
    assert info["cpu"] == "AMD EPYC 7B12" and info["flags"]["avx2"] and not info["flags"]["avx512f"]
    assert gemm_limits.machine_isa(str(tmp_path / "missing"))["cpu"]  # falls back to platform's name


def _limits(fp32: float, bf16: Any, int8: Any) -> Dict[str, Dict[str, Any]]:
    def entry(peak: Any) -> Dict[str, Any]:
        return {"peak": peak, "samples": [peak] if peak else [], "unit": "GFLOP/s", "op": "mm", "size": 256,
                "threads": 2, "reason": None if peak else "no AVX2"}

    return {"fp32": entry(fp32), "bf16": entry(bf16), "int8": entry(int8)}


def test_percent_is_against_the_paths_own_precision(monkeypatch: pytest.MonkeyPatch) -> None:
    # issue 12 adds bf16/int8 paths: a path declares its precision, its figure divides by that limit
    monkeypatch.setitem(bench.PATH_SPECS, "eager_bf16", bench.PathSpec("eager bf16", "bf16"))
    monkeypatch.setitem(bench.PATH_SPECS, "ort_int8", bench.PathSpec("ONNX Runtime int8", "int8"))
    limits = _limits(100.0, 400.0, 800.0)
    rows = [
        {"model": "m", "path": "eager", "gmacs": 1.0, "min_s": 0.1, "median_s": 0.2, "gflops": 50.0, "gflops_min": 80.0},
        {"model": "m", "path": "eager_bf16", "gmacs": 1.0, "min_s": 0.1, "median_s": 0.2, "gflops": 200.0,
         "gflops_min": 300.0},
        {"model": "m", "path": "ort_int8", "gmacs": 1.0, "min_s": 0.1, "median_s": 0.2, "gflops": 200.0,
         "gflops_min": 400.0, "precision": "int8"},
    ]
    assert [bench.path_precision(r) for r in rows] == ["fp32", "bf16", "int8"]
    assert bench.fraction_of_limit(rows[0], limits) == pytest.approx(0.5)
    assert bench.fraction_of_limit(rows[1], limits) == pytest.approx(0.5)
    assert bench.fraction_of_limit(rows[2], limits) == pytest.approx(0.25)
    assert bench.fraction_of_limit(rows[2], limits, "gflops_min") == pytest.approx(0.5)
    table = bench.markdown_table({"limits": limits, "machine": {"threads": 2, "cpu": "x"}, "results": rows})
    assert "% of own-precision GEMM (median / min)" in table
    assert "| eager fp32 | 0.100 | 0.200 | 50 | 50% / 80% |" in table
    assert "| eager bf16 | 0.100 | 0.200 | 200 | 50% / 75% |" in table
    assert "| ONNX Runtime int8 | 0.100 | 0.200 | 200 | 25% / 50% |" in table
    # a precision without a limit gives n/a, never a fraction of another precision's limit
    assert bench.fraction_of_limit(rows[1], _limits(100.0, None, 800.0)) is None


def test_markdown_table_handles_failed_paths() -> None:
    report = {
        "limits": _limits(100.0, None, None),
        "machine": {"threads": 2, "cpu": "AMD EPYC", "isa": {"flags": dict.fromkeys(gemm_limits.ISA_FLAGS, False) | {"avx2": True},
                                                             "torch_cpu_capability": "AVX2"}},
        "results": [
            {"model": "m", "path": "eager", "gmacs": 1.0, "min_s": 0.1, "median_s": 0.2, "gflops": 10.0, "gflops_min": 20.0},
            {"model": "m", "path": "compile", "gmacs": 1.0, "error": "RuntimeError: no compiler"},
        ],
    }
    table = bench.markdown_table(report)
    assert "n/a (no AVX2)" in table and "RuntimeError: no compiler" in table and "| 0.100 | 0.200 | 10 |" in table
    assert "% of fp32 GEMM (median / min)" in table and "| 10% / 20% |" in table
    assert "fp32 GEMM 100 GFLOP/s" in table and "bf16 GEMM n/a (no AVX2)" in table
    assert "torch CPU capability AVX2" in table and "ISA avx2 (no avx512f" in table


def _load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_ops_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the per-op profile moved from `deeplab bench --profile` to benchmarks/profile_ops.py
    script = _load_script("profile_ops")
    out = tmp_path / "profile.json"
    report = script.main(["--backbone", "mobilenet_v2", "--size", "65", "--paths", "eager", "eager_opt", "--rows", "4",
                          "--convs", "--conv-repeat", "1", "--gemm-size", "64", "--json", str(out)])
    assert set(report["profiles"]) == {"mobilenet_v2/eager", "mobilenet_v2/eager_opt"}
    assert "Self CPU" in report["profiles"]["mobilenet_v2/eager"]
    assert report["convs"] and all(r["mult_adds"] > 0 and r["gflops"] > 0 for r in report["convs"])
    assert report["gemm_gflops"] > 0
    # every conv of the optimised model is seen once: their Mult-Adds are the model's (deeplab info's count)
    from deeplab.cli.info import count

    total = count(arch="deeplabv3plus", backbone="mobilenet_v2", output_stride=16, separable=True, size=65)
    assert sum(r["mult_adds"] for r in report["convs"]) == total["mult_adds"]
    assert "| conv kind | convs | GMACs |" in capsys.readouterr().out
    assert "mobilenet_v2/eager" in json.loads(out.read_text())["profiles"]

"""``deeplab bench`` code path on a tiny input: report structure, table, JSON. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deeplab.cli import bench


def test_bench_smoke_small_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bench.json"
    code = bench.main([
        "--backbones", "mobilenet_v2", "--size", "65", "--repeat", "2", "--warmup", "1",
        "--paths", "eager", "eager_opt", "onnxruntime", "openvino", "--gemm-size", "256",
        "--json", str(out), "--profile",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "| model | GMACs | path |" in printed and "Machine limits measured in this run" in printed
    report = json.loads(out.read_text())
    assert report["config"]["size"] == 65 and report["machine"]["threads"] >= 1
    rows = {r["path"]: r for r in report["results"]}
    assert set(rows) == {"eager", "eager_opt", "onnxruntime", "openvino"}
    for path in ("eager", "eager_opt", "onnxruntime"):
        r = rows[path]
        assert len(r["times_s"]) == 2 and r["min_s"] <= r["median_s"]
        assert r["gflops"] == pytest.approx(2 * r["gmacs"] / r["median_s"], rel=1e-6)
        assert r["gmacs"] > 0
    # openvino is an optional extra: either timed or reported with the reason
    assert "times_s" in rows["openvino"] or "openvino" in rows["openvino"]["error"].lower()
    assert report["limits"]["gemm_samples_gflops"] and report["limits"]["gemm_peak_gflops"] > 0
    assert "mobilenet_v2/eager" in report["profiles"]


def test_fma_kernel_runs_or_says_why() -> None:
    kernel = bench.FmaKernel()
    if kernel.fn is None:
        assert kernel.reason
        assert kernel.gflops(1) is None
    else:
        assert kernel.gflops(1, seconds=0.02) > 0.5  # any real CPU does far more


def test_markdown_table_handles_failed_paths() -> None:
    report = {
        "limits": {"fma_peak_gflops": None, "fma_note": "no AVX2", "fma_samples_gflops": [],
                   "gemm_peak_gflops": 100.0, "gemm_samples_gflops": [100.0], "gemm_size": 256},
        "machine": {"threads": 2},
        "results": [
            {"model": "m", "path": "eager", "gmacs": 1.0, "min_s": 0.1, "median_s": 0.2, "gflops": 10.0, "gflops_min": 20.0},
            {"model": "m", "path": "compile", "gmacs": 1.0, "error": "RuntimeError: no compiler"},
        ],
    }
    table = bench.markdown_table(report)
    assert "n/a (no AVX2)" in table and "RuntimeError: no compiler" in table and "| 0.100 | 0.200 | 10 |" in table

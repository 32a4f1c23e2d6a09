"""Compare evaluation reports: mIoU, pixel accuracy, trimap, boundary F and per-class IoU, with deltas.

The first report is the baseline; every other run's numbers are shown with their difference to
it (in points, i.e. percent). Reports are the ``report.json`` files ``deeplab eval`` (and
``deeplab demo``) write; a trimap measured with ``--trimap`` is read from the report's
``trimap`` section, or from a ``trimap.json`` next to it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from deeplab._utils import DeeplabError
from deeplab.viz import plot_compare

__all__ = ["compare_reports", "format_comparison", "load_report", "report_label", "write_comparison"]

PathLike = Union[str, Path]

# (key in the comparison, title, where it sits in report.json)
SCALARS = (("mIoU", "mIoU"), ("pixel_accuracy", "pixel acc"), ("mean_class_accuracy", "mean acc"))


def load_report(path: PathLike) -> Dict[str, Any]:
    """Read a ``report.json`` (or the one inside a folder), with its trimap if measured.

    Returns:
        The report dict, with ``"path"`` added and ``"trimap"`` filled from a sibling
        ``trimap.json`` when the report itself has none.

    Raises:
        DeeplabError: missing file, not JSON, or not a deeplab evaluation report.
    """
    file = Path(path)
    if file.is_dir():
        file = file / "report.json"
    if not file.is_file():
        raise DeeplabError(f"{file}: no such report; pass the report.json that `deeplab eval` wrote (or its folder)")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeeplabError(f"{file} is not a readable JSON report: {exc}") from exc
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict) or "per_class" not in report["metrics"]:
        raise DeeplabError(f"{file} is not a deeplab evaluation report (no metrics.per_class); "
                           "pass a report.json written by `deeplab eval` or `deeplab demo`")
    if "trimap" not in report and (file.parent / "trimap.json").is_file():
        try:
            report["trimap"] = json.loads((file.parent / "trimap.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DeeplabError(f"{file.parent / 'trimap.json'} is not readable JSON: {exc}") from exc
    report["path"] = str(file)
    return report


def report_label(report: Mapping[str, Any]) -> str:
    """A short name for a run: ``<arch> (<folder>)`` from its config, else the folder name."""
    config = report.get("config") or {}
    folder = Path(str(report.get("path", "report.json"))).parent.name or "."
    arch = config.get("arch")
    if arch is None and isinstance(config.get("what"), str) and "DeepLabv3+" in config["what"]:
        arch = "deeplabv3plus"  # deeplab demo's report names its model in words
    return f"{arch} ({folder})" if arch else folder


def _trimap_curve(report: Mapping[str, Any]) -> Optional[Dict[int, Optional[float]]]:
    trimap = report.get("trimap")
    if not isinstance(trimap, dict):
        return None
    return {int(row["width"]): row.get("mIoU") for row in trimap.get("widths", [])}


def _delta(value: Optional[float], base: Optional[float]) -> Optional[float]:
    if value is None or base is None:
        return None
    return value - base


def compare_reports(reports: Sequence[Mapping[str, Any]], labels: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Line up the numbers of several reports; the first is the baseline.

    Args:
        reports: from :func:`load_report`.
        labels: one per report (default :func:`report_label`; duplicates get ``#2``...).

    Returns:
        JSON-able ``{"labels", "reports", "scalars": {key: [value per run]}, "per_class":
        {class: [IoU per run]}, "per_class_delta": {class: [delta per later run]},
        "trimap": {"widths", "mIoU": {label: [...]}} or None, "boundary_f": [...] or None,
        "classes_only_in_some": [...]}``; values are fractions, ``None`` where not measured.

    Raises:
        DeeplabError: fewer than two reports, or a label count that does not match.
    """
    if len(reports) < 2:
        raise DeeplabError(f"compare needs at least two reports, got {len(reports)}")
    if labels is None:
        labels = [report_label(r) for r in reports]
    if len(labels) != len(reports):
        raise DeeplabError(f"{len(labels)} labels for {len(reports)} reports; give one --labels entry per report")
    unique: List[str] = []
    for label in labels:
        name, k = str(label), 2
        while name in unique:
            name, k = f"{label} #{k}", k + 1
        unique.append(name)

    scalars = {key: [r["metrics"].get(key) for r in reports] for key, _ in SCALARS}
    class_lists = [list(r["metrics"]["per_class"]) for r in reports]
    common = [c for c in class_lists[0] if all(c in names for names in class_lists[1:])]
    everywhere = set(common)
    only_some = sorted({c for names in class_lists for c in names} - everywhere)
    per_class = {c: [r["metrics"]["per_class"][c].get("iou") for r in reports] for c in common}
    # Classes no run has an IoU for (absent from every ground truth and prediction) say nothing.
    per_class = {c: v for c, v in per_class.items() if any(x is not None for x in v)}
    per_class_delta = {c: [_delta(x, v[0]) for x in v[1:]] for c, v in per_class.items()}

    curves = [_trimap_curve(r) for r in reports]
    trimap = None
    if any(c is not None for c in curves):
        widths = sorted({w for c in curves if c for w in c})
        trimap = {
            "widths": widths,
            "source": [(r.get("trimap") or {}).get("source") for r in reports],
            "mIoU": {lab: [c.get(w) if c else None for w in widths] for lab, c in zip(unique, curves)},
        }
    bf = [(r.get("boundary_f") or {}).get("mean") if isinstance(r.get("boundary_f"), dict) else None for r in reports]
    tolerances = [(r.get("boundary_f") or {}).get("tolerance_px") for r in reports]
    return {
        "labels": unique,
        "reports": [str(r.get("path", "")) for r in reports],
        "scalars": scalars,
        "per_class": per_class,
        "per_class_delta": per_class_delta,
        "trimap": trimap,
        "boundary_f": {"mean": bf, "tolerance_px": tolerances} if any(v is not None for v in bf) else None,
        "classes_only_in_some": only_some,
    }


def _pct(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _signed(value: Optional[float]) -> str:
    return "" if value is None else f"({100 * value:+.2f})"


def format_comparison(comparison: Mapping[str, Any]) -> str:
    """The comparison as a text table in percent; deltas to the first run in brackets."""
    labels: List[str] = list(comparison["labels"])
    cell = max(16, max(len(lab) for lab in labels) + 1)
    rows: List[List[str]] = []
    names: List[str] = []

    def add(name: str, values: Sequence[Optional[float]]) -> None:
        names.append(name)
        rows.append([_pct(values[0])] + [f"{_pct(v)} {_signed(_delta(v, values[0]))}".strip() for v in values[1:]])

    for key, title in SCALARS:
        add(title, comparison["scalars"][key])
    bf = comparison.get("boundary_f")
    if bf:
        tolerances = sorted({t for t in bf["tolerance_px"] if t is not None})
        # Scores at different tolerances are not comparable: say so in the row's name.
        add(f"boundary F @{'/'.join(map(str, tolerances))}px", bf["mean"])
    trimap = comparison.get("trimap")
    if trimap:
        for i, w in enumerate(trimap["widths"]):
            add(f"trimap {w}px", [trimap["mIoU"][lab][i] for lab in labels])
    first_class = len(names)
    for c, values in comparison["per_class"].items():
        add(f"IoU {c}", values)
    name_w = max(len(n) for n in names)
    header = f"{'':<{name_w}}  " + "  ".join(f"{lab:>{cell}}" for lab in labels)
    lines = [header, "-" * len(header)]
    for i, (name, row) in enumerate(zip(names, rows)):
        if i == first_class:
            lines.append("-" * len(header))
        lines.append(f"{name:<{name_w}}  " + "  ".join(f"{v:>{cell}}" for v in row))
    lines.append("values in %, (delta) vs " + labels[0])
    if comparison.get("classes_only_in_some"):
        lines.append("classes not in every report (left out): " + ", ".join(comparison["classes_only_in_some"]))
    return "\n".join(lines)


def write_comparison(comparison: Mapping[str, Any], out_dir: PathLike) -> Dict[str, Path]:
    """Write ``compare.json`` and ``compare.png`` (per-class delta bars; trimap curves) into ``out_dir``.

    Returns:
        ``{"json": path, "png": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "compare.json"
    json_path.write_text(json.dumps(comparison, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    labels = list(comparison["labels"])
    classes = list(comparison["per_class_delta"])
    deltas = [[comparison["per_class_delta"][c][k] for c in classes] for k in range(len(labels) - 1)]
    trimap = comparison.get("trimap")
    curves = ({lab: (trimap["widths"], trimap["mIoU"][lab]) for lab in labels} if trimap else None)
    png = plot_compare(labels, classes, deltas, out / "compare.png", trimap=curves)
    return {"json": json_path, "png": png}

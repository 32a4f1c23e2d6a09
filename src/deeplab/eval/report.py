"""The evaluation report: ``report.json`` and the confusion-matrix PNG (drawn by :mod:`deeplab.viz`).

The meters (:mod:`deeplab.eval.metrics`) compute numbers only; this module writes them.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

from deeplab._utils import atomic_write, jsonable
from deeplab.eval.confusion import ConfusionMatrix
from deeplab.viz import render_confusion

__all__ = ["save_confusion_png", "write_report"]


def save_confusion_png(cm: ConfusionMatrix, path: Union[str, Path], class_names: Optional[Sequence[str]] = None) -> Path:
    """Render the row-normalised confusion matrix as a heatmap PNG (PIL only).

    Rows are ground truth, columns predictions, colour = share of the row's pixels
    (0 dark blue .. 1 yellow, viridis-like) with a colour bar. Class names label the
    axes when there are at most 40 classes; cells are annotated with percentages when
    they are large enough to read. Rows of classes absent from the ground truth are
    drawn grey.

    Args:
        cm: the confusion matrix.
        path: output file; parent directories are created.
        class_names: ``C`` names for the axes (default ``class_i``).

    Returns:
        The written path.
    """
    image, _ = render_confusion(cm.normalized(), cm.names_for(class_names), cm.matrix)
    path = Path(path)
    with atomic_write(path) as handle:
        image.save(handle, format="PNG")
    return path


def write_report(
    cm: ConfusionMatrix,
    class_names: Optional[Sequence[str]],
    out_dir: Union[str, Path],
    extra: Optional[Dict[str, Any]] = None,
    sections: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``report.json`` and ``confusion.png`` into ``out_dir``; call on rank 0.

    ``report.json`` holds ``{"config": extra, "metrics": cm.summary(class_names),
    "class_names": [...], "confusion_matrix": [[int]] (rows = ground truth),
    "created": ISO time}``; the raw matrix lets any metric be recomputed later. The JSON
    is written to a temporary file and renamed, so an existing report is never left
    half-written.

    Args:
        cm: the evaluated confusion matrix.
        class_names: ``C`` names, or ``None`` for ``class_0 ..``.
        out_dir: directory (created if missing).
        extra: what produced the numbers (checkpoint, inference options, dataset...);
            dataclasses, paths and tuples are converted to JSON.
        sections: further top-level entries (e.g. :meth:`EvalResult.sections`: ``trimap``,
            ``boundary_f``, ``per_image``), written after ``confusion_matrix``.

    Returns:
        Path of ``report.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = cm.summary(class_names)
    report = {
        "config": jsonable(extra or {}),
        "metrics": summary,
        "class_names": list(summary["per_class"]),
        "confusion_matrix": cm.matrix.cpu().tolist(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in (sections or {}).items():
        if key in report:
            raise ValueError(f"report section {key!r} would overwrite a standard report.json key")
        report[key] = jsonable(value)
    path = out / "report.json"
    with atomic_write(path, "w", encoding="utf-8") as fh:
        json.dump(report, fh, indent=2, allow_nan=False)
        fh.write("\n")
    save_confusion_png(cm, out / "confusion.png", class_names)
    return path

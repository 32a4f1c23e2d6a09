"""The model card: the ``README.md`` of a saved model, rendered from its ``config.json`` dict.

The Hub's YAML header (library, tags, dataset, a ``model-index`` entry for the mIoU) and the
Markdown: architecture, evaluation figures with their setting, training data and recipe, how to
load it, limitations and the citation.
"""

from __future__ import annotations

import json
from typing import Any, List, Mapping, Optional

from ..config import ModelConfig
from .format import WEIGHTS_NAME

__all__ = ["CITATION", "TF_REFERENCE", "TF_ZOO_PAGE", "model_card"]

CITATION = """@inproceedings{deeplabv3plus2018,
  title     = {Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation},
  author    = {Liang-Chieh Chen and Yukun Zhu and George Papandreou and Florian Schroff and Hartwig Adam},
  booktitle = {ECCV},
  year      = {2018}
}"""
TF_REFERENCE = "https://github.com/tensorflow/models/tree/master/research/deeplab"
TF_ZOO_PAGE = "https://github.com/tensorflow/models/blob/master/research/deeplab/g3doc/model_zoo.md"


def _percent(value: Any) -> Optional[float]:
    """A metric as a percentage: fractions (training's ``mIoU`` 0.71) and percents (the zoo's 82.2) alike."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        return None
    return float(value) * 100.0 if abs(value) <= 1.0 else float(value)


def _yaml_str(text: str) -> str:
    return json.dumps(str(text))  # a JSON string is a valid YAML scalar


def _setting_text(evaluation: Mapping[str, Any]) -> str:
    parts = []
    if evaluation.get("output_stride"):
        parts.append(f"output stride {evaluation['output_stride']}")
    scales = evaluation.get("scales")
    if scales:
        parts.append("scale 1.0" if list(scales) == [1.0] else "scales " + ", ".join(f"{s:g}" for s in scales))
    if evaluation.get("flip"):
        parts.append("+ left-right flip")
    if evaluation.get("mode"):
        parts.append(f"{evaluation['mode']} image")
    return ", ".join(parts) or "not recorded"


_HOW_TO_LOAD = [
    "## How to load", "", "```python", "import deeplab", "",
    'model = deeplab.from_pretrained("REPO_ID")          # nn.Module, eval mode',
    'seg = deeplab.Segmenter.from_pretrained("hf://REPO_ID")', 'mask = seg.predict("photo.jpg")  # (H, W) class ids',
    "```", "", "```bash", "pip install \"deeplab[hub]\"",
    "deeplab predict photo.jpg --model hf://REPO_ID --out masks/", "```", "",
    "`REPO_ID@revision` pins a branch, tag or commit; `HF_HUB_OFFLINE=1` loads from the local cache only.", "",
]
_RECIPE_KEYS = ("max_steps", "batch_size", "crop_size", "lr", "poly_power", "momentum", "weight_decay", "loss",
                "scale_range", "hflip", "amp", "sync_bn", "seed")


def model_card(config: Mapping[str, Any]) -> str:
    """The ``README.md`` of a saved model, from its ``config.json`` dict (Hub YAML header + Markdown)."""
    mc = ModelConfig.from_dict(dict(config["model_config"]))
    dataset = dict(config.get("dataset") or {})
    metrics = dict(config.get("metrics") or {})
    evaluation = dict(config.get("evaluation") or {})
    zoo = dict(dict(config.get("source") or {}).get("zoo") or {})
    title = str(config.get("name") or f"{mc.arch} {mc.backbone}")
    lines = _yaml_header(mc, title, str(dataset.get("dataset") or ""), metrics, evaluation)
    lines += ["", f"# {title}", ""]
    lines += _model_section(config, mc)
    lines += _evaluation_section(metrics, evaluation)
    lines += _training_section(config, mc, dataset)
    lines += _HOW_TO_LOAD
    lines += _limitations(mc, zoo)
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def _yaml_header(mc: ModelConfig, title: str, dataset_name: str, metrics: Mapping[str, Any],
                 evaluation: Mapping[str, Any]) -> List[str]:
    """The Hub's YAML front matter: library, tags, dataset and a ``model-index`` entry for the mIoU."""
    lines = ["---", "library_name: deeplab", "pipeline_tag: image-segmentation", "tags:",
             "- image-segmentation", "- semantic-segmentation", f"- {mc.arch}", f"- {mc.backbone}"]
    if dataset_name:
        lines += ["datasets:", f"- {dataset_name}"]
    miou = _percent(metrics.get("mIoU", metrics.get("miou")))
    if miou is not None:
        lines += ["model-index:", f"- name: {_yaml_str(title)}", "  results:", "  - task:",
                  "      type: image-segmentation", "    dataset:", f"      name: {_yaml_str(dataset_name or 'custom')}",
                  f"      type: {_yaml_str(dataset_name or 'custom')}", f"      split: {_yaml_str(evaluation.get('split', 'val'))}",
                  "    metrics:", "    - type: mean_iou", f"      value: {miou:.2f}",
                  f"      name: {_yaml_str('mIoU (' + _setting_text(evaluation) + ')')}"]
    return lines + ["---"]


def _model_section(config: Mapping[str, Any], mc: ModelConfig) -> List[str]:
    """The one-line summary and the architecture table (backbone, stride, ASPP, input, weights)."""
    weights = dict(config.get("weights") or {})
    rates = "(derived from the output stride)" if mc.aspp_rates is None else (
        ", ".join(str(r) for r in mc.aspp_rates) or "none (1x1 + image pooling only)")
    lines = [f"DeepLab{'v3+' if mc.arch == 'deeplabv3plus' else 'v3'} semantic segmentation, "
             f"{mc.num_classes} classes, saved by [deeplab](https://pypi.org/project/deeplab/) {config.get('library_version', '')}.",
             ""]
    lines += ["## Model", "", "| | |", "|---|---|",
              f"| architecture | `{mc.arch}` ({'encoder + decoder' if mc.arch == 'deeplabv3plus' else 'encoder only'}) |",
              f"| backbone | `{mc.backbone}` |",
              f"| output stride | {mc.output_stride} (can be changed at load: `output_stride=8`) |",
              f"| ASPP rates | {rates}; image pooling {'on' if mc.image_pooling else 'off'}; "
              f"{'separable' if mc.separable else 'regular'} 3x3 convs |",
              f"| input | {mc.in_channels} channels, mean {config['normalization']['mean']}, "
              f"std {config['normalization']['std']} (pixels in [0, 1]) |",
              f"| parameters | {weights.get('parameters', 0) / 1e6:.2f} M |",
              f"| weights | `{WEIGHTS_NAME}` ({', '.join(weights.get('dtype', []))}), sha256 `{weights.get('sha256', '')}` |",
              f"| TF-compatible ops | {'yes (converted from TensorFlow)' if mc.tf_compat else 'no'} |", ""]
    return lines


def _evaluation_section(metrics: Mapping[str, Any], evaluation: Mapping[str, Any]) -> List[str]:
    """A row per numeric figure with its split, setting and who measured it; or a line saying there is none."""
    figures = [(k, _percent(v)) for k, v in metrics.items()]
    figures = [(k, v) for k, v in figures if v is not None]
    lines = ["## Evaluation", ""]
    if not figures:
        return lines + ["No evaluation figure was recorded with these weights; measure them with `deeplab eval`."]
    lines += ["| metric | value | split | setting | by |", "|---|---|---|---|---|"]
    for key, value in figures:
        lines.append(f"| {key} | {value:.2f} | {evaluation.get('split', 'not recorded')} | {_setting_text(evaluation)} | "
                     f"{evaluation.get('by', 'not recorded')} |")
    if evaluation.get("note"):
        lines += ["", str(evaluation["note"])]
    if evaluation.get("step") is not None:
        lines += ["", f"Measured at training step {evaluation['step']}."]
    return lines


def _training_section(config: Mapping[str, Any], mc: ModelConfig, dataset: Mapping[str, Any]) -> List[str]:
    """Where the weights came from (the TF zoo, a dataset, or unrecorded), the recipe and the class names."""
    source = dict(config.get("source") or {})
    zoo = dict(source.get("zoo") or {})
    training = dict(config.get("training") or {})
    dataset_name = str(dataset.get("dataset") or "")
    lines = ["", "## Training data and recipe", ""]
    if zoo:
        lines += [f"Converted from the TensorFlow DeepLab model zoo entry `{zoo.get('name')}` ([model_zoo.md]({TF_ZOO_PAGE})): "
                  f"trained by the authors on {zoo.get('trained_on', '?')} with the [TF reference]({TF_REFERENCE}). "
                  f"Tarball `{zoo.get('tarball', '?')}`"
                  + (f", sha256 `{source.get('converted_from', {}).get('sha256')}`." if source.get("converted_from", {}).get("sha256") else ".")]
    elif dataset_name:
        splits = ", ".join(f"{k} `{v}`" for k, v in dataset.items() if k.endswith("split"))
        lines.append(f"Trained on **{dataset_name}**" + (f" ({splits})." if splits else "."))
    else:
        lines.append("The training data were not recorded.")
    recipe = dict(training.get("recipe") or {})
    if recipe:
        lines += ["", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {recipe[k]} |" for k in _RECIPE_KEYS if k in recipe]
        if training.get("step") is not None:
            lines.append(f"| step reached | {training['step']} |")
    lines += ["", f"Classes ({mc.num_classes}): " + ", ".join(f"`{c}`" for c in config["classes"]), ""]
    return lines


def _limitations(mc: ModelConfig, zoo: Mapping[str, Any]) -> List[str]:
    """What the figures and the model do not cover; TF-compatible ops and test-server figures say so."""
    lines = ["## Limitations", "",
             f"- It predicts only these {mc.num_classes} classes; anything else is assigned to one of them.",
             "- Figures hold for the setting stated above; other scales, output strides or image sizes change them "
             "(multi-scale + flip at output stride 8 is slower and usually better).",
             "- Inputs must be RGB normalised as above; `Segmenter` does this itself."]
    if mc.tf_compat:
        lines.append("- Converted weights reproduce the TF reference's ops (align_corners resizes, TF SAME padding); "
                     "fine-tuning them in PyTorch keeps those ops.")
    if zoo.get("miou_split") == "test":
        lines.append("- The figure is the VOC test server's; a val run is not comparable.")
    return lines

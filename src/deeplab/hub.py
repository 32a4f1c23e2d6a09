"""Models on the Hugging Face Hub: ``save_pretrained`` / ``push_to_hub`` / ``from_pretrained``.

>>> deeplab.hub.save_pretrained(model, "my-model", classes=names, dataset="voc")   # doctest: +SKIP
>>> deeplab.hub.push_to_hub("my-model", "org/deeplab-voc")                         # doctest: +SKIP
>>> model = deeplab.from_pretrained("org/deeplab-voc@v1")                          # doctest: +SKIP
>>> seg = deeplab.Segmenter.from_pretrained("hf://org/deeplab-voc")                # doctest: +SKIP

A saved model is a folder of three files, the layout the Hub's libraries share:

- ``config.json``: ``{"format": "deeplab-hub", "version": 1, "model_config": ModelConfig,
  "classes", "palette", "normalization", "dataset", "metrics", "evaluation", "training",
  "source", "weights": {"file", "sha256", "size", "parameters"}}``;
- ``model.safetensors``: the state dict (no pickle: nothing runs when it is opened);
- ``README.md``: the model card (architecture, citation, training data and recipe, the eval
  figures with their setting, how to load it, limitations), with the Hub's YAML header.

Loading downloads ``config.json`` and ``model.safetensors`` through ``huggingface_hub`` into the
Hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE``), so a second load makes no transfer; ``@revision``
(a branch, tag or commit) pins what is fetched. ``HF_HUB_OFFLINE=1`` reads the cache only. The
weights are verified against the size and sha256 that ``config.json`` records before they are
read, and loaded strictly into the model rebuilt from the stored config. ``HF_ENDPOINT`` (read at
call time) points everything at another Hub, a mirror or a test server.

Needs the ``[hub]`` extra (``huggingface_hub`` and ``safetensors``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._utils import DeeplabError, atomic_write, jsonable, load_state_dict_strict, unwrap_model
from ._version import __version__
from .config import ModelConfig

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "HUB_FORMAT",
    "HUB_PREFIX",
    "WEIGHTS_NAME",
    "HubError",
    "HubModel",
    "PushResult",
    "checkpoint_for",
    "from_pretrained",
    "is_hub_id",
    "load_from_hub",
    "load_pretrained",
    "model_card",
    "parse_hub_id",
    "push_to_hub",
    "save_pretrained",
    "save_pretrained_from_checkpoint",
]

PathLike = Union[str, "os.PathLike[str]"]

HUB_PREFIX = "hf://"
HUB_FORMAT = "deeplab-hub"
HUB_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
INSTALL_HINT = 'pip install "deeplab[hub]"  (huggingface_hub and safetensors)'
# The Hub's rule for a repo id: namespace/name, letters, digits, "-", "_", "." (no "--", no "..").
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

CITATION = """@inproceedings{deeplabv3plus2018,
  title     = {Encoder-Decoder with Atrous Separable Convolution for Semantic Image Segmentation},
  author    = {Liang-Chieh Chen and Yukun Zhu and George Papandreou and Florian Schroff and Hartwig Adam},
  booktitle = {ECCV},
  year      = {2018}
}"""
TF_REFERENCE = "https://github.com/tensorflow/models/tree/master/research/deeplab"
TF_ZOO_PAGE = "https://github.com/tensorflow/models/blob/master/research/deeplab/g3doc/model_zoo.md"


class HubError(DeeplabError, ValueError):
    """A Hub model cannot be saved, pushed or loaded; the message names the repo or file and the fix."""


@dataclass
class HubModel:
    """What :func:`load_pretrained` returns: the model and everything ``config.json`` says of it.

    Attributes:
        model: the DeepLab model in eval mode (weights loaded strictly).
        config: the parsed ``config.json``.
        directory: the folder the files were read from (a snapshot in the Hub cache).
        repo_id, revision: where it came from (``None`` for a local folder); ``revision`` is the
            commit the files belong to when known.
    """

    model: nn.Module
    config: Dict[str, Any]
    directory: Path
    repo_id: Optional[str] = None
    revision: Optional[str] = None

    @property
    def classes(self) -> List[str]:
        return [str(c) for c in self.config["classes"]]

    @property
    def palette(self) -> Optional[List[List[int]]]:
        return self.config.get("palette")

    @property
    def normalization(self) -> Dict[str, List[float]]:
        return dict(self.config["normalization"])

    @property
    def source(self) -> str:
        if self.repo_id is None:
            return str(self.directory)
        return f"{HUB_PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class PushResult:
    """Where :func:`push_to_hub` put the model: the repo, the branch and the new commit."""

    repo_id: str
    revision: str
    commit: str
    url: str


# --------------------------------------------------------------------------- names


def is_hub_id(source: str) -> bool:
    """``hf://org/repo[@rev]`` always; ``org/repo[@rev]`` when no such local path exists."""
    text = str(source)
    if text.startswith(HUB_PREFIX):
        return True
    if os.path.exists(text):
        return False
    return _REPO_ID.match(text.split("@", 1)[0]) is not None


def parse_hub_id(source: str, revision: Optional[str] = None) -> Tuple[str, Optional[str]]:
    """``"hf://org/repo@v1"`` -> ``("org/repo", "v1")``; an explicit ``revision`` must agree.

    Raises:
        HubError: not ``org/repo``, or two different revisions asked for.
    """
    text = str(source)
    if text.startswith(HUB_PREFIX):
        text = text[len(HUB_PREFIX):]
    repo_id, _, pinned = text.partition("@")
    repo_id = repo_id.strip("/")
    if not _REPO_ID.match(repo_id) or "--" in repo_id or ".." in repo_id:
        raise HubError(f"{source!r} is not a Hub model id; write org/name (optionally @revision), "
                       "e.g. hf://org/deeplab-voc@v1")
    if pinned and revision and pinned != revision:
        raise HubError(f"{source!r} pins revision {pinned!r} but revision={revision!r} was passed; give one")
    return repo_id, (pinned or revision or None)


# --------------------------------------------------------------------------- optional packages


def _hf() -> Any:
    try:
        import huggingface_hub
    except ImportError as exc:
        raise HubError(f"the Hugging Face Hub needs huggingface_hub: {INSTALL_HINT}") from exc
    return huggingface_hub


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError as exc:
        raise HubError(f"model.safetensors files need safetensors: {INSTALL_HINT}") from exc
    return safetensors.torch


def _endpoint() -> Optional[str]:
    # huggingface_hub reads HF_ENDPOINT once, at import; read it per call so it can be set later.
    value = os.environ.get("HF_ENDPOINT")
    return value.rstrip("/") if value else None


def _cache_dir(cache_dir: Optional[PathLike]) -> Optional[str]:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


# --------------------------------------------------------------------------- writing


def _sha256_bytes_of(path: Path) -> Tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _write_atomically(path: Path, data: bytes) -> None:
    with atomic_write(path) as handle:
        handle.write(data)


def _model_config(model: nn.Module) -> ModelConfig:
    config = getattr(model, "config", None)
    if not isinstance(config, ModelConfig):
        raise HubError(f"{type(model).__name__} carries no ModelConfig (model.config); save a model built by "
                       "deeplab.build_model / load_model, whose config rebuilds it")
    return config


def _percent(value: Any) -> Optional[float]:
    """A metric as a percentage: fractions (training's ``mIoU`` 0.71) and percents (the zoo's 82.2) alike."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value:
        return None
    return float(value) * 100.0 if abs(value) <= 1.0 else float(value)


def save_pretrained(
    model: nn.Module,
    save_directory: PathLike,
    *,
    classes: Optional[Sequence[str]] = None,
    palette: Optional[Sequence[Sequence[int]]] = None,
    normalization: Optional[Mapping[str, Sequence[float]]] = None,
    dataset: Optional[Mapping[str, Any]] = None,
    metrics: Optional[Mapping[str, Any]] = None,
    evaluation: Optional[Mapping[str, Any]] = None,
    training: Optional[Mapping[str, Any]] = None,
    source: Optional[Mapping[str, Any]] = None,
    name: Optional[str] = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the model card ``README.md`` into a folder.

    Args:
        model: a DeepLab model (``model.config`` rebuilds it); DDP / ``torch.compile`` wrappers
            are unwrapped. Its weights are saved as they are (float32 stays float32).
        save_directory: the folder (created; the three files in it are replaced atomically).
        classes: one name per output channel (default ``class_0`` ...).
        palette: one RGB colour per class.
        normalization: ``{"mean", "std"}`` in [0, 1] pixel units (default: the model's own).
        dataset: what it was trained on: ``{"dataset": "voc", "train_split": ..., "val_split": ...}``.
        metrics: eval figures: ``{"mIoU": 0.71, "pixel_accuracy": ...}`` (fractions or percents).
        evaluation: the setting of those figures: ``{"split", "output_stride", "scales", "flip",
            "mode", "note"}``.
        training: the recipe (a :class:`deeplab.config.TrainConfig` dict) and the step reached.
        source: provenance, e.g. ``{"zoo": {...}, "converted_from": {...}}`` of a converted model.
        name: the title of the card (default: arch and backbone).

    Returns:
        The folder.
    """
    safetensors_torch = _safetensors_torch()
    bare = unwrap_model(model)
    config = _model_config(bare)
    state = {key: value.detach().cpu().contiguous() for key, value in bare.state_dict().items()}
    num_classes = config.num_classes
    names = [str(c) for c in classes] if classes is not None else [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise HubError(f"{len(names)} class names for a model with {num_classes} output channels; "
                       "pass one name per class")
    own: Any = bare.normalization  # a DeepLab model's Normalization (nn.Module attributes type as Tensor | Module)
    norm = normalization if normalization is not None else own.to_dict()
    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)

    # safetensors' header is canonical (sorted keys, fixed dtype names), so equal weights give equal bytes
    weights_bytes = safetensors_torch.save(state, metadata={"format": "pt", "library": "deeplab"})
    _write_atomically(directory / WEIGHTS_NAME, weights_bytes)
    parameters = sum(int(p.numel()) for p in bare.parameters())
    card_config: Dict[str, Any] = {
        "format": HUB_FORMAT,
        "version": HUB_VERSION,
        "library": "deeplab",
        "library_version": __version__,
        "name": name or f"{config.arch} {config.backbone}",
        "model_config": config.to_dict(),
        "classes": names,
        "palette": [[int(v) for v in c[:3]] for c in palette] if palette is not None else None,
        "normalization": {k: [float(v) for v in norm[k]] for k in ("mean", "std")},
        "dataset": jsonable(dict(dataset or {})),
        "metrics": jsonable(dict(metrics or {})),
        "evaluation": jsonable(dict(evaluation or {})),
        "training": jsonable(dict(training or {})),
        "source": jsonable(dict(source or {})),
        "weights": {
            "file": WEIGHTS_NAME,
            "sha256": hashlib.sha256(weights_bytes).hexdigest(),
            "size": len(weights_bytes),
            "parameters": parameters,
            "dtype": sorted({str(v.dtype).replace("torch.", "") for v in state.values()}),
        },
    }
    _write_atomically(directory / CONFIG_NAME, (json.dumps(card_config, indent=2) + "\n").encode())
    _write_atomically(directory / CARD_NAME, model_card(card_config).encode())
    return directory


def save_pretrained_from_checkpoint(checkpoint: PathLike, save_directory: PathLike, *,
                                    name: Optional[str] = None) -> Path:
    """:func:`save_pretrained` for a deeplab checkpoint (``best.pt``, or a converted zoo model).

    Classes, palette, normalisation, dataset, the best / last eval figures, the training recipe
    and (for a converted TF zoo model) its provenance and the zoo's own figure come from the
    checkpoint.
    """
    from .checkpoint import load_model

    model, ckpt = load_model(checkpoint, map_location="cpu")
    dataset = dict(ckpt.get("dataset") or {})
    zoo = dict(ckpt.get("zoo") or {})
    metrics: Dict[str, Any] = {}
    evaluation: Dict[str, Any] = {}
    config = _model_config(model)
    if zoo.get("miou") is not None:
        # the authors' figure for these weights, in the setting the zoo page states
        metrics = {"mIoU": float(zoo["miou"])}
        evaluation = {
            "split": zoo.get("miou_split", "val"), "output_stride": zoo.get("eval_output_stride"),
            "scales": zoo.get("eval_scales"), "flip": zoo.get("eval_flip"), "mode": "whole",
            "by": "the TF reference (model_zoo.md)", "note": zoo.get("note", ""),
        }
    else:
        last = dict(ckpt.get("metrics") or {})
        best = dict(ckpt.get("best") or {})
        metrics = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if best.get("value") is not None and best.get("metric"):
            metrics[str(best["metric"])] = float(best["value"])
        if metrics:
            evaluation = {
                "split": dataset.get("val_split", "val"), "output_stride": config.output_stride, "scales": [1.0],
                "flip": False, "mode": "whole", "by": "deeplab train (validation during training)",
                "step": best.get("step", ckpt.get("step")),
            }
    training: Dict[str, Any] = {}
    if ckpt.get("train_config"):
        training = {"recipe": dict(ckpt["train_config"]), "step": ckpt.get("step")}
    source: Dict[str, Any] = {"checkpoint": Path(checkpoint).name}
    if ckpt.get("converted_from"):
        source["converted_from"] = dict(ckpt["converted_from"])
    if zoo:
        source["zoo"] = zoo
    return save_pretrained(
        model, save_directory, classes=ckpt.get("classes"), palette=ckpt.get("palette"),
        normalization=ckpt.get("normalization"), dataset=dataset, metrics=metrics, evaluation=evaluation,
        training=training, source=source, name=name or (zoo.get("name") if zoo else None),
    )


# --------------------------------------------------------------------------- the model card


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


def model_card(config: Mapping[str, Any]) -> str:
    """The ``README.md`` of a saved model, from its ``config.json`` dict (Hub YAML header + Markdown)."""
    mc = ModelConfig.from_dict(dict(config["model_config"]))
    dataset = dict(config.get("dataset") or {})
    metrics = dict(config.get("metrics") or {})
    evaluation = dict(config.get("evaluation") or {})
    training = dict(config.get("training") or {})
    source = dict(config.get("source") or {})
    zoo = dict(source.get("zoo") or {})
    weights = dict(config.get("weights") or {})
    dataset_name = str(dataset.get("dataset") or "")
    title = str(config.get("name") or f"{mc.arch} {mc.backbone}")
    rates = "(derived from the output stride)" if mc.aspp_rates is None else (
        ", ".join(str(r) for r in mc.aspp_rates) or "none (1x1 + image pooling only)")
    figures = [(k, _percent(v)) for k, v in metrics.items()]
    figures = [(k, v) for k, v in figures if v is not None]

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
    lines += ["---", "", f"# {title}", ""]
    lines += [f"DeepLab{'v3+' if mc.arch == 'deeplabv3plus' else 'v3'} semantic segmentation, "
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
    lines += ["## Evaluation", ""]
    if figures:
        lines += ["| metric | value | split | setting | by |", "|---|---|---|---|---|"]
        for key, value in figures:
            lines.append(f"| {key} | {value:.2f} | {evaluation.get('split', 'not recorded')} | {_setting_text(evaluation)} | "
                         f"{evaluation.get('by', 'not recorded')} |")
        if evaluation.get("note"):
            lines += ["", str(evaluation["note"])]
        if evaluation.get("step") is not None:
            lines += ["", f"Measured at training step {evaluation['step']}."]
    else:
        lines.append("No evaluation figure was recorded with these weights; measure them with `deeplab eval`.")
    lines += ["", "## Training data and recipe", ""]
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
        keys = ("max_steps", "batch_size", "crop_size", "lr", "poly_power", "momentum", "weight_decay", "loss",
                "scale_range", "hflip", "amp", "sync_bn", "seed")
        lines += ["", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {recipe[k]} |" for k in keys if k in recipe]
        if training.get("step") is not None:
            lines.append(f"| step reached | {training['step']} |")
    lines += ["", f"Classes ({mc.num_classes}): " + ", ".join(f"`{c}`" for c in config["classes"]), ""]
    lines += ["## How to load", "", "```python", "import deeplab", "",
              'model = deeplab.from_pretrained("REPO_ID")          # nn.Module, eval mode',
              'seg = deeplab.Segmenter.from_pretrained("hf://REPO_ID")', 'mask = seg.predict("photo.jpg")  # (H, W) class ids',
              "```", "", "```bash", "pip install \"deeplab[hub]\"",
              "deeplab predict photo.jpg --model hf://REPO_ID --out masks/", "```", "",
              "`REPO_ID@revision` pins a branch, tag or commit; `HF_HUB_OFFLINE=1` loads from the local cache only.", ""]
    lines += ["## Limitations", "",
              f"- It predicts only these {mc.num_classes} classes; anything else is assigned to one of them.",
              "- Figures hold for the setting stated above; other scales, output strides or image sizes change them "
              "(multi-scale + flip at output stride 8 is slower and usually better).",
              "- Inputs must be RGB normalised as above; `Segmenter` does this itself."]
    if mc.tf_compat:
        lines.append("- Converted weights reproduce the TF reference's ops (align_corners resizes, TF SAME padding); "
                     "fine-tuning them in PyTorch keeps those ops.")
    if zoo.get("miou_split") == "test":
        lines.append("- The figure is the VOC test server's; a val run is not comparable.")
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- uploading


def push_to_hub(
    save_directory: PathLike,
    repo_id: str,
    *,
    token: Optional[str] = None,
    revision: Optional[str] = None,
    private: bool = False,
    commit_message: Optional[str] = None,
    create_repo: bool = True,
) -> PushResult:
    """Upload a folder written by :func:`save_pretrained` to the Hub repo ``repo_id``.

    The folder is checked first (its weights must match the size and sha256 that its
    ``config.json`` records), the repo is created when missing, and the three files go up in one
    commit (the weights through the Hub's large-file protocol).

    Args:
        save_directory: the folder.
        repo_id: ``org/name`` (an ``hf://`` prefix is accepted).
        token: a write token (default: ``HF_TOKEN`` / the one ``huggingface-cli login`` stored).
        revision: the branch to commit to (default ``main``).
        private: create the repo private.
        commit_message: default "Upload deeplab <arch> <backbone>".
        create_repo: create the repo if it does not exist.

    Raises:
        HubError: a folder that is not a saved model, or the Hub refusing (the message says why).
    """
    hf = _hf()
    directory = Path(save_directory)
    config = _read_folder_config(directory, what=str(directory))
    _verify_weights(directory / WEIGHTS_NAME, config, what=str(directory / WEIGHTS_NAME))
    repo, pinned = parse_hub_id(repo_id, revision)
    branch = pinned or "main"
    api = hf.HfApi(endpoint=_endpoint(), token=token)
    message = commit_message or f"Upload deeplab {config['model_config'].get('arch')} {config['model_config'].get('backbone')}"
    try:
        if create_repo:
            api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if branch != "main":
            api.create_branch(repo, branch=branch, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(directory), revision=branch, commit_message=message,
                                 allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME], repo_type="model")
    except hf.errors.HfHubHTTPError as exc:
        raise HubError(f"the Hub refused the upload to {repo}: {_first_line(exc)}; check the token "
                       "(HF_TOKEN or `huggingface-cli login`, with write access) and the repo name") from exc
    except (OSError, ValueError) as exc:
        raise HubError(f"cannot upload {directory} to {repo}: {_first_line(exc)}") from exc
    endpoint = (_endpoint() or hf.constants.ENDPOINT).rstrip("/")
    return PushResult(repo_id=repo, revision=branch, commit=str(info.oid), url=f"{endpoint}/{repo}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------- reading


def _read_folder_config(directory: Path, *, what: str) -> Dict[str, Any]:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise HubError(f"{what} has no {CONFIG_NAME}; it is not a model written by deeplab save_pretrained "
                       "(deeplab push --checkpoint best.pt writes one)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HubError(f"cannot read {path}: {_first_line(exc)}; download it again") from exc
    if not isinstance(config, dict) or config.get("format") != HUB_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise HubError(f"{path} is not a deeplab model config (format {found!r}, expected {HUB_FORMAT!r}); "
                       "this repo holds another library's model")
    if not isinstance(config.get("version"), int) or config["version"] > HUB_VERSION:
        raise HubError(f"{path} has version {config.get('version')!r}, newer than this deeplab reads "
                       f"(<= {HUB_VERSION}); upgrade deeplab")
    missing = [k for k in ("model_config", "classes", "normalization", "weights") if not config.get(k)]
    if missing:
        raise HubError(f"{path} lacks {missing}; save the model again with deeplab save_pretrained")
    return config


def _verify_weights(path: Path, config: Mapping[str, Any], *, what: str) -> None:
    """The weights file must be exactly the one ``config.json`` records (size, then sha256)."""
    if not path.is_file():
        raise HubError(f"{what} is missing; save or download the model again")
    expected = dict(config["weights"])
    size = path.stat().st_size
    if size != int(expected.get("size", -1)):
        raise HubError(f"{what} has {size} bytes but {CONFIG_NAME} records {expected.get('size')}: the file was "
                       "changed or truncated after it was saved; refusing to load it - download it again "
                       "(force_download=True) or ask the repo's owner to re-upload")
    digest, _ = _sha256_bytes_of(path)
    if digest != expected.get("sha256"):
        raise HubError(f"{what} has sha256 {digest[:16]}... but {CONFIG_NAME} records "
                       f"{str(expected.get('sha256'))[:16]}...: the file was changed after it was saved; refusing "
                       "to load it - download it again (force_download=True) or ask the repo's owner to re-upload")


def load_pretrained(directory: PathLike, *, output_stride: Optional[int] = None, what: Optional[str] = None,
                    repo_id: Optional[str] = None, revision: Optional[str] = None) -> HubModel:
    """Rebuild and strictly load the model of a folder written by :func:`save_pretrained`.

    Raises:
        HubError: not a deeplab folder, weights that differ from what ``config.json`` records,
            or weights that do not fit the model rebuilt from the config.
    """
    safetensors_torch = _safetensors_torch()
    folder = Path(directory)
    label = what or str(folder)
    config = _read_folder_config(folder, what=label)
    weights = folder / WEIGHTS_NAME
    _verify_weights(weights, config, what=f"{label}: {WEIGHTS_NAME}")
    try:
        model_config = ModelConfig.from_dict(dict(config["model_config"]))
    except (TypeError, ValueError) as exc:
        raise HubError(f"{label}: {CONFIG_NAME} has an unusable model config: {_first_line(exc)}") from exc
    if len(config["classes"]) != model_config.num_classes:
        raise HubError(f"{label}: {CONFIG_NAME} names {len(config['classes'])} classes for a model with "
                       f"{model_config.num_classes}; fix the file or save the model again")
    if output_stride is not None:
        model_config = dataclasses.replace(model_config, output_stride=int(output_stride))
    try:
        state = safetensors_torch.load_file(str(weights), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError for a corrupt header
        raise HubError(f"{label}: {WEIGHTS_NAME} is not a readable safetensors file ({_first_line(exc)}); "
                       "download it again") from exc
    from .models import build_model_from_config

    model = build_model_from_config(model_config, pretrained_backbone=None)
    load_state_dict_strict(
        model, state,
        source=f"weights in {label} do not fit the {model_config.arch} / {model_config.backbone} model rebuilt "
               f"from its {CONFIG_NAME}",
        fix="the repo mixes files of different models; upload them again with deeplab push",
        error=HubError,
    )
    return HubModel(model=model.eval(), config=config, directory=folder, repo_id=repo_id, revision=revision)


def _download(repo_id: str, revision: Optional[str], *, cache_dir: Optional[PathLike], token: Optional[str],
              force_download: bool) -> Tuple[Path, Optional[str]]:
    """``config.json``, ``model.safetensors`` and the card into the Hub cache; their snapshot folder."""
    hf = _hf()
    errors = hf.errors
    offline = _offline()
    where = _cache_dir(cache_dir)
    label = f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    paths = {}
    for filename in (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME):
        try:
            paths[filename] = hf.hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=where, token=token, endpoint=_endpoint(),
                local_files_only=offline, force_download=force_download and not offline,
            )
        except errors.LocalEntryNotFoundError as exc:
            if filename == CARD_NAME:
                continue
            cache = where or hf.constants.HF_HUB_CACHE
            if offline:
                raise HubError(f"{label}: {filename} is not in the Hub cache {cache} and HF_HUB_OFFLINE=1 forbids "
                               "downloading it; load it once online (or copy the cache), or unset HF_HUB_OFFLINE") from exc
            raise HubError(f"cannot download {label} ({_first_line(exc)}) and {filename} is not in the Hub cache "
                           f"{cache}; check the network or HF_ENDPOINT") from exc
        except errors.RepositoryNotFoundError as exc:
            raise HubError(f"{label}: no such model repo, or it is private (log in: HF_TOKEN or "
                           "`huggingface-cli login`)") from exc
        except errors.RevisionNotFoundError as exc:
            raise HubError(f"{label}: the repo has no revision {revision!r}; give a branch, tag or commit "
                           "it has") from exc
        except errors.EntryNotFoundError as exc:
            if filename == CARD_NAME:
                continue  # the card is for people; a repo without one still loads
            # (after LocalEntryNotFoundError, its subclass)
            raise HubError(f"{label} has no {filename}; it is not a deeplab model (upload one with deeplab push)") from exc
        except errors.HfHubHTTPError as exc:
            raise HubError(f"cannot download {filename} of {label}: {_first_line(exc)}") from exc
        except OSError as exc:  # huggingface_hub's size check after a download ("Consistency check failed")
            raise HubError(f"cannot download {filename} of {label}: {_first_line(exc)}; try again "
                           "(force_download=True)") from exc
    snapshot = Path(paths[CONFIG_NAME]).parent
    if Path(paths[WEIGHTS_NAME]).parent != snapshot:
        raise HubError(f"{label}: {CONFIG_NAME} and {WEIGHTS_NAME} came from different commits (the repo changed "
                       "while downloading); pin a commit with @revision or try again")
    # the cache keeps one folder per commit: snapshots/<commit>/
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision
    return snapshot, commit


def load_from_hub(
    source: str,
    *,
    revision: Optional[str] = None,
    output_stride: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    token: Optional[str] = None,
    force_download: bool = False,
) -> HubModel:
    """:func:`load_pretrained` for a Hub id (``org/repo``, ``hf://org/repo@rev``) or a saved folder."""
    if os.path.isdir(os.fspath(source)) and not str(source).startswith(HUB_PREFIX):
        return load_pretrained(source, output_stride=output_stride)
    repo_id, pinned = parse_hub_id(source, revision)
    snapshot, commit = _download(repo_id, pinned, cache_dir=cache_dir, token=token, force_download=force_download)
    label = f"{HUB_PREFIX}{repo_id}" + (f"@{pinned}" if pinned else "")
    return load_pretrained(snapshot, output_stride=output_stride, what=label, repo_id=repo_id, revision=commit)


def from_pretrained(
    source: str,
    *,
    revision: Optional[str] = None,
    output_stride: Optional[int] = None,
    cache_dir: Optional[PathLike] = None,
    token: Optional[str] = None,
    force_download: bool = False,
) -> nn.Module:
    """The model of a Hub repo (or a folder written by :func:`save_pretrained`), in eval mode.

    Args:
        source: ``org/repo``, ``org/repo@revision``, ``hf://org/repo[@revision]`` or a folder.
        revision: a branch, tag or commit (or ``@revision`` in ``source``); default ``main``.
        output_stride: rebuild at this output stride (the weights do not depend on it).
        cache_dir: the Hub cache (default ``HF_HUB_CACHE`` / ``HF_HOME/hub`` / ``~/.cache/huggingface/hub``).
        token: for private repos (default ``HF_TOKEN`` / the stored login).
        force_download: fetch again even when cached.

    Raises:
        HubError: unknown repo or revision, offline without a cached copy, a tampered or
            truncated weights file, or weights that do not fit the stored config.
    """
    return load_from_hub(source, revision=revision, output_stride=output_stride, cache_dir=cache_dir, token=token,
                         force_download=force_download).model


def checkpoint_for(source: str, *, revision: Optional[str] = None, cache_dir: Optional[PathLike] = None,
                   token: Optional[str] = None) -> Path:
    """A deeplab checkpoint (``.pt``) of a Hub model, for everything that opens checkpoints.

    The Hub files are fetched into the Hub cache and verified (:func:`load_from_hub`) on every
    call; the checkpoint is derived from them once per weights file, under
    ``$TORCH_HOME/hub/checkpoints/deeplab/hub/ORG--NAME/SHA256[:16].pt``, and carries the
    classes, palette, normalisation, dataset and the Hub provenance.
    """
    from .checkpoint import save_checkpoint

    loaded = load_from_hub(source, revision=revision, cache_dir=cache_dir, token=token)
    digest = str(loaded.config["weights"]["sha256"])
    name = (loaded.repo_id or loaded.directory.name).replace("/", "--")
    dest = Path(torch.hub.get_dir()) / "checkpoints" / "deeplab" / "hub" / name / f"{digest[:16]}.pt"
    if dest.is_file():
        return dest
    config = loaded.config
    payload: Dict[str, Any] = {
        "model": loaded.model.state_dict(),
        "config": dict(config["model_config"]),
        "classes": loaded.classes,
        "palette": config.get("palette"),
        "normalization": loaded.normalization,
        "dataset": dict(config.get("dataset") or {}),
        "metrics": {k: v for k, v in dict(config.get("metrics") or {}).items() if isinstance(v, (int, float))},
        "hub": {"source": loaded.source, "repo_id": loaded.repo_id, "revision": loaded.revision, "sha256": digest},
    }
    save_checkpoint(dest, payload)
    return dest

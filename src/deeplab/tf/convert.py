"""Convert the TF reference's DeepLab checkpoints into this package's models.

``convert_checkpoint(source)`` reads a TF checkpoint (prefix, ``.index`` file, directory or
model-zoo ``.tar.gz``), recognises the architecture from its variable names and shapes, builds
the matching model with ``tf_compat=True`` and fills every parameter through the name maps of
:mod:`deeplab.tf.names`. Every variable is accounted for: used by exactly one parameter or
buffer, or deliberately ignored with a reason (optimizer slots, global step, the backbone's
ImageNet classifier); anything else - a missing, unexpected or mis-shaped variable - is one
:class:`ConversionError` that lists the names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union, cast

import numpy as np
import torch
from torch import nn

from .._utils import DeeplabError, load_state_dict_strict
from ..config import ModelConfig
from .bundle import BundleError, CheckpointReader
from .names import (
    BACKBONE_SCOPES,
    WARNED_REASONS,
    backbone_rules,
    head_rules,
    ignore_reason,
    resnet_backbone_for,
    tf_layout,
    to_torch,
)

if TYPE_CHECKING:  # the model code is imported lazily, where a conversion needs it
    from ..models.deeplab import DeepLabV3

PathLike = Union[str, "os.PathLike[str]"]

# Datasets of the released checkpoints: logits count in the checkpoint -> dataset, and the
# crop the reference evaluates whole images at (images padded to it, bottom/right).
DATASET_CLASSES = {"voc": 21, "cityscapes": 19, "ade20k": 151}
EVAL_CROP_SIZE = {"voc": (513, 513), "cityscapes": (1025, 2049), "ade20k": (513, 513)}
READERS = ("python", "tensorflow")


class ConversionError(DeeplabError, ValueError):
    """The checkpoint cannot be converted; the message lists the offending variables."""


class ConversionWarning(UserWarning):
    """Variables outside the model (training state, optimizer slots, summaries) were skipped."""


class TensorSource(Protocol):
    """What the converter needs from a checkpoint."""

    def shapes(self) -> Dict[str, Tuple[int, ...]]: ...

    def read(self, name: str) -> np.ndarray: ...


class DictSource:
    """An in-memory checkpoint: ``{tf_name: array}`` (tests, or tensors from elsewhere)."""

    def __init__(self, tensors: Mapping[str, Any]) -> None:
        self.tensors = {k: np.asarray(v) for k, v in tensors.items()}

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    def read(self, name: str) -> np.ndarray:
        return self.tensors[name]


class TensorFlowSource:
    """A checkpoint read by TensorFlow's own ``tf.train.load_checkpoint`` (``--reader tensorflow``)."""

    def __init__(self, prefix: PathLike) -> None:
        try:
            import tensorflow as tf  # noqa: F401  (optional; only for this reader)
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ConversionError(
                "--reader tensorflow needs TensorFlow (pip install 'deeplab[tf]'); the default "
                "--reader python needs nothing"
            ) from exc
        from .bundle import resolve_prefix

        self._reader = tf.train.load_checkpoint(str(resolve_prefix(prefix)))

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {k: tuple(v) for k, v in self._reader.get_variable_to_shape_map().items()}

    def read(self, name: str) -> np.ndarray:
        return np.asarray(self._reader.get_tensor(name))


class PythonSource:
    """A checkpoint read by :class:`deeplab.tf.bundle.CheckpointReader` (no TensorFlow)."""

    def __init__(self, prefix: PathLike) -> None:
        self._reader = CheckpointReader(prefix)

    def shapes(self) -> Dict[str, Tuple[int, ...]]:
        return self._reader.shapes()

    def read(self, name: str) -> np.ndarray:
        return self._reader.read(name)


def _is_tarball(path: Path) -> bool:
    if not path.is_file():
        return False
    if path.name.endswith((".tar.gz", ".tgz", ".tar")):
        return True
    # A renamed download: sniff it, but never a checkpoint's own files.
    return not (path.name.endswith(".index") or ".data-" in path.name) and tarfile.is_tarfile(path)


def _extract_checkpoint(tarball: Path, dest: Path) -> Path:
    """Extract the one checkpoint (``.index`` + its data shards) of a tarball into ``dest``.

    Only those members are written, each under its base name, so a hostile archive cannot
    write outside ``dest``.
    """
    with tarfile.open(tarball) as archive:
        members = [m for m in archive.getmembers() if m.isfile()]
        indexes = [m for m in members if m.name.endswith(".index")]
        if len(indexes) != 1:
            found = [m.name for m in indexes] or "none"
            raise ConversionError(
                f"{tarball} holds {len(indexes)} TensorFlow checkpoints ({found}); a model-zoo tarball holds "
                "one. Extract it and pass the prefix of the checkpoint you want (DIR/model.ckpt)"
            )
        prefix = indexes[0].name[: -len(".index")]
        wanted = [m for m in members if m.name == indexes[0].name or m.name.startswith(prefix + ".data-")]
        if len(wanted) < 2:
            raise ConversionError(f"{tarball}: {indexes[0].name} has no .data-* file next to it; the archive is incomplete")
        for member in wanted:
            handle = archive.extractfile(member)
            if handle is None:  # pragma: no cover - regular files always have a handle
                raise ConversionError(f"{tarball}: cannot read {member.name}")
            with handle, open(dest / Path(member.name).name, "wb") as out:
                shutil.copyfileobj(handle, out, 1 << 20)
    return dest / Path(prefix).name


@contextlib.contextmanager
def open_checkpoint(path: PathLike, *, reader: str = "python") -> Iterator[TensorSource]:
    """Open a TF checkpoint: a prefix, its ``.index``, a directory, or a model-zoo tarball.

    Args:
        path: where the checkpoint is.
        reader: ``"python"`` (this package's tensor-bundle reader, no TensorFlow needed) or
            ``"tensorflow"`` (``tf.train.load_checkpoint``; needs TensorFlow installed).
    """
    if reader not in READERS:
        raise ConversionError(f"unknown reader {reader!r}; choose from {list(READERS)}")
    p = Path(path).expanduser()
    if not p.exists() and not p.with_name(p.name + ".index").exists():
        raise ConversionError(
            f"{p} does not exist; pass the model-zoo .tar.gz, or the checkpoint prefix (e.g. "
            "DIR/model.ckpt for DIR/model.ckpt.index + DIR/model.ckpt.data-00000-of-00001)"
        )
    with contextlib.ExitStack() as stack:
        if _is_tarball(p):
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="deeplab-tf-")))
            try:
                p = _extract_checkpoint(p, tmp)
            except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                raise ConversionError(f"{path}: not a readable tar archive ({exc}); download it again") from exc
        try:
            source: TensorSource = PythonSource(p) if reader == "python" else TensorFlowSource(p)
        except BundleError as exc:
            raise ConversionError(str(exc)) from exc
        yield source


# --------------------------------------------------------------------------- recognising the model


@dataclass(frozen=True)
class Recognised:
    """What a checkpoint holds, read off its variable names and shapes."""

    backbone: str
    tf_scope: str
    has_head: bool
    num_classes: int = 0
    atrous_branches: int = 0
    image_pooling: bool = False
    decoder: bool = False
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256


def _list(names: Sequence[str], limit: int = 25) -> str:
    names = list(names)
    shown = "\n    ".join(names[:limit])
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n    {shown}{more}"


def recognise(shapes: Mapping[str, Tuple[int, ...]]) -> Recognised:
    """Recognise backbone and head of a checkpoint from its variable names and shapes."""
    scopes = sorted({name.split("/", 1)[0] for name in shapes if "/" in name})
    found = [s for s in scopes if s in BACKBONE_SCOPES]
    if len(found) != 1:
        known = ", ".join(sorted(BACKBONE_SCOPES))
        raise ConversionError(
            f"cannot tell the backbone: the checkpoint's top-level scopes are {scopes or 'none'}; this converter "
            f"knows {known} (the released DeepLab Xception, MobileNetV2 and resnet_v1[_beta] checkpoints)"
        )
    tf_scope = found[0]
    backbone = BACKBONE_SCOPES[tf_scope]
    if backbone.startswith("resnet_v1_"):
        backbone = resnet_backbone_for(tf_scope, list(shapes))
    stem = shapes.get("MobilenetV2/Conv/weights")
    if backbone == "mobilenet_v2" and stem is not None and tuple(stem)[-1:] != (32,):
        raise ConversionError(
            f"MobilenetV2/Conv/weights has shape {list(stem)}: a MobileNetV2 with depth multiplier "
            f"{tuple(stem)[-1] / 32:g} (e.g. the model zoo's mobilenetv2_dm05_*); our MobileNetV2 has width 1.0"
        )
    if "logits/semantic/weights" not in shapes:
        return Recognised(backbone=backbone, tf_scope=tf_scope, has_head=False)
    logits = shapes["logits/semantic/weights"]
    if len(logits) != 4 or logits[:2] != (1, 1):
        raise ConversionError(
            f"logits/semantic/weights has shape {list(logits)}; the released models have a 1x1 classifier "
            "[1, 1, channels, classes]"
        )
    branches = 0
    while f"aspp{branches + 1}_depthwise/depthwise_weights" in shapes:
        branches += 1
    if f"aspp{branches + 1}/weights" in shapes or "aspp1/weights" in shapes:
        raise ConversionError(
            "the checkpoint's ASPP uses regular 3x3 convs (aspp1/weights); the released DeepLabv3+ models use "
            "separable ones (aspp1_depthwise/...), which is what this converter supports"
        )
    decoder = "decoder/feature_projection0/weights" in shapes
    if decoder and backbone == "mobilenet_v2":
        raise ConversionError(
            "a MobileNetV2 checkpoint with a decoder: the reference taps MobileNetV2's layer_4/depthwise_output "
            "for it, our model the stride-4 block output; the released MobileNetV2 models have no decoder"
        )
    if decoder and "decoder/decoder_conv0_depthwise/depthwise_weights" not in shapes:
        raise ConversionError(
            "the checkpoint's decoder does not use separable convs (no decoder/decoder_conv0_depthwise); "
            "only the released separable decoder is supported"
        )
    if "aspp0/weights" not in shapes:
        raise ConversionError("the checkpoint has logits but no ASPP (aspp0/weights); not a DeepLabv3/v3+ model")
    low, dec = 48, 256
    if decoder:
        low = int(shapes["decoder/feature_projection0/weights"][-1])
        dec = int(shapes.get("decoder/decoder_conv1_pointwise/weights", (0, 0, 0, 256))[-1])
    return Recognised(
        backbone=backbone,
        tf_scope=tf_scope,
        has_head=True,
        num_classes=int(logits[-1]),
        atrous_branches=branches,
        image_pooling="image_pooling/weights" in shapes,
        decoder=decoder,
        aspp_channels=int(shapes.get("concat_projection/weights", shapes["aspp0/weights"])[-1]),
        low_level_channels=low,
        decoder_channels=dec,
    )


# --------------------------------------------------------------------------- converting


@dataclass
class Conversion:
    """The result of a conversion.

    Attributes:
        module: the filled model (eval mode), or the backbone for ``backbone_only``.
        config: the model's :class:`ModelConfig` (``None`` for a backbone file).
        recognised: what the checkpoint was recognised as.
        used: TF variable -> our key, for every variable used.
        ignored: TF variable -> reason, for every variable deliberately not used.
        dataset: ``voc``/``cityscapes``/``ade20k`` or ``None``.
        classes, palette: class names and colours for the checkpoint.
        dropped_classes: leading logits of the checkpoint left out (ADE20K's "other").
    """

    module: nn.Module
    config: Optional[ModelConfig]
    recognised: Recognised
    used: Dict[str, str] = field(default_factory=dict)
    ignored: Dict[str, str] = field(default_factory=dict)
    dataset: Optional[str] = None
    classes: List[str] = field(default_factory=list)
    palette: List[List[int]] = field(default_factory=list)
    dropped_classes: int = 0

    def state_dict(self) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def checkpoint_payload(self, source: str = "") -> Dict[str, Any]:
        """A deeplab checkpoint (see :mod:`deeplab.checkpoint`) for ``save_checkpoint``."""
        if self.config is None:
            raise ValueError("a backbone-only conversion has no model checkpoint; save state_dict() instead")
        model = self.module
        info: Dict[str, Any] = {
            "format": "tensorflow-checkpoint",
            "path": source,
            "tf_backbone_scope": self.recognised.tf_scope,
            "variables_used": len(self.used),
            "variables_ignored": sorted(self.ignored),
            "dropped_classes": self.dropped_classes,
        }
        if self.dataset is not None:
            info["dataset"] = self.dataset
            info["eval_crop_size"] = list(EVAL_CROP_SIZE[self.dataset])
        payload: Dict[str, Any] = {
            "model": self.state_dict(),
            "config": self.config.to_dict(),
            "classes": list(self.classes),
            "palette": [list(c) for c in self.palette],
            "normalization": cast("DeepLabV3", model).normalization.to_dict(),
            "converted_from": info,
        }
        if self.dataset is not None:
            # What training checkpoints carry too; `deeplab eval` picks its dataset from it.
            payload["dataset"] = {"dataset": self.dataset, "source": "tensorflow model zoo"}
        return payload


def _dataset_for(num_classes: int, dataset: Optional[str]) -> Optional[str]:
    if dataset is not None:
        if dataset not in DATASET_CLASSES:
            raise ConversionError(f"unknown dataset {dataset!r}; choose from {sorted(DATASET_CLASSES)}")
        if DATASET_CLASSES[dataset] != num_classes:
            raise ConversionError(
                f"the checkpoint's classifier has {num_classes} classes, but --dataset {dataset} has "
                f"{DATASET_CLASSES[dataset]} in the reference; pass the dataset the checkpoint was trained on"
            )
        return dataset
    matches = [name for name, n in DATASET_CLASSES.items() if n == num_classes]
    return matches[0] if len(matches) == 1 else None


def _classes_and_palette(dataset: Optional[str], num_classes: int) -> Tuple[List[str], List[List[int]]]:
    from ..data.palettes import PALETTES, default_palette

    if dataset is None:
        return [f"class_{i}" for i in range(num_classes)], [list(c) for c in default_palette(min(num_classes, 255))]
    classes, palette = PALETTES[dataset]
    return list(classes), [list(c) for c in palette]


def _bn_modules(module: nn.Module) -> Dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def convert_source(
    source: TensorSource,
    *,
    dataset: Optional[str] = None,
    output_stride: int = 16,
    multi_grid: Optional[Sequence[int]] = None,
    backbone_only: bool = False,
) -> Conversion:
    """Convert an opened checkpoint (see :func:`convert_checkpoint`)."""
    from ..models import build_backbone, build_model_from_config

    shapes = source.shapes()
    rec = recognise(shapes)
    drop = 0
    if backbone_only or not rec.has_head:
        if rec.backbone == "mobilenet_v2":
            raise ConversionError(
                "MobileNetV2 backbone-only files are not supported: our default MobileNetV2 is torchvision's "
                "(other padding and BatchNorm epsilon), so TF MobileNetV2 weights only compute the reference's "
                "function inside a converted tf_compat model. Convert the full DeepLab checkpoint instead"
            )
        module: nn.Module = build_backbone(rec.backbone, output_stride=output_stride, multi_grid=multi_grid,
                                           tf_compat=True)
        rules = backbone_rules(rec.backbone, rec.tf_scope, prefix="")
        config = None
        dataset = None
        backbone_only = True
    else:
        if rec.atrous_branches not in (0, 3):
            raise ConversionError(
                f"the checkpoint has {rec.atrous_branches} atrous ASPP branches; the released models have 3 "
                "(rates 6, 12, 18 at output stride 16) or none (MobileNetV2)"
            )
        dataset = _dataset_for(rec.num_classes, dataset)
        # ADE20K: the reference trains 151 logits with label 0 ("other") ignored; our ADE20K has
        # the 150 real classes (annotation k -> class k - 1), so logit 0 is left out.
        drop = 1 if dataset == "ade20k" else 0
        config = ModelConfig(
            arch="deeplabv3plus" if rec.decoder else "deeplabv3",
            backbone=rec.backbone,
            num_classes=rec.num_classes - drop,
            output_stride=output_stride,
            separable=True,
            # 3 branches: the paper's rates, derived from the output stride; none: MobileNetV2's head.
            aspp_rates=None if rec.atrous_branches == 3 else (),
            multi_grid=None if multi_grid is None else tuple(multi_grid),
            image_pooling=rec.image_pooling,
            aspp_channels=rec.aspp_channels,
            low_level_channels=rec.low_level_channels,
            decoder_channels=rec.decoder_channels,
            tf_compat=True,
        )
        module = build_model_from_config(config)
        rules = backbone_rules(rec.backbone, rec.tf_scope) + head_rules(
            atrous_branches=rec.atrous_branches, image_pooling=rec.image_pooling, decoder=rec.decoder,
            drop_classes=drop,
        )

    state = module.state_dict()
    by_tf = {rule.tf_name: rule for rule in rules}
    by_key: Dict[str, List[str]] = {}
    for rule in rules:
        by_key.setdefault(rule.key, []).append(rule.tf_name)
    # The maps must cover every parameter/buffer once; a failure here is a bug in names.py.
    uncovered = sorted(k for k in state if k not in by_key and not k.endswith("num_batches_tracked"))
    doubled = sorted(k for k, v in by_key.items() if len(v) > 1)
    unknown_keys = sorted(k for k in by_key if k not in state)
    if uncovered or doubled or unknown_keys:  # pragma: no cover - internal consistency
        raise AssertionError(f"name map out of date: uncovered {uncovered[:5]}, doubled {doubled[:5]}, "
                             f"not in model {unknown_keys[:5]}")

    ignored: Dict[str, str] = {}
    unexpected: List[str] = []
    for name in sorted(shapes):
        if name in by_tf:
            continue
        reason = ignore_reason(name, backbone_scope=rec.tf_scope, backbone_only=backbone_only)
        if reason is None:
            unexpected.append(f"{name} {list(shapes[name])}")
        else:
            ignored[name] = reason
    missing = sorted(f"{r.tf_name} (expected {list(tf_layout(r.kind, state[r.key].shape, r.drop_classes))})"
                     for r in rules if r.tf_name not in shapes)
    mis_shaped = []
    for rule in rules:
        if rule.tf_name in shapes:
            want = tf_layout(rule.kind, state[rule.key].shape, rule.drop_classes)
            if tuple(shapes[rule.tf_name]) != want:
                mis_shaped.append(f"{rule.tf_name}: {list(shapes[rule.tf_name])}, expected {list(want)}")
    if missing or unexpected or mis_shaped:
        what = (f"{rec.tf_scope} DeepLab{'v3+' if rec.decoder else 'v3'} model" if not backbone_only
                else f"{rec.tf_scope} backbone")
        parts = [f"the checkpoint does not fit the {what} it looks like:"]
        if missing:
            parts.append(f"  missing variables ({len(missing)}):{_list(missing)}")
        if unexpected:
            parts.append(f"  unexpected variables ({len(unexpected)}), neither used nor known to be ignorable:"
                         f"{_list(unexpected)}")
        if mis_shaped:
            parts.append(f"  variables with the wrong shape ({len(mis_shaped)}):{_list(mis_shaped)}")
        parts.append("Is it a checkpoint of another architecture (e.g. a NAS, ResNet or MobileNetV3 model), or an "
                     "incomplete download?")
        raise ConversionError("\n".join(parts))
    skipped = sorted(name for name, reason in ignored.items() if reason in WARNED_REASONS)
    if skipped:
        warnings.warn(
            f"{len(skipped)} checkpoint variable(s) outside the model skipped (training state, optimizer slots, "
            f"moving averages, summaries):{_list(skipped, limit=12)}",
            ConversionWarning,
            stacklevel=2,
        )

    bn_modules = _bn_modules(module)
    new_state: Dict[str, torch.Tensor] = {}
    for rule in rules:
        if rule.bn_eps is not None:
            bn = bn_modules[rule.key.rsplit(".", 1)[0]]
            if abs(bn.eps - rule.bn_eps) > 1e-12:  # pragma: no cover - a model bug, not a user error
                raise AssertionError(f"{rule.key}: BatchNorm eps {bn.eps} but the reference uses {rule.bn_eps}")
        array = source.read(rule.tf_name)
        if array.dtype.kind != "f":
            raise ConversionError(f"{rule.tf_name} has dtype {array.dtype}, expected floating point weights")
        value = to_torch(rule.kind, np.asarray(array, dtype=np.float32), rule.drop_classes)
        if not np.isfinite(value).all():
            raise ConversionError(f"{rule.tf_name} contains NaN or infinite values; the checkpoint is broken")
        new_state[rule.key] = torch.from_numpy(value)
    for key, value in state.items():
        if key.endswith("num_batches_tracked"):
            new_state[key] = torch.zeros_like(value)  # TF keeps no such counter
    load_state_dict_strict(
        module,
        new_state,
        source=f"the weights converted from the {rec.tf_scope} checkpoint do not fit the model rebuilt for it",
        fix="this is a bug in deeplab.tf.names (the name maps); please report it with the checkpoint's name",
        error=ConversionError,
    )
    module.eval()

    classes: List[str] = []
    palette: List[List[int]] = []
    if config is not None:
        classes, palette = _classes_and_palette(dataset, config.num_classes)
    return Conversion(
        module=module,
        config=config,
        recognised=rec,
        used={rule.tf_name: rule.key for rule in rules},
        ignored=ignored,
        dataset=dataset,
        classes=classes,
        palette=palette,
        dropped_classes=drop,
    )


def convert_checkpoint(
    path: PathLike,
    *,
    dataset: Optional[str] = None,
    output_stride: int = 16,
    multi_grid: Optional[Sequence[int]] = None,
    backbone_only: bool = False,
    reader: str = "python",
) -> Conversion:
    """Convert a TF DeepLab checkpoint into a filled model.

    Args:
        path: model-zoo ``.tar.gz``, checkpoint prefix, ``.index`` file or directory.
        dataset: ``voc``, ``cityscapes`` or ``ade20k`` (class names, palette, eval crop);
            ``None`` infers it from the number of classes (21, 19, 151).
        output_stride: output stride of the rebuilt model (weights do not depend on it; the
            paper's single-scale numbers use 16, its best multi-scale ones 8).
        multi_grid: Xception exit-block rate multipliers, if the checkpoint was trained with them.
        backbone_only: keep only the backbone (an ImageNet backbone file for
            ``pretrained_backbone``); implied for checkpoints without a segmentation head.
        reader: ``python`` (no TensorFlow needed) or ``tensorflow``.

    Raises:
        ConversionError: unreadable checkpoint, unknown architecture, or missing, unexpected
            or mis-shaped variables (all listed).
    """
    with open_checkpoint(path, reader=reader) as source:
        try:
            return convert_source(
                source, dataset=dataset, output_stride=output_stride, multi_grid=multi_grid,
                backbone_only=backbone_only,
            )
        except BundleError as exc:
            raise ConversionError(str(exc)) from exc


__all__ = [
    "Conversion",
    "ConversionError",
    "ConversionWarning",
    "DictSource",
    "Recognised",
    "convert_checkpoint",
    "convert_source",
    "open_checkpoint",
    "recognise",
]

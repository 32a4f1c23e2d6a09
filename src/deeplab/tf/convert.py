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

import os
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union, cast

import numpy as np
import torch
from torch import nn

from .._utils import load_state_dict_strict
from ..config import ModelConfig
from .bundle import BundleError
from .names import (
    BACKBONE_SCOPES,
    WARNED_REASONS,
    Rule,
    backbone_rules,
    head_rules,
    ignore_reason,
    resnet_backbone_for,
    tf_layout,
    to_torch,
)
from .settings import ReferenceSettings, SettingsError, resolve, settle
from .source import (
    READERS,
    ConversionError,
    ConversionWarning,
    DictSource,
    PythonSource,
    TensorFlowSource,
    TensorSource,
    open_checkpoint,
)

if TYPE_CHECKING:  # the model code is imported lazily, where a conversion needs it
    from ..models.deeplab import DeepLabV3

PathLike = Union[str, "os.PathLike[str]"]

# Datasets of the released checkpoints: logits count in the checkpoint -> dataset, and the
# crop the reference evaluates whole images at (images padded to it, bottom/right).
DATASET_CLASSES = {"voc": 21, "cityscapes": 19, "ade20k": 151}
EVAL_CROP_SIZE = {"voc": (513, 513), "cityscapes": (1025, 2049), "ade20k": (513, 513)}


# --------------------------------------------------------------------------- recognising the model


@dataclass(frozen=True)
class Recognised:
    """What a checkpoint holds, read off its variable names and shapes.

    ``separable``: the head's 3x3 convs are split separable ones (``aspp{i}_depthwise``,
    ``decoder_conv{j}_depthwise``) rather than regular ones (``aspp{i}/weights``,
    ``decoder/decoder_conv0/decoder_conv0_{1,2}``); ``True`` when the head has no 3x3 conv.
    """

    backbone: str
    tf_scope: str
    has_head: bool
    num_classes: int = 0
    atrous_branches: int = 0
    image_pooling: bool = False
    decoder: bool = False
    separable: bool = True
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256


def _list(names: Sequence[str], limit: int = 25) -> str:
    names = list(names)
    shown = "\n    ".join(names[:limit])
    more = f"\n    ... and {len(names) - limit} more" if len(names) > limit else ""
    return f"\n    {shown}{more}"


def _recognise_backbone(shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[str, str]:
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
    return backbone, tf_scope


def _count(shapes: Mapping[str, Tuple[int, ...]], pattern: str) -> int:
    n = 0
    while pattern.format(n + 1) in shapes:
        n += 1
    return n


def _head_separable(shapes: Mapping[str, Tuple[int, ...]], backbone: str) -> Tuple[int, bool, bool, Optional[bool]]:
    """ASPP's 3x3 branches, image pooling, decoder, and whether the 3x3 convs are separable
    (``None``: the head has none)."""
    separable_branches = _count(shapes, "aspp{}_depthwise/depthwise_weights")
    regular_branches = _count(shapes, "aspp{}/weights")
    if separable_branches and regular_branches:
        raise ConversionError(
            "the checkpoint's ASPP mixes separable (aspp1_depthwise) and regular (aspp1/weights) 3x3 branches; "
            "the reference builds one kind (aspp_with_separable_conv)"
        )
    kinds = set()
    if separable_branches or regular_branches:
        kinds.add(bool(separable_branches))
    decoder = "decoder/feature_projection0/weights" in shapes
    if decoder:
        if backbone == "mobilenet_v2":
            raise ConversionError(
                "a MobileNetV2 checkpoint with a decoder: the reference taps MobileNetV2's layer_4/depthwise_output "
                "for it, our model the stride-4 block output; the released MobileNetV2 models have no decoder"
            )
        if "decoder/decoder_conv0_depthwise/depthwise_weights" in shapes:
            kinds.add(True)
        elif "decoder/decoder_conv0/decoder_conv0_1/weights" in shapes:
            kinds.add(False)
        else:
            raise ConversionError(
                "the checkpoint's decoder has neither separable convs (decoder/decoder_conv0_depthwise) nor the "
                "regular slim.repeat pair (decoder/decoder_conv0/decoder_conv0_1); not a DeepLabv3+ decoder"
            )
    if len(kinds) > 1:
        raise ConversionError(
            "the checkpoint's ASPP and decoder differ in kind (one separable, one regular: "
            "aspp_with_separable_conv != decoder_use_separable_conv); our model has one switch for both "
            "(ModelConfig.separable), so it cannot be rebuilt"
        )
    return separable_branches or regular_branches, "image_pooling/weights" in shapes, decoder, (
        kinds.pop() if kinds else None)


def recognise(shapes: Mapping[str, Tuple[int, ...]]) -> Recognised:
    """Recognise backbone and head of a checkpoint from its variable names and shapes."""
    backbone, tf_scope = _recognise_backbone(shapes)
    if "logits/semantic/weights" not in shapes:
        return Recognised(backbone=backbone, tf_scope=tf_scope, has_head=False)
    logits = shapes["logits/semantic/weights"]
    if len(logits) != 4 or logits[:2] != (1, 1):
        raise ConversionError(
            f"logits/semantic/weights has shape {list(logits)}; the released models have a 1x1 classifier "
            "[1, 1, channels, classes]"
        )
    if "aspp0/weights" not in shapes:
        raise ConversionError("the checkpoint has logits but no ASPP (aspp0/weights); not a DeepLabv3/v3+ model")
    branches, image_pooling, decoder, separable = _head_separable(shapes, backbone)
    low, dec = 48, 256
    if decoder:
        low = int(shapes["decoder/feature_projection0/weights"][-1])
        last = ("decoder/decoder_conv1_pointwise/weights" if separable
                else "decoder/decoder_conv0/decoder_conv0_2/weights")
        dec = int(shapes.get(last, (0, 0, 0, 256))[-1])
    return Recognised(
        backbone=backbone,
        tf_scope=tf_scope,
        has_head=True,
        num_classes=int(logits[-1]),
        atrous_branches=branches,
        image_pooling=image_pooling,
        decoder=decoder,
        separable=True if separable is None else separable,
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
        settings: the reference's settings the model was rebuilt with (``None`` for a backbone).
        provenance: where each setting came from (``given``, ``reference config NAME``,
            ``checkpoint variables``).
        reference_config: the preset's name, if one was used.
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
    settings: Optional[ReferenceSettings] = None
    provenance: Dict[str, str] = field(default_factory=dict)
    reference_config: Optional[str] = None

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
        if self.settings is not None:
            # The settings the weights cannot reveal, and where each came from (never a guess).
            info["settings"] = self.settings.to_dict()
            info["settings_from"] = dict(self.provenance)
            info["reference_config"] = self.reference_config
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


@dataclass
class Target:
    """The model a checkpoint is converted into, and the rules that fill it."""

    module: nn.Module
    rules: List[Rule]
    config: Optional[ModelConfig] = None
    dataset: Optional[str] = None
    drop: int = 0
    settings: Optional[ReferenceSettings] = None
    provenance: Dict[str, str] = field(default_factory=dict)
    reference_config: Optional[str] = None

    @property
    def backbone_only(self) -> bool:
        return self.config is None


def _backbone_target(rec: Recognised) -> Target:
    from ..models import build_backbone

    if rec.backbone == "mobilenet_v2":
        raise ConversionError(
            "MobileNetV2 backbone-only files are not supported: our default MobileNetV2 is torchvision's "
            "(other padding and BatchNorm epsilon), so TF MobileNetV2 weights only compute the reference's "
            "function inside a converted tf_compat model. Convert the full DeepLab checkpoint instead"
        )
    # A backbone file holds weights only: output stride and multi-grid are chosen where it is used.
    module = build_backbone(rec.backbone, output_stride=16, tf_compat=True)
    return Target(module=module, rules=backbone_rules(rec.backbone, rec.tf_scope, prefix=""))


def build_target(rec: Recognised, *, settings: Optional[ReferenceSettings], reference_config: Optional[str],
                 dataset: Optional[str]) -> Target:
    """Step 1: the model the reference ran - recognised layers, plus the settings the weights cannot reveal."""
    from ..models import build_model_from_config
    from ..models.aspp import default_aspp_rates

    what = f"{rec.backbone} DeepLab{'v3+' if rec.decoder else 'v3'} checkpoint"
    try:
        merged, provenance, preset = resolve(settings, reference_config, rec.backbone)
        full = settle(merged, backbone=rec.backbone, atrous_branches=rec.atrous_branches, decoder=rec.decoder,
                      image_pooling=rec.image_pooling, what=what)
    except SettingsError as exc:
        raise ConversionError(str(exc)) from exc
    provenance.setdefault("image_pooling", "checkpoint variables")
    if dataset is None and preset is not None and DATASET_CLASSES[preset.dataset] == rec.num_classes:
        dataset = preset.dataset  # the preset's dataset, when the classifier fits it (else: another dataset)
    dataset = _dataset_for(rec.num_classes, dataset)
    # ADE20K: the reference trains 151 logits with label 0 ("other") ignored; our ADE20K has
    # the 150 real classes (annotation k -> class k - 1), so logit 0 is left out.
    drop = 1 if dataset == "ade20k" else 0
    rates = cast(Tuple[int, ...], full.atrous_rates)
    output_stride = cast(int, full.output_stride)
    config = ModelConfig(
        arch="deeplabv3plus" if rec.decoder else "deeplabv3",
        backbone=rec.backbone,
        num_classes=rec.num_classes - drop,
        output_stride=output_stride,
        separable=rec.separable,
        # The paper's rule (rates scale with 16 / output stride) is kept as None, so a model rebuilt at
        # another output stride (eval --output-stride 8) takes the reference's rates for it (12, 24, 36).
        aspp_rates=None if rates and output_stride in (8, 16) and rates == default_aspp_rates(output_stride)
        else rates,
        multi_grid=full.multi_grid or None,
        image_pooling=rec.image_pooling,
        aspp_channels=rec.aspp_channels,
        low_level_channels=rec.low_level_channels,
        decoder_channels=rec.decoder_channels,
        tf_compat=True,
    )
    rules = backbone_rules(rec.backbone, rec.tf_scope) + head_rules(
        atrous_branches=rec.atrous_branches, image_pooling=rec.image_pooling, decoder=rec.decoder,
        separable=rec.separable, drop_classes=drop,
    )
    return Target(module=build_model_from_config(config), rules=rules, config=config, dataset=dataset, drop=drop,
                  settings=full, provenance=provenance, reference_config=None if preset is None else preset.name)


def check_name_map(state: Mapping[str, torch.Tensor], rules: Sequence[Rule]) -> None:
    """Step 2: the rules cover every parameter/buffer once; a failure here is a bug in names.py."""
    by_key: Dict[str, List[str]] = {}
    for rule in rules:
        by_key.setdefault(rule.key, []).append(rule.tf_name)
    uncovered = sorted(k for k in state if k not in by_key and not k.endswith("num_batches_tracked"))
    doubled = sorted(k for k, v in by_key.items() if len(v) > 1)
    unknown_keys = sorted(k for k in by_key if k not in state)
    if uncovered or doubled or unknown_keys:  # pragma: no cover - internal consistency
        raise AssertionError(f"name map out of date: uncovered {uncovered[:5]}, doubled {doubled[:5]}, "
                             f"not in model {unknown_keys[:5]}")


def diff_variables(shapes: Mapping[str, Tuple[int, ...]], target: Target, rec: Recognised) -> Dict[str, str]:
    """Step 3: every variable used or ignored with a reason; returns the ignored ones.

    Raises:
        ConversionError: missing, unexpected or mis-shaped variables, all listed.
    """
    state = target.module.state_dict()
    by_tf = {rule.tf_name for rule in target.rules}
    ignored: Dict[str, str] = {}
    unexpected: List[str] = []
    for name in sorted(shapes):
        if name in by_tf:
            continue
        reason = ignore_reason(name, backbone_scope=rec.tf_scope, backbone_only=target.backbone_only)
        if reason is None:
            unexpected.append(f"{name} {list(shapes[name])}")
        else:
            ignored[name] = reason
    missing, mis_shaped = [], []
    for rule in target.rules:
        want = tf_layout(rule.kind, state[rule.key].shape, rule.drop_classes)
        if rule.tf_name not in shapes:
            missing.append(f"{rule.tf_name} (expected {list(want)})")
        elif tuple(shapes[rule.tf_name]) != want:
            mis_shaped.append(f"{rule.tf_name}: {list(shapes[rule.tf_name])}, expected {list(want)}")
    if missing or unexpected or mis_shaped:
        what = (f"{rec.tf_scope} backbone" if target.backbone_only else
                f"{rec.tf_scope} DeepLab{'v3+' if rec.decoder else 'v3'} model "
                f"({'separable' if rec.separable else 'regular'} 3x3 convs)")
        parts = [f"the checkpoint does not fit the {what} it looks like:"]
        if missing:
            parts.append(f"  missing variables ({len(missing)}):{_list(sorted(missing))}")
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
            stacklevel=3,
        )
    return ignored


def copy_tensors(source: TensorSource, target: Target, rec: Recognised) -> None:
    """Step 4: read, re-lay and check every variable, then load them strictly (eval mode)."""
    module = target.module
    bn_modules = _bn_modules(module)
    new_state: Dict[str, torch.Tensor] = {}
    for rule in target.rules:
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
    for key, value in module.state_dict().items():
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


def convert_source(
    source: TensorSource,
    *,
    settings: Optional[ReferenceSettings] = None,
    reference_config: Optional[str] = None,
    dataset: Optional[str] = None,
    backbone_only: bool = False,
) -> Conversion:
    """Convert an opened checkpoint (see :func:`convert_checkpoint`): recognise it, build the
    target, check the name map, diff the variables, copy the tensors, attach the classes."""
    shapes = source.shapes()
    rec = recognise(shapes)
    if backbone_only or not rec.has_head:
        target = _backbone_target(rec)
    else:
        target = build_target(rec, settings=settings, reference_config=reference_config, dataset=dataset)
    check_name_map(target.module.state_dict(), target.rules)
    ignored = diff_variables(shapes, target, rec)
    copy_tensors(source, target, rec)
    classes: List[str] = []
    palette: List[List[int]] = []
    if target.config is not None:
        classes, palette = _classes_and_palette(target.dataset, target.config.num_classes)
    return Conversion(
        module=target.module, config=target.config, recognised=rec,
        used={rule.tf_name: rule.key for rule in target.rules}, ignored=ignored, dataset=target.dataset,
        classes=classes, palette=palette, dropped_classes=target.drop, settings=target.settings,
        provenance=target.provenance, reference_config=target.reference_config,
    )


def convert_checkpoint(
    path: PathLike,
    *,
    settings: Optional[ReferenceSettings] = None,
    reference_config: Optional[str] = None,
    dataset: Optional[str] = None,
    backbone_only: bool = False,
    reader: str = "python",
) -> Conversion:
    """Convert a TF DeepLab checkpoint into a filled model.

    Args:
        path: model-zoo ``.tar.gz``, checkpoint prefix, ``.index`` file or directory.
        settings: what the weights cannot reveal (output stride, atrous rates, multi-grid,
            decoder stride; see :class:`~deeplab.tf.settings.ReferenceSettings`); each one a model
            checkpoint needs must be given here or by ``reference_config``, never guessed.
        reference_config: a preset of :data:`~deeplab.tf.settings.REFERENCE_CONFIGS`
            (``resnet_v1_101_beta_voc``...); ``settings`` given override it.
        dataset: ``voc``, ``cityscapes`` or ``ade20k`` (class names, palette, eval crop);
            ``None``: the preset's, else from the number of classes (21, 19, 151).
        backbone_only: keep only the backbone (an ImageNet backbone file for
            ``pretrained_backbone``); implied for checkpoints without a segmentation head.
        reader: ``python`` (no TensorFlow needed) or ``tensorflow``.

    Raises:
        ConversionError: unreadable checkpoint, unknown architecture, missing or contradicting
            settings, or missing, unexpected or mis-shaped variables (all listed).
    """
    with open_checkpoint(path, reader=reader) as source:
        try:
            return convert_source(source, settings=settings, reference_config=reference_config, dataset=dataset,
                                  backbone_only=backbone_only)
        except BundleError as exc:
            raise ConversionError(str(exc)) from exc


__all__ = [
    "Conversion",
    "ConversionError",
    "ConversionWarning",
    "DictSource",
    "PythonSource",
    "READERS",
    "Recognised",
    "ReferenceSettings",
    "Target",
    "TensorFlowSource",
    "TensorSource",
    "build_target",
    "check_name_map",
    "convert_checkpoint",
    "copy_tensors",
    "diff_variables",
    "convert_source",
    "open_checkpoint",
    "recognise",
]

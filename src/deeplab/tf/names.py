"""Name maps between the TF reference's variables and this package's parameters.

Every rule says which TF variable fills which parameter/buffer and how its layout changes. The
TF names are those of tensorflow/models ``research/deeplab`` (``model.py``,
``core/xception.py``, ``core/feature_extractor.py``, ``core/utils.py``) and slim's
``nets/mobilenet`` (``mobilenet_v2.py``, ``conv_blocks.py``), as they appear in the released
model-zoo checkpoints:

- slim ``conv2d``: ``SCOPE/weights`` ``[kh, kw, in, out]`` (HWIO), ``SCOPE/biases`` when it has
  no normaliser, else ``SCOPE/BatchNorm/{gamma, beta, moving_mean, moving_variance}``.
- slim ``separable_conv2d`` with ``num_outputs=None`` (a depthwise conv):
  ``SCOPE/depthwise_weights`` ``[kh, kw, in, multiplier]``.
- Xception: ``xception_65/entry_flow/conv1_{1,2}``, ``xception_65/{entry,middle,exit}_flow/
  blockB/unit_U/xception_module/separable_conv{1,2,3}_{depthwise,pointwise}`` and ``shortcut``;
  BatchNorm epsilon 1e-3 (``xception_arg_scope`` as ``feature_extractor`` calls it).
- MobileNetV2: ``MobilenetV2/Conv``, ``MobilenetV2/expanded_conv[_N]/{expand, depthwise,
  project}``; BatchNorm epsilon 1e-3 (slim's default; ``training_scope`` sets none).
- ResNet (``core/resnet_v1_beta.py``, slim's ``resnet_v1``/``resnet_utils``): ``resnet_v1_{50,101}/
  conv1`` (``_beta``: ``conv1_1``, ``conv1_2``, ``conv1_3``), ``blockB/unit_U/bottleneck_v1/
  {conv1, conv2, conv3, shortcut}``; the ``_beta`` variants keep the plain scope name
  (``resnet_v1_101``), told apart by their root convs; BatchNorm epsilon 1e-5.
- Head (``model.py``): ``image_pooling``, ``aspp0``, ``aspp{i}_{depthwise,pointwise}``
  (``split_separable_conv2d``) or ``aspp{i}`` (a regular 3x3 ``slim.conv2d``), ``concat_projection``,
  ``decoder/feature_projection0``, ``decoder/decoder_conv{0,1}_{depthwise,pointwise}`` or
  ``decoder/decoder_conv0/decoder_conv0_{1,2}`` (``slim.repeat`` of two regular 3x3 convs),
  ``logits/semantic/{weights,biases}``; BatchNorm epsilon 1e-5. See :func:`head_rules` and
  docs/conversion.md for the table of every scope with the reference line it comes from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..models.backbones.xception import XCEPTION_BN_EPS, XCEPTION_DEFS

TF_HEAD_BN_EPS = 1e-5
TF_MOBILENET_BN_EPS = 1e-3

# TF variable scope of each backbone -> our backbone name.
BACKBONE_SCOPES: Dict[str, str] = {
    "xception_41": "xception41",
    "xception_65": "xception65",
    "xception_71": "xception71",
    "MobilenetV2": "mobilenet_v2",
    # resnet_v1_*_beta share the scope (feature_extractor's name_scope); see resnet_backbone_for.
    "resnet_v1_50": "resnet_v1_50",
    "resnet_v1_101": "resnet_v1_101",
}
# Top-level scopes of DeepLab's head (model.py); with the backbone's scope, "the model's scopes".
HEAD_SCOPE_PATTERN = re.compile(r"(image_pooling|aspp\d+(_depthwise|_pointwise)?|concat_projection|decoder|logits)\Z")

# Entry-flow blocks and middle-flow units of each Xception in the reference.
XCEPTION_FLOWS: Dict[str, Tuple[int, int]] = {"xception41": (3, 8), "xception65": (3, 16), "xception71": (5, 16)}

# Kinds of layout change (see :func:`tf_layout` and :func:`to_torch`).
CONV = "conv"  # [kh, kw, in, out] -> [out, in, kh, kw]
DEPTHWISE = "depthwise"  # [kh, kw, channels, multiplier] -> [channels * multiplier, 1, kh, kw]
VECTOR = "vector"  # BatchNorm gamma/beta/moving stats, biases: unchanged
LOGITS_WEIGHT = "logits_weight"  # a CONV whose output channels may drop leading classes
LOGITS_BIAS = "logits_bias"  # a VECTOR that may drop leading classes


@dataclass(frozen=True)
class Rule:
    """One TF variable -> one of our state-dict entries.

    Attributes:
        tf_name: the reference's variable name.
        key: our parameter/buffer name (``model.state_dict()`` key).
        kind: layout change (``conv``, ``depthwise``, ``vector``, ``logits_weight``, ``logits_bias``).
        bn_eps: for BatchNorm entries, the reference's epsilon for that layer (checked against
            our module's).
        drop_classes: for the logits, leading classes of the checkpoint that our model does not
            have (ADE20K's class 0, "other", which the reference trains with ignore_label=0).
    """

    tf_name: str
    key: str
    kind: str
    bn_eps: Optional[float] = None
    drop_classes: int = 0


def tf_layout(kind: str, torch_shape: Sequence[int], drop_classes: int = 0) -> Tuple[int, ...]:
    """The TF shape a variable must have to fill a tensor of ``torch_shape``."""
    shape = tuple(int(s) for s in torch_shape)
    if kind in (CONV, LOGITS_WEIGHT):
        out, cin, kh, kw = shape
        return (kh, kw, cin, out + (drop_classes if kind == LOGITS_WEIGHT else 0))
    if kind == DEPTHWISE:
        channels, _, kh, kw = shape
        return (kh, kw, channels, 1)
    if kind == LOGITS_BIAS:
        return (shape[0] + drop_classes,)
    return shape


def to_torch(kind: str, array: np.ndarray, drop_classes: int = 0) -> np.ndarray:
    """Apply the layout change of ``kind`` to a TF array (returns a new contiguous array)."""
    if kind in (CONV, LOGITS_WEIGHT):
        out = array.transpose(3, 2, 0, 1)
        if kind == LOGITS_WEIGHT and drop_classes:
            out = out[drop_classes:]
    elif kind == DEPTHWISE:
        kh, kw, channels, multiplier = array.shape
        # Output channel c * multiplier + m of TF's depthwise conv is PyTorch's group c, member m.
        out = array.reshape(kh, kw, channels * multiplier).transpose(2, 0, 1)[:, None]
    elif kind == LOGITS_BIAS:
        out = array[drop_classes:]
    else:
        out = array
    return np.ascontiguousarray(out)


def _bn(tf_scope: str, key: str, eps: float) -> List[Rule]:
    pairs = (("gamma", "weight"), ("beta", "bias"), ("moving_mean", "running_mean"), ("moving_variance", "running_var"))
    return [Rule(f"{tf_scope}/BatchNorm/{tf_leaf}", f"{key}.{leaf}", VECTOR, bn_eps=eps) for tf_leaf, leaf in pairs]


def _conv_bn(tf_scope: str, conv_key: str, bn_key: str, eps: float, *, depthwise: bool = False) -> List[Rule]:
    leaf, kind = ("depthwise_weights", DEPTHWISE) if depthwise else ("weights", CONV)
    return [Rule(f"{tf_scope}/{leaf}", f"{conv_key}.weight", kind)] + _bn(tf_scope, bn_key, eps)


def xception_unit_scopes(backbone: str) -> List[str]:
    """TF scope of each of our Xception blocks, in order (``entry_flow/block1/unit_1``...)."""
    entry, middle = XCEPTION_FLOWS[backbone]
    scopes = [f"entry_flow/block{b}/unit_1" for b in range(1, entry + 1)]
    scopes += [f"middle_flow/block1/unit_{u}" for u in range(1, middle + 1)]
    scopes += ["exit_flow/block1/unit_1", "exit_flow/block2/unit_1"]
    if len(scopes) != len(XCEPTION_DEFS[backbone]):  # pragma: no cover - guards the tables above
        raise AssertionError(f"{backbone}: {len(scopes)} TF units vs {len(XCEPTION_DEFS[backbone])} blocks")
    return scopes


def xception_rules(backbone: str, tf_scope: str, prefix: str = "backbone.") -> List[Rule]:
    """Rules for an Xception backbone (our timm layout)."""
    eps = XCEPTION_BN_EPS
    rules = _conv_bn(f"{tf_scope}/entry_flow/conv1_1", f"{prefix}stem.0.conv", f"{prefix}stem.0.bn", eps)
    rules += _conv_bn(f"{tf_scope}/entry_flow/conv1_2", f"{prefix}stem.1.conv", f"{prefix}stem.1.bn", eps)
    for index, (unit, spec) in enumerate(zip(xception_unit_scopes(backbone), XCEPTION_DEFS[backbone])):
        scope = f"{tf_scope}/{unit}/xception_module"
        block = f"{prefix}blocks.{index}"
        for j in (1, 2, 3):
            conv = f"{block}.stack.conv{j}"
            rules += _conv_bn(f"{scope}/separable_conv{j}_depthwise", f"{conv}.conv_dw", f"{conv}.bn_dw", eps,
                              depthwise=True)
            rules += _conv_bn(f"{scope}/separable_conv{j}_pointwise", f"{conv}.conv_pw", f"{conv}.bn_pw", eps)
        # 'conv' skip connections (a 1x1 projection) are exactly the blocks that change width or stride.
        if spec.skip and (spec.out_channels[-1] != spec.in_channels or spec.stride != 1):
            rules += _conv_bn(f"{scope}/shortcut", f"{block}.shortcut.conv", f"{block}.shortcut.bn", eps)
    return rules


def mobilenet_v2_rules(tf_scope: str = "MobilenetV2", prefix: str = "backbone.") -> List[Rule]:
    """Rules for MobileNetV2 up to ``layer_18`` (our torchvision layout, ``features.0-17``)."""
    from ..models.backbones.mobilenetv2 import INVERTED_RESIDUAL_SETTING

    eps = TF_MOBILENET_BN_EPS
    rules = _conv_bn(f"{tf_scope}/Conv", f"{prefix}features.0.0", f"{prefix}features.0.1", eps)
    unit = 0
    for t, _, n, _ in INVERTED_RESIDUAL_SETTING:
        for _ in range(n):
            scope = f"{tf_scope}/expanded_conv" + (f"_{unit}" if unit else "")
            layer = f"{prefix}features.{unit + 1}.conv"
            i = 0
            if t != 1:  # TF creates 'expand' only when it widens the input
                rules += _conv_bn(f"{scope}/expand", f"{layer}.0.0", f"{layer}.0.1", eps)
                i = 1
            rules += _conv_bn(f"{scope}/depthwise", f"{layer}.{i}.0", f"{layer}.{i}.1", eps, depthwise=True)
            rules += _conv_bn(f"{scope}/project", f"{layer}.{i + 1}", f"{layer}.{i + 2}", eps)
            unit += 1
    return rules


def head_rules(*, atrous_branches: int, image_pooling: bool, decoder: bool, separable: bool = True,
               drop_classes: int = 0) -> List[Rule]:
    """Rules for ASPP, the decoder and the classifier, with the reference's names (``model.py``).

    Args:
        atrous_branches: ASPP's 3x3 branches (``len(atrous_rates)``; 0 for MobileNetV2's head).
        image_pooling: ``add_image_level_feature``.
        decoder: ``decoder_output_stride`` set (DeepLabv3+).
        separable: ``aspp_with_separable_conv`` and ``decoder_use_separable_conv`` (the paper's
            Xception models) or regular 3x3 convs (its ResNet-101 rows, Table 3).
        drop_classes: leading logits of the checkpoint our model leaves out (ADE20K).
    """
    eps = TF_HEAD_BN_EPS
    rules: List[Rule] = []
    if image_pooling:
        # model.py:489-493 (extract_features): slim.conv2d(image_feature, depth, 1, scope=IMAGE_POOLING_SCOPE)
        rules += _conv_bn("image_pooling", "aspp.image_pool.conv", "aspp.image_pool.bn", eps)
    # model.py:508-509: slim.conv2d(features, depth, 1, scope=ASPP_SCOPE + str(0))
    rules += _conv_bn("aspp0", "aspp.convs.0.conv", "aspp.convs.0.bn", eps)
    for i in range(1, atrous_branches + 1):
        branch = f"aspp.convs.{i}"
        if separable:
            # model.py:514-521: split_separable_conv2d(features, ..., scope=ASPP_SCOPE + str(i)); core/utils.py:99,107:
            # scope + '_depthwise' (slim.separable_conv2d, num_outputs=None) and scope + '_pointwise'.
            rules += _conv_bn(f"aspp{i}_depthwise", f"{branch}.depthwise.conv", f"{branch}.depthwise.bn", eps,
                              depthwise=True)
            rules += _conv_bn(f"aspp{i}_pointwise", f"{branch}.pointwise.conv", f"{branch}.pointwise.bn", eps)
        else:
            # model.py:523-524: slim.conv2d(features, depth, 3, rate=rate, scope=scope), scope = ASPP_SCOPE + str(i)
            rules += _conv_bn(f"aspp{i}", f"{branch}.conv", f"{branch}.bn", eps)
    # model.py:530-531: slim.conv2d(concat_logits, depth, 1, scope=CONCAT_PROJECTION_SCOPE)
    rules += _conv_bn("concat_projection", "aspp.project.conv", "aspp.project.bn", eps)
    if decoder:
        # model.py:702,729 (refine_by_decoder), under tf.variable_scope(DECODER_SCOPE): the one stage of
        # decoder_output_stride [4] projects its end point with scope 'feature_projection' + str(0).
        rules += _conv_bn("decoder/feature_projection0", "decoder.low_level.conv", "decoder.low_level.bn", eps)
        for j in (0, 1):
            fuse = f"decoder.fuse.{j}"
            if separable:
                # model.py:828-838 (_decoder_with_concat_merge): split_separable_conv2d(..., scope='decoder_conv0'/'1')
                rules += _conv_bn(f"decoder/decoder_conv{j}_depthwise", f"{fuse}.depthwise.conv",
                                  f"{fuse}.depthwise.bn", eps, depthwise=True)
                rules += _conv_bn(f"decoder/decoder_conv{j}_pointwise", f"{fuse}.pointwise.conv",
                                  f"{fuse}.pointwise.bn", eps)
            else:
                # model.py:840-847: slim.repeat(..., 2, slim.conv2d, decoder_depth, 3, scope='decoder_conv' +
                # scope_suffix), scope_suffix '0' (model.py:752); slim.repeat names its convs scope/scope_1, scope/scope_2.
                rules += _conv_bn(f"decoder/decoder_conv0/decoder_conv0_{j + 1}", f"{fuse}.conv", f"{fuse}.bn", eps)
    # model.py:894-908 (get_branch_logits): tf.variable_scope(LOGITS_SCOPE_NAME), slim.conv2d(..., scope=scope_suffix)
    # with scope_suffix the output name 'semantic'; no normaliser, so biases.
    rules.append(Rule("logits/semantic/weights", "classifier.weight", LOGITS_WEIGHT, drop_classes=drop_classes))
    rules.append(Rule("logits/semantic/biases", "classifier.bias", LOGITS_BIAS, drop_classes=drop_classes))
    return rules


def resnet_backbone_for(tf_scope: str, names: Sequence[str]) -> str:
    """``resnet_v1_101`` or ``resnet_v1_101_beta``: the beta root (three 3x3 convs) is ``conv1_1..3``."""
    return f"{tf_scope}_beta" if f"{tf_scope}/conv1_1/weights" in names else tf_scope


def resnet_tf_rules(backbone: str, tf_scope: str, prefix: str = "backbone.") -> List[Rule]:
    """Rules for a TF-layout ResNet (:mod:`deeplab.models.backbones.resnet_tf`): a direct rename."""
    from ..models.backbones.resnet_tf import RESNET_TF_BN_EPS, RESNET_TF_UNITS

    eps = RESNET_TF_BN_EPS
    depth = 50 if backbone.startswith("resnet_v1_50") else 101
    roots = ["conv1_1", "conv1_2", "conv1_3"] if backbone.endswith("_beta") else ["conv1"]
    rules: List[Rule] = []
    for root in roots:
        rules += _conv_bn(f"{tf_scope}/{root}", f"{prefix}{root}.conv", f"{prefix}{root}.bn", eps)
    for b, units in enumerate(RESNET_TF_UNITS[depth], 1):
        for u in range(units):
            scope = f"{tf_scope}/block{b}/unit_{u + 1}/bottleneck_v1"
            # Only the first unit of a block changes the width: the only projection shortcut.
            convs = ("shortcut", "conv1", "conv2", "conv3") if u == 0 else ("conv1", "conv2", "conv3")
            for conv in convs:
                key = f"{prefix}block{b}.{u}.{conv}"
                rules += _conv_bn(f"{scope}/{conv}", f"{key}.conv", f"{key}.bn", eps)
    return rules


def backbone_rules(backbone: str, tf_scope: str, prefix: str = "backbone.") -> List[Rule]:
    if backbone == "mobilenet_v2":
        return mobilenet_v2_rules(tf_scope, prefix)
    if backbone.startswith("resnet_v1_"):
        return resnet_tf_rules(backbone, tf_scope, prefix)
    return xception_rules(backbone, tf_scope, prefix)


def in_model_scopes(tf_name: str, backbone_scope: str) -> bool:
    """Whether a variable lives under the backbone's scope or one of DeepLab's head scopes."""
    top = tf_name.split("/", 1)[0]
    return top == backbone_scope or HEAD_SCOPE_PATTERN.match(top) is not None


# --------------------------------------------------------------------------- ignored variables

# Optimizer slots and training state: never part of the network.
IGNORED_SUFFIXES: Tuple[str, ...] = (
    "/Momentum", "/ExponentialMovingAverage", "/Adam", "/Adam_1", "/RMSProp", "/RMSProp_1",
    "/Adagrad", "/Ftrl", "/Ftrl_1", "/AdamW", "/AdamW_1", "/LARSOptimizer",
)
IGNORED_NAMES: Tuple[str, ...] = ("global_step", "beta1_power", "beta2_power", "_CHECKPOINTABLE_OBJECT_GRAPH")
# Reasons a variable is skipped that the converter reports in its one warning (not part of the network).
TRAINING_STATE = "training state"
SLOT = "optimizer slot / moving-average shadow (the reference evaluates the raw variables)"
OUTSIDE_MODEL = "outside the model's scopes (not under the backbone or head scopes: summaries, counters, ...)"
WARNED_REASONS: Tuple[str, ...] = (TRAINING_STATE, SLOT, OUTSIDE_MODEL)


def ignore_reason(tf_name: str, *, backbone_scope: str, backbone_only: bool) -> Optional[str]:
    """Why a variable is deliberately not used, or ``None`` when it must be used."""
    if tf_name in IGNORED_NAMES:
        return TRAINING_STATE
    if tf_name.endswith(IGNORED_SUFFIXES):
        return SLOT
    if tf_name.startswith(f"{backbone_scope}/logits/"):
        return "ImageNet classifier of the backbone (DeepLab uses the network up to its features)"
    if not in_model_scopes(tf_name, backbone_scope):
        return OUTSIDE_MODEL
    if backbone_only and not tf_name.startswith(f"{backbone_scope}/"):
        return "segmentation head (a backbone file keeps the backbone only)"
    return None

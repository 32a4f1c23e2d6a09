"""The TF reference's DeepLab forward pass in raw TensorFlow ops, for tests (needs TensorFlow).

Written from tensorflow/models ``research/deeplab`` (``model.py``: ``extract_features``,
``refine_by_decoder``, ``get_branch_logits``; ``core/xception.py``; ``core/utils.py``) and slim's
``nets/mobilenet`` (``mobilenet.mobilenet_base``, ``conv_blocks.expanded_conv``, ``V2_DEF``), with
slim's layers spelled out as the TF ops they run in inference:

- ``slim.conv2d`` -> ``tf.nn.conv2d`` (+ ``BatchNorm`` or ``biases``) + activation;
- ``slim.separable_conv2d(x, None, ...)`` -> ``tf.nn.depthwise_conv2d`` (+ ``BatchNorm``);
- ``slim.batch_norm`` (inference) -> ``fused_batch_norm(is_training=False, epsilon)``;
- ``resize_bilinear`` -> ``tf.compat.v1.image.resize_bilinear(align_corners=True)``.

The head follows ``model.py`` in both forms (``separable``: ``split_separable_conv2d`` scopes, else
regular ``aspp{i}`` convs and slim.repeat's ``decoder/decoder_conv0/decoder_conv0_{1,2}``);
:func:`preprocess` is ``feature_extractor._PREPROCESS_FN`` (``_MEAN_RGB`` for the plain ResNets).

Variables are created by name on first use inside nested scopes, like ``tf.variable_scope``,
with seeded random values. So building the network once yields both the reference's variable
set (names and shapes as its code creates them, independent of ``deeplab.tf.names``) and its
output; ``save`` writes them with TensorFlow's own ``Saver``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

XCEPTION_EPS = 1e-3  # xception_arg_scope as feature_extractor calls it
MOBILENET_EPS = 1e-3  # slim.batch_norm default; mobilenet's training_scope sets none
HEAD_EPS = 1e-5  # model.py batch_norm_params
RESNET_EPS = 1e-5  # resnet_utils.resnet_arg_scope(batch_norm_epsilon=1e-5), as feature_extractor calls it
# resnet_v1_beta.py: (base_depth, num_units, stride) of block1..block4 (block4: unit_rate = multi_grid).
RESNET_BLOCKS = {
    "resnet_v1_50": [(64, 3, 2), (128, 4, 2), (256, 6, 2), (512, 3, 1)],
    "resnet_v1_101": [(64, 3, 2), (128, 4, 2), (256, 23, 2), (512, 3, 1)],
}
RESNET_DECODER_END_POINT = "block1/unit_2/bottleneck_v1/conv3"  # feature_extractor, every resnet_v1*


# feature_extractor.py: "# Mean pixel value." _MEAN_RGB, subtracted from 0..255 pixels by
# _preprocess_subtract_imagenet_mean, the preprocess_fn of the plain resnet_v1_50/101 (_PREPROCESS_FN).
MEAN_RGB = (123.15, 115.90, 103.06)


def preprocess(tf, pixels, model_variant: str):
    """``feature_extractor._PREPROCESS_FN[model_variant]`` on NHWC pixels in 0..255: the plain
    ``resnet_v1_50/101`` subtract ``_MEAN_RGB`` (``_preprocess_subtract_imagenet_mean``); every other
    variant of ours (``*_beta``, ``xception_*``, ``mobilenet_v2``) maps to [-1, 1]
    (``_preprocess_zero_mean_unit_range``: ``(2.0 / 255.0) * inputs - 1.0``)."""
    if model_variant in ("resnet_v1_50", "resnet_v1_101"):
        return pixels - tf.reshape(tf.constant(MEAN_RGB, dtype=pixels.dtype), [1, 1, 1, 3])
    return (2.0 / 255.0) * pixels - 1.0


def scale_dimension(dim: int, scale: float) -> int:
    """``core/utils.scale_dimension``."""
    return int((float(dim) - 1.0) * scale + 1.0)


# (scope, depth_list, skip_connection_type, activation_fn_in_separable_conv, num_units, stride)
XCEPTION_BLOCKS: Dict[str, List[Tuple[str, Sequence[int], str, bool, int, int]]] = {
    "xception_65": [
        ("entry_flow/block1", [128, 128, 128], "conv", False, 1, 2),
        ("entry_flow/block2", [256, 256, 256], "conv", False, 1, 2),
        ("entry_flow/block3", [728, 728, 728], "conv", False, 1, 2),
        ("middle_flow/block1", [728, 728, 728], "sum", False, 16, 1),
        ("exit_flow/block1", [728, 1024, 1024], "conv", False, 1, 2),
        ("exit_flow/block2", [1536, 1536, 2048], "none", True, 1, 1),
    ],
    "xception_41": [
        ("entry_flow/block1", [128, 128, 128], "conv", False, 1, 2),
        ("entry_flow/block2", [256, 256, 256], "conv", False, 1, 2),
        ("entry_flow/block3", [728, 728, 728], "conv", False, 1, 2),
        ("middle_flow/block1", [728, 728, 728], "sum", False, 8, 1),
        ("exit_flow/block1", [728, 1024, 1024], "conv", False, 1, 2),
        ("exit_flow/block2", [1536, 1536, 2048], "none", True, 1, 1),
    ],
    "xception_71": [
        ("entry_flow/block1", [128, 128, 128], "conv", False, 1, 2),
        ("entry_flow/block2", [256, 256, 256], "conv", False, 1, 1),
        ("entry_flow/block3", [256, 256, 256], "conv", False, 1, 2),
        ("entry_flow/block4", [728, 728, 728], "conv", False, 1, 1),
        ("entry_flow/block5", [728, 728, 728], "conv", False, 1, 2),
        ("middle_flow/block1", [728, 728, 728], "sum", False, 16, 1),
        ("exit_flow/block1", [728, 1024, 1024], "conv", False, 1, 2),
        ("exit_flow/block2", [1536, 1536, 2048], "none", True, 1, 1),
    ],
}
# The decoder's low-level end point of each Xception (feature_extractor.networks_to_feature_maps).
XCEPTION_DECODER_END_POINT = {
    "xception_41": "entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise",
    "xception_65": "entry_flow/block2/unit_1/xception_module/separable_conv2_pointwise",
    "xception_71": "entry_flow/block3/unit_1/xception_module/separable_conv2_pointwise",
}
# V2_DEF spec after the first conv: (expansion, outputs, stride).
MOBILENET_V2_SPEC = [(1, 16, 1)] + [(6, 24, 2), (6, 24, 1)] + [(6, 32, 2)] + [(6, 32, 1)] * 2 + [(6, 64, 2)] + \
    [(6, 64, 1)] * 3 + [(6, 96, 1)] * 3 + [(6, 160, 2)] + [(6, 160, 1)] * 2 + [(6, 320, 1)]


def make_divisible(v: float, divisor: int, min_value: Optional[int] = None) -> int:
    """``conv_blocks._make_divisible``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ReferenceNet:
    """Builds reference networks with TF ops, creating variables on first use.

    Args:
        tf: the ``tensorflow`` module.
        seed: seed of the variables' random values.
    """

    def __init__(self, tf, seed: int = 0, dtype: str = "float32",
                 initializer: Optional[Callable[[str, Tuple[int, ...]], np.ndarray]] = None) -> None:
        self.tf = tf
        self.dtype = dtype  # float64 only to separate rounding from real differences
        self.initializer = initializer  # (name, shape) -> values (None: the seeded default)
        self.rng = np.random.default_rng(seed)
        self.values: Dict[str, np.ndarray] = {}
        self._scope: List[str] = []
        self._uniquify: Dict[str, int] = {}

    # ---------------------------------------------------------------- variables

    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def unique(self, default_name: str) -> str:
        """``tf.variable_scope(None, default_name=...)``: name, name_1, name_2, ..."""
        key = "/".join(self._scope + [default_name])
        count = self._uniquify.get(key, 0)
        self._uniquify[key] = count + 1
        return default_name if count == 0 else f"{default_name}_{count}"

    def var(self, leaf: str, shape: Sequence[int], init: Callable[[Tuple[int, ...]], np.ndarray]):
        name = "/".join(self._scope + [leaf])
        shape = tuple(int(s) for s in shape)
        if name not in self.values:
            values = None if self.initializer is None else self.initializer(name, shape)
            self.values[name] = np.asarray(init(shape) if values is None else values, dtype=np.float32)
        assert self.values[name].shape == shape, (name, self.values[name].shape, shape)
        return self.tf.constant(self.values[name].astype(self.dtype))

    def _he(self, fan_in: int) -> Callable[[Tuple[int, ...]], np.ndarray]:
        return lambda shape: self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)

    # ---------------------------------------------------------------- slim layers as TF ops

    def batch_norm(self, x, eps: float):
        tf = self.tf
        c = int(x.shape[-1])
        # Moving variance near the mean square of what the layer sees the first time, so
        # activations stay O(1) through 65 layers and every branch matters; moving mean small
        # against it, so BatchNorm does not cancel large values (which would amplify rounding).
        # (+0.1: the image-pooling BatchNorm sees one value per channel.)
        seen = x.numpy().reshape(-1, c).astype(np.float64)
        rms = np.sqrt((seen ** 2).mean(0) + 0.1)
        with self.scope("BatchNorm"):
            gamma = self.var("gamma", [c], lambda s: self.rng.uniform(0.5, 1.5, s))
            beta = self.var("beta", [c], lambda s: self.rng.normal(0.0, 0.2, s))
            mean = self.var("moving_mean", [c], lambda s: self.rng.normal(0.0, 0.2, s) * rms)
            variance = self.var("moving_variance", [c], lambda s: rms ** 2 * self.rng.uniform(0.5, 2.0, s))
        if self.dtype != "float32":  # fused_batch_norm is float32-only; same formula
            return tf.nn.batch_normalization(x, mean, variance, beta, gamma, eps)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, mean, variance, epsilon=eps, is_training=False)
        return y

    def conv2d(self, x, cout: int, k: int, scope: str, *, stride: int = 1, rate: int = 1, padding: str = "SAME",
               bn_eps: Optional[float] = None, act=None, bias: bool = False):
        tf = self.tf
        cin = int(x.shape[-1])
        with self.scope(scope):
            w = self.var("weights", [k, k, cin, cout], self._he(k * k * cin))
            y = tf.nn.conv2d(x, w, strides=stride, padding=padding, dilations=rate)
            if bn_eps is not None:
                y = self.batch_norm(y, bn_eps)
            if bias:
                y = y + self.var("biases", [cout], lambda s: self.rng.normal(0.0, 0.1, s))
        return act(y) if act is not None else y

    def depthwise(self, x, k: int, scope: str, *, stride: int = 1, rate: int = 1, padding: str = "SAME",
                  bn_eps: float, act=None):
        tf = self.tf
        cin = int(x.shape[-1])
        with self.scope(scope):
            w = self.var("depthwise_weights", [k, k, cin, 1], self._he(k * k))
            y = tf.nn.depthwise_conv2d(x, w, strides=[1, stride, stride, 1], padding=padding, dilations=[rate, rate])
            y = self.batch_norm(y, bn_eps)
        return act(y) if act is not None else y

    def fixed_padding(self, x, k: int, rate: int = 1):
        effective = k + (k - 1) * (rate - 1)
        total = effective - 1
        beg = total // 2
        return self.tf.pad(x, [[0, 0], [beg, total - beg], [beg, total - beg], [0, 0]])

    def resize_bilinear(self, x, size: Sequence[int]):
        y = self.tf.compat.v1.image.resize_bilinear(x, [int(size[0]), int(size[1])], align_corners=True)
        return self.tf.cast(y, x.dtype)  # utils.resize_bilinear casts back (TF's op returns float32)

    # ---------------------------------------------------------------- backbones

    def xception_module(self, x, depth_list, skip, stride, rate, unit_rates, act_in_sep, end_points, name):
        tf = self.tf
        with self.scope("xception_module"):
            residual = x
            for i in range(3):
                if act_in_sep:
                    act = tf.nn.relu
                else:
                    act = None
                    residual = tf.nn.relu(residual)
                s = stride if i == 2 else 1
                r = rate * unit_rates[i]
                if s == 1:
                    inp, padding = residual, "SAME"
                else:  # separable_conv2d_same with use_explicit_padding
                    inp, padding = self.fixed_padding(residual, 3, r), "VALID"
                residual = self.depthwise(inp, 3, f"separable_conv{i + 1}_depthwise", stride=s, rate=r,
                                          padding=padding, bn_eps=XCEPTION_EPS, act=act)
                residual = self.conv2d(residual, depth_list[i], 1, f"separable_conv{i + 1}_pointwise",
                                       bn_eps=XCEPTION_EPS, act=act)
                end_points[f"{name}/xception_module/separable_conv{i + 1}_pointwise"] = residual
            if skip == "conv":
                shortcut = self.conv2d(x, depth_list[-1], 1, "shortcut", stride=stride, bn_eps=XCEPTION_EPS)
                return residual + shortcut
            if skip == "sum":
                return residual + x
            return residual

    def xception(self, images, variant: str, output_stride: int, multi_grid: Sequence[int] = (1, 1, 1)):
        tf = self.tf
        end_points: Dict[str, object] = {}
        with self.scope(variant):
            target = output_stride // 2  # the stem's stride 2 is taken out first
            x = self.fixed_padding(images, 3)
            x = self.conv2d(x, 32, 3, "entry_flow/conv1_1", stride=2, padding="VALID", bn_eps=XCEPTION_EPS,
                            act=tf.nn.relu)
            x = self.conv2d(x, 64, 3, "entry_flow/conv1_2", bn_eps=XCEPTION_EPS, act=tf.nn.relu)
            current, rate = 1, 1
            for block, depth_list, skip, act_in_sep, units, stride in XCEPTION_BLOCKS[variant]:
                unit_rates = multi_grid if block == "exit_flow/block2" else (1, 1, 1)
                for u in range(units):
                    name = f"{block}/unit_{u + 1}"
                    with self.scope(block), self.scope(f"unit_{u + 1}"):
                        if current == target:
                            x = self.xception_module(x, depth_list, skip, 1, rate, unit_rates, act_in_sep,
                                                     end_points, name)
                            rate *= stride
                        else:
                            x = self.xception_module(x, depth_list, skip, stride, 1, unit_rates, act_in_sep,
                                                     end_points, name)
                            current *= stride
        return x, end_points[XCEPTION_DECODER_END_POINT[variant]]

    def expanded_conv(self, x, expansion: int, outputs: int, stride: int, rate: int):
        tf = self.tf
        with self.scope(self.unique("expanded_conv")):
            inp = x
            cin = int(x.shape[-1])
            inner = make_divisible(cin * expansion, 1 if expansion == 1 else 8)
            if inner > cin:
                x = self.conv2d(x, inner, 1, "expand", bn_eps=MOBILENET_EPS, act=tf.nn.relu6)
            x = self.depthwise(x, 3, "depthwise", stride=stride, rate=rate, bn_eps=MOBILENET_EPS, act=tf.nn.relu6)
            x = self.conv2d(x, outputs, 1, "project", bn_eps=MOBILENET_EPS, act=None)
            if stride == 1 and outputs == cin:
                x = x + inp
        return x

    def mobilenet_v2(self, images, output_stride: int):
        tf = self.tf
        with self.scope("MobilenetV2"):
            current, rate = 1, 1
            layers = [("conv", 0, 32, 2)] + [("expanded", t, c, s) for t, c, s in MOBILENET_V2_SPEC]
            x = images
            for kind, t, c, stride in layers:
                if current == output_stride:
                    layer_stride, layer_rate = 1, rate
                    rate *= stride
                else:
                    layer_stride, layer_rate = stride, 1
                    current *= stride
                if kind == "conv":
                    x = self.conv2d(x, c, 3, "Conv", stride=layer_stride, rate=layer_rate, bn_eps=MOBILENET_EPS,
                                    act=tf.nn.relu6)
                else:
                    x = self.expanded_conv(x, t, c, layer_stride, layer_rate)
        return x, None

    def conv2d_same(self, x, cout: int, k: int, stride: int, rate: int, scope: str, act=None):
        """``resnet_utils.conv2d_same`` (+ BatchNorm, + activation): SAME at stride 1, else explicit padding."""
        if stride == 1:
            return self.conv2d(x, cout, k, scope, rate=rate, bn_eps=RESNET_EPS, act=act)
        return self.conv2d(self.fixed_padding(x, k, rate), cout, k, scope, stride=stride, rate=rate, padding="VALID",
                           bn_eps=RESNET_EPS, act=act)

    def bottleneck(self, x, depth: int, depth_bottleneck: int, stride: int, rate: int, end_points, name: str):
        """``resnet_v1_beta.bottleneck`` (slim's ``bottleneck_v1`` with ``unit_rate`` folded into ``rate``)."""
        tf = self.tf
        with self.scope("bottleneck_v1"):
            if depth == int(x.shape[-1]):
                # resnet_utils.subsample: max_pool2d([1, 1], stride) - every stride-th pixel.
                shortcut = x if stride == 1 else tf.nn.max_pool2d(x, 1, stride, "SAME")
            else:
                shortcut = self.conv2d(x, depth, 1, "shortcut", stride=stride, bn_eps=RESNET_EPS)
            residual = self.conv2d(x, depth_bottleneck, 1, "conv1", bn_eps=RESNET_EPS, act=tf.nn.relu)
            residual = self.conv2d_same(residual, depth_bottleneck, 3, stride, rate, "conv2", act=tf.nn.relu)
            residual = self.conv2d(residual, depth, 1, "conv3", bn_eps=RESNET_EPS)
            end_points[f"{name}/bottleneck_v1/conv3"] = residual
            return tf.nn.relu(shortcut + residual)

    def resnet_v1(self, images, variant: str, *, beta: bool, output_stride: int,
                  multi_grid: Sequence[int] = (1, 1, 1)):
        """``resnet_v1_beta.resnet_v1_beta`` (``beta``: ``root_block_fn_for_beta_variant``) with
        ``resnet_utils.stack_blocks_dense``; returns ``(block4 output, the decoder's end point)``."""
        tf = self.tf
        end_points: Dict[str, object] = {}
        with self.scope(variant):
            if beta:
                x = self.conv2d_same(images, 64, 3, 2, 1, "conv1_1", act=tf.nn.relu)
                x = self.conv2d_same(x, 64, 3, 1, 1, "conv1_2", act=tf.nn.relu)
                x = self.conv2d_same(x, 128, 3, 1, 1, "conv1_3", act=tf.nn.relu)
            else:
                x = self.conv2d_same(images, 64, 7, 2, 1, "conv1", act=tf.nn.relu)
            x = tf.nn.max_pool2d(x, 3, 2, "SAME")  # pool1
            target, current, rate = output_stride // 4, 1, 1
            for b, (base, units, block_stride) in enumerate(RESNET_BLOCKS[variant]):
                for i in range(units):
                    name = f"block{b + 1}/unit_{i + 1}"
                    stride = block_stride if i == units - 1 else 1
                    unit_rate = multi_grid[i] if b == 3 else 1
                    with self.scope(f"block{b + 1}"), self.scope(f"unit_{i + 1}"):
                        if current == target:
                            x = self.bottleneck(x, base * 4, base, 1, rate * unit_rate, end_points, name)
                            rate *= stride
                        else:
                            x = self.bottleneck(x, base * 4, base, stride, unit_rate, end_points, name)
                            current *= stride
        return x, end_points[RESNET_DECODER_END_POINT]

    # ---------------------------------------------------------------- DeepLab

    def deeplab(self, images, *, backbone: str, num_classes: int, output_stride: int = 16,
                atrous_rates: Sequence[int] = (6, 12, 18), decoder: bool = True, image_pooling: bool = True,
                crop_size: Optional[Sequence[int]] = None, multi_grid: Sequence[int] = (1, 1, 1),
                separable: bool = True):
        """Logits ``(B, H, W, classes)`` at the input size, as ``predict_labels`` computes them
        (``prediction_with_upsampled_logits``), for NHWC ``images`` already preprocessed (see
        :func:`preprocess`).

        ``backbone``: a ``model_variant`` (``xception_65``, ``MobilenetV2``, ``resnet_v1_101_beta``,
        ``resnet_v1_50``, ...). ``separable``: ``aspp_with_separable_conv`` and
        ``decoder_use_separable_conv`` (model.py ``extract_features``: ``split_separable_conv2d``
        under ``aspp{i}`` or ``slim.conv2d(features, depth, 3, rate=rate, scope=aspp{i})``;
        ``_decoder_with_concat_merge``: ``split_separable_conv2d`` under ``decoder_conv0/1`` or
        ``slim.repeat(..., 2, slim.conv2d, depth, 3, scope='decoder_conv0')``, whose convs slim
        names ``decoder_conv0/decoder_conv0_1`` and ``decoder_conv0/decoder_conv0_2``).
        """
        tf = self.tf
        h, w = int(images.shape[1]), int(images.shape[2])
        crop = (h, w) if crop_size is None else tuple(crop_size)
        if backbone == "MobilenetV2":
            features, low_level = self.mobilenet_v2(images, output_stride)
        elif backbone.startswith("resnet_v1_"):
            variant = backbone.replace("_beta", "")  # feature_extractor.name_scope: the beta keeps the scope
            features, low_level = self.resnet_v1(images, variant, beta=backbone.endswith("_beta"),
                                                 output_stride=output_stride, multi_grid=multi_grid)
        else:
            features, low_level = self.xception(images, backbone, output_stride, multi_grid)
        relu = tf.nn.relu
        branches = []
        if image_pooling:
            ph, pw = scale_dimension(crop[0], 1.0 / output_stride), scale_dimension(crop[1], 1.0 / output_stride)
            pooled = tf.nn.avg_pool2d(features, [ph, pw], strides=1, padding="VALID")
            pooled = self.conv2d(pooled, 256, 1, "image_pooling", bn_eps=HEAD_EPS, act=relu)
            branches.append(self.resize_bilinear(pooled, [ph, pw]))
        branches.append(self.conv2d(features, 256, 1, "aspp0", bn_eps=HEAD_EPS, act=relu))
        for i, rate in enumerate(atrous_rates, 1):
            if separable:
                y = self.depthwise(features, 3, f"aspp{i}_depthwise", rate=rate, bn_eps=HEAD_EPS, act=relu)
                branches.append(self.conv2d(y, 256, 1, f"aspp{i}_pointwise", bn_eps=HEAD_EPS, act=relu))
            else:
                branches.append(self.conv2d(features, 256, 3, f"aspp{i}", rate=rate, bn_eps=HEAD_EPS, act=relu))
        x = self.conv2d(tf.concat(branches, 3), 256, 1, "concat_projection", bn_eps=HEAD_EPS, act=relu)
        if decoder:
            with self.scope("decoder"):
                low = self.conv2d(low_level, 48, 1, "feature_projection0", bn_eps=HEAD_EPS, act=relu)
                size = [scale_dimension(crop[0], 0.25), scale_dimension(crop[1], 0.25)]
                y = tf.concat([self.resize_bilinear(x, size), self.resize_bilinear(low, size)], 3)
                if separable:
                    for j in (0, 1):
                        y = self.depthwise(y, 3, f"decoder_conv{j}_depthwise", bn_eps=HEAD_EPS, act=relu)
                        y = self.conv2d(y, 256, 1, f"decoder_conv{j}_pointwise", bn_eps=HEAD_EPS, act=relu)
                else:
                    with self.scope("decoder_conv0"):  # slim.repeat: scope/scope_1, scope/scope_2
                        for j in (1, 2):
                            y = self.conv2d(y, 256, 3, f"decoder_conv0_{j}", bn_eps=HEAD_EPS, act=relu)
                x = y
        with self.scope("logits"):
            logits = self.conv2d(x, num_classes, 1, "semantic", bias=True)
        return self.resize_bilinear(logits, [h, w])

    # ---------------------------------------------------------------- writing

    def save(self, prefix: str, extra: Optional[Dict[str, np.ndarray]] = None) -> str:
        """Write every variable (plus ``extra`` tensors) with TF1's ``Saver``; returns the prefix."""
        tf = self.tf
        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        tensors = dict(self.values)
        tensors.update(extra or {})
        variables = {name: tf.Variable(value, name=name.replace("/", "_")) for name, value in tensors.items()}
        saver = tf.compat.v1.train.Saver(var_list=variables)
        return saver.save(None, prefix)


def imagenet_logits(net: ReferenceNet, variant: str, num_classes: int = 1001) -> None:
    """The ImageNet classifier of the reference's Xception (``VARIANT/logits``, 1x1 conv with biases)."""
    with net.scope(variant), net.scope("logits"):
        net.var("weights", [1, 1, 2048, num_classes], net._he(2048))
        net.var("biases", [num_classes], lambda s: np.zeros(s))


# --------------------------------------------------------------------------- everything the slow tests need

LAYER_CASES = {
    "strided_same": [8, 9, 16, 17],
    "xception_strided": [8, 9],
    "atrous_separable": [1, 6, 12],
    "resize": [((5, 5), (17, 17)), ((33, 33), (129, 129)), ((4, 7), (13, 26)), ((17, 17), (9, 9)), ((1, 1), (33, 33))],
    "image_pooling": [(513, 16), (385, 16), (513, 8)],
}


def _bn_values(rng: np.random.Generator, c: int) -> Dict[str, np.ndarray]:
    return {
        "gamma": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "beta": rng.normal(0, 0.2, c).astype(np.float32),
        "moving_mean": rng.normal(0, 0.2, c).astype(np.float32),
        "moving_variance": rng.uniform(0.5, 2.0, c).astype(np.float32),
    }


def layer_cases(tf) -> Dict[str, np.ndarray]:
    """Inputs, TF-layout weights and TF's float32 outputs of single layers (keys ``case/what``)."""
    out: Dict[str, np.ndarray] = {}

    def bn(x, values, eps):
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, values["gamma"], values["beta"], values["moving_mean"],
                                                   values["moving_variance"], epsilon=eps, is_training=False)
        return y

    def put(prefix: str, **arrays) -> None:
        for key, value in arrays.items():
            if isinstance(value, dict):
                for leaf, v in value.items():
                    out[f"{prefix}/{key}/{leaf}"] = np.asarray(v)
            else:
                out[f"{prefix}/{key}"] = np.asarray(value)

    for size in LAYER_CASES["strided_same"]:
        rng = np.random.default_rng(size)
        x = rng.standard_normal((1, size, size + 1, 8)).astype(np.float32)  # an even and an odd side
        w = (rng.standard_normal((3, 3, 8, 16)) * 0.3).astype(np.float32)
        wd = (rng.standard_normal((3, 3, 8, 1)) * 0.3).astype(np.float32)
        b, bd = _bn_values(rng, 16), _bn_values(rng, 8)
        conv = tf.nn.relu6(bn(tf.nn.conv2d(x, w, strides=2, padding="SAME"), b, MOBILENET_EPS))
        dw = tf.nn.relu6(bn(tf.nn.depthwise_conv2d(x, wd, [1, 2, 2, 1], "SAME"), bd, MOBILENET_EPS))
        put(f"strided_same_{size}", x=x, w=w, wd=wd, bn=b, bnd=bd, conv=conv.numpy(), dw=dw.numpy())
    for size in LAYER_CASES["xception_strided"]:
        rng = np.random.default_rng(100 + size)
        x = rng.standard_normal((1, size, size, 8)).astype(np.float32)
        wd = (rng.standard_normal((3, 3, 8, 1)) * 0.3).astype(np.float32)
        wp = (rng.standard_normal((1, 1, 8, 12)) * 0.3).astype(np.float32)
        bd, bp = _bn_values(rng, 8), _bn_values(rng, 12)
        padded = tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])  # xception.fixed_padding(kernel 3, rate 1)
        y = bn(tf.nn.depthwise_conv2d(padded, wd, [1, 2, 2, 1], "VALID"), bd, XCEPTION_EPS)
        y = bn(tf.nn.conv2d(y, wp, 1, "SAME"), bp, XCEPTION_EPS)
        put(f"xception_strided_{size}", x=x, wd=wd, wp=wp, bnd=bd, bnp=bp, out=y.numpy())
    for rate in LAYER_CASES["atrous_separable"]:
        rng = np.random.default_rng(200 + rate)
        x = rng.standard_normal((2, 17, 13, 16)).astype(np.float32)
        wd = (rng.standard_normal((3, 3, 16, 1)) * 0.3).astype(np.float32)
        wp = (rng.standard_normal((1, 1, 16, 24)) * 0.3).astype(np.float32)
        bd, bp = _bn_values(rng, 16), _bn_values(rng, 24)
        # model.py's split_separable_conv2d: depthwise (rate, SAME) -> BN -> ReLU -> 1x1 -> BN -> ReLU.
        y = tf.nn.relu(bn(tf.nn.depthwise_conv2d(x, wd, [1, 1, 1, 1], "SAME", dilations=[rate, rate]), bd, HEAD_EPS))
        y = tf.nn.relu(bn(tf.nn.conv2d(y, wp, 1, "SAME"), bp, HEAD_EPS))
        put(f"atrous_separable_{rate}", x=x, wd=wd, wp=wp, bnd=bd, bnp=bp, out=y.numpy())
    for i, (src, dst) in enumerate(LAYER_CASES["resize"]):
        x = np.random.default_rng(300 + i).standard_normal((2, *src, 3)).astype(np.float32)
        put(f"resize_{i}", x=x, out=tf.compat.v1.image.resize_bilinear(x, dst, align_corners=True).numpy())
    for crop, output_stride in LAYER_CASES["image_pooling"]:
        rng = np.random.default_rng(crop + output_stride)
        side = scale_dimension(crop, 1.0 / output_stride)  # the feature map of a crop-sized input
        features = rng.standard_normal((1, side, side, 32)).astype(np.float32)
        w = (rng.standard_normal((1, 1, 32, 16)) * 0.3).astype(np.float32)
        b = _bn_values(rng, 16)
        # model.py with crop_size: avg_pool2d over a [crop / OS] window (VALID), conv, BN, ReLU, resize.
        pooled = tf.nn.avg_pool2d(features, [side, side], strides=1, padding="VALID")
        y = tf.nn.relu(bn(tf.nn.conv2d(pooled, w, 1, "SAME"), b, HEAD_EPS))
        y = tf.compat.v1.image.resize_bilinear(y, [side, side], align_corners=True)
        put(f"image_pooling_{crop}_{output_stride}", x=features, w=w, bn=b, out=y.numpy())
    return out


def _slots(net: ReferenceNet, names: Sequence[str]) -> Dict[str, np.ndarray]:
    """What a training checkpoint carries besides the variables."""
    extra: Dict[str, np.ndarray] = {"global_step": np.int64(30000)}
    for name in names:
        extra[f"{name}/Momentum"] = np.zeros_like(net.values[name])
        extra[f"{name}/ExponentialMovingAverage"] = net.values[name] * 0.5
    return extra


def _f64(tf, net: ReferenceNet) -> ReferenceNet:
    """The same variables, computed in float64 (TF's bilinear resize still rounds to float32)."""
    return ReferenceNet(tf, dtype="float64", initializer=lambda name, shape: net.values[name])


def _image(seed: int, size: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (1, size, size, 3)).astype(dtype)


def generate(out_dir: str) -> None:
    """Write checkpoints (TF's Saver) and TF's outputs for tests/tf/test_convert_tf.py into ``out_dir``.

    Runs in its own process, so TensorFlow never shares a process (threads, fork) with the test run.
    """
    import hashlib
    import json

    import tensorflow as tf

    out = Path(out_dir)
    refs: Dict[str, np.ndarray] = {}

    # Xception-65 DeepLabv3+ for VOC, with training leftovers.
    net = ReferenceNet(tf, seed=0)
    refs["xception_voc/image"] = _image(1, 49)
    refs["xception_voc/logits"] = net.deeplab(tf.constant(refs["xception_voc/image"]), backbone="xception_65",
                                              num_classes=21).numpy()
    extra = _slots(net, ["aspp0/weights", "xception_65/entry_flow/conv1_1/weights", "logits/semantic/biases"])
    prefix = net.save(str(out / "xception_voc" / "model.ckpt-30000"), extra=extra)
    f64 = _f64(tf, net)
    for size, output_stride, rates in ((33, 16, (6, 12, 18)), (34, 8, (12, 24, 36))):
        image = _image(size, size, np.float64)
        refs[f"xception_voc/f64_{size}_{output_stride}/image"] = image
        refs[f"xception_voc/f64_{size}_{output_stride}/logits"] = f64.deeplab(
            tf.constant(image), backbone="xception_65", num_classes=21, output_stride=output_stride,
            atrous_rates=rates).numpy()
    # What TensorFlow's own reader returns, for comparison with ours.
    reader = tf.train.load_checkpoint(prefix)
    listing = {}
    for name, shape in reader.get_variable_to_shape_map().items():
        value = np.asarray(reader.get_tensor(name))
        listing[name] = {"shape": list(shape), "dtype": str(value.dtype),
                         "sha256": hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()}
    (out / "xception_voc" / "tf_reader.json").write_text(json.dumps(listing))
    (out / "xception_voc" / "variables.json").write_text(json.dumps(sorted(net.values)))
    (out / "xception_voc" / "extra.json").write_text(json.dumps(sorted(extra)))

    # MobileNetV2 DeepLabv3 for Cityscapes (19 classes).
    net = ReferenceNet(tf, seed=7)
    net.deeplab(tf.constant(_image(0, 64)), backbone="MobilenetV2", num_classes=19, atrous_rates=(), decoder=False)
    net.save(str(out / "mnv2_cityscapes" / "model.ckpt-90000"), extra=_slots(net, ["MobilenetV2/Conv/weights"]))
    (out / "mnv2_cityscapes" / "variables.json").write_text(json.dumps(sorted(net.values)))
    for size, output_stride in ((64, 16), (65, 16), (66, 8), (63, 32)):
        f64 = _f64(tf, net)
        image = _image(size, size, np.float64)
        refs[f"mnv2/{size}_{output_stride}/image"] = image
        refs[f"mnv2/{size}_{output_stride}/logits"] = f64.deeplab(
            tf.constant(image), backbone="MobilenetV2", num_classes=19, output_stride=output_stride, atrous_rates=(),
            decoder=False).numpy()

    # ADE20K: 151 logits.
    net = ReferenceNet(tf, seed=3)
    net.deeplab(tf.constant(_image(4, 33)), backbone="MobilenetV2", num_classes=151, atrous_rates=(), decoder=False)
    net.save(str(out / "mnv2_ade20k" / "model.ckpt"))
    refs["ade20k/image"] = _image(4, 33, np.float64)
    refs["ade20k/logits"] = _f64(tf, net).deeplab(tf.constant(refs["ade20k/image"]), backbone="MobilenetV2",
                                                  num_classes=151, atrous_rates=(), decoder=False).numpy()

    # ImageNet Xception backbones (with their 1001-class classifier).
    for variant in ("xception_41", "xception_65", "xception_71"):
        net = ReferenceNet(tf, seed=11)
        net.xception(tf.constant(_image(5, 25)), variant, output_stride=16)
        imagenet_logits(net, variant)
        net.save(str(out / f"imagenet_{variant}" / "model.ckpt"), extra={"global_step": np.int64(1)})
        image = _image(5, 25, np.float64)
        features, low_level = _f64(tf, net).xception(tf.constant(image), variant, output_stride=16)
        refs[f"imagenet_{variant}/image"] = image
        refs[f"imagenet_{variant}/out"] = features.numpy()
        refs[f"imagenet_{variant}/low_level"] = low_level.numpy()

    refs.update(layer_cases(tf))
    np.savez(out / "refs.npz", **refs)


def generate_resnet(out_dir: str) -> None:
    """Write a ``resnet_v1_101_beta`` and a ``resnet_v1_50`` ImageNet checkpoint (TF's Saver) with
    training leftovers, and TF's float64 features, for tests/models/test_resnet_tf.py (its own process)."""
    import tensorflow as tf

    out = Path(out_dir)
    refs: Dict[str, np.ndarray] = {}
    for variant, beta, seed in (("resnet_v1_101", True, 21), ("resnet_v1_50", False, 22)):
        key = variant + ("_beta" if beta else "")
        net = ReferenceNet(tf, seed=seed)
        net.resnet_v1(tf.constant(_image(seed, 33)), variant, beta=beta, output_stride=16)
        with net.scope(variant), net.scope("logits"):  # the ImageNet classifier the tarballs carry
            net.var("weights", [1, 1, 2048, 1000], net._he(2048))
            net.var("biases", [1000], lambda s: np.zeros(s))
        first = f"{variant}/{'conv1_1' if beta else 'conv1'}/weights"
        extra = {"global_step": np.int64(1), "beta1_power": np.float32(0.9), "summaries/x": np.zeros(2, np.float32),
                 f"{first}/ExponentialMovingAverage": net.values[first],
                 f"{variant}/block1/unit_1/bottleneck_v1/conv1/weights/Momentum": np.zeros_like(
                     net.values[f"{variant}/block1/unit_1/bottleneck_v1/conv1/weights"])}
        net.save(str(out / key / "model.ckpt"), extra=extra)
        f64 = _f64(tf, net)
        # Odd and even sizes (TF's asymmetric SAME max pool), OS 16 and OS 8 with multi-grid.
        for size, output_stride, grid in ((33, 16, (1, 1, 1)), (34, 8, (1, 2, 4)), (35, 32, (1, 1, 1))):
            image = _image(size, size, np.float64)
            features, low_level = f64.resnet_v1(tf.constant(image), variant, beta=beta, output_stride=output_stride,
                                                multi_grid=grid)
            tag = f"{key}/{size}_{output_stride}"
            refs[f"{tag}/image"] = image
            refs[f"{tag}/out"] = features.numpy()
            refs[f"{tag}/low_level"] = low_level.numpy()
    np.savez(out / "refs.npz", **refs)


# Every head combination model.py builds, on our backbones (tests/test_convert_tf.py::test_head_combination...):
# (tag, model_variant, classes, separable, atrous_rates, decoder, image_pooling, multi_grid, output_stride)
HEAD_CASES = [
    # The paper's Table 3 ResNet row: regular ASPP and decoder (slim.repeat names), multi-grid (1, 2, 4).
    ("r101b_v3p_regular", "resnet_v1_101_beta", 21, False, (6, 12, 18), True, True, (1, 2, 4), 16),
    # Plain resnet_v1_50 (its own input mean), regular ASPP, no image pooling, no decoder.
    ("r50_v3_regular_nopool", "resnet_v1_50", 19, False, (6, 12, 18), False, False, (1, 1, 1), 16),
    # Plain resnet_v1_101 DeepLabv3+ with separable convs, OS 8.
    ("r101_v3p_separable_os8", "resnet_v1_101", 5, True, (12, 24, 36), True, True, (1, 2, 1), 8),
    # Xception-41 with a regular decoder and no image pooling.
    ("x41_v3p_regular_nopool", "xception_41", 7, False, (6, 12, 18), True, False, (1, 1, 1), 16),
    # MobileNetV2 with ASPP 3x3 branches (separable) and with regular ones.
    ("mnv2_v3_separable_rates", "MobilenetV2", 21, True, (6, 12, 18), False, True, (1, 1, 1), 16),
    ("mnv2_v3_regular_rates_nopool", "MobilenetV2", 21, False, (6, 12, 18), False, False, (1, 1, 1), 16),
]


def generate_heads(out_dir: str) -> None:
    """For each of :data:`HEAD_CASES`: a checkpoint (TF's Saver, with ``global_step``), the raw
    0..255 image and TensorFlow's float64 logits of the reference's preprocessing + network."""
    import json

    import tensorflow as tf

    out = Path(out_dir)
    refs: Dict[str, np.ndarray] = {}
    for seed, (tag, variant, classes, separable, rates, decoder, pooling, grid, output_stride) in enumerate(HEAD_CASES):
        kwargs = dict(backbone=variant, num_classes=classes, output_stride=output_stride, atrous_rates=rates,
                      decoder=decoder, image_pooling=pooling, multi_grid=grid, separable=separable)
        pixels = np.random.default_rng(40 + seed).uniform(0, 255, (1, 33, 33, 3))
        net = ReferenceNet(tf, seed=40 + seed)
        net.deeplab(preprocess(tf, tf.constant(pixels.astype(np.float32)), variant), **kwargs)
        net.save(str(out / tag / "model.ckpt"), extra={"global_step": np.int64(1)})
        (out / tag / "variables.json").write_text(json.dumps(sorted(net.values)))
        refs[f"{tag}/pixels"] = pixels
        refs[f"{tag}/logits"] = _f64(tf, net).deeplab(preprocess(tf, tf.constant(pixels), variant), **kwargs).numpy()
    np.savez(out / "refs.npz", **refs)


if __name__ == "__main__":
    import sys

    if sys.argv[2:] == ["resnet"]:
        generate_resnet(sys.argv[1])
    elif sys.argv[2:] == ["heads"]:
        generate_heads(sys.argv[1])
    else:
        generate(sys.argv[1])

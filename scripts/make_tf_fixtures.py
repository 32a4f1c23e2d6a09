"""Write the small TensorFlow-written fixtures under tests/fixtures/tf/ (run with TensorFlow).

    pip install tensorflow-cpu==2.21.0 && python scripts/make_tf_fixtures.py

They let the default (TensorFlow-free) test run check ``deeplab.tf`` against files written by real
TensorFlow; the slow tests in tests/tf/test_convert_tf.py write much larger ones at test time.

- ``mixed/model.ckpt.*``: one tensor of each dtype TF checkpoints use (float32/16/64, bfloat16,
  int32/64, bool, string, scalar, empty), written by ``SaveV2``; ``mixed_expected.npz`` holds the
  numeric values as NumPy wrote them.
- ``sharded/merged.*``: two ``SaveV2`` bundles merged by ``MergeV2Checkpoints`` into one
  checkpoint with two data shards.
- ``deeplabv3_mnv2_tiny.tar.gz``: a model-zoo-like tarball of the reference's MobileNetV2
  DeepLabv3 for 21 classes (variables created by ``tests/tf_reference.py``, saved by TF1's
  ``Saver`` as ``model.ckpt-30000`` with ``global_step`` and optimizer slots). Weights repeat a
  61-value tile per tensor so the archive compresses to a few hundred KB;
  ``deeplabv3_mnv2_tiny_logits.npz`` holds TensorFlow's logits for a 20x20 input.
- ``zoo_mnv2_voc.tar.gz``: the same network for the model-zoo tests (tests/test_zoo.py), laid out
  like the zoo's tarball (``frozen_inference_graph.pb`` + ``model.ckpt``, with ``global_step`` and
  optimizer slots), but well conditioned: tiled weights, BatchNorm moving statistics drawn from what
  each layer sees (``ReferenceNet``'s default), so activations stay O(1) and a float32 forward (BN
  folding, fused kernels) agrees with TensorFlow to ~1e-6 relative instead of ~1e-3.
  ``zoo_mnv2_voc_logits.npz``: TensorFlow's logits for a 20x20 input.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
import tensorflow as tf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from tf_reference import ReferenceNet  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "tf"
TILE = 61


def tiled(name: str, shape) -> np.ndarray:
    """Deterministic, compressible values: a per-tensor tile of 61 random numbers, repeated."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    n = int(np.prod(shape)) if shape else 1
    leaf = name.rsplit("/", 1)[-1]
    if leaf == "moving_variance":
        tile = rng.uniform(0.5, 1.5, TILE)
    elif leaf == "gamma":
        tile = rng.uniform(0.8, 1.2, TILE)
    elif leaf in ("beta", "moving_mean", "biases"):
        tile = rng.normal(0.0, 0.1, TILE)
    else:
        fan_in = int(np.prod(shape[:-1])) if leaf == "weights" else int(np.prod(shape[:2]))
        tile = rng.standard_normal(TILE) * np.sqrt(2.0 / fan_in)
    return np.resize(tile, n).reshape(shape).astype(np.float32)


def mixed() -> None:
    rng = np.random.default_rng(0)
    values = {
        "conv/weights": rng.standard_normal((3, 3, 4, 5)).astype(np.float32),
        "conv/depthwise_weights": rng.standard_normal((3, 3, 6, 1)).astype(np.float32),
        "half": rng.standard_normal(7).astype(np.float16),
        "double": rng.standard_normal((2, 2)),
        "int32": np.arange(10, dtype=np.int32).reshape(2, 5),
        "global_step": np.int64(30000),
        "bool": np.array([True, False, True]),
        "empty": np.zeros((0, 3), np.float32),
        "big": rng.standard_normal((128, 130)).astype(np.float32),  # > 64 KiB: the vectorised CRC path
    }
    names = sorted(values)
    tensors = [tf.constant(values[n]) for n in names]
    names += ["bf16", "strings"]
    tensors += [tf.constant(np.array([1.5, -2.25, 3.0], np.float32), dtype=tf.bfloat16),
                tf.constant([b"xception_65", b"", b"\xff\x00 bytes"])]
    dest = OUT / "mixed"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    tf.raw_ops.SaveV2(prefix=str(dest / "model.ckpt"), tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=tensors)
    np.savez(OUT / "mixed_expected.npz", **{k.replace("/", "__"): v for k, v in values.items()})


def sharded() -> None:
    dest = OUT / "sharded"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        p1, p2 = f"{tmp}/part1", f"{tmp}/part2"
        tf.raw_ops.SaveV2(prefix=p1, tensor_names=["a/weights", "b/biases"], shape_and_slices=["", ""],
                          tensors=[tf.constant(np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4)),
                                   tf.constant(np.array([0.5, -0.5], np.float32))])
        tf.raw_ops.SaveV2(prefix=p2, tensor_names=["c/gamma"], shape_and_slices=[""],
                          tensors=[tf.constant(np.full(5, 2.0, np.float32))])
        tf.raw_ops.MergeV2Checkpoints(checkpoint_prefixes=[p1, p2], destination_prefix=str(dest / "merged"))


def mobilenet_tarball() -> None:
    net = ReferenceNet(tf, initializer=tiled)
    image = np.random.default_rng(1).uniform(-1, 1, (1, 20, 20, 3)).astype(np.float32)
    logits = net.deeplab(tf.constant(image), backbone="MobilenetV2", num_classes=21, output_stride=16,
                         atrous_rates=(), decoder=False).numpy()
    extra = {"global_step": np.int64(30000)}
    for name in ("aspp0/weights", "logits/semantic/weights", "MobilenetV2/Conv/weights"):
        extra[f"{name}/Momentum"] = np.zeros_like(net.values[name])
        extra[f"{name}/ExponentialMovingAverage"] = net.values[name].copy()
        extra[f"{name}/RMSProp"] = np.zeros_like(net.values[name])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = Path(tmp) / "deeplabv3_mnv2_pascal_train_aug"
        prefix = net.save(str(ckpt_dir / "model.ckpt-30000"), extra=extra)
        (ckpt_dir / "frozen_inference_graph.pb").write_bytes(b"not needed by the converter")
        with tarfile.open(OUT / "deeplabv3_mnv2_tiny.tar.gz", "w:gz", compresslevel=9) as archive:
            for path in sorted(ckpt_dir.iterdir()):
                archive.add(path, arcname=f"{ckpt_dir.name}/{path.name}")
        print("saved", prefix)
    np.savez_compressed(OUT / "deeplabv3_mnv2_tiny_logits.npz", image=image, logits=logits)


def zoo_tarball() -> None:
    def init(name: str, shape) -> "np.ndarray | None":
        # None: ReferenceNet's default (moving statistics from the activations the layer sees).
        if name.endswith(("moving_mean", "moving_variance")):
            return None
        if name.endswith("/beta"):
            # Positive shifts keep most units on the linear side of ReLU/ReLU6: a random network
            # then no longer amplifies float32 rounding layer after layer.
            return np.resize(np.random.default_rng(zlib.crc32(name.encode())).uniform(1.0, 2.0, TILE),
                             shape).astype(np.float32)
        return tiled(name, shape)

    net = ReferenceNet(tf, initializer=init)
    image = np.random.default_rng(2).uniform(-1, 1, (1, 20, 20, 3)).astype(np.float32)
    logits = net.deeplab(tf.constant(image), backbone="MobilenetV2", num_classes=21, output_stride=16,
                         atrous_rates=(), decoder=False).numpy()
    extra = {"global_step": np.int64(30000)}
    for name in ("aspp0/weights", "logits/semantic/weights"):
        extra[f"{name}/Momentum"] = np.zeros_like(net.values[name])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt_dir = Path(tmp) / "deeplabv3_mnv2_pascal_train_aug"
        net.save(str(ckpt_dir / "model.ckpt-30000"), extra=extra)
        (ckpt_dir / "frozen_inference_graph.pb").write_bytes(b"not needed by the converter")
        with tarfile.open(OUT / "zoo_mnv2_voc.tar.gz", "w:gz", compresslevel=9) as archive:
            for path in sorted(ckpt_dir.iterdir()):
                archive.add(path, arcname=f"{ckpt_dir.name}/{path.name}")
    np.savez_compressed(OUT / "zoo_mnv2_voc_logits.npz", image=image, logits=logits)


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    only = sys.argv[1:]  # e.g. `python scripts/make_tf_fixtures.py zoo_tarball`: write just that one
    for writer in (mixed, sharded, mobilenet_tarball, zoo_tarball):
        if not only or writer.__name__ in only:
            writer()
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(ROOT)}  {path.stat().st_size} bytes")

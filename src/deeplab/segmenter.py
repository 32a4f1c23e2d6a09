"""``Segmenter``: images in, class-id masks out, from a checkpoint or an exported model.

>>> seg = deeplab.Segmenter.from_checkpoint("run/best.pt", device="cpu")   # doctest: +SKIP
>>> mask = seg.predict(pil_image_or_array)   # (H, W) uint8 class ids    # doctest: +SKIP
>>> seg.overlay(pil_image_or_array, mask).save("overlay.png")              # doctest: +SKIP

The class names, palette and input normalisation come from the checkpoint (or from the
metadata embedded in an exported ONNX / TorchScript file), so a model file is all it needs.
Inference itself is :func:`deeplab.eval.inference.predict_probs` (whole image padded to
``OS*k+1``, or sliding windows; optional multi-scale and flip averaging), whatever the backend,
with one :class:`deeplab.config.InferenceConfig`; the pictures come from :mod:`deeplab.viz`.

Precision (``InferenceConfig.precision``, default ``"auto"``; :func:`choose_precision`): ``auto``
takes the fastest precision that this CPU accelerates (int8 with AMX-INT8 / AVX-512 VNNI /
AVX-VNNI, bf16 with AMX-BF16 / AVX-512 BF16, see :mod:`deeplab.cpu`) and that the file was
exported at with a stored parity within :data:`PARITY_BOUNDS`; otherwise fp32. A checkpoint
carries no measured parity, so ``auto`` runs it in fp32 (``precision="bf16"`` asks for bf16
autocast). The choice and its reason are logged and kept as :attr:`Segmenter.precision` /
:attr:`Segmenter.precision_reason`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image
from torch import nn

from deeplab.config import InferenceConfig, IntPair
from deeplab.data.base import load_image_array
from deeplab.data.palettes import RGB, colorize, default_palette
from deeplab.data.transforms import to_unit_float
from deeplab.eval.inference import predict_probs
from deeplab.viz import ImageInput, index_png, overlay_mask, to_rgb_array

__all__ = ["BACKENDS", "PARITY_BOUNDS", "Segmenter", "choose_precision"]

PathLike = Union[str, "os.PathLike[str]"]
BACKENDS = ("torch", "onnxruntime", "openvino")
log = logging.getLogger(__name__)

# The least mean pixel agreement with fp32 (on the export's held-out images) that ``auto``
# accepts per precision. int8 is looser: on the demo model (MobileNetV2 after 100 steps on 4
# photos, many near-tied logits) int8 agrees with fp32 on 91-94% of a held-out photo's pixels
# (within 0.5 mIoU on it; benchmarks/deploy_precision.py), bf16 on 98.8%.
PARITY_BOUNDS: Dict[str, float] = {"bf16": 0.98, "int8": 0.90}
# fastest first, by measurement on AVX-512 BF16/VNNI and AMX CPUs (README, Speed)
PRECISION_ORDER = ("int8", "bf16", "fp32")


def choose_precision(
    metadata: Optional[Mapping[str, Any]],
    backend: str,
    *,
    flags: Optional[Mapping[str, bool]] = None,
) -> Tuple[str, str]:
    """The precision ``"auto"`` runs a model at, and why (one sentence).

    Args:
        metadata: an exported file's metadata (``precision``, ``parity``); ``None`` for a checkpoint.
        backend: ``"torch"``, ``"onnxruntime"``, ``"openvino"`` or ``"torchscript"``.
        flags: ISA flags (default this CPU's, :func:`deeplab.cpu.cpu_flags`; tests pass their own).

    Returns:
        ``(precision, reason)``.
    """
    from deeplab.cpu import precision_support

    if metadata is None:
        return "fp32", "a checkpoint carries no measured bf16/int8 parity (export with --precision to measure one)"
    stored = str(metadata.get("precision") or "fp32")
    parity = metadata.get("parity") or {}
    if stored == "fp32":
        return "fp32", "the file was exported at fp32"
    accelerated, why = precision_support(stored, flags)
    agreement = parity.get("pixel_agreement")
    bound = PARITY_BOUNDS[stored]
    within = agreement is not None and agreement >= bound
    parity_text = (f"stored parity {100 * agreement:.1f}% pixel agreement (bound {100 * bound:.0f}%)"
                   if agreement is not None else "no stored parity")
    if stored == "int8":
        # an int8 file has no float weights to fall back to: say when it is not the fast choice
        if not accelerated:
            return "int8", f"the file holds int8 weights; this CPU does not accelerate int8 ({why}): expect fp32 to be faster"
        if not within:
            return "int8", f"the file holds int8 weights but its {parity_text} is out of bound: re-export or use fp32"
        return "int8", f"int8 accelerated by {why}, {parity_text}"
    # bf16: fp32 weights, bf16 at run time where it is fast, safe and the backend has it
    if backend == "onnxruntime":
        return "fp32", "ONNX Runtime's CPU provider has no bf16 path (use backend openvino)"
    if not accelerated:
        return "fp32", f"this CPU does not accelerate bf16 ({why})"
    if not within:
        return "fp32", f"bf16 {parity_text} is out of bound"
    return "bf16", f"bf16 accelerated by {why}, {parity_text}"


class Segmenter:
    """Semantic segmentation of single images with a trained DeepLab model.

    Build it with :meth:`from_checkpoint` (PyTorch; BatchNorm folded for speed),
    :meth:`from_pretrained` (a model of the paper's zoo, by name),
    :meth:`from_exported` (ONNX Runtime, OpenVINO or TorchScript) or :meth:`load` (either,
    by file type).

    Args:
        model: follows the package contract - ``model(x (B, 3, H, W)) -> logits (B, C, H, W)``
            - and has ``output_stride`` (a DeepLab model or a
            :class:`deeplab.deploy.runtime.ExportedModel`).
        classes: class names, one per output channel.
        palette: one RGB colour per class.
        normalization: ``{"mean": [3 floats], "std": [3 floats]}`` in [0, 1] pixel units.
        device: where the input tensor goes (the model must already be there).
        inference: how to predict (default ``InferenceConfig()``: whole image, one scale).
        mode: ``"whole"`` (pad to ``OS*k+1``, one pass) or ``"slide"`` (windows).
        scales: image scales to average softmax over (e.g. ``(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)``).
        flip: also average over left-right flips.
        crop_size, stride: sliding-window size and step (``mode="slide"``).
        output_stride: the model's output stride for the ``OS*k+1`` padding (default: the
            model's own).
        pad_to: pad each image to at least this size first (the TF reference's VOC eval uses 513).
        backend: a label for messages (``"torch"``, ``"onnxruntime"``, ...).
        precision, precision_reason: what the model runs at and why (labels; the loaders
            :meth:`from_checkpoint` / :meth:`from_exported` set them from ``inference.precision``).

    ``mode`` .. ``pad_to`` are shorthands for the fields of ``inference``: each one given
    (not ``None``) replaces that field, so ``scales=(0.75, 1.0), flip=True`` and
    ``inference=InferenceConfig(scales=(0.75, 1.0), flip=True)`` are the same. The result is
    :attr:`inference`; invalid values raise :class:`deeplab._utils.ConfigError`.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        classes: Sequence[str],
        palette: Optional[Sequence[Sequence[int]]] = None,
        normalization: Mapping[str, Sequence[float]],
        device: Union[str, torch.device] = "cpu",
        inference: Optional[InferenceConfig] = None,
        mode: Optional[str] = None,
        scales: Optional[Sequence[float]] = None,
        flip: Optional[bool] = None,
        crop_size: Optional[IntPair] = None,
        stride: Optional[IntPair] = None,
        output_stride: Optional[int] = None,
        pad_to: Optional[IntPair] = None,
        backend: str = "torch",
        precision: Optional[str] = None,
        precision_reason: str = "",
    ) -> None:
        self.inference = inference_with(
            inference, mode=mode, scales=scales, flip=flip, crop_size=crop_size, stride=stride,
            output_stride=output_stride, pad_to=pad_to,
        )
        if len(classes) > 256:
            raise ValueError(f"{len(classes)} classes do not fit uint8 masks (at most 256)")
        self.model = model.eval()
        self.classes: List[str] = [str(c) for c in classes]
        if palette is None or len(palette) < len(self.classes):
            palette = default_palette(len(self.classes))
        self.palette: List[RGB] = [tuple(int(v) for v in c[:3]) for c in palette]  # type: ignore[misc]
        self.normalization = {k: [float(v) for v in normalization[k]] for k in ("mean", "std")}
        self.device = torch.device(device)
        self.backend = backend
        self.precision = precision or str(getattr(model, "precision", "fp32"))
        self.precision_reason = precision_reason
        self._mean = torch.tensor(self.normalization["mean"], device=self.device).view(1, -1, 1, 1) * 255.0
        self._std = torch.tensor(self.normalization["std"], device=self.device).view(1, -1, 1, 1) * 255.0

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(
        cls,
        path: PathLike,
        device: Union[str, torch.device] = "cpu",
        *,
        optimize: bool = True,
        output_stride: Optional[int] = None,
        inference: Optional[InferenceConfig] = None,
        **options: Any,
    ) -> "Segmenter":
        """A segmenter for a deeplab checkpoint (``best.pt`` / ``last.pt``).

        Args:
            path: the checkpoint.
            device: ``"cpu"``, ``"cuda"``, ...
            optimize: fold BatchNorm into the convs (same outputs, less work; CPU inference
                also picks the faster memory layout, see :func:`deeplab.deploy.optimize.optimize_for_inference`).
            output_stride: rebuild at another output stride (e.g. 8 for the paper's eval);
                ``inference.output_stride`` does the same.
            inference: how to predict; see :class:`Segmenter`.
            **options: ``mode``, ``scales``, ``flip``, ``crop_size``, ``stride``, ``pad_to``,
                ``precision`` (shorthands for fields of ``inference``).
        """
        from deeplab.checkpoint import load_model

        config = inference_with(inference, output_stride=output_stride, **options)
        model, ckpt = load_model(path, map_location="cpu", output_stride=config.output_stride)
        classes = ckpt.get("classes") or [f"class_{i}" for i in range(model.num_classes)]
        normalization = ckpt.get("normalization") or model.normalization.to_dict()
        precision, reason = _checkpoint_precision(config.precision, device)
        log.info("deeplab: %s runs at %s: %s", path, precision, reason)
        net: nn.Module = model
        if optimize:
            from deeplab.deploy.optimize import optimize_for_inference

            # oneDNN's fused conv calls take no autocast: bf16 runs the unfused (folded, NHWC) form
            net = optimize_for_inference(model, device=device, fuse=False if precision == "bf16" else None)
        if precision == "bf16":
            from deeplab.deploy.runtime import AutocastBF16

            net = AutocastBF16(net)
        net = net.to(device)
        return cls(
            net,
            classes=classes,
            palette=ckpt.get("palette"),
            normalization=normalization,
            device=device,
            inference=config,
            backend="torch",
            precision=precision,
            precision_reason=reason,
        )

    @classmethod
    def from_pretrained(
        cls,
        name: str,
        device: Union[str, torch.device] = "cpu",
        *,
        mirror: Optional[str] = None,
        progress: bool = True,
        inference: Optional[InferenceConfig] = None,
        **options: Any,
    ) -> "Segmenter":
        """A segmenter for a model of the paper's zoo (``deeplab weights list``), by name.

        The first call downloads the authors' tarball from its official location (or
        ``mirror`` / ``$DEEPLAB_ZOO_URL``), converts and caches it (see :mod:`deeplab.zoo`); later
        calls read the cache. Unless ``inference`` or options say otherwise, images are padded to
        the reference's eval crop (VOC 513x513, Cityscapes 1025x2049), one scale, output stride 16.

        Args:
            name: a zoo name, e.g. ``"xception65_coco_voc_trainaug"``, or a Hugging Face Hub id
                (``hf://org/repo[@revision]``; see :mod:`deeplab.hub`).
            device, inference, **options: as :meth:`from_checkpoint`.
            mirror: base URL to download from instead of the official one.
            progress: show the download's progress bar.
        """
        from deeplab import zoo

        if name not in zoo.ZOO and ("/" in name or name.startswith("hf://")):  # a Hugging Face Hub id
            from deeplab.hub import checkpoint_for

            return cls.from_checkpoint(checkpoint_for(name), device, inference=inference, **options)
        entry = zoo.get_entry(name)
        if entry.is_backbone:
            raise ValueError(f"{name} is an ImageNet backbone, not a segmentation model; build a model with "
                             f"pretrained_backbone=deeplab.zoo.pretrained_path({name!r}) and train it")
        path = zoo.pretrained_path(name, mirror=mirror, progress=progress)
        if inference is None and "pad_to" not in options:
            options["pad_to"] = entry.pad_to
        return cls.from_checkpoint(path, device, inference=inference, **options)

    @classmethod
    def from_exported(
        cls,
        path: PathLike,
        backend: str = "auto",
        *,
        threads: Optional[int] = None,
        static_shapes: bool = False,
        inference: Optional[InferenceConfig] = None,
        **options: Any,
    ) -> "Segmenter":
        """A segmenter for a file written by ``deeplab export``.

        Args:
            path: ``.onnx`` or TorchScript file (with embedded deeplab metadata).
            backend: ``"onnxruntime"``, ``"openvino"``, ``"torchscript"`` or ``"auto"``.
            threads: intra-op threads of the runtime.
            static_shapes: OpenVINO: compile per input shape (faster when sizes repeat).
            inference: how to predict; see :class:`Segmenter`.
            **options: as :meth:`from_checkpoint`, plus ``output_stride``, which must be
                the one the file was exported at.

        Raises:
            ValueError: an ``output_stride`` other than the exported model's.
        """
        from deeplab.deploy.format import read_metadata
        from deeplab.deploy.runtime import auto_backend, file_precision, load_exported

        config = inference_with(inference, **options)
        meta = read_metadata(path)
        if config.precision == "auto":
            chosen = auto_backend(path, file_precision(meta)) if backend == "auto" else backend
            precision, reason = choose_precision(meta, "torchscript" if chosen == "torch" else chosen)
        else:
            precision, reason = config.precision, "asked for"
        log.info("deeplab: %s runs at %s: %s", path, precision, reason)
        runner = load_exported(path, backend=backend, threads=threads, static_shapes=static_shapes,
                               precision=precision, metadata=meta)
        exported_os = getattr(runner, "output_stride", None)
        if config.output_stride is not None and config.output_stride != exported_os:
            raise ValueError(
                f"{path} was exported at output stride {exported_os}; an exported model cannot "
                f"change it - export the checkpoint again with --output-stride {config.output_stride}, "
                "or run the checkpoint itself"
            )
        return cls(
            runner,
            classes=meta["classes"],
            palette=meta.get("palette"),
            normalization=meta["normalization"],
            device="cpu",
            inference=config,
            backend=runner.backend,
            precision=runner.precision,
            precision_reason=reason,
        )

    @classmethod
    def load(
        cls,
        path: PathLike,
        backend: str = "torch",
        device: Union[str, torch.device] = "cpu",
        **options: Any,
    ) -> "Segmenter":
        """:meth:`from_checkpoint` for a checkpoint, :meth:`from_exported` for an exported file.

        ``backend="torch"`` runs a checkpoint (or a TorchScript file) with PyTorch;
        ``"onnxruntime"`` / ``"openvino"`` need an ``.onnx`` file.
        """
        from deeplab.deploy.format import read_metadata

        if backend not in BACKENDS + ("auto", "torchscript"):
            raise ValueError(f"unknown backend {backend!r}; choose from {list(BACKENDS)}")
        path = Path(path)
        if _is_checkpoint(path):
            if backend not in ("torch", "auto"):
                raise ValueError(
                    f"{path} is a PyTorch checkpoint; backend {backend!r} runs exported ONNX files - "
                    f"export it first: deeplab export --checkpoint {path} --format onnx --out model.onnx"
                )
            return cls.from_checkpoint(path, device=device, **options)
        read_metadata(path)  # a clear error for a file that is neither
        threads = options.pop("threads", None)
        static = options.pop("static_shapes", False)
        return cls.from_exported(path, backend=backend, threads=threads, static_shapes=static, **options)

    # ------------------------------------------------------------------ inference

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # Read-only views of ``self.inference`` under the names the keyword arguments use.
    @property
    def mode(self) -> str:
        return self.inference.mode

    @property
    def scales(self) -> Tuple[float, ...]:
        return self.inference.scales

    @property
    def flip(self) -> bool:
        return self.inference.flip

    @property
    def crop_size(self) -> IntPair:
        return self.inference.crop_size

    @property
    def stride(self) -> IntPair:
        return self.inference.stride

    @property
    def pad_to(self) -> Optional[Tuple[int, int]]:
        return self.inference.pad_to

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """``(1, C, H, W)`` float32 normalised input on the segmenter's device.

        ``C`` is 3 for RGB models; an N-channel model takes an ``(H, W, N)`` array or a path to
        a ``.npy`` / N-channel TIFF (uint8 / uint16 / float in [0, 1], see ``to_unit_float``).
        """
        channels = int(self._mean.shape[1])
        # An RGB model keeps to_rgb_array's input forms and checks (RGBA -> alpha dropped, grey,
        # float in [0, 1]); only N-channel models read arrays / .npy / TIFF on the N-channel path.
        if channels != 3:
            arr = load_image_array(Path(image)) if isinstance(image, (str, os.PathLike)) else image
            units = to_unit_float(np.asarray(arr)) * 255.0  # _mean/_std are in 0-255 units
            if units.shape[2] != channels:
                raise ValueError(f"image has {units.shape[2]} channels but the model takes {channels}")
            x = torch.from_numpy(np.ascontiguousarray(units)).to(self.device).permute(2, 0, 1).unsqueeze(0)
            return x.sub_(self._mean).div_(self._std)
        rgb = to_rgb_array(image)
        x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1).unsqueeze(0).float()
        return x.sub_(self._mean).div_(self._std)

    def _probs(self, image: ImageInput) -> torch.Tensor:
        x = self.preprocess(image)
        return predict_probs(self.model, x, self.inference, num_classes=self.num_classes)[0]

    def predict_probs(self, image: ImageInput) -> np.ndarray:
        """Class probabilities ``(C, H, W)`` float32 (softmax, averaged over scales/flips)."""
        return self._probs(image).cpu().numpy()

    def predict(self, image: ImageInput) -> np.ndarray:
        """Class ids ``(H, W)`` uint8 at the image's size."""
        return self._probs(image).argmax(0).to(torch.uint8).cpu().numpy()

    def predict_with_probs(self, image: ImageInput) -> Tuple[np.ndarray, np.ndarray]:
        """``(mask (H, W) uint8, probs (C, H, W) float32)`` from one pass."""
        probs = self._probs(image)
        return probs.argmax(0).to(torch.uint8).cpu().numpy(), probs.cpu().numpy()

    # ------------------------------------------------------------------ visualisation

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 colour image of a mask with this model's palette."""
        return colorize(mask, self.palette)

    def mask_image(self, mask: np.ndarray) -> Image.Image:
        """The mask as an index PNG image with this model's palette (save with ``.save(path)``)."""
        return index_png(mask, self.palette)

    def overlay(self, image: ImageInput, mask: Optional[np.ndarray] = None, *, alpha: float = 0.5, legend: bool = True) -> Image.Image:
        """The image blended with the colour mask, with a legend of the classes present.

        ``mask`` defaults to ``self.predict(image)``.
        """
        rgb = to_rgb_array(image)
        if mask is None:
            mask = self.predict(rgb)
        return overlay_mask(rgb, mask, self.palette, self.classes, alpha=alpha, legend=legend)

    def __repr__(self) -> str:
        return (
            f"Segmenter(backend={self.backend}, precision={self.precision}, classes={self.num_classes}, mode={self.mode}, "
            f"scales={self.scales}, flip={self.flip}, device={self.device})"
        )


def inference_with(
    inference: Optional[InferenceConfig] = None,
    *,
    mode: Optional[str] = None,
    scales: Optional[Sequence[float]] = None,
    flip: Optional[bool] = None,
    crop_size: Optional[IntPair] = None,
    stride: Optional[IntPair] = None,
    output_stride: Optional[int] = None,
    pad_to: Optional[IntPair] = None,
    precision: Optional[str] = None,
) -> InferenceConfig:
    """``inference`` (default ``InferenceConfig()``) with each keyword that is not ``None``
    replacing its field: the one place :class:`Segmenter`'s shorthand keywords are read.

    Raises:
        deeplab._utils.ConfigError: the result is not a valid :class:`InferenceConfig`.
        TypeError: ``inference`` is not an :class:`InferenceConfig`.
    """
    if inference is not None and not isinstance(inference, InferenceConfig):
        raise TypeError(f"inference must be a deeplab.InferenceConfig, got {type(inference).__name__}")
    given = dict(mode=mode, scales=scales, flip=flip, crop_size=crop_size, stride=stride,
                 output_stride=output_stride, pad_to=pad_to, precision=precision)
    changes: Dict[str, Any] = {key: value for key, value in given.items() if value is not None}
    return dataclasses.replace(inference or InferenceConfig(), **changes)


def _checkpoint_precision(requested: str, device: Union[str, torch.device]) -> Tuple[str, str]:
    """What a checkpoint runs at for ``InferenceConfig.precision`` = ``requested``."""
    if requested == "int8":
        raise ValueError(
            "int8 runs an int8 export, not a checkpoint: deeplab export --checkpoint CKPT --precision int8 "
            "--calib-data DIR --out model.onnx"
        )
    if requested == "bf16":
        if torch.device(device).type != "cpu":
            raise ValueError("precision bf16 runs CPU autocast; on a GPU leave precision at fp32 or auto")
        return "bf16", "asked for (torch.autocast bfloat16)"
    if requested == "fp32":
        return "fp32", "asked for"
    return choose_precision(None, "torch")


def _is_checkpoint(path: Path) -> bool:
    """A ``torch.save`` file (zip with ``data.pkl``), as opposed to TorchScript or ONNX."""
    import zipfile

    if not path.is_file():
        from deeplab.checkpoint import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"model file not found: {path}")
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    # TorchScript archives hold code/ and constants.pkl besides data.pkl.
    return any(n.endswith("data.pkl") for n in names) and not any("/code/" in n or n.endswith("constants.pkl") for n in names)

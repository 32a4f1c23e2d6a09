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
takes the precision the file was exported at where this CPU accelerates it enough to matter and
its stored mIoU parity is within :data:`PARITY_BOUNDS` (the policy: :mod:`deeplab.deploy.precision`);
otherwise fp32 (an int8 file it would not pick is refused with the reason). A checkpoint
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

from deeplab._utils import ConfigError
from deeplab.config import InferenceConfig, IntPair
from deeplab.data.base import load_image_array
from deeplab.data.palettes import RGB, colorize, default_palette
from deeplab.data.transforms import normalize_image
from deeplab.deploy.open import BACKENDS, ModelCard, open_model
from deeplab.deploy.precision import PARITY_BOUNDS, choose_precision
from deeplab.eval.inference import predict_probs
from deeplab.viz import ImageInput, index_png, overlay_mask, to_rgb_array

__all__ = ["BACKENDS", "PARITY_BOUNDS", "Segmenter", "choose_precision"]  # the policy: deeplab.deploy.precision

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)


class Segmenter:
    """Semantic segmentation of single images with a trained DeepLab model.

    Build it with :meth:`open` (any source: checkpoint, exported file or zoo name, through
    :func:`deeplab.deploy.open.open_model`) or its shorthands :meth:`from_checkpoint` (PyTorch;
    BatchNorm folded for speed), :meth:`from_pretrained` (a model of the paper's zoo, by name),
    :meth:`from_exported` (ONNX Runtime, OpenVINO or TorchScript) and :meth:`load` (either, by
    file type).

    Args:
        model: follows the package contract - ``model(x (B, 3, H, W)) -> logits (B, C, H, W)``
            - and has ``output_stride`` (a DeepLab model or a
            :class:`deeplab.deploy.runtime.ExportedModel`).
        classes: class names, one per output channel.
        palette: one RGB colour per class.
        normalization: ``{"mean": [3 floats], "std": [3 floats]}`` in [0, 1] pixel units.
        device: where the input tensor goes (the model must already be there).
        inference: how to predict by default (``InferenceConfig()``: whole image, one scale);
            :meth:`predict` takes another per call.
        backend: a label for messages (``"torch"``, ``"onnxruntime"``, ...).
        precision, precision_reason: what the model runs at and why (labels; :meth:`open`
            sets them from the :class:`~deeplab.deploy.open.ModelCard`).
        card: the model card of the opened source (``None`` for a model built in memory).

    The loaders' keywords ``mode``, ``scales``, ``flip``, ``crop_size``, ``stride``,
    ``output_stride``, ``pad_to``, ``precision`` are shorthands for the fields of ``inference``
    (:func:`inference_with`): ``scales=(0.75, 1.0), flip=True`` and
    ``inference=InferenceConfig(scales=(0.75, 1.0), flip=True)`` are the same. Invalid values
    raise :class:`deeplab._utils.ConfigError`.
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
        backend: str = "torch",
        precision: Optional[str] = None,
        precision_reason: str = "",
        card: Optional[ModelCard] = None,
    ) -> None:
        if inference is not None and not isinstance(inference, InferenceConfig):
            raise TypeError(f"inference must be a deeplab.InferenceConfig, got {type(inference).__name__}")
        self.inference = inference or InferenceConfig()
        if len(classes) > 256:
            raise ConfigError(f"{len(classes)} classes do not fit uint8 masks (at most 256)")
        self.model = model.eval()
        self.card = card
        self.classes: List[str] = [str(c) for c in classes]
        if palette is None or len(palette) < len(self.classes):
            palette = default_palette(len(self.classes))
        self.palette: List[RGB] = [tuple(int(v) for v in c[:3]) for c in palette]  # type: ignore[misc]
        self.normalization = {k: [float(v) for v in normalization[k]] for k in ("mean", "std")}
        self.device = torch.device(device)
        self.backend = backend
        self.precision = precision or str(getattr(model, "precision", "fp32"))
        self.precision_reason = precision_reason

    @classmethod
    def from_model_card(cls, runner: nn.Module, card: ModelCard, *, device: Union[str, torch.device] = "cpu",
                        inference: Optional[InferenceConfig] = None) -> "Segmenter":
        """A segmenter over what :func:`deeplab.deploy.open.open_model` returned."""
        return cls(runner, classes=card.class_names(), palette=card.palette, normalization=card.normalization,
                   device=device, inference=inference, backend=card.backend, precision=card.precision,
                   precision_reason=card.precision_reason, card=card)

    # ------------------------------------------------------------------ construction

    @classmethod
    def open(
        cls,
        source: PathLike,
        *,
        backend: str = "auto",
        device: Union[str, torch.device] = "cpu",
        inference: Optional[InferenceConfig] = None,
        optimize: bool = True,
        threads: Optional[int] = None,
        static_shapes: bool = False,
        mirror: Optional[str] = None,
        progress: bool = True,
    ) -> "Segmenter":
        """A segmenter for any source - checkpoint, exported file or zoo name - through
        :func:`deeplab.deploy.open.open_model`, the one way a model is opened.

        A zoo name pads to its reference eval crop unless ``inference`` says otherwise.
        """
        config = inference or InferenceConfig()
        runner, card = open_model(source, backend=backend, device=device, precision=config.precision,
                                  output_stride=config.output_stride, optimize=optimize, threads=threads,
                                  static_shapes=static_shapes, mirror=mirror, progress=progress)
        if card.zoo is not None and inference is None:
            config = dataclasses.replace(config, pad_to=card.zoo.pad_to)
        return cls.from_model_card(runner, card, device=card.device, inference=config)

    @classmethod
    def from_checkpoint(
        cls,
        path: PathLike,
        device: Union[str, torch.device] = "cpu",
        *,
        optimize: bool = True,
        inference: Optional[InferenceConfig] = None,
        **options: Any,
    ) -> "Segmenter":
        """A segmenter for a deeplab checkpoint (``best.pt`` / ``last.pt``).

        Args:
            path: the checkpoint.
            device: ``"cpu"``, ``"cuda"``, ...
            optimize: fold BatchNorm into the convs (same outputs, less work; CPU inference
                also picks the faster memory layout, see :func:`deeplab.deploy.optimize.optimize_for_inference`).
            inference: how to predict; see :class:`Segmenter`.
            **options: ``mode``, ``scales``, ``flip``, ``crop_size``, ``stride``, ``output_stride``,
                ``pad_to``, ``precision`` (shorthands for fields of ``inference``).
        """
        return cls.open(path, backend="torch", device=device, optimize=optimize,
                        inference=inference_with(inference, **options))

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
            source = name if name.startswith("hf://") else f"hf://{name}"
            return cls.open(source, backend="torch", device=device, progress=progress,
                            inference=inference_with(inference, **options))
        entry = zoo.get_entry(name)  # an unknown name: the zoo's error with the choices
        if inference is None and "pad_to" not in options:
            options["pad_to"] = entry.pad_to
        return cls.open(name, backend="torch", device=device, mirror=mirror, progress=progress,
                        inference=inference_with(inference, **options))

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
            backend: ``"onnxruntime"``, ``"openvino"``, ``"torch"`` (TorchScript) or ``"auto"``.
            threads: intra-op threads of the runtime.
            static_shapes: OpenVINO: compile per input shape (faster when sizes repeat).
            inference: how to predict; see :class:`Segmenter`.
            **options: as :meth:`from_checkpoint`; ``output_stride`` must be the one the file
                was exported at.

        Raises:
            ConfigError: an ``output_stride`` other than the exported model's.
        """
        return cls.open(path, backend=backend, threads=threads, static_shapes=static_shapes,
                        inference=inference_with(inference, **options))

    @classmethod
    def load(
        cls,
        path: PathLike,
        backend: str = "auto",
        device: Union[str, torch.device] = "cpu",
        *,
        threads: Optional[int] = None,
        static_shapes: bool = False,
        inference: Optional[InferenceConfig] = None,
        **options: Any,
    ) -> "Segmenter":
        """:meth:`open` with the shorthand keywords of :meth:`from_checkpoint`.

        ``backend="torch"`` runs a checkpoint (or a TorchScript file) with PyTorch;
        ``"onnxruntime"`` / ``"openvino"`` need an ``.onnx`` file; ``"auto"`` picks by file.
        """
        return cls.open(path, backend=backend, device=device, threads=threads, static_shapes=static_shapes,
                        inference=inference_with(inference, **options))

    # ------------------------------------------------------------------ inference

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """``(1, C, H, W)`` float32 normalised input on the segmenter's device.

        ``C`` is 3 for RGB models; an N-channel model takes an ``(H, W, N)`` array or a path to
        a ``.npy`` / N-channel TIFF (uint8 / uint16 / float in [0, 1], see ``to_unit_float``).
        """
        mean, std = self.normalization["mean"], self.normalization["std"]
        # An RGB model keeps to_rgb_array's input forms and checks (RGBA -> alpha dropped, grey,
        # float in [0, 1]); only N-channel models read arrays / .npy / TIFF on the N-channel path.
        if len(mean) != 3:
            arr = np.asarray(load_image_array(Path(image)) if isinstance(image, (str, os.PathLike)) else image)
            if arr.ndim != 3 or arr.shape[2] != len(mean):
                raise ConfigError(f"image has {arr.shape[2] if arr.ndim == 3 else 1} channels but the model takes {len(mean)}")
            x = normalize_image(arr, mean, std)
        else:
            x = normalize_image(to_rgb_array(image), mean, std)
        return x.unsqueeze(0).to(self.device)

    def _probs(self, image: ImageInput, inference: Optional[InferenceConfig] = None) -> torch.Tensor:
        x = self.preprocess(image)
        return predict_probs(self.model, x, inference or self.inference, num_classes=self.num_classes)[0]

    def predict(self, image: ImageInput, inference: Optional[InferenceConfig] = None) -> np.ndarray:
        """Class ids ``(H, W)`` uint8 at the image's size.

        Args:
            image: a path, PIL image or ``(H, W, 3)`` array.
            inference: how to predict this image (default :attr:`inference`).
        """
        return self._probs(image, inference).argmax(0).to(torch.uint8).cpu().numpy()

    def predict_probs(self, image: ImageInput, inference: Optional[InferenceConfig] = None) -> np.ndarray:
        """Class probabilities ``(C, H, W)`` float32 (softmax, averaged over scales/flips)."""
        return self._probs(image, inference).cpu().numpy()

    def predict_with_probs(self, image: ImageInput, inference: Optional[InferenceConfig] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(mask (H, W) uint8, probs (C, H, W) float32)`` from one pass."""
        probs = self._probs(image, inference)
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
            f"Segmenter(backend={self.backend}, precision={self.precision}, classes={self.num_classes}, "
            f"mode={self.inference.mode}, scales={self.inference.scales}, flip={self.inference.flip}, device={self.device})"
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

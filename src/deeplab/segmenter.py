"""``Segmenter``: images in, class-id masks out, from a checkpoint or an exported model.

>>> seg = deeplab.Segmenter.from_checkpoint("run/best.pt", device="cpu")   # doctest: +SKIP
>>> mask = seg.predict(pil_image_or_array)   # (H, W) uint8 class ids    # doctest: +SKIP
>>> seg.overlay(pil_image_or_array, mask).save("overlay.png")              # doctest: +SKIP

The class names, palette and input normalisation come from the checkpoint (or from the
metadata embedded in an exported ONNX / TorchScript file), so a model file is all it needs.
Inference itself is :func:`deeplab.eval.inference.predict_probs` (whole image padded to
``OS*k+1``, or sliding windows; optional multi-scale and flip averaging), whatever the backend.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from deeplab.data.palettes import RGB, colorize, default_palette
from deeplab.eval.inference import MODES, predict_probs

__all__ = ["BACKENDS", "ImageInput", "Segmenter", "index_png", "overlay_mask", "to_rgb_array"]

PathLike = Union[str, "os.PathLike[str]"]
ImageInput = Union[Image.Image, np.ndarray, str, "os.PathLike[str]"]
BACKENDS = ("torch", "onnxruntime", "openvino")


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """A PIL image, an array or an image path -> ``(H, W, 3)`` uint8 RGB.

    Arrays may be ``(H, W)`` grey, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA, ``uint8`` (0-255)
    or floating point in [0, 1].

    Raises:
        ValueError: an array of another shape, or float values outside [0, 1].
        deeplab.data.DatasetError: a path that is not a readable image (names the file).
    """
    if isinstance(image, (str, os.PathLike)):
        from deeplab.data.base import load_image

        image = load_image(Path(image))
    if isinstance(image, Image.Image):
        # np.array (not asarray): a writable copy, which torch.from_numpy needs.
        return np.array(image if image.mode == "RGB" else image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(
            f"image array must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}; "
            "channels go last (HWC), as PIL and OpenCV give them"
        )
    array = array[..., :3]
    if array.dtype == np.uint8:
        return np.array(array, order="C")
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0.0 or np.nanmax(array) > 1.0):
            raise ValueError("float image arrays must hold values in [0, 1]; pass uint8 for 0-255 pixels")
        return np.ascontiguousarray(np.round(array * 255.0).astype(np.uint8))
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError(f"integer image arrays must hold 0-255 pixels, got {array.min()}..{array.max()}")
        return np.ascontiguousarray(array.astype(np.uint8))
    raise ValueError(f"unsupported image dtype {array.dtype}; pass uint8 RGB")


def index_png(mask: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A class-id mask as a palette ("P" mode) PNG image: pixel values are the class ids and
    viewers show the class colours (the VOC ``SegmentationClass`` format)."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").convert("P")
    flat: List[int] = []
    for color in list(palette)[:256]:
        flat.extend(int(v) for v in color[:3])
    flat.extend([0] * (768 - len(flat)))
    image.putpalette(flat)
    return image


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size only
        return ImageFont.load_default()


def overlay_mask(
    image: ImageInput,
    mask: np.ndarray,
    palette: Sequence[Sequence[int]],
    classes: Optional[Sequence[str]] = None,
    *,
    alpha: float = 0.5,
    legend: bool = True,
) -> Image.Image:
    """Blend the colour mask over the image; optionally add a legend of the classes present.

    Args:
        image: the input image (anything :func:`to_rgb_array` takes), same size as ``mask``.
        mask: ``(H, W)`` class ids.
        palette: one RGB colour per class.
        classes: class names (for the legend); default ``class_<id>``.
        alpha: weight of the mask colour (0 = image only, 1 = mask only).
        legend: append a panel on the right listing each class present, largest first, with
            its colour and share of the pixels.

    Returns:
        An RGB ``PIL.Image``; ``W + legend width`` wide.
    """
    rgb = to_rgb_array(image)
    mask = np.asarray(mask)
    if rgb.shape[:2] != mask.shape:
        raise ValueError(f"image {rgb.shape[:2]} and mask {mask.shape} differ in size")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = colorize(mask, palette)
    blended = (rgb.astype(np.float32) * (1.0 - alpha) + colours.astype(np.float32) * alpha).round().astype(np.uint8)
    picture = Image.fromarray(blended)
    if not legend:
        return picture
    ids, counts = np.unique(mask, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    h, w = mask.shape
    size = int(min(max(round(h / 30), 11), 20))
    font = _font(size)
    row, pad, swatch = size + 6, 8, size
    labels = []
    for index in order:
        cid = int(ids[index])
        name = classes[cid] if classes is not None and 0 <= cid < len(classes) else f"class_{cid}"
        labels.append((cid, f"{name} {100.0 * counts[index] / mask.size:.1f}%"))
    probe = ImageDraw.Draw(picture)
    text_w = max((probe.textlength(text, font=font) for _, text in labels), default=0)
    panel_w = int(pad * 3 + swatch + text_w)
    canvas = Image.new("RGB", (w + panel_w, max(h, pad * 2 + row * len(labels))), (255, 255, 255))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (cid, text) in enumerate(labels):
        y = pad + i * row
        color = tuple(int(v) for v in palette[cid][:3]) if 0 <= cid < len(palette) else (0, 0, 0)
        draw.rectangle([w + pad, y, w + pad + swatch, y + swatch], fill=color, outline=(0, 0, 0))
        draw.text((w + pad * 2 + swatch, y + swatch / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return canvas


class Segmenter:
    """Semantic segmentation of single images with a trained DeepLab model.

    Build it with :meth:`from_checkpoint` (PyTorch; BatchNorm folded for speed),
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
        mode: ``"whole"`` (pad to ``OS*k+1``, one pass) or ``"slide"`` (windows).
        scales: image scales to average softmax over (e.g. ``(0.5, 0.75, 1.0, 1.25, 1.5, 1.75)``).
        flip: also average over left-right flips.
        crop_size, stride: sliding-window size and step (``mode="slide"``).
        pad_to: pad each image to at least this size first (the TF reference's VOC eval uses 513).
        backend: a label for messages (``"torch"``, ``"onnxruntime"``, ...).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        classes: Sequence[str],
        palette: Optional[Sequence[Sequence[int]]] = None,
        normalization: Mapping[str, Sequence[float]],
        device: Union[str, torch.device] = "cpu",
        mode: str = "whole",
        scales: Sequence[float] = (1.0,),
        flip: bool = False,
        crop_size: Union[int, Tuple[int, int]] = 513,
        stride: Union[int, Tuple[int, int]] = 341,
        pad_to: Optional[Union[int, Tuple[int, int]]] = None,
        backend: str = "torch",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown inference mode {mode!r}; choose from {list(MODES)}")
        if len(classes) > 256:
            raise ValueError(f"{len(classes)} classes do not fit uint8 masks (at most 256)")
        self.model = model.eval()
        self.classes: List[str] = [str(c) for c in classes]
        if palette is None or len(palette) < len(self.classes):
            palette = default_palette(len(self.classes))
        self.palette: List[RGB] = [tuple(int(v) for v in c[:3]) for c in palette]  # type: ignore[misc]
        self.normalization = {k: [float(v) for v in normalization[k]] for k in ("mean", "std")}
        self.device = torch.device(device)
        self.mode = mode
        self.scales = tuple(float(s) for s in scales)
        self.flip = bool(flip)
        self.crop_size = crop_size
        self.stride = stride
        self.pad_to = pad_to
        self.backend = backend
        self._mean = torch.tensor(self.normalization["mean"], device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(self.normalization["std"], device=self.device).view(1, 3, 1, 1) * 255.0

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(
        cls,
        path: PathLike,
        device: Union[str, torch.device] = "cpu",
        *,
        optimize: bool = True,
        output_stride: Optional[int] = None,
        **options: Any,
    ) -> "Segmenter":
        """A segmenter for a deeplab checkpoint (``best.pt`` / ``last.pt``).

        Args:
            path: the checkpoint.
            device: ``"cpu"``, ``"cuda"``, ...
            optimize: fold BatchNorm into the convs (same outputs, less work; CPU inference
                also picks the faster memory layout, see :func:`deeplab.deploy.export.optimize_for_inference`).
            output_stride: rebuild at another output stride (e.g. 8 for the paper's eval).
            **options: ``mode``, ``scales``, ``flip``, ``crop_size``, ``stride``, ``pad_to``.
        """
        from deeplab.checkpoint import load_model

        model, ckpt = load_model(path, map_location="cpu", output_stride=output_stride)
        if optimize:
            from deeplab.deploy.optimize import optimize_for_inference

            model = optimize_for_inference(model, device=device)
        model = model.to(device)
        num_classes = model.num_classes
        classes = ckpt.get("classes") or [f"class_{i}" for i in range(num_classes)]
        normalization = ckpt.get("normalization") or model.normalization.to_dict()
        return cls(
            model,
            classes=classes,
            palette=ckpt.get("palette"),
            normalization=normalization,
            device=device,
            backend="torch",
            **options,
        )

    @classmethod
    def from_exported(
        cls,
        path: PathLike,
        backend: str = "auto",
        *,
        threads: Optional[int] = None,
        static_shapes: bool = False,
        **options: Any,
    ) -> "Segmenter":
        """A segmenter for a file written by ``deeplab export``.

        Args:
            path: ``.onnx`` or TorchScript file (with embedded deeplab metadata).
            backend: ``"onnxruntime"``, ``"openvino"``, ``"torchscript"`` or ``"auto"``.
            threads: intra-op threads of the runtime.
            static_shapes: OpenVINO: compile per input shape (faster when sizes repeat).
            **options: as :meth:`from_checkpoint`.
        """
        from deeplab.deploy.runtime import load_exported

        runner = load_exported(path, backend=backend, threads=threads, static_shapes=static_shapes)
        meta = runner.metadata
        return cls(
            runner,
            classes=meta["classes"],
            palette=meta.get("palette"),
            normalization=meta["normalization"],
            device="cpu",
            backend=runner.backend,
            **options,
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

    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """``(1, 3, H, W)`` float32 normalised input on the segmenter's device."""
        rgb = to_rgb_array(image)
        x = torch.from_numpy(rgb).to(self.device).permute(2, 0, 1).unsqueeze(0).float()
        return x.sub_(self._mean).div_(self._std)

    def _probs(self, image: ImageInput) -> torch.Tensor:
        x = self.preprocess(image)
        return predict_probs(
            self.model,
            x,
            num_classes=self.num_classes,
            mode=self.mode,
            scales=self.scales,
            flip=self.flip,
            crop_size=self.crop_size,
            stride=self.stride,
            pad_to=self.pad_to,
        )[0]

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
            f"Segmenter(backend={self.backend}, classes={self.num_classes}, mode={self.mode}, "
            f"scales={self.scales}, flip={self.flip}, device={self.device})"
        )


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

"""Frozen configuration dataclasses.

Only ``cli/`` turns argv or YAML into these; the rest of the package takes them (or plain
keyword arguments) as objects.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

from deeplab._utils import ConfigError

ARCHS = ("deeplabv3plus", "deeplabv3")
# The backbone names a ModelConfig accepts. config.py imports no model code, so the registry
# (deeplab.models.backbones.BACKBONES) checks at import time that it holds exactly these.
BACKBONE_NAMES = ("resnet50", "resnet101", "xception41", "xception65", "xception71", "mobilenet_v2",
                  # the TF reference's layout (models/backbones/resnet_tf.py); _beta is the paper's ResNet
                  "resnet_v1_50", "resnet_v1_101", "resnet_v1_50_beta", "resnet_v1_101_beta")
OUTPUT_STRIDES = (8, 16, 32)
_C = TypeVar("_C", bound="_PlainDict")


class _PlainDict:
    """``to_dict``/``from_dict`` shared by the config dataclasses.

    ``_TUPLES`` maps tuple-valued fields to their element type, so lists read back from a
    checkpoint or YAML become tuples again.
    """

    _TUPLES: ClassVar[Dict[str, type]] = {}

    def _set(self, name: str, value: Any) -> None:
        # The dataclasses are frozen; normalising a field during __post_init__ is the one exception.
        object.__setattr__(self, name, value)

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict (tuples as lists) that ``torch.load(weights_only=True)`` accepts."""
        out = asdict(self)  # type: ignore[call-overload]
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls: Type[_C], data: Dict[str, Any]) -> _C:
        """Inverse of :meth:`to_dict`; unknown keys are an error that lists them."""
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")
        kwargs = dict(data)
        for key, kind in cls._TUPLES.items():
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kind(v) for v in kwargs[key])
        return cls(**kwargs)


@dataclass(frozen=True)
class ModelConfig(_PlainDict):
    """Everything needed to rebuild a model; stored verbatim in every checkpoint.

    Attributes:
        arch: ``"deeplabv3plus"`` (encoder + decoder) or ``"deeplabv3"`` (encoder only).
        backbone: one of ``deeplab.models.backbones.BACKBONES``.
        num_classes: number of output channels of the classifier.
        output_stride: 8, 16 or 32; decided when the backbone is built.
        separable: atrous separable 3x3 convs in ASPP and decoder (the paper's best) or
            regular 3x3 convs (ablation).
        aspp_rates: atrous rates of ASPP's 3x3 branches; ``None`` derives them from the
            output stride (16 -> (6, 12, 18), 8 -> (12, 24, 36), 32 -> (3, 6, 9)); ``()``
            keeps only the 1x1 branch and image pooling (the released MobileNetV2 head).
        multi_grid: rate multipliers for the units of the last backbone stage (ResNet
            layer4; Xception's last block), e.g. ``(1, 2, 4)``.
        image_pooling: keep ASPP's image-level branch.
        aspp_channels: channels of every ASPP branch and its projection.
        low_level_channels: channels of the decoder's low-level projection (paper: 48).
        decoder_channels: channels of the decoder's two 3x3 convs.
        dropout: dropout after the ASPP projection in training (TF reference: 0.1).
        tf_compat: reproduce TensorFlow-reference behaviour that changes outputs; set by the
            TF checkpoint converter (``deeplab convert tf``). Bilinear resizes (decoder
            upsampling, final upsampling) use ``align_corners=True``; the MobileNetV2 backbone
            uses TF "SAME" padding for its strided convs, BatchNorm epsilon 1e-3 and [-1, 1]
            inputs. Xception and the resnet_v1_* backbones already match TF; the
            torchvision-layout ResNet has no TF counterpart.
        in_channels: input channels (3 = RGB; 4 for RGB-D, N for multispectral). A
            pretrained 3-channel stem is inflated (see ``deeplab.models.inflate_stem``).
        input_mean: per-channel mean in [0, 1] pixel units, one per input channel;
            ``None`` = the backbone's RGB statistics, plus 0.5 for every extra channel.
        input_std: per-channel std, like ``input_mean`` (extra channels default 0.5).
    """

    arch: str = "deeplabv3plus"
    backbone: str = "xception65"
    num_classes: int = 21
    output_stride: int = 16
    separable: bool = True
    aspp_rates: Optional[Tuple[int, ...]] = None
    multi_grid: Optional[Tuple[int, ...]] = None
    image_pooling: bool = True
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256
    dropout: float = 0.1
    tf_compat: bool = False
    in_channels: int = 3
    input_mean: Optional[Tuple[float, ...]] = None
    input_std: Optional[Tuple[float, ...]] = None

    _TUPLES: ClassVar[Dict[str, type]] = {"aspp_rates": int, "multi_grid": int, "input_mean": float,
                                          "input_std": float}

    def __post_init__(self) -> None:
        """Validate every field and normalise numbers, flags and tuples in place.

        Raises:
            ConfigError: one message listing every invalid field and what is allowed.
        """
        problems: List[str] = []
        if self.arch not in ARCHS:
            problems.append(f"unknown arch {self.arch!r}; choose from {list(ARCHS)}")
        if self.backbone not in BACKBONE_NAMES:
            problems.append(f"unknown backbone {self.backbone!r}; choose from {sorted(BACKBONE_NAMES)}")
        # bool is an int, but output_stride=True is a bug, not 1.
        if isinstance(self.output_stride, bool) or self.output_stride not in OUTPUT_STRIDES:
            problems.append(f"output_stride must be one of {list(OUTPUT_STRIDES)}, got {self.output_stride!r}")
        else:
            self._set("output_stride", int(self.output_stride))
        for name in ("num_classes", "aspp_channels", "low_level_channels", "decoder_channels"):
            value = _positive_int(getattr(self, name))
            if value is None:
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
            else:
                self._set(name, value)
        for name in ("separable", "image_pooling", "tf_compat"):
            value = getattr(self, name)
            # 0/1 from YAML or JSON are flags too; anything else (e.g. the string "false") is a bug.
            if isinstance(value, int) and value in (0, 1):
                self._set(name, bool(value))
            else:
                problems.append(f"{name} must be True or False, got {value!r}")
        try:
            dropout = float(self.dropout)
        except (TypeError, ValueError):
            dropout = float("nan")
        if isinstance(self.dropout, bool) or not 0.0 <= dropout < 1.0:
            problems.append(f"dropout must be in [0, 1), got {self.dropout!r}")
        else:
            self._set("dropout", dropout)
        rates = _int_tuple(self.aspp_rates)
        if self.aspp_rates is not None and (rates is None or any(r < 1 for r in rates)):
            problems.append(
                f"aspp_rates: each ASPP rate must be a positive integer, got {self.aspp_rates!r} "
                "(None derives them from output_stride; () keeps only the 1x1 branch and image pooling)"
            )
        else:
            self._set("aspp_rates", rates)
        grid = _int_tuple(self.multi_grid)
        if self.multi_grid is not None and (grid is None or not grid or any(m < 1 for m in grid)):
            problems.append(f"multi_grid must be positive integers, e.g. (1, 2, 4), got {self.multi_grid!r}")
        elif self.multi_grid is not None and self.backbone == "mobilenet_v2":
            problems.append("multi_grid applies to resnet50/resnet101/xception* backbones, not mobilenet_v2")
        else:
            # The per-backbone unit count (3 for every current backbone) is checked by the backbone.
            self._set("multi_grid", grid)
        channels = _positive_int(self.in_channels)
        if channels is None:
            problems.append(f"in_channels must be a positive integer, got {self.in_channels!r}")
        else:
            self._set("in_channels", channels)
        for name in ("input_mean", "input_std"):
            value = getattr(self, name)
            if value is None:
                continue
            stats = _float_tuple(tuple(value) if isinstance(value, list) else value)
            if stats is None or (channels is not None and len(stats) != channels) or \
                    not all(math.isfinite(v) for v in stats) or (name == "input_std" and min(stats) <= 0):
                problems.append(f"{name} must be {self.in_channels} finite numbers (one per input channel"
                                f"{', > 0' if name == 'input_std' else ''}), got {value!r}")
            else:
                self._set(name, stats)
        if problems:
            raise ConfigError("invalid ModelConfig: " + "; ".join(problems))


def _positive_int(value: Any) -> Optional[int]:
    """``int(value)`` for an integer >= 1 (numpy integers included), else ``None``; bools and floats are rejected."""
    if isinstance(value, bool):
        return None
    try:
        number = operator.index(value)
    except TypeError:
        return None
    return number if number >= 1 else None


def _int_tuple(values: Any) -> Optional[Tuple[int, ...]]:
    """A sequence of integers as a tuple of ints; ``None`` for ``None`` or anything else."""
    if values is None or isinstance(values, (str, bytes)):
        return None
    try:
        items = list(values)
    except TypeError:
        return None
    out = []
    for item in items:
        if isinstance(item, bool):
            return None
        try:
            out.append(operator.index(item))
        except TypeError:
            return None
    return tuple(out)



AMP_DTYPES = ("auto", "bf16", "fp16")


@dataclass(frozen=True)
class TrainRecipe(_PlainDict):
    """The training recipe: everything that decides the trained weights. Defaults are the
    paper's PASCAL VOC ``train_aug`` setting.

    Attributes:
        lr: initial learning rate of the poly schedule (paper: 0.007; 1e-4 to fine-tune
            on trainval).
        momentum: SGD momentum.
        nesterov: Nesterov momentum (the paper uses plain momentum).
        weight_decay: L2 weight decay (paper: 4e-5 Xception/MobileNetV2, 1e-4 ResNet).
        decay_norm_and_bias: also decay BatchNorm scales/shifts and biases. ``False``
            matches the TF reference, which regularises conv/linear weights only.
        decay_depthwise: decay depthwise conv kernels too. The TF reference's Xception
            and separable ASPP/decoder convs do not (``regularize_depthwise=False``);
            set ``False`` to match it exactly.
        poly_power: exponent of ``lr * (1 - step / max_steps) ** power``.
        max_steps: optimizer steps in the whole run; the poly schedule reaches 0 there.
        batch_size: GLOBAL batch per optimizer step, summed over processes and
            accumulation steps (paper: 16). Must divide by ``world_size * accum_steps``.
            Keeping it global makes the data order independent of the hardware.
        accum_steps: micro-batches accumulated per optimizer step.
        crop_size: training crop side (paper: 513 VOC, 769 Cityscapes).
        scale_range: random rescaling range before cropping (paper: 0.5-2.0).
        scale_step: rescaling granularity (paper: 0.25; 0 means continuous).
        hflip: random left-right flip.
        ignore_index: label ignored by the loss (and the metric).
        amp: mixed precision (bf16 autocast on CPU; bf16 or fp16 + GradScaler on CUDA).
        amp_dtype: ``"auto"`` (bf16 where supported, else fp16), ``"bf16"`` or ``"fp16"``.
        freeze_bn: BatchNorm in eval mode with frozen scale/shift (paper: OS 8 fine-tuning,
            or when the per-device batch is too small to estimate statistics).
        sync_bn: synchronise BatchNorm statistics across processes in distributed runs.
        channels_last: NHWC memory format on CUDA (faster convs with tensor cores).
        seed: seeds model-side randomness (dropout), shuffling and augmentation.
        loss: loss spec, one of ce|ohem|topk|focal|dice|lovasz or a weighted sum such as
            ``"ce:1,dice:0.5"`` (see ``deeplab.losses``).
        class_weights: one loss weight per class (``deeplab data check`` suggests
            median-frequency weights), or ``None``.
        ohem_thresh: OHEM keeps pixels whose target probability is below this.
        ohem_min_kept: OHEM keeps at least this many pixels per image (per rank).
        topk_percent: fraction of the hardest pixels the ``topk`` loss keeps (TF's
            top_k_percent_pixels).
        focal_gamma: focusing exponent of the focal loss.
        dice_smooth: additive smoothing of the Dice loss.
        lovasz_per_image: Lovász-softmax averaged per image instead of flat over the batch.
        augment: albumentations pipeline (YAML, ``A.save`` format) applied to image and mask
            before the paper's scale/crop/flip; ``None``: the paper's recipe only.
        qat: quantization-aware fine-tuning for the int8 export: the convolutions it quantizes
            compute with int8-rounded weights and inputs over tracked input ranges, which the
            checkpoint keeps and ``deeplab export --precision int8`` writes into the file (see
            ``deeplab.train.qat``). Needs ``freeze_bn``; start from a trained checkpoint.
    """

    lr: float = 0.007
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 4e-5
    decay_norm_and_bias: bool = False
    decay_depthwise: bool = True
    poly_power: float = 0.9
    max_steps: int = 30000
    batch_size: int = 16
    accum_steps: int = 1
    crop_size: int = 513
    scale_range: Tuple[float, float] = (0.5, 2.0)
    scale_step: float = 0.25
    hflip: bool = True
    ignore_index: int = 255
    amp: bool = False
    amp_dtype: str = "auto"
    freeze_bn: bool = False
    sync_bn: bool = True
    channels_last: bool = True
    seed: int = 0
    loss: str = "ce"
    class_weights: Optional[Tuple[float, ...]] = None
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100000
    topk_percent: float = 0.25
    focal_gamma: float = 2.0
    dice_smooth: float = 1.0
    lovasz_per_image: bool = False
    augment: Optional[str] = None
    qat: bool = False

    _TUPLES: ClassVar[Dict[str, type]] = {"scale_range": float, "class_weights": float}

    def __post_init__(self) -> None:
        _raise_problems(self, self._recipe_problems())

    def _recipe_problems(self) -> List[str]:
        problems = []
        for name in ("max_steps", "batch_size", "accum_steps", "crop_size"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.batch_size % self.accum_steps:
            problems.append(
                f"batch_size={self.batch_size} (global) must be divisible by "
                f"accum_steps={self.accum_steps}"
            )
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            problems.append(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        if self.amp_dtype not in AMP_DTYPES:
            problems.append(f"unknown amp_dtype {self.amp_dtype!r}; choose from {list(AMP_DTYPES)}")
        if self.qat and not self.freeze_bn:
            problems.append("qat fine-tunes with BatchNorm frozen (the folded int8 weights it simulates need fixed "
                            "statistics): add freeze_bn (--freeze-bn)")
        return problems + self._loss_problems()

    def _loss_problems(self) -> List[str]:
        """Validate (and normalise) the loss fields; the loss names are checked by ``deeplab.losses``."""
        problems = []
        if not isinstance(self.loss, str) or not self.loss.strip():
            problems.append(f"loss must be a spec such as 'ce' or 'ce:1,dice:0.5', got {self.loss!r}")
        if self.class_weights is not None:
            weights = _float_tuple(tuple(self.class_weights) if isinstance(self.class_weights, list)
                                   else self.class_weights)
            if weights is None or not weights or not all(math.isfinite(w) and w >= 0 for w in weights):
                problems.append(f"class_weights must be finite numbers >= 0, one per class, got {self.class_weights!r}")
            else:
                self._set("class_weights", weights)
        if not 0.0 < float(self.ohem_thresh) <= 1.0:
            problems.append(f"ohem_thresh must be in (0, 1], got {self.ohem_thresh}")
        if int(self.ohem_min_kept) < 0:
            problems.append(f"ohem_min_kept must be >= 0, got {self.ohem_min_kept}")
        if not 0.0 < float(self.topk_percent) <= 1.0:
            problems.append(f"topk_percent must be in (0, 1], got {self.topk_percent}")
        if float(self.focal_gamma) < 0:
            problems.append(f"focal_gamma must be >= 0, got {self.focal_gamma}")
        if float(self.dice_smooth) < 0:
            problems.append(f"dice_smooth must be >= 0, got {self.dice_smooth}")
        return problems


@dataclass(frozen=True)
class RunSettings(_PlainDict):
    """How a run is carried out: where it writes, how often it evaluates, logs and saves, on
    which device and with how many workers. None of these changes the trained weights, so an
    exact resume may change any of them.

    Attributes:
        eval_every: evaluate every this many steps (0: only at the end).
        ckpt_every: write ``last.pt`` every this many steps (0: only at the end).
        log_every: log train metrics every this many steps.
        num_workers: DataLoader worker processes (results do not depend on it).
        device: ``"auto"`` (CUDA if available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        run_dir: where ``last.pt``, ``best.pt`` and ``metrics.jsonl`` go.
        resume_from: checkpoint to resume from exactly; ``"auto"`` resumes from
            ``run_dir/last.pt`` when it exists and starts fresh otherwise.
        dist_timeout: seconds a rank waits in a collective (or for the others to join)
            before it fails with a one-line error instead of hanging; must exceed the
            longest wait of one rank for another (downloads, checkpoint writes).
    """

    eval_every: int = 2000
    ckpt_every: int = 1000
    log_every: int = 20
    num_workers: int = 4
    device: str = "auto"
    run_dir: str = "runs/deeplab"
    resume_from: Optional[str] = None
    dist_timeout: float = 600.0  # rationale: deeplab.distributed.DEFAULT_DIST_TIMEOUT_S

    def __post_init__(self) -> None:
        _raise_problems(self, self._run_problems())

    def _run_problems(self) -> List[str]:
        problems = []
        if int(self.log_every) < 1:
            problems.append(f"log_every must be >= 1, got {self.log_every}")
        for name in ("eval_every", "ckpt_every", "num_workers"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.dist_timeout > 0:
            problems.append(f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        return problems


def _raise_problems(config: _PlainDict, problems: List[str]) -> None:
    if problems:
        raise ConfigError(f"invalid {type(config).__name__}: " + "; ".join(problems))


@dataclass(frozen=True)
class TrainConfig(RunSettings, TrainRecipe):
    """A training run: the :class:`TrainRecipe` fields followed by the :class:`RunSettings`
    fields, flat, as the ``deeplab train`` flags and the YAML presets spell them.

    Stored verbatim in every training checkpoint (``"train_config"``) so a run can be
    resumed, or audited, from the file alone; an exact resume checks the recipe and lets
    the run settings change. :attr:`recipe` and :attr:`run` give the two halves, and
    :meth:`compose` builds one from them.
    """

    _TUPLES: ClassVar[Dict[str, type]] = TrainRecipe._TUPLES

    def __post_init__(self) -> None:
        _raise_problems(self, self._recipe_problems() + self._run_problems())

    @property
    def recipe(self) -> TrainRecipe:
        """The fields that decide the trained weights."""
        return TrainRecipe(**{f.name: getattr(self, f.name) for f in fields(TrainRecipe)})

    @property
    def run(self) -> RunSettings:
        """The fields a resume may change."""
        return RunSettings(**{f.name: getattr(self, f.name) for f in fields(RunSettings)})

    @classmethod
    def compose(cls, recipe: TrainRecipe, run: Optional[RunSettings] = None) -> "TrainConfig":
        """One config from a recipe and (default: :class:`RunSettings` ``()``) run settings."""
        halves = (recipe, run if run is not None else RunSettings())
        return cls(**{f.name: getattr(half, f.name) for half in halves for f in fields(half)})


# ---------------------------------------------------------------------- inference
INFERENCE_MODES = ("whole", "slide")
# "auto": the fastest this CPU accelerates whose stored export parity is within bound.
# The one precision tuple: what a model can run at; InferenceConfig adds "auto" (the policy).
PRECISIONS = ("fp32", "bf16", "int8")
INFERENCE_PRECISIONS = ("auto", *PRECISIONS)
IntPair = Union[int, Tuple[int, int]]


@dataclass(frozen=True)
class InferenceConfig(_PlainDict):
    """How test-time inference runs: one object for ``predict_probs``, ``evaluate``,
    ``Segmenter`` and the ``deeplab eval`` / ``deeplab predict`` flags.

    Sequences are normalised on construction (``scales`` to a tuple of floats, a list
    ``crop_size``/``stride`` to a tuple, an int ``pad_to`` to ``(n, n)``), so equal settings
    compare equal however they were spelled.

    Attributes:
        mode: ``"whole"`` (pad the image to the next ``OS*k+1`` size, one pass) or
            ``"slide"`` (overlapping ``crop_size`` windows every ``stride`` pixels).
        scales: image scales whose softmax is averaged (paper: 0.5 .. 1.75 step 0.25).
        flip: also average the left-right flipped input.
        crop_size: sliding-window size, int or ``(h, w)``; ``"slide"`` only.
        stride: sliding-window step, int or ``(h, w)``, at most ``crop_size`` in
            ``"slide"`` mode. The default 341 is two thirds of the default 513 window.
        output_stride: output stride to run at; ``None`` = the model's. Where a checkpoint
            is loaded (``deeplab eval``, ``Segmenter.from_checkpoint``) the model is rebuilt
            at it; ``predict_probs`` uses it for the ``OS*k+1`` padding.
        pad_to: pad every image (before rescaling) at the bottom/right to at least
            ``(h, w)``, as the TF reference evaluates (VOC 513x513, Cityscapes 1025x2049);
            ``None``: no fixed padding.
        precision: numeric precision of the model where it is loaded (``Segmenter``,
            ``deeplab predict``): ``"auto"`` (the fastest precision this CPU accelerates whose
            parity, measured at export, is within bound; fp32 for a checkpoint), ``"fp32"``,
            ``"bf16"`` or ``"int8"`` (an int8 export). See :mod:`deeplab.deploy.quantize`.
    """

    mode: str = "whole"
    scales: Tuple[float, ...] = (1.0,)
    flip: bool = False
    crop_size: IntPair = 513
    stride: IntPair = 341
    output_stride: Optional[int] = None
    pad_to: Optional[Tuple[int, int]] = None
    precision: str = "auto"

    _TUPLES: ClassVar[Dict[str, type]] = {"scales": float}

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in INFERENCE_MODES:
            problems.append(f"unknown inference mode {self.mode!r}; mode must be one of {list(INFERENCE_MODES)}")
        scales = _float_tuple(self.scales)
        if scales is None or not scales or min(scales) <= 0 or not all(math.isfinite(s) for s in scales):
            problems.append(f"scales must be a non-empty sequence of positive numbers, got {self.scales!r}")
        else:
            self._set("scales", scales)
        crop = _int_pair(self.crop_size)
        if crop is None:
            problems.append(f"crop_size must be a positive int or (height, width), got {self.crop_size!r}")
        elif not isinstance(self.crop_size, int):  # a list or numpy ints: store a plain tuple
            self._set("crop_size", crop)
        step = _int_pair(self.stride)
        if step is None:
            problems.append(f"stride must be a positive int or (height, width), got {self.stride!r}")
        elif not isinstance(self.stride, int):
            self._set("stride", step)
        if self.mode == "slide" and crop is not None and step is not None and (step[0] > crop[0] or step[1] > crop[1]):
            problems.append(
                f"stride {step} larger than crop_size {crop} would leave pixels unpredicted; "
                "use a stride of at most crop_size"
            )
        if self.output_stride is not None and (
            not isinstance(self.output_stride, int) or isinstance(self.output_stride, bool) or self.output_stride < 1
        ):
            problems.append(
                f"output_stride must be None (the model's) or a positive int, got {self.output_stride!r}"
            )
        if self.pad_to is not None:
            pad = _int_pair(self.pad_to)
            if pad is None:
                problems.append(f"pad_to must be None or (height, width) of positive ints, got {self.pad_to!r}")
            else:
                self._set("pad_to", pad)
        self._set("flip", bool(self.flip))
        if self.precision not in INFERENCE_PRECISIONS:
            problems.append(f"unknown precision {self.precision!r}; choose from {list(INFERENCE_PRECISIONS)}")
        if problems:
            raise ConfigError("invalid InferenceConfig: " + "; ".join(problems))

    @property
    def crop_hw(self) -> Tuple[int, int]:
        """``crop_size`` as ``(h, w)``."""
        pair = _int_pair(self.crop_size)
        assert pair is not None  # validated in __post_init__
        return pair

    @property
    def stride_hw(self) -> Tuple[int, int]:
        """``stride`` as ``(h, w)``."""
        pair = _int_pair(self.stride)
        assert pair is not None  # validated in __post_init__
        return pair


def _float_tuple(value: Any) -> Optional[Tuple[float, ...]]:
    """``value`` as a tuple of floats, or ``None`` if it is not a sequence of numbers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None


def _int_pair(value: Any) -> Optional[Tuple[int, int]]:
    """An int ``n`` as ``(n, n)``, an ``(h, w)`` sequence as a tuple; ``None`` if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        pair: Tuple[Any, ...] = (value, value)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        pair = tuple(value)
    else:
        return None
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and int(v) >= 1 for v in pair):
        return None
    return int(pair[0]), int(pair[1])

"""The settings of a reference model that its weights cannot reveal, and the named presets.

A TF DeepLab checkpoint's variables tell the backbone, the head's layers and the number of
classes, but not how the reference ran them: ``output_stride``, the ASPP ``atrous_rates``,
``multi_grid`` (the unit-rate multipliers of ResNet's ``block4`` / Xception's ``exit_flow/block2``),
``decoder_output_stride``. These are flags of tensorflow/models ``research/deeplab/common.py``
(``--output_stride``, ``--atrous_rates``, ``--multi_grid`` at :74-76, ``--decoder_output_stride``)
that the reference's train/eval scripts set. A model rebuilt with other values computes
another function from the same weights (a ResNet-beta model trained with multi-grid (1, 2, 4)
and converted without it agrees with the reference on about half of the pixels), so the
converter never guesses them: they are given one by one, or by a named preset of
:data:`REFERENCE_CONFIGS` that says which reference configuration it reproduces, and they are
recorded in the converted checkpoint (``converted_from["settings"]``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

from .._utils import DeeplabError


class SettingsError(DeeplabError, ValueError):
    """Unknown preset, or settings that contradict each other or the checkpoint."""


@dataclass(frozen=True)
class ReferenceSettings:
    """How the reference ran a model (``common.py`` flags); ``None`` means "not given".

    Attributes:
        output_stride: ``--output_stride`` (8, 16 or 32) the converted config is built with;
            ``deeplab eval --output-stride`` can rebuild it at another one.
        atrous_rates: ``--atrous_rates`` of ASPP's 3x3 branches; ``()`` for none (MobileNetV2).
        multi_grid: ``--multi_grid``: rate multipliers of the three units of ResNet's ``block4``
            or of the three separable convs of Xception's ``exit_flow/block2``; ``(1, 1, 1)`` is
            the reference's default (``None`` there); ``()`` for MobileNetV2, which has none.
        decoder_output_stride: ``--decoder_output_stride`` (4, the only one our decoder has);
            ``0`` for no decoder (DeepLabv3).
        image_pooling: ``add_image_level_feature``; ``None`` reads it off the checkpoint
            (``image_pooling/weights``), a value is checked against it.
    """

    output_stride: Optional[int] = None
    atrous_rates: Optional[Tuple[int, ...]] = None
    multi_grid: Optional[Tuple[int, ...]] = None
    decoder_output_stride: Optional[int] = None
    image_pooling: Optional[bool] = None

    def __post_init__(self) -> None:
        for name in ("atrous_rates", "multi_grid"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(int(v) for v in value))
        if self.output_stride is not None and self.output_stride not in (8, 16, 32):
            raise SettingsError(f"output_stride must be 8, 16 or 32, got {self.output_stride}")
        if self.decoder_output_stride not in (None, 0, 4):
            raise SettingsError(
                f"decoder_output_stride {self.decoder_output_stride}: our decoder refines at stride 4 (the "
                "reference's [4] for every released model); use 4, or none for a DeepLabv3 checkpoint"
            )
        if any(r < 1 for r in self.atrous_rates or ()) or any(m < 1 for m in self.multi_grid or ()):
            raise SettingsError(f"atrous rates and multi-grid must be positive integers, got {self}")

    def merged_over(self, base: "ReferenceSettings") -> "ReferenceSettings":
        """These settings where given, ``base``'s elsewhere."""
        given: Dict[str, Any] = {k: v for k, v in self.to_dict(raw=True).items() if v is not None}
        return replace(base, **given)

    def to_dict(self, raw: bool = False) -> Dict[str, object]:
        out: Dict[str, object] = {
            "output_stride": self.output_stride,
            "atrous_rates": None if self.atrous_rates is None else list(self.atrous_rates),
            "multi_grid": None if self.multi_grid is None else list(self.multi_grid),
            "decoder_output_stride": self.decoder_output_stride,
            "image_pooling": self.image_pooling,
        }
        if raw:
            out["atrous_rates"], out["multi_grid"] = self.atrous_rates, self.multi_grid
        return out


@dataclass(frozen=True)
class ReferenceConfig:
    """A named reference configuration: the model it builds and where the reference says so."""

    name: str
    backbone: str
    dataset: str
    settings: ReferenceSettings
    source: str

    def describe(self) -> str:
        s = self.settings
        rates = " ".join(map(str, s.atrous_rates or ())) or "none"
        grid = " ".join(map(str, s.multi_grid or ())) or "none"
        dec = s.decoder_output_stride or "none"
        return (f"{self.backbone} on {self.dataset}: output stride {s.output_stride}, atrous rates {rates}, "
                f"multi-grid {grid}, decoder stride {dec} ({self.source})")


_XCEPTION = ReferenceSettings(output_stride=16, atrous_rates=(6, 12, 18), multi_grid=(1, 1, 1),
                              decoder_output_stride=4)
_MOBILENET = ReferenceSettings(output_stride=16, atrous_rates=(), multi_grid=(), decoder_output_stride=0)
# common.py:74-76: "Set multi_grid = [1, 2, 4] when using provided 'resnet_v1_{50,101}_beta' checkpoints."
_RESNET_BETA = ReferenceSettings(output_stride=16, atrous_rates=(6, 12, 18), multi_grid=(1, 2, 4),
                                 decoder_output_stride=4)
_XCEPTION_SOURCE = ("g3doc/model_zoo.md + local_test.sh: --model_variant=xception_65 --atrous_rates=6 "
                    "--atrous_rates=12 --atrous_rates=18 --output_stride=16 --decoder_output_stride=4")
_MOBILENET_SOURCE = ("g3doc/model_zoo.md + local_test_mobilenetv2.sh: --model_variant=mobilenet_v2 "
                     "--output_stride=16, no atrous_rates, no decoder")
_RESNET_SOURCE = ("common.py: multi_grid [1, 2, 4] with the resnet_v1_*_beta checkpoints; the DeepLabv3+ paper's "
                  "Table 3 ResNet-101 rows: --atrous_rates=6 --atrous_rates=12 --atrous_rates=18 --output_stride=16 "
                  "--decoder_output_stride=4")

REFERENCE_CONFIGS: Dict[str, ReferenceConfig] = {
    c.name: c
    for c in (
        ReferenceConfig("xception65_voc", "xception65", "voc", _XCEPTION, _XCEPTION_SOURCE),
        ReferenceConfig("xception65_cityscapes", "xception65", "cityscapes", _XCEPTION,
                        _XCEPTION_SOURCE + " (g3doc/cityscapes.md)"),
        ReferenceConfig("xception65_ade20k", "xception65", "ade20k", _XCEPTION,
                        _XCEPTION_SOURCE + " (g3doc/ade20k.md)"),
        ReferenceConfig("mobilenetv2_voc", "mobilenet_v2", "voc", _MOBILENET, _MOBILENET_SOURCE),
        ReferenceConfig("mobilenetv2_cityscapes", "mobilenet_v2", "cityscapes", _MOBILENET, _MOBILENET_SOURCE),
        ReferenceConfig("resnet_v1_101_beta_voc", "resnet_v1_101_beta", "voc", _RESNET_BETA, _RESNET_SOURCE),
        ReferenceConfig("resnet_v1_50_beta_voc", "resnet_v1_50_beta", "voc", _RESNET_BETA, _RESNET_SOURCE),
        ReferenceConfig("resnet_v1_101_beta_voc_deeplabv3", "resnet_v1_101_beta", "voc",
                        replace(_RESNET_BETA, decoder_output_stride=0),
                        _RESNET_SOURCE.replace(" --decoder_output_stride=4", "; DeepLabv3: no decoder")),
    )
}


def reference_config(name: str) -> ReferenceConfig:
    """The preset called ``name``; an unknown name lists the choices."""
    if name not in REFERENCE_CONFIGS:
        raise SettingsError(f"unknown reference config {name!r}; choose from {sorted(REFERENCE_CONFIGS)}")
    return REFERENCE_CONFIGS[name]


def presets_for(backbone: str) -> Tuple[str, ...]:
    return tuple(name for name, c in REFERENCE_CONFIGS.items() if c.backbone == backbone)


# What each setting is, per backbone family: the error messages and `deeplab convert tf --help` say it.
MULTI_GRID_HELP = (
    "unit-rate multipliers of the last stage (common.py --multi_grid): ResNet: block4's three units "
    "(the resnet_v1_*_beta checkpoints: 1 2 4); Xception: the three separable convs of exit_flow/block2 "
    "(reference default: 1 1 1); MobileNetV2: none (it has no multi-grid)"
)


def resolve(settings: Optional[ReferenceSettings], preset: Optional[str], backbone: str,
            ) -> Tuple[ReferenceSettings, Dict[str, str], Optional[ReferenceConfig]]:
    """Settings given one by one over a named preset's; returns (settings, where each came from, preset)."""
    given = settings or ReferenceSettings()
    provenance = {k: "given" for k, v in given.to_dict(raw=True).items() if v is not None}
    if preset is None:
        return given, provenance, None
    config = reference_config(preset)
    if config.backbone != backbone:
        others = ", ".join(presets_for(backbone)) or "none"
        raise SettingsError(
            f"reference config {preset} is a {config.backbone} model, but the checkpoint holds a {backbone}; "
            f"presets for {backbone}: {others}"
        )
    for key, value in config.settings.to_dict(raw=True).items():
        if value is not None and key not in provenance:
            provenance[key] = f"reference config {preset}"
    return given.merged_over(config.settings), provenance, config


def settle(settings: ReferenceSettings, *, backbone: str, atrous_branches: int, decoder: bool, image_pooling: bool,
           what: str) -> ReferenceSettings:
    """Check ``settings`` against what the checkpoint holds; every setting it needs must be given.

    Returns complete settings (``image_pooling`` filled in from the checkpoint when not given).

    Raises:
        SettingsError: one message listing every missing or contradicting setting and the presets.
    """
    s = settings
    missing: List[str] = []
    wrong: List[str] = []
    if s.output_stride is None:
        missing.append("output stride (--output-stride 8|16|32: the reference's --output_stride; the released "
                       "models are trained at 16)")
    if s.atrous_rates is None and atrous_branches == 0:
        s = replace(s, atrous_rates=())  # no 3x3 branch: nothing to guess
    if s.atrous_rates is None:
        missing.append(f"atrous rates (--atrous-rates R ...: one per ASPP 3x3 branch, {atrous_branches} here; "
                       "the released models: 6 12 18 at output stride 16)")
    elif len(s.atrous_rates) != atrous_branches:
        wrong.append(f"{len(s.atrous_rates)} atrous rates {list(s.atrous_rates)}, but the checkpoint has "
                     f"{atrous_branches} ASPP 3x3 branches (aspp1..aspp{atrous_branches})")
    if backbone == "mobilenet_v2":
        if s.multi_grid:
            wrong.append(f"multi-grid {list(s.multi_grid)} for MobileNetV2, which has none")
    elif s.multi_grid is None:
        missing.append(f"multi-grid (--multi-grid R R R: {MULTI_GRID_HELP})")
    elif len(s.multi_grid) != 3:
        wrong.append(f"multi-grid {list(s.multi_grid)}: {backbone} needs three multipliers")
    if decoder and s.decoder_output_stride is None:
        missing.append("decoder output stride (--decoder-output-stride 4: the reference's --decoder_output_stride)")
    elif decoder and s.decoder_output_stride == 0:
        wrong.append("no decoder stride, but the checkpoint has a decoder (decoder/feature_projection0)")
    elif not decoder and s.decoder_output_stride:
        wrong.append(f"decoder output stride {s.decoder_output_stride}, but the checkpoint has no decoder")
    if s.image_pooling is not None and s.image_pooling != image_pooling:
        wrong.append(f"image pooling {'on' if s.image_pooling else 'off'}, but the checkpoint "
                     f"{'has' if image_pooling else 'has no'} image_pooling/weights")
    if missing or wrong:
        presets = presets_for(backbone)
        hint = (f"; or name the reference config it was trained with: --reference-config {' | '.join(presets)}"
                if presets else "")
        parts = ([f"needs settings its weights cannot reveal: {'; '.join(missing)}"] if missing else []) + (
            [f"does not fit the settings given: {'; '.join(wrong)}"] if wrong else [])
        raise SettingsError(f"the {what} " + "; and ".join(parts) + hint)
    return replace(s, image_pooling=image_pooling, decoder_output_stride=s.decoder_output_stride or 0,
                   multi_grid=s.multi_grid if backbone != "mobilenet_v2" else ())


__all__ = ["MULTI_GRID_HELP", "REFERENCE_CONFIGS", "ReferenceConfig", "ReferenceSettings", "SettingsError",
           "presets_for", "reference_config", "resolve", "settle"]

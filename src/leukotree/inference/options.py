"""Inference options, declared once: each :class:`InferenceOptions` field's metadata (help,
choices, bounds, flag; :func:`leukotree.options.option`) drives the flags of ``predict``,
``evaluate``, ``report``, ``serve``, ``explain`` and ``cv`` (each command picks the fields
it uses: :func:`add_inference_arguments`) and the library's validation
(:func:`check_option`, and every :class:`InferenceOptions` checks itself when made).

Adding an inference option is one field here (plus its test) and the command's list of
fields. This module imports neither torch nor the models: the command line's parser is
built from it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from leukotree.data.images import DEFAULT_MAX_PIXELS
from leukotree.errors import LeukotreeError, display_path
from leukotree.options import add_field_arguments, check_field, check_fields, option

if TYPE_CHECKING:
    from leukotree.inference.evidence import EvidenceSettings

#: Inference engines (``--engine``): see :meth:`~leukotree.inference.loader.LoadedModel.predictor`.
ENGINES = ("auto", "torch", "onnx")
#: The confidence ``report`` and ``serve`` refer below unless told otherwise (``predict``
#: refers nothing by default).
REPORT_CONFIDENCE = "0.6"


def _crop_modes() -> tuple[str, ...]:
    from leukotree.data.images import CROP_MODES

    return CROP_MODES


def _aggregates() -> tuple[str, ...]:
    """The registered unfitted patient models' names (``majority``, ``mean``)."""
    from leukotree.patients.models import aggregates

    return aggregates()


@dataclass
class InferenceOptions:
    """How a trained model is applied to images; the flag of ``foo_bar`` is ``--foo-bar``.

    Values are checked when the options are made (a
    :class:`~leukotree.errors.LeukotreeError` names the parameter, its rule and the value).
    ``crop_mode`` and ``pixel_size`` (None: the model's own) resolve into the decoding view
    of a model's configuration with :meth:`input_config`, which returns a new configuration
    and never changes the loaded model's.
    """

    crop_mode: str | None = option(
        None, "decode these images with another crop mode than the model's (auto: tight "
        "crops of a cell, as some labs export, are framed by the cell instead of cut by the "
        "centre crop)", choices=_crop_modes)
    pixel_size: float | None = option(
        None, "micrometres per pixel of these images (another camera or magnification): "
        "each is cropped to the physical field of view the model was trained on (needs a "
        "model trained with --pixel-size)", low=0, low_open=True, high=1000, metavar="UM")
    tta: bool = option(False, "average over the 8 flips/rotations of each image (8x slower)")
    batch_size: int = option(64, "images per batch", low=1)
    workers: int = option(2, "image-reading threads", low=1)
    max_pixels: int = option(DEFAULT_MAX_PIXELS, "refuse images larger than this many pixels (a "
                             "decompression-bomb guard)", low=1)
    engine: str = option("auto", "auto: ONNX Runtime when the onnx extra is installed (faster "
                         "on CPUs; the export is kept beside best.pt), else PyTorch",
                         choices=ENGINES)
    confidence: str | None = option(None, "refer below this conditional probability: one "
                                    "value or one per level (e.g. 0.9,0.8,0.7)")
    aggregate: str = option("majority", "patient-level aggregation for runs without a "
                            "patient model: majority vote or mean probability",
                            choices=_aggregates)
    min_cells: int = option(1, "patients with fewer cells are reported as insufficient",
                            low=1)
    informative_cells: str | None = option(
        None, "the cell types whose cells count as informative for a patient (comma list of "
        "the cell-type head's types, or all); default: the cell taxonomy's own (jhh-cells: "
        "blast, promyelocyte), else every classified cell", metavar="TYPES")
    min_informative_cells: int = option(
        5, "refer a diagnosed patient with fewer informative cells (not flagged "
        "unclassifiable, of the informative types) than this (0: never)", low=0)
    patient_interval: float = option(
        0.95, "level of each patient probability's interval (a bootstrap over the patient's "
        "cells, seeded); a two-leaf patient model refers a patient whose interval straddles "
        "its threshold (0: no interval)", low=0, high=1, high_open=True)
    coverage: float | None = option(
        None, "answer each cell with the deepest tree node that holds its class with this "
        "probability, the threshold fitted again on the run's validation split (default: "
        "the model's own conformal answers, if it was trained with --coverage)", low=0,
        high=1, low_open=True, high_open=True)
    conformal: str | None = option(
        None, "with --coverage: a guarantee over all cells (marginal) or for every class "
        "(mondrian); default: the model's own, else marginal",
        choices=("marginal", "mondrian"))

    def __post_init__(self) -> None:
        check_fields(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace,
                  names: Sequence[str] | None = None) -> InferenceOptions:
        """The options a command's flags gave (the fields it does not take: defaults);
        ``names`` limits them to those fields, for a command whose other flags share a
        field's name with another meaning (``cv``'s training ``--pixel-size``)."""
        wanted = set(_FIELDS if names is None else names)
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)
                      if f.name in wanted and hasattr(args, f.name)})

    def input_config(self, cfg: Any, source: object | None = None) -> Any:
        """The model configuration ``cfg`` (a :class:`~leukotree.models.ModelConfig`) as
        these options decode images: a new configuration
        (:func:`input_config`; ``source`` names the model in
        errors)."""
        return input_config(cfg, crop_mode=self.crop_mode, pixel_size=self.pixel_size,
                            source=source)

    def evidence(self) -> EvidenceSettings:
        """The :class:`~leukotree.inference.evidence.EvidenceSettings` these options give."""
        from leukotree.inference.evidence import EvidenceSettings

        return EvidenceSettings(self.informative_cells, self.min_informative_cells,
                                self.patient_interval)


_FIELDS = {f.name: f for f in fields(InferenceOptions)}


def check_option(name: str, value: Any) -> Any:
    """``value`` converted to inference option ``name``'s type and checked against its
    rule, as the command line checks it."""
    return check_field(_FIELDS[name], value)


def add_inference_arguments(parser: argparse.ArgumentParser, names: Sequence[str], *,
                            defaults: dict[str, Any] | None = None,
                            helps: dict[str, str] | None = None) -> None:
    """A flag for each inference option in ``names`` (in that order), with its default
    (``defaults`` overrides one for this command, e.g. ``report``'s ``confidence``) and
    help (``helps`` says what it does in this command, e.g. ``adapt``'s
    ``pixel_size``); its rule is the option's own."""
    add_field_arguments(parser, InferenceOptions, names=names, defaults=defaults,
                        helps=helps)


def input_config(cfg: Any, *, crop_mode: str | None = None,
                 pixel_size: float | None = None, source: object | None = None,
                 ) -> Any:
    """``cfg`` with its inputs decoded another way (None keeps the model's own): another
    crop mode (see :data:`~leukotree.data.images.CROP_MODES`), e.g. ``auto`` for another
    lab's tight crops; or the inputs' pixel size in micrometres, so a model trained with
    ``pixel_size`` sees the same physical field of view at another magnification
    (``source`` names the model in errors). Its
    :meth:`~leukotree.models.ModelConfig.decode_options` are then what to decode with."""
    from dataclasses import replace

    if crop_mode is not None:
        cfg = replace(cfg, crop_mode=check_option("crop_mode", crop_mode))
    if pixel_size is not None:
        try:
            um = check_option("pixel_size", pixel_size)
        except LeukotreeError:
            raise LeukotreeError(f"The 'pixel_size' parameter (micrometres per pixel of "
                                 f"these images) must be in (0, 1000]; got {pixel_size!r}."
                                 ) from None
        if cfg.field_um is None:
            model = "this model" if source is None else f"'{display_path(source)}'"
            raise LeukotreeError(
                f"The 'pixel_size' parameter (--pixel-size) needs a model that knows the "
                f"physical size of what it saw; {model} was trained without "
                "one. Retrain it with 'leukotree train --pixel-size UM' (micrometres per "
                "pixel of the training images), or leave the pixel size out to crop these "
                "images as the model's own.")
        if cfg.crop_mode == "cell":
            raise LeukotreeError(
                "The 'pixel_size' parameter has no effect with crop mode 'cell' (the crop is "
                "sized by each cell's nucleus); leave one of them out.")
        cfg = replace(cfg, input_pixel_size=um)
    return cfg

"""Self-describing model files, loaded without executing any code.

A checkpoint is one torch file holding only tensors and plain Python values
(read back with ``torch.load(weights_only=True)``): the weights, the taxonomy,
the model configuration (including the training set's normalisation), the class
order, the image size, library versions and training metrics.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch

from leukotree import __version__
from leukotree.errors import LeukotreeError
from leukotree.models.calibration import ood_arrays
from leukotree.models.heads import ModelConfig, TreeClassifier, build_model
from leukotree.rundir import RunDir
from leukotree.taxonomy import Taxonomy

FORMAT = "leukotree-model/1"
#: The metadata tag of an ONNX export (written by :mod:`leukotree.inference.export`, read by
#: :class:`~leukotree.inference.predictor.OnnxPredictor`).
ONNX_FORMAT = "leukotree-onnx/2"


def environment() -> dict[str, str]:
    """Versions worth recording with every run."""
    import numpy
    import sklearn
    import timm

    return {
        "leukotree": __version__, "torch": str(torch.__version__), "timm": timm.__version__,
        "numpy": numpy.__version__, "scikit-learn": sklearn.__version__,
        "python": platform.python_version(), "platform": platform.platform(),
    }


def unwrap(model: torch.nn.Module) -> TreeClassifier:
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    return inner  # type: ignore[return-value]


def save_model(path: Path, model: torch.nn.Module, *, extra: dict[str, Any] | None = None,
               patient_model: dict[str, Any] | None = None) -> None:
    """Write ``model`` with everything needed to use it later (atomic replace), and the
    patient-level model fitted on its outputs when there is one."""
    net = unwrap(model)
    payload = {
        "format": FORMAT,
        "taxonomy": net.taxonomy.to_dict(),
        "model_config": net.config.to_dict(),
        "class_order": list(net.taxonomy.leaves),
        "inner_nodes": list(net.taxonomy.inner_nodes),
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "environment": environment(),
        "extra": extra or {},
    }
    if patient_model is not None:
        payload["patient_model"] = patient_model
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of a model file (a run folder means its ``best.pt``), read safely."""
    path = RunDir.checkpoint_of(path)
    if not path.is_file():
        raise LeukotreeError(f"Model file '{path}' does not exist; give a run folder or a .pt "
                             "file written by 'leukotree train'.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LeukotreeError(f"'{path}' is not a readable leukotree model ({err}).") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise LeukotreeError(f"'{path}' is not a leukotree model file (format {FORMAT}).")
    return payload


def load_model(path: str | Path) -> tuple[TreeClassifier, dict[str, Any]]:
    """Rebuild the model of a checkpoint (in eval mode) and return it with its payload."""
    payload = read_checkpoint(path)
    taxonomy = Taxonomy.from_dict(payload["taxonomy"], source=str(path))
    config = ModelConfig.from_dict(payload["model_config"], source=f"'{path}'")
    try:
        model = build_model(taxonomy, config)
    except ValueError as err:  # e.g. a stain target of the wrong length
        raise LeukotreeError(f"The model configuration in '{path}' cannot build a model "
                             f"({err}); the file is damaged or was edited.") from None
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise LeukotreeError(f"The weights in '{path}' do not fit the model it describes "
                             f"({first}); the file is damaged or was edited.") from None
    try:
        calibration = payload.get("calibration") or {}
        model.set_calibration(calibration.get("temperatures"),
                              float(calibration.get("distance_power", 0.0)),
                              float(calibration.get("distance_ref", 1.0)))
        ood = payload.get("ood")
        if ood is not None:
            model.set_ood(**ood_arrays(ood))
            with torch.no_grad():  # the statistics must fit the model's features
                model.eval()(torch.zeros(2, 3, config.img_size, config.img_size))
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError) as err:
        raise LeukotreeError(f"The calibration or out-of-distribution section of '{path}' "
                             f"does not fit its model ({type(err).__name__}: {err}); the file "
                             f"is damaged or was edited, or comes from other versions"
                             f"{_versions_note(payload)}.") from None
    model.eval()
    return model, payload


def _versions_note(payload: dict[str, Any]) -> str:
    """`` (written with leukotree A and timm B; this is leukotree C, timm D)`` where the
    file records them and they differ from the running ones."""
    import timm

    saved = payload.get("environment") or {}
    here = {"leukotree": __version__, "timm": timm.__version__}
    if all(saved.get(k) in (None, v) for k, v in here.items()):
        return ""
    return (" (written with " + ", ".join(f"{k} {saved.get(k, '?')}" for k in here)
            + "; this is " + ", ".join(f"{k} {v}" for k, v in here.items()) + ")")


def update_checkpoint(path: str | Path, **sections: Any) -> None:
    """Set (or, with None, remove) top-level sections of a model file's payload, such
    as ``patient_model``, ``calibration`` or ``ood``, keeping everything else (atomic)."""
    path = RunDir.checkpoint_of(path)
    payload = read_checkpoint(path)
    for key, value in sections.items():
        if value is None:
            payload.pop(key, None)
        else:
            payload[key] = value
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    """Write what ``--resume`` needs (weights, optimiser, schedule, history), atomically."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def read_training_state(path: Path) -> dict[str, Any]:
    """The state written by :func:`save_training_state` (tensors and plain values only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise LeukotreeError(f"Nothing to resume: '{path}' does not exist.") from None
    except Exception as err:
        raise LeukotreeError(f"Cannot resume from '{path}': the file is damaged ({err}). "
                             "Start the run again in a new --out folder.") from None
    if not isinstance(state, dict) or "model" not in state or "epoch" not in state:
        raise LeukotreeError(f"Cannot resume from '{path}': it is not a leukotree training "
                             "state.")
    return state

"""Inference: one loader for every kind of model (:mod:`.loader`), predictors (PyTorch,
ONNX Runtime, ensembles) behind one protocol, the inference options (:mod:`.options`),
decisions for cells and patients (referral), Grad-CAM explanations and ONNX export.

The names below are imported on first use, so that ``leukotree.inference.options`` can be
read without loading torch."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"OnnxPredictor": "predictor", "Predictions": "predictor", "Predictor": "predictor",
          "TorchPredictor": "predictor", "predict_paths": "predictor",
          "LoadedModel": "loader", "load": "loader", "load_predictor": "loader",
          "InferenceOptions": "options"}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'leukotree.inference' has no attribute {name!r}")
    return getattr(import_module(f"leukotree.inference.{_WHERE[name]}"), name)

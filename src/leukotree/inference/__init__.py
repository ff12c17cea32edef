"""Inference: predictors (PyTorch, ONNX Runtime) behind one protocol, decisions for cells
and patients (referral), Grad-CAM explanations and ONNX export."""

from leukotree.inference.predictor import (
    OnnxPredictor,
    Predictions,
    Predictor,
    TorchPredictor,
    load_predictor,
    predict_paths,
)

__all__ = ["OnnxPredictor", "Predictions", "Predictor", "TorchPredictor", "load_predictor",
           "predict_paths"]

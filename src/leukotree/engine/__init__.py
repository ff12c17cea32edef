"""The training engine: configuration, augmentation, the reusable loop and the trainer
that runs it into a run folder (with resume, DDP and AMP)."""

from leukotree.engine.config import PRESETS, TrainConfig, resolve_config
from leukotree.engine.trainer import Trainer, train

__all__ = ["PRESETS", "TrainConfig", "Trainer", "resolve_config", "train"]

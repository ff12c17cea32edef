"""The training engine: configuration, augmentation, the reusable loop and the trainer
that runs it into a run folder (with resume, DDP and AMP).

``Trainer`` and ``train`` load on first use, so importing the configuration (the command
line's parser does) does not import torch.
"""

from typing import Any

from leukotree.engine.config import PRESETS, TrainConfig, resolve_config

__all__ = ["PRESETS", "TrainConfig", "Trainer", "resolve_config", "train"]


def __getattr__(name: str) -> Any:
    if name in ("Trainer", "train"):
        from leukotree.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'leukotree.engine' has no attribute {name!r}")

"""Data: safe image decoding, discovery of labelled and unlabelled images, checks,
patient-grouped splits, the decoded-pixel cache and synthetic images.

Data flows ``discover`` (paths, labels, patient ids) -> ``splits`` (who trains, who
validates; never a patient on two sides) -> ``cache`` (uint8 pixels, decoded once) ->
the engine.
"""

from leukotree.data.discover import (
    InputImage,
    InputSet,
    Sample,
    SampleSet,
    collect_inputs,
    discover,
)
from leukotree.data.images import decode_many, load_rgb_array, open_image, to_tensor

__all__ = ["InputImage", "InputSet", "Sample", "SampleSet", "collect_inputs", "decode_many",
           "discover", "load_rgb_array", "open_image", "to_tensor"]

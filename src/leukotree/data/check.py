"""``leukotree data check``: what is in a data set, and what is wrong with it."""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import imagehash
import numpy as np

from leukotree.data.discover import Problem, Sample, SampleSet
from leukotree.data.images import DEFAULT_MAX_PIXELS, open_image, parallel_map
from leukotree.errors import ImageReadError


@dataclass(frozen=True)
class ImageInfo:
    """What one full decode of an image tells: readable, size, content hashes."""

    path: Path
    error: str | None = None
    width: int = 0
    height: int = 0
    sha256: str = ""
    phash: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


def inspect_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Decode ``path`` completely; record the error instead of raising it."""
    try:
        img = open_image(path, max_pixels=max_pixels)
    except ImageReadError as err:
        return ImageInfo(path, error=err.reason)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    phash = int(str(imagehash.phash(img)), 16)
    return ImageInfo(path, None, img.width, img.height, digest, phash)


def scan_images(
    paths: list[Path],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 2,
    progress: bool = True,
) -> list[ImageInfo]:
    """Inspect every image; errors are recorded in each :class:`ImageInfo`."""
    return list(parallel_map(lambda p: inspect_image(p, max_pixels), paths, workers=workers,
                             progress=progress, description="Reading images"))


def hamming_pairs(hashes: Iterable[int], max_distance: int) -> list[tuple[int, int, int]]:
    """Index pairs ``(i, j, d)`` of 64-bit hashes at Hamming distance ``0 < d <= max_distance``.

    Pigeonhole banding: split the 64 bits into ``max_distance + 1`` bands; two hashes
    within the distance agree exactly on at least one band, so only hashes sharing a
    band value are compared. Exact hash equality (``d == 0``) is included.
    """
    values = [int(h) for h in hashes]
    n_bands = max_distance + 1
    edges = np.linspace(0, 64, n_bands + 1).astype(int)
    candidates: set[tuple[int, int]] = set()
    for lo, hi in itertools.pairwise(edges):
        mask = (1 << int(hi - lo)) - 1
        buckets: dict[int, list[int]] = defaultdict(list)
        for i, v in enumerate(values):
            buckets[(v >> int(lo)) & mask].append(i)
        for members in buckets.values():
            for a in range(len(members)):
                for b in range(a + 1, len(members)):
                    candidates.add((members[a], members[b]))
    out = []
    for i, j in sorted(candidates):
        d = (values[i] ^ values[j]).bit_count()
        if d <= max_distance:
            out.append((i, j, d))
    return out


@dataclass
class CheckReport:
    """The result of :func:`check_dataset`; ``usable`` is False when training would fail."""

    source: str
    taxonomy: str
    patient_source: str
    n_images: int
    n_readable: int
    grouping_note: str | None
    per_class: dict[str, dict[str, int]]
    leaves_without_images: list[str]
    per_patient: dict[str, dict[str, Any]]
    unreadable: list[dict[str, str]]
    exact_duplicates: list[dict[str, Any]]
    near_duplicates: list[dict[str, Any]]
    small_images: list[dict[str, Any]]
    small_patients: list[dict[str, Any]]
    problems: list[dict[str, Any]]
    ignored_files: list[str]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        fatal = any(p["fatal"] for p in self.problems)
        return not fatal and not self.unreadable and self.n_readable > 0

    @property
    def warnings(self) -> int:
        return (
            len(self.exact_duplicates) + len(self.near_duplicates) + len(self.small_images)
            + len(self.small_patients) + sum(not p["fatal"] for p in self.problems)
            + (self.grouping_note is not None)
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["usable"] = self.usable
        out["n_warnings"] = self.warnings
        return out


def check_dataset(
    sample_set: SampleSet,
    *,
    min_size: int = 64,
    min_images_per_patient: int = 4,
    near_duplicate_distance: int = 4,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    workers: int = 2,
    progress: bool = True,
    infos: list[ImageInfo] | None = None,
) -> CheckReport:
    """Read every image of ``sample_set`` and report counts and problems.

    - exact duplicates: identical file bytes (SHA-256);
    - near duplicates: perceptual hashes (pHash, 64 bits) at Hamming distance
      ``<= near_duplicate_distance`` (exact duplicates excluded);
    - small images: either side below ``min_size`` pixels;
    - small patients: fewer than ``min_images_per_patient`` images (the seed
      paper drops slides with fewer than 4).
    """
    samples = sample_set.samples
    if infos is None:
        infos = scan_images([s.path for s in samples], max_pixels=max_pixels, workers=workers,
                            progress=progress)
    ok = [i for i, info in enumerate(infos) if info.ok]
    per_class, leaves_without = _class_counts(sample_set)
    per_patient = _patient_counts(samples)
    exact, near = _duplicates(samples, infos, ok, near_duplicate_distance)
    return CheckReport(
        source=str(sample_set.source),
        taxonomy=sample_set.taxonomy.name,
        patient_source=sample_set.patient_source,
        n_images=len(samples),
        n_readable=len(ok),
        grouping_note=sample_set.grouping_note(),
        per_class=per_class,
        leaves_without_images=leaves_without,
        per_patient=per_patient,
        unreadable=[{"path": str(info.path), "reason": str(info.error)}
                    for info in infos if not info.ok],
        exact_duplicates=exact,
        near_duplicates=near,
        small_images=[
            {"path": str(infos[i].path), "width": infos[i].width, "height": infos[i].height}
            for i in ok if min(infos[i].width, infos[i].height) < min_size],
        small_patients=[{"patient": p, "images": v["images"]} for p, v in per_patient.items()
                        if v["images"] < min_images_per_patient],
        problems=[p.to_dict() for p in sample_set.problems],
        ignored_files=[str(p) for p in sample_set.ignored_files],
        settings={
            "min_size": min_size,
            "min_images_per_patient": min_images_per_patient,
            "near_duplicate_distance": near_duplicate_distance,
            "max_pixels": max_pixels,
        },
    )


def _class_counts(sample_set: SampleSet) -> tuple[dict[str, dict[str, int]], list[str]]:
    """Images and patients per labelled node, and the leaves without any image."""
    samples, tax = sample_set.samples, sample_set.taxonomy
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        by_label[s.label].append(i)
    per_class = {
        node: {"images": len(idx),
               "patients": len({samples[i].patient for i in idx if samples[i].patient}),
               "depth": tax.depth(node), "is_leaf": int(tax.is_leaf(node))}
        for node in tax.nodes if (idx := by_label.get(node, []))}
    return per_class, [leaf for leaf in tax.leaves if leaf not in by_label]


def _patient_counts(samples: list[Sample]) -> dict[str, dict[str, Any]]:
    """Images and images per label of every patient, sorted by patient id."""
    by_patient: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        if s.patient is not None:
            by_patient[s.patient].append(i)
    return {patient: {"images": len(idx),
                      "labels": dict(Counter(samples[i].label for i in idx))}
            for patient, idx in sorted(by_patient.items())}


def _duplicates(samples: list[Sample], infos: list[ImageInfo], ok: list[int],
                max_distance: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Exact duplicates (same bytes) and near duplicates (pHash within ``max_distance``,
    exact ones excluded)."""
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i in ok:
        by_digest[infos[i].sha256].append(i)
    exact = [_duplicate_entry(samples, members) for members in by_digest.values()
             if len(members) > 1]
    same_file = {(a, b) for m in by_digest.values() for a in m for b in m if a < b}
    near = []
    for a, b, d in hamming_pairs([infos[i].phash for i in ok], max_distance):
        i, j = ok[a], ok[b]
        if (i, j) in same_file:
            continue
        entry = _duplicate_entry(samples, [i, j])
        entry["distance"] = d
        near.append(entry)
    return exact, near


def _duplicate_entry(samples: list[Sample], members: list[int]) -> dict[str, Any]:
    labels = sorted({samples[i].label for i in members})
    groups = sorted({samples[i].group for i in members})
    return {
        "paths": [str(samples[i].path) for i in members],
        "labels": labels,
        "conflicting_labels": len(labels) > 1,
        "across_groups": len(groups) > 1,
    }


def problems_from_infos(infos: list[ImageInfo]) -> list[Problem]:
    """Unreadable images as fatal problems (for commands that need every image)."""
    return [Problem("unreadable", str(i.path), str(i.error)) for i in infos if not i.ok]

"""The differential count of a patient's cells, as a technologist reads it off a
CellaVision screen: how many cells of each type, and their share.

For a model of cell types (a taxonomy of kind ``cells``,
:data:`~leukotree.taxonomy.KINDS`) this is what a case adds up to, instead of a
"diagnosis" that would only be the most common cell type.

Each readable cell counts once, under its class (a reviewer's label when it has one,
else the model's leaf). A cell flagged unlike the training cells (unclassifiable) and
not reviewed is counted apart, as is an unreadable one; the shares are over the
classified cells only: ``percent(leaf) = 100 * count(leaf) / n_classified``, with
``n_classified = sum of the counts``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from leukotree.errors import LeukotreeError


@dataclass(frozen=True)
class DifferentialCount:
    """Counts per leaf (in ``leaves`` order) and the cells counted apart."""

    leaves: tuple[str, ...]
    counts: tuple[int, ...]
    n_unclassifiable: int = 0
    n_unreadable: int = 0

    @property
    def n_classified(self) -> int:
        return sum(self.counts)

    def percent(self) -> tuple[float, ...]:
        """``100 * count / n_classified`` per leaf (all 0 without a classified cell)."""
        total = self.n_classified
        return tuple(100.0 * c / total if total else 0.0 for c in self.counts)

    def to_dict(self) -> dict[str, Any]:
        """JSON: ``rows`` (``leaf``, ``count``, ``percent`` to 0.1) and the totals."""
        return {"rows": [{"leaf": leaf, "count": c, "percent": round(p, 1)}
                         for leaf, c, p in zip(self.leaves, self.counts, self.percent(),
                                               strict=True)],
                "n_classified": self.n_classified,
                "n_unclassifiable": self.n_unclassifiable,
                "n_unreadable": self.n_unreadable}


def differential_count(leaves: Sequence[str], labels: Sequence[str | None],
                       unclassifiable: Sequence[bool] | None = None) -> DifferentialCount:
    """The differential of cells whose classes are ``labels`` (one per cell: a leaf, or
    None for an unreadable cell); a cell with ``unclassifiable`` true is counted apart
    (give false for one a reviewer has classified). A label that is no leaf is refused."""
    flags = [False] * len(labels) if unclassifiable is None else list(unclassifiable)
    if len(flags) != len(labels):
        raise LeukotreeError(f"{len(flags)} unclassifiable flags for {len(labels)} cells.")
    index = {leaf: k for k, leaf in enumerate(leaves)}
    counts = [0] * len(leaves)
    odd = unreadable = 0
    for label, flagged in zip(labels, flags, strict=True):
        if label is None:
            unreadable += 1
        elif flagged:
            odd += 1
        elif label in index:
            counts[index[label]] += 1
        else:
            raise LeukotreeError(f"'{label}' is not a leaf ({', '.join(leaves)}); a "
                                 "differential counts each cell under its leaf.")
    return DifferentialCount(tuple(leaves), tuple(counts), odd, unreadable)

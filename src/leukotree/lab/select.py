"""Choosing the cells worth a technologist's review, with a random audit share.

A :class:`Pool` holds the candidate cells and what a model said of each (leaf
probabilities, out-of-distribution score, conformal answer, patient, file digest).
:func:`select_cells` returns ``n`` of them:

1. **Audit cells first.** ``round(audit_share * n)`` cells (half up) are drawn uniformly at
   random from *all* candidates, before any policy looks at them, and marked
   ``audit=True`` (reason ``audit (random)``). They are the lab's unbiased test set and
   must never be trained on. When the pool carries audit flags already decided (``serve``
   decides them once per cell, :func:`audit_flag`), the audit picks are drawn from the
   flagged cells and the policy picks from the others only.
2. **The policy picks the rest** (:data:`POLICIES`), each with a ``reason`` a
   technologist can read.

The scores, each in ``[0, 1]``, higher is more worth reviewing (``L`` leaves):

- margin uncertainty ``U = 1 - (p1 - p2)``, ``p1 >= p2`` the two largest leaf
  probabilities (1: a tie between two leaves; 0: one leaf is certain);
- with conformal answers, answer size ``A = (k - 1) / (L - 1)`` for an answer node
  holding ``k`` leaves, and the uncertainty is ``(U + A) / 2``, else ``U``;
- out-of-distribution ``O = min(s, 2) / 2`` for the score ``s`` (``s > 1``: flagged
  unclassifiable, ``O > 0.5``).

Policies: ``uncertainty`` ranks by the uncertainty; ``ood`` by ``O`` (the model must
score it); ``active`` by ``(uncertainty + O) / 2`` (the uncertainty alone without an
out-of-distribution score) and then spreads the picks: each step takes, among the
remaining cells, the one whose stratum (its predicted leaf, or ``unclassifiable`` for a
flagged cell) has been picked least so far, then whose patient has been picked least,
then the highest score (a round-robin over strata and patients, so that one class or
one patient cannot take the queue); ``random`` draws uniformly.

No duplicates: cells with the same file digest (SHA-256 of the bytes) are one candidate
(the first); and the policy skips a cell whose feature vector is a near-duplicate of a
cell already chosen, cosine distance ``1 - cos(a, b) < near`` (default
:data:`NEAR_DUPLICATE`; only when the pool has vectors), unless nothing else is left.

Everything random comes from a seeded hash of each cell's id (a uniform number in
``[0, 1)`` per cell and seed): the same pool and seed give the same picks, and removing a
cell (reviewed meanwhile) does not reshuffle the others. Cells already reviewed are left
out before anything is drawn (``exclude``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from leukotree.errors import LeukotreeError, did_you_mean, display_path

if TYPE_CHECKING:
    from leukotree.inference.options import InferenceOptions

#: Default share of the queue drawn at random as audit cells.
AUDIT_SHARE = 0.2
#: Cosine distance of feature vectors below which two cells are near-duplicates.
NEAR_DUPLICATE = 0.002
#: The reason of an audit cell.
AUDIT_REASON = "audit (random)"
#: The stratum of a cell flagged unlike the training cells.
UNCLASSIFIABLE = "unclassifiable"


@dataclass
class Pool:
    """Candidate cells (``ids``: file paths, or ``case:index`` in ``serve``) and the
    model's outputs for each: ``leaf_probs`` ``(N, L)`` over ``leaves``; optionally
    ``patients``, ``ood_score`` ``(N,)`` (> 1: flagged), conformal ``answer_nodes`` with
    ``answer_sizes`` (leaves under each), feature ``vectors`` ``(N, D)``, file
    ``digests`` and pre-decided ``audit`` flags."""

    ids: list[str]
    leaves: tuple[str, ...]
    leaf_probs: np.ndarray
    patients: list[str | None] | None = None
    ood_score: np.ndarray | None = None
    answer_nodes: list[str] | None = None
    answer_sizes: np.ndarray | None = None
    vectors: np.ndarray | None = None
    digests: list[str | None] | None = None
    audit: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.ids)
        self.leaf_probs = np.asarray(self.leaf_probs, dtype=np.float64).reshape(
            n, len(self.leaves) if n == 0 else -1)
        if self.leaf_probs.shape[1] != len(self.leaves):
            raise LeukotreeError(f"The pool's leaf probabilities have "
                                 f"{self.leaf_probs.shape[1]} columns for "
                                 f"{len(self.leaves)} leaves.")
        for name in ("patients", "ood_score", "answer_nodes", "answer_sizes", "vectors",
                     "digests", "audit"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise LeukotreeError(f"The pool's '{name}' has {len(value)} entries for "
                                     f"{n} cells.")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def predicted(self) -> list[str]:
        """The most probable leaf of each cell."""
        return [self.leaves[k] for k in self.leaf_probs.argmax(1)]

    @property
    def flagged(self) -> np.ndarray:
        """Cells unlike the training cells (``ood_score > 1``)."""
        if self.ood_score is None:
            return np.zeros(len(self), dtype=bool)
        return np.nan_to_num(np.asarray(self.ood_score, dtype=float)) > 1.0

    def strata(self) -> list[str]:
        """Each cell's stratum for spreading: its predicted leaf, or ``unclassifiable``."""
        flagged = self.flagged
        return [UNCLASSIFIABLE if f else leaf
                for f, leaf in zip(flagged, self.predicted, strict=True)]


@dataclass(frozen=True)
class Pick:
    """One chosen cell: its position in the pool, id, why, whether it is an audit cell,
    the policy's score (None for an audit cell) and what the model said of it."""

    index: int
    id: str
    reason: str
    audit: bool
    score: float | None
    predicted: str
    p: float
    ood: float | None
    patient: str | None

    def row(self) -> dict[str, Any]:
        """The queue file's row (``path,reason,audit`` first)."""
        return {"path": self.id, "reason": self.reason, "audit": self.audit,
                "predicted_leaf": self.predicted, "p": round(self.p, 4),
                "ood_score": "" if self.ood is None else round(self.ood, 4),
                "patient": self.patient or "",
                "score": "" if self.score is None else round(self.score, 4)}


# ----------------------------------------------------------------- scores
def margin_uncertainty(leaf_probs: np.ndarray) -> np.ndarray:
    """``U = 1 - (p1 - p2)`` per row, ``p1 >= p2`` its two largest probabilities."""
    probs = np.asarray(leaf_probs, dtype=np.float64)
    top = -np.sort(-probs, axis=1)[:, :2]
    return np.clip(1.0 - (top[:, 0] - top[:, 1]), 0.0, 1.0)


def answer_uncertainty(sizes: np.ndarray, n_leaves: int) -> np.ndarray:
    """``A = (k - 1) / (L - 1)`` for answers holding ``k`` of ``L`` leaves."""
    return (np.asarray(sizes, dtype=np.float64) - 1) / max(n_leaves - 1, 1)


def ood_term(ood_score: np.ndarray) -> np.ndarray:
    """``O = min(s, 2) / 2`` (NaN: 0)."""
    s = np.nan_to_num(np.asarray(ood_score, dtype=np.float64), nan=0.0)
    return np.clip(s, 0.0, 2.0) / 2.0


def uncertainty_score(pool: Pool) -> np.ndarray:
    """``(U + A) / 2`` with conformal answers, else ``U``."""
    u = margin_uncertainty(pool.leaf_probs)
    if pool.answer_sizes is None:
        return u
    return (u + answer_uncertainty(pool.answer_sizes, len(pool.leaves))) / 2


def ood_score(pool: Pool) -> np.ndarray:
    """``O``; a model without an out-of-distribution score is refused."""
    if pool.ood_score is None:
        raise LeukotreeError("The policy 'ood' needs a model that scores cells unlike its "
                             "training cells (trained with --ood-quantile > 0); use "
                             "--policy active or uncertainty.")
    return ood_term(pool.ood_score)


def active_score(pool: Pool) -> np.ndarray:
    """``(uncertainty + O) / 2``, or the uncertainty alone without an ood score."""
    u = uncertainty_score(pool)
    return u if pool.ood_score is None else (u + ood_term(pool.ood_score)) / 2


def uniform_keys(ids: Sequence[str], seed: int, salt: str = "") -> np.ndarray:
    """A uniform number in ``[0, 1)`` per id: the first 8 bytes of
    ``SHA-256(salt:seed:id)`` over ``2**64`` (the same id and seed, the same number)."""
    out = np.empty(len(ids), dtype=np.float64)
    for i, key in enumerate(ids):
        digest = hashlib.sha256(f"{salt}:{seed}:{key}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return out


def audit_flag(key: str, share: float = AUDIT_SHARE) -> bool:
    """Whether the cell ``key`` (``case:index`` in ``serve``) is an audit cell, decided
    once: ``int(SHA-256(key)) / 2**256 < share`` (the whole digest as a number in
    ``[0, 1)``). Independent of the cell's content, so the audit cells are a uniform
    random sample of the cells."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest, "big") / 2**256 < share


# ----------------------------------------------------------------- reasons
def _top_two(pool: Pool, i: int) -> str:
    order = np.argsort(-pool.leaf_probs[i], kind="stable")[:2]
    return " / ".join(f"{pool.leaves[k]} {pool.leaf_probs[i, k]:.2f}" for k in order)


def _uncertain_reason(pool: Pool, i: int) -> str:
    text = f"uncertain: {_top_two(pool, i)}"
    if pool.answer_nodes is not None and pool.answer_sizes is not None:
        k = int(pool.answer_sizes[i])
        if k > 1:
            text += f"; answer {pool.answer_nodes[i]} ({k} classes)"
    return text


def _ood_reason(pool: Pool, i: int) -> str:
    s = float(np.nan_to_num(pool.ood_score[i]))
    leaf = int(pool.leaf_probs[i].argmax())
    said = f"; predicted {pool.leaves[leaf]} {pool.leaf_probs[i, leaf]:.2f}"
    if s > 1:
        return f"unlike training cells (ood {s:.2f}){said}"
    return f"unusual (ood {s:.2f}){said}"


def _active_reason(pool: Pool, i: int) -> str:
    """Why ``active`` offers cell ``i``: unlike the training cells (flagged), unusual
    (``O`` outweighs the uncertainty, score ``s >= 0.5``), uncertain (uncertainty
    ``>= 0.5``), or else only its class's share of the queue (the spread)."""
    u = float(margin_uncertainty(pool.leaf_probs[i:i + 1])[0])
    if pool.answer_sizes is not None:
        u = (u + float(answer_uncertainty(pool.answer_sizes[i:i + 1], len(pool.leaves))[0])) / 2
    if pool.ood_score is not None:
        s = float(np.nan_to_num(pool.ood_score[i]))
        if s > 1 or (s >= 0.5 and ood_term(np.array([s]))[0] > u):
            return _ood_reason(pool, i)
    if u >= 0.5 or pool.ood_score is None:
        return _uncertain_reason(pool, i)
    leaf = int(pool.leaf_probs[i].argmax())
    return f"spread over classes: predicted {pool.leaves[leaf]} {pool.leaf_probs[i, leaf]:.2f}"


@dataclass(frozen=True)
class Policy:
    """A way of choosing cells: its score (``Pool -> (N,)``; None: uniform), whether the
    picks are spread over strata and patients, and the reason it gives a cell."""

    name: str
    score: Callable[[Pool], np.ndarray] | None
    spread: bool
    reason: Callable[[Pool, int], str]
    help: str


#: The policies by name (``--policy``).
POLICIES: dict[str, Policy] = {p.name: p for p in (
    Policy("active", active_score, True, _active_reason,
           "uncertainty and out-of-distribution score, spread over predicted classes and "
           "patients"),
    Policy("uncertainty", uncertainty_score, False, _uncertain_reason,
           "the most uncertain cells (margin between the two likeliest leaves)"),
    Policy("ood", ood_score, False, _ood_reason, "the cells least like the training cells"),
    Policy("random", None, False, lambda pool, i: "random", "uniformly at random"),
)}


# ----------------------------------------------------------------- checks
def check_request(n: object, audit_share: object, policy: object) -> tuple[int, float, Policy]:
    """``n``, ``audit_share`` and the policy, checked (before any image is read)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise LeukotreeError(f"The 'n' parameter (--n, cells to choose) must be an integer "
                             f">= 1; got {n!r}.")
    try:
        share = float(audit_share)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        share = math.nan
    if not 0 <= share < 1:
        raise LeukotreeError(f"The 'audit_share' parameter (--audit-share) must be in [0, 1): "
                             f"the share of the queue drawn at random for auditing; got "
                             f"{audit_share!r}.")
    if policy not in POLICIES:
        raise LeukotreeError(f"Unknown policy {policy!r} (--policy): choose one of "
                             f"{', '.join(POLICIES)}." + did_you_mean(str(policy), POLICIES))
    return int(n), share, POLICIES[str(policy)]


def audit_count(n: int, share: float) -> int:
    """``round(share * n)``, halves up: the audit cells of a queue of ``n``."""
    return math.floor(share * n + 0.5)


# ----------------------------------------------------------------- selection
def select_cells(pool: Pool, n: int, *, policy: str = "active",
                 audit_share: float = AUDIT_SHARE, seed: int = 0,
                 near: float = NEAR_DUPLICATE, exclude: Iterable[str] = (),
                 fill: bool = False) -> list[Pick]:
    """``n`` cells of ``pool`` to review (see the module's docstring): the audit cells
    first, then the policy's picks in the order chosen. ``exclude``: ids never chosen
    (already reviewed). More than the cells left is refused, saying how many there are;
    with ``fill`` (``serve``'s queue) all that are left are returned instead."""
    n, audit_share, chosen_policy = check_request(n, audit_share, policy)
    candidates = _candidates(pool, set(exclude))
    if n > len(candidates):
        if not fill:
            raise LeukotreeError(
                f"--n {n} is more than the {len(candidates)} cell(s) that can be chosen "
                f"(of {len(pool)}, after leaving out reviewed and duplicate cells); give "
                f"--n {len(candidates)} or fewer, or more cells." if candidates else
                f"No cell can be chosen: all {len(pool)} are reviewed or duplicates.")
        n = len(candidates)
    keys = uniform_keys(pool.ids, seed, "audit")
    n_audit = audit_count(n, audit_share)
    if pool.audit is None:
        audit = sorted(candidates, key=lambda i: keys[i])[:n_audit]
        rest = [i for i in candidates if i not in set(audit)]
        spare: list[int] = []
    else:
        flagged = sorted((i for i in candidates if pool.audit[i]), key=lambda i: keys[i])
        audit, spare = flagged[:n_audit], flagged[n_audit:]
        rest = [i for i in candidates if not pool.audit[i]]
    picks = [_pick(pool, i, AUDIT_REASON, True, None) for i in audit]
    order = uniform_keys(pool.ids, seed, "order")
    scores = (order if chosen_policy.score is None else chosen_policy.score(pool))
    for i, note in _policy_order(pool, rest, n - len(audit), scores, order, chosen_policy,
                                 near, audit):
        reason = chosen_policy.reason(pool, i) + note
        picks.append(_pick(pool, i, reason, False, float(scores[i])))
    for i in spare[:n - len(picks)]:  # serve: too few cells that are not audit cells
        picks.append(_pick(pool, i, AUDIT_REASON, True, None))
    return picks


def _candidates(pool: Pool, exclude: set[str]) -> list[int]:
    """Positions of the cells that may be chosen: not excluded, each id and each file
    digest once (the first)."""
    seen_ids: set[str] = set()
    seen_digests: set[str] = set()
    out = []
    for i, key in enumerate(pool.ids):
        digest = pool.digests[i] if pool.digests is not None else None
        if key in exclude or key in seen_ids or (digest is not None and digest in seen_digests):
            continue
        seen_ids.add(key)
        if digest is not None:
            seen_digests.add(digest)
        if np.isfinite(pool.leaf_probs[i]).all():
            out.append(i)
    return out


def _policy_order(pool: Pool, rest: list[int], m: int, scores: np.ndarray,
                  order: np.ndarray, policy: Policy, near: float, taken: list[int],
                  ) -> list[tuple[int, str]]:
    """Up to ``m`` of ``rest`` in the policy's order, with a note for a near-duplicate
    taken because nothing else was left."""
    if m <= 0 or not rest:
        return []
    idx = np.asarray(rest)
    strata = _codes(pool.strata() if policy.spread else [""] * len(pool))
    patients = _codes(pool.patients if policy.spread and pool.patients is not None
                      else [""] * len(pool))
    stratum_count = np.zeros(strata.max() + 1, dtype=np.int64)
    patient_count = np.zeros(patients.max() + 1, dtype=np.int64)
    vectors = _unit(pool.vectors)
    chosen = list(taken)
    left = np.ones(len(idx), dtype=bool)
    out: list[tuple[int, str]] = []
    skipped: list[tuple[int, str]] = []
    while len(out) < m and left.any():
        live = idx[left]
        best = np.lexsort((order[live], -scores[live], patient_count[patients[live]],
                           stratum_count[strata[live]]))[0]
        i = int(live[best])
        left[np.flatnonzero(idx == i)[0]] = False
        twin = _near_twin(vectors, i, chosen, near, pool.ids)
        if twin is not None:
            skipped.append((i, f" (near-duplicate of {twin})"))
            continue
        out.append((i, ""))
        chosen.append(i)
        stratum_count[strata[i]] += 1
        patient_count[patients[i]] += 1
    return out + skipped[:m - len(out)]


def _codes(values: Sequence[str | None]) -> np.ndarray:
    names = {v: k for k, v in enumerate(dict.fromkeys(values))}
    return np.array([names[v] for v in values], dtype=np.int64)


def _unit(vectors: np.ndarray | None) -> np.ndarray | None:
    if vectors is None:
        return None
    v = np.nan_to_num(np.asarray(vectors, dtype=np.float64))
    norms = np.linalg.norm(v, axis=1, keepdims=True)
    return v / np.where(norms > 0, norms, 1.0)


def _near_twin(vectors: np.ndarray | None, i: int, chosen: list[int], near: float,
               ids: Sequence[str]) -> str | None:
    """The id of a chosen cell whose vector is within cosine distance ``near`` of
    cell ``i``'s, or None."""
    if vectors is None or not chosen or near <= 0:
        return None
    distance = 1.0 - vectors[chosen] @ vectors[i]
    k = int(np.argmin(distance))
    return ids[chosen[k]] if distance[k] < near else None


def _pick(pool: Pool, i: int, reason: str, audit: bool, score: float | None) -> Pick:
    leaf = int(pool.leaf_probs[i].argmax())
    ood = None if pool.ood_score is None else float(np.nan_to_num(pool.ood_score[i]))
    return Pick(i, pool.ids[i], reason, audit, score, pool.leaves[leaf],
                float(pool.leaf_probs[i, leaf]), ood,
                None if pool.patients is None else pool.patients[i])


# ----------------------------------------------------------------- from files
@dataclass
class Selection:
    """What :func:`select_from_run` chose, and the cells it could not use."""

    picks: list[Pick]
    n_inputs: int
    n_excluded: int
    unreadable: list[str]
    engine: str

    def rows(self) -> list[dict[str, Any]]:
        return [p.row() for p in self.picks]


def read_done(path: str | Path) -> set[str]:
    """The resolved paths of a CSV with a ``path`` column (cells already reviewed: an
    earlier queue, a corrections manifest); relative paths count from the CSV's folder,
    as in a manifest."""
    import csv

    path = Path(path)
    if not path.is_file():
        raise LeukotreeError(f"--exclude '{display_path(path)}' does not exist; give a CSV "
                             "with a 'path' column of the cells already reviewed.")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise LeukotreeError(f"--exclude '{display_path(path)}' has no 'path' column "
                                 f"(found {reader.fieldnames}); give a CSV whose 'path' "
                                 "column lists the cells already reviewed.")
        rows = [(row.get("path") or "").strip() for row in reader]
    return {_resolved(p if Path(p).is_absolute() else path.parent / p) for p in rows if p}


def _resolved(path: str | Path) -> str:
    import os

    return display_path(os.path.realpath(path))


def file_digest(path: str | Path) -> str | None:
    """SHA-256 of a file's bytes (None when it cannot be read)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def select_from_run(run: str | Path, inputs: Sequence[str | Path], n: int, *,
                    policy: str = "active", audit_share: float = AUDIT_SHARE, seed: int = 0,
                    exclude: Iterable[str | Path] = (), patients: str = "auto",
                    options: InferenceOptions | None = None, near: float = NEAR_DUPLICATE,
                    progress: bool = True) -> Selection:
    """``leukotree select``: predict the cells of ``inputs`` (images, folders, manifests,
    as ``predict`` reads them) with the model of ``run`` (as ``options`` say) and choose
    ``n`` (:func:`select_cells`). Paths are compared and written resolved; ``exclude``
    (paths, e.g. :func:`read_done`) are never chosen. Too large an ``n`` is refused
    before any image is predicted."""
    from leukotree.data.discover import collect_inputs
    from leukotree.inference.conformal import answer_nodes
    from leukotree.inference.loader import load
    from leukotree.inference.options import InferenceOptions
    from leukotree.inference.predictor import predict_paths

    check_request(n, audit_share, policy)
    options = options or InferenceOptions()
    loaded = load(run)
    predictor = loaded.predictor(options.engine)
    view = options.input_config(predictor.model_config, source=run)
    found = collect_inputs(inputs, patients, predictor.taxonomy)
    done = {_resolved(p) for p in exclude}
    images, seen = [], set()
    for image in found.images:
        key = _resolved(image.path)
        if key not in done and key not in seen:
            seen.add(key)
            images.append((key, image))
    if n > len(images):
        raise LeukotreeError(
            f"--n {n} is more than the {len(images)} cell(s) that can be chosen (of "
            f"{len(found.images)} given, {len(found.images) - len(images)} reviewed or "
            f"given twice); give --n {len(images)} or fewer, or more cells.")
    preds = predict_paths(predictor, [img.path for _, img in images],
                          batch_size=options.batch_size, workers=options.workers,
                          progress=progress, on_error="report", tta=options.tta,
                          max_pixels=options.max_pixels,
                          pixel_sizes=[img.pixel_size for _, img in images], config=view)
    ok = np.flatnonzero(preds.ok)
    tax = predictor.taxonomy
    nodes = sizes = None
    if predictor.conformal is not None and len(ok):
        nodes = answer_nodes(tax, preds.leaf_probs[ok], predictor.conformal)
        sizes = np.array([len(tax.descendant_leaves(v)) for v in nodes])
    pool = Pool([images[i][0] for i in ok], tax.leaves, preds.leaf_probs[ok],
                patients=[images[i][1].patient for i in ok],
                ood_score=None if preds.ood_score is None else preds.ood_score[ok],
                answer_nodes=nodes, answer_sizes=sizes,
                vectors=None if preds.features is None else preds.features[ok],
                digests=[file_digest(images[i][1].path) for i in ok])
    picks = select_cells(pool, n, policy=policy, audit_share=audit_share, seed=seed,
                         near=near)
    return Selection(picks, len(found.images), len(found.images) - len(images),
                     [e for e in preds.errors if e is not None], predictor.engine)

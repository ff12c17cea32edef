"""Patient-level models: from a bag of cells to the probability of each diagnosis.

Registered by name in :data:`PATIENT_MODELS` (``--patient-model``); each class declares
its parameters (``defaults``), the training options that set them (``config_fields``),
whether it reads the cell-type head (``needs_cells``) and, for the unfitted ones, the
``--aggregate`` value it answers to when a run has no patient model (``aggregate``).
Adding a patient model is one registered class (and its test):

- ``vote``: the share of cells whose most probable leaf is each diagnosis (the seed
  paper's slide-level majority vote; ``--aggregate majority``); ``mean``: the mean of the
  cells' probabilities (``--aggregate mean``). Neither is fitted.
- ``fraction``: the DeepAPL paper's simple baseline, the fraction of one cell type
  (``promyelocyte`` by default: ``mean_i P(cell type | cell i)``), turned into a
  probability by a one-feature logistic regression.
- ``differential``: the differential count (the mean cell-type probability vector)
  and the mean diagnosis probabilities, standardised, into an L2 logistic regression;
  ``cell-mix``: the differential count alone (no diagnosis head).
- ``focused``: the mean diagnosis probability of the cells that carry the disease, each
  cell weighted by the cell-type head's probability that it is one of the informative
  cell types (:data:`INFORMATIVE_CELLS`, e.g. blasts and promyelocytes): lymphocytes and
  neutrophils, which say nothing of the leukemia but much of the patient's slide, hardly
  count. ``focused-mix``: that focused mean beside the differential count, into an L2
  logistic regression.
- ``mil``: attention-based multiple-instance learning (Ilse et al. 2018, gated
  attention) over each cell's features and probabilities; the attention weight of every
  cell says how much it drove the decision. An ensemble of a few seeds.

A fitted model is plain numbers (``state_dict``), so it travels inside the checkpoint
and the ONNX file. Importing this module imports neither PyTorch nor scikit-learn (the
training options read the registry); the models that need them import them when fitted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from leukotree.errors import LeukotreeError, did_you_mean
from leukotree.patients.bags import Bag
from leukotree.taxonomy import Taxonomy

if TYPE_CHECKING:
    import torch

    from leukotree.patients.attention import GatedAttention


#: The cell types that carry the diagnosis, per cell taxonomy: what the ``focused``
#: patient models and the evidence count of :mod:`leukotree.inference.evidence` read.
INFORMATIVE_CELLS: dict[str, tuple[str, ...]] = {"jhh-cells": ("blast", "promyelocyte")}

#: A weight every cell has in a focused mean besides its informative probability, so
#: that a patient without any informative cell gets the plain mean.
FOCUS_FLOOR = 1e-3


class PatientModel:
    """Bags in, diagnosis probabilities out: ``fit``, ``predict_proba``, ``cell_weights``.

    A subclass declares what the training options and the decision path need to know of
    it, so that nothing outside this module switches on a patient model's name.
    """

    name: ClassVar[str] = "base"
    needs_fit: ClassVar[bool] = True
    #: Whether it reads the cell-type head's probabilities (``--cell-taxonomy``).
    needs_cells: ClassVar[bool] = False
    #: Its parameters and their defaults.
    defaults: ClassVar[dict[str, Any]] = {}
    #: The training option (a :class:`~leukotree.engine.config.TrainConfig` field) that
    #: sets each parameter, e.g. ``{"cell_type": "patient_fraction_of"}``.
    config_fields: ClassVar[dict[str, str]] = {}
    #: The ``--aggregate`` value this unfitted model answers to when a run has none.
    aggregate: ClassVar[str | None] = None

    def __init__(self, taxonomy: Taxonomy, cell_taxonomy: Taxonomy | None = None,
                 **params: Any) -> None:
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise LeukotreeError(
                f"The '{self.name}' patient model has no parameter {', '.join(unknown)}; its "
                f"parameters are: {', '.join(self.defaults) or 'none'}.")
        self.taxonomy = taxonomy
        self.cell_taxonomy = cell_taxonomy
        self.params = {**self.defaults, **params}

    @classmethod
    def check_params(cls, params: dict[str, Any], cell_taxonomy: Taxonomy | None) -> None:
        """Refuse parameters (or a missing cell-type head) before any image is read."""
        if cls.needs_cells and cell_taxonomy is None:
            raise LeukotreeError(
                f"The '{cls.name}' patient model reads cell types: give --cell-taxonomy and "
                "--cell-labels.")

    def fit(self, bags: Sequence[Bag], y: np.ndarray, seed: int = 0) -> PatientModel:
        return self

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        """``(n_bags, n_leaves)`` probabilities of the diagnosis leaves."""
        raise NotImplementedError

    def aggregate_probs(self, bag: Bag) -> np.ndarray:
        """What an unfitted model reports as the patient's probabilities (the vote shares,
        the mean); :meth:`predict_proba` by default."""
        return self.predict_proba([bag])[0]

    def diagnose(self, bag: Bag) -> int:
        """The leaf an unfitted model diagnoses: the most probable one by default."""
        return int(self.predict_proba([bag])[0].argmax())

    def weak_support(self, bag: Bag, leaf: int, threshold: float) -> str | None:
        """Why an unfitted model's diagnosis is too weakly supported by the cells to stand
        (``threshold``: the last level's), or None."""
        return None

    def cell_weights(self, bag: Bag) -> np.ndarray:
        """How much each cell drove the decision (sums to 1): uniform by default."""
        return np.full(len(bag), 1 / max(1, len(bag)))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


PATIENT_MODELS: dict[str, type[PatientModel]] = {}


def register(cls: type[PatientModel]) -> type[PatientModel]:
    PATIENT_MODELS[cls.name] = cls
    return cls


def patient_model_class(name: str) -> type[PatientModel]:
    if name not in PATIENT_MODELS:
        raise LeukotreeError(f"Unknown patient model '{name}': choose one of "
                             f"{', '.join(PATIENT_MODELS)}." + did_you_mean(name, PATIENT_MODELS))
    return PATIENT_MODELS[name]


def build_patient_model(name: str, taxonomy: Taxonomy, cell_taxonomy: Taxonomy | None,
                        **params: Any) -> PatientModel:
    return patient_model_class(name)(taxonomy, cell_taxonomy, **params)


def aggregates() -> tuple[str, ...]:
    """The ``--aggregate`` values: those of the registered unfitted models."""
    return tuple(cls.aggregate for cls in PATIENT_MODELS.values() if cls.aggregate)


def check_aggregate(method: str) -> str:
    """``method`` when it is an ``--aggregate`` value, else the error naming them."""
    if method not in aggregates():
        raise LeukotreeError(f"The 'aggregate' parameter must be one of "
                             f"{', '.join(aggregates())}; got {method!r}."
                             + did_you_mean(str(method), aggregates()))
    return method


def aggregation_model(method: str, taxonomy: Taxonomy) -> PatientModel:
    """The unfitted patient model that ``--aggregate method`` names."""
    check_aggregate(method)
    return next(cls for cls in PATIENT_MODELS.values() if cls.aggregate == method)(taxonomy)


def vote_shares(leaf_probs: np.ndarray) -> np.ndarray:
    """``share_k = #{cells whose most probable leaf is k} / n``."""
    votes = np.bincount(leaf_probs.argmax(1), minlength=leaf_probs.shape[1])
    return votes / max(1, len(leaf_probs))


def majority_leaf(leaf_probs: np.ndarray) -> int:
    """The leaf most cells vote for; a tie goes to the higher mean probability (a tie in
    both to the leaf voted for first)."""
    mean = leaf_probs.mean(0)
    votes = Counter(leaf_probs.argmax(1).tolist())
    return int(max(votes, key=lambda leaf: (votes[leaf], mean[leaf])))


@register
class VoteModel(PatientModel):
    """Share of the cells voting for each leaf; ties go to the higher mean probability
    (:func:`majority_leaf`; in the probabilities, ``+ 1e-6 * mean`` ranks them so)."""

    name = "vote"
    needs_fit = False
    aggregate = "majority"

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        out = []
        for bag in bags:
            shares = vote_shares(bag.leaf_probs) + 1e-6 * bag.leaf_probs.mean(0)
            out.append(shares / shares.sum())
        return np.array(out)

    def aggregate_probs(self, bag: Bag) -> np.ndarray:
        return vote_shares(bag.leaf_probs)

    def diagnose(self, bag: Bag) -> int:
        return majority_leaf(bag.leaf_probs)

    def weak_support(self, bag: Bag, leaf: int, threshold: float) -> str | None:
        share = float(vote_shares(bag.leaf_probs)[leaf])
        if share >= threshold:
            return None
        return f"{share:.0%} of the cells vote {self.taxonomy.leaves[leaf]}, below {threshold:.0%}"

    def cell_weights(self, bag: Bag) -> np.ndarray:
        winner = self.predict_proba([bag])[0].argmax()
        voted = (bag.leaf_probs.argmax(1) == winner).astype(float)
        return voted / max(1.0, voted.sum())


@register
class MeanModel(PatientModel):
    """Mean of the cells' leaf probabilities."""

    name = "mean"
    needs_fit = False
    aggregate = "mean"

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        return np.array([bag.leaf_probs.mean(0) for bag in bags])

    def cell_weights(self, bag: Bag) -> np.ndarray:
        winner = bag.leaf_probs.mean(0).argmax()
        evidence = bag.leaf_probs[:, winner]
        return evidence / max(1e-12, evidence.sum())


class _LogisticModel(PatientModel):
    """Standardised bag features into an L2 logistic regression (balanced classes,
    inverse regularisation strength ``C``)."""

    defaults: ClassVar[dict[str, Any]] = {"C": 1.0}

    def bag_features(self, bags: Sequence[Bag]) -> np.ndarray:
        raise NotImplementedError

    def fit(self, bags: Sequence[Bag], y: np.ndarray, seed: int = 0) -> PatientModel:
        x = self.bag_features(bags)
        self.mean_, self.scale_ = x.mean(0), x.std(0) + 1e-6
        if len(set(y.tolist())) < 2:
            raise LeukotreeError("A patient-level model needs patients of at least two "
                                 "diagnoses among the training patients.")
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=float(self.params["C"]), class_weight="balanced",
                                max_iter=2000)
        lr.fit((x - self.mean_) / self.scale_, y)
        self.classes_, self.coef_, self.intercept_ = lr.classes_, lr.coef_, lr.intercept_
        return self

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        z = (self.bag_features(bags) - self.mean_) / self.scale_
        scores = z @ self.coef_.T + self.intercept_
        if scores.shape[1] == 1:  # binary: P(classes_[1]) = sigmoid(score)
            p1 = 1 / (1 + np.exp(-scores[:, 0]))
            part = np.stack([1 - p1, p1], axis=1)
        else:
            part = np.exp(scores - scores.max(1, keepdims=True))
            part /= part.sum(1, keepdims=True)
        out = np.zeros((len(bags), len(self.taxonomy.leaves)))
        out[:, self.classes_] = part
        return out

    def state_dict(self) -> dict[str, Any]:
        return {k: np.asarray(getattr(self, k)).tolist()
                for k in ("mean_", "scale_", "classes_", "coef_", "intercept_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, np.asarray(value))
        self.classes_ = self.classes_.astype(np.int64)


def _cell_probs(model: PatientModel, bag: Bag) -> np.ndarray:
    if bag.cell_probs is None or model.cell_taxonomy is None:
        raise LeukotreeError(f"The '{model.name}' patient model needs a cell-type head: "
                             "train with --cell-taxonomy and --cell-labels.")
    return bag.cell_probs


@register
class FractionModel(_LogisticModel):
    """The fraction of one cell type (soft: the mean probability of that node)."""

    name = "fraction"
    needs_cells = True
    defaults: ClassVar[dict[str, Any]] = {"C": 1.0, "cell_type": "promyelocyte"}
    config_fields: ClassVar[dict[str, str]] = {"cell_type": "patient_fraction_of"}

    @classmethod
    def check_params(cls, params: dict[str, Any], cell_taxonomy: Taxonomy | None) -> None:
        super().check_params(params, cell_taxonomy)
        cell_taxonomy.resolve(params.get("cell_type", cls.defaults["cell_type"]),
                              where="--patient-fraction-of")

    def bag_features(self, bags: Sequence[Bag]) -> np.ndarray:
        node = self.params["cell_type"]
        cells = self.cell_taxonomy
        if cells is None:
            return np.array([_cell_probs(self, b) for b in bags])  # raises the clear error
        leaves = [cells.leaf_index[leaf] for leaf in cells.descendant_leaves(
            cells.resolve(node, where="--patient-fraction-of"))]
        return np.array([[_cell_probs(self, b)[:, leaves].sum(1).mean()] for b in bags])

    def cell_weights(self, bag: Bag) -> np.ndarray:
        cells = self.cell_taxonomy
        leaves = [cells.leaf_index[leaf] for leaf in cells.descendant_leaves(
            cells.resolve(self.params["cell_type"]))]
        evidence = _cell_probs(self, bag)[:, leaves].sum(1)
        return evidence / max(1e-12, evidence.sum())


@register
class DifferentialModel(_LogisticModel):
    """The differential count (mean cell-type probabilities) plus the mean diagnosis
    probabilities of the cells."""

    name = "differential"
    needs_cells = True

    def bag_features(self, bags: Sequence[Bag]) -> np.ndarray:
        return np.array([np.concatenate([_cell_probs(self, b).mean(0), b.leaf_probs.mean(0)])
                         for b in bags])


@register
class CellMixModel(_LogisticModel):
    """The differential count alone (mean cell-type probabilities), without the diagnosis
    head: what the cell types a technologist would count say of the patient."""

    name = "cell-mix"
    needs_cells = True

    def bag_features(self, bags: Sequence[Bag]) -> np.ndarray:
        return np.array([_cell_probs(self, b).mean(0) for b in bags])


def focus_types(cell_taxonomy: Taxonomy | None, spec: str | None,
                where: str = "focus_cells") -> tuple[str, ...]:
    """The informative cell types (nodes of ``cell_taxonomy``): the comma list ``spec``,
    or :data:`INFORMATIVE_CELLS` of the cell taxonomy when ``spec`` is None."""
    if cell_taxonomy is None:
        raise LeukotreeError("A focused patient model reads cell types: give --cell-taxonomy "
                             "and --cell-labels.")
    if spec is None:
        if cell_taxonomy.name not in INFORMATIVE_CELLS:
            raise LeukotreeError(
                f"The '{where}' parameter is needed: the cell taxonomy '{cell_taxonomy.name}' "
                f"has no default informative cell types (known for "
                f"{', '.join(INFORMATIVE_CELLS)}). Name the cell types that carry the "
                f"diagnosis, e.g. {where}: {', '.join(cell_taxonomy.leaves[:2])}.")
        return INFORMATIVE_CELLS[cell_taxonomy.name]
    names = [n.strip() for n in str(spec).split(",") if n.strip()]
    if not names:
        raise LeukotreeError(f"The '{where}' parameter must name cell types (comma list); "
                             f"got {spec!r}.")
    return tuple(cell_taxonomy.resolve(n, where=where) for n in names)


def in_focus(cell_taxonomy: Taxonomy, types: Sequence[str], label: str) -> bool:
    """Whether the cell type ``label`` lies under one of the nodes ``types``."""
    return any(t in cell_taxonomy.path(cell_taxonomy.resolve(label)) for t in types)


def informative_probability(cell_taxonomy: Taxonomy, types: Sequence[str],
                            cell_probs: np.ndarray) -> np.ndarray:
    """Per cell, ``P(informative) = sum of P(leaf)`` over the cell-type leaves under
    ``types``."""
    leaves = sorted({cell_taxonomy.leaf_index[leaf] for t in types
                     for leaf in cell_taxonomy.descendant_leaves(t)})
    return np.asarray(cell_probs)[:, leaves].sum(1)


class _Focused:
    """The focused mean: ``p_k = sum_i w_i p_ik / sum_i w_i`` with ``w_i = P(informative |
    cell i) + FOCUS_FLOOR``."""

    taxonomy: Taxonomy
    cell_taxonomy: Taxonomy | None
    params: dict[str, Any]
    name: ClassVar[str]

    @classmethod
    def check_params(cls, params: dict[str, Any], cell_taxonomy: Taxonomy | None) -> None:
        super().check_params(params, cell_taxonomy)  # type: ignore[misc]
        focus_types(cell_taxonomy, params.get("cell_types"))

    def focus_weights(self, bag: Bag) -> np.ndarray:
        types = focus_types(self.cell_taxonomy, self.params["cell_types"])
        return informative_probability(self.cell_taxonomy, types,
                                       _cell_probs(self, bag)) + FOCUS_FLOOR

    def focused_mean(self, bag: Bag) -> np.ndarray:
        w = self.focus_weights(bag)
        return (w[:, None] * bag.leaf_probs).sum(0) / w.sum()

    def _focused_cell_weights(self, bag: Bag, winner: int) -> np.ndarray:
        evidence = self.focus_weights(bag) * bag.leaf_probs[:, winner]
        return evidence / max(1e-12, evidence.sum())


@register
class FocusedModel(_Focused, PatientModel):
    """The focused mean of the diagnosis probabilities (see :class:`_Focused`); not fitted."""

    name = "focused"
    needs_fit = False
    needs_cells = True
    defaults: ClassVar[dict[str, Any]] = {"cell_types": None}
    config_fields: ClassVar[dict[str, str]] = {"cell_types": "focus_cells"}

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        return np.array([self.focused_mean(b) for b in bags])

    def cell_weights(self, bag: Bag) -> np.ndarray:
        return self._focused_cell_weights(bag, int(self.focused_mean(bag).argmax()))


@register
class FocusedMixModel(_Focused, _LogisticModel):
    """The differential count (mean cell-type probabilities) beside the focused mean of
    the diagnosis probabilities, into the logistic regression."""

    name = "focused-mix"
    needs_cells = True
    defaults: ClassVar[dict[str, Any]] = {"C": 1.0, "cell_types": None}
    config_fields: ClassVar[dict[str, str]] = {"cell_types": "focus_cells"}

    def bag_features(self, bags: Sequence[Bag]) -> np.ndarray:
        return np.array([np.concatenate([_cell_probs(self, b).mean(0), self.focused_mean(b)])
                         for b in bags])

    def cell_weights(self, bag: Bag) -> np.ndarray:
        return self._focused_cell_weights(bag, int(self.predict_proba([bag])[0].argmax()))


@register
class MILModel(PatientModel):
    """Attention MIL over ``[features, cell-type probabilities, diagnosis probabilities]``
    of each cell, standardised on the training cells; ``seeds`` networks averaged."""

    name = "mil"
    defaults: ClassVar[dict[str, Any]] = {"seeds": 5, "hidden": 64, "epochs": 40}

    def _inputs(self, bag: Bag) -> np.ndarray:
        parts = [bag.features, bag.leaf_probs]
        if bag.cell_probs is not None:
            parts.append(bag.cell_probs)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def fit(self, bags: Sequence[Bag], y: np.ndarray, seed: int = 0) -> PatientModel:
        import torch

        cells = np.concatenate([self._inputs(b) for b in bags])
        self.mean_, self.scale_ = cells.mean(0), cells.std(0) + 1e-6
        xs = [torch.from_numpy((self._inputs(b) - self.mean_) / self.scale_) for b in bags]
        counts = np.bincount(y, minlength=len(self.taxonomy.leaves))
        weight = torch.tensor(len(y) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
        self.nets_ = [self._train(xs, torch.from_numpy(y), weight, seed + k)
                      for k in range(int(self.params["seeds"]))]
        return self

    def _train(self, xs: list[torch.Tensor], y: torch.Tensor, weight: torch.Tensor,
               seed: int) -> GatedAttention:
        import torch
        from torch import nn

        from leukotree.patients.attention import GatedAttention

        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = GatedAttention(xs[0].shape[1], int(self.params["hidden"]),
                                  len(self.taxonomy.leaves), 0.25)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
            net.train()
            for _ in range(int(self.params["epochs"])):
                for i in torch.randperm(len(xs), generator=gen).tolist():
                    keep = torch.rand(len(xs[i]), generator=gen) > 0.2  # drop 20% of cells
                    logits, _ = net(xs[i][keep] if keep.any() else xs[i])
                    loss = nn.functional.cross_entropy(logits[None], y[i:i + 1],
                                                       weight=weight)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        return net.eval()

    def _run(self, bag: Bag) -> tuple[np.ndarray, np.ndarray]:
        import torch

        x = torch.from_numpy((self._inputs(bag) - self.mean_) / self.scale_)
        probs, weights = [], []
        with torch.no_grad():
            for net in self.nets_:
                logits, a = net(x)
                probs.append(torch.softmax(logits, 0).numpy())
                weights.append(a.numpy())
        return np.mean(probs, 0), np.mean(weights, 0)

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        return np.array([self._run(b)[0] for b in bags])

    def cell_weights(self, bag: Bag) -> np.ndarray:
        return self._run(bag)[1]

    def state_dict(self) -> dict[str, Any]:
        return {"mean_": self.mean_.tolist(), "scale_": self.scale_.tolist(),
                "hidden": int(self.params["hidden"]),
                "nets_": [{k: v.tolist() for k, v in n.state_dict().items()}
                          for n in self.nets_]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import torch

        from leukotree.patients.attention import GatedAttention

        self.mean_ = np.asarray(state["mean_"], dtype=np.float32)
        self.scale_ = np.asarray(state["scale_"], dtype=np.float32)
        self.nets_ = []
        for weights in state["nets_"]:
            net = GatedAttention(len(self.mean_), int(state["hidden"]),
                                  len(self.taxonomy.leaves), 0.25)
            net.load_state_dict({k: torch.tensor(v) for k, v in weights.items()})
            self.nets_.append(net.eval())


def patient_params(config: Any) -> dict[str, Any]:
    """The parameters a training configuration gives its patient model: each of the
    model's ``config_fields`` read from ``config`` (none for ``patient_model`` none)."""
    if config.patient_model == "none":
        return {}
    cls = patient_model_class(config.patient_model)
    return {param: getattr(config, name) for param, name in cls.config_fields.items()}

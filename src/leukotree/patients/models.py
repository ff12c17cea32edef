"""Patient-level models: from a bag of cells to the probability of each diagnosis.

Registered by name in :data:`PATIENT_MODELS` (``--patient-model``):

- ``vote``: the share of cells whose most probable leaf is each diagnosis (the seed
  paper's slide-level majority vote); ``mean``: the mean of the cells' probabilities.
  Neither is fitted.
- ``fraction``: the DeepAPL paper's simple baseline, the fraction of one cell type
  (``promyelocyte`` by default: ``mean_i P(cell type | cell i)``), turned into a
  probability by a one-feature logistic regression.
- ``differential``: the differential count (the mean cell-type probability vector)
  and the mean diagnosis probabilities, standardised, into an L2 logistic regression.
- ``mil``: attention-based multiple-instance learning (Ilse et al. 2018, gated
  attention) over each cell's features and probabilities; the attention weight of every
  cell says how much it drove the decision. An ensemble of a few seeds.

A fitted model is plain numbers (``state_dict``), so it travels inside the checkpoint
and the ONNX file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from leukotree.errors import LeukotreeError, did_you_mean
from leukotree.patients.bags import Bag
from leukotree.taxonomy import Taxonomy


class PatientModel:
    """Bags in, diagnosis probabilities out: ``fit``, ``predict_proba``, ``cell_weights``."""

    name: ClassVar[str] = "base"
    needs_fit: ClassVar[bool] = True

    def __init__(self, taxonomy: Taxonomy, cell_taxonomy: Taxonomy | None = None,
                 **params: Any) -> None:
        self.taxonomy = taxonomy
        self.cell_taxonomy = cell_taxonomy
        self.params = params

    def fit(self, bags: Sequence[Bag], y: np.ndarray, seed: int = 0) -> PatientModel:
        return self

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        """``(n_bags, n_leaves)`` probabilities of the diagnosis leaves."""
        raise NotImplementedError

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


@register
class VoteModel(PatientModel):
    """Share of the cells voting for each leaf; ties go to the higher mean probability."""

    name = "vote"
    needs_fit = False

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        out = []
        for bag in bags:
            votes = np.bincount(bag.leaf_probs.argmax(1), minlength=bag.leaf_probs.shape[1])
            shares = votes / max(1, len(bag)) + 1e-6 * bag.leaf_probs.mean(0)
            out.append(shares / shares.sum())
        return np.array(out)

    def cell_weights(self, bag: Bag) -> np.ndarray:
        winner = self.predict_proba([bag])[0].argmax()
        voted = (bag.leaf_probs.argmax(1) == winner).astype(float)
        return voted / max(1.0, voted.sum())


@register
class MeanModel(PatientModel):
    """Mean of the cells' leaf probabilities."""

    name = "mean"
    needs_fit = False

    def predict_proba(self, bags: Sequence[Bag]) -> np.ndarray:
        return np.array([bag.leaf_probs.mean(0) for bag in bags])

    def cell_weights(self, bag: Bag) -> np.ndarray:
        winner = bag.leaf_probs.mean(0).argmax()
        evidence = bag.leaf_probs[:, winner]
        return evidence / max(1e-12, evidence.sum())


class _LogisticModel(PatientModel):
    """Standardised bag features into an L2 logistic regression (balanced classes)."""

    def bag_features(self, bags: Sequence[Bag]) -> np.ndarray:
        raise NotImplementedError

    def fit(self, bags: Sequence[Bag], y: np.ndarray, seed: int = 0) -> PatientModel:
        x = self.bag_features(bags)
        self.mean_, self.scale_ = x.mean(0), x.std(0) + 1e-6
        if len(set(y.tolist())) < 2:
            raise LeukotreeError("A patient-level model needs patients of at least two "
                                 "diagnoses among the training patients.")
        lr = LogisticRegression(C=float(self.params.get("C", 1.0)), class_weight="balanced",
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

    def bag_features(self, bags: Sequence[Bag]) -> np.ndarray:
        node = self.params.get("cell_type", "promyelocyte")
        cells = self.cell_taxonomy
        if cells is None:
            return np.array([_cell_probs(self, b) for b in bags])  # raises the clear error
        leaves = [cells.leaf_index[leaf] for leaf in cells.descendant_leaves(
            cells.resolve(node, where="--patient-fraction-of"))]
        return np.array([[_cell_probs(self, b)[:, leaves].sum(1).mean()] for b in bags])

    def cell_weights(self, bag: Bag) -> np.ndarray:
        cells = self.cell_taxonomy
        leaves = [cells.leaf_index[leaf] for leaf in cells.descendant_leaves(
            cells.resolve(self.params.get("cell_type", "promyelocyte")))]
        evidence = _cell_probs(self, bag)[:, leaves].sum(1)
        return evidence / max(1e-12, evidence.sum())


@register
class DifferentialModel(_LogisticModel):
    """The differential count (mean cell-type probabilities) plus the mean diagnosis
    probabilities of the cells."""

    name = "differential"

    def bag_features(self, bags: Sequence[Bag]) -> np.ndarray:
        return np.array([np.concatenate([_cell_probs(self, b).mean(0), b.leaf_probs.mean(0)])
                         for b in bags])


class _GatedAttention(nn.Module):
    """Ilse et al. 2018: ``a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i)))``,
    ``z = sum_i a_i h_i``, logits ``= W z``."""

    def __init__(self, dim: int, hidden: int, classes: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.v, self.u = nn.Linear(hidden, hidden // 2), nn.Linear(hidden, hidden // 2)
        self.w = nn.Linear(hidden // 2, 1)
        self.out = nn.Linear(hidden, classes)

    def forward(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(cells)
        a = torch.softmax(self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h))), dim=0)
        return self.out((a * h).sum(0)), a[:, 0]


@register
class MILModel(PatientModel):
    """Attention MIL over ``[features, cell-type probabilities, diagnosis probabilities]``
    of each cell, standardised on the training cells; ``seeds`` networks averaged."""

    name = "mil"

    def _inputs(self, bag: Bag) -> np.ndarray:
        parts = [bag.features, bag.leaf_probs]
        if bag.cell_probs is not None:
            parts.append(bag.cell_probs)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def fit(self, bags: Sequence[Bag], y: np.ndarray, seed: int = 0) -> PatientModel:
        cells = np.concatenate([self._inputs(b) for b in bags])
        self.mean_, self.scale_ = cells.mean(0), cells.std(0) + 1e-6
        xs = [torch.from_numpy((self._inputs(b) - self.mean_) / self.scale_) for b in bags]
        counts = np.bincount(y, minlength=len(self.taxonomy.leaves))
        weight = torch.tensor(len(y) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
        self.nets_ = [self._train(xs, torch.from_numpy(y), weight, seed + k)
                      for k in range(int(self.params.get("seeds", 5)))]
        return self

    def _train(self, xs: list[torch.Tensor], y: torch.Tensor, weight: torch.Tensor,
               seed: int) -> _GatedAttention:
        gen = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = _GatedAttention(xs[0].shape[1], int(self.params.get("hidden", 64)),
                                  len(self.taxonomy.leaves), 0.25)
            opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
            net.train()
            for _ in range(int(self.params.get("epochs", 40))):
                for i in torch.randperm(len(xs), generator=gen).tolist():
                    keep = torch.rand(len(xs[i]), generator=gen) > 0.2  # drop 20% of cells
                    logits, _ = net(xs[i][keep] if keep.any() else xs[i])
                    loss = nn.functional.cross_entropy(logits[None], y[i:i + 1],
                                                       weight=weight)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        return net.eval()

    @torch.no_grad()
    def _run(self, bag: Bag) -> tuple[np.ndarray, np.ndarray]:
        x = torch.from_numpy((self._inputs(bag) - self.mean_) / self.scale_)
        probs, weights = [], []
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
                "hidden": int(self.params.get("hidden", 64)),
                "nets_": [{k: v.tolist() for k, v in n.state_dict().items()}
                          for n in self.nets_]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean_ = np.asarray(state["mean_"], dtype=np.float32)
        self.scale_ = np.asarray(state["scale_"], dtype=np.float32)
        self.nets_ = []
        for weights in state["nets_"]:
            net = _GatedAttention(len(self.mean_), int(state["hidden"]),
                                  len(self.taxonomy.leaves), 0.25)
            net.load_state_dict({k: torch.tensor(v) for k, v in weights.items()})
            self.nets_.append(net.eval())


def patient_params(config: Any) -> dict[str, Any]:
    """The parameters a training configuration gives its patient model."""
    if config.patient_model == "fraction":
        return {"cell_type": config.patient_fraction_of}
    return {}

"""One loader answers "what is this path?" (as timm's ``create_model`` does for names).

:func:`load` turns what a user gives as RUN into a :class:`LoadedModel` of one of four
kinds:

- ``run``: a run folder written by ``leukotree train`` (or ``adapt``), or its ``.pt``;
- ``onnx``: an ``.onnx`` file written by ``leukotree export``;
- ``cv``: a ``leukotree cv`` folder, its fold models averaged;
- ``ensemble``: a ``leukotree ensemble`` folder, its member runs averaged.

The object knows its members (cv, ensemble), the run folder with its validation split
(one run only), the checkpoint's payload, a :class:`~leukotree.inference.predictor.
Predictor` for an engine, and the PyTorch model on demand (explain, export, heat maps).
Whatever a command cannot take is refused here, with what to give instead. Callers never
test file suffixes or list a folder's members themselves.

This module sits above :mod:`.predictor`, :mod:`.ensemble` and :mod:`.export`, which do
not import it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from leukotree.errors import LeukotreeError
from leukotree.inference.options import check_option
from leukotree.inference.predictor import OnnxPredictor, Predictor, TorchPredictor
from leukotree.rundir import CVDir, EnsembleDir, RunDir, member_runs

#: The kinds of model a path can hold.
KINDS = ("run", "onnx", "cv", "ensemble")


@dataclass(eq=False)
class LoadedModel:
    """What a RUN path holds (:func:`load`); the heavy parts load on demand."""

    kind: str
    source: Path
    members: tuple[LoadedModel, ...] = ()
    #: Why the engine of the last :meth:`predictor` differs from the one asked for.
    engine_note: str | None = field(default=None, compare=False)

    @property
    def is_single(self) -> bool:
        """One model (a run or an ONNX file), not several averaged."""
        return not self.members

    @property
    def member_paths(self) -> list[Path]:
        """The member runs' folders (cv and ensemble; empty otherwise)."""
        return [m.source for m in self.members]

    @property
    def checkpoint(self) -> Path:
        """The model file (``RUN/best.pt`` or the ``.pt`` given) of one run."""
        self._need_run("this needs one model's checkpoint")
        return RunDir.checkpoint_of(self.source)

    @cached_property
    def payload(self) -> dict[str, Any]:
        """The checkpoint's payload (a cv or ensemble folder: its first member's; an ONNX
        file: empty, its metadata is read by its predictor)."""
        from leukotree.models.checkpoint import read_checkpoint

        if self.members:
            return self.members[0].payload
        return {} if self.kind == "onnx" else read_checkpoint(self.checkpoint)

    def run_dir(self, why: str) -> RunDir:
        """The run folder of one run (its ``split.csv``: the validation split); a cv or
        ensemble folder or an ONNX file is refused with ``why`` (what to give instead)."""
        if self.members:
            raise LeukotreeError(f"'{self.source}' is a cv or ensemble folder: its models have "
                                 f"no single validation split{why}")
        if self.kind == "onnx":
            raise LeukotreeError(f"'{self.source}' is an ONNX file: it has no validation "
                                 f"split (its run folder has one){why}")
        return RunDir.of(self.source)

    def first_run(self) -> LoadedModel:
        """This run, or a cv or ensemble folder's first member (e.g. for heat maps)."""
        one = self.members[0] if self.members else self
        one._need_run("heat maps and reports need a PyTorch model")
        return one

    def torch_model(self) -> Any:
        """The PyTorch model of one run (:class:`~leukotree.models.TreeClassifier`, in eval
        mode, loaded from its checkpoint: a new copy each call). A cv or ensemble folder is
        refused naming one of its runs; an ONNX file naming what to give."""
        from leukotree.models.checkpoint import load_model

        self._need_run("this needs one model")
        model, payload = load_model(self.checkpoint)
        self.__dict__.setdefault("payload", payload)
        return model

    def predictor(self, engine: str = "auto") -> Predictor:
        """A predictor of this model run by ``engine``: ``onnx`` runs ONNX Runtime (an
        ``.onnx`` file as given, a checkpoint through :func:`~.export.cached_onnx`);
        ``torch`` runs the checkpoint in eager PyTorch; ``auto`` picks ONNX Runtime when
        the onnx extra is installed (on CPUs it predicts faster end to end,
        ``benchmarks/bench_predict.py``), and PyTorch otherwise, saying why in
        :attr:`engine_note` when the export fails. A cv or ensemble folder's members are
        averaged (:class:`~.ensemble.EnsemblePredictor`)."""
        from leukotree.inference.ensemble import EnsemblePredictor
        from leukotree.inference.export import cached_onnx
        from leukotree.optional import available

        engine = check_option("engine", engine)
        self.engine_note = None
        if self.members:
            return EnsemblePredictor([m.predictor(engine) for m in self.members],
                                     str(self.source), [str(m) for m in self.member_paths])
        if self.kind == "onnx":
            if engine == "torch":
                raise LeukotreeError(f"'{self.source}' is an ONNX file: it runs with --engine "
                                     "onnx or auto; give the run folder or its .pt file for "
                                     "--engine torch.")
            return OnnxPredictor(self.source)
        if engine == "onnx" or (engine == "auto" and available("onnx", "onnxruntime")):
            try:
                return OnnxPredictor(cached_onnx(self.checkpoint))
            except Exception as err:  # auto falls back to PyTorch, saying why
                if engine == "onnx" or isinstance(err, LeukotreeError):
                    raise
                self.engine_note = (f"ONNX export failed ({type(err).__name__}: {err}); "
                                    "predicting with PyTorch instead")
        note = self.engine_note
        model = self.torch_model()
        ood = self.payload.get("ood") or {}
        self.engine_note = note
        return TorchPredictor(model, patient_model=self.payload.get("patient_model"),
                              expected_ood=float(ood.get("val_flagged", 0.05)),
                              conformal=self.payload.get("conformal"))

    def _need_run(self, need: str) -> None:
        if self.members:
            raise LeukotreeError(
                f"'{self.source}' is a cv or ensemble folder of {len(self.members)} models; "
                f"{need}: one of them, e.g. '{self.members[0].source}'.")
        if self.kind == "onnx":
            raise LeukotreeError(f"'{self.source}' is an exported ONNX file; {need}: give the "
                                 "run folder (or its .pt file) instead.")


def load(run: str | Path) -> LoadedModel:
    """What ``run`` holds (see the module's docstring); a path that holds no model is
    refused with what to give."""
    path = Path(run)
    if str(run).endswith(".onnx"):
        if not path.is_file():
            raise LeukotreeError(f"ONNX file '{path}' does not exist; give a file written by "
                                 "'leukotree export', or a run folder.")
        return LoadedModel("onnx", path)
    members = member_runs(path)
    if members is not None:
        kind = "cv" if CVDir(path).config.exists() else "ensemble"
        return LoadedModel(kind, path, tuple(LoadedModel("run", m) for m in members))
    checkpoint = RunDir.checkpoint_of(path)
    if not checkpoint.is_file():
        raise LeukotreeError(f"Model file '{checkpoint}' does not exist; give a run folder or "
                             "a .pt file written by 'leukotree train'.")
    return LoadedModel("run", path)


def trained_checkpoint(run: str | Path, flag: str) -> Path:
    """The model file of the one trained run that option ``flag`` names (a run folder's
    ``best.pt`` or a ``.pt`` file; e.g. ``--init``). A path without a model is refused
    naming ``flag`` and what to give; a cv or ensemble folder or an ONNX file is refused
    as :attr:`LoadedModel.checkpoint` refuses it (naming what to give instead)."""
    try:
        loaded = load(run)
    except LeukotreeError:
        raise LeukotreeError(f"{flag} '{run}' is not a trained model: give a run folder (with "
                             "best.pt) or a .pt file from leukotree train.") from None
    return loaded.checkpoint


def trained_run(path: str | Path) -> RunDir | None:
    """The run folder that ``path`` names when it is a trained run's with its split
    (``split.csv``): the folder itself, or the folder of its ``.pt`` file; None when
    ``path`` names anything else (data: a folder of images or a manifest), e.g. for
    ``--replay``, which takes either."""
    path = Path(path)
    if path.is_file() and path.suffix != ".pt":
        return None
    run = RunDir.of(path)
    return run if run.split.exists() else None


def load_predictor(run: str | Path, engine: str = "auto") -> tuple[Predictor, dict[str, Any]]:
    """``load(run).predictor(engine)`` with a description (``engine``, ``engine_note``,
    ``members``), for code written before :func:`load`; new code calls :func:`load`."""
    loaded = load(run)
    predictor = loaded.predictor(engine)
    return predictor, {"engine": predictor.engine, "engine_note": loaded.engine_note,
                       "members": loaded.member_paths}


def make_ensemble(runs: Sequence[str | Path], out: str | Path) -> Predictor:
    """Write the ensemble folder ``out`` (``ensemble.yaml``, :class:`~leukotree.rundir.
    EnsembleDir`) of the trained ``runs`` (run folders or their ``.pt`` files; at least
    two, each once, of one taxonomy, image size and crop), after loading them together
    as one predictor, which is returned. ``out`` must be a new or empty folder."""
    import yaml

    from leukotree.inference.ensemble import EnsemblePredictor
    from leukotree.rundir import require_new_folder, write_text

    if len(runs) < 2:
        raise LeukotreeError(f"An ensemble needs at least 2 runs; got {len(runs)}.")
    members: list[LoadedModel] = []
    for run in runs:
        if member_runs(run) is not None:
            raise LeukotreeError(f"'{run}' is already a cv or ensemble folder; give its run "
                                 "folders (or fold_<k> folders) one by one.")
        checkpoint = RunDir.checkpoint_of(run)  # says what to give when it is not a run
        if str(run).endswith(".onnx") or not checkpoint.is_file():
            raise LeukotreeError(f"'{run}' has no trained model ({checkpoint.name}); give run "
                                 "folders written by 'leukotree train' (or their .pt files).")
        if any(os.path.samefile(checkpoint, m.checkpoint) for m in members):
            raise LeukotreeError(f"'{run}' is given twice; an ensemble averages different "
                                 "runs (e.g. one recipe trained with --seed 0, 1, 2).")
        # the resolved path: a symbolic link later pointed elsewhere does not change it
        members.append(LoadedModel("run", Path(os.path.realpath(run))))
    target = EnsembleDir(out)
    require_new_folder(target.path, "ensemble")
    predictor = EnsemblePredictor([m.predictor("torch") for m in members], str(target.path),
                                  [str(m.source) for m in members])
    # an average of flagging and non-flagging members would lose the flag
    kinds = [("calibration" in m.payload, "ood" in m.payload) for m in members]
    for what, i in (("calibrated (temperatures)", 0),
                    ("scored for cells unlike its training cells", 1)):
        if len({k[i] for k in kinds}) > 1:
            has = next(m.source for m, k in zip(members, kinds, strict=True) if k[i])
            lacks = next(m.source for m, k in zip(members, kinds, strict=True) if not k[i])
            raise LeukotreeError(
                f"'{has}' is {what} and '{lacks}' is not (trained with --no-calibrate or "
                "--ood-quantile 0, or a cv fold with --fold-val-fraction 0): their average "
                "would be neither. Give runs that all are, or none.")
    target.path.mkdir(parents=True, exist_ok=True)
    write_text(target.config, "# leukotree ensemble: the member runs, averaged\n"
               + yaml.safe_dump({"members": [str(m.source) for m in members]}, sort_keys=False))
    return predictor

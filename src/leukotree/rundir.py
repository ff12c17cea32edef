"""The folders leukotree writes, in one place: every file name, and every reader.

- :class:`RunDir`: one training run (``leukotree train``);
- :class:`EvalDir`: one evaluation (``leukotree evaluate``, and ``fold_<k>/eval`` of a CV);
- :class:`CVDir`: one cross-validation (``leukotree cv``), a run folder per fold;
- :class:`DemoDir`: what ``leukotree demo`` writes.

Reading goes through :func:`read_text`, :func:`read_json`, :func:`read_yaml` and
:func:`read_csv`, which turn a missing, unreadable or malformed file into a
:class:`~leukotree.errors.LeukotreeError` that names the file and says what wrote it.
Writing text and JSON is atomic (a temporary file, then a rename).
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from leukotree.errors import LeukotreeError


def read_text(path: Path, what: str) -> str:
    """The UTF-8 text of ``path`` (a byte-order mark is dropped); ``what`` says which file it
    should be (for the error)."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LeukotreeError(f"{what} '{path}' does not exist.") from None
    except UnicodeDecodeError as err:
        raise LeukotreeError(f"{what} '{path}' is not UTF-8 text ({err.reason} at byte "
                             f"{err.start}); save it as UTF-8.") from None
    except OSError as err:
        raise LeukotreeError(f"Cannot read {what.lower()} '{path}': {err.strerror}.") from None


def read_json(path: Path, what: str) -> Any:
    """Parsed JSON of ``path`` (see :func:`read_text`)."""
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as err:
        raise LeukotreeError(f"{what} '{path}' is not valid JSON (line {err.lineno}: "
                             f"{err.msg}); it may be damaged: write it again.") from None


#: Deepest nesting of mappings and lists accepted in a YAML file.
MAX_YAML_DEPTH = 64


class StrictYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses what a hand-written leukotree file never needs and
    a hostile one abuses: aliases (``*ref``, the "billion laughs"), a key repeated in one
    mapping (YAML would keep the last silently), and nesting deeper than
    :data:`MAX_YAML_DEPTH`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.constructor.ConstructorError(
                None, None, f"YAML aliases (*{event.anchor}) are not accepted; write the "
                "content out", event.start_mark)
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise yaml.constructor.ConstructorError(
                None, None, f"nesting deeper than {MAX_YAML_DEPTH} levels",
                self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, yaml.Node] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    "found a key that is a list or mapping; keys must be plain names",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"the key {key!r} appears twice (first on line "
                    f"{seen[key].start_mark.line + 1}); "
                    "each key may appear once", key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str, source: str) -> Any:
    """YAML ``text`` parsed by :class:`StrictYamlLoader`; errors name ``source``."""
    try:
        return yaml.load(text, Loader=StrictYamlLoader)  # a SafeLoader subclass
    except yaml.YAMLError as err:
        raise LeukotreeError(f"{source} is not valid YAML: {err}") from None


def read_yaml(path: Path, what: str) -> Any:
    """Parsed YAML of ``path`` (strict: see :class:`StrictYamlLoader`)."""
    return parse_yaml(read_text(path, what), f"{what} '{path}'")


def read_csv(path: Path, what: str, required: Sequence[str] = ()) -> list[dict[str, str]]:
    """Rows of a CSV file with a header line; ``required`` columns must be present."""
    text = read_text(path, what)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in required if c not in (reader.fieldnames or [])]
    if missing:
        raise LeukotreeError(f"{what} '{path}' lacks the column(s) {missing} (found "
                             f"{reader.fieldnames}); it may be damaged: write it again.")
    return list(reader)


def _json_default(obj: object) -> object:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_text(path: Path, text: str) -> Path:
    """Write ``text`` as UTF-8, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (NumPy values and paths converted), atomically."""
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]], fieldnames: Sequence[str]) -> Path:
    """Write dict rows under a header line, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fieldnames))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def require_new_folder(path: Path, what: str) -> None:
    """Refuse ``--out`` ``path`` unless it is missing or an empty folder."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LeukotreeError(f"--out '{path}' exists and is not an empty folder; choose a new "
                             f"folder for the {what}.")


#: The format tag of a run folder's marker (:attr:`RunDir.MARKER`).
RUN_FORMAT = "leukotree-run/1"


def _has_format(path: Path, tag: str) -> bool:
    """Whether the JSON file ``path`` holds ``{"format": tag, ...}``."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("format") == tag


class _Folder:
    """A folder leukotree writes, addressed by its path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.path}')"

    def __truediv__(self, name: str) -> Path:
        return self.path / name


class RunDir(_Folder):
    """A training run folder (``leukotree train --out RUN``).

    ``config.yaml`` (resolved options), ``environment.json`` (versions, seed),
    ``taxonomy.yaml``, ``split.csv`` (which image trained, which validated),
    ``history.csv`` and ``learning_curves.png`` (per epoch), ``best.pt`` (the best
    model, self-describing), ``last.pt`` (everything ``--resume`` needs),
    ``best.onnx`` (the ONNX export ``predict`` keeps), ``summary.json``,
    ``model_card.md`` (what the model is for, its data, figures and limits) and
    ``cache/`` (decoded pixels); an adapted run (``leukotree adapt``) has ``adapt.json``,
    and a self-trained one the labelled new cells (``pseudo_labels.csv``) and the source
    run's validation images it validated on (``val.csv``).
    """

    CONFIG = "config.yaml"
    ENVIRONMENT = "environment.json"
    TAXONOMY = "taxonomy.yaml"
    SPLIT = "split.csv"
    HISTORY = "history.csv"
    CURVES = "learning_curves.png"
    BEST = "best.pt"
    LAST = "last.pt"
    ONNX = "best.onnx"
    SUMMARY = "summary.json"
    #: What the model is, is for, was trained on and scored, and its limits
    #: (:func:`leukotree.report.model_card.write_model_card`).
    MODEL_CARD = "model_card.md"
    CACHE = "cache"
    VAL_MANIFEST = "val.csv"
    EVAL = "eval"
    LOCK = ".lock"
    SKIPPED = "skipped.csv"
    NOT_USED = "not_used.csv"
    ADAPT = "adapt.json"
    #: The new lab's cells and the labels a self-training ``adapt`` gave them: written
    #: into the (new) run folder, with the source run's validation images (``val.csv``),
    #: before the fine-tune trains on them.
    PSEUDO_LABELS = "pseudo_labels.csv"
    #: What the labelling of a self-training found (``adapt --resume`` finishes with it).
    SELF_TRAINING = "self_training.json"
    #: A self-trained run's cell taxonomy (its model's own, kept beside the run).
    CELL_TAXONOMY = "cell_taxonomy.yaml"
    #: Written first into every run folder: what makes a folder a run (a user's own
    #: ``config.yaml`` never does), with the format tag :data:`RUN_FORMAT`.
    MARKER = ".leukotree-run.json"

    @classmethod
    def of(cls, run: str | Path) -> RunDir:
        """The run folder of ``run``: the folder itself, or the folder of its ``best.pt``."""
        run = Path(run)
        return cls(run.parent if run.is_file() else run)

    @staticmethod
    def checkpoint_of(run: str | Path) -> Path:
        """The model file of ``run``: ``RUN/best.pt`` for a folder, else the file itself.
        A cv or ensemble folder (several models) is refused, naming one of its runs."""
        run = Path(run)
        if not run.is_dir():
            return run
        if not (run / RunDir.BEST).exists():
            members = member_runs(run)
            if members:  # predict, evaluate, report and serve take it; this needs one model
                raise LeukotreeError(
                    f"'{run}' is a cv or ensemble folder of {len(members)} models; this "
                    f"needs one of them, e.g. '{members[0]}'.")
        return run / RunDir.BEST

    config = property(lambda self: self.path / self.CONFIG)
    environment = property(lambda self: self.path / self.ENVIRONMENT)
    taxonomy = property(lambda self: self.path / self.TAXONOMY)
    split = property(lambda self: self.path / self.SPLIT)
    history = property(lambda self: self.path / self.HISTORY)
    curves = property(lambda self: self.path / self.CURVES)
    best = property(lambda self: self.path / self.BEST)
    last = property(lambda self: self.path / self.LAST)
    onnx = property(lambda self: self.path / self.ONNX)
    summary = property(lambda self: self.path / self.SUMMARY)
    model_card = property(lambda self: self.path / self.MODEL_CARD)
    cache = property(lambda self: self.path / self.CACHE)
    val_manifest = property(lambda self: self.path / self.VAL_MANIFEST)
    skipped = property(lambda self: self.path / self.SKIPPED)
    not_used = property(lambda self: self.path / self.NOT_USED)
    eval_dir = property(lambda self: EvalDir(self.path / self.EVAL))

    marker = property(lambda self: self.path / self.MARKER)

    @property
    def is_run(self) -> bool:
        """True when the folder was started by leukotree: it holds the run marker
        (:attr:`MARKER`, format :data:`RUN_FORMAT`), or, for a run written before the
        marker, ``config.yaml`` with ``last.pt`` or ``best.pt``. A folder that merely holds a file
        named like a run's is not a run."""
        if self.marker.is_file():
            return _has_format(self.marker, RUN_FORMAT)
        return self.config.is_file() and (self.last.is_file() or self.best.is_file())

    def mark(self) -> None:
        """Write the run marker (the folder becomes a run; see :attr:`is_run`)."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_json(self.marker, {"format": RUN_FORMAT, "pid": os.getpid()})

    def foreign_files(self) -> list[Path]:
        """Files in the folder when it is not a leukotree run (nothing when it is one)."""
        if not self.path.is_dir() or self.is_run:
            return []
        return sorted(p for p in self.path.iterdir() if p.name != self.LOCK)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold an exclusive lock on the run folder (``.lock``) while a process writes it;
        a second process is refused with an error that says who holds it."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = (self.path / self.LOCK).open("a+", encoding="utf-8")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise LeukotreeError(
                    f"Run folder '{self.path}' is being written by {holder}; wait for it to "
                    "finish or choose another --out.") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"leukotree process {os.getpid()}\n")
            handle.flush()
            yield
        finally:
            handle.close()

    def read_split(self, part: str | None = None) -> list[dict[str, str]]:
        """Rows of ``split.csv`` (``path,label,patient,slide,group``, ``cell_type`` when
        the run has a cell-type head, ``split``), of one part."""
        if not self.split.exists():
            raise LeukotreeError(f"'{self.path}' has no {self.SPLIT}; it is not a run folder "
                                 "written by 'leukotree train'.")
        rows = read_csv(self.split, "Split file", ("path", "label", "split"))
        return [r for r in rows if part is None or r["split"] == part]

    def read_summary(self) -> dict[str, Any]:
        return read_json(self.summary, "Run summary")

    def test_part(self) -> str:
        """The part of ``split.csv`` a CV fold is tested on: ``test`` when the fold had a
        validation part of its own (``fold_val_fraction``), else ``val`` (the fold
        itself)."""
        return "test" if self.read_split("test") else "val"

    def write_val_manifest(self, out: Path | None = None, part: str = "val") -> Path:
        """The run's validation images (or those of another ``part`` of ``split.csv``) as
        a manifest CSV (``path,label,patient,slide``, and ``cell_type`` when the split
        lists cell types)."""
        rows = self.read_split(part)
        columns = ("path", "label", "patient", "slide") + (
            ("cell_type",) if rows and "cell_type" in rows[0] else ())
        return write_csv(out or self.val_manifest,
                         [{k: r.get(k, "") for k in columns} for r in rows], columns)


class EvalDir(_Folder):
    """An evaluation folder: ``metrics.json`` / ``.md`` / ``.html``, ``predictions.csv``,
    ``validation.csv`` and the figures."""

    METRICS = "metrics.json"
    MARKDOWN = "metrics.md"
    HTML = "metrics.html"
    PREDICTIONS = "predictions.csv"
    VALIDATION = "validation.csv"
    CONFUSION = "confusion.png"
    CONFUSION_NORMALIZED = "confusion_normalized.png"
    ROC = "roc.png"
    RELIABILITY = "reliability.png"
    COVERAGE = "coverage.png"

    metrics = property(lambda self: self.path / self.METRICS)
    markdown = property(lambda self: self.path / self.MARKDOWN)
    html = property(lambda self: self.path / self.HTML)
    predictions = property(lambda self: self.path / self.PREDICTIONS)
    validation = property(lambda self: self.path / self.VALIDATION)

    def read_metrics(self) -> dict[str, Any]:
        return read_json(self.metrics, "Metrics file")

    def read_predictions(self) -> list[dict[str, str]]:
        return read_csv(self.predictions, "Predictions file", ("path", "label", "patient"))


class CVDir(_Folder):
    """A cross-validation folder (``leukotree cv --out DIR``).

    ``cv_config.yaml`` (the options every fold shares), ``fold_<k>/`` (a
    :class:`RunDir` each, with ``eval/`` on its held-out fold), ``folds.csv`` (each fold's
    test patients), the gathered ``summary.json`` / ``summary.md`` / ``summary.html``, and
    with ``--protocol kfold,cluster`` the leave-cluster-out CV in ``cluster/``; the colour
    protocols' per-image colour features in ``colour_<features>.csv`` (one per feature
    set, shared by the protocols that move it) and their scores in ``<protocol>/``.
    """

    CONFIG = "cv_config.yaml"
    SUMMARY = "summary.json"
    MARKDOWN = "summary.md"
    FOLDS = "folds.csv"
    CLUSTER = "cluster"

    config = property(lambda self: self.path / self.CONFIG)
    summary = property(lambda self: self.path / self.SUMMARY)
    markdown = property(lambda self: self.path / self.MARKDOWN)
    #: Every fold's test patient groups (``group,fold``, and ``repeat`` or ``cluster``).
    folds = property(lambda self: self.path / self.FOLDS)

    @property
    def cluster(self) -> CVDir:
        """The leave-cluster-out CV of ``--protocol kfold,cluster``, inside this one."""
        return CVDir(self.path / self.CLUSTER)

    @staticmethod
    def fold_name(k: int, repeat: int = 0) -> str:
        """``fold_<k>``, and ``fold_<k>_r<repeat>`` for the repeats after the first."""
        return f"fold_{k}" if repeat == 0 else f"fold_{k}_r{repeat}"

    def fold(self, k: int, repeat: int = 0) -> RunDir:
        return RunDir(self.path / self.fold_name(k, repeat))

    def colour_features(self, features: str) -> Path:
        """The per-image colour features ``features`` (``stats``, ``parts``) of the CV's
        images, read once for every colour protocol that moves them."""
        return self.path / f"colour_{features}.csv"

    def read_summary(self) -> dict[str, Any]:
        if not self.summary.exists():
            raise LeukotreeError(f"'{self.path}' has no {self.SUMMARY}; is it a folder written "
                                 "by 'leukotree cv'?")
        return read_json(self.summary, "CV summary")


class EnsembleDir(_Folder):
    """An ensemble of trained runs (``leukotree ensemble RUN RUN... --out DIR``):
    ``ensemble.yaml`` lists the member runs (absolute paths), which are predicted as
    one model, their outputs averaged (:mod:`leukotree.inference.ensemble`)."""

    CONFIG = "ensemble.yaml"

    config = property(lambda self: self.path / self.CONFIG)

    def members(self) -> list[Path]:
        doc = read_yaml(self.config, "Ensemble file")
        members = doc.get("members") if isinstance(doc, dict) else None
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise LeukotreeError(f"Ensemble file '{self.config}' must hold 'members: [run "
                                 "folder, ...]'; make it with 'leukotree ensemble'.")
        gone = [m for m in members if not Path(m).exists()]
        if gone:
            raise LeukotreeError(f"The ensemble '{self.path}' names {len(gone)} member run(s) "
                                 f"that no longer exist (e.g. '{gone[0]}'); restore them or "
                                 "make the ensemble again with 'leukotree ensemble'.")
        return [Path(m) for m in members]


def member_runs(path: str | Path) -> list[Path] | None:
    """The run folders a ``leukotree cv`` folder or an ensemble folder averages, in
    order; None for anything else (a run folder, a model file)."""
    cv, ensemble = CVDir(path), EnsembleDir(path)
    if cv.config.exists():
        return [cv.fold(f["fold"], f.get("repeat", 0)).path
                for f in cv.read_summary()["folds"]]
    if ensemble.config.exists():
        return ensemble.members()
    return None


class DemoDir(_Folder):
    """What ``leukotree demo`` writes: ``check.json``, ``folds.csv``, ``cv/`` (a
    :class:`CVDir`), ``report.html`` and ``summary.json``."""

    CHECK = "check.json"
    FOLDS = "folds.csv"
    CV = "cv"
    REPORT = "report.html"
    SUMMARY = "summary.json"

    check = property(lambda self: self.path / self.CHECK)
    folds = property(lambda self: self.path / self.FOLDS)
    cv = property(lambda self: CVDir(self.path / self.CV))
    report = property(lambda self: self.path / self.REPORT)
    summary = property(lambda self: self.path / self.SUMMARY)
